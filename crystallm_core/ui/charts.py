"""Plotly figures the pages share."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from crystallm_core.chem.surrogates.calibration import reliability_curve


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
