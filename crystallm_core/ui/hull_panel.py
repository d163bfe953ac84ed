"""A candidate's stability for the pages: E_hull static and relaxed, its chemical system's convex
hull drawn by pymatgen's plotter (2–4 elements) or its decomposition products (more), and the
hull's bias note. The science is in `chem.judges.hull_placement`; this only draws."""
from __future__ import annotations

import math

import plotly.graph_objects as go
import streamlit as st
from pymatgen.analysis.phase_diagram import PDPlotter

from crystallm_core.product.service import HULL_BIAS_NOTE, HullPlacement, structure_on_hull


def hull_figure(placement: HullPlacement) -> go.Figure:
    """The known phases of the candidate's system and the candidate, highlighted."""
    shown = max(0.2, placement.e_hull + 0.05)  # unstable phases up to just above the candidate
    figure = PDPlotter(placement.diagram, show_unstable=shown, backend="plotly").get_plot(
        highlight_entries=[placement.candidate])
    figure.update_layout(height=460, title=f"{'–'.join(placement.system)} convex hull (known phases + candidate)")
    return figure


def energy(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:+.3f}"


def stability_panel(placement: HullPlacement, key: str) -> None:
    cols = st.columns(3)
    cols[0].metric("E_form (eV/atom)", energy(placement.e_form_per_atom))
    cols[1].metric("E_hull, as written (eV/atom)", energy(placement.e_hull))
    cols[2].metric("E_hull, relaxed (eV/atom)", energy(placement.e_hull_relaxed),
                   help=None if placement.e_hull_relaxed is not None else "Relax the structure to see it.")
    if placement.plottable:
        st.plotly_chart(hull_figure(placement), key=f"hull_{key}")
    else:
        st.caption(f"{len(placement.system)} elements: no diagram is drawn for more than 4; the candidate "
                   "would decompose into these known phases:")
    st.dataframe(placement.decomposition_rows(), hide_index=True,
                 column_config={"phase": "decomposes into (hull phase)", "fraction": "molar fraction"})
    st.caption(HULL_BIAS_NOTE)


def stability_section(key: str, structure, e_form: float | None, e_form_relaxed: float | None) -> None:
    """Place a structure on its hull: at once when its formation energy is known (a scored run),
    on request otherwise (a CHGNet estimate takes seconds). Placements are kept per `key`."""
    placements = st.session_state.setdefault("hull_placements", {})
    cache_key = (key, e_form, e_form_relaxed)
    if cache_key not in placements and e_form is None:
        if not st.button("Place on the convex hull (CHGNet estimate)", key=f"place_{key}"):
            return
    if cache_key not in placements:
        try:
            with st.spinner("Estimating with CHGNet and building the hull…"):
                placements[cache_key] = structure_on_hull(structure, e_form, e_form_relaxed)
        except ValueError as error:
            st.info(f"Not placed on the hull: {error}")
            return
    stability_panel(placements[cache_key], key)


def run_stability_section(run) -> None:
    """A run's detail view: choose a scored structure, see it on its hull."""
    scored = {c.index: c for c in run.candidates if c.structure is not None and c.scores.e_form_pred is not None}
    if not scored:
        st.info("No structure of this run has a CHGNet formation energy: nothing to place on a hull.")
        return
    index = st.selectbox("Structure", list(scored), key="hull_structure",
                         format_func=lambda i: f"#{i:03d} {scored[i].formula or '?'} ({scored[i].space_group or '?'})")
    chosen = scored[index]
    stability_section(f"{run.run_id}_{index}", chosen.structure, chosen.scores.e_form_pred, relaxed_e_form(chosen))


def relaxed_e_form(candidate) -> float | None:
    """The formation energy after the relaxation repair: the composition (so the hull below it)
    is unchanged, so it moves by exactly the change in E_hull."""
    static, relaxed = candidate.scores.e_hull_pred, candidate.e_hull_relaxed
    if static is None or relaxed is None or candidate.scores.e_form_pred is None:
        return None
    return candidate.scores.e_form_pred + (relaxed - static)
