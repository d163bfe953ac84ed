"""The Fine-tune page's pieces: choosing the data (upload or a path inside the data roots),
mapping its columns, the settings form, the live progress panel and the finished result.

Session state keys: "finetune_job" (a FineTuneJob in flight), "finetune_result" (the last
finished job), "ft_upload" (the uploader).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from crystallm_core.chem.data.user_data import ColumnMap, table_columns
from crystallm_core.product.finetune import FineTuneSettings
from crystallm_core.product.finetune_job import (
    FineTuneJob,
    checked_data_path,
    data_choices,
    save_upload,
    start_finetune,
)
from crystallm_core.product.server_settings import allowed_model_source, server_settings
from crystallm_core.ui.components import format_seconds, get_model, polled_job_panel

NONE = "(none)"
UPLOAD, SERVER = "Upload a table", "A file or folder on the server"


def choose_data() -> tuple[Path, bytes | None] | None:
    """(path, None) for server data, (a readable copy, the bytes) for an upload; None until chosen."""
    settings = server_settings()
    kind = st.radio("Your data", [UPLOAD, SERVER], horizontal=True, key="ft_kind")
    if kind == UPLOAD:
        uploaded = st.file_uploader(f"CSV or Parquet table with a CIF column (up to {settings.max_upload_mb} MB)",
                                    type=["csv", "gz", "parquet"], key="ft_upload")
        if uploaded is None:
            return None
        content = uploaded.getvalue()
        cached = st.session_state.get("ft_upload_copy")
        if not cached or cached[0] != (uploaded.name, len(content)) or not cached[1].exists():
            cached = st.session_state["ft_upload_copy"] = ((uploaded.name, len(content)),
                                                           save_upload(uploaded.name, content))
        return cached[1], content
    roots = ", ".join(f"`{root}`" for root in settings.data_roots)
    choices = data_choices()
    picked = st.selectbox(f"Found in the data folders ({roots})", [None, *choices], key="ft_pick",
                          format_func=lambda p: "—" if p is None else str(p))
    typed = st.text_input("…or a path inside them", key="ft_path",
                          help="A CSV / Parquet table, or a folder of .cif files. Paths outside the data folders "
                               "that the server's owner configured are refused.")
    text = typed.strip() or (str(picked) if picked else "")
    if not text:
        st.info("Choose a table or a folder of CIFs." if choices else f"No data files found in {roots}.")
        return None
    return checked_data_path(text), None


def default_index(columns: list[str], name: str) -> int:
    return columns.index(name) + 1 if name in columns else 0


def column_select(label: str, columns: list[str], default: str, key: str) -> str | None:
    choice = st.selectbox(label, [NONE, *columns], index=default_index(columns, default), key=key)
    return None if choice == NONE else choice


def map_columns(path: Path) -> tuple[ColumnMap, Path | None]:
    """Column pickers for a table, or for a folder's optional labels table."""
    labels = None
    if path.is_dir():
        labels_text = st.text_input("Labels table (optional): a CSV / Parquet with a column of the CIF file names",
                                    key="ft_labels")
        labels = checked_data_path(labels_text) if labels_text.strip() else None
        columns = table_columns(labels) if labels else []
        cif = path_column = None
    else:
        columns = table_columns(path)
        left, right = st.columns(2)
        with left:
            cif = column_select("CIF text column", columns, "cif", "ft_cif")
        with right:
            path_column = None if cif else column_select("…or column of CIF file paths", columns, "path", "ft_pathcol")
    cols = st.columns(3)
    with cols[0]:
        gap = column_select("Band gap (eV) column", columns, "band_gap", "ft_gap")
    with cols[1]:
        hull = column_select("E_hull (eV/atom) column", columns, "e_hull", "ft_hull")
    with cols[2]:
        ids = column_select("File-name column" if path.is_dir() else "Id column", columns, "id", "ft_id")
    st.caption("An empty cell, or no column, means the property is unknown for that row (the model can take that).")
    return ColumnMap(cif=cif, path=path_column, band_gap=gap, e_hull=hull, id=ids), labels


