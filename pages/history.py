"""History: every run stored in the local SQLite database; reopen, compare, re-download, delete."""
from __future__ import annotations

from functools import partial

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from crystallm_core.product.service import run_table, stored_run_zip, summarise
from crystallm_core.ui.components import history_store

store = history_store()


GONE = "That run no longer exists."  # deleted in another tab since this page was drawn


def load_run(run_id: str):
    """The stored run, or None (with a warning) if another tab deleted it."""
    try:
        return store.load(run_id)
    except KeyError:
        st.warning(GONE)
        return None


def compare_figure(frames: dict[str, pd.DataFrame], column: str, title: str) -> go.Figure:
    figure = go.Figure()
    for name, frame in frames.items():
        figure.add_trace(go.Histogram(x=frame[column].dropna(), name=name, opacity=0.6, nbinsx=30))
    figure.update_layout(barmode="overlay", height=300, title=title, margin=dict(l=10, r=10, t=30, b=40),
                         legend=dict(orientation="h", y=-0.25))
    return figure


def compare(run_ids: list[str], labels: dict[str, str]) -> None:
    """Distributions of surrogate gap and E_hull, and the headline rates, of two runs side by side."""
    runs = [load_run(run_id) for run_id in run_ids]
    if None in runs:
        return
    frames = {run.run_id: run_table(run) for run in runs}
    st.plotly_chart(compare_figure(frames, "band_gap_pred", "Surrogate band gap (eV)"), key="cmp_gap")
    st.plotly_chart(compare_figure(frames, "e_hull_pred", "E_hull estimate (eV/atom)"), key="cmp_ehull")
    rates = pd.DataFrame([{"run": labels[run.run_id], "n": len(run.candidates),
                           **{k: v for k, v in summarise(frames[run.run_id]).items() if k in ("valid", "stable")}}
                          for run in runs])
    st.dataframe(rates, hide_index=True)


st.title("History")
st.caption(f"Runs are kept in `{store.path}` (set CRYSTALLM_HISTORY_DB to move it).")
summaries = store.list_runs()
if not summaries:
    st.info("No runs yet. Every run you generate is stored here, also when you cancel it.")
    st.stop()

labels = {s.run_id: s.label for s in summaries}
st.dataframe(pd.DataFrame([{"run": s.run_id, "description": s.label, "structures": s.n_candidates,
                            "valid": s.n_valid} for s in summaries]), hide_index=True, key="history_table")

run_id = st.selectbox("Run", list(labels), format_func=labels.get, key="history_run")
cols = st.columns(4)
for col, label, key, page in ((cols[0], "Open in Explore", "open_explore", "pages/explore.py"),
                               (cols[1], "Open in Evaluate", "open_evaluate", "pages/evaluate.py")):
    if col.button(label, key=key) and (opened := load_run(run_id)) is not None:
        st.session_state["run"] = opened
        st.switch_page(page)
cols[2].download_button("Download zip", data=partial(stored_run_zip, store, run_id),
                        file_name=f"crystallm_run_{run_id}.zip", mime="application/zip", key="history_zip")
confirm = cols[3].checkbox("Confirm delete", key=f"confirm_delete_{run_id}")
if cols[3].button("Delete", key="delete_run", disabled=not confirm):
    store.delete(run_id)
    st.rerun()

st.subheader("Compare two runs")
chosen = st.multiselect("Runs", list(labels), format_func=labels.get, max_selections=2, key="compare_runs")
if len(chosen) == 2:
    compare(chosen, labels)
