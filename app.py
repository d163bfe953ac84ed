"""CrystaLLM Studio: `streamlit run app.py`.

This file only sets up the pages, before anything slow: until `st.navigation` runs, a fresh
server's sidebar lists the raw file names of pages/. Each page lives in pages/ (Home in
pages/home.py) and loads what it needs itself (the model behind a spinner); the pieces they
share are in crystallm_core.ui, the logic in crystallm_core.product (and below).
"""
import streamlit as st

st.set_page_config(page_title="CrystaLLM Studio", page_icon=":material/diamond:", layout="wide")
navigation = st.navigation([
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/generate.py", title="Generate", icon=":material/science:"),
    st.Page("pages/explore.py", title="Explore", icon=":material/view_in_ar:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/monitoring:"),
    st.Page("pages/model.py", title="Model", icon=":material/neurology:"),
    st.Page("pages/finetune.py", title="Fine-tune", icon=":material/model_training:"),
    st.Page("pages/history.py", title="History", icon=":material/history:"),
])
navigation.run()
