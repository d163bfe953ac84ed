"""Thermodynamic stability estimates from the CHGNet universal potential.

E_total comes from CHGNet 0.4.2 (pretrained weights ship inside the wheel, so this works
offline on CPU). Formation energy per atom is (E_total - sum_i n_i mu_i) / N against the
MP2020-compatible elemental ground states of Materials Project, and E_hull is measured with
`crystallm_core.chem.data.hull.HullReference`.

The hull holds only MP-20-like phases (MP-20, MPTS-52 and the MP-20 label set), far fewer
than the full Materials Project, so a new structure's E_hull is biased LOW: it may look stable only
because its true competitors are missing. The original paper used MACE single points against
the full MP hull; our default (a static, unrelaxed evaluation) matches its choice of not
relaxing. A short bounded relaxation is available but changes what "stable" means: it judges
the nearest local minimum, not the structure the model wrote.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import time
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch
from pymatgen.core import Composition, Structure
from threadpoolctl import threadpool_limits

from crystallm_core.chem.judges.chgnet_features import ChgnetFeatures, LayerCapture, structure_features
from crystallm_core.chem.judges.crowding import CrowdingLimits, graph_size
from crystallm_core.paths import ASSETS_DIR, data_dir

ELEMENTAL_REFERENCES_PATH = ASSETS_DIR / "elemental_references.json"
REFERENCE_SOURCE = "references/2023-02-07-mp-elemental-reference-entries.json"

HULL_BIAS_NOTE = (
    "E_hull is estimated with CHGNet against a convex hull built only from MP-20-like "
    "phases (MP-20, MPTS-52), not the full Materials Project. Competing phases may "
    "be missing, so the estimate is biased low: treat 'stable' as 'not obviously unstable'."
)


@dataclass
class StabilityEstimate:
    """Energies in eV/atom; None where the step failed (and `error` says why)."""

    e_total_per_atom: float | None
    e_form_per_atom: float | None
    e_hull: float | None
    relaxed: bool
    seconds: float
    error: str | None = None
    features: ChgnetFeatures | None = None  # CHGNet features of the structure as given (static runs only)


@dataclass
class RelaxSettings:
    """Bounds for the optional relaxation: whichever of steps / wall time is hit first stops it."""

    max_steps: int = 100
    max_seconds: float = 30.0
    fmax: float = 0.1  # eV/Å
    keep_symmetry: bool = True  # ASE FixSymmetry (symprec 0.1): relax within the written space group
    # ASE's BFGS: on 48 generated structures 34 % fewer steps than FIRE, every one converged, and
    # final energies equal or lower (median -0.3 meV/atom; model card, "Relaxation: the optimiser")
    optimizer: str = "BFGS"  # or "FIRE"


def make_optimizer(optimizable, settings: RelaxSettings):
    """The ASE optimiser `settings` names, over `optimizable` (atoms or a cell filter), silent."""
    from ase.optimize import BFGS, FIRE

    optimizers = {"BFGS": BFGS, "FIRE": FIRE}
    if settings.optimizer not in optimizers:
        raise ValueError(f"unknown optimizer {settings.optimizer!r}: use one of {sorted(optimizers)}")
    optimizer = optimizers[settings.optimizer](optimizable, logfile=None)
    optimizer.fmax = settings.fmax
    return optimizer


@contextlib.contextmanager
def quiet_chgnet():
    """CHGNet prints banners ("CHGNet will run on cpu") and a torch warning on every call."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        yield


