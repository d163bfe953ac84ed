"""Fine-tuning from the app: a background job (like generation) and what the Fine-tune page calls.

The job waits its turn in the generation queue (fine-tuning and generating on the same CPUs
would thrash each other), converts the user's data, trains, and writes the model into the
server's fine-tune folder. The page polls `progress()`; Cancel stops it at the next step and
writes nothing. A closed page does not stop it: it ends at its time budget, and the model is
then in the fine-tune folder for the Home page to load. The thread touches no Streamlit API.
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from crystallm_core.chem.data.user_data import TABLE_SUFFIXES, ColumnMap
from crystallm_core.lm.checkpoints import read_config, resolve_model_dir
from crystallm_core.product.finetune import (
    FineTuneResult,
    FineTuneSettings,
    UserData,
    finetune,
    prepare_user_data,
)
from crystallm_core.product.jobs import GENERATION_QUEUE, GenerationQueue, QueuedJob
from crystallm_core.product.server_settings import (
    check_upload_size,
    server_settings,
    within_roots,
)
from crystallm_core.product.service import check_server_capacity

LOG = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,63}$")
MAX_LISTED = 200  # data files offered on the page
SEARCH_DEPTH = 3


@dataclass
class FineTuneProgress:
    status: str  # queued | preparing | training | done | cancelled | failed
    step: int
    max_steps: int
    loss: float | None
    val_loss: float | None
    elapsed: float
    eta: float | None
    position: int | None  # place in the queue while queued

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0


class FineTuneJob(QueuedJob):
    """Fine-tunes `base` on the data at `source` into `out`, in a background thread."""

    def __init__(self, source: Path, out: Path, base: str | None, columns: ColumnMap, labels: Path | None,
                 settings: FineTuneSettings, owns_source: bool = False, queue: GenerationQueue = GENERATION_QUEUE):
        super().__init__(queue, f"finetune-{out.name}")
        self.source, self.out, self.base, self.columns, self.labels = source, out, base, columns, labels
        self.settings, self.owns_source = settings, owns_source
        self.error: str | None = None
        self.data: UserData | None = None
        self.result: FineTuneResult | None = None
        self.latest: dict = {}

    def progress(self) -> FineTuneProgress:
        latest = dict(self.latest)
        step, max_steps, elapsed = latest.get("step", 0), latest.get("max_steps", 0), latest.get("elapsed_s", 0.0)
        eta = elapsed / step * (max_steps - step) if step and not self.finished else None
        position = self.queue.position(self.ticket) if self.status == "queued" else None
        return FineTuneProgress(self.status, step, max_steps, latest.get("loss"), latest.get("val_loss"),
                                elapsed, eta, position)

    def _on_progress(self, entry: dict) -> None:
        self.latest = entry

    def _work(self) -> None:
        status = "cancelled"
        try:
            if self.queue.wait_turn(self.ticket, self._cancel.is_set):
                self.status, self.started_at = "preparing", time.time()
                config, _ = read_config(resolve_model_dir(self.base))
                self.data = prepare_user_data(self.source, config.n_positions - 2, self.columns, self.labels,
                                              self.settings)
                self.status = "training"
                self.result = finetune(self.source, self.out, self.base, settings=self.settings,
                                       on_progress=self._on_progress, should_stop=self._cancel.is_set, data=self.data)
                status = "done" if self.result is not None else "cancelled"
        except ValueError as error:  # bad data or settings: the message is meant for the user
            status, self.error = "failed", str(error)
        except Exception as error:
            LOG.exception("fine-tuning job %s failed", self.out)
            status, self.error = "failed", f"fine-tuning failed ({type(error).__name__}: {error})"
        finally:
            self.queue.leave(self.ticket)
            if self.owns_source:  # an upload's private temporary folder
                shutil.rmtree(self.source.parent, ignore_errors=True)
            self.status = status


# ---- what the Fine-tune page calls ----------------------------------------------------------
def data_choices() -> list[Path]:
    """Tables and folders of CIFs under the data roots (a few levels deep, at most MAX_LISTED)."""
    found: list[Path] = []
    for root in server_settings().data_roots:
        if not root.is_dir():
            continue
        for depth in range(SEARCH_DEPTH):
            for path in sorted(root.glob("/".join(["*"] * (depth + 1)))):
                if path.is_file() and path.name.lower().endswith(TABLE_SUFFIXES):
                    found.append(path)
                elif path.is_dir() and any(path.glob("*.cif")):
                    found.append(path)
                if len(found) >= MAX_LISTED:
                    return found
    return found


def checked_data_path(text: str | Path) -> Path:
    """A data file or folder inside the data roots (resolved); ValueError otherwise."""
    path = within_roots(text, server_settings().data_roots, "fine-tuning data")
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    return path


def save_upload(name: str, content: bytes) -> Path:
    """An uploaded table written to a private temporary folder (size-checked); its path."""
    check_upload_size(len(content))
    if not name.lower().endswith(TABLE_SUFFIXES):
        raise ValueError(f"{name}: upload a .csv, .csv.gz or .parquet table (a folder of CIFs goes on the server)")
    folder = Path(tempfile.mkdtemp(prefix="crystallm-upload-"))
    path = folder / Path(name).name
    path.write_bytes(content)
    return path


def new_model_dir(name: str) -> Path:
    """Where a new model called `name` goes in the fine-tune folder; ValueError for a bad or taken name."""
    if not NAME_RE.match(name):
        raise ValueError("name the model with letters, digits, '.', '-' or '_' (up to 64 characters)")
    out = server_settings().finetune_dir / name
    if out.exists():
        raise ValueError(f"a model named '{name}' already exists: choose another name")
    return out


def start_finetune(source: Path, name: str, base: str | None, columns: ColumnMap, labels: Path | None,
                   settings: FineTuneSettings, upload: bool = False) -> FineTuneJob:
    """Validate and queue a fine-tuning job writing the model `name` into the fine-tune folder;
    with `upload` the job deletes `source` (saved by `save_upload`) when it ends."""
    check_server_capacity()
    settings.validate()
    out = new_model_dir(name)
    return FineTuneJob(source, out, base, columns, labels, settings, owns_source=upload).start()
