"""Where atoms may go: the geometry behind constrained decoding.

- `cell_problem`: a cell no valid structure can have (outside the sane ranges, a lattice
  vector shorter than an atom's allowed distance to its own image, too small a volume);
- `Placement`: the sites written so far in one cell and space group: which multiplicities
  the next row may take, the exact check of a written row (orbit size, distances, what
  remains to place), and a scan of the last coordinate that keeps only values where the row
  can stand.

Distances are judged against `validity.shortest_allowed_distance`, the bound the sane-cell
and bond-length checks apply, so decoding and checking cannot disagree.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from pymatgen.core import Element, Lattice

from crystallm_core.chem.judges.validity import (
    CheckFailed,
    ValidityConfig,
    lattice_problem,
    shortest_allowed_distance,
)
from crystallm_core.chem.cif.wyckoff import (
    TOLERANCE,
    SpaceGroupSymmetry,
    fillable,
    fixed_multiplicities,
)

PACKING_LIMIT = math.pi / (3 * math.sqrt(2))  # densest packing of equal spheres (Kepler)
SCAN_STEPS = 1000  # values of the last coordinate tried by `Placement.feasible_last`


@dataclass(frozen=True)
class Problem:
    kind: str  # "orbit" | "distance" | "blocked" | "remainder" | "cell" | "bonds" | "checks"
    text: str


@functools.cache
def shortest_distance(a: str, b: str, config: ValidityConfig = ValidityConfig()) -> float:
    """validity.shortest_allowed_distance by symbol; inf when the check cannot judge the bond."""
    try:
        return shortest_allowed_distance(Element(a), Element(b), config)
    except CheckFailed:
        return math.inf


def bond_judgeable(a: str, b: str) -> bool:
    return math.isfinite(shortest_distance(a, b))


def distance_bounds(elements, config: ValidityConfig) -> dict[tuple[str, str], float]:
    return {(a, b): shortest_distance(a, b, config) for a in elements for b in elements}


def cell_problem(lattice: Lattice, counts: dict[str, int], bounds: dict, config: ValidityConfig) -> Problem | None:
    """Why no valid structure can have this cell (None if one may)."""
    problem = lattice_problem(lattice, config)
    if problem:
        return Problem("cell", problem)
    shortest = min(np.linalg.norm(lattice.get_lll_reduced_lattice().matrix, axis=1))
    needed = max(bounds[e, e] for e in counts)
    if shortest < needed:
        return Problem("cell", f"a lattice vector of {shortest:.2f} Å puts an atom closer than {needed:.2f} Å "
                               f"to its image")
    # spheres whose diameter is the closest allowed pair cannot fill more than the Kepler limit
    closest = min(bounds.values())
    needed_volume = sum(counts.values()) * (math.pi / 6) * closest ** 3 / PACKING_LIMIT
    if lattice.volume < needed_volume:
        return Problem("cell", f"{sum(counts.values())} atoms cannot fit in {lattice.volume:.1f} Å³")
    return None


def periodic_delta(delta: np.ndarray) -> np.ndarray:
    return delta - np.round(delta)


@dataclass
class Site:
    element: str
    orbit: np.ndarray  # fractional coordinates of every atom of the row


@dataclass
class Placement:
    """The rows written so far in one cell of one space group."""

    group: SpaceGroupSymmetry
    lattice: Lattice
    bounds: dict[tuple[str, str], float]
    sites: list[Site] = field(default_factory=list)
    used_fixed: list[int] = field(default_factory=list)  # fixed Wyckoff points taken

    def unused_fixed(self, also_taken: int | None = None) -> list[int]:
        return [p.multiplicity for i, p in enumerate(self.group.fixed_positions)
                if i not in self.used_fixed and i != also_taken]

    def multiplicities(self, element: str, remaining: dict[str, int]) -> list[int]:
        """Multiplicities for the element's next row that leave a remainder the group can hold."""
        free, unused = set(self.group.free_multiplicities), self.unused_fixed()
        options = []
        for m in sorted(free | set(unused)):
            if m > remaining[element]:
                continue
            counts = counts_after(remaining, element, m)
            fits_free = m in free and fillable(self.group.number, counts, tuple(sorted(unused)))
            fits_fixed = m in unused and fillable(self.group.number, counts, without_one(unused, m))
            if fits_free or fits_fixed:
                options.append(m)
        return options

    def problem(self, element: str, multiplicity: int, point: np.ndarray,
                remaining: dict[str, int]) -> tuple[Problem | None, int | None]:
        """(why this row cannot stand, the fixed point it takes): orbit size, distances, remainder."""
        group, lattice, bounds = self.group, self.lattice, self.bounds
        orbit = group.orbit(point)
        if len(orbit) != multiplicity:
            return Problem("orbit", f"{len(orbit)} atoms in the orbit, multiplicity {multiplicity} written"), None
        fixed = group.fixed_position_of(point) if multiplicity in fixed_multiplicities(group.number) else None
        if fixed is not None and fixed in self.used_fixed:
            return Problem("distance", "a fixed Wyckoff point taken twice"), None
        if len(orbit) > 1:
            within = lattice.get_all_distances(orbit, orbit)[~np.eye(len(orbit), dtype=bool)]
            if within.min() < bounds[element, element]:
                return Problem("distance", f"{element}–{element} {within.min():.2f} Å < "
                                           f"{bounds[element, element]:.2f} Å"), None
        for site in self.sites:
            closest = lattice.get_all_distances(orbit, site.orbit).min()
            if closest < bounds[element, site.element]:
                return Problem("distance", f"{element}–{site.element} {closest:.2f} Å < "
                                           f"{bounds[element, site.element]:.2f} Å"), None
        counts = counts_after(remaining, element, multiplicity)
        if not fillable(group.number, counts, tuple(sorted(self.unused_fixed(fixed)))):
            return Problem("remainder", "the remaining atoms no longer fit the group's positions"), None
        return None, fixed

    def add(self, element: str, point: np.ndarray, fixed: int | None) -> None:
        self.sites.append(Site(element, self.group.orbit(point)))
        if fixed is not None:
            self.used_fixed.append(fixed)

    def feasible_last(self, element: str, multiplicity: int, x: float, y: float) -> np.ndarray:
        """For z = k / SCAN_STEPS, whether (x, y, z) has the written multiplicity and keeps every
        distance allowed. A fast screen (minimum images on the LLL basis) ahead of `problem`,
        which stays the judge."""
        group = self.group
        z = np.arange(SCAN_STEPS) / SCAN_STEPS
        points = np.column_stack([np.full_like(z, x), np.full_like(z, y), z])
        images = np.einsum("nij,kj->kni", group.rotations, points) + group.translations  # (K, ops, 3)
        delta = periodic_delta(images - points[:, None, :])
        same = np.all(np.abs(delta) < TOLERANCE, axis=2)
        ok = len(group.rotations) == multiplicity * same.sum(axis=1)
        reduced = self.reduced_lengths(delta)
        ok &= np.where(same, np.inf, reduced).min(axis=1) >= self.bounds[element, element]
        for site in self.sites:
            delta = periodic_delta(points[:, None, :] - site.orbit[None, :, :])
            ok &= self.reduced_lengths(delta).min(axis=1) >= self.bounds[element, site.element]
        return ok

    @functools.cached_property
    def to_reduced(self) -> tuple[np.ndarray, np.ndarray]:
        """(fractional → LLL fractional, LLL basis matrix): minimum images are nearly always
        within half a cell on a reduced basis."""
        reduced = self.lattice.get_lll_reduced_lattice().matrix
        return self.lattice.matrix @ np.linalg.inv(reduced), reduced

    def reduced_lengths(self, delta: np.ndarray) -> np.ndarray:
        to_reduced, reduced = self.to_reduced
        return np.linalg.norm(periodic_delta(delta @ to_reduced) @ reduced, axis=-1)


def counts_after(remaining: dict[str, int], element: str, multiplicity: int) -> tuple[int, ...]:
    after = dict(remaining, **{element: remaining[element] - multiplicity})
    return tuple(sorted((n for n in after.values() if n), reverse=True))


def without_one(values: list[int], value: int) -> tuple[int, ...]:
    rest = list(values)
    rest.remove(value)
    return tuple(sorted(rest))
