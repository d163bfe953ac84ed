"""Relaxation on every core (chem/judges/relaxation_workers.py): chunks handed to worker processes,
the same results as one batch; a structure that kills its worker gets a reason and the others
their relaxation, and nothing is relaxed in this process unless no worker can start."""
from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
from prototypes import diamond_si, rocksalt_nacl, rutile_tio2
from pymatgen.core import Structure

from crystallm_core.chem.judges import relaxation_workers
from crystallm_core.chem.judges.batch_relaxation import relax_batch
from crystallm_core.chem.judges.isolation import Outcome
from crystallm_core.chem.judges.relaxation_workers import guided_chunks, relax_on_cores
from crystallm_core.chem.judges.stability import Relaxation, RelaxSettings

ENERGY_TOLERANCE = 0.002  # eV/atom, as tests/test_batch_relaxation.py


def strained_set() -> list[Structure]:
    structures = [rocksalt_nacl(), rutile_tio2(), diamond_si(), rocksalt_nacl()]
    for structure, strain in zip(structures, (-0.05, 0.03, -0.02, 0.04)):
        structure.apply_strain(strain)
    return structures


def test_guided_chunks_shrink_and_keep_every_index():
    sizes = [12, 2, 6, 6, 2, 8, 4, 4, 10, 1]
    structures = [Structure.from_spacegroup("Pm-3m", [[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]], ["Na"], [[0, 0, 0]])
                  for _ in sizes]
    for structure, n in zip(structures, sizes):
        structure.make_supercell([n, 1, 1])
    chunks = guided_chunks(structures, 2)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(sizes)))
    assert [len(chunk) for chunk in chunks] == [3, 2, 2, 1, 1, 1]  # a quarter of what is left, rounded up
    assert chunks[0] == [0, 5, 8]  # the largest first
    assert guided_chunks(structures[:1], 3) == [[0]]


def test_two_processes_relax_like_one_batch():
    settings = RelaxSettings(max_steps=30, max_seconds=1e6)
    together = relax_batch(strained_set(), settings)
    on_cores = relax_on_cores(strained_set(), settings, processes=2)
    assert len(on_cores) == len(together)
    for a, b in zip(together, on_cores):
        assert isinstance(b, Relaxation)
        assert b.energy_per_atom == pytest.approx(a.energy_per_atom, abs=ENERGY_TOLERANCE)
        assert b.steps == a.steps and b.converged == a.converged
        assert b.structure.composition == a.structure.composition


class PoisonedWorker:
    """Dies on any call that holds a silicon structure (as a worker would on one that took 4 GB);
    relaxes every other call as a worker would."""

    def __init__(self):
        self.calls: list[int] = []

    def call(self, argument, time_limit=None):
        structures, settings, batch_size = argument
        self.calls.append(len(structures))
        if any(s.composition.reduced_formula == "Si" for s in structures):
            return Outcome(None, "crashed (signal 9: SIGKILL)")
        return Outcome(relax_batch(structures, settings, batch_size), None)


class UnstartableWorker:
    def call(self, argument, time_limit=None):
        raise RuntimeError("the checker process could not start")


def relaxed_here_recorder(monkeypatch) -> list[str]:
    """The formulas relax_on_cores relaxes in this process."""
    here: list[str] = []

    def recording(structures, settings, batch_size=16):
        here.extend(s.composition.reduced_formula for s in structures)
        return relax_batch(structures, settings, batch_size)

    monkeypatch.setattr(relaxation_workers, "relax_batch", recording)
    return here


def test_a_structure_that_kills_its_worker_gets_a_reason_and_never_runs_here(monkeypatch):
    poisoned = PoisonedWorker()
    monkeypatch.setattr(relaxation_workers, "worker", lambda i: poisoned)
    here = relaxed_here_recorder(monkeypatch)
    monkeypatch.setattr(relaxation_workers, "guided_chunks", lambda structures, processes: [[0, 1, 2, 3]])

    @contextmanager
    def after_the_worker_took_the_chunk():  # else this process may take the one chunk first
        deadline = time.monotonic() + 30
        while not poisoned.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        yield

    monkeypatch.setattr(relaxation_workers, "one_thread", after_the_worker_took_the_chunk)
    results = relax_on_cores(strained_set(), RelaxSettings(max_steps=5), processes=2)
    assert results[2] == "relaxation stopped: the worker crashed (signal 9: SIGKILL)"
    assert all(isinstance(results[i], Relaxation) and results[i].steps >= 1 for i in (0, 1, 3))
    assert poisoned.calls == [4, 1, 1, 1, 1]  # the chunk, then each structure alone
    assert here == []


def test_chunks_are_relaxed_here_when_no_worker_can_start(monkeypatch):
    monkeypatch.setattr(relaxation_workers, "worker", lambda i: UnstartableWorker())
    results = relax_on_cores(strained_set(), RelaxSettings(max_steps=5), processes=2)
    assert all(isinstance(r, Relaxation) and r.steps >= 1 for r in results)
    assert [len(r.structure) for r in results] == [len(s) for s in strained_set()]


def test_one_structure_or_one_process_stays_in_this_process(monkeypatch):
    def no_worker(i):
        raise AssertionError("a worker was used")

    monkeypatch.setattr(relaxation_workers, "worker", no_worker)
    assert isinstance(relax_on_cores(strained_set()[:1], RelaxSettings(max_steps=2), processes=4)[0], Relaxation)
    assert len(relax_on_cores(strained_set(), RelaxSettings(max_steps=2), processes=1)) == 4
