"""The Fine-tune page's "Aim at a target region" tab: the region form, the live progress of the
reward fine-tuning job (rounds, ETA, Cancel, the rounds' reports) and the finished result.

Session state keys: "align_job" (an AlignJob in flight), "align_result" (the last finished
job), and the form's widgets ("align_*").
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from crystallm_core.product.align_job import (
    MAX_BAND_GAP,
    MAX_E_HULL,
    MAX_ROUNDS,
    AlignJob,
    TargetRegion,
    element_list,
    start_align,
)
from crystallm_core.product.server_settings import server_settings
from crystallm_core.ui.components import format_seconds, polled_job_panel
from crystallm_core.ui.finetune_panel import use_model_button

# the round report's columns, as the table names them (rates are shares of all samples)
REPORT_COLUMNS = {
    "round": "round", "stable": "stable", "vsun": "VSUN", "valid_unique_novel": "valid∧unique∧novel", "hit": "hit",
    "median_e_hull": "median E_hull", "band_gap_spearman": "band-gap Spearman",
    "median_e_hull_relaxed": "median relaxed E_hull", "accepted": "accepted", "seconds": "seconds",
}
RATES = ("stable", "VSUN", "valid∧unique∧novel", "hit")


def report_table(reports: list[dict]) -> pd.DataFrame:
    """One row per round: the rates in %, E_hull in eV/atom, the gap's rank correlation with its target."""
    table = pd.DataFrame([{label: report.get(key) for key, label in REPORT_COLUMNS.items()} for report in reports],
                         columns=list(REPORT_COLUMNS.values()))
    for column in RATES:
        table[column] = (pd.to_numeric(table[column], errors="coerce") * 100).round(1)
    table["round"] = pd.to_numeric(table["round"], errors="coerce") + 1  # round 1 is the first
    return table


def show_reports(reports: list[dict], key: str) -> None:
    if not reports:
        return
    st.dataframe(report_table(reports), hide_index=True, key=key, column_config={
        column: st.column_config.NumberColumn(f"{column} (%)", format="%.1f") for column in RATES})
    st.caption("Each round samples the region's cells with the model as it stands, so a row measures the model "
               "before that round's update. Stable and VSUN use CHGNet's E_hull estimate (eV/atom); the "
               "Spearman correlation ranks predicted gaps against their targets; relaxed E_hull: a CHGNet-relaxed "
               "share of the round.")


def region_form() -> tuple[str, TargetRegion, int, float, int] | None:
    """The region and budget; (name, region, rounds, minutes, seed) when Start is pressed."""
    with st.form("align_form"):
        left, right = st.columns(2)
        gap_low, gap_high = left.slider("Band-gap range (eV)", 0.0, MAX_BAND_GAP, (2.0, 3.0), 0.1, key="align_gaps")
        e_hull = right.slider("Target E_hull (eV/atom)", 0.0, MAX_E_HULL, 0.0, 0.01, key="align_e_hull",
                              help="0 asks for structures on the convex hull (stable).")
        any_hull = right.checkbox("Any E_hull (no target)", key="align_any_hull")
        required = left.text_input("Must contain (optional)", placeholder="e.g. O for oxides", key="align_required",
                                   help="A sample lacking any of these elements earns no reward.")
        allowed = right.text_input("Only these elements (optional)", placeholder="e.g. Li, Fe, P, O",
                                   key="align_elements", help="The sampler may write no other element.")
        cols = st.columns(4)
        rounds = cols[0].number_input("Rounds", 1, MAX_ROUNDS, 4, key="align_rounds")
        minutes = cols[1].number_input("Time budget (minutes)", 1, 600, 30, key="align_minutes",
                                       help="No new round starts after this; the one running finishes.")
        seed = cols[2].number_input("Seed", 0, 2**31 - 1, 1_000_000, key="align_seed")
        name = cols[3].text_input("Name of the new model", value=f"aligned-{pd.Timestamp.now():%Y%m%d-%H%M}",
                                  key="align_name")
        start = st.form_submit_button("Start reward fine-tuning", type="primary")
    if not start:
        return None
    region = TargetRegion(gap_low, gap_high, None if any_hull else e_hull, element_list(required),
                          element_list(allowed))
    return name.strip(), region, int(rounds), float(minutes), int(seed)


def queue_align(name: str, region: TargetRegion, rounds: int, minutes: float, seed: int) -> None:
    """Queue the job from the loaded model; a bad choice raises ValueError (an inline message)."""
    job = start_align(name, st.session_state.get("model_source"), region, rounds, minutes, seed)
    st.session_state["align_job"] = job
    st.session_state.pop("align_result", None)


def draw_progress(job: AlignJob) -> None:
    """Round progress with ETA, Cancel and the reports so far (redrawn while the job runs)."""
    progress = job.progress()
    st.write(f"Aiming at: {job.region.describe()}.")
    if progress.status == "queued":
        st.info(f"Waiting for the CPU: position {progress.position} in the queue (others are generating).")
    elif progress.rounds_done == 0:
        st.info("Loading the judges and sampling the first round (a round takes a few minutes on a CPU)…")
    st.progress(progress.fraction, text=f"round {progress.rounds_done}/{progress.rounds} · elapsed "
                                        f"{format_seconds(progress.elapsed)} · ETA {format_seconds(progress.eta)}")
    st.button("Cancel", key="align_cancel", on_click=job.cancel,
              help="Stop now: the round in progress is dropped, finished rounds are kept.")
    show_reports(progress.reports, "align_live_reports")


def result_view(job: AlignJob) -> None:
    """The finished job: why it ended, where the model is, the rounds' reports, "Use this model"."""
    if job.status == "failed":
        st.error(f"Reward fine-tuning stopped: {job.error}")
    elif job.status == "cancelled":
        st.warning("Cancelled." if job.model_dir else "Cancelled before a round finished: no model was written.")
    if job.stopped:
        st.info(f"The rounds ended early: {job.stopped}.")
    show_reports(job.reports, "align_reports")
    if job.model_dir is None:
        return
    accepted = sum(bool(r.get("accepted")) for r in job.reports)
    st.write(f"Model after {accepted} accepted round(s) written to `{job.model_dir}` (the rounds' samples and "
             f"reports in `{job.run_dir}`). Load it here, or later on the Home page as a local "
             "directory.")
    use_model_button(job.model_dir, "align_use_model")


def align_tab() -> None:
    """The tab's content: the running job, else the form; then the last finished job."""
    st.markdown(
        "Point the model at a region you care about — say, stable oxides with 2–3 eV gaps — and it learns "
        "from its own judged samples there: each round it samples the region, the judges (validity, CHGNet "
        "E_hull, the band-gap head, novelty) score every structure, and it trains on the best ones, on what "
        "each sample actually reached, and on relaxed versions. A round whose valid∧unique∧novel rate falls "
        f"too far below the first one's stops the run. The model goes to `{server_settings().finetune_dir}`."
    )
    if "align_job" in st.session_state:
        polled_job_panel("align_job", "align_result", draw_progress)
    else:
        try:
            submitted = region_form()
            if submitted is not None:
                queue_align(*submitted)
                st.rerun()
        except ValueError as error:
            st.error(str(error))
    if "align_result" in st.session_state and "align_job" not in st.session_state:
        result_view(st.session_state["align_result"])
