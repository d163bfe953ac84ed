"""Optional repairs after decoding: off by default, never silent, the model's own CIF kept.

- `rescale`: when bond lengths are the only failed check and one isotropic scale of the cell
  brings every CrystalNN bond back inside the band (e.g. all out-of-range bonds too long),
  scale by the factor closest to 1 that does, and check again.
- `relax`: a bounded CHGNet relaxation within the written space group (`relaxation`), for a
  structure that is valid or fails only on bond lengths, with E_hull before and after.

Each returns a `Repair`: what was done, the repaired CIF and whether it passes every check.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from pymatgen.core import Structure

from crystallm_core.chem.cif.cif_format import structure_to_model_cif
from crystallm_core.chem.judges.isolation import check_sample
from crystallm_core.chem.judges.relaxation import RelaxationReport, relax_and_check, relax_and_check_many
from crystallm_core.chem.judges.stability import RelaxSettings
from crystallm_core.chem.judges.validity import (
    ValidityConfig,
    ValidityReport,
    bond_table,
    structure_problem,
)

MARGIN = 0.01  # land this far inside the band, not on its edge


@dataclass
class Repair:
    kind: str  # "rescale" | "relax"
    valid: bool  # the repaired structure passes every check
    cif: str | None  # the repaired structure in the model's CIF form
    details: dict = field(default_factory=dict)  # factor, or E_hull before/after, steps, seconds…
    reasons: list[str] = field(default_factory=list)  # what still fails

    def to_dict(self) -> dict:
        return asdict(self)


def only_bonds_fail(report: ValidityReport) -> bool:
    return [c.name for c in report.checks if not c.passed] == ["bond_lengths"]


def rescale_factor(structure: Structure, config: ValidityConfig = ValidityConfig()) -> float | None:
    """The isotropic length factor closest to 1 that puts every bond (hydrogen bonds aside, whose
    only bound is loose) inside the band; None when no single factor can."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CrystalNN's notes on missing oxidation states
        bonds = [b for b in bond_table(structure, list(range(len(structure))), config) if not b.with_hydrogen]
    if not bonds:
        return None
    ratios = np.array([b.ratio for b in bonds])
    low = (1 - config.bond_tolerance + MARGIN) / ratios.min()
    high = (1 + config.bond_tolerance - MARGIN) / ratios.max()
    return float(np.clip(1.0, low, high)) if low <= high else None


def model_cif_check(structure: Structure) -> tuple[str | None, ValidityReport]:
    """The structure as the model would write it, checked like generated output."""
    return check_sample(structure_to_model_cif(structure), "eos", 0)


def rescale(structure: Structure, report: ValidityReport) -> Repair | None:
    """The cheap repair, for a structure that fails only on bond lengths (None: not applicable)."""
    if not only_bonds_fail(report) or structure_problem(structure):
        return None
    factor = rescale_factor(structure)
    if factor is None:
        return Repair("rescale", False, None, {"factor": None}, ["no single scale fits every bond"])
    scaled = structure.copy()
    scaled.scale_lattice(structure.volume * factor ** 3)
    cif, checked = model_cif_check(scaled)
    return Repair("rescale", checked.valid, cif, {"factor": round(factor, 4)}, checked.failed_reasons)


def relax(structure: Structure, report: ValidityReport, settings: RelaxSettings | None = None) -> Repair | None:
    """A bounded CHGNet relaxation of a valid structure or one that fails only on bond lengths."""
    if not relaxable(structure, report):
        return None
    try:
        return relax_repair(relax_and_check(structure, settings))
    except Exception as error:  # e.g. isolated atoms: CHGNet has no energy for them
        return relax_repair(f"{type(error).__name__}: {error}")


def relax_many(structures: list[Structure], reports: list[ValidityReport],
               settings: RelaxSettings | None = None) -> list[Repair | None]:
    """`relax` of many structures, relaxed together (one CHGNet forward per optimiser step for all)."""
    chosen = [i for i, (s, r) in enumerate(zip(structures, reports)) if relaxable(s, r)]
    repairs: list[Repair | None] = [None] * len(structures)
    try:
        results = relax_and_check_many([structures[i] for i in chosen], settings)
    except Exception as error:  # CHGNet missing or broken: every structure says so
        results = [f"{type(error).__name__}: {error}"] * len(chosen)
    for i, result in zip(chosen, results):
        repairs[i] = relax_repair(result)
    return repairs


def relaxable(structure: Structure, report: ValidityReport) -> bool:
    return (report.valid or only_bonds_fail(report)) and not structure_problem(structure)


def relax_repair(result: RelaxationReport | str) -> Repair:
    """The Repair of a relaxation, or of the reason there is none."""
    if isinstance(result, str):
        return Repair("relax", False, None, {}, [f"CHGNet could not relax it: {result}"])
    details = {"e_hull_before": result.before.e_hull, "e_hull_after": result.after.e_hull,
               "volume_change": round(result.volume_change, 4), "steps": result.relaxation.steps,
               "converged": result.relaxation.converged, "seconds": round(result.relaxation.seconds, 2)}
    return Repair("relax", result.validity.valid, result.cif, details, result.validity.failed_reasons)
