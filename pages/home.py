"""Home: what the tool does, which model is loaded, where to load another one from."""
from __future__ import annotations

import streamlit as st


def model_facts(info) -> None:
    """Name, size, weights hash and training data of the loaded model."""
    st.markdown(f"#### {info.name}")
    cols = st.columns(3)
    cols[0].metric("Parameters", f"{info.n_params / 1e6:.2f} M")
    cols[1].metric("Layers × width", f"{info.n_layer} × {info.n_embd}")
    cols[2].metric("Weights dtype", info.dtype)
    st.markdown(
        f"- **Trained on:** {info.trained_on}\n"
        f"- **Weights SHA-256:** `{info.weights_sha256}`\n"
        f"- **Loaded from:** `{info.source}`\n"
        f"- **Can leave a property unspecified:** "
        f"{'yes' if info.supports_missing_properties else 'no (needs both targets)'}"
    )


def model_selector() -> None:
    """Choose the shipped default, a local checkpoint directory or a Hugging Face hub id."""
    from crystallm_core.product.server_settings import allowed_model_source
    from crystallm_core.ui.components import get_model

    choices = {"Default (shipped, or $CRYSTALLM_MODEL_DIR)": None, "Local directory": "path", "Hugging Face hub id (needs internet)": "hub"}
    with st.form("model_source_form"):
        kind = st.radio("Model source", list(choices), horizontal=True, key="model_kind")
        location = st.text_input("Directory or hub id", placeholder="/path/to/checkpoint  or  owner/model-name",
                                 help="A CrystaLLM-pi or CrystaLLM Studio checkpoint: config.json + *.safetensors.",
                                 key="model_location")
        st.caption(model_roots_caption())
        load = st.form_submit_button("Load model")
    if not load:
        return
    if choices[kind] is not None and not location.strip():
        st.error("Enter a directory or a hub id for this model source.")
        return
    try:
        source = None if choices[kind] is None else allowed_model_source(location, hub=choices[kind] == "hub")
        with st.spinner("Loading model…"):
            get_model(source)
    except ValueError as error:
        st.error(f"The model could not be loaded: {error}")
        return
    st.session_state["model_source"] = source
    st.success("Model loaded." if source is None else f"Model loaded from {source}.")


def model_roots_caption() -> str:
    from crystallm_core.product.server_settings import server_settings

    roots = ", ".join(f"`{root}`" for root in server_settings().model_roots)
    return f"Local directories are loaded only from inside: {roots} (set by the server's owner)."


def loaded_model() -> None:
    """The model section; its modules (torch among them) are imported here, after the page's text
    is on screen, and the model itself loads behind a spinner (`components.cached_model`)."""
    with st.spinner("Starting up…"):
        from crystallm_core.ui.components import current_model
    st.subheader("Loaded model")
    facts = st.container()
    model_selector()  # before the facts are drawn, so a newly loaded model is the one described
    with facts:
        loaded = current_model()
        if loaded is not None:
            model_facts(loaded.info)


st.title("CrystaLLM Studio")
st.markdown(
    "CrystaLLM Studio writes new crystal structures, as CIF files, aimed at a band gap (eV) and an "
    "energy above the convex hull (eV/atom) that you choose. "
    "It re-implements CrystaLLM-π: a GPT-2 language model of CIFs steered by a property encoder "
    "whose output every layer attends to (prefix attention). "
    "Every structure is checked for validity and scored by a band-gap surrogate and a CHGNet stability "
    "estimate, so you can see how close it came to your targets before spending DFT time on it."
)
loaded_model()
st.page_link("pages/generate.py", label="Generate structures →", icon=":material/science:")
