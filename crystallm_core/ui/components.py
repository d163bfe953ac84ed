"""Streamlit pieces shared by the pages: the loaded model, the history store, the current run,
the live job panel, the results table and the run summary with its download.

Session state keys: "model_source" (None = shipped default / $CRYSTALLM_MODEL_DIR), "run" (the
Run on screen), "job" (a GenerationJob in flight), "last_request" (the last submitted
GenerationRequest, reused by the target sweep). Each browser session has its own state.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import streamlit as st

from crystallm_core.chem.judges.stability import HULL_BIAS_NOTE
from crystallm_core.lm.checkpoints import load_model, resolve_model_dir
from crystallm_core.product.generation import GenerationRequest, prepare_for_requests
from crystallm_core.product.history import HistoryStore, default_db_path
from crystallm_core.product.jobs import GenerationJob
from crystallm_core.product.run import Run
from crystallm_core.product.run_files import run_zip
from crystallm_core.product.service import (
    E_HULL_SCALE,
    PREDICTION_NOTE,
    default_scorer,
    e_hull_note,
    ranked_table,
    shortfall_note,
    submit,
)
from crystallm_core.ui.hull_panel import run_stability_section

POLL_SECONDS = 0.5  # progress refresh while a job runs: a finished structure is on screen within this


@st.cache_resource(max_entries=2, show_spinner="Loading model…")
def cached_model(source: str):
    """One LoadedModel per source per process (a failed load raises and is not cached), ready
    for the first request (`generation.prepare_for_requests`), with the judges loaded too: the
    first request would otherwise wait for CHGNet and the band-gap surrogate before its first score."""
    loaded = load_model(source)
    prepare_for_requests(loaded)
    default_scorer()
    return loaded


def get_model(source: str | None):
    """Load (once) the model at `source`; None = $CRYSTALLM_MODEL_DIR or the shipped default.

    The default is resolved to its directory first, so the cache key is the real location.
    """
    return cached_model(str(resolve_model_dir(None)) if source is None else source)


def current_model():
    """The LoadedModel chosen on the Home page, or None (with an inline error) if it cannot load."""
    try:
        return get_model(st.session_state.get("model_source"))
    except ValueError as error:
        st.error(f"The model could not be loaded: {error}")
        return None


@st.cache_resource
def cached_store(path: str) -> HistoryStore:
    return HistoryStore(path)


def history_store() -> HistoryStore:
    """The run history at $CRYSTALLM_HISTORY_DB (read per call, so tests can point elsewhere)."""
    return cached_store(str(default_db_path()))


def current_run() -> Run | None:
    return st.session_state.get("run")


def active_job() -> GenerationJob | None:
    return st.session_state.get("job")


def start_job(loaded, requests: list[GenerationRequest], kind: str = "generate", settings: dict | None = None) -> bool:
    """Queue a background generation for this session (one at a time per session); a bad request
    is an inline message, and the run on screen stays."""
    if active_job() is not None:
        st.warning("A run is still in progress in this session: wait for it or cancel it first.")
        return False
    try:
        st.session_state["job"] = submit(loaded, requests, history_store(), kind, settings)
    except ValueError as error:
        st.error(str(error))
        return False
    return True


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def format_gap(mean, std) -> str:
    if pd.isna(mean):
        return "not available"
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def format_pair(first, second) -> str:
    if pd.isna(first) and pd.isna(second):
        return "—"
    return " / ".join("—" if pd.isna(v) else f"{v:.2f}" for v in (first, second))


def format_hull(static, relaxed) -> str:
    if pd.isna(static) and pd.isna(relaxed):
        return "not available"
    shown = "—" if pd.isna(static) else f"{static:.3f}"
    return shown if pd.isna(relaxed) else f"{shown} → {relaxed:.3f} relaxed"


def results_table(run: Run, tolerance: float, unique: bool = True) -> None:
    """The results table: formula, space group, validity/reason, surrogate gap ± spread, E_hull
    (static, and relaxed beside it), hit, ranking score; best-of-K picks first, then by score."""
    frame = ranked_table(run, tolerance, unique)
    shown = frame.assign(  # the free-text reason goes last so the numbers stay in view
        valid=frame["valid"].map({True: "✓", False: "✗"}),
        band_gap=[format_gap(mean, std) for mean, std in zip(frame["band_gap_pred"], frame["band_gap_std"])],
        independent_gap=[format_pair(a, b) for a, b in zip(frame["band_gap_gnn"], frame["band_gap_gbm"])],
        e_hull=[format_hull(s, r) for s, r in zip(frame["e_hull_pred"], frame["e_hull_relaxed"])],
        hit=frame["hit"].map(lambda h: "—" if pd.isna(h) else ("✓" if h else "✗")),
        picked=[picked_label(p, n) for p, n in zip(frame["picked"], frame["picked_from"])],
    )
    columns = ["index", "formula", "space_group", "valid", "band_gap", "independent_gap", "e_hull", "hit", "score",
               "picked", "rewinds", "repairs", "reason"]
    st.dataframe(
        shown[[c for c in columns if c != "picked" or frame["picked_from"].notna().any()]],
        hide_index=True, width="stretch",
        column_config={
            "index": "#", "space_group": "space group", "reason": "why not valid",
            "band_gap": st.column_config.TextColumn(
                "surrogate gap (eV)", help="Band-gap surrogate (PBE gaps); ± is its calibrated spread: on held-out "
                "structures read as non-metals, the DFT gap lies within ±1 for about 68 %."),
            "independent_gap": st.column_config.TextColumn(
                "GNN / LightGBM gap (eV)", help="The graph network's and LightGBM's own readings (no CHGNet "
                "features). In the surrogate gap that ranks, picks and shows the hit they only vote with a small "
                "share, larger on unrelaxed structures: where they disagree with it, treat the hit with care."),
            "e_hull": st.column_config.TextColumn(
                "E_hull est. (eV/atom)", help="Static CHGNet estimate of the structure as written, and after the "
                "relaxation where there was one. " + HULL_BIAS_NOTE),
            "hit": f"hit (±{tolerance:g} eV)",
            "score": st.column_config.ProgressColumn(
                "score", min_value=0.0, max_value=1.0, format="%.2g",
                help="Ranking score (0–1): P(gap within the tolerance) from the surrogate's P(metal) and gap ± "
                     "spread, × a factor for E_hull above its target (relaxed when relaxed), × penalties for a "
                     "duplicate within the run and a known (training-set) structure. The E_hull factor is "
                     f"exp(−excess / {E_HULL_SCALE:g} eV/atom), so where every sample sits far above the target "
                     "all scores are tiny (e.g. 3e-08): the order still decides the pick. A prediction of the "
                     "same band-gap surrogate, not a measurement."),
            "picked": st.column_config.TextColumn("picked", help="Best N of K: picked as one of the N best, or "
                                                                 "kept in the run but not picked."),
            "repairs": st.column_config.TextColumn(
                "repairs", help="Optional repairs after decoding and their outcome (valid counts as written)."),
            "rewinds": st.column_config.NumberColumn(
                "rewinds", help="Constrained decoding: how often a site row, the cell or the sample was rewritten."),
        },
    )


def picked_label(picked, picked_from) -> str:
    if pd.isna(picked_from):
        return ""
    return f"✓ picked from {picked_from}" if pd.notna(picked) and bool(picked) else f"not picked (of {picked_from})"


def best_of_notes(run: Run) -> None:
    """What a best-N-of-K run picked, when fewer were within the tolerance, and what a hit means."""
    summaries = [record["best_of"] for record in run.generation if record.get("best_of")]
    if not summaries:
        return
    for summary in summaries:
        st.write(f"**Best {summary['keep']} of {summary['sampled']}**: {summary['picked']} picked "
                 f"({summary['within_tolerance']} within the tolerance, {summary['valid']} valid).")
        for note in (shortfall_note(summary), e_hull_note(summary)):
            if note:
                st.info(note)
    st.caption(PREDICTION_NOTE)


def run_tolerance(run: Run) -> float:
    return run.metric_settings().hit_tolerance


def polled_job_panel(job_key: str, result_key: str, draw: Callable[[Any], None]) -> None:
    """Draw the session's background job at `job_key` every POLL_SECONDS while it runs; once it
    has finished it moves to `result_key` and the page reruns (the fine-tune and align panels)."""
    def fragment() -> None:
        job = st.session_state.get(job_key)
        if job is None:
            return
        draw(job)
        if job.finished:
            st.session_state[result_key] = job
            del st.session_state[job_key]
            st.rerun()

    st.fragment(fragment, run_every=POLL_SECONDS if job_key in st.session_state else None)()


def live_job_panel() -> None:
    """Progress, Cancel and streaming rows of this session's job; polls while the job runs."""
    st.fragment(job_fragment, run_every=POLL_SECONDS if active_job() is not None else None)()


