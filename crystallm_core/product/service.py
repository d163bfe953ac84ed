"""What the app's pages call: submit requests as a job, follow it, read a run's table and plots'
data, download it, reopen it. Pages keep only layout and widgets; every number they show
comes from here (and so from the core)."""
from __future__ import annotations

import io
import zipfile
from dataclasses import replace
from functools import lru_cache
from typing import Sequence

import numpy as np
import pandas as pd

from crystallm_core.chem.metrics import (  # noqa: F401 (the pages take PAPER_BY_TARGET, funnel_counts from here)
    PAPER_BY_TARGET,
    MetricSettings,
    funnel_counts,
    hit_rate_curve,
    summarise,
)
from crystallm_core.chem.prompts import space_group_symbols
from crystallm_core.chem.relaxation import relax_and_check  # noqa: F401 (for the pages)
from crystallm_core.chem.stability import HULL_BIAS_NOTE, RelaxSettings  # noqa: F401 (for the pages)
from crystallm_core.chem.structure_info import (  # noqa: F401
    describe_structure,
    parse_cif,
    xrd_pattern,
)
from crystallm_core.lm.checkpoints import LoadedModel
from crystallm_core.lm.sampler import DECODINGS, SamplingSettings  # noqa: F401 (the pages take them from here)
from crystallm_core.product.generation import GenerationRequest, new_run, prepare
from crystallm_core.product.history import HistoryStore
from crystallm_core.product.jobs import GenerationJob
from crystallm_core.product.run import Run
from crystallm_core.product.run_files import run_zip, uploaded_cif_text  # noqa: F401 (for the pages)

NAN = float("nan")
DEFAULT_SAMPLING = SamplingSettings()  # the one place the app, CLI and scripts take defaults from
DEFAULT_METRICS = MetricSettings()


def submit(loaded: LoadedModel, requests: Sequence[GenerationRequest], store: HistoryStore | None,
           kind: str = "generate", settings: dict | None = None) -> GenerationJob:
    """Validate every request (ValueError with the reason, before anything queues) and start a job."""
    for request in requests:
        prepare(loaded, request)
    return GenerationJob(loaded, requests, new_run(loaded, list(requests), kind, settings), store=store).start()


def sweep_requests(base: GenerationRequest, low: float, high: float, m: int, k: int,
                   e_hull: float) -> list[GenerationRequest]:
    """K samples at each of M band-gap targets from low to high; each target its own seed."""
    if high <= low:
        raise ValueError("The highest target must be above the lowest.")
    targets = [round(float(t), 3) for t in np.linspace(low, high, int(m))]
    base = replace(base, e_hull=e_hull, composition=None, z=None, spacegroup=None, stop_after_valid=None)
    return [replace(base, band_gap=target, n=int(k), seed=base.seed + i) for i, target in enumerate(targets)]


def hit_rate_vs_tolerance(frame: pd.DataFrame, tolerances: Sequence[float]) -> pd.DataFrame:
    """Hit rate over all samples as the tolerance grows (targets may differ per structure)."""
    hits = pd.Series(0.0, index=range(len(tolerances)))
    for target, group in frame.dropna(subset=["band_gap_target"]).groupby("band_gap_target"):
        curve = hit_rate_curve(group["band_gap_pred"].tolist(), group["valid"].tolist(), float(target), tolerances)
        hits += curve["hit_rate"] * len(group)
    return pd.DataFrame({"tolerance": list(tolerances), "hit_rate": hits / max(len(frame), 1)})


def sweep_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per band-gap target: samples, valid and hit rates (over all samples), mean predicted gap."""
    rows = []
    for target, group in frame.dropna(subset=["band_gap_target"]).groupby("band_gap_target"):
        rates = summarise(group, float(target))
        predicted = pd.to_numeric(group["band_gap_pred"], errors="coerce")
        rows.append({"target": float(target), "n": len(group), "valid": rates["valid"], "hit": rates["hit"],
                     "mean_pred": float(predicted.mean()) if predicted.notna().any() else NAN,
                     "std_pred": float(predicted.std()) if predicted.notna().sum() > 1 else NAN})
    return pd.DataFrame(rows, columns=["target", "n", "valid", "hit", "mean_pred", "std_pred"])


def run_table(run: Run, tolerance: float | None = None, threshold: float | None = None,
              unique: bool = True) -> pd.DataFrame:
    """The run's table with the page's metric settings (the run's own by default)."""
    own = run.metric_settings()
    return run.to_frame(MetricSettings(own.stability_threshold if threshold is None else threshold,
                                       own.hit_tolerance if tolerance is None else tolerance), unique)


def stored_run_zip(store: HistoryStore, run_id: str, include_invalid: bool = False) -> bytes:
    """`run_zip` of a stored run; a run deleted since the page was drawn gives a zip that says so
    (a download button builds its file in a later request, where an error would be a broken link)."""
    try:
        return run_zip(store.load(run_id), include_invalid)
    except KeyError:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("RUN_DELETED.txt", f"Run {run_id} was deleted from the history before this download.\n")
        return buffer.getvalue()


def known_space_groups(loaded: LoadedModel) -> set[str]:
    """H-M symbols the model's vocabulary can write."""
    return set(space_group_symbols(loaded.tokenizer))


@lru_cache(maxsize=1)
def space_group_choices() -> list[tuple[int, str]]:
    """(number, short H-M symbol) for all 230 space groups, in the notation the model writes."""
    from crystallm_core.lm.tokenizer import standard_settings

    return sorted((number, symbol) for number, (symbol, _) in standard_settings().items())
