"""Atoms piled on top of each other never reach CHGNet, spglib or CrystalNN, and a folder of such
CIFs stays within a few GB through `evaluate` and the app's upload paths (issue 24)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from app_server import children, proc_kib
from prototypes import all_prototypes, rocksalt_nacl, rutile_tio2
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from crystallm_core.chem.judges.crowding import CrowdingLimits, chgnet_problem, crowding_problem, graph_size
from fuzz_corpus import crowded_cifs
from crystallm_core.chem.judges.stability import graph_batches
from crystallm_core.chem.judges.validity import check_cif, structure_problem

REPO = Path(__file__).resolve().parents[1]
PEAK_BOUND_GB = 3.0  # the whole process tree; the P2_1/c file alone took 3.7 GB before the guard
SAFETY_NET = 8 * 1024 ** 3  # address-space limit of the measured process, should the guard ever fail

EXPECTED = {  # corpus name -> a part of the reason the scorer gives
    "P2_1/c, 21 rows its operators pile into two clumps": "Å apart (< 0.5 Å)",
    "rock salt with 6 more Na 0.11 Å around each Na (Structure.from_spacegroup)": "0.11 Å apart (< 0.5 Å)",
    "125 atoms 0.55 Å apart in one clump (nearly overlapping)": "neighbours within 3 Å (limit 100)",
    "a 1.3 Å grid of 64 atoms (56 neighbours within 3 Å each)": "too large to score: 200,704 pairs of bonds",
    "27 atoms in 27 Å³ (1 atom/Å³)": "1.00 atoms/Å³, denser than any solid",
    "1,728 atoms 0.55 Å apart in a 40 Å cell": "neighbours within 3 Å (limit 100)",
}


def crowded_structures() -> dict[str, Structure]:
    return {name: Structure.from_str(cif, fmt="cif") for name, cif in crowded_cifs().items()}


def test_each_crowded_structure_is_refused_with_its_reason():
    from crystallm_core.chem.judges.scoring import StructureScorer

    scorer = StructureScorer(stability=False, novelty=False, surrogate=False, max_sites=2000)
    structures = crowded_structures()
    assert set(structures) == set(EXPECTED)
    for name, structure in structures.items():
        assert EXPECTED[name] in (scorer.problem(structure) or ""), name


def test_real_crystals_pass_the_crowding_guard():
    for name, structure in all_prototypes().items():
        assert crowding_problem(structure) is None, name
    big = rocksalt_nacl()
    big.make_supercell([2, 2, 3])  # 96 sites: below the budget of one structure
    assert crowding_problem(big) is None
    assert graph_size(big).bond_pairs < CrowdingLimits().max_bond_pairs and chgnet_problem(big) is None


def test_a_big_fair_cell_is_sane_but_too_large_for_one_chgnet_pass():
    from fuzz_corpus import copper_supercell
    from crystallm_core.chem.judges.relaxation import relax_and_check
    from crystallm_core.chem.judges.scoring import StructureScorer

    cell = copper_supercell(5, jitter=0.15)  # 500 sites, 72,000 bond pairs
    assert structure_problem(cell) is None
    assert "too large to score: 72,000 pairs of bonds within 3 Å" in chgnet_problem(cell)
    scorer = StructureScorer(stability=False, novelty=False, surrogate=False, max_sites=1000)
    assert scorer.problem(cell).startswith("too large to score")
    with pytest.raises(ValueError, match="cannot relax this structure: too large to score"):
        relax_and_check(cell)


def test_validity_fails_sane_cell_and_skips_the_native_checks():
    report = check_cif(crowded_cifs()["125 atoms 0.55 Å apart in one clump (nearly overlapping)"])
    assert "too crowded for CHGNet's bond graph" in report.check("sane_cell").reason
    assert report.check("space_group").reason == report.check("bond_lengths").reason == "skipped: cell is not sane"


def test_chgnet_batches_stay_within_one_structure_budget():
    cell = Structure(Lattice.cubic(2.0), ["Cu"], [[0, 0, 0]])  # 18 neighbours within 3 Å: 324 bond pairs per atom
    cell.make_supercell([3, 3, 4])  # 36 sites, 11,664 bond pairs
    structures = [cell] * 7 + [rutile_tio2()] * 3
    batches = graph_batches(structures, batch_size=4)
    assert sorted(i for batch in batches for i in batch) == list(range(10))
    assert all(len(batch) <= 4 for batch in batches)
    budget = CrowdingLimits().max_bond_pairs
    assert all(sum(graph_size(structures[i]).bond_pairs for i in batch) <= budget for batch in batches)
    assert [len(b) for b in batches[:2]] == [3, 3]  # three of the big cells fit, a fourth would not


def peak_tree_rss(command: list[str], env: dict, timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    """Run `command`; its output and the peak resident memory (GB) of it and its children, sampled
    every 50 ms (and the main process's own kernel-recorded peak)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (SAFETY_NET, SAFETY_NET))

    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=cap)
    peak, deadline = 0, time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        peak = max(peak, sum(proc_kib(pid, "VmRSS") for pid in [process.pid, *children(process.pid)]),
                   proc_kib(process.pid, "VmHWM"))
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.time()))
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), peak / 1024 ** 2


