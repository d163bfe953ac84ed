"""Plotly figures the pages share."""
from __future__ import annotations

import plotly.graph_objects as go


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
