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

from crystallm_core.chem.judges.hull_placement import HullPlacement, structure_on_hull  # noqa: F401 (for the pages)
from crystallm_core.chem.judges.isolation import check_cif_isolated
from crystallm_core.chem.judges.metrics import (  # noqa: F401 (the pages take PAPER_BY_TARGET, funnel_counts from here)
    PAPER_BY_TARGET,
    MetricSettings,
    funnel_counts,
    summarise,
)
from crystallm_core.chem.cif.prompts import space_group_symbols
from crystallm_core.chem.judges.ranking import E_HULL_SCALE, ranking_order  # noqa: F401 (E_HULL_SCALE: the pages)
from crystallm_core.chem.judges.relaxation import relax_and_check  # noqa: F401 (for the pages)
from crystallm_core.chem.judges.scoring import default_scorer  # noqa: F401 (the app loads the judges with its model)
from crystallm_core.chem.judges.stability import HULL_BIAS_NOTE, RelaxSettings  # noqa: F401 (for the pages)
from crystallm_core.chem.judges.structure_info import (  # noqa: F401
    describe_structure,
    parse_cif,
    xrd_pattern,
)
from crystallm_core.chem.judges.validity import SPACE_GROUP_RULES, ValidityReport, judged_as_user_file  # noqa: F401
from crystallm_core.lm.checkpoints import LoadedModel
from crystallm_core.lm.sampler import DECODINGS, GUIDES, SamplingSettings  # noqa: F401 (the pages take them from here)
from crystallm_core.product.best_of import (  # noqa: F401 (the pages take them from here)
    BEST_OF_CHOICES,
    PREDICTION_NOTE,
    best_of_counts,
    e_hull_note,
    shortfall_note,
)
from crystallm_core.product.campaign import MANIFEST as CAMPAIGN_MANIFEST
from crystallm_core.product.campaign import campaign_run
from crystallm_core.product.evaluate import evaluate_run
from crystallm_core.product.generation import GenerationRequest, new_run, prepare
from crystallm_core.product.history import HistoryStore
from crystallm_core.product.jobs import GENERATION_QUEUE, GenerationJob
from crystallm_core.product.run import Run
from crystallm_core.product.run_files import read_run, run_zip, uploaded_cif_text  # noqa: F401 (for the pages)
from crystallm_core.product.server_settings import server_settings, within_roots

NAN = float("nan")
DEFAULT_SAMPLING = SamplingSettings()  # the one place the app, CLI and scripts take defaults from
DEFAULT_METRICS = MetricSettings()


def submit(loaded: LoadedModel, requests: Sequence[GenerationRequest], store: HistoryStore | None,
           kind: str = "generate", settings: dict | None = None) -> GenerationJob:
    """Validate every request (ValueError with the reason, before anything queues) and start a job."""
    check_server_capacity()
    for request in requests:
        prepare(loaded, request)
    return GenerationJob(loaded, requests, new_run(loaded, list(requests), kind, settings), store=store).start()


def check_server_capacity() -> None:
    """ValueError when the server already holds its most jobs (generation and fine-tuning share one queue)."""
    limit = server_settings().max_jobs
    if len(GENERATION_QUEUE) >= limit:
        raise ValueError(f"The server is busy: {len(GENERATION_QUEUE)} jobs are queued or running (its limit is "
                         f"{limit}). Try again in a few minutes.")


SWEEPABLE = {"band_gap": "band gap (eV)", "e_hull": "E_hull (eV/atom)"}
E_HULL_TOLERANCE = 0.1  # eV/atom: an E_hull estimate this close to its target counts as a hit


def sweep_requests(base: GenerationRequest, low: float, high: float, m: int, k: int, fixed: float,
                   swept: str = "band_gap", best_of: int = 1) -> list[GenerationRequest]:
    """K samples at each of M targets of `swept` from low to high, the other target at `fixed`;
    each target its own seed. With best_of B > 1: the best K of K × B samples per target."""
    if swept not in SWEEPABLE:
        raise ValueError(f"a sweep varies one of {', '.join(SWEEPABLE)}, not {swept!r}")
    if high <= low:
        raise ValueError("The highest target must be above the lowest.")
    targets = [round(float(t), 3) for t in np.linspace(low, high, int(m))]
    other = "e_hull" if swept == "band_gap" else "band_gap"
    base = replace(base, composition=None, z=None, spacegroup=None, stop_after_valid=None, **{other: fixed},
                   **best_of_counts(int(k), int(best_of)))
    return [replace(base, seed=base.seed + i, **{swept: target}) for i, target in enumerate(targets)]


