"""Wyckoff positions derived from the symmetry operations match International Tables."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from crystallm_core.chem.cif.wyckoff import crystal_system, number_of, space_group


@pytest.mark.parametrize("number, fixed, free", [
    (1, {}, [(1, 3)]),
    (2, {1: 8}, [(2, 3)]),
    (14, {2: 4}, [(4, 3)]),
    (62, {4: 2}, [(4, 2), (8, 3)]),
    (139, {2: 2, 4: 2, 8: 1}, [(4, 1), (8, 1), (16, 1), (16, 2), (32, 3)]),
    (166, {3: 2, 9: 2}, [(6, 1), (18, 1), (18, 2), (36, 3)]),
    (191, {1: 2, 2: 2, 3: 2}, [(2, 1), (4, 1), (6, 1), (12, 2), (24, 3)]),
    (221, {1: 2, 3: 2}, [(6, 1), (8, 1), (12, 1), (24, 2), (48, 3)]),
    (225, {4: 2, 8: 1, 24: 1}, [(24, 1), (32, 1), (48, 1), (96, 2), (192, 3)]),
    (227, {8: 2, 16: 2}, [(32, 1), (48, 1), (96, 1), (96, 2), (192, 3)]),
])
def test_positions_match_international_tables(number, fixed, free):
    group = space_group(number)
    assert dict(Counter(p.multiplicity for p in group.fixed_positions)) == fixed
    assert [(p.multiplicity, p.dof) for p in group.positions if p.dof > 0] == free


def test_general_position_multiplicity_is_the_number_of_operations():
    for number in (1, 19, 63, 123, 148, 194, 230):
        group = space_group(number)
        assert group.positions[-1].dof == 3 and group.positions[-1].multiplicity == len(group.rotations)


def test_orbit_and_fixed_position_lookup():
    group = space_group(225)  # Fm-3m
    assert len(group.orbit([0, 0, 0])) == 4 and len(group.orbit([0.1234, 0.2, 0.31])) == 192
    assert len(group.orbit([0.3333, 0.0, 0.0])) == 24  # 24e, written with 4 decimals
    assert group.fixed_position_of(np.array([0.5, 0.5, 0.5])) is not None
    assert group.fixed_position_of(np.array([0.5, 0.0, 0.0])) == group.fixed_position_of(np.array([0.5, 0.5, 0.5]))
    assert group.fixed_position_of(np.array([0.2, 0.0, 0.0])) is None


def test_symbols_and_systems():
    assert number_of("Fm-3m") == 225 and number_of("P2_1/c") == 14
    assert [crystal_system(n) for n in (1, 3, 16, 75, 143, 168, 195)] == [
        "triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic"]
    with pytest.raises(ValueError):
        number_of("P7")


def test_shipped_table_is_what_the_operations_give():
    from crystallm_core.chem.cif.wyckoff import derive_positions, position_table

    table = position_table()
    assert sorted(table) == list(range(1, 231))
    for number in range(1, 231, 7):
        assert [tuple(p[:2]) for p in table[number]] == [p[:2] for p in derive_positions(number)], number