def settings_form() -> tuple[str, FineTuneSettings] | None:
    """Name and settings; returns them when Start is pressed."""
    with st.form("finetune_form"):
        name = st.text_input("Name of the new model", value=f"finetuned-{pd.Timestamp.now():%Y%m%d-%H%M}",
                             key="ft_name")
        cols = st.columns(3)
        minutes = cols[0].slider("Time budget (minutes)", 1, 60, 10, key="ft_minutes")
        epochs = cols[1].number_input("Most epochs", 1, 50, 3, key="ft_epochs")
        rate = cols[2].select_slider("Learning rate", [3e-5, 1e-4, 3e-4, 1e-3], value=1e-4, key="ft_lr",
                                     help="Small, so the model keeps what it knew (the shipped one trained at 4e-4–8e-4).")
        start = st.form_submit_button("Start fine-tuning", type="primary")
    if not start:
        return None
    return name.strip(), FineTuneSettings(minutes=minutes, epochs=float(epochs), learning_rate=rate)


def queue_finetune(path: Path, upload: bytes | None, columns: ColumnMap, labels: Path | None, name: str,
              settings: FineTuneSettings) -> None:
    """Queue the job (the upload's copy then belongs to it); a bad choice is an inline message."""
    base = st.session_state.get("model_source")
    job = start_finetune(path, name, base, columns, labels, settings, upload=upload is not None)
    st.session_state.pop("ft_upload_copy", None)
    st.session_state["finetune_job"] = job
    st.session_state.pop("finetune_result", None)


def progress_panel() -> None:
    """Progress bar with loss and ETA, and Cancel; polls while the job runs."""
    polled_job_panel("finetune_job", "finetune_result", draw_progress)


def draw_progress(job: FineTuneJob) -> None:
    progress = job.progress()
    if progress.status == "queued":
        st.info(f"Waiting for the CPU: position {progress.position} in the queue (others are generating).")
    elif progress.status == "preparing":
        st.info("Converting your structures…")
    loss = f"loss {progress.loss:.3f}" if progress.loss is not None else "loss —"
    val = f" · validation {progress.val_loss:.3f}" if progress.val_loss is not None else ""
    st.progress(progress.fraction, text=f"step {progress.step}/{progress.max_steps or '?'} · {loss}{val} · "
                                        f"elapsed {format_seconds(progress.elapsed)} · ETA {format_seconds(progress.eta)}")
    st.button("Cancel", key="cancel_finetune", on_click=job.cancel, help="Stop now; nothing is written.")


def result_view(job: FineTuneJob) -> None:
    """The finished job: losses, rejected rows, and "Use this model"."""
    if job.status == "failed":
        st.error(f"Fine-tuning stopped: {job.error}")
    elif job.status == "cancelled":
        st.warning("Cancelled: no model was written.")
    if job.data is not None and len(job.data.rejected):
        st.write(f"{len(job.data.rejected)} of {job.data.rows_in} rows were not used:")
        st.dataframe(job.data.rejected[["id", "reason"]], hide_index=True, key="ft_rejected")
    result = job.result
    if result is None:
        return
    cols = st.columns(3)
    cols[0].metric("Validation loss before", f"{result.val_loss_before:.4f}")
    cols[1].metric("after", f"{result.val_loss_after:.4f}", f"{result.val_loss_after - result.val_loss_before:+.4f}",
                   delta_color="inverse")
    cols[2].metric("Training time", format_seconds(result.seconds))
    st.write(f"Model written to `{result.model_dir}` (model card inside; best at step {result.best_step} of "
             f"{result.steps}).")
    use_model_button(result.model_dir, "use_finetuned")


def use_model_button(model_dir: Path, key: str) -> None:
    """"Use this model": load a model the server wrote and make it the session's model."""
    if st.button("Use this model", type="primary", key=key):
        try:
            source = allowed_model_source(str(model_dir))
            get_model(source)
        except ValueError as error:
            st.error(f"The model could not be loaded: {error}")
            return
        st.session_state["model_source"] = source
        st.success("Loaded: the Generate page now uses this model.")