def hit_rate_vs_tolerance(frame: pd.DataFrame, tolerances: Sequence[float]) -> pd.DataFrame:
    """Hit rate over all samples as the tolerance grows (targets may differ per structure).

    The surrogate's calibrated ± band (band_gap_std) splits it: `certain_hit_rate` counts hits
    whose whole ± band lies inside the tolerance band; the rest of `hit_rate` are uncertain hits.
    `possible_hit_rate` adds the misses whose ± band reaches into the tolerance band.
    """
    labelled = frame.dropna(subset=["band_gap_target"])
    prediction = pd.to_numeric(labelled["band_gap_pred"], errors="coerce").to_numpy(float)
    spread = pd.to_numeric(labelled.get("band_gap_std", pd.Series(0.0, index=labelled.index)), errors="coerce")
    spread = spread.fillna(0.0).to_numpy(float)
    scored = labelled["valid"].fillna(False).astype(bool).to_numpy() & np.isfinite(prediction)
    distance = np.where(scored, np.abs(prediction - labelled["band_gap_target"].to_numpy(float)), np.inf)
    total = max(len(frame), 1)
    rows = [{"tolerance": tolerance, "hit_rate": np.sum(distance <= tolerance) / total,
             "certain_hit_rate": np.sum(distance + spread <= tolerance) / total,
             "possible_hit_rate": np.sum(distance - spread <= tolerance) / total} for tolerance in tolerances]
    return pd.DataFrame(rows, columns=["tolerance", "hit_rate", "certain_hit_rate", "possible_hit_rate"])


def sweep_summary(frame: pd.DataFrame, swept: str = "band_gap", tolerance: float | None = None) -> pd.DataFrame:
    """Per target of the swept property: samples, valid and hit rates (over all samples), and the
    mean, spread and median of the valid structures' estimate (surrogate gap or CHGNet E_hull);
    `picked`: how many a best-of-K sweep picked there (NaN without a pick)."""
    rows = []
    for target, group in frame.dropna(subset=[f"{swept}_target"]).groupby(f"{swept}_target"):
        predicted = pd.to_numeric(group[f"{swept}_pred"].where(group["valid"]), errors="coerce")
        if swept == "band_gap":
            rates = summarise(group, float(target))
            valid, hit = rates["valid"], rates["hit"]
        else:
            valid = float(group["valid"].mean())
            hit = float(((predicted - float(target)).abs() <= (tolerance or E_HULL_TOLERANCE)).sum() / len(group))
        rows.append({"target": float(target), "n": len(group), "valid": valid, "hit": hit,
                     "mean_pred": float(predicted.mean()) if predicted.notna().any() else NAN,
                     "std_pred": float(predicted.std()) if predicted.notna().sum() > 1 else NAN,
                     "median_pred": float(predicted.median()) if predicted.notna().any() else NAN,
                     "picked": float(group["picked"].eq(True).sum())
                     if "picked" in group and group["picked"].notna().any() else NAN})
    return pd.DataFrame(rows, columns=["target", "n", "valid", "hit", "mean_pred", "std_pred", "median_pred", "picked"])


def run_table(run: Run, tolerance: float | None = None, threshold: float | None = None,
              unique: bool = True) -> pd.DataFrame:
    """The run's table with the page's metric settings (the run's own by default)."""
    own = run.metric_settings()
    return run.to_frame(MetricSettings(own.stability_threshold if threshold is None else threshold,
                                       own.hit_tolerance if tolerance is None else tolerance), unique)


def ranked_table(run: Run, tolerance: float | None = None, unique: bool = True) -> pd.DataFrame:
    """`run_table` in the page's order: best-of-K picks first, then by ranking score (best first),
    rows without a score (invalid) last, each group in sampling order."""
    frame = run_table(run, tolerance, unique=unique)
    order = ranking_order(frame["score"])
    picked = {label for label in order if pd.notna(frame.at[label, "picked"]) and bool(frame.at[label, "picked"])}
    return frame.loc[[i for i in order if i in picked] + [i for i in order if i not in picked]].reset_index(drop=True)


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


RESPONSE_CURVES = "response_curves.json"  # scripts/measure_response.py writes it into the model directory


def variant_samples(curves: dict, name: str) -> int | None:
    """Samples per target of one variant of a response_curves.json (older files: the file's count)."""
    return (curves.get("variants", {}).get(name) or {}).get("samples_per_point", curves.get("samples_per_point"))