@pytest.fixture
def hostile_folder(tmp_path):
    folder = tmp_path / "data" / "hostile"
    folder.mkdir(parents=True)
    for k, cif in enumerate(crowded_cifs().values()):
        (folder / f"{k:02d}_crowded.cif").write_text(cif)
    (folder / "90_NaCl.cif").write_text(str(CifWriter(rocksalt_nacl())))  # a fair structure: scored
    (folder / "91_TiO2.cif").write_text(str(CifWriter(rutile_tio2(), symprec=0.1)))
    return folder


def child_env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def test_evaluate_of_a_hostile_folder_stays_bounded_and_gives_every_file_a_row(hostile_folder):
    result, peak_gb = peak_tree_rss([sys.executable, "-m", "crystallm_core", "evaluate", str(hostile_folder),
                                     "--no-novelty"], child_env())
    print(f"evaluate: peak RSS of the process tree {peak_gb:.2f} GB")
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(hostile_folder / "evaluation.csv").set_index("file")
    assert len(table) == len(crowded_cifs()) + 2
    for k in range(len(crowded_cifs())):
        assert str(table.loc[f"{k:02d}_crowded.cif", "notes"]).startswith("not scored: ")
    assert table.loc["90_NaCl.cif", "e_form_pred"] < 0  # CHGNet still scores the fair ones
    assert peak_gb < PEAK_BOUND_GB


def test_the_app_upload_paths_stay_bounded_on_a_hostile_folder(hostile_folder, short_model_dir, tmp_path):
    env = child_env(CRYSTALLM_DATA_ROOTS=str(tmp_path / "data"), CRYSTALLM_MODEL_DIR=str(short_model_dir),
                    CRYSTALLM_HISTORY_DB=str(tmp_path / "history.sqlite"), CRYSTALLM_MODEL_ROOTS=str(tmp_path))
    result, peak_gb = peak_tree_rss([sys.executable, str(REPO / "tests" / "hostile_app_session.py"),
                                     str(hostile_folder)], env)
    print(f"app upload paths: peak RSS of the process tree {peak_gb:.2f} GB")
    assert result.returncode == 0, result.stderr[-2000:]
    said = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(said["explore"]) == len(crowded_cifs()) + 2
    for name, page in said["explore"].items():
        assert not page["exception"], (name, page["exception"])
    assert not said["evaluate_exception"] and not said["evaluate_errors"]
    rows = {row["file"]: row for row in said["evaluate_rows"]}
    assert len(rows) == len(crowded_cifs()) + 2
    for k in range(len(crowded_cifs())):
        assert any(note.startswith("not scored: ") for note in rows[f"{k:02d}_crowded.cif"]["notes"])
    assert peak_gb < PEAK_BOUND_GB


def test_the_guard_stays_small_in_a_huge_sparse_cell():
    """pymatgen's cell list grows with (box / radius)³: a 0.5 Å search in a 900 Å cell would take ~20 GB."""
    from crystallm_core.chem.judges.crowding import MAX_SEARCH_CUBES, neighbour_list, search_radius

    sparse = Structure(Lattice.cubic(900), ["Na", "Cl", "Na"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.0004, 0, 0]])
    radius = search_radius(sparse, 0.5)
    assert radius > 0.5 and (450 / radius + 3) ** 3 <= MAX_SEARCH_CUBES  # the sites span 450 Å
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    centres, _, _, distances = neighbour_list(sparse, 0.5)
    assert sorted(distances.round(2).tolist()) == [0.36, 0.36]  # the two Na, each seen from the other
    assert "0.36 Å apart" in crowding_problem(sparse)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500 * 1024  # KiB: well under 0.5 GB
