"""Evaluate page parts for results made elsewhere: open a campaign directory, a run folder or zip,
or a folder of CIFs on the server; filter its rows and download the chosen CIFs."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from crystallm_core.product.run import Run
from crystallm_core.product.run_files import run_zip
from crystallm_core.product.server_settings import server_settings
from crystallm_core.product.service import SPACE_GROUP_RULES, open_results, run_subset


def open_results_form() -> None:
    """A path inside the data roots → the page's current run (a clear message otherwise)."""
    roots = ", ".join(str(root) for root in server_settings().data_roots)
    with st.expander("Open a campaign, a run folder or zip, or a folder of CIFs on this server"):
        with st.form("open_results"):
            path = st.text_input("Path", key="open_results_path", help=f"Inside the server's data roots: {roots}")
            submitted = st.form_submit_button("Open")
        if submitted:
            try:
                with st.spinner("Reading (and checking files that carry no checks)…"):
                    st.session_state["run"] = open_results(path)
            except ValueError as error:
                st.error(str(error))
                return
            st.rerun()


def filtered_download(run: Run, frame: pd.DataFrame) -> None:
    """Filter by target and by flags; download the chosen structures (their CIFs and rows) as a zip."""
    targets = sorted(frame["band_gap_target"].dropna().unique().tolist())
    cols = st.columns(4)
    chosen_targets = cols[0].multiselect("Band-gap targets", targets, default=targets, key="filter_targets")
    valid_only = cols[1].checkbox("Valid only", value=True, key="filter_valid")
    hits_only = cols[2].checkbox("Hits only", key="filter_hits")
    stable_only = cols[3].checkbox("Stable only", key="filter_stable")
    keep = frame["band_gap_target"].isin(chosen_targets) if targets else pd.Series(True, index=frame.index)
    for wanted, column in ((valid_only, "valid"), (hits_only, "hit"), (stable_only, "stable")):
        if wanted:
            keep &= frame[column].fillna(False).astype(bool)
    st.caption(f"{int(keep.sum())} of {len(frame)} structures chosen")
    st.dataframe(frame[keep][["file", "formula", "space_group", "valid", "space_group_rule", "band_gap_target",
                              "band_gap_pred", "e_hull_pred", "hit", "stable"]], hide_index=True, height=240)
    st.caption("Space-group rule: " + "; ".join(f"**{rule}**: {SPACE_GROUP_RULES[rule]}"
                                                for rule in sorted(set(frame["space_group_rule"].dropna()))))
    st.download_button("Download the chosen structures (zip)", data=run_zip(run_subset(run, keep.tolist())),
                       file_name=f"crystallm_{run.kind}_{run.run_id}_selection.zip", mime="application/zip",
                       key=f"selection_{run.run_id}", disabled=not keep.any())
