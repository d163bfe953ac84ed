"""Wyckoff positions of the 230 space groups, in the settings the model writes (spglib's standard
setting, the one `CifWriter` and `cif_format.symmetry_operators` use).

For constrained decoding we need, per space group: its symmetry operations (conventional cell,
centring included), and its Wyckoff positions as (multiplicity, degrees of freedom, orbit).
A position with no free parameter (e.g. 4a of Fm-3m) holds at most one atom; one with free
parameters holds any number.

They are derived from the operations themselves, not copied from a table: every point of a
1/24 grid (all Wyckoff positions of the standard settings have constant parts in multiples of
1/8, 1/6, 1/4 or 1/3) is classified by its orbit size and the dimension of the subspace its
stabiliser fixes. Fixed points (dimension 0) with the same multiplicity are distinguished by
their orbits. Deriving all 230 takes about 10 s, so the result ships as a small table
(`assets/wyckoff_positions.json`, rebuilt by `python -m crystallm_core.chem.cif.wyckoff`);
`tests/test_wyckoff.py` checks it against the derivation and against International Tables.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import spglib

from crystallm_core.lm.tokenizer import standard_settings
from crystallm_core.paths import ASSETS_DIR

TABLE_PATH = ASSETS_DIR / "wyckoff_positions.json"

GRID = 24
TOLERANCE = 1e-3  # fractional, per component: what CifParser merges as one site


@dataclass(frozen=True)
class WyckoffPosition:
    multiplicity: int
    dof: int  # free parameters; 0 = a fixed point, usable by one atom only
    orbit: np.ndarray  # (multiplicity, 3) fractional coordinates of one representative orbit


@dataclass(frozen=True)
class SpaceGroupSymmetry:
    number: int
    symbol: str
    rotations: np.ndarray  # (n_ops, 3, 3) integer
    translations: np.ndarray  # (n_ops, 3)
    positions: tuple[WyckoffPosition, ...]  # fixed points first, then by multiplicity

    @property
    def crystal_system(self) -> str:
        return crystal_system(self.number)

    @property
    def free_multiplicities(self) -> tuple[int, ...]:
        """Multiplicities any number of atoms may take (positions with free parameters)."""
        return tuple(sorted({p.multiplicity for p in self.positions if p.dof > 0}))

    @property
    def fixed_positions(self) -> tuple[WyckoffPosition, ...]:
        return tuple(p for p in self.positions if p.dof == 0)

    def orbit(self, point: np.ndarray) -> np.ndarray:
        """Distinct images of a fractional point in [0, 1), merged within TOLERANCE."""
        return distinct_points(images(self.rotations, self.translations, np.asarray(point, dtype=float)))

    def fixed_position_of(self, point: np.ndarray) -> int | None:
        """Index in `fixed_positions` of the fixed point this point sits on, or None."""
        for index, position in enumerate(self.fixed_positions):
            delta = np.abs(position.orbit - np.asarray(point) % 1.0)
            delta = np.minimum(delta, 1.0 - delta)
            if np.any(np.all(delta < TOLERANCE, axis=1)):
                return index
        return None


def crystal_system(number: int) -> str:
    for upper, name in ((2, "triclinic"), (15, "monoclinic"), (74, "orthorhombic"), (142, "tetragonal"),
                        (167, "trigonal"), (194, "hexagonal"), (230, "cubic")):
        if number <= upper:
            return name
    raise ValueError(f"no space group number {number}")


def images(rotations: np.ndarray, translations: np.ndarray, point: np.ndarray) -> np.ndarray:
    return (np.einsum("nij,j->ni", rotations, point) + translations) % 1.0


def distinct_points(points: np.ndarray) -> np.ndarray:
    """Points with periodic duplicates (every component within TOLERANCE) removed; the first of
    each group of duplicates is kept."""
    delta = np.abs(points[:, None, :] - points[None, :, :])
    close = np.all(np.minimum(delta, 1.0 - delta) < TOLERANCE, axis=2)
    duplicate = np.triu(close, k=1).any(axis=0)  # close to an earlier point
    return points[~duplicate]


def grid_classification(rotations: np.ndarray, translations: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orbit size and stabiliser's fixed-subspace dimension of every 1/GRID grid point."""
    axis = np.arange(GRID) / GRID
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    mapped = (np.einsum("nij,pj->pni", rotations, points) + translations[None]) % 1.0  # (points, ops, 3)
    # On the grid every image is a grid point, so images compare exactly as integers.
    codes = np.rint(mapped * GRID).astype(np.int64) % GRID
    keys = (codes[..., 0] * GRID + codes[..., 1]) * GRID + codes[..., 2]  # (points, ops)
    own = (np.rint(points * GRID).astype(np.int64) @ np.array([GRID * GRID, GRID, 1]))
    sorted_keys = np.sort(keys, axis=1)
    orbit_sizes = 1 + np.count_nonzero(np.diff(sorted_keys, axis=1), axis=1)
    stabilisers = keys == own[:, None]  # (points, ops)
    dofs = np.empty(len(points), dtype=int)
    identity = np.eye(3)
    cache: dict[bytes, int] = {}
    for i, row in enumerate(stabilisers):
        key = row.tobytes()
        if key not in cache:
            stacked = (rotations[row] - identity).reshape(-1, 3)
            cache[key] = 3 - int(np.linalg.matrix_rank(stacked))
        dofs[i] = cache[key]
    return points, orbit_sizes, dofs


