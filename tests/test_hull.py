"""Formation-energy hull: hand-made Li–O entries with known answers, plus the shipped table."""
from __future__ import annotations

import glob

import numpy as np
import pandas as pd
import pytest

from crystallm_core.chem.data.hull import DEFAULT_TABLE, HullReference
from crystallm_core.paths import data_dir

# Li2O (x_O = 1/3, -2.0 eV/atom) and LiO2 (x_O = 2/3, -1.5) are on the hull; the hull at
# x_O = 1/2 (Li2O2) is their midpoint, -1.75, so Li2O2 at -1.0 lies 0.75 above it.
# LiFeO2 = 1/4 Fe + 3/4 "LiO2": its hull energy is 3/4 × -1.5 = -1.125.
TABLE = pd.DataFrame(
    [("Li", 0.0, "mp-Li"), ("O2", 0.0, "mp-O"), ("Fe", 0.0, "mp-Fe"),
     ("Li2O", -2.0, "mp-1"), ("LiO2", -1.5, "mp-2"), ("Li2O2", -1.0, "mp-3")],
    columns=["formula", "e_form_per_atom", "source_id"],
)


@pytest.fixture(scope="module")
def hull() -> HullReference:
    return HullReference(TABLE)


@pytest.mark.parametrize(
    "formula, e_form, expected",
    [("Li2O", -2.0, 0.0), ("Li2O", -1.9, 0.1), ("Li4O2", -1.9, 0.1), ("Li2O2", -1.0, 0.75),
     ("Li2O2", -2.0, -0.25), ("Li", 0.0, 0.0), ("O", 0.3, 0.3), ("LiFeO2", 0.0, 1.125)],
)
def test_e_above_hull_binary(hull, formula, e_form, expected):
    assert hull.e_above_hull(formula, e_form) == pytest.approx(expected, abs=1e-9)


def test_decomposition_of_li2o2_is_half_li2o_half_lio2(hull):
    decomposition = hull.decomposition("Li2O2", -1.0)
    assert decomposition == pytest.approx({"Li2O (mp-1)": 0.5, "LiO2 (mp-2)": 0.5})


@pytest.mark.parametrize("bad", ["LiF", "Xx2O", "", "Li2O)("])
def test_unknown_elements_and_bad_formulas_raise_value_error(hull, bad):
    with pytest.raises(ValueError):
        hull.e_above_hull(bad, -1.0)


def test_nan_formation_energy_raises(hull):
    with pytest.raises(ValueError, match="finite"):
        hull.e_above_hull("Li2O", float("nan"))


def test_vertices_drop_off_hull_entries_without_changing_answers(hull):
    vertices = hull.vertices()
    assert set(vertices.table["source_id"]) == {"mp-Li", "mp-O", "mp-Fe", "mp-1", "mp-2"}
    for formula in ["Li2O2", "Li3O", "LiO3", "LiFeO2"]:
        assert vertices.e_above_hull(formula, -0.7) == pytest.approx(hull.e_above_hull(formula, -0.7))


def test_save_load_round_trip(hull, tmp_path):
    path = hull.save(tmp_path / "hull.csv.gz")
    loaded = HullReference.load(path)
    assert list(loaded.table.columns) == ["formula", "e_form_per_atom", "source_id"]
    assert loaded.e_above_hull("Li2O2", -1.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="not found"):
        HullReference.load(tmp_path / "missing.csv.gz")


def test_phase_diagrams_are_cached_per_chemical_system(hull):
    hull.e_above_hull("Li2O", -1.0)
    hits = hull.phase_diagram.cache_info().hits
    hull.e_above_hull("LiO2", -0.1)
    assert hull.phase_diagram.cache_info().hits == hits + 1


@pytest.fixture(scope="module")
def shipped() -> HullReference:
    return HullReference.load()


def test_shipped_table_is_small_and_loads(shipped):
    assert DEFAULT_TABLE.stat().st_size < 2_000_000
    assert len(shipped.elements) == 89
    assert shipped.e_above_hull("Si", 0.0) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.skipif(not (data_dir() / "mp20").is_dir(), reason="shared data (MP-20 CSVs) not available")
def test_shipped_hull_reproduces_mp20_labels(shipped):
    rows = pd.concat(pd.read_csv(f) for f in sorted(glob.glob(str(data_dir() / "mp20" / "*.csv.gz"))))
    rows = rows.drop_duplicates("material_id").sample(100, random_state=0)
    ours = np.array([shipped.e_above_hull(r.pretty_formula, r.formation_energy_per_atom)
                     for r in rows.itertuples()])
    assert np.abs(ours - rows["e_above_hull"].to_numpy()).mean() < 0.005  # measured: 0.0018