def e_hull_steering_note(curves: dict | None) -> str | None:
    """What the measured response curves say about the E_hull slider (None: not measured)."""
    sweep = ((curves or {}).get("variants", {}).get("default") or {}).get("e_hull_sweep")
    if not sweep or not sweep.get("median_difference_low_minus_high"):
        return None
    points = sweep["points"]
    low, high = points[0], points[-1]
    difference, lower, upper = sweep["median_difference_low_minus_high"]
    measured = (f"median CHGNet E_hull estimate of valid structures {low['median'][0]:.2f} eV/atom at target "
                f"{low['target']:g} vs {high['median'][0]:.2f} at {high['target']:g} (difference {difference:+.2f}, "
                f"90 % interval {lower:+.2f} to {upper:+.2f}; Spearman ρ {sweep['spearman']:.2f}, "
                f"{variant_samples(curves, 'default')} samples per target)")
    if sweep.get("steers"):
        return f"Measured with default settings: {measured}."
    return (f"E_hull steering is not yet reliable for this model: {measured}. Lower targets do not give "
            "measurably more stable structures; see the Model page's response curves.")


def response_table(curves: dict) -> pd.DataFrame:
    """One row per variant and E_hull target: settings, valid, median (static and relaxed), Spearman."""
    rows = []
    for name, variant in curves.get("variants", {}).items():
        sweep = variant.get("e_hull_sweep", {})
        for point in sweep.get("points", []):
            rows.append({"variant": name, "guidance": variant["settings"]["guidance_scale"],
                         "guide": variant["settings"]["guide"], "best of": variant.get("best_of", 1),
                         "samples per target": variant_samples(curves, name), "E_hull target": point["target"],
                         "valid": f"{point['n_valid']}/{point['n']}", "median E_hull": point["median"][0],
                         "median after relaxation": (point.get("median_relaxed") or [None])[0],
                         f"within ±{curves['tolerance']['e_hull']:g}": point["within_tolerance"],
                         "Spearman ρ (sweep)": sweep["spearman"]})
    return pd.DataFrame(rows)


def point_hit_rate(point: dict) -> float | None:
    """Hits over the samples asked for at one sweep point (older files: from within_tolerance)."""
    if point.get("hit_rate") is not None:
        return point["hit_rate"]
    if point.get("within_tolerance") is None:
        return None
    return round(point["within_tolerance"] * point["n_valid"] / point["n"], 3)


def best_of_table(curves: dict) -> pd.DataFrame:
    """What best-of-K buys on the band-gap sweep: per variant (default, best-of-K) and paper
    target, the hit rate within tolerance and the median gap of the structures delivered."""
    rows = []
    for name, variant in curves.get("variants", {}).items():
        sweep = variant.get("band_gap_sweep")
        if not sweep:
            continue
        for point in sweep["points"]:
            rows.append({"variant": name, "best of": variant.get("best_of", 1), "target (eV)": point["target"],
                         "hit rate": point_hit_rate(point), "median gap (eV)": point["median"][0],
                         "within tolerance of all samples": point.get("n_within_tolerance"),
                         "samples": point.get("n_sampled", point["n"]), "delivered": point["n"],
                         "Spearman ρ (sweep)": sweep["spearman"]})
    return pd.DataFrame(rows)


def open_results(path: str) -> Run:
    """A campaign directory, a run directory or zip, or a folder of CIFs inside the server's data
    roots, as a Run for the Evaluate page (a campaign's stored checks and scores are reused; other
    files are checked and scored here). ValueError with the reason otherwise."""
    folder = within_roots(path, server_settings().data_roots, "results")
    if not folder.exists():
        raise ValueError(f"{path} does not exist")
    if (folder / CAMPAIGN_MANIFEST).is_file():
        return campaign_run(folder)
    return evaluate_run(read_run(folder))


def check_upload(cif_text: str) -> ValidityReport:
    """Validity of a user's uploaded CIF in the isolated checker, under the user-file rule (a
    stated P 1, or any subgroup of the detected group, is a correct description)."""
    return judged_as_user_file(check_cif_isolated(cif_text))


def run_subset(run: Run, keep: Sequence[bool]) -> Run:
    """The same run with only the chosen candidates (a filtered download)."""
    return replace(run, candidates=[c for c, chosen in zip(run.candidates, keep) if chosen])
