"""Generate: targets and sampling settings in one form; a background run streams into the table."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from crystallm_core.product.generation import (
    UNTIL_VALID_SAMPLE_FACTOR,
    GenerationRequest,
    sample_counts,
)
from crystallm_core.product.server_settings import server_settings
from crystallm_core.product.service import (
    BEST_OF_CHOICES,
    DECODINGS,
    DEFAULT_METRICS,
    DEFAULT_SAMPLING,
    GUIDES,
    RESPONSE_CURVES,
    SamplingSettings,
    best_of_counts,
    e_hull_steering_note,
    known_space_groups,
    space_group_choices,
)
from crystallm_core.ui.charts import histogram_figure
from crystallm_core.ui.components import (
    active_job,
    current_model,
    current_run,
    live_job_panel,
    read_json,
    run_summary,
    start_job,
    training_stats,
)

BAND_GAP_SLIDER_MAX = 12.0  # eV; the published model's highest evaluation target is 12.1 eV
E_HULL_SLIDER_MAX = 0.5  # eV/atom; near-hull phases are what one asks for
DEFAULT_DELIVERED, DEFAULT_BEST_OF = 16, 4  # the app's default: the best 16 of 64 samples


def space_group_label(choice, known: set[str]) -> str:
    if choice is None:
        return "any (the model chooses)"
    number, symbol = choice
    return f"{number}: {symbol}" + ("" if symbol in known else "  (not in this model's vocabulary)")


def request_form(loaded, stats: dict | None) -> tuple[GenerationRequest, float] | None:
    """The form; returns (request, tolerance) when submitted, None otherwise."""
    can_omit = loaded.info.supports_missing_properties  # guidance also needs the "unknown" embedding
    known = known_space_groups(loaded)
    limit = server_settings().max_structures
    with st.form("generate_form"):
        left, right = st.columns(2)
        band_gap = left.slider("Target band gap (eV)", 0.0, BAND_GAP_SLIDER_MAX, 1.5, 0.05, key="band_gap")
        tolerance = left.slider("Tolerance ± (eV) for a hit", 0.05, 2.0, DEFAULT_METRICS.hit_tolerance, 0.05,
                                key="tolerance")
        e_hull = right.slider("Target E_hull (eV/atom)", 0.0, E_HULL_SLIDER_MAX, 0.0, 0.005, key="e_hull")
        omit_help = None if can_omit else "This model needs both targets."
        any_gap = left.checkbox("Any band gap (no target)", key="any_gap", disabled=not can_omit, help=omit_help)
        any_hull = right.checkbox("Any E_hull (no target)", key="any_hull", disabled=not can_omit, help=omit_help)
        steering = e_hull_steering_note(read_json(Path(loaded.info.source) / RESPONSE_CURVES))
        if steering:
            right.caption(steering)
        if stats:
            left.plotly_chart(histogram_figure(stats["band_gap_hist"], "training band gaps (eV)", band_gap,
                                               (0, BAND_GAP_SLIDER_MAX)), key="bg_density")
            right.plotly_chart(histogram_figure(stats["e_hull_hist"], "training E_hull (eV/atom)", e_hull,
                                                (0, E_HULL_SLIDER_MAX)), key="eh_density")
            st.caption("Bars: where the training data are dense; targets far from them are harder to hit.")
        else:
            st.caption("Training-data density: not available (no training_data_stats.json in the model directory).")
        with st.expander("Composition and symmetry (optional)"):
            composition = st.text_input("Composition", placeholder="e.g. TiO2 or Li3PS4", key="composition")
            elements = st.text_input("Element set (only these elements may appear)", placeholder="e.g. Li, Fe, P, O",
                                     key="elements")
            cols = st.columns(2)
            spacegroup = cols[0].selectbox("Space group (type to search; needs a composition)",
                                           [None, *space_group_choices()], key="spacegroup",
                                           format_func=lambda choice: space_group_label(choice, known))
            z = cols[1].number_input("Z, formula units per cell (0 = as written)", 0, 20, 0, key="z")
        with st.expander("Sampling", expanded=True):
            cols = st.columns(3)
            n = cols[0].number_input("Number of structures", 1, limit, min(DEFAULT_DELIVERED, limit), key="n")
            best_of = cols[0].selectbox(
                "Best of K", BEST_OF_CHOICES, index=BEST_OF_CHOICES.index(DEFAULT_BEST_OF), key="best_of",
                format_func=lambda k: "off (keep every sample)" if k == 1 else f"best of {k}",
                help="Sample K × the number of structures, rank them by the score (chance the gap is within "
                     "the tolerance, E_hull above its target, duplicates, known structures) and pick the best; "
                     "the others stay in the run, marked not picked. With relaxation, only the picked ones are "
                     "relaxed, together. The score uses the same band-gap head as the hit column: a picked hit "
                     "is a prediction, not a measurement.")
            until_valid = cols[0].checkbox(
                "Count valid ones only", key="until_valid",
                help=f"Keep sampling until this many structures are valid, drawing at most "
                     f"{UNTIL_VALID_SAMPLE_FACTOR}× as many (and at most {limit}). Invalid ones stay "
                     "in the table with their reasons.")
            seed = cols[0].number_input("Seed", 0, 2**31 - 1, 0, key="seed")
            decoding = cols[0].radio(
                "Decoding", DECODINGS, index=DECODINGS.index(DEFAULT_SAMPLING.decoding), key="decoding", horizontal=True,
                help="Constrained: the decoder writes what the CIF format already determines, masks choices "
                     "that cannot give a valid CIF (space groups, cell shape, multiplicities, atoms too close) "
                     "and rewrites a site row that fails; every choice is still the model's. Free: the model "
                     "samples every token, as in training (about half its CIFs fail a check).")
            temperature = cols[1].slider("Temperature", 0.1, 2.0, DEFAULT_SAMPLING.temperature, 0.05, key="temperature")
            top_k = cols[1].number_input("Top-k", 1, 377, DEFAULT_SAMPLING.top_k, key="top_k")
            top_p = cols[2].slider("Top-p", 0.05, 1.0, DEFAULT_SAMPLING.top_p, 0.01, key="top_p")
            guidance = cols[2].slider("Guidance scale (1 = off)", 1.0, 5.0, DEFAULT_SAMPLING.guidance_scale, 0.1,
                                      key="guidance",
                                      disabled=not can_omit,
                                      help=None if can_omit else "This model has no unconditional mode.")
            guide = cols[2].selectbox(
                "Guide", GUIDES, index=GUIDES.index(DEFAULT_SAMPLING.guide), key="guide", disabled=not can_omit,
                help="Which target guidance amplifies: all, or one of them (contrasted with that target "
                     "unknown while the other stays given). Measured effects: Model page, response curves.")
        with st.expander("Repairs after decoding (off by default; counted apart from valid as written)"):
            rescale = st.checkbox(
                "Rescale a cell whose only failure is bond lengths", key="rescale",
                help="One isotropic scale that brings every bond back inside the check's band, then every check "
                     "again. The model's own CIF is kept; the rescaled one is offered beside it.")
            relax = st.checkbox(
                "Relax valid structures with CHGNet (a few seconds each)", key="relax",
                help="A bounded relaxation (BFGS) within the written space group, with the E_hull estimate "
                     "before and after; also for structures that fail only on bond lengths. With best of K, "
                     "only the picked structures are relaxed, together (one CHGNet pass per step for all).")
        submitted = st.form_submit_button("Generate", type="primary")
    if not submitted:
        return None
    settings = SamplingSettings(temperature=temperature, top_k=int(top_k), top_p=top_p, guidance_scale=guidance,
                                guide=guide, decoding=decoding)
    if best_of > 1 and until_valid:
        st.error("'Best of K' and 'Count valid ones only' cannot be combined: choose one.")
        return None
    if int(n) * best_of > limit:
        st.error(f"Best of {best_of} draws {int(n) * best_of} samples; this server allows at most {limit}: "
                 "ask for fewer structures or a smaller K.")
        return None
    counts = best_of_counts(int(n), best_of) if best_of > 1 else sample_counts(int(n), until_valid)
    request = GenerationRequest(band_gap=None if any_gap else band_gap, e_hull=None if any_hull else e_hull,
                                **counts,
                                composition=composition.strip() or None, z=int(z) or None,
                                spacegroup=spacegroup[1] if spacegroup else None, settings=settings, seed=int(seed),
                                elements=[e.strip() for e in elements.replace(",", " ").split()] or None,
                                rescale=rescale, relax=relax)
    return request, tolerance


st.title("Generate")
loaded = current_model()
if loaded is None:
    st.stop()
submission = request_form(loaded, training_stats(loaded.info.source))
if submission is not None:
    request, tolerance = submission
    if start_job(loaded, [request], settings={"hit_tolerance": tolerance}):
        st.session_state["last_request"] = request

if active_job() is not None:
    live_job_panel()
elif current_run() is not None:
    run_summary(current_run())
