"""Training-format CIFs and repair of generated text."""
from __future__ import annotations

import warnings

import pytest
from prototypes import all_prototypes, rutile_tio2
from pymatgen.core import Composition, Structure

from crystallm_core.chem.cif.cif_format import (
    atom_type_loop,
    repair_generated_cif,
    repair_numbers,
    structure_to_model_cif,
    training_text,
)
from crystallm_core.lm.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def rutile_cif() -> str:
    return structure_to_model_cif(rutile_tio2())


def parse(cif: str) -> Structure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(cif, fmt="cif")


def test_model_cif_layout(rutile_cif):
    lines = rutile_cif.splitlines()
    assert lines[0] == "data_[Ti2O4]"
    assert lines[1:7] == ["loop_", " _atom_type_symbol", " _atom_type_electronegativity",
                          " _atom_type_radius", " _atom_type_ionic_radius", "["]
    assert lines[7].split() == ["Ti", "1.5400", "1.4000", "0.8517"]  # sorted by electronegativity
    assert lines[8].split() == ["O", "3.4400", "0.6000", "1.2600"]
    assert lines[9] == "]"
    assert lines[10] == "_symmetry_space_group_name_H-M [P4_2/mnm]"
    assert "_cell_length_a [4.5940]" in lines and "_cell_angle_alpha [90.0000]" in lines
    assert "_chemical_formula_sum '[Ti2 O4]'" in lines
    assert "_chemical_formula_structural [TiO2]" in lines and "_cell_formula_units_Z [2]" in lines
    # symmetry loop reduced to the identity, without brackets
    i = lines.index(" _symmetry_equiv_pos_as_xyz")
    assert lines[i + 1].split() == ["1", "'x,", "y,", "z'"] and lines[i + 2] == "loop_"
    assert lines[-4] == "[" and lines[-1] == "]"
    assert lines[-3].split() == ["Ti", "Ti0", "2", "0.0000", "0.0000", "0.0000", "1"]
    assert not rutile_cif.startswith("<bos>") and "#" not in rutile_cif


def test_training_text_wraps_in_bos_eos(rutile_cif):
    assert training_text(rutile_cif) == f"<bos>\n{rutile_cif}\n<eos>"


def test_atom_type_loop_for_prompts():
    loop = atom_type_loop("SiO2")
    assert loop.splitlines()[-4:] == ["[", "  Si  1.9000  1.1000  0.5400", "  O  3.4400  0.6000  1.2600", "]"]
    assert atom_type_loop(Composition("O2Si")) == loop
    assert "4.16" in atom_type_loop("He")  # noble-gas fallback (Allen electronegativity)


def test_single_atom_cell_and_symmetry_free_structure():
    from pymatgen.core import Lattice
    low_symmetry = Structure(Lattice([[4, 0.3, 0], [0.2, 5, 0.1], [0.4, 0, 6]]), ["Li", "F"],
                             [[0, 0, 0], [0.37, 0.21, 0.44]])
    cif = structure_to_model_cif(low_symmetry)
    assert "_symmetry_space_group_name_H-M [P1]" in cif
    get_tokenizer().encode(training_text(cif))


def test_rejects_disordered_structure():
    disordered = rutile_tio2()
    disordered.replace_species({"Ti": {"Ti": 0.5, "Zr": 0.5}})
    with pytest.raises(ValueError, match="partial occupancies"):
        structure_to_model_cif(disordered)


@pytest.mark.parametrize("name", list(all_prototypes()))
def test_round_trip_through_model_text_and_repair(name):
    structure = all_prototypes()[name]
    tokenizer = get_tokenizer()
    raw = tokenizer.decode(tokenizer.encode(training_text(structure_to_model_cif(structure))),
                           skip_special_tokens=False)
    result = repair_generated_cif(raw + "Ti O <pad><pad>")  # junk after <eos> is cut
    assert result.ok, result.reason
    assert "[" not in result.cif and "_atom_type_" not in result.cif
    parsed = parse(result.cif)
    assert parsed.composition == structure.composition
    assert parsed.lattice.abc == pytest.approx(structure.lattice.abc, abs=1e-3)


def test_repair_rebuilds_symmetry_operators(rutile_cif):
    result = repair_generated_cif(rutile_cif)
    assert result.ok
    assert "\n  1 'x, y, z'\n" in result.cif and "\n  16 '" in result.cif and "\n  17 '" not in result.cif
    assert len(parse(result.cif)) == 6


def test_repair_numbers():
    assert repair_numbers("a 3.6.69\nb 0.\nc .12\nd -.5\ne 1.25") == "a 3.669\nb 0.0\nc 0.12\nd -0.5\ne 1.25"


@pytest.mark.parametrize("mangle, reason", [
    (lambda c: c.replace("_symmetry_space_group_name_H-M [P4_2/mnm]", ""), "no space group symbol"),
    (lambda c: c.replace("[P4_2/mnm]", "[P7]"), "unknown space group 'P7'"),
    (lambda c: c[: c.index("loop_\n _atom_site_type_symbol")], "truncated: no atom sites"),
    (lambda c: c[: c.index("  Ti  Ti0")], "truncated: no atom sites"),
    (lambda c: c.replace("_cell_length_c [2.9590]\n", ""), "truncated: missing _cell_length_c"),
    (lambda c: "garbage", "no data_ line"),
    (lambda c: "", "no data_ line"),
    (lambda c: c.replace("Ti0", "Ti<unk>"), "contains <unk> tokens"),
])
def test_repair_gives_reasons(rutile_cif, mangle, reason):
    result = repair_generated_cif(mangle(rutile_cif))
    assert result.cif is None and result.reason == reason


def test_repair_never_raises():
    for text in [None, 42, "data_\n_symmetry_space_group_name_H-M", "data_x\x00\n" * 3]:
        result = repair_generated_cif(text)  # type: ignore[arg-type]
        assert result.cif is None and result.reason
