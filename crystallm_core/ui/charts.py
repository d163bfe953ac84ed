"""Plotly figures the pages share."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from crystallm_core.chem.judges.surrogates.calibration import reliability_curve


def histogram_figure(hist: dict, x_title: str, marker: float | None = None, x_range: tuple | None = None,
                     height: int = 160) -> go.Figure:
    """Bars from {edges, counts} as densities (bins may differ in width); a line at `marker`."""
    edges, counts = hist["edges"], hist["counts"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    densities = [c / w for c, w in zip(counts, widths)]
    figure = go.Figure(go.Bar(x=centres, y=densities, width=widths, marker_color="#8fb3d9", customdata=counts,
                              hovertemplate="%{x}: %{customdata} structures<extra></extra>"))
    if marker is not None:
        figure.add_vline(x=marker, line_color="#c53030", line_width=2)
    # Log scale: metals (gap 0) and on-hull phases dominate; the tails are what a target is judged against.
    figure.update_layout(height=height, margin=dict(l=10, r=10, t=10, b=30), xaxis_title=x_title,
                         yaxis_title="density (log)", yaxis_type="log", showlegend=False, bargap=0)
    if x_range is not None:
        figure.update_xaxes(range=list(x_range))
    return figure


def spread(frame: pd.DataFrame, target_column: str, width: float) -> pd.Series:
    """Every point of a target shares one x: offsets that spread each target's points over
    `width`, deterministically."""
    group = frame.groupby(target_column)
    return ((group.cumcount() + 0.5) / group["index"].transform("count") - 0.5) * width


def target_band_figure(top: float, tolerance: float, unit: str, colour: str, fill: str, ideal: str) -> go.Figure:
    """A figure with the band target ± tolerance shaded and the line outcome = target, from 0 to top."""
    line = np.array([0.0, top])
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=np.r_[line, line[::-1]], y=np.r_[line + tolerance, (line - tolerance)[::-1]],
                                mode="lines", fill="toself", fillcolor=fill, line_width=0,
                                name=f"target ± {tolerance:g} {unit}", hoverinfo="skip"))
    figure.add_trace(go.Scatter(x=line, y=line, mode="lines", line=dict(dash="dash", color=colour), name=ideal))
    return figure


def e_hull_scatter_figure(frame: pd.DataFrame, tolerance: float = 0.1) -> go.Figure | None:
    """Target vs CHGNet E_hull estimate of the valid structures, the ±tolerance band shaded
    (None when no row has both)."""
    shown = frame[frame["valid"] & frame["e_hull_pred"].notna() & frame["e_hull_target"].notna()]
    if shown.empty:
        return None
    width = max(float(shown["e_hull_target"].max()), 0.05)
    jitter = spread(shown, "e_hull_target", 0.06 * width)
    top = max(width, float(shown["e_hull_pred"].max())) + tolerance
    figure = target_band_figure(top, tolerance, "eV/atom", "#dd6b20", "rgba(221,107,32,0.12)", "estimate = target")
    figure.add_trace(go.Scatter(x=shown["e_hull_target"] + jitter, y=shown["e_hull_pred"], mode="markers",
                                marker=dict(color="#dd6b20", size=9), text=shown["formula"], name="valid structures",
                                hovertemplate="%{text}<br>target %{x:.3f}<br>estimate %{y:.3f} eV/atom<extra></extra>"))
    figure.update_layout(height=420, margin=dict(l=10, r=10, t=30, b=40), title="Target vs estimated E_hull",
                         xaxis_title="target E_hull (eV/atom)", yaxis_title="CHGNet E_hull estimate (eV/atom)")
    return figure


def response_figure(sweep: dict, title: str, unit: str, relaxed: bool = False) -> go.Figure:
    """Measured medians (90 % intervals) against the target, from a response_curves.json sweep."""
    points = [p for p in sweep["points"] if p["median"][0] is not None]
    targets = [p["target"] for p in points]
    figure = go.Figure()

    def add(key: str, name: str, colour: str) -> None:
        chosen = [p for p in points if p.get(key) and p[key][0] is not None]
        if chosen:
            medians = [p[key][0] for p in chosen]
            figure.add_trace(go.Scatter(
                x=[p["target"] for p in chosen], y=medians, mode="lines+markers", name=name, line_color=colour,
                error_y=dict(type="data", symmetric=False, array=[p[key][2] - m for p, m in zip(chosen, medians)],
                             arrayminus=[m - p[key][1] for p, m in zip(chosen, medians)]),
                customdata=[p["n_valid"] for p in chosen],
                hovertemplate="target %{x}<br>median %{y:.3f}<br>%{customdata} valid<extra></extra>"))

    add("median", "median of valid structures (90 % interval)", "#2b6cb0")
    if relaxed:
        add("median_relaxed", "after CHGNet relaxation", "#2f855a")
    top = max(targets + [0.1])
    figure.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", line=dict(dash="dash", color="#a0aec0"),
                                name="outcome = target"))
    figure.update_layout(height=340, title=f"{title} (Spearman ρ {sweep['spearman']:.2f})",
                         xaxis_title=f"target ({unit})", yaxis_title=f"outcome ({unit})",
                         margin=dict(l=10, r=10, t=40, b=40))
    return figure


def best_of_figure(table: pd.DataFrame, tolerance: float) -> go.Figure:
    """Hit rate against the band-gap target, one line per variant (`service.best_of_table`)."""
    figure = go.Figure()
    for name, group in table.groupby("variant", sort=False):
        figure.add_trace(go.Scatter(x=group["target (eV)"], y=group["hit rate"], mode="lines+markers", name=name))
    figure.update_layout(height=320, title=f"Hit rate within ±{tolerance:g} eV: what best of K buys",
                         xaxis_title="band-gap target (eV)", yaxis_title="hit rate (of the structures delivered)",
                         yaxis_range=[0, 1.02], margin=dict(l=10, r=10, t=40, b=40))
    return figure


def hit_rate_figure(curve: pd.DataFrame, tolerance: float) -> go.Figure:
    """Hit rate vs tolerance; the band between certain and possible hits is where the surrogate's
    ± band and the tolerance band disagree (`service.hit_rate_vs_tolerance`)."""
    figure = go.Figure()
    if "certain_hit_rate" in curve:
        figure.add_trace(go.Scatter(x=curve["tolerance"], y=curve["possible_hit_rate"], mode="lines", line_width=0,
                                    showlegend=False, hoverinfo="skip"))
        figure.add_trace(go.Scatter(x=curve["tolerance"], y=curve["certain_hit_rate"], mode="lines", line_width=0,
                                    fill="tonexty", fillcolor="rgba(221,107,32,0.2)", name="uncertain (± band crosses "
                                    "the tolerance band)"))
        figure.add_trace(go.Scatter(x=curve["tolerance"], y=curve["certain_hit_rate"], mode="lines",
                                    line=dict(dash="dot", color="#2f855a"), name="certain hits"))
    figure.add_trace(go.Scatter(x=curve["tolerance"], y=curve["hit_rate"], mode="lines", line_color="#2b6cb0",
                                name="hits"))
    figure.add_vline(x=tolerance, line_dash="dot")
    figure.update_layout(height=300, title="Hit rate (over all samples) vs tolerance", xaxis_title="tolerance (eV)",
                         yaxis_title="hit rate", yaxis_range=[0, 1.02], margin=dict(l=10, r=10, t=30, b=40))
    return figure


def reliability_figure(table: pd.DataFrame) -> go.Figure:
    """Observed vs nominal coverage of the surrogate's ± on its test rows (columns true, pred, std,
    source), for WBM (hypothetical) and Materials Project rows: solid over the rows read as non-metals
    (where the ± is calibrated), dotted over all rows (metals read as 0 eV are exactly right, which
    lifts coverage at every width)."""
    table = table[table["split"] == "test"] if "split" in table else table
    figure = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="#718096"),
                                  name="calibrated"))
    wbm = table["source"].eq("wbm") if "source" in table else pd.Series(False, index=table.index)
    for (name, rows), colour in zip((("WBM rows", table[wbm]), ("Materials Project rows", table[~wbm])),
                                    ("#dd6b20", "#2b6cb0")):
        for subset, dash in (("read as non-metal", "solid"), ("all", "dot")):
            part = rows[rows["pred"] > 0] if subset != "all" else rows
            if len(part):
                curve = reliability_curve(part["pred"] - part["true"], part["std"])
                figure.add_trace(go.Scatter(x=curve["nominal"], y=curve["observed"], mode="lines+markers",
                                            line=dict(color=colour, dash=dash), name=f"{name}, {subset} (n={len(part)})"))
    figure.add_vline(x=0.683, line_dash="dot", line_color="#a0aec0")  # ±1 spread of a normal error
    figure.update_layout(height=360, title="Reliability of the surrogate's ± on its test split",
                         xaxis_title="nominal coverage of ±z·spread", yaxis_title="observed coverage",
                         xaxis_range=[0, 1], yaxis_range=[0, 1.02], margin=dict(l=10, r=10, t=30, b=40))
    return figure
