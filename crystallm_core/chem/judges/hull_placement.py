"""A candidate in its chemical system's convex hull: where it sits, what it would decompose into.

The known phases are the shipped hull table (`hull.HullReference`, MP-20-like phases only, so
E_hull is biased low: `stability.HULL_BIAS_NOTE`). For 2–4 elements the candidate is added to
its system's `PhaseDiagram` so pymatgen's plotter can draw it among the known phases; for more
elements a diagram cannot be drawn, and the decomposition products and their fractions say the
same thing in words.
"""
from __future__ import annotations

from dataclasses import dataclass

from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Structure

from crystallm_core.chem.judges.crowding import chgnet_problem
from crystallm_core.chem.data.hull import HullReference, chemical_system
from crystallm_core.chem.judges.stability import estimate_stability, load_hull
from crystallm_core.chem.judges.validity import structure_problem

PLOTTABLE_ELEMENTS = (2, 3, 4)  # pymatgen draws binaries, ternaries and quaternaries
CANDIDATE_NAME = "candidate"


@dataclass
class HullPlacement:
    """A candidate's place against the known hull. Energies in eV/atom."""

    formula: str
    system: tuple[str, ...]
    e_form_per_atom: float
    e_hull: float  # static (the structure as written); negative: below the known hull
    decomposition: dict[str, float]  # "formula (source id)" -> molar fraction of the hull phases
    e_hull_relaxed: float | None = None  # after a CHGNet relaxation, when there was one
    diagram: PhaseDiagram | None = None  # known phases + the candidate (2–4 elements only)
    candidate: PDEntry | None = None  # the candidate's entry in `diagram`

    @property
    def plottable(self) -> bool:
        return self.diagram is not None

    def decomposition_rows(self) -> list[dict]:
        """The decomposition as table rows, largest fraction first."""
        return [{"phase": phase, "fraction": round(fraction, 4)}
                for phase, fraction in sorted(self.decomposition.items(), key=lambda item: -item[1])]


def place_on_hull(composition: Composition | str, e_form_per_atom: float, e_form_relaxed: float | None = None,
                  reference: HullReference | None = None) -> HullPlacement:
    """The candidate of `composition` and formation energy (eV/atom) against the known hull;
    ValueError with the reason when its system has no reference (an element without one)."""
    reference = reference or load_hull()
    comp = reference.composition(composition)
    decomposition, e_hull = reference.decomposition_and_e_above_hull(comp, e_form_per_atom)
    relaxed = None if e_form_relaxed is None else reference.e_above_hull(comp, e_form_relaxed)
    system = chemical_system(comp)
    placement = HullPlacement(comp.reduced_formula, system, float(e_form_per_atom), e_hull, decomposition, relaxed)
    if len(system) in PLOTTABLE_ELEMENTS:
        known = reference.phase_diagram(system)
        placement.candidate = PDEntry(comp, float(e_form_per_atom) * comp.num_atoms, name=CANDIDATE_NAME)
        placement.diagram = PhaseDiagram([*known.all_entries, placement.candidate])
    return placement


def structure_on_hull(structure: Structure, e_form_per_atom: float | None = None,
                      e_form_relaxed: float | None = None) -> HullPlacement:
    """`place_on_hull` for a structure; without a formation energy, CHGNet's static estimate is
    made here. ValueError with the reason when there can be none (a crowded or too big cell, an
    element without a reference, CHGNet failing)."""
    if e_form_per_atom is None:
        problem = structure_problem(structure) or chgnet_problem(structure)
        if problem:
            raise ValueError(f"no CHGNet estimate: {problem}")
        [estimate] = estimate_stability([structure])
        if estimate.e_form_per_atom is None:
            raise ValueError(f"no CHGNet estimate: {estimate.error}")
        e_form_per_atom = estimate.e_form_per_atom
    return place_on_hull(structure.composition, e_form_per_atom, e_form_relaxed)
