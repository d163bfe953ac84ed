"""One structure, for display: read a CIF, describe its symmetry, lattice and density, and its
powder XRD pattern (the Explore page). Readable `ValueError`s, never tracebacks, for bad CIFs."""
from __future__ import annotations

import math
import warnings

import pandas as pd
from pymatgen.core import DummySpecies, Structure

from crystallm_core.chem.cif.cif_limits import cif_size_problem
from crystallm_core.chem.judges.check_limits import parse_error_text
from crystallm_core.chem.judges.validity import structure_problem


def parse_cif(text: str) -> Structure:
    """A CIF (generated or uploaded) → Structure; ValueError with the reason when it cannot be read."""
    if not text or not text.strip():
        raise ValueError("the CIF is empty")
    too_big = cif_size_problem(text)
    if too_big:
        raise ValueError(too_big)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Structure.from_str(text, fmt="cif")
    except Exception as error:
        raise ValueError(f"this CIF could not be read: {parse_error_text(error)}") from None


def describe_structure(structure: Structure, symprec: float = 0.1) -> dict:
    """Re-detected symmetry, lattice and density of a structure, for display."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    lattice = structure.lattice
    summary = {"formula": structure.composition.reduced_formula,
               "cell formula": structure.composition.formula, "sites": len(structure)}
    problem = structure_problem(structure)
    if problem:  # spglib must never see such a cell (it can crash the process)
        summary.update({"space group": f"not detected ({problem})", "crystal system": "—"})
    else:
        try:
            analyzer = SpacegroupAnalyzer(structure, symprec=symprec)
            summary.update({"space group": f"{analyzer.get_space_group_symbol()} "
                                           f"(#{analyzer.get_space_group_number()})",
                            "crystal system": analyzer.get_crystal_system()})
        except Exception as error:
            summary.update({"space group": f"not detected ({error})", "crystal system": "—"})
    summary.update({
        "a, b, c (Å)": ", ".join(f"{x:.3f}" for x in lattice.abc),
        "α, β, γ (°)": ", ".join(f"{x:.2f}" for x in lattice.angles),
        "volume (Å³)": round(lattice.volume, 3),
        "density (g/cm³)": density(structure),
    })
    return summary


def density(structure: Structure) -> float | str:
    """g/cm³, or why there is none: a placeholder species (an unknown symbol) has no mass, a flat
    cell no volume."""
    placeholders = sorted({sp.symbol for sp in structure.composition if isinstance(sp, DummySpecies)})
    if placeholders:
        return f"unknown (no mass for the placeholder species {', '.join(placeholders)})"
    volume = structure.volume
    if not (math.isfinite(volume) and volume > 0):
        return f"unknown (the cell volume is {volume:.3g} Å³)"
    return round(float(structure.density), 3)


def xrd_pattern(structure: Structure, two_theta_range: tuple[float, float] = (5, 90)) -> pd.DataFrame:
    """Powder XRD peaks (Cu Kα): two_theta, intensity (max 100), hkl label."""
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    problem = structure_problem(structure)
    if problem:
        raise ValueError(f"no XRD pattern: {problem}")

    pattern = XRDCalculator(wavelength="CuKa").get_pattern(structure, two_theta_range=two_theta_range)
    hkls = [", ".join("(" + " ".join(str(i) for i in h["hkl"]) + ")" for h in family) for family in pattern.hkls]
    return pd.DataFrame({"two_theta": pattern.x, "intensity": pattern.y, "hkl": hkls})

