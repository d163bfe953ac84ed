"""Fine-tune: teach the loaded model your own structures (a table or a folder of CIFs), or aim it at a
target region by reward fine-tuning on its own judged samples; then use it."""
from __future__ import annotations

import streamlit as st

from crystallm_core.ui.align_panel import align_tab
from crystallm_core.ui.components import current_model
from crystallm_core.ui.finetune_panel import (
    choose_data,
    map_columns,
    progress_panel,
    queue_finetune,
    result_view,
    settings_form,
)

st.title("Fine-tune")
loaded = current_model()
if loaded is None:
    st.stop()
st.caption(f"Starting from the loaded model: **{loaded.info.name}** (change it on the Home page).")

own, region = st.tabs(["Your structures", "Aim at a target region"])
with own:
    st.markdown(
        "Give the model a few hundred of your own structures — a CSV or Parquet table with a CIF column "
        "and, if you have them, band gaps (eV) and energies above hull (eV/atom), or a folder of CIF files — "
        "and it continues training on them with a small learning rate. A validation set of formulas it "
        "never trains on decides when to stop. Rows that cannot be used are listed with the reason."
    )
    if "finetune_job" in st.session_state:
        progress_panel()
    else:
        try:
            chosen = choose_data()
            if chosen is not None:
                path, upload = chosen
                columns, labels = map_columns(path)
                submitted = settings_form()
                if submitted is not None:
                    queue_finetune(path, upload, columns, labels, *submitted)
                    st.rerun()
        except ValueError as error:
            st.error(str(error))
    if "finetune_result" in st.session_state and "finetune_job" not in st.session_state:
        result_view(st.session_state["finetune_result"])
with region:
    align_tab()
