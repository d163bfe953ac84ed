"""Evaluate: how close did the run come to its targets? Scatter, hit rate, funnel, target sweep."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from crystallm_core.product.generation import GenerationRequest
from crystallm_core.product.service import (
    BEST_OF_CHOICES,
    DEFAULT_METRICS,
    E_HULL_TOLERANCE,
    HULL_BIAS_NOTE,
    PAPER_BY_TARGET,
    SWEEPABLE,
    funnel_counts,
    hit_rate_vs_tolerance,
    run_table,
    sweep_requests,
    sweep_summary,
)
from crystallm_core.ui.charts import (
    e_hull_scatter_figure,
    hit_rate_figure,
    spread,
    target_band_figure,
)
from crystallm_core.ui.components import (
    active_job,
    current_model,
    current_run,
    live_job_panel,
    run_tolerance,
    start_job,
)
from crystallm_core.ui.hull_panel import run_stability_section
from crystallm_core.ui.open_results import filtered_download, open_results_form

CATEGORY_COLOURS = {"valid, stable": "#2f855a", "valid, not stable": "#dd6b20", "valid, E_hull n/a": "#718096"}


def scored(frame) -> pd.Series:
    """Rows with both a band-gap target and a surrogate prediction."""
    return frame["band_gap_pred"].notna() & frame["band_gap_target"].notna()


def scatter_figure(frame, tolerance: float) -> go.Figure:
    """Target vs surrogate gap, error bars = the surrogate's calibrated ±, the ±tolerance band shaded."""
    shown = frame[scored(frame)].copy()
    shown["category"] = [("valid, E_hull n/a" if pd.isna(stable) else "valid, stable" if stable else "valid, not stable")
                         for stable in shown["stable"]]
    targets = shown["band_gap_target"].astype(float)
    jitter = spread(shown, "band_gap_target", 0.3)
    top = max(float(targets.max()), float(shown["band_gap_pred"].max())) + tolerance + 0.5
    figure = target_band_figure(top, tolerance, "eV", "#2b6cb0", "rgba(43,108,176,0.12)", "predicted = target")
    for category, colour in CATEGORY_COLOURS.items():
        part = shown["category"] == category
        if part.any():
            figure.add_trace(go.Scatter(
                x=(targets + jitter)[part], y=shown["band_gap_pred"][part], mode="markers", name=category,
                marker=dict(color=colour, size=9), text=shown["formula"][part],
                error_y=dict(type="data", array=shown["band_gap_std"][part].fillna(0), thickness=1),
                hovertemplate="%{text}<br>target %{x:.2f} eV<br>surrogate %{y:.2f} eV<extra></extra>"))
    figure.update_layout(height=420, margin=dict(l=10, r=10, t=30, b=40), title="Target vs surrogate band gap",
                         xaxis_title="target band gap (eV)", yaxis_title="surrogate band gap (eV)")
    figure.update_xaxes(range=[0, top])
    figure.update_yaxes(range=[-0.2, top])
    return figure


def funnel_figure(frame) -> go.Figure:
    counts = funnel_counts(frame)
    figure = go.Figure(go.Funnel(y=list(counts), x=list(counts.values()), textinfo="value+percent initial",
                                 marker_color="#2b6cb0"))
    figure.update_layout(height=320, margin=dict(l=10, r=10, t=30, b=20), title="Valid → unique → novel → stable")
    return figure


def sweep_figures(summary, swept: str) -> tuple[go.Figure, go.Figure]:
    """Hit rate and mean estimate vs target (band gap: with the published model's hit rates)."""
    unit = "eV" if swept == "band_gap" else "eV/atom"
    estimate = "surrogate gap" if swept == "band_gap" else "CHGNet E_hull estimate"
    hits = go.Figure(go.Scatter(x=summary["target"], y=summary["hit"], mode="lines+markers", name="this model"))
    if swept == "band_gap":
        hits.add_trace(go.Scatter(x=list(PAPER_BY_TARGET), y=[v[2] for v in PAPER_BY_TARGET.values()],
                                  mode="markers", marker_symbol="x", name="CrystaLLM-π paper (ALIGNN)"))
    hits.update_layout(height=320, title="Hit rate vs target", xaxis_title=f"target ({unit})", yaxis_title="hit rate",
                       yaxis_range=[0, 1.02], margin=dict(l=10, r=10, t=30, b=40))
    means = go.Figure(go.Scatter(x=summary["target"], y=summary["mean_pred"], mode="lines+markers",
                                 error_y=dict(type="data", array=summary["std_pred"].fillna(0)),
                                 name=f"mean {estimate}"))
    top = float(summary["target"].max()) * 1.1 + 0.05
    means.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", line=dict(dash="dash"), name="ideal"))
    means.update_layout(height=320, title=f"Mean {estimate} vs target", xaxis_title=f"target ({unit})",
                        yaxis_title=f"{estimate} ({unit})", margin=dict(l=10, r=10, t=30, b=40))
    return hits, means


