"""Streamlit pieces shared by the pages: the loaded model, the history store, the current run,
the live job panel, the 3D viewer and the training-data density charts.

Session state keys: "model_source" (None = shipped default / $CRYSTALLM_MODEL_DIR), "run" (the
RunRecord on screen), "job" (a GenerationJob in flight), "last_request" (the last submitted
GenerationRequest, reused by the target sweep). Each browser session has its own state.
"""
from __future__ import annotations

import inspect
import json
from functools import partial
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import py3Dmol
import streamlit as st
from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter

from crystallm_core.chem.metrics import MetricSettings
from crystallm_core.chem.stability import HULL_BIAS_NOTE
from crystallm_core.lm.checkpoints import load_model, resolve_model_dir
from crystallm_core.product.app_support import GenerationJob, results_frame, run_zip
from crystallm_core.product.history import HistoryStore, RunRecord, default_db_path

LOCAL_3DMOL = "/app/static/vendor/3Dmol-min.js"  # scripts/fetch_3dmol.sh, served by enableStaticServing
CDN_3DMOL = inspect.signature(py3Dmol.view).parameters["js"].default  # the version py3Dmol was built for
POLL_SECONDS = 1.0  # progress refresh while a job runs
VIEWER_STYLES = {
    "ball and stick": {"sphere": {"scale": 0.3}, "stick": {"radius": 0.15}},
    "spheres": {"sphere": {"scale": 0.6}},
    "sticks": {"stick": {"radius": 0.2}},
    "lines": {"line": {}},
}


@st.cache_resource(max_entries=2, show_spinner="Loading model…")
def cached_model(source: str):
    """One LoadedModel per source per process (a failed load raises and is not cached)."""
    return load_model(source)


def get_model(source: str | None):
    """Load (once) the model at `source`; None = $CRYSTALLM_MODEL_DIR or the shipped default.

    The default is resolved to its directory first, so the cache key is the real location.
    """
    return cached_model(str(resolve_model_dir(None)) if source is None else source)


def current_model():
    """The LoadedModel chosen on the Home page, or None (with an inline error) if it cannot load."""
    try:
        return get_model(st.session_state.get("model_source"))
    except ValueError as error:
        st.error(f"The model could not be loaded: {error}")
        return None


@st.cache_resource
def cached_store(path: str) -> HistoryStore:
    return HistoryStore(path)


def history_store() -> HistoryStore:
    """The run history at $CRYSTALLM_HISTORY_DB (read per call, so tests can point elsewhere)."""
    return cached_store(str(default_db_path()))


def current_run() -> RunRecord | None:
    return st.session_state.get("run")


def active_job() -> GenerationJob | None:
    return st.session_state.get("job")


def start_job(loaded, requests: list, run: RunRecord) -> None:
    """Queue a background generation for this session (one at a time per session)."""
    st.session_state["job"] = GenerationJob(loaded, requests, run, store=history_store()).start()


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def format_gap(mean, std) -> str:
    if pd.isna(mean):
        return "not available"
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def results_table(structures: list, tolerance: float) -> None:
    """The results table: formula, space group, validity/reason, surrogate gap ± std, E_hull, hit."""
    frame = results_frame(structures, MetricSettings(hit_tolerance=tolerance))
    shown = frame.assign(  # the free-text reason goes last so the numbers stay in view
        valid=frame["valid"].map({True: "✓", False: "✗"}),
        band_gap=[format_gap(mean, std) for mean, std in zip(frame["band_gap_pred"], frame["band_gap_std"])],
        e_hull=frame["e_hull_pred"].map(lambda e: "not available" if pd.isna(e) else f"{e:.3f}"),
        hit=frame["hit"].map(lambda h: "—" if pd.isna(h) else ("✓" if h else "✗")),
    )
    st.dataframe(
        shown[["index", "formula", "space_group", "valid", "band_gap", "e_hull", "hit", "reason"]],
        hide_index=True, width="stretch",
        column_config={
            "index": "#", "space_group": "space group", "reason": "why not valid",
            "band_gap": st.column_config.TextColumn(
                "surrogate gap (eV)", help="Ensemble of a crystal-graph network and LightGBM (PBE gaps); ± is their disagreement."),
            "e_hull": st.column_config.TextColumn("E_hull est. (eV/atom)", help=HULL_BIAS_NOTE),
            "hit": f"hit (±{tolerance:g} eV)",
        },
    )


def run_tolerance(run: RunRecord) -> float:
    return float(run.settings.get("tolerance", 0.5))


