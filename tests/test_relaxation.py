"""`relaxation.relax_and_check` and `python -m crystallm_core relax`: real CHGNet on tiny cells."""
from __future__ import annotations

import pytest
from prototypes import rocksalt_nacl
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from crystallm_core.chem.judges import stability
from crystallm_core.chem.judges.relaxation import relax_and_check
from crystallm_core.chem.judges.structure_info import parse_cif
from crystallm_core.product.cli import main


def compressed_nacl() -> Structure:
    structure = rocksalt_nacl()
    structure.apply_strain(-0.06)  # 6 % too small in every direction
    return structure


def test_relaxation_expands_a_compressed_cell_within_its_space_group():
    report = relax_and_check(compressed_nacl())
    assert report.relaxation.converged and report.relaxation.steps >= 1
    assert report.volume_change > 0.1  # (1/0.94)^3 - 1 = 20 % if it relaxes back fully
    assert report.after.e_total_per_atom < report.before.e_total_per_atom
    assert report.spacegroup_before == "Fm-3m" and report.validity.spacegroup == "Fm-3m"
    assert report.validity.valid and parse_cif(report.cif).composition.reduced_formula == "NaCl"
    rows = {row["quantity"]: row for row in report.rows()}
    assert rows["space group (symprec 0.1)"] == {"quantity": "space group (symprec 0.1)", "before": "Fm-3m",
                                                 "after": "Fm-3m"}


def test_relaxation_without_symmetry_constraint_also_works():
    settings = stability.RelaxSettings(max_steps=5, keep_symmetry=False)
    report = relax_and_check(compressed_nacl(), settings)
    assert report.relaxation.steps <= 5 and report.after.e_total_per_atom is not None


def test_cli_relax_writes_the_relaxed_cif(tmp_path, capsys):
    source = tmp_path / "nacl.cif"
    source.write_text(str(CifWriter(compressed_nacl())))
    assert main(["relax", str(source)]) == 0
    printed = capsys.readouterr()
    out = printed.out
    assert "relaxing nacl.cif" in printed.err and "step" in printed.err  # a bar over the optimiser steps
    assert "E_hull estimate" in out and "converged" in out
    assert parse_cif((tmp_path / "nacl_relaxed.cif").read_text()).composition.reduced_formula == "NaCl"


@pytest.mark.parametrize("content, argv_extra, message", [
    (None, [], "is not a file"),
    ("data_x\n_cell_length_a 5\n", [], "could not be read"),
    ("ok", ["--max-steps", "0"], "--max-steps must be ≥ 1"),
])
def test_cli_relax_bad_input_is_one_line_exit_2(tmp_path, capsys, content, argv_extra, message):
    source = tmp_path / "in.cif"
    if content is not None:
        source.write_text(str(CifWriter(rocksalt_nacl())) if content == "ok" else content)
    assert main(["relax", str(source), *argv_extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_cli_relax_isolated_atoms_is_a_clear_error(tmp_path, capsys):
    source = tmp_path / "lonely.cif"
    source.write_text(str(CifWriter(Structure(Lattice.cubic(30.0), ["Na"], [[0, 0, 0]]))))
    assert main(["relax", str(source)]) == 2
    assert "CHGNet could not relax lonely.cif" in capsys.readouterr().err
