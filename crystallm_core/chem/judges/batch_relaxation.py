"""Relax many structures together: one CHGNet forward for the whole batch at each optimiser step.

`stability.relax_structure` relaxes one structure: ASE's BFGS (or FIRE) over a (fast) FrechetCellFilter, with
FixSymmetry keeping the written space group, CHGNet called once per step. On a CPU most of
that call is fixed cost (Python, small tensor ops), so relaxing 16 structures one at a time pays
it 16 times per step. Here every structure keeps its own ASE Atoms, constraint, filter and
optimiser state (so each one follows exactly the steps it would follow alone), and the optimisers
advance in lockstep: all still-running structures take their step, then ONE batched CHGNet
forward reads energies, forces and stresses at the new geometries and fills each one's
calculator cache. A structure that converges (or fails) leaves the batch (its mask goes off);
the rest go on until they converge or hit the step / time bound.

Where a structure's cached reading does not match its geometry (the optimisers never ask for that, but
a constraint might), ASE simply computes it alone: results stay right, only slower.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pymatgen.core import Structure

from crystallm_core.chem.judges.stability import (
    Relaxation,
    RelaxSettings,
    chgnet_graph,
    efs_readings,
    load_chgnet,
    make_optimizer,
    one_blas_thread,
    quiet_chgnet,
)


@dataclass
class RelaxingStructure:
    """One structure of the batch: its ASE atoms, optimiser and where it stands."""

    atoms: object  # ase.Atoms with a CHGNetCalculator (its cache is filled by the batch)
    optimizer: object  # an ase.optimize optimiser (BFGS or FIRE) over a FastFrechetCellFilter
    steps: int = 0
    converged: bool = False
    error: str | None = None

    @property
    def running(self) -> bool:
        return not self.converged and self.error is None


def start(structure: Structure, settings: RelaxSettings, model) -> RelaxingStructure:
    """The ASE objects `relax_structure` builds for one structure, with their own calculator."""
    from ase.constraints import FixSymmetry
    from chgnet.model.dynamics import CHGNetCalculator
    from pymatgen.io.ase import AseAtomsAdaptor

    from crystallm_core.chem.judges.cell_filter import FastFrechetCellFilter

    atoms = AseAtomsAdaptor.get_atoms(structure)
    if settings.keep_symmetry:
        atoms.set_constraint(FixSymmetry(atoms, symprec=0.1, adjust_positions=True, adjust_cell=True))
    atoms.calc = CHGNetCalculator(model, use_device="cpu", on_isolated_atoms="error")
    return RelaxingStructure(atoms, make_optimizer(FastFrechetCellFilter(atoms), settings))


def plain_structure(atoms) -> Structure:
    """The pymatgen Structure of ASE atoms (AseAtomsAdaptor also converts, and warns about, the
    constraints: not needed for a CHGNet graph)."""
    return Structure(atoms.cell.array, atoms.numbers, atoms.positions, coords_are_cartesian=True)


def batch_or_one_by_one(model, graphs: list) -> list[dict | str]:
    """`efs_readings` of the batch; if it fails, of each graph alone, so one bad structure
    (its failure message in its place) does not stop the others."""
    try:
        return efs_readings(model, graphs)
    except Exception:
        readings = []
        for graph in graphs:
            try:
                readings += efs_readings(model, [graph])
            except Exception as error:
                readings.append(f"{type(error).__name__}: {error}")
        return readings


def read_batch(model, items: list[RelaxingStructure], batch_size: int) -> None:
    """Batched CHGNet readings of `items`' current geometries (`batch_size` per forward), stored
    as each calculator's results, so ASE's get_forces / get_stress / get_potential_energy read
    them for free. A structure whose graph cannot be built (isolated atoms) gets its error."""
    from ase import Atoms

    graphs, readable = [], []
    for item in items:
        try:
            graphs.append(chgnet_graph(model, plain_structure(item.atoms)))
            readable.append(item)
        except Exception as error:
            item.error = f"CHGNet relaxation failed: {error}"
    readings = []
    for first in range(0, len(graphs), batch_size):
        readings += batch_or_one_by_one(model, graphs[first:first + batch_size])
    for item, reading in zip(readable, readings):
        if isinstance(reading, str):
            item.error = f"CHGNet relaxation failed: {reading}"
            continue
        calculator = item.atoms.calc
        energy = reading["e"] * (len(item.atoms) if model.is_intensive else 1)
        calculator.results = {"energy": energy, "free_energy": energy, "forces": reading["f"],
                              "stress": reading["s"] * calculator.stress_weight}
        # the geometry these results belong to (what ASE's check_state compares); Atoms.copy would
        # deep-copy the symmetry constraint at every step, a tenth of the batch's time
        calculator.atoms = Atoms(item.atoms.numbers, item.atoms.positions, cell=item.atoms.cell, pbc=item.atoms.pbc)


def converged(item: RelaxingStructure) -> bool:
    optimizer = item.optimizer
    return bool(optimizer.gradient_converged(optimizer.optimizable.get_gradient()))


def relax_batch(structures: Sequence[Structure], settings: RelaxSettings | None = None,
                batch_size: int = 16) -> list[Relaxation | str]:
    """Relax every structure (positions and cell, space group kept), `batch_size` per CHGNet
    forward; each result is a `Relaxation`, or the reason it failed.

    Bounds are `relax_structure`'s: fmax, max_steps per structure, and max_seconds per
    structure, which the batch spends together (it stops at max_seconds × its size)."""
    settings = settings or RelaxSettings()
    model = load_chgnet()
    started = time.perf_counter()
    items: list[RelaxingStructure | str] = []
    with quiet_chgnet(), one_blas_thread():
        for structure in structures:
            try:
                items.append(start(structure, settings, model))
            except Exception as error:  # e.g. symmetry analysis of a degenerate cell
                items.append(f"CHGNet relaxation failed: {error}")
        relaxing = [item for item in items if isinstance(item, RelaxingStructure)]
        deadline = started + settings.max_seconds * max(len(relaxing), 1)
        read_batch(model, relaxing, batch_size)
        for item in relaxing:
            item.converged = item.error is None and converged(item)
        while True:
            active = [item for item in relaxing if item.running and item.steps < settings.max_steps]
            if not active or time.perf_counter() > deadline:
                break
            for item in active:
                item.optimizer.step()
                item.optimizer.nsteps += 1
                item.steps += 1
            read_batch(model, active, batch_size)
            for item in active:
                if item.error is None:
                    item.converged = converged(item)
        seconds = time.perf_counter() - started
        results: list[Relaxation | str] = []
        for item in items:
            if isinstance(item, str):
                results.append(item)
            elif item.error is not None:
                results.append(item.error)
            else:
                energy = float(item.atoms.get_potential_energy()) / len(item.atoms)
                if not np.isfinite(energy):
                    results.append("CHGNet energy is not finite")
                    continue
                # the batch's wall time, shared evenly: what each structure cost
                results.append(Relaxation(plain_structure(item.atoms), energy, item.steps,
                                          item.converged, seconds / len(items)))
    return results
