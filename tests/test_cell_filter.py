"""The fast Fréchet cell filter (chem/judges/cell_filter.py): ASE's math, cheaper."""
from __future__ import annotations

import numpy as np
import pytest
from ase.filters import FrechetCellFilter
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from prototypes import rutile_tio2
from pymatgen.io.ase import AseAtomsAdaptor
from scipy.linalg import expm, logm

from crystallm_core.chem.judges.cell_filter import FastFrechetCellFilter, logm_3x3


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, (3, 3), elements=st.floats(-0.2, 0.2)))
@example(np.array([[0, 1e-8, 0], [0, 0, 0], [0, 0, 0.0]]))  # a tiny shear: defective, once read as 0
def test_logm_matches_scipy_near_the_identity(deformation):
    matrix = np.eye(3) + deformation
    assert np.allclose(logm_3x3(matrix), np.real_if_close(logm(matrix)), atol=1e-9)


@pytest.mark.parametrize("matrix", [
    np.array([[1, 0.1, 0], [0, 1, 0], [0, 0, 1.0]]),  # a shear: not diagonalisable
    np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]]),  # a rotation: complex eigenvalues
])
def test_logm_of_awkward_matrices_inverts_expm(matrix):
    assert np.allclose(expm(logm_3x3(matrix)), matrix, atol=1e-12)


class CountingCalculator:
    """A toy calculator: harmonic forces towards the start, a fixed stress; counts its calls."""

    def __init__(self, atoms):
        self.start, self.calls = atoms.positions.copy(), 0

    def forces_and_stress(self, atoms):
        self.calls += 1
        return -(atoms.positions - self.start) * 0.5, np.array([0.01, -0.02, 0.005, 0.001, 0.0, -0.003])


def filtered(kind):
    atoms = AseAtomsAdaptor.get_atoms(rutile_tio2())
    atoms.set_cell(atoms.cell * 1.02, scale_atoms=True)
    atoms.positions[0] += 0.05
    toy = CountingCalculator(atoms)
    cell_filter = kind(atoms)
    atoms.get_forces = lambda **kw: toy.forces_and_stress(atoms)[0]
    atoms.get_stress = lambda **kw: toy.forces_and_stress(atoms)[1]
    return cell_filter, toy


def test_same_forces_as_ase_and_read_once_per_geometry():
    fast, toy = filtered(FastFrechetCellFilter)
    reference, _ = filtered(FrechetCellFilter)
    assert np.allclose(fast.get_forces(), reference.get_forces(), atol=1e-12)
    assert np.allclose(fast.get_positions(), reference.get_positions(), atol=1e-12)
    calls = toy.calls
    fast.get_forces()
    assert toy.calls == calls  # the same geometry: remembered
    fast.set_positions(fast.get_positions() + 0.01)
    reference.set_positions(reference.get_positions() + 0.01)
    assert np.allclose(fast.get_forces(), reference.get_forces(), atol=1e-12) and toy.calls > calls
