"""Every page's logic through Streamlit's AppTest, with the tiny random model (fast, no browser).

Generation runs in a background thread; `wait_for_job` reruns the script (as the page's
polling fragment would) until the job has finished.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from prototypes import rocksalt_nacl, rutile_tio2
from run_samples import candidate
from streamlit.testing.v1 import AppTest

from crystallm_core.paths import SURROGATE_DIR
from crystallm_core.product.history import HistoryStore
from crystallm_core.product.jobs import GENERATION_QUEUE
from crystallm_core.product.run import Run, Scores

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PARITY_FILE = SURROGATE_DIR / "test_predictions.csv"  # shipped with the surrogates, drawn on the Model page


def new_app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def wait_for_job(at: AppTest, timeout: float = 120) -> AppTest:
    deadline = time.time() + timeout
    while "job" in at.session_state and time.time() < deadline:
        time.sleep(0.3)
        at.run()
    assert "job" not in at.session_state, "generation did not finish in time"
    assert not at.exception, [e.value for e in at.exception]
    return at


def button(at: AppTest, label: str):
    [found] = [b for b in at.button if b.label == label]
    return found


def messages(elements) -> str:
    return " | ".join(str(e.value) for e in elements)


def prototype_run(scores: bool = True) -> Run:
    """A finished run of two valid prototypes (with surrogate-like scores) and one invalid sample."""
    candidates = [candidate(0, rocksalt_nacl(), 2.0), candidate(1, rutile_tio2(), 2.0), candidate(2, None, 2.0)]
    if scores:
        candidates[0].scores = Scores(band_gap_pred=2.3, band_gap_std=0.2, e_hull_pred=0.02, novel=True)
        candidates[1].scores = Scores(band_gap_pred=1.1, band_gap_std=0.2, e_hull_pred=0.3, novel=True)
    return Run(candidates, model={"name": "tiny"}, requests=[{"band_gap": 2.0, "seed": 0}],
               settings={"hit_tolerance": 0.5})


def test_home_shows_model_and_reports_a_bad_directory_inline(app_env):
    at = new_app()
    assert "tiny-test-model" in messages(at.markdown)
    assert any("weights sha-256" in m.value.lower() for m in at.markdown)
    at.radio(key="model_kind").set_value("Local directory")
    at.text_input(key="model_location").set_value(str(app_env / "no_such_model"))
    at.button[0].click().run()  # the form's "Load model"
    assert not at.exception
    assert "could not be loaded" in messages(at.error) and "does not exist" in messages(at.error)
    assert "model_source" not in at.session_state  # the working model stays selected


@pytest.mark.parametrize("location", ["/etc", "{root}/../..", "{root}/link_out"])
def test_home_refuses_a_directory_outside_the_model_roots(app_env, location):
    (app_env / "link_out").symlink_to("/usr")
    at = new_app()
    at.radio(key="model_kind").set_value("Local directory")
    at.text_input(key="model_location").set_value(location.format(root=app_env))
    at.button[0].click().run()
    assert not at.exception
    assert "outside the folders this server reads models from" in messages(at.error)
    assert "model_source" not in at.session_state


def test_generate_streams_rows_into_the_table_and_stores_the_run(app_env):
    at = new_app("pages/generate.py")
    at.slider(key="band_gap").set_value(2.5)
    at.slider(key="e_hull").set_value(0.05)
    at.number_input(key="n").set_value(4)
    at.selectbox(key="best_of").set_value(1)  # keep every sample
    at.number_input(key="seed").set_value(7)
    at.button[0].click().run()  # "Generate"
    assert not at.error, messages(at.error)
    wait_for_job(at)
    run = at.session_state["run"]
    assert run.status == "done" and len(run.candidates) == 4
    assert {s.band_gap_target for s in run.candidates} == {2.5}
    table = at.dataframe[0].value
    assert len(table) == 4 and {"formula", "valid", "band_gap", "hit"} <= set(table.columns)
    assert any(b.label == "Download zip" for b in at.get("download_button"))
    stored = HistoryStore(app_env / "history.sqlite").load(run.run_id)
    assert stored.requests[0]["seed"] == 7 and stored.requests[0]["e_hull"] == pytest.approx(0.05)
    assert stored.model["name"] == "tiny-test-model" and len(stored.generation) == 1
    assert stored.to_frame().equals(run.to_frame())


def test_count_valid_only_draws_up_to_four_times_and_explains_a_shortfall(app_env):
    at = new_app("pages/generate.py")
    at.number_input(key="n").set_value(2)
    at.selectbox(key="best_of").set_value(1)
    at.checkbox(key="until_valid").check()
    at.button[0].click().run()
    wait_for_job(at)
    run = at.session_state["run"]  # the tiny random model writes no valid CIF, so all 8 samples are drawn
    assert run.status == "done" and len(run.candidates) == 8 and run.requests[0]["stop_after_valid"] == 2
    assert "Only 0 of the 2 valid structures asked for after 8 samples" in messages(at.info)


def test_best_of_k_samples_n_times_k_and_says_how_many_were_within_tolerance(app_env):
    at = new_app("pages/generate.py")
    assert at.number_input(key="n").value == 16 and at.selectbox(key="best_of").value == 4  # the app's default
    at.number_input(key="n").set_value(2)
    at.selectbox(key="best_of").set_value(2)
    at.button[0].click().run()
    wait_for_job(at)
    run = at.session_state["run"]  # the tiny random model writes nothing valid: nothing is picked, all 4 kept
    assert len(run.candidates) == 4 and run.requests[0]["keep_best"] == 2
    assert all(c.pick == {"picked": False, "of": 4, "keep": 2} for c in run.candidates)
    stored = HistoryStore(app_env / "history.sqlite").load(run.run_id)  # the picks are stored with the run
    assert [c.pick for c in stored.candidates] == [c.pick for c in run.candidates]
    assert stored.generation[0]["best_of"]["sampled"] == 4
    assert "0 of 4 samples were within the tolerance" in messages(at.info)
    assert "not a measurement" in messages(at.caption)
    table = at.dataframe[0].value
    assert {"score", "picked"} <= set(table.columns) and (table["picked"] == "not picked (of 4)").all()


def test_best_of_k_refuses_count_valid_only(app_env):
    at = new_app("pages/generate.py")
    at.checkbox(key="until_valid").check()
    at.button[0].click().run()
    assert "cannot be combined" in messages(at.error) and "job" not in at.session_state


def test_a_picked_run_shows_its_picks_first_with_score_and_relaxed_e_hull(app_env):
    run = prototype_run()
    run.requests[0]["keep_best"] = 1
    run.generation = [{"best_of": {"keep": 1, "sampled": 3, "valid": 2, "within_tolerance": 1, "picked": 1,
                                   "tolerance": 0.5, "band_gap_target": 2.0}}]
    for c, picked in zip(run.candidates, (False, True, False)):
        c.pick = {"picked": picked, "of": 3, "keep": 1}
    run.candidates[1].repairs = [{"kind": "relax", "valid": True, "cif": None, "details": {
        "e_hull_before": 0.3, "e_hull_after": 0.05}, "reasons": []}]
    at = new_app("pages/generate.py")
    at.session_state["run"] = run
    at.run()
    table = at.dataframe[0].value
    assert table["formula"].tolist()[0] == "TiO2" and table["picked"].tolist()[0] == "✓ picked from 3"
    assert table["e_hull"].tolist()[0] == "0.300 → 0.050 relaxed"
    assert "Best 1 of 3" in messages(at.markdown)


def test_a_run_shows_a_structure_on_its_hull_static_and_relaxed(app_env):
    run = prototype_run()
    run.candidates[1].scores.e_form_pred = -3.2
    run.candidates[1].repairs = [{"kind": "relax", "valid": True, "cif": None, "details": {
        "e_hull_before": 0.3, "e_hull_after": 0.05}, "reasons": []}]
    at = new_app("pages/generate.py")
    at.session_state["run"] = run
    at.run()
    at.toggle(key=f"hull_{run.run_id}").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: float(m.value) for m in at.metric if m.value != "—"}
    static, relaxed = metrics["E_hull, as written (eV/atom)"], metrics["E_hull, relaxed (eV/atom)"]
    assert relaxed == pytest.approx(static - 0.25, abs=2e-3)  # the relaxation's drop, on the same hull


@pytest.mark.parametrize("composition, z, spacegroup, elements, expected", [
    ("Ti2Q3", 0, None, "", "not a chemical element"),
    ("TiO2!", 0, None, "", "not a chemical formula"),
    ("TiO2", 12, None, "", "atoms in the cell"),
    ("", 0, (225, "Fm-3m"), "", "only be fixed together with a composition"),
    ("NaCl", 4, (168, "P6"), "", "not one the model knows"),
    ("NaCl", 1, (225, "Fm-3m"), "", "F-centred"),
    ("", 0, None, "Li, Qq", "not chemical elements: Qq"),
    ("TiO2", 0, None, "Ti, S", "which the element set excludes"),
])
def test_bad_inputs_give_an_inline_message_and_keep_the_previous_run(app_env, composition, z, spacegroup, elements,
                                                                     expected):
    at = new_app("pages/generate.py")
    previous = prototype_run()
    at.session_state["run"] = previous
    at.text_input(key="elements").set_value(elements)
    at.text_input(key="composition").set_value(composition)
    at.number_input(key="z").set_value(z)
    at.selectbox(key="spacegroup").set_value(spacegroup)
    at.button[0].click().run()
    assert not at.exception
    assert expected in messages(at.error)
    assert "job" not in at.session_state
    assert at.session_state["run"] is previous and len(at.dataframe[0].value) == 3  # nothing lost


def test_cancel_keeps_finished_structures(app_env, monkeypatch):
    monkeypatch.setenv("CRYSTALLM_MAX_STRUCTURES", "5000")  # a run that cannot end before the cancel
    at = new_app("pages/generate.py")
    at.number_input(key="n").set_value(5000)
    at.selectbox(key="best_of").set_value(1)
    at.button[0].click().run()
    deadline = time.time() + 120
    while len(at.session_state["job"].candidates()) < 2 and time.time() < deadline:
        time.sleep(0.2)
    at.run()
    assert at.get("progress"), "no progress bar while generating"
    at.button(key="cancel_job").click().run()
    wait_for_job(at)
    run = at.session_state["run"]
    assert run.status == "cancelled" and 2 <= len(run.candidates) < 5000
    assert "Cancelled" in messages(at.warning)
    assert len(at.dataframe[0].value) == len(run.candidates)


def test_a_second_user_waits_in_the_queue_with_its_position(app_env):
    other_user = GENERATION_QUEUE.join()  # someone else is generating
    try:
        at = new_app("pages/generate.py")
        at.number_input(key="n").set_value(2)
        at.selectbox(key="best_of").set_value(1)
        at.checkbox(key="any_hull").check()  # this model can leave a property out
        at.button[0].click().run()
        at.run()
        assert "position 1 in the queue" in messages(at.info)
    finally:
        GENERATION_QUEUE.leave(other_user)
    wait_for_job(at)
    assert len(at.session_state["run"].candidates) == 2
    assert {s.e_hull_target for s in at.session_state["run"].candidates} == {None}


def test_sessions_do_not_see_each_others_results(app_env):
    first, second = new_app("pages/generate.py"), new_app("pages/generate.py")
    first.session_state["run"] = prototype_run()
    first.run()
    second.run()
    assert len(first.dataframe) == 1 and len(second.dataframe) == 0
    assert "run" not in second.session_state


def test_explore_shows_structure_xrd_and_rejects_a_corrupt_upload(app_env):
    at = new_app()
    at.session_state["run"] = prototype_run()
    at.switch_page("pages/explore.py").run()
    assert not at.exception
    summary = at.table[0].value
    assert "Fm-3m (#225)" in summary["value"].tolist()
    assert at.get("iframe"), "no 3D viewer"
    assert at.get("plotly_chart"), "no XRD pattern"
    at.selectbox(key="explore_structure").set_value(1).run()
    assert "P4_2/mnm (#136)" in at.table[0].value["value"].tolist()
    at.radio(key="explore_source").set_value("Upload a CIF").run()
    at.file_uploader(key="explore_upload").upload("broken.cif", b"data_x\n_cell_length_a 5\nloop_\n", "chemical/x-cif")
    at.run()
    assert not at.exception and "broken.cif" in messages(at.error)


def test_explore_relaxes_with_chgnet_and_offers_the_relaxed_cif(app_env):
    at = new_app()
    at.session_state["run"] = prototype_run()
    at.switch_page("pages/explore.py").run()
    at.button(key="relax").click().run()
    assert not at.exception and not at.error, messages(at.error)
    table = at.table[1].value.set_index("quantity")
    assert table.loc["space group (symprec 0.1)", "after"] == "Fm-3m"  # relaxed within its space group
    assert float(table.loc["CHGNet energy (eV/atom)", "after"]) <= float(table.loc["CHGNet energy (eV/atom)", "before"])
    assert " steps in " in messages(at.markdown)
    assert any(b.label == "Download the relaxed CIF" for b in at.get("download_button"))


X_CIF = """data_X
_symmetry_space_group_name_H-M 'P 1'
_cell_length_a 4
_cell_length_b 4
_cell_length_c 4
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_Int_Tables_number 1
loop_
_atom_site_type_symbol
_atom_site_label
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
X X0 0 0 0 1
Na Na0 0.5 0.5 0.5 1
"""


def test_explore_reports_views_a_dummy_species_defeats_without_a_traceback(app_env):
    at = new_app("pages/explore.py")
    at.file_uploader(key="explore_upload").upload("dummy.cif", X_CIF.encode(), "chemical/x-cif")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "XRD pattern not available" in messages(at.info) and "scattering" in messages(at.info)


def test_evaluate_draws_scatter_hit_curve_and_funnel(app_env):
    at = new_app()
    at.session_state["run"] = prototype_run()
    at.switch_page("pages/evaluate.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("plotly_chart")) >= 3  # scatter, hit rate vs tolerance, funnel
    [hits] = [chart for chart in at.get("plotly_chart") if "Hit rate (over all samples)" in chart.proto.spec]
    assert "uncertain" in hits.proto.spec and "certain hits" in hits.proto.spec  # the ± band splits the hits
    at.session_state["run"] = prototype_run(scores=False)
    at.run()
    assert "not available" in messages(at.info) and len(at.get("plotly_chart")) == 1  # funnel only


def test_evaluate_target_sweep_runs_k_samples_at_m_targets(app_env):
    at = new_app("pages/evaluate.py")
    at.number_input(key="sweep_m").set_value(2)
    at.number_input(key="sweep_k").set_value(2)
    button(at, "Run sweep").click().run()
    assert not at.error, messages(at.error)
    wait_for_job(at)
    run = at.session_state["run"]
    assert run.kind == "sweep" and len(run.candidates) == 4
    assert sorted({s.band_gap_target for s in run.candidates}) == [0.5, 4.0]
    assert [r["band_gap"] for r in run.requests] == [0.5, 4.0] and len(run.generation) == 2


def test_evaluate_sweeps_e_hull_at_a_fixed_band_gap(app_env):
    at = new_app("pages/evaluate.py")
    at.radio(key="sweep_property").set_value("e_hull")
    at.number_input(key="sweep_low").set_value(0.0)
    at.number_input(key="sweep_high").set_value(0.5)
    at.number_input(key="sweep_m").set_value(2)
    at.number_input(key="sweep_k").set_value(1)
    at.number_input(key="sweep_fixed").set_value(1.5)
    button(at, "Run sweep").click().run()
    wait_for_job(at)
    run = at.session_state["run"]
    assert run.settings["swept"] == "e_hull" and [r["e_hull"] for r in run.requests] == [0.0, 0.5]
    assert all(r["band_gap"] == 1.5 for r in run.requests)
    assert any("Hit rate vs target" in chart.proto.spec for chart in at.get("plotly_chart"))


def test_evaluate_opens_a_campaign_inside_the_data_roots_and_refuses_one_outside(app_env, tiny_model_dir):
    from crystallm_core.product.campaign import run_campaign
    from crystallm_core.product.campaign_spec import parse_spec

    spec = parse_spec({"samples_per_target": 2, "chunk_size": 2, "seed": 5, "model": str(tiny_model_dir),
                       "targets": {"band_gap": [0.5, 1.5], "e_hull": [0.0]},
                       "sampling": {"batch_size": 2, "max_tokens": 48},
                       "scores": {"surrogate": False, "stability": False, "novelty": False}})
    run_campaign(spec, app_env / "data" / "campaign", backend="local", progress=False)
    at = new_app("pages/evaluate.py")
    at.text_input(key="open_results_path").set_value(str(app_env / "data" / "campaign"))
    button(at, "Open").click().run()
    assert not at.exception and not at.error, messages(at.error)
    run = at.session_state["run"]
    assert run.kind == "campaign" and len(run.candidates) == 4
    assert any("of 4 structures chosen" in str(c.value) for c in at.caption)  # the filter over the campaign's rows
    at.text_input(key="open_results_path").set_value(str(app_env))
    button(at, "Open").click().run()
    assert "outside the folders" in messages(at.error) and at.session_state["run"] is run  # nothing lost


def test_evaluate_sweep_rejects_bad_settings_before_queueing(app_env):
    from crystallm_core.lm.sampler import SamplingSettings
    from crystallm_core.product.generation import GenerationRequest

    at = new_app("pages/evaluate.py")
    at.session_state["last_request"] = GenerationRequest(band_gap=2.0, settings=SamplingSettings(temperature=-1.0))
    button(at, "Run sweep").click().run()
    assert not at.exception and at.error and "job" not in at.session_state


def test_model_page_renders_card_curves_and_histograms(app_env, short_model_dir, tmp_path, monkeypatch):
    import json
    import shutil

    model_dir = tmp_path / "model_with_assets"
    shutil.copytree(short_model_dir, model_dir)
    (model_dir / "MODEL_CARD.md").write_text("# Tiny card\n\nTrained on nothing.")
    (model_dir / "training_log.json").write_text(json.dumps([{"step": s, "train_loss": 3 / s, "val_loss": 3.5 / s,
                                                              "elapsed_s": 10.0 * s}
                                                             for s in range(1, 20)]))
    hist = {"edges": [0, 1, 2, 3], "counts": [5, 3, 1]}
    (model_dir / "training_data_stats.json").write_text(json.dumps({"band_gap_hist": hist, "e_hull_hist": hist}))
    monkeypatch.setenv("CRYSTALLM_MODEL_DIR", str(model_dir))
    at = new_app("pages/model.py")
    assert "Tiny card" in messages(at.markdown)
    assert len(at.get("plotly_chart")) >= 3  # loss + two histograms (+ parity when the surrogate ships it)
    assert PARITY_FILE.is_file()  # shipped with the surrogates
    parity = [chart for chart in at.get("plotly_chart") if "Band-gap surrogate on its test split" in chart.proto.spec]
    assert len(parity) == 1 and "MAE" in parity[0].proto.spec and "wbm" in parity[0].proto.spec
    [reliability] = [chart for chart in at.get("plotly_chart") if "Reliability of the surrogate" in chart.proto.spec]
    assert "WBM rows" in reliability.proto.spec and "Materials Project rows" in reliability.proto.spec
    at.switch_page("pages/generate.py").run()
    assert not at.exception and len(at.get("plotly_chart")) == 2  # density hints beside the sliders


def test_model_page_shows_what_best_of_k_buys_on_the_same_targets(app_env, short_model_dir, tmp_path, monkeypatch):
    import json
    import shutil

    def sweep(hit_rates, **extra):
        points = [{"target": t, "n": 8, "n_valid": 8, "median": [t, t - 0.1, t + 0.1], "within_tolerance": 0.5,
                   "hit_rate": h, **extra} for t, h in zip((0.5, 2.0), hit_rates)]
        return {"e_hull": 0.0, "points": points, "spearman": 0.5}

    hull = {"band_gap": 1.5, "spearman": 0.0, "points": [
        {"target": t, "n": 8, "n_valid": 8, "median": [0.3, 0.2, 0.4], "within_tolerance": 0.1,
         "median_relaxed": [0.1, 0.0, 0.2]} for t in (0.0, 0.5)], "median_difference_low_minus_high": [0.0, -0.1, 0.1],
        "steers": False}
    settings = {"guidance_scale": 1.0, "guide": "all"}
    curves = {"samples_per_point": 8, "seed": 1, "tolerance": {"e_hull": 0.1, "band_gap": 0.5}, "variants": {
        "default": {"settings": settings, "band_gap_sweep": sweep([0.3, 0.1]), "e_hull_sweep": hull},
        "best-of-4": {"settings": settings, "best_of": 4, "e_hull_sweep": hull,
                      "band_gap_sweep": sweep([1.0, 0.375], n_sampled=32, n_within_tolerance=3)}}}
    model_dir = tmp_path / "model_with_curves"
    shutil.copytree(short_model_dir, model_dir)
    (model_dir / "response_curves.json").write_text(json.dumps(curves))
    monkeypatch.setenv("CRYSTALLM_MODEL_DIR", str(model_dir))
    at = new_app("pages/model.py")
    assert any("what best of K buys" in chart.proto.spec for chart in at.get("plotly_chart"))
    ranked = [frame.value for frame in at.dataframe if "hit rate" in frame.value.columns][0]
    assert ranked.loc[ranked["variant"] == "best-of-4", "hit rate"].tolist() == [1.0, 0.375]
    assert "not a measurement" in messages(at.caption)


def test_model_page_says_when_the_surrogates_parity_data_is_missing(app_env, tmp_path, monkeypatch):
    import crystallm_core.paths

    monkeypatch.setattr(crystallm_core.paths, "SURROGATE_DIR", tmp_path / "no_surrogate")
    at = new_app("pages/model.py")
    assert not [c for c in at.get("plotly_chart") if "Band-gap surrogate on its test split" in c.proto.spec]
    assert "Surrogate parity plot: not available" in messages(at.info)


def test_model_page_shows_no_other_models_card(app_env):
    at = new_app("pages/model.py")  # the short test model has no MODEL_CARD.md (the shipped one does)
    assert "No model card" in messages(at.info)


def test_history_lists_reopens_compares_and_deletes(app_env):
    store = HistoryStore(app_env / "history.sqlite")
    first, second = prototype_run(), prototype_run()
    second.created_at += 60
    store.save(first)
    store.save(second)
    at = new_app("pages/history.py")
    assert len(at.dataframe[0].value) == 2
    at.multiselect(key="compare_runs").set_value([first.run_id, second.run_id]).run()
    assert not at.exception and len(at.get("plotly_chart")) == 2
    at.selectbox(key="history_run").set_value(first.run_id).run()
    at.checkbox(key=f"confirm_delete_{first.run_id}").check().run()
    at.button(key="delete_run").click().run()
    assert [s.run_id for s in store.list_runs()] == [second.run_id]
    at.button(key="open_evaluate").click().run()
    assert not at.exception
    assert at.session_state["run"].run_id == second.run_id and at.session_state["run"] == second


def test_history_warns_when_another_tab_deleted_the_run(app_env, monkeypatch):
    store = HistoryStore(app_env / "history.sqlite")
    first, second = prototype_run(), prototype_run()
    store.save(first)
    store.save(second)
    at = new_app("pages/history.py")

    def deleted_meanwhile(self, run_id):  # another tab deletes it between listing and loading
        raise KeyError(run_id)

    monkeypatch.setattr(HistoryStore, "load", deleted_meanwhile)
    at.button(key="open_explore").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "That run no longer exists." in messages(at.warning) and "run" not in at.session_state
    at.multiselect(key="compare_runs").set_value([first.run_id, second.run_id]).run()
    assert not at.exception and "That run no longer exists." in messages(at.warning)


def test_viewer_loads_local_3dmol_first_and_shows_the_p1_cell():
    from crystallm_core.ui.viewer import CDN_3DMOL, LOCAL_3DMOL, viewer_html

    html = viewer_html(rocksalt_nacl(), supercell=(2, 2, 1), labels=True, style="spheres")
    assert html.index(LOCAL_3DMOL) < html.index(CDN_3DMOL)  # local copy, CDN as fallback
    assert "replicateUnitCell(2,2,1)" in html and "addUnitCell" in html and "addPropertyLabels" in html
    assert "'P 1'" in html  # the expanded cell, so 3Dmol needs no symmetry assembly