def sweep_form() -> None:
    """K samples at each of M targets of one property, with the last Generate settings (or the defaults)."""
    with st.form("sweep_form"):
        swept = st.radio("Sweep", list(SWEEPABLE), format_func=SWEEPABLE.get, horizontal=True, key="sweep_property")
        cols = st.columns(4)
        low = cols[0].number_input("Lowest target", 0.0, 12.0, 0.5, 0.05, key="sweep_low",
                                   help="eV for the band gap, eV/atom for E_hull")
        high = cols[1].number_input("Highest target", 0.0, 12.0, 4.0, 0.05, key="sweep_high")
        m = cols[2].number_input("Targets M", 2, 12, 4, key="sweep_m")
        k = cols[3].number_input("Samples per target K", 1, 64, 4, key="sweep_k")
        best_of = st.selectbox("Best of", BEST_OF_CHOICES, key="sweep_best_of",
                               format_func=lambda b: "off (keep every sample)" if b == 1 else
                               f"best K of {b}·K per target (picked by the ranking score)")
        fixed = st.number_input("The other target (E_hull in eV/atom when sweeping the band gap; the band gap in "
                                "eV when sweeping E_hull)", 0.0, 12.0, 0.0, 0.05, key="sweep_fixed")
        submitted = st.form_submit_button("Run sweep")
    if not submitted:
        return
    loaded = current_model()
    if loaded is None:
        return
    # the last Generate request's sampling settings; its single target must not pass for the sweep's
    base = st.session_state.get("last_request") or GenerationRequest()
    try:
        requests = sweep_requests(base, low, high, int(m), int(k), fixed, swept, int(best_of))
    except ValueError as error:
        st.error(str(error))
        return
    start_job(loaded, requests, kind="sweep", settings={"hit_tolerance": DEFAULT_METRICS.hit_tolerance, "swept": swept})


st.title("Evaluate")
open_results_form()
run = current_run()
if run is None:
    st.info("No run yet: generate structures, run a sweep below, or reopen one from History.")
else:
    st.caption(f"Run `{run.run_id}` · {run.label}")
    cols = st.columns(2)
    tolerance = cols[0].slider("Hit tolerance ± (eV)", 0.05, 3.0, run_tolerance(run), 0.05, key="eval_tolerance")
    threshold = cols[1].slider("Stable if E_hull ≤ (eV/atom)", 0.0, 0.3, DEFAULT_METRICS.stability_threshold, 0.01,
                               key="eval_threshold")
    frame = run_table(run, tolerance, threshold)  # structure matching runs once per run
    gap_column, hull_column = st.columns(2)
    hull_figure = e_hull_scatter_figure(frame, E_HULL_TOLERANCE)
    if hull_figure is None:
        hull_column.info("E_hull estimates: not available for this run (no valid structure with a CHGNet "
                         "estimate, or no E_hull target).")
    else:
        hull_column.plotly_chart(hull_figure, key="e_hull_scatter")
    if scored(frame).any():
        gap_column.plotly_chart(scatter_figure(frame, tolerance), key="scatter")
        curve = hit_rate_vs_tolerance(frame, [round(t, 2) for t in np.arange(0.05, 3.01, 0.05)])
        st.plotly_chart(hit_rate_figure(curve, tolerance), key="hit_curve")
    else:
        gap_column.info("Surrogate band gaps: not available for this run (no valid structure, no surrogate model, or "
                "no band-gap target), so there is no scatter or hit rate to show.")
    st.plotly_chart(funnel_figure(frame), key="funnel")
    if run.kind in ("campaign", "evaluate"):
        filtered_download(run, frame)
    with st.expander("Stability of one structure: its convex hull"):
        run_stability_section(run)
    st.caption("Rates divide by all samples, as in the CrystaLLM-π paper. " + HULL_BIAS_NOTE)
    if run.kind == "sweep":
        swept = run.settings.get("swept", "band_gap")
        summary = sweep_summary(frame, swept)
        hits, means = sweep_figures(summary, swept)
        left, right = st.columns(2)
        left.plotly_chart(hits, key="sweep_hits")
        right.plotly_chart(means, key="sweep_means")
        st.dataframe(summary, hide_index=True)

st.subheader("Target sweep")
st.caption("K samples at each of M band-gap targets, with the sampling settings of your last Generate run.")
sweep_form()
if active_job() is not None:
    live_job_panel()
