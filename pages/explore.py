"""Explore: one structure in 3D, its re-detected symmetry, lattice, density, XRD pattern and CIF,
and an on-demand CHGNet relaxation that shows what changes."""
from __future__ import annotations

import hashlib
from pathlib import PurePath

import plotly.graph_objects as go
import streamlit as st

from crystallm_core.product.server_settings import check_upload_size
from crystallm_core.product.service import (
    HULL_BIAS_NOTE,
    RelaxSettings,
    check_upload,
    describe_structure,
    parse_cif,
    relax_and_check,
    uploaded_cif_text,
    xrd_pattern,
)
from crystallm_core.ui.components import current_run
from crystallm_core.ui.hull_panel import stability_section
from crystallm_core.ui.verdict import validity_verdict
from crystallm_core.ui.viewer import VIEWER_STYLES, viewer_html


def pick_cif() -> tuple[str, str, object, object, float | None] | None:
    """(name, CIF text, its Structure or None, its ValidityReport or None, its CHGNet formation energy
    or None) from the current run or an upload; None if there is nothing to show. A run's candidates
    carry their parsed structure, report and scores; an upload is parsed and checked here."""
    run = current_run()
    sources = (["Current run"] if run is not None else []) + ["Upload a CIF"]
    source = st.radio("Structure from", sources, horizontal=True, key="explore_source")
    if source == "Upload a CIF":
        upload = st.file_uploader("CIF file", type=["cif"], key="explore_upload")
        if upload is None:
            return None
        try:
            check_upload_size(upload.size)
            return upload.name, uploaded_cif_text(upload.getvalue()), None, None, None
        except ValueError as error:
            st.error(f"{upload.name}: {error}")
            return None
    readable = {c.index: c for c in run.candidates if c.cif}
    if not readable:
        st.info("No structure of the current run could be turned into a CIF; nothing to show.")
        return None
    index = st.selectbox(
        "Structure", list(readable), key="explore_structure",
        format_func=lambda i: (f"#{i:03d} {readable[i].formula or '?'} ({readable[i].space_group or '?'}) "
                               f"{'✓ valid' if readable[i].valid else '✗ invalid'}"),
    )
    chosen = readable[index]
    return chosen.file_name, chosen.cif, chosen.structure, chosen.report, chosen.scores.e_form_pred


def upload_report(cif: str):
    """The upload's validity under the user-file rule, checked once per CIF (reruns reuse it)."""
    key = hashlib.sha256(cif.encode()).hexdigest()
    reports = st.session_state.setdefault("upload_reports", {})
    if key not in reports:
        with st.spinner("Checking the file…"):
            reports[key] = check_upload(cif)
    return reports[key]


def why(error: Exception) -> str:
    """The error's message, or its type where pymatgen gives none (e.g. a dummy species' mass)."""
    return str(error) or f"{type(error).__name__} (unusual species?)"


def xrd_figure(structure) -> go.Figure:
    peaks = xrd_pattern(structure)
    figure = go.Figure(go.Bar(x=peaks["two_theta"], y=peaks["intensity"], width=0.25, customdata=peaks["hkl"],
                              hovertemplate="2θ %{x:.2f}°<br>I %{y:.1f}<br>%{customdata}<extra></extra>",
                              marker_color="#2b6cb0"))
    figure.update_layout(height=300, margin=dict(l=10, r=10, t=30, b=40), title="Powder XRD (Cu Kα)",
                         xaxis_title="2θ (°)", yaxis_title="intensity (a.u.)")
    return figure


def relaxation_panel(name: str, cif: str, structure) -> None:
    """Relax on request; the report is kept per CIF so reruns (e.g. the viewer's controls) reuse it."""
    key = hashlib.sha256(cif.encode()).hexdigest()
    reports = st.session_state.setdefault("relaxations", {})
    limits = RelaxSettings()
    with st.expander("Relax with CHGNet", expanded=key in reports):
        st.caption(f"A bounded relaxation (BFGS) of positions and cell within the written space group "
                   f"(at most {limits.max_steps} steps or {limits.max_seconds:g} s, fmax {limits.fmax} eV/Å). "
                   "Small changes mean the model wrote a structure near a local minimum.")
        if st.button("Relax", key="relax"):
            with st.spinner("Relaxing with CHGNet…"):
                try:
                    reports[key] = relax_and_check(structure)
                except Exception as error:  # e.g. isolated atoms: CHGNet has no energy for them
                    st.error(f"CHGNet could not relax this structure: {type(error).__name__}: {error}")
        report = reports.get(key)
        if report is None:
            return
        st.write(report.summary())
        st.table({column: [row[column] for row in report.rows()] for column in ("quantity", "before", "after")})
        st.caption(HULL_BIAS_NOTE)
        try:
            st.iframe(viewer_html(report.relaxation.structure), height=440)
        except Exception as error:
            st.info(f"3D view of the relaxed structure not available: {why(error)}")
        if report.cif:
            st.download_button("Download the relaxed CIF", report.cif, file_name=f"{PurePath(name).stem}_relaxed.cif",
                               mime="chemical/x-cif", key="relaxed_download")


st.title("Explore")
picked = pick_cif()
if picked is not None:
    name, cif, structure, report, e_form = picked
    if structure is None:
        try:
            structure = parse_cif(cif)
        except ValueError as error:
            st.error(f"{name}: {error}")
            st.stop()
    validity_verdict(report or upload_report(cif))
    # A CIF can parse yet defeat a view (e.g. a dummy species X has no scattering factors): say so
    # and show the rest, never a traceback.
    expected = (ValueError, KeyError, TypeError, IndexError, AttributeError, ArithmeticError)
    view_col, info_col = st.columns([3, 2])
    with view_col:
        controls = st.columns([1, 1, 1, 2, 1.3])
        supercell = tuple(controls[i].number_input(axis, 1, 3, 1, key=f"cell_{axis}") for i, axis in enumerate("abc"))
        style = controls[3].selectbox("Style", list(VIEWER_STYLES), key="viewer_style")
        labels = controls[4].toggle("Labels", key="viewer_labels")
        try:
            st.iframe(viewer_html(structure, supercell, labels, style), height=440)
        except expected as error:
            st.info(f"3D view not available: {why(error)}")
    with info_col:
        try:
            summary = describe_structure(structure)
        except expected as error:
            st.info(f"Structure summary not available: {why(error)}")
        else:
            st.table({"property": list(summary), "value": [str(v) for v in summary.values()]})
    try:
        st.plotly_chart(xrd_figure(structure), key="xrd")
    except expected as error:
        st.info(f"XRD pattern not available: {why(error)}")
    with st.expander("CIF"):
        st.code(cif, language=None)
    st.download_button("Download this CIF", cif, file_name=name, mime="chemical/x-cif", key="cif_download")
    relaxation_panel(name, cif, structure)
    st.subheader("Stability")
    cif_key = hashlib.sha256(cif.encode()).hexdigest()
    relaxed = st.session_state.get("relaxations", {}).get(cif_key)
    stability_section(cif_key, structure, e_form, relaxed.after.e_form_per_atom if relaxed else None)