@contextlib.contextmanager
def one_blas_thread():
    """NumPy's BLAS on one thread while relaxing. OpenBLAS starts a thread per core, and the
    optimisers' linear algebra is small (BFGS diagonalises a 3N+9 Hessian every step): its
    threads spin more than they compute. On a 2-core CPU with torch at 2 threads, 6 generated
    structures relaxed one at a time took 14.0 s with OpenBLAS at 2 threads, 6.1 s at one; 16
    together 18.4 vs 13.0 s (scripts/bench_relax.py's structures, 2026-12-06)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@lru_cache(maxsize=1)
def load_chgnet():
    """The pretrained CHGNet model on CPU, loaded once per process (~0.1 s after import)."""
    from chgnet.model import (
        CHGNet,  # heavy import (~4 s): only when stability is asked for
    )

    # weights made in a caller's inference mode (the app loads its judges while sampling under it)
    # are inference tensors, and every later force reading would fail to differentiate through them
    with quiet_chgnet(), torch.inference_mode(False):
        model = CHGNet.load(use_device="cpu", verbose=False)
    # the project reads CHGNet and never trains it: forces and stresses are gradients with respect
    # to positions and strains only, and without parameter gradients a force reading is ~10 % cheaper
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def build_elemental_references(source: Path | None = None) -> dict:
    """Element -> MP2020-compatible energy per atom (eV) from the Materials Project entries file."""
    from pymatgen.entries.computed_entries import ComputedEntry

    source = source or data_dir() / REFERENCE_SOURCE
    entries = json.loads(Path(source).read_text())
    energies = {el: round(ComputedEntry.from_dict(d).energy_per_atom, 6) for el, d in entries.items()}
    return {
        "provenance": (
            f"energy_per_atom (corrected, MP2020-compatible, eV/atom) of the elemental ground states in "
            f"{REFERENCE_SOURCE} (janosh/matbench-discovery @06bfc62 data/mp/, MIT; data from "
            "the Materials Project, CC-BY-4.0). Built by crystallm_core.chem.judges.stability.build_elemental_references."
        ),
        "energy_per_atom": dict(sorted(energies.items())),
    }


@lru_cache(maxsize=1)
def elemental_references() -> dict[str, float]:
    """The shipped element -> mu_i table (eV/atom)."""
    return json.loads(ELEMENTAL_REFERENCES_PATH.read_text())["energy_per_atom"]


def formation_energy_or_nan(composition: Composition, e_total_per_atom: float) -> float:
    """`formation_energy_per_atom`, or NaN where an element has no reference (a feature, not a result)."""
    try:
        return formation_energy_per_atom(composition, e_total_per_atom)
    except ValueError:
        return float("nan")


def formation_energy_per_atom(composition: Composition, e_total_per_atom: float) -> float:
    """(E_total - sum_i n_i mu_i) / N; raises ValueError for elements without a reference."""
    mu = elemental_references()
    missing = sorted(el.symbol for el in composition.elements if el.symbol not in mu)
    if missing:
        raise ValueError(f"no elemental reference energy for {', '.join(missing)}")
    n_atoms = composition.num_atoms
    e_ref = sum(amount * mu[el.symbol] for el, amount in composition.items())
    return (e_total_per_atom * n_atoms - e_ref) / n_atoms


@lru_cache(maxsize=1)
def load_hull():
    from crystallm_core.chem.data.hull import HullReference

    return HullReference.load()


@dataclass
class ChgnetReading:
    """One CHGNet forward pass: the energy for stability and the features for the band-gap head."""

    energy_per_atom: float  # eV/atom
    features: ChgnetFeatures


def graph_batches(structures: Sequence[Structure], batch_size: int) -> list[list[int]]:
    """Indices in batches of at most `batch_size` structures whose CHGNet line graphs together stay
    within one structure's budget (`CrowdingLimits.max_bond_pairs`), so a batch costs no more
    memory than the largest structure allowed alone."""
    budget = CrowdingLimits().max_bond_pairs
    batches: list[list[int]] = []
    total = budget + 1
    for i, structure in enumerate(structures):
        size = graph_size(structure).bond_pairs
        if total + size > budget or len(batches[-1]) >= batch_size:
            batches.append([])
            total = 0
        batches[-1].append(i)
        total += size
    return batches


STRESS_TO_GPA = 160.21766208  # eV/Å³ -> GPa, as CHGNet converts


def chgnet_graph(model, structure: Structure):
    """CHGNet's graph of a structure, made with inference mode off: `efs_readings` differentiates
    through it, and tensors made in a caller's inference mode (the app samples and scores under
    it) cannot be saved for a backward pass."""
    with torch.inference_mode(False):
        return model.graph_converter(structure)


def efs_readings(model, graphs: list, crystal_features: bool = False) -> list[dict]:
    """Energy (eV/atom), forces (eV/Å) and stress (GPa) of each graph from ONE forward and ONE
    backward pass (with `crystal_features`, also CHGNet's pooled crystal feature "crystal_fea").
    CHGNet's own `predict_graph` takes two backward passes (forces, then stress), each building a
    differentiable graph for training (create_graph=True); at inference one pass over positions
    and strains together gives the same numbers for about half the cost (on 16 generated
    structures, about twice an energy-only forward: 0.8 vs 0.4 s on one thread)."""
    from chgnet.model.model import BatchedGraph

    model.eval()
    # a caller's inference or no-grad mode would leave nothing to differentiate
    with torch.inference_mode(False), torch.enable_grad():
        batched = BatchedGraph.from_graphs(graphs, bond_basis_expansion=model.bond_basis_expansion,
                                           angle_basis_expansion=model.angle_basis_expansion, compute_stress=True)
        # _compute without forces or stress: the energies only, still attached to positions and strains
        prediction = model._compute(batched, return_crystal_feas=crystal_features)
        energy = prediction["e"]  # eV/atom when the model is intensive (CHGNet is)
        atoms = torch.bincount(batched.atom_owners)
        total = energy * atoms if model.is_intensive else energy
        gradients = torch.autograd.grad(total.sum(), [*batched.atom_positions, *batched.strains])
    position_gradients, strain_gradients = gradients[:len(graphs)], gradients[len(graphs):]
    composition = 0 if model.composition_model is None else model.composition_model(graphs)
    energy = (energy + composition).detach().numpy()
    readings = [{"e": float(e), "f": -f.numpy(), "s": (s / volume * STRESS_TO_GPA).detach().numpy()}
                for e, f, s, volume in zip(energy, position_gradients, strain_gradients, batched.volumes)]
    if crystal_features:
        for reading, crystal in zip(readings, prediction["crystal_fea"].detach().numpy()):
            reading["crystal_fea"] = crystal
    return readings


def static_readings(structures: Sequence[Structure], batch_size: int = 16) -> list[ChgnetReading | str]:
    """CHGNet energy per atom and `ChgnetFeatures` of each structure as given (one forward and one
    backward pass each: the forces and stress say how far from equilibrium the structure sits);
    a failure becomes its message. Only for structures `validity.structure_problem` accepts."""
    model = load_chgnet()
    layers = LayerCapture(model)

    def readings(batch: list[Structure]) -> list[ChgnetReading]:
        graphs = [chgnet_graph(model, structure) for structure in batch]
        with layers.capture():
            predictions = efs_readings(model, graphs, crystal_features=True)
        atom_features = layers.per_structure([len(s) for s in batch])
        return [ChgnetReading(p["e"], structure_features(p["crystal_fea"], atoms, p["e"],
                                                         formation_energy_or_nan(s.composition, p["e"]),
                                                         p["f"], p["s"]))
                for p, atoms, s in zip(predictions, atom_features, batch)]

    results: list[ChgnetReading | str] = []
    with quiet_chgnet():
        for batch in graph_batches(structures, batch_size):
            try:
                results.extend(readings([structures[i] for i in batch]))
            except Exception:  # one bad structure (e.g. isolated atoms) fails the batch: redo one by one
                for i in batch:
                    try:
                        results.extend(readings([structures[i]]))
                    except Exception as exc:
                        results.append(f"CHGNet failed: {exc}")
    return results


@dataclass
class Relaxation:
    """Where a bounded relaxation (positions and cell) ended."""

    structure: Structure
    energy_per_atom: float  # eV/atom at the end
    steps: int
    converged: bool  # max force below fmax (else stopped by max_steps or max_seconds)
    seconds: float


def relax_structure(structure: Structure, settings: RelaxSettings | None = None,
                    on_step: Callable[[int], None] | None = None) -> Relaxation:
    """Relaxation of positions and cell with CHGNet (`settings.optimizer`), stopped at fmax,
    max_steps or max_seconds; `on_step` gets the number of steps taken after each one."""
    from ase.constraints import FixSymmetry
    from chgnet.model.dynamics import CHGNetCalculator
    from pymatgen.io.ase import AseAtomsAdaptor

    from crystallm_core.chem.judges.cell_filter import FastFrechetCellFilter

    settings = settings or RelaxSettings()
    atoms = AseAtomsAdaptor.get_atoms(structure)
    if settings.keep_symmetry:  # symmetrises to symprec first, then keeps forces and stress symmetric
        atoms.set_constraint(FixSymmetry(atoms, symprec=0.1, adjust_positions=True, adjust_cell=True))
    start = time.perf_counter()
    converged, steps = False, 0
    with quiet_chgnet(), one_blas_thread():
        atoms.calc = CHGNetCalculator(load_chgnet(), use_device="cpu", on_isolated_atoms="error")
        optimizer = make_optimizer(FastFrechetCellFilter(atoms), settings)
        for converged in optimizer.irun(fmax=settings.fmax, steps=settings.max_steps):
            steps = optimizer.nsteps
            if on_step is not None:
                on_step(steps)
            if converged or time.perf_counter() - start > settings.max_seconds:
                break
        energy = float(atoms.get_potential_energy()) / len(atoms)
    return Relaxation(AseAtomsAdaptor.get_structure(atoms), energy, steps, bool(converged),
                      time.perf_counter() - start)


def estimate_stability(
    structures: Sequence[Structure | None],
    relax: bool = False,
    relax_settings: RelaxSettings | None = None,
    batch_size: int = 16,
) -> list[StabilityEstimate]:
    """One StabilityEstimate per input; None inputs and per-structure failures become error rows."""
    settings = relax_settings or RelaxSettings()
    energies: dict[int, float | str] = {}  # index -> eV/atom, or the reason there is none
    features: dict[int, ChgnetFeatures] = {}
    seconds: dict[int, float] = {}
    for i, structure in enumerate(structures):
        if structure is None:
            energies[i], seconds[i] = "no structure", 0.0
        elif missing := sorted({el.symbol for el in structure.composition} - set(elemental_references())):
            # CHGNet and the formation energy both need these: fail early with a clear reason
            energies[i], seconds[i] = f"no elemental reference energy for {', '.join(missing)}", 0.0
    todo = [i for i in range(len(structures)) if i not in energies]
    if todo and not relax:
        start = time.perf_counter()
        readings = static_readings([structures[i] for i in todo], batch_size=batch_size)
        per_item = (time.perf_counter() - start) / len(todo)  # batched: share the cost evenly
        for i, value in zip(todo, readings):
            energies[i] = value if isinstance(value, str) else value.energy_per_atom
            if not isinstance(value, str):
                features[i] = value.features
        seconds.update((i, per_item) for i in todo)
    for i in todo if relax else []:
        start = time.perf_counter()
        try:
            energies[i] = relax_structure(structures[i], settings).energy_per_atom
        except Exception as exc:
            energies[i] = f"CHGNet relaxation failed: {exc}"
        seconds[i] = time.perf_counter() - start
    return [replace(finish_estimate(structures[i], energies[i], relax, seconds[i]), features=features.get(i))
            for i in range(len(structures))]


def finish_estimate(
    structure: Structure | None, energy: float | str, relaxed: bool, seconds: float
) -> StabilityEstimate:
    """Turn a CHGNet energy (or the reason there is none) into formation energy and E_hull."""
    if isinstance(energy, str):
        return StabilityEstimate(None, None, None, relaxed, seconds, energy)
    if not math.isfinite(energy):
        return StabilityEstimate(None, None, None, relaxed, seconds, "CHGNet energy is not finite")
    e_form = formation_energy_per_atom(structure.composition, energy)
    try:
        e_hull = float(load_hull().e_above_hull(structure.composition, e_form))
    except Exception as exc:  # hull table missing or the chemical system not covered
        return StabilityEstimate(energy, e_form, None, relaxed, seconds, f"no E_hull: {exc}")
    return StabilityEstimate(energy, e_form, e_hull, relaxed, seconds)


def main(argv: list[str] | None = None) -> int:
    """`python -m crystallm_core.chem.judges.stability --build-references` rewrites the shipped mu_i table."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--build-references", action="store_true")
    parser.add_argument("--source", type=Path, default=None, help="MP elemental entries JSON")
    args = parser.parse_args(argv)
    if args.build_references:
        table = build_elemental_references(args.source)
        ELEMENTAL_REFERENCES_PATH.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {len(table['energy_per_atom'])} elements to {ELEMENTAL_REFERENCES_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