def live_job_panel() -> None:
    """Progress, Cancel and streaming rows of this session's job; polls while the job runs."""
    st.fragment(job_fragment, run_every=POLL_SECONDS if active_job() is not None else None)()


def job_fragment() -> None:
    job = active_job()
    if job is None:
        return
    tolerance = run_tolerance(job.run)
    progress = job.progress()
    if progress.status == "queued":
        st.info(f"Waiting for the generator: position {progress.position} in the queue "
                "(another session is generating).")
    counted = (f"{progress.valid}/{progress.valid_target} valid ({progress.done} sampled, at most {progress.total})"
               if progress.valid_target else f"{progress.done}/{progress.total} structures")
    label = f"{counted} · elapsed {format_seconds(progress.elapsed)} · ETA {format_seconds(progress.eta)}"
    st.progress(min(progress.fraction, 1.0), text=label)
    st.button("Cancel", key="cancel_job", on_click=job.cancel, help="Stop now; finished structures are kept.")
    results_table(job.structures(), tolerance)
    if job.finished:
        st.session_state["run"] = job.run
        del st.session_state["job"]
        st.rerun()


def run_summary(run: RunRecord) -> None:
    """Status line, results table and the zip download of a finished run."""
    tolerance = run_tolerance(run)
    if run.status == "failed":
        st.error(f"The run stopped: {run.error}")
    elif run.status == "cancelled":
        st.warning(f"Cancelled: {len(run.structures)} finished structures kept.")
    st.write(f"**{run.n_valid} of {len(run.structures)}** structures valid · run `{run.run_id}`")
    wanted = run.settings.get("stop_after_valid")
    if run.status == "done" and wanted and run.n_valid < wanted:
        st.info(f"Only {run.n_valid} of the {wanted} valid structures asked for after {len(run.structures)} samples: "
                "lower the temperature, or loosen the composition and symmetry prompt.")
    results_table(run.structures, tolerance)
    for family, reason in run.manifest.get("scores_unavailable", {}).items():
        st.caption(f"{family}: {reason}")
    include_invalid = st.checkbox("Include invalid structures (subfolder invalid/)", key=f"invalid_{run.run_id}")
    st.download_button("Download zip", data=partial(run_zip, run, include_invalid, tolerance),
                       file_name=f"crystallm_run_{run.run_id}.zip", mime="application/zip",
                       key=f"zip_{run.run_id}_{include_invalid}")


def viewer_html(structure: Structure, supercell: tuple[int, int, int] = (1, 1, 1), labels: bool = False,
                style: str = "ball and stick", height: int = 420) -> str:
    """A 3Dmol.js view of the structure, loaded from the local copy with the CDN as fallback.

    The model is the full P1 cell: 3Dmol reads only the asymmetric unit of a symmetrised CIF
    unless asked to assemble it, so expanding first is the simple, reliable way.
    """
    view = py3Dmol.view(width="100%", height=height, js=CDN_3DMOL)
    view.addModel(str(CifWriter(structure)), "cif")
    view.setStyle(VIEWER_STYLES[style])
    view.addUnitCell()
    if tuple(supercell) != (1, 1, 1):
        view.replicateUnitCell(*supercell)
    if labels:
        view.addPropertyLabels("elem", {}, {"fontColor": "black", "backgroundOpacity": 0.2, "fontSize": 12})
    # 3Dmol looks down c by default; tilt so c points up and a long c axis is seen side-on.
    view.rotate(-80, "x")
    view.rotate(25, "y")
    view.zoomTo()
    # py3Dmol loads 3Dmol.js only if $3Dmolpromise is undefined: define it first, local then CDN.
    loader = f"""<script>
var $3Dmolpromise = new Promise(function(resolve, reject) {{
  function load(urls) {{
    if (!urls.length) {{ reject(new Error("3Dmol.js could not be loaded")); return; }}
    var tag = document.createElement("script");
    tag.src = urls[0];
    tag.onload = resolve;
    tag.onerror = function() {{ tag.remove(); load(urls.slice(1)); }};
    document.head.appendChild(tag);
  }}
  load(["{LOCAL_3DMOL}", "{CDN_3DMOL}"]);
}});
</script>"""
    return loader + view.write_html()


def read_json(path) -> dict | list | None:
    """A JSON file's content, or None when it is absent or unreadable (optional model assets)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def training_stats(model_source: str) -> dict | None:
    """training_data_stats.json of the model directory: band_gap_hist / e_hull_hist {edges, counts}."""
    return read_json(Path(model_source) / "training_data_stats.json")


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
