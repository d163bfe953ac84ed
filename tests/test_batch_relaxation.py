"""Batched CHGNet relaxation (chem/judges/batch_relaxation.py) against one at a time, and best-of-K picks."""
from __future__ import annotations

import pytest
from prototypes import diamond_si, rocksalt_nacl, rutile_tio2
from pymatgen.core import Lattice, Structure
from run_samples import candidate

from crystallm_core.chem.judges.batch_relaxation import relax_batch
from crystallm_core.chem.judges.relaxation import relax_and_check_many
from crystallm_core.chem.judges.stability import RelaxSettings, relax_structure
from crystallm_core.product import best_of
from crystallm_core.product.run import Run, Scores

ENERGY_TOLERANCE = 0.002  # eV/atom: batched and one-at-a-time final energies (float32 sums in another order)


def strained(structure: Structure, strain: float) -> Structure:
    structure.apply_strain(strain)
    return structure


def small_set() -> list[Structure]:
    return [strained(rocksalt_nacl(), -0.05), strained(rutile_tio2(), 0.03), strained(diamond_si(), -0.02)]


def test_batched_and_one_at_a_time_relaxations_agree():
    settings = RelaxSettings(max_steps=40, max_seconds=1e6)
    alone = [relax_structure(s, settings) for s in small_set()]
    together = relax_batch(small_set(), settings)
    for a, b in zip(alone, together):
        assert b.energy_per_atom == pytest.approx(a.energy_per_atom, abs=ENERGY_TOLERANCE)
        assert b.converged == a.converged and abs(b.steps - a.steps) <= 2
        assert b.structure.volume == pytest.approx(a.structure.volume, rel=1e-3)
        assert b.structure.get_space_group_info(0.1)[0] == a.structure.get_space_group_info(0.1)[0]


def test_batched_relaxation_reads_every_step_in_one_forward(monkeypatch):
    """No structure falls back to a CHGNet call of its own: each step's readings come from the batch."""
    from chgnet.model.dynamics import CHGNetCalculator

    def alone(*args, **kwargs):
        raise AssertionError("a structure was read on its own")

    monkeypatch.setattr(CHGNetCalculator, "calculate", alone)
    results = relax_batch(small_set(), RelaxSettings(max_steps=5))
    assert all(r.steps >= 1 for r in results)


def test_a_structure_that_cannot_be_relaxed_gets_its_reason_and_the_others_relax():
    isolated = Structure(Lattice.cubic(12.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # 10 Å apart
    results = relax_and_check_many([strained(rocksalt_nacl(), -0.05), isolated], RelaxSettings(max_steps=20))
    assert results[0].validity.valid and results[0].after.e_hull is not None
    assert isinstance(results[1], str) and results[1]


def picked_run() -> Run:
    """Four samples at target 2 eV: a hit on the hull, a hit far above it, a miss, an invalid one."""
    candidates = [candidate(0, rocksalt_nacl(), 2.0), candidate(1, rutile_tio2(), 2.0),
                  candidate(2, diamond_si(), 2.0), candidate(3, None, 2.0)]
    readings = [(2.1, 0.0), (1.9, 0.6), (0.4, 0.0)]
    for c, (gap, hull) in zip(candidates, readings):
        c.scores = Scores(band_gap_pred=gap, band_gap_std=0.2, p_metal=0.05, e_hull_pred=hull, novel=True)
    return Run(candidates, requests=[{"band_gap": 2.0}], settings={"hit_tolerance": 0.5},
               generation=[{"n_finished": 4}])


def test_pick_keeps_the_best_within_tolerance_and_says_when_there_are_fewer():
    run = picked_run()
    summary = best_of.pick(run, run.candidates, keep=3, band_gap_target=2.0)
    assert [c.pick["picked"] for c in run.candidates] == [True, True, False, False]  # the miss is not padded in
    assert summary["within_tolerance"] == 2 and summary["picked"] == 2 and summary["sampled"] == 4
    assert "2 of 4 samples were within the tolerance" in best_of.shortfall_note(summary)
    frame = run.to_frame()
    assert frame["score"][0] > frame["score"][1] > 0 and frame["picked_from"].tolist() == [4] * 4


def test_finish_relaxes_only_the_picks_together_and_rescores_them():
    run = picked_run()
    run.candidates[0].structure = strained(rocksalt_nacl(), -0.04)  # something to relax

    class Request:
        keep_best, band_gap, relax = 1, 2.0, True

    class Scorer:
        def score(self, structures):
            return [{"band_gap_pred": 2.2, "e_hull_pred": 0.01} for _ in structures]

    best_of.finish(run, run.candidates, Request, Scorer())
    relaxed = [c for c in run.candidates if any(r["kind"] == "relax" for r in c.repairs)]
    assert [c.index for c in relaxed] == [0] and run.generation[-1]["best_of"]["picked"] == 1
    [repair] = relaxed[0].repairs
    assert repair["valid"] and repair["cif"] and repair["details"]["scores_after"]["band_gap_pred"] == 2.2
    assert run.to_frame()["e_hull_relaxed"][0] == pytest.approx(repair["details"]["e_hull_after"])


def test_a_reading_that_fails_in_the_batch_fails_only_its_structure(monkeypatch):
    from crystallm_core.chem.judges import batch_relaxation

    real = batch_relaxation.efs_readings

    def fails_for_silicon(model, graphs):
        if any(g.composition == "Si8" for g in graphs):
            raise RuntimeError("no reading")
        return real(model, graphs)

    monkeypatch.setattr(batch_relaxation, "efs_readings", fails_for_silicon)
    results = relax_batch(small_set(), RelaxSettings(max_steps=3))
    assert [isinstance(r, str) for r in results] == [False, False, True] and "no reading" in results[2]


def test_batched_relaxation_works_inside_a_callers_inference_mode():
    import torch

    with torch.inference_mode():
        results = relax_batch(small_set()[:1], RelaxSettings(max_steps=3))
    assert not isinstance(results[0], str) and results[0].steps >= 1
