"""Model: the model card, training curves, training-data histograms and the surrogate's parity plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from crystallm_core.paths import DEFAULT_MODEL_DIR, SURROGATE_DIR
from crystallm_core.product.service import (
    HULL_BIAS_NOTE,
    PREDICTION_NOTE,
    best_of_table,
    RESPONSE_CURVES,
    e_hull_steering_note,
    response_table,
    variant_samples,
)
from crystallm_core.ui.charts import (
    best_of_figure,
    histogram_figure,
    reliability_figure,
    response_figure,
)
from crystallm_core.ui.components import current_model, read_json, training_stats

LOSS_LOG = "training_log.json"  # [{"step": …, "train_loss": …, "val_loss": …}, …] or {column: [values]}
SURROGATE_PREDICTIONS = SURROGATE_DIR / "test_predictions.csv"  # true, pred (eV); optional split, source, std
SURROGATE_METRICS = SURROGATE_DIR / "ensemble_metrics.json"  # {"metrics": {reading: {split: {n, mae, r2, …}}}}


def loss_figure(log) -> go.Figure | None:
    """One line per *loss* column against `step` (whichever of the two JSON layouts the log uses)."""
    try:
        frame = pd.DataFrame(log)
    except ValueError:
        return None
    if "step" not in frame:
        return None
    figure = go.Figure()
    for column in [c for c in frame.columns if "loss" in c]:
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.notna().any():
            figure.add_trace(go.Scatter(x=frame["step"][values.notna()], y=values.dropna(), mode="lines", name=column))
    figure.update_layout(height=340, title="Training curves", xaxis_title="step", yaxis_title="loss",
                         margin=dict(l=10, r=10, t=30, b=40))
    return figure if figure.data else None


def parity_figure(table: pd.DataFrame) -> go.Figure:
    """Surrogate vs DFT gap on the test rows: one colour per data source (MP-20, MPTS-52, WBM), MAE in the legend."""
    if "split" in table:
        table = table[table["split"] == "test"]
    if table.empty:
        raise ValueError("no test rows")
    table = table.assign(true=table["true"].astype(float), pred=table["pred"].astype(float))
    spread = " ± %{customdata:.2f}" if "std" in table else ""  # the calibrated ± spread, if written
    groups = table.groupby("source", sort=True) if "source" in table else [("test", table)]
    figure = go.Figure()
    for name, group in groups:
        mae = float(np.mean(np.abs(group["true"] - group["pred"])))
        figure.add_trace(go.Scattergl(
            x=group["true"], y=group["pred"], mode="markers", marker=dict(size=4, opacity=0.5),
            name=f"{name} (MAE {mae:.3f}, n={len(group)})", customdata=group.get("std"),
            hovertemplate=f"DFT %{{x:.2f}} eV<br>surrogate %{{y:.2f}}{spread} eV<extra></extra>"))
    top = float(max(table["true"].max(), table["pred"].max())) + 0.5
    figure.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", line=dict(dash="dash"), name="ideal"))
    mae = float(np.mean(np.abs(table["true"] - table["pred"])))
    figure.update_layout(height=380, title=f"Band-gap surrogate on its test split (MAE {mae:.3f} eV, n={len(table)})",
                         xaxis_title="DFT (PBE) band gap (eV)", yaxis_title="surrogate band gap (eV)",
                         margin=dict(l=10, r=10, t=30, b=40))
    return figure


st.title("Model")
loaded = current_model()
model_dir = Path(loaded.info.source) if loaded is not None else DEFAULT_MODEL_DIR
card = model_dir / "MODEL_CARD.md"  # only this model's own card: another model's would mislead
with st.expander("Model card", expanded=True):
    if not card.is_file():
        st.info("No model card (MODEL_CARD.md) ships with this model.")
    else:
        st.markdown(card.read_text())

figure = loss_figure(read_json(model_dir / LOSS_LOG))
if figure is None:
    st.info(f"Training curves: not available (no readable {LOSS_LOG} in {model_dir}).")
else:
    st.plotly_chart(figure, key="loss")

stats = training_stats(str(model_dir))
if stats is None:
    st.info("Training-data histograms: not available (no training_data_stats.json in the model directory).")
else:
    left, right = st.columns(2)
    left.plotly_chart(histogram_figure(stats["band_gap_hist"], "band gap (eV)", height=280), key="bg_hist")
    right.plotly_chart(histogram_figure(stats["e_hull_hist"], "E_hull (eV/atom)", height=280), key="eh_hist")

curves = read_json(model_dir / RESPONSE_CURVES)
st.subheader("How far the sliders steer (measured)")
if curves is None:
    st.info(f"Response curves: not measured for this model (no {RESPONSE_CURVES}; "
            "`python scripts/measure_response.py --out MODEL_DIR/response_curves.json` measures them).")
else:
    default = curves["variants"].get("default", {})
    left, right = st.columns(2)
    if "band_gap_sweep" in default:
        left.plotly_chart(response_figure(default["band_gap_sweep"], "Band-gap slider: surrogate gap of valid "
                                          "structures", "eV"), key="gap_response")
    if "e_hull_sweep" in default:
        right.plotly_chart(response_figure(default["e_hull_sweep"], "E_hull slider: CHGNet E_hull estimate",
                                           "eV/atom", relaxed=True), key="hull_response")
    note = e_hull_steering_note(curves)
    if note:
        st.caption(note)
    st.dataframe(response_table(curves), hide_index=True)
    st.caption(f"Curves: {variant_samples(curves, 'default')} samples per target (each variant's count is in its rows), "
               f"seed {curves['seed']}, constrained decoding; "
               "medians over valid structures with 90 % bootstrap intervals. " + HULL_BIAS_NOTE)
    ranked = best_of_table(curves)
    st.subheader("What best of K buys (measured on the same targets)")
    if ranked.empty or (ranked["best of"] <= 1).all():
        st.info("Best of K: not measured for this model yet (`python scripts/measure_response.py --variant "
                "best-of-4 best-of-8 --merge --out MODEL_DIR/response_curves.json`).")
    else:
        st.plotly_chart(best_of_figure(ranked, curves["tolerance"]["band_gap"]), key="best_of_response")
        st.dataframe(ranked, hide_index=True)
    st.caption(PREDICTION_NOTE + " The hit rate of 'default' counts hits over all samples; a best-of-K "
               "variant's, over the structures it delivers (picked only among samples within the tolerance).")

try:
    predictions = pd.read_csv(SURROGATE_PREDICTIONS)
    figure = parity_figure(predictions)
except (OSError, KeyError, ValueError) as error:
    st.info(f"Surrogate parity plot: not available ({type(error).__name__}: {error}).")
else:
    st.plotly_chart(figure, key="parity")
    st.plotly_chart(reliability_figure(predictions), key="reliability")

metrics = read_json(SURROGATE_METRICS)
if metrics is not None:
    st.caption("Band-gap surrogate on held-out splits (eV): the shipped ensemble next to v1; coverage_1 / "
               "coverage_2 = share of rows whose error is within ±1 / ±2 of the calibrated spread.")
    st.dataframe(pd.DataFrame([{"reading": reading, "split": split, **values}
                               for reading, splits in metrics.get("metrics", {}).items()
                               for split, values in splits.items()]), hide_index=True)
