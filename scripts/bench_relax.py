"""Batched vs one-at-a-time CHGNet relaxation: structures per minute, side by side in one run.

    OMP_NUM_THREADS=1 python scripts/bench_relax.py [--n 16] [--max-steps 100] [--threads 1]
        [--optimizer BFGS] [--baseline-optimizer FIRE] [--processes N]

The same `--n` structures are relaxed twice with the same bounds (space group kept): by default
the first valid structures the shipped model writes at the app's default targets (what the
Generate page relaxes; seed 1), or with `--prototypes` small prototypes strained by -6 … +6 %
in volume (they converge in a few steps, so fixed per-structure costs dominate). One at a
time with `stability.relax_structure` (one CHGNet forward per structure per FIRE step), and
together with `batch_relaxation.relax_batch` (one forward per step for all of them). Prints
both rates, their ratio (wall clock, and CPU time of this process, which other load on a
shared machine disturbs less), and the largest final-energy difference between the two.
`--baseline-optimizer` relaxes the one-at-a-time side with another optimiser (FIRE: what every
relaxation used before BFGS), so the ratio also counts the steps the better optimiser saves.
A third side is what the product runs (`relaxation_workers.relax_on_cores`): the batch handed
out in chunks to `--processes` processes (default: one per core), the worker
processes started (and CHGNet loaded there) before its clock starts, as in a running app; the
start is timed apart. The batched-in-one-process side shows what batching alone buys.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from pymatgen.core import Lattice, Structure

from crystallm_core.chem.judges.batch_relaxation import relax_batch
from crystallm_core.chem.judges.relaxation_workers import default_processes, relax_on_cores
from crystallm_core.chem.judges.stability import RelaxSettings, load_chgnet, relax_structure

PROTOTYPES = [  # (space group, lattice, species, coordinates)
    ("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    ("Fd-3m", Lattice.cubic(5.43), ["Si"], [[0, 0, 0]]),
    ("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"], [[0, 0, 0], [0.3048, 0.3048, 0]]),
    ("Pm-3m", Lattice.cubic(3.905), ["Sr", "Ti", "O"], [[0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0, 0]]),
    ("P6_3mc", Lattice.hexagonal(3.25, 5.207), ["Zn", "O"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.382]]),
    ("Fm-3m", Lattice.cubic(3.615), ["Cu"], [[0, 0, 0]]),
    ("Fm-3m", Lattice.cubic(4.21), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    ("F-43m", Lattice.cubic(5.65), ["Ga", "As"], [[0, 0, 0], [0.25, 0.25, 0.25]]),
]


def strained_prototypes(n: int) -> list[Structure]:
    """n structures: the prototypes in turn, each copy with another volume strain."""
    structures = []
    for i in range(n):
        group, lattice, species, coords = PROTOTYPES[i % len(PROTOTYPES)]
        structure = Structure.from_spacegroup(group, lattice, species, coords)
        strain = -0.06 + 0.12 * ((i * 5) % n) / max(n - 1, 1)
        structure.scale_lattice(structure.volume * (1 + strain))
        structures.append(structure)
    return structures


def generated_structures(n: int, seed: int) -> list[Structure]:
    """The first n valid structures of the shipped model at the app's default targets."""
    from crystallm_core.lm.checkpoints import load_model
    from crystallm_core.product.generation import GenerationRequest, generate, sample_counts

    run = generate(load_model(), GenerationRequest(**sample_counts(n, until_valid=True), seed=seed))
    return [c.structure for c in run.candidates if c.valid][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="structures relaxed in each mode")
    parser.add_argument("--max-steps", type=int, default=RelaxSettings.max_steps)
    parser.add_argument("--prototypes", action="store_true", help="strained prototypes instead of generated structures")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--optimizer", default=RelaxSettings.optimizer, choices=["BFGS", "FIRE"])
    parser.add_argument("--baseline-optimizer", choices=["BFGS", "FIRE"], help="one at a time (default: --optimizer)")
    parser.add_argument("--processes", type=int, default=default_processes(), help="processes of the on-cores side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # steps bound both: a fair comparison
    settings = RelaxSettings(max_steps=args.max_steps, max_seconds=1e9, optimizer=args.optimizer)
    baseline = replace(settings, optimizer=args.baseline_optimizer or args.optimizer)
    structures = strained_prototypes(args.n) if args.prototypes else generated_structures(args.n, args.seed)
    load_chgnet()  # loaded before either clock starts
    relax_structure(structures[0].copy(), RelaxSettings(max_steps=2))  # warm both paths once
    relax_batch([structures[0].copy()], RelaxSettings(max_steps=2))
    started = time.perf_counter()
    relax_on_cores([s.copy() for s in structures[:2 * args.processes]], RelaxSettings(max_steps=1),
                   processes=args.processes)  # start the workers, as a running app has them
    start_seconds = time.perf_counter() - started

    def timed(relax):
        started, cpu = time.perf_counter(), time.process_time()
        results = relax()
        return results, time.perf_counter() - started, time.process_time() - cpu

    alone, alone_seconds, alone_cpu = timed(lambda: [relax_structure(s.copy(), baseline) for s in structures])
    together, batch_seconds, batch_cpu = timed(lambda: relax_batch([s.copy() for s in structures], settings,
                                                                   batch_size=args.n))
    on_cores, cores_seconds, _ = timed(lambda: relax_on_cores([s.copy() for s in structures], settings,
                                                              batch_size=args.n, processes=args.processes))

    failed = [r for r in together + on_cores if isinstance(r, str)]
    if failed:
        raise SystemExit(f"batched relaxation failed: {failed}")
    print(f"{len(structures)} structures, max {args.max_steps} steps, {args.threads} torch thread(s)")
    rate_alone = len(structures) / alone_seconds * 60
    print(f"one at a time ({baseline.optimizer}): {alone_seconds:6.1f} s, {rate_alone:6.1f} structures/min, "
          f"{sum(r.steps for r in alone)} steps, {sum(r.converged for r in alone)} converged")
    for name, results, seconds in ((f"batched ({settings.optimizer}), one process", together, batch_seconds),
                                   (f"batched ({settings.optimizer}), {args.processes} processes (the product)",
                                    on_cores, cores_seconds)):
        rate = len(structures) / seconds * 60
        differences = np.array([b.energy_per_atom - a.energy_per_atom for a, b in zip(alone, results)]) * 1000
        print(f"{name}: {seconds:6.1f} s, {rate:6.1f} structures/min, {sum(r.steps for r in results)} steps, "
              f"{sum(r.converged for r in results)} converged; ratio to one at a time {rate / rate_alone:.2f}x "
              f"(wall clock); final energy minus one at a time: median {np.median(differences):+.2f}, largest "
              f"|difference| {np.abs(differences).max():.2f} meV/atom, lower in {(differences < -0.5).sum()}, "
              f"higher in {(differences > 0.5).sum()} of {len(differences)}")
    print(f"CPU seconds of this process (less sensitive to other load on a shared machine): one at a time "
          f"{alone_cpu:.1f}, batched in one process {batch_cpu:.1f}, ratio {alone_cpu / batch_cpu:.2f}x")
    print(f"worker processes started (once per server process, before the clocks): {start_seconds:.1f} s")

if __name__ == "__main__":
    main()
