"""Reward fine-tuning aimed at a user's own target region, as a background job (the Fine-tune page).

The job runs `align` (sample → judge → fine-tune rounds) over the cells of one region, say
stable oxides with 2–3 eV gaps, and waits its turn in the generation queue like fine-tuning.
The rounds go to `<fine-tune folder>/<name>/rounds/` (each round's model, samples and report);
when the job ends, the last accepted round's model is copied to `<fine-tune folder>/<name>/`, a
model folder the Home page loads like any fine-tuned one. Cancel stops it within a sampling step
(the round in progress is dropped); at the time budget the running round finishes and no new one
starts. Either way the finished rounds are kept and the last accepted model published; with no
finished round nothing is left behind. The page polls `progress()`; the thread touches no
Streamlit API.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pymatgen.core import Element

from crystallm_core.product.align import align
from crystallm_core.product.align_settings import AlignSettings, region_grid
from crystallm_core.product.finetune_job import new_model_dir
from crystallm_core.product.jobs import GENERATION_QUEUE, GenerationQueue, QueuedJob
from crystallm_core.product.service import check_server_capacity

LOG = logging.getLogger(__name__)
MAX_BAND_GAP = 12.0  # eV: the paper's largest target is 12.1 eV
MAX_E_HULL = 0.5  # eV/atom: the slider's range
MAX_ROUNDS = 50
RUN_FOLDER = "rounds"  # inside the model folder: align's run (state.json, round_NNN/)
# Small enough for a CPU server: 24 samples and 4 relaxations a round (the README's pilot took about
# 6.5 CPU minutes for a round of 64 samples and 8 relaxations); free-decoding validity is not shown.
CPU_DEFAULTS = dict(cells_per_round=3, samples_per_cell=8, relax_per_round=4, replay_per_round=16, free_samples=0)


@dataclass
class TargetRegion:
    """What the user aims at: a band-gap range at one E_hull (None = any), and elements."""

    gap_low: float
    gap_high: float
    e_hull: float | None = 0.0
    required_elements: list[str] | None = None  # a sample lacking any of them earns no reward
    elements: list[str] | None = None  # only these may be written (None = any)

    def validate(self) -> None:
        if not 0 <= self.gap_low <= self.gap_high <= MAX_BAND_GAP:
            raise ValueError(f"the band-gap range must satisfy 0 ≤ low ≤ high ≤ {MAX_BAND_GAP:g} eV, "
                             f"got {self.gap_low:g}–{self.gap_high:g}")
        if self.e_hull is not None and not 0 <= self.e_hull <= MAX_E_HULL:
            raise ValueError(f"the E_hull target must lie in 0–{MAX_E_HULL:g} eV/atom, got {self.e_hull:g}")
        symbols = [*(self.required_elements or []), *(self.elements or [])]
        unknown = sorted({s for s in symbols if not Element.is_valid_symbol(s)})
        if unknown:
            raise ValueError(f"not chemical elements: {', '.join(unknown)} (write symbols such as O, Li, Fe)")
        if self.elements and self.required_elements:
            excluded = sorted(set(self.required_elements) - set(self.elements))
            if excluded:
                raise ValueError(f"{', '.join(excluded)} must be contained but is not among the allowed elements")

    def describe(self) -> str:
        gaps = f"{self.gap_low:g} eV" if self.gap_low == self.gap_high else f"{self.gap_low:g}–{self.gap_high:g} eV"
        hull = "any E_hull" if self.e_hull is None else f"E_hull {self.e_hull:g} eV/atom"
        text = f"band gap {gaps}, {hull}"
        if self.required_elements:
            text += f", containing {', '.join(self.required_elements)}"
        if self.elements:
            text += f", only {', '.join(self.elements)}"
        return text


def element_list(text: str) -> list[str] | None:
    """"Li, Fe O" → ["Li", "Fe", "O"]; None when empty."""
    return [symbol.strip() for symbol in text.replace(",", " ").split()] or None


@dataclass
class AlignProgress:
    status: str  # queued | running | done | cancelled | failed
    rounds_done: int
    rounds: int
    elapsed: float
    eta: float | None
    position: int | None  # place in the queue while queued
    reports: list[dict]  # one per finished round

    @property
    def fraction(self) -> float:
        return min(1.0, self.rounds_done / self.rounds) if self.rounds else 0.0


def remaining_seconds(elapsed: float, rounds_done: int, rounds: int, minutes: float | None) -> float | None:
    """Mean round time × the rounds still to start (no new round starts after the time budget);
    None before the first round has finished."""
    if not rounds_done:
        return None
    mean = elapsed / rounds_done  # the set-up (judges, replay rows) is shared out over the rounds
    left = rounds - rounds_done
    if minutes is not None:
        left = min(left, math.ceil(max(minutes * 60 - elapsed, 0.0) / mean))
    return mean * left


class AlignJob(QueuedJob):
    """Reward fine-tunes `base` towards `region` into the model folder `out`, in a background thread."""

    def __init__(self, out: Path, base: str | None, region: TargetRegion, settings: AlignSettings,
                 queue: GenerationQueue = GENERATION_QUEUE):
        super().__init__(queue, f"align-{out.name}")
        self.out, self.base, self.region, self.settings = out, base, region, settings
        self.error: str | None = None
        self.reports: list[dict] = []
        self.stopped: str | None = None  # why the rounds ended early (time budget, collapse guard)
        self.model_dir: Path | None = None  # the published model, once the job has ended
        self.finished_at: float | None = None

    @property
    def run_dir(self) -> Path:
        return self.out / RUN_FOLDER

    def progress(self) -> AlignProgress:
        reports = list(self.reports)
        end = self.finished_at or time.time()
        elapsed = end - self.started_at if self.started_at else 0.0
        eta = None if self.finished else remaining_seconds(elapsed, len(reports), self.settings.rounds,
                                                           self.settings.minutes)
        position = self.queue.position(self.ticket) if self.status == "queued" else None
        return AlignProgress(self.status, len(reports), self.settings.rounds, elapsed, eta, position, reports)

    def _work(self) -> None:
        status = "cancelled"
        try:
            if self.queue.wait_turn(self.ticket, self._cancel.is_set):
                self.status, self.started_at = "running", time.time()
                align(self.run_dir, self.base, self.settings, on_round=self.reports.append,
                      should_stop=self._cancel.is_set)
                status = "cancelled" if self._cancel.is_set() else "done"
        except ValueError as error:  # bad settings or elements the model cannot write: meant for the user
            status, self.error = "failed", str(error)
        except Exception as error:
            LOG.exception("reward fine-tuning job %s failed", self.out)
            status, self.error = "failed", f"reward fine-tuning failed ({type(error).__name__}: {error})"
        finally:
            self.queue.leave(self.ticket)
            try:
                self.model_dir = self._publish()
            except Exception as error:
                LOG.exception("could not publish the model of %s", self.out)
                status, self.error = "failed", f"the model could not be written ({type(error).__name__}: {error})"
            finally:  # always final, or the page would poll a dead thread forever
                self.finished_at = time.time()
                self.status = status

    def _publish(self) -> Path | None:
        """Copy the last accepted round's model to `out` (None, and `out` removed, without one)."""
        state_path = self.run_dir / "state.json"
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        self.stopped = state.get("stopped")
        if not state.get("current"):
            shutil.rmtree(self.out, ignore_errors=True)
            return None
        shutil.copytree(state["current"], self.out, dirs_exist_ok=True)
        metadata_path = self.out / "metadata.json"
        metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
        accepted = sum(bool(r.get("accepted")) for r in state["rounds"])
        metadata.update(name=self.out.name, target_region=asdict(self.region), accepted_rounds=accepted,
                        trained_on=f"reward fine-tuning towards {self.region.describe()} "
                                   f"({accepted} rounds on its own judged samples; reports in {RUN_FOLDER}/)")
        metadata_path.write_text(json.dumps(metadata, indent=2))
        return self.out


# ---- what the Fine-tune page calls ----------------------------------------------------------
def start_align(name: str, base: str | None, region: TargetRegion, rounds: int = 4, minutes: float = 30.0,
                seed: int = AlignSettings.seed, **overrides) -> AlignJob:
    """Validate and queue a reward fine-tuning job writing the model `name` into the fine-tune
    folder. `overrides` replace the CPU-sized defaults of other `AlignSettings` fields."""
    check_server_capacity()
    region.validate()
    if not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(f"rounds must be 1–{MAX_ROUNDS}, got {rounds}")
    if not minutes > 0:
        raise ValueError(f"the time budget must be more than 0 minutes, got {minutes:g}")
    settings = AlignSettings(rounds=rounds, minutes=minutes, seed=seed, **{**CPU_DEFAULTS, **overrides},
                             grid=region_grid(region.gap_low, region.gap_high, region.e_hull),
                             elements=region.elements, required_elements=region.required_elements)
    settings.validate()
    out = new_model_dir(name)
    try:
        out.mkdir(parents=True)  # claims the name now, not when the job's turn comes
    except FileExistsError:
        raise ValueError(f"a model named '{name}' already exists: choose another name") from None
    return AlignJob(out, base, region, settings).start()
