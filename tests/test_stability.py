"""CHGNet stability estimates: formation-energy arithmetic, one real static evaluation, error rows."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from prototypes import rocksalt_nacl
from pymatgen.core import Composition, Lattice, Structure

from crystallm_core.chem.judges import stability
from crystallm_core.chem.data.hull import HullReference


@pytest.fixture
def tiny_hull(monkeypatch):
    """Na, Cl at 0 and NaCl at -2.1 eV/atom: E_hull = e_form + 2.1 for NaCl, no data files needed."""
    table = pd.DataFrame({"formula": ["Na", "Cl", "NaCl"], "e_form_per_atom": [0.0, 0.0, -2.1],
                          "source_id": ["el-Na", "el-Cl", "nacl"]})
    hull = HullReference(table)
    monkeypatch.setattr(stability, "load_hull", lambda: hull)
    return hull


def test_elemental_references_shipped():
    mu = stability.elemental_references()
    assert len(mu) == 89 and mu["O"] == pytest.approx(-4.9467, abs=1e-3)


def test_formation_energy_arithmetic():
    mu = stability.elemental_references()
    e_total = (mu["Na"] + mu["Cl"]) / 2 - 1.0  # 1 eV/atom below the elements
    assert stability.formation_energy_per_atom(Composition("Na2Cl2"), e_total) == pytest.approx(-1.0)
    assert stability.formation_energy_per_atom(Composition("Si"), mu["Si"]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="Am"):
        stability.formation_energy_per_atom(Composition("AmO2"), -5.0)


def test_static_chgnet_estimate_and_error_rows(tiny_hull):
    nacl = rocksalt_nacl().get_primitive_structure()  # 2 atoms: fast
    isolated = Structure(Lattice.cubic(30.0), ["Na"], [[0, 0, 0]])  # no neighbour within 6 Å
    unsupported = Structure(Lattice.cubic(3.0), ["Am"], [[0, 0, 0]])
    good, lonely, no_ref, missing = stability.estimate_stability([nacl, isolated, unsupported, None])

    assert good.error is None and not good.relaxed
    assert -2.4 < good.e_form_per_atom < -1.8  # MP: -2.09 eV/atom
    assert good.e_hull == pytest.approx(good.e_form_per_atom + 2.1, abs=1e-6)
    assert "CHGNet failed" in lonely.error and lonely.e_total_per_atom is None
    assert "Am" in no_ref.error
    assert missing.error == "no structure"


def test_relaxation_is_bounded(tiny_hull):
    strained = rocksalt_nacl().get_primitive_structure()
    strained.apply_strain(0.04)
    settings = stability.RelaxSettings(max_steps=3, max_seconds=60)
    [est] = stability.estimate_stability([strained], relax=True, relax_settings=settings)
    assert est.relaxed and est.error is None and math.isfinite(est.e_hull)


def test_missing_hull_gives_error_not_exception(monkeypatch):
    def no_hull():
        raise ValueError("hull reference table not found")

    monkeypatch.setattr(stability, "load_hull", no_hull)
    [est] = stability.estimate_stability([rocksalt_nacl().get_primitive_structure()])
    assert est.e_form_per_atom is not None and est.e_hull is None and "E_hull" in est.error


@pytest.mark.parametrize("optimizer", ["BFGS", "FIRE"])
def test_both_optimizers_relax_a_strained_cell(optimizer):
    strained = rocksalt_nacl().get_primitive_structure()
    strained.apply_strain(0.04)
    settings = stability.RelaxSettings(max_steps=60, max_seconds=60, optimizer=optimizer)
    relaxation = stability.relax_structure(strained, settings)
    [before] = stability.static_readings([strained])
    assert relaxation.converged and relaxation.steps <= 60
    assert relaxation.structure.volume < strained.volume  # the 4 % stretch relaxes back
    assert relaxation.energy_per_atom < before.energy_per_atom


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer 'LBFGS'"):
        stability.make_optimizer(None, stability.RelaxSettings(optimizer="LBFGS"))