def job_fragment() -> None:
    job = active_job()
    if job is None:
        return
    tolerance = run_tolerance(job.run)
    progress = job.progress()
    if progress.status == "queued":
        st.info(f"Waiting for the generator: position {progress.position} in the queue "
                "(another session is generating).")
    counted = (f"{progress.valid}/{progress.valid_target} valid ({progress.done} sampled, at most {progress.total})"
               if progress.valid_target else f"{progress.done}/{progress.total} structures")
    label = f"{counted} · elapsed {format_seconds(progress.elapsed)} · ETA {format_seconds(progress.eta)}"
    if progress.phase:
        label = f"{label} · {progress.phase}"
    st.progress(min(progress.fraction, 1.0), text=label)
    if any(r.get("keep_best") for r in job.run.requests):
        st.caption("Best N of K: ranked by score as they come; the N best are picked once every sample is in.")
    st.button("Cancel", key="cancel_job", on_click=job.cancel, help="Stop now; finished structures are kept.")
    results_table(job.run, tolerance, unique=False)  # structure matching waits for the finished run
    if job.finished:
        st.session_state["run"] = job.run
        del st.session_state["job"]
        st.rerun()


def run_summary(run: Run) -> None:
    """Status line, results table and the zip download of a finished run."""
    tolerance = run_tolerance(run)
    if run.status == "failed":
        st.error(f"The run stopped: {run.error}")
    elif run.status == "cancelled":
        st.warning(f"Cancelled: {len(run.candidates)} finished structures kept.")
    elif run.status == "interrupted":
        st.warning(f"Interrupted (the server stopped): {len(run.candidates)} finished structures kept.")
    st.write(f"**{run.n_valid} of {len(run.candidates)}** structures valid · run `{run.run_id}`")
    wanted = sum(r.get("stop_after_valid") or 0 for r in run.requests)
    if run.status == "done" and wanted and run.n_valid < wanted:
        st.info(f"Only {run.n_valid} of the {wanted} valid structures asked for after {len(run.candidates)} samples: "
                "lower the temperature, or loosen the composition and symmetry prompt.")
    best_of_notes(run)
    results_table(run, tolerance)
    for family, reason in run.unavailable.items():
        st.caption(f"{family}: {reason}")
    if st.toggle("Show a structure on its chemical system's convex hull", key=f"hull_{run.run_id}"):
        run_stability_section(run)
    include_invalid = st.checkbox("Include invalid structures (subfolder invalid/)", key=f"invalid_{run.run_id}")
    st.download_button("Download zip", data=zip_of(run, include_invalid),
                       file_name=f"crystallm_run_{run.run_id}.zip", mime="application/zip",
                       key=f"zip_{run.run_id}_{include_invalid}")


def zip_of(run: Run, include_invalid: bool) -> bytes:
    """The run's zip, built once per run state and kept in the session: reruns (every widget
    change) reuse it. Built eagerly because a deferred download was lost in a rerun race."""
    key = ("run_zip", run.run_id, len(run.candidates), run.status, include_invalid)
    cached = st.session_state.get("run_zip_cache")
    if not cached or cached[0] != key:
        cached = st.session_state["run_zip_cache"] = (key, run_zip(run, include_invalid))
    return cached[1]


def read_json(path) -> dict | list | None:
    """A JSON file's content, or None when it is absent or unreadable (optional model assets)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def training_stats(model_source: str) -> dict | None:
    """training_data_stats.json of the model directory: band_gap_hist / e_hull_hist {edges, counts}."""
    return read_json(Path(model_source) / "training_data_stats.json")


