"""Validity checks: prototypes pass, each hand-broken CIF fails the right check, nothing raises."""
from __future__ import annotations

import statistics
import time

import pytest
from prototypes import all_prototypes, rutile_tio2
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from crystallm_core.chem.cif.cif_format import repair_generated_cif, structure_to_model_cif
from crystallm_core.chem.judges.validity import CHECK_NAMES, check_cif


@pytest.fixture(scope="module")
def prototype_cifs() -> dict[str, str]:
    """Prototypes after the full trip: training format -> repair (what generation produces)."""
    return {name: repair_generated_cif(structure_to_model_cif(s)).cif
            for name, s in all_prototypes().items()}


@pytest.fixture(scope="module")
def rutile() -> str:
    return repair_generated_cif(structure_to_model_cif(rutile_tio2())).cif


def test_prototypes_pass_every_check(prototype_cifs):
    times = []
    for name, cif in prototype_cifs.items():
        start = time.perf_counter()
        report = check_cif(cif)
        times.append(time.perf_counter() - start)
        assert report.valid, (name, report.failed_reasons)
        assert [c.name for c in report.checks] == CHECK_NAMES
        assert report.formula == name and report.structure is not None
    print(f"median check_cif time on prototypes: {statistics.median(times) * 1000:.0f} ms")


def test_report_exposes_structure_formula_spacegroup(rutile):
    report = check_cif(rutile)
    assert report.formula == "TiO2" and report.spacegroup == "P4_2/mnm"
    assert len(report.structure) == 6 and report.failed_reasons == []
    assert report.to_dict()["checks"]["space_group"] == {"passed": True, "reason": "P4_2/mnm confirmed"}


def only_failure(report, name: str) -> str:
    failed = [c.name for c in report.checks if not c.passed]
    assert failed == [name], report.failed_reasons
    return report.check(name).reason


def test_formula_disagreement(rutile):
    reason = only_failure(check_cif(rutile.replace("_chemical_formula_structural TiO2",
                                                   "_chemical_formula_structural TiO3")), "formula_consistency")
    assert "TiO3" in reason and "TiO2" in reason


def test_multiplicity_mismatch(rutile):
    broken = rutile.replace(" O O1 4 ", " O O1 2 ")
    assert " O O1 2 " in broken
    assert only_failure(check_cif(broken), "multiplicity") == \
        "O: site multiplicities sum to 2, _chemical_formula_sum has 4"


def test_compressed_cell_has_bad_bonds(rutile):
    broken = rutile.replace("_cell_length_a 4.5940", "_cell_length_a 2.7564") \
                   .replace("_cell_length_b 4.5940", "_cell_length_b 2.7564") \
                   .replace("_cell_length_c 2.9590", "_cell_length_c 1.7754")
    reason = only_failure(check_cif(broken), "bond_lengths")
    assert reason.startswith("Ti–O ") and "× the expected" in reason


def test_stated_space_group_disagrees(rutile):
    broken = rutile.replace("H-M P4_2/mnm", "H-M P4/mmm")
    reason = only_failure(check_cif(broken), "space_group")
    assert reason == "CIF states P4/mmm but the atoms have P4_2/mnm symmetry (symprec 0.1)"


def test_cell_outside_sane_range(rutile):
    report = check_cif(rutile.replace("_cell_angle_gamma 90.0000", "_cell_angle_gamma 175.0000"))
    assert not report.check("sane_cell").passed
    assert "gamma = 175° is outside 10–170°" in report.check("sane_cell").reason
    assert report.check("bond_lengths").reason == "skipped: cell is not sane"


def test_atoms_too_close():
    structure = Structure(Lattice.cubic(5), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])
    report = check_cif(str(CifWriter(structure)))
    assert "0.25 Å apart (< 0.5 Å)" in report.check("sane_cell").reason


@pytest.mark.parametrize("text", [
    "", "garbage", None, 12, "data_\n", "data_[Ti2O4]\n_cell_length_a [4.59",
    "data_x\n_cell_length_a 1e400\n_cell_length_b 99999999999999999999999999999\n",
])
def test_junk_never_raises(text):
    report = check_cif(text)  # type: ignore[arg-type]
    assert not report.valid and report.structure is None
    assert [c.name for c in report.checks] == CHECK_NAMES
    assert report.check("parses").reason
    assert all(c.reason == "skipped: CIF did not parse" for c in report.checks[1:])


def test_truncated_cif(rutile):
    report = check_cif(rutile[: rutile.index(" O O1")])  # the O site is missing
    assert not report.valid
    assert not report.check("formula_consistency").passed or not report.check("multiplicity").passed


def test_huge_numbers_in_a_parsable_cif(rutile):
    report = check_cif(rutile.replace("_cell_length_c 2.9590", "_cell_length_c 1e300"))
    assert not report.valid and report.failed_reasons
    report = check_cif(rutile.replace(" O O1 4 ", " O O1 400000000000000000000 "))
    assert not report.check("multiplicity").passed


ZERO_ANGLE_CIF = """data_NaCl
_symmetry_space_group_name_H-M 'P 1'
_cell_length_a 4.0
_cell_length_b 4.0
_cell_length_c 4.0
_cell_angle_alpha 0.0000
_cell_angle_beta 90
_cell_angle_gamma 90
_chemical_formula_structural NaCl
_chemical_formula_sum 'Na1 Cl1'
loop_
 _symmetry_equiv_pos_site_id
 _symmetry_equiv_pos_as_xyz
  1  'x, y, z'
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_symmetry_multiplicity
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
  Na  Na0  1  0.0000  0.0000  0.0000  1
  Cl  Cl1  1  0.5000  0.5000  0.5000  1
"""


@pytest.mark.parametrize("alpha", ["0.0000", "180.0000", "-90", "nan"])
def test_impossible_angle_never_reaches_spglib(alpha):
    """Used to segfault the process inside spglib (issue 9): now the native checks are skipped."""
    report = check_cif(ZERO_ANGLE_CIF.replace("_cell_angle_alpha 0.0000", f"_cell_angle_alpha {alpha}"))
    assert not report.valid
    if report.structure is not None:
        assert "is outside 10–170°" in report.check("sane_cell").reason
        assert report.check("space_group").reason == "skipped: cell is not sane"
        assert report.check("bond_lengths").reason == "skipped: cell is not sane"


@pytest.mark.parametrize("matrix, expected", [
    ([[4, 0, 0], [0, 4, 0], [0, 0, -4]], "left-handed or flat"),
    ([[4, 0, 0], [4, 0.01, 0], [0, 0, 4]], "outside 10–170°"),
    ([[4, 0, 0], [0, 4, 0], [0, 0, float("nan")]], "non-finite"),
    ([[4, 0, 0], [0, 4, 0], [0, 0, 5000]], "outside 0.5–1000 Å"),
    (Lattice.from_parameters(4, 4, 4, 119.999, 119.999, 119.999).matrix, "nearly flat"),
])
def test_structure_problem_names_the_fault(matrix, expected):
    from crystallm_core.chem.judges.validity import structure_problem

    structure = Structure(Lattice(matrix), ["Na"], [[0, 0, 0]])
    assert expected in structure_problem(structure)


def test_sane_structure_has_no_problem(rutile):
    from crystallm_core.chem.judges.validity import structure_problem

    assert structure_problem(check_cif(rutile).structure) is None