def symmetry_operations(number: int) -> tuple[np.ndarray, np.ndarray]:
    """(rotations, translations) of a space group's standard setting, centring included."""
    data = spglib.get_symmetry_from_database(standard_settings()[number][1])
    return np.asarray(data["rotations"], dtype=float), np.asarray(data["translations"], dtype=float)


def derive_positions(number: int) -> list[tuple[int, int, list[float]]]:
    """(multiplicity, dof, representative point) of each Wyckoff position, from the operations."""
    rotations, translations = symmetry_operations(number)
    points, orbit_sizes, dofs = grid_classification(rotations, translations)
    positions: list[tuple[int, int, list[float]]] = []
    fixed_seen: list[np.ndarray] = []
    for multiplicity in sorted(set(orbit_sizes[dofs == 0].tolist())):
        for point in points[(dofs == 0) & (orbit_sizes == multiplicity)]:
            if any(np.any(np.all(np.isclose(orbit, point, atol=TOLERANCE), axis=1)) for orbit in fixed_seen):
                continue
            fixed_seen.append(distinct_points(images(rotations, translations, point)))
            positions.append((int(multiplicity), 0, point.tolist()))
    for multiplicity, dof in sorted({(int(m), int(d)) for m, d in zip(orbit_sizes, dofs) if d > 0}):
        point = points[(orbit_sizes == multiplicity) & (dofs == dof)][0]
        positions.append((multiplicity, dof, point.tolist()))
    return positions


@functools.cache
def position_table() -> dict[int, list]:
    return {int(number): positions for number, positions in json.loads(TABLE_PATH.read_text()).items()}


@functools.cache
def space_group(number: int) -> SpaceGroupSymmetry:
    """Operations and Wyckoff positions of a space group (1–230) in the model's setting."""
    rotations, translations = symmetry_operations(number)
    positions = tuple(WyckoffPosition(multiplicity, dof, distinct_points(images(rotations, translations, np.array(point))))
                      for multiplicity, dof, point in position_table()[number])
    return SpaceGroupSymmetry(number, standard_settings()[number][0], rotations, translations, positions)


@functools.cache
def free_sums(number: int, limit: int = 1024) -> frozenset[int]:
    """Atom counts (≤ limit) that positions with free parameters can hold, 0 included."""
    reachable = np.zeros(limit + 1, dtype=bool)
    reachable[0] = True
    for multiplicity in space_group(number).free_multiplicities:
        for total in range(multiplicity, limit + 1):
            reachable[total] |= reachable[total - multiplicity]
    return frozenset(np.flatnonzero(reachable).tolist())


@functools.cache
def fillable(number: int, counts: tuple[int, ...], free_fixed: tuple[int, ...]) -> bool:
    """Can elements with these atom counts be placed in the group, using positions with free
    parameters any number of times and each fixed point (multiplicities `free_fixed`, the
    ones still unused) at most once?"""
    if not counts:
        return True
    first, rest = counts[0], counts[1:]
    sums = free_sums(number)
    available = sorted(set(free_fixed))
    # Fixed points of equal multiplicity are interchangeable for counting: choose how many of each.
    def choices(index: int, remaining: int, left: tuple[int, ...]):
        if index == len(available):
            yield remaining, left
            return
        multiplicity = available[index]
        for k in range(left.count(multiplicity) + 1):
            if k * multiplicity > remaining:
                break
            taken = list(left)
            for _ in range(k):
                taken.remove(multiplicity)
            yield from choices(index + 1, remaining - k * multiplicity, tuple(taken))

    return any(remaining in sums and fillable(number, rest, left) for remaining, left in choices(0, first, tuple(free_fixed)))


def fixed_multiplicities(number: int) -> tuple[int, ...]:
    return tuple(sorted(p.multiplicity for p in space_group(number).fixed_positions))


def write_table() -> None:
    table = {number: derive_positions(number) for number in range(1, 231)}
    TABLE_PATH.write_text(json.dumps(table, separators=(",", ":")))


@functools.cache
def number_of(symbol: str) -> int:
    """International Tables number of an H-M symbol as the vocabulary spells it."""
    for number, (standard_symbol, _) in standard_settings().items():
        if standard_symbol == symbol:
            return number
    raise ValueError(f"unknown space group symbol '{symbol}'")


if __name__ == "__main__":
    write_table()
    print(f"wrote {TABLE_PATH}")
