"""Relax one structure with CHGNet and say what changed: energy, E_hull, volume, symmetry, validity.

Generated structures are unrelaxed guesses: a short relaxation shows whether one sits near a
local minimum (small energy and volume change, same space group) and how far it is from the
hull once relaxed. The relaxed structure is written in the model's CIF form (symmetrised at
symprec 0.1) and put through every validity check again.

    python -m crystallm_core relax IN.cif [--out OUT.cif] [--max-steps 100] [--max-seconds 30]
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pymatgen.core import Structure
from tqdm import tqdm

from crystallm_core.chem.cif.cif_format import structure_to_model_cif
from crystallm_core.chem.judges.relaxation_workers import relax_on_cores
from crystallm_core.chem.judges.crowding import chgnet_problem
from crystallm_core.chem.judges.isolation import check_sample
from crystallm_core.chem.judges.stability import (
    HULL_BIAS_NOTE,
    Relaxation,
    RelaxSettings,
    StabilityEstimate,
    estimate_stability,
    finish_estimate,
    relax_structure,
)
from crystallm_core.chem.judges.structure_info import parse_cif
from crystallm_core.chem.judges.validity import CheckResult, ValidityReport, structure_problem


@dataclass
class RelaxationReport:
    before: StabilityEstimate  # CHGNet single point on the structure as given
    relaxation: Relaxation
    after: StabilityEstimate  # at the relaxed geometry
    cif: str | None  # the relaxed structure as a model-format CIF; None if it could not be written
    validity: ValidityReport  # every check, on that CIF
    spacegroup_before: str | None
    volume_before: float  # Å³/atom of the input

    @property
    def volume_after(self) -> float:
        return self.relaxation.structure.volume / len(self.relaxation.structure)

    @property
    def volume_change(self) -> float:
        """Relative change of the volume per atom."""
        return self.volume_after / self.volume_before - 1

    def rows(self) -> list[dict]:
        """Before/after table for people: quantity, before, after (strings, 'n/a' where unknown)."""
        def number(value, digits=3) -> str:
            return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
                else f"{value:.{digits}f}"

        return [
            {"quantity": "CHGNet energy (eV/atom)", "before": number(self.before.e_total_per_atom),
             "after": number(self.after.e_total_per_atom)},
            {"quantity": "formation energy (eV/atom)", "before": number(self.before.e_form_per_atom),
             "after": number(self.after.e_form_per_atom)},
            {"quantity": "E_hull estimate (eV/atom)", "before": number(self.before.e_hull),
             "after": number(self.after.e_hull)},
            {"quantity": "volume (Å³/atom)", "before": number(self.volume_before, 2),
             "after": number(self.volume_after, 2)},
            {"quantity": "space group (symprec 0.1)", "before": self.spacegroup_before or "n/a",
             "after": self.validity.spacegroup or "n/a"},
        ]

    def summary(self) -> str:
        r = self.relaxation
        stop = "converged" if r.converged else "stopped before converging"
        verdict = "valid" if self.validity.valid else "invalid: " + "; ".join(self.validity.failed_reasons[:2])
        return (f"{r.steps} steps in {r.seconds:.1f} s ({stop}); volume {self.volume_change:+.1%}; "
                f"relaxed structure {verdict}")


def spacegroup_of(structure: Structure) -> str | None:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    if structure_problem(structure):
        return None
    try:
        return SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_symbol()
    except Exception:
        return None


def relax_and_check(structure: Structure, settings: RelaxSettings | None = None,
                    on_step: Callable[[int], None] | None = None) -> RelaxationReport:
    """Static estimate, bounded relaxation, estimate at the end, and the validity of the result.

    Raises ValueError for a structure CHGNet must not or cannot relax (a degenerate cell,
    isolated atoms); the message says why.
    """
    problem = structure_problem(structure) or chgnet_problem(structure)
    if problem:
        raise ValueError(f"cannot relax this structure: {problem}")
    [before] = estimate_stability([structure])
    return checked_report(structure, before, relax_structure(structure, settings, on_step))


def relax_and_check_many(structures: Sequence[Structure], settings: RelaxSettings | None = None,
                         batch_size: int = 16) -> list[RelaxationReport | str]:
    """`relax_and_check` of many structures, relaxed together (`batch_relaxation.relax_batch`:
    one CHGNet forward per optimiser step for the batch, in chunks on every core:
    `relaxation_workers`); a structure that cannot be relaxed gets the reason instead."""
    results: list[RelaxationReport | str | None] = [None] * len(structures)
    todo = []
    for i, structure in enumerate(structures):
        problem = structure_problem(structure) or chgnet_problem(structure)
        if problem:
            results[i] = f"cannot relax this structure: {problem}"
        else:
            todo.append(i)
    chosen = [structures[i] for i in todo]
    befores = estimate_stability(chosen, batch_size=batch_size)
    for i, before, relaxation in zip(todo, befores, relax_on_cores(chosen, settings, batch_size)):
        results[i] = relaxation if isinstance(relaxation, str) else checked_report(structures[i], before, relaxation)
    return results


def checked_report(structure: Structure, before: StabilityEstimate, relaxation: Relaxation) -> RelaxationReport:
    """The estimate at the relaxed geometry and every validity check of its model-format CIF."""
    after = finish_estimate(relaxation.structure, relaxation.energy_per_atom, True, relaxation.seconds)
    try:
        cif, validity = check_sample(structure_to_model_cif(relaxation.structure), "eos", 0)
    except Exception as error:  # e.g. symmetry analysis of a collapsed cell
        cif = None
        validity = ValidityReport([CheckResult("parses", False, f"could not write the relaxed CIF: {error}")])
    return RelaxationReport(before, relaxation, after, cif, validity, spacegroup_of(structure),
                            structure.volume / len(structure))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cif", help="CIF file to relax")
    parser.add_argument("--out", default=None, help="where to write the relaxed CIF (default: IN_relaxed.cif)")
    parser.add_argument("--max-steps", type=int, default=RelaxSettings.max_steps)
    parser.add_argument("--max-seconds", type=float, default=RelaxSettings.max_seconds)
    parser.add_argument("--fmax", type=float, default=RelaxSettings.fmax, help="force threshold, eV/Å")


def run(args: argparse.Namespace) -> int:
    source = Path(args.cif)
    if not source.is_file():
        raise ValueError(f"{source} is not a file")
    if args.max_steps < 1 or not args.max_seconds > 0 or not args.fmax > 0:
        raise ValueError("--max-steps must be ≥ 1, and --max-seconds and --fmax > 0")
    structure = parse_cif(source.read_text(errors="replace"))  # ValueError with the parser's reason
    try:
        with tqdm(total=args.max_steps, desc=f"relaxing {source.name}", unit="step") as bar:
            report = relax_and_check(structure, RelaxSettings(args.max_steps, args.max_seconds, args.fmax),
                                     on_step=lambda steps: bar.update(steps - bar.n))
    except Exception as error:
        raise ValueError(f"CHGNet could not relax {source.name}: {type(error).__name__}: {error}") from error
    for row in report.rows():
        print(f"  {row['quantity']:<28} {row['before']:>10} → {row['after']}")
    print(f"  {report.summary()}")
    if report.cif is None:
        print("no relaxed CIF written", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else source.with_name(f"{source.stem}_relaxed.cif")
    out.write_text(report.cif)
    print(f"wrote {out}\n  note: {HULL_BIAS_NOTE}")
    return 0
