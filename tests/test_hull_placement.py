"""A candidate in its chemical system's convex hull: E_hull static and relaxed, the diagram for
2–4 elements, the decomposition for more; on Explore and in a run's detail view (issue 24)."""
from __future__ import annotations

import pandas as pd
import pytest
from prototypes import rocksalt_nacl
from test_app_pages import messages, new_app, prototype_run

from crystallm_core.chem.judges import stability
from fuzz_corpus import crowded_cifs
from crystallm_core.chem.data.hull import HullReference
from crystallm_core.chem.judges.hull_placement import CANDIDATE_NAME, place_on_hull, structure_on_hull
from crystallm_core.ui.hull_panel import hull_figure


@pytest.fixture
def tiny_hull():
    return HullReference(pd.DataFrame({
        "formula": ["Na", "Cl", "K", "Li", "Rb", "Cs", "NaCl", "KCl"],
        "e_form_per_atom": [0, 0, 0, 0, 0, 0, -2.0, -2.2],
        "source_id": ["na", "cl", "k", "li", "rb", "cs", "nacl", "kcl"]}))


def test_a_binary_candidate_sits_in_its_diagram_with_static_and_relaxed_e_hull(tiny_hull):
    placement = place_on_hull("NaCl", -1.9, e_form_relaxed=-2.05, reference=tiny_hull)
    assert placement.system == ("Cl", "Na") and placement.formula == "NaCl"
    assert placement.e_hull == pytest.approx(0.1) and placement.e_hull_relaxed == pytest.approx(-0.05)
    assert placement.decomposition_rows() == [{"phase": "NaCl (nacl)", "fraction": 1.0}]
    assert placement.plottable and placement.candidate.name == CANDIDATE_NAME
    assert placement.candidate in placement.diagram.all_entries
    assert placement.diagram.get_e_above_hull(placement.candidate) == pytest.approx(0.1)


def test_more_than_four_elements_give_the_decomposition_without_a_diagram(tiny_hull):
    placement = place_on_hull("LiNaKRbCsCl5", -1.0, reference=tiny_hull)
    assert not placement.plottable and len(placement.system) == 6
    rows = placement.decomposition_rows()
    assert {row["phase"].split()[0] for row in rows} >= {"NaCl", "KCl"}
    assert sum(row["fraction"] for row in rows) == pytest.approx(1.0)
    assert rows == sorted(rows, key=lambda row: -row["fraction"])


def test_an_element_without_a_reference_is_a_readable_error(tiny_hull):
    with pytest.raises(ValueError, match="no hull reference for element"):
        place_on_hull("FeO", -1.0, reference=tiny_hull)


def test_a_crowded_structure_gets_no_chgnet_estimate():
    from pymatgen.core import Structure

    crowded = Structure.from_str(crowded_cifs()["P2_1/c, 21 rows its operators pile into two clumps"], fmt="cif")
    with pytest.raises(ValueError, match="no CHGNet estimate: atoms .* Å apart"):
        structure_on_hull(crowded)


def test_the_figure_is_pymatgens_plot_with_the_candidate_highlighted(tiny_hull):
    figure = hull_figure(place_on_hull("NaCl", -1.9, reference=tiny_hull))
    assert "Cl–Na convex hull" in figure.layout.title.text
    assert any("candidate" in str(trace.hovertext or trace.text or "") or "ighlight" in str(trace.name)
               for trace in figure.data)


def scored_run():
    run = prototype_run()
    run.candidates[0].scores.e_form_pred = -2.0  # NaCl
    run.candidates[1].scores.e_form_pred = -3.3  # TiO2
    return run


def test_explore_shows_a_scored_candidate_on_its_hull_with_the_bias_note(app_env, monkeypatch, tiny_hull):
    monkeypatch.setattr(stability, "load_hull", lambda: tiny_hull)
    monkeypatch.setattr("crystallm_core.chem.judges.hull_placement.load_hull", lambda: tiny_hull)
    at = new_app()
    at.session_state["run"] = scored_run()
    at.switch_page("pages/explore.py").run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["E_hull, as written (eV/atom)"] == "+0.000" and metrics["E_hull, relaxed (eV/atom)"] == "—"
    assert any("Cl–Na convex hull" in chart.proto.spec for chart in at.get("plotly_chart"))
    assert "biased low" in messages(at.caption)


def test_explore_places_an_upload_on_request_with_chgnet(app_env):
    at = new_app("pages/explore.py")
    from pymatgen.io.cif import CifWriter

    at.file_uploader(key="explore_upload").upload("NaCl.cif", str(CifWriter(rocksalt_nacl())).encode(),
                                                  "chemical/x-cif")
    at.run()
    assert not at.metric  # nothing estimated until asked
    next(b for b in at.button if b.label.startswith("Place on the convex hull")).click().run()
    assert not at.exception and not at.info, messages(at.info)
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["E_hull, as written (eV/atom)"]) < 0.3  # rock salt NaCl is on (or near) the hull
    assert any("convex hull" in chart.proto.spec for chart in at.get("plotly_chart"))


def test_evaluate_detail_view_places_a_chosen_structure(app_env, monkeypatch, tiny_hull):
    monkeypatch.setattr("crystallm_core.chem.judges.hull_placement.load_hull", lambda: tiny_hull)
    at = new_app()
    at.session_state["run"] = scored_run()
    at.switch_page("pages/evaluate.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert {m.label: m.value for m in at.metric}["E_form (eV/atom)"] == "-2.000"
    at.selectbox(key="hull_structure").set_value(1).run()  # TiO2: no Ti or O in the tiny hull
    assert "Not placed on the hull: no hull reference for element(s) O, Ti" in messages(at.info)
