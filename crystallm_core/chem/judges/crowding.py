"""Atoms piled on top of each other: kept away from native and learned code, with the reason.

A CIF whose symmetry operations put atoms on top of each other can still have a sane cell.
CHGNet then builds the graph of every pair of atoms within 6 Å and every pair of bonds within
3 Å: a P2_1/c cell of 84 sites in two clumps took 3.5 GB, the one of issue 24 (1,294 pairs
closer than 0.5 Å) 17 GB, and a folder of them ran `evaluate` out of memory. spglib and CrystalNN also run
native code on such cells. `crowding_problem` says why a structure must not reach them.

The checks go from cheap to dear, so the check itself stays bounded in memory: the density
first (atoms per Å³, no neighbour search), then the closest pair (a neighbour search of
0.5 Å), then the neighbours within CHGNet's cutoffs; every search with a radius that keeps
pymatgen's cell list small (`search_radius`). Once no two atoms are closer than 0.5 Å,
at most ~1,600 fit within 3 Å of one atom, so even the 2,000-site cells the checker admits
cannot make these lists large.

The limits are several times the largest values of 6,000 MP-20 structures (measured with
pymatgen's get_neighbor_list): density 0.17 atoms/Å³ (CrH2), 24 neighbours within 3 Å (MB12
borides), 324 bond pairs per atom (CrN), closest pair 0.75 Å (an H–H pair). What CHGNet can
take in one pass also grows with the cell: `chgnet_problem` bounds that for the scorers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymatgen.core import Structure


@dataclass(frozen=True)
class CrowdingLimits:
    min_distance: float = 0.5         # Å between any two atoms
    max_density: float = 0.5          # atoms per Å³ (MP-20: at most 0.17)
    bond_cutoff: float = 3.0          # Å, CHGNet's bond graph
    atom_cutoff: float = 6.0          # Å, CHGNet's atom graph
    # Neighbours of one atom: MP-20 has at most 24 within 3 Å and 138 within 6 Å; rutile squeezed to
    # 60 % of its cell lengths has 52 and ~400 (the bond check, not this guard, should name that fault).
    max_bond_neighbours: int = 100    # within bond_cutoff
    max_atom_neighbours: int = 800    # within atom_cutoff
    # CHGNet's line graph holds every pair of bonds that share an atom: ~25 kB each on CPU (a
    # 96-site CrN cell has 31,104 and took 0.77 GB). The budget bounds one structure and a batch
    # (`chgnet_problem`, `stability.graph_batches`); it grows with the cell, so it is no verdict
    # on the crystal, only on what CHGNet can take in one pass.
    max_bond_pairs: int = 40_000


@dataclass(frozen=True)
class GraphSize:
    """How big CHGNet's graphs of a structure are."""

    bonds: int        # directed pairs within bond_cutoff
    bond_pairs: int   # pairs of bonds that share an atom (CHGNet's angles)
    atom_edges: int   # directed pairs within atom_cutoff


# pymatgen's neighbour search sorts the sites into cubes of the search radius over their bounding
# box: about 32 bytes a cube, so a 0.5 Å search in a 300 Å cell took 0.9 GB (a 900 Å one, 21 GB).
MAX_SEARCH_CUBES = 2_000_000


def search_radius(structure: Structure, cutoff: float) -> float:
    """`cutoff`, or more where the sites' bounding box would hold over MAX_SEARCH_CUBES cubes of it
    (a bigger radius only adds pairs, few in such a sparse cell, that the caller drops)."""
    extent = np.ptp(structure.cart_coords, axis=0)
    radius = cutoff
    while np.prod(extent / radius + 3) > MAX_SEARCH_CUBES:
        radius *= 1.25
    return radius


def neighbour_list(structure: Structure, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`Structure.get_neighbor_list(cutoff)` (centres, neighbours, images, distances) with its memory
    bounded: `search_radius`, then the pairs beyond `cutoff` dropped."""
    centres, neighbours, images, distances = structure.get_neighbor_list(search_radius(structure, cutoff))
    keep = distances <= cutoff
    return centres[keep], neighbours[keep], images[keep], distances[keep]


def neighbour_counts(structure: Structure, cutoff: float) -> np.ndarray:
    """Neighbours of each site within `cutoff` (periodic images included, the site itself not)."""
    centres, neighbours, images, _ = neighbour_list(structure, cutoff)
    itself = (centres == neighbours) & ~images.any(axis=1)
    return np.bincount(centres[~itself], minlength=len(structure))


def graph_size(structure: Structure, limits: CrowdingLimits = CrowdingLimits()) -> GraphSize:
    """The size of CHGNet's graphs; only for structures `crowding_problem` accepts."""
    bonds = neighbour_counts(structure, limits.bond_cutoff)
    return GraphSize(int(bonds.sum()), int((bonds.astype(np.int64) ** 2).sum()),
                     int(neighbour_counts(structure, limits.atom_cutoff).sum()))


def closest_pair_problem(structure: Structure, min_distance: float) -> str | None:
    centres, neighbours, images, distances = neighbour_list(structure, min_distance)
    other = (centres != neighbours) | images.any(axis=1)
    if not other.any():
        return None
    k = int(np.argmin(np.where(other, distances, np.inf)))
    i, j = int(centres[k]), int(neighbours[k])
    close_pairs = int(other.sum()) // 2
    many = f"; {close_pairs} pairs are closer than that" if close_pairs > 1 else ""
    return (f"atoms {i} ({structure[i].species_string}) and {j} ({structure[j].species_string}) are "
            f"{distances[k]:.2f} Å apart (< {min_distance} Å){many}")


def crowding_problem(structure: Structure, limits: CrowdingLimits = CrowdingLimits()) -> str | None:
    """Why a structure's atoms are too close or too many for CHGNet, spglib and CrystalNN (None if
    they are not). Only for structures with a sane cell (`validity.structure_problem` checks both)."""
    density = len(structure) / structure.volume
    if density > limits.max_density:
        return (f"{len(structure)} atoms in {structure.volume:.3g} Å³ is {density:.2f} atoms/Å³, denser "
                f"than any solid (limit {limits.max_density})")
    problem = closest_pair_problem(structure, limits.min_distance)
    if problem:
        return problem
    for cutoff, most, graph in ((limits.bond_cutoff, limits.max_bond_neighbours, "bond"),
                                (limits.atom_cutoff, limits.max_atom_neighbours, "atom")):
        counts = neighbour_counts(structure, cutoff)
        if counts.max(initial=0) > most:
            i = int(np.argmax(counts))
            return (f"atom {i} ({structure[i].species_string}) has {counts[i]} neighbours within {cutoff:g} Å "
                    f"(limit {most}): too crowded for CHGNet's {graph} graph")
    return None


def chgnet_problem(structure: Structure, limits: CrowdingLimits = CrowdingLimits()) -> str | None:
    """Why CHGNet's graphs of a (not crowded) structure are too big for one pass; None if they are not."""
    bond_pairs = graph_size(structure, limits).bond_pairs
    if bond_pairs > limits.max_bond_pairs:
        return (f"too large to score: {bond_pairs:,} pairs of bonds within {limits.bond_cutoff:g} Å make CHGNet's "
                f"line graph bigger than its limit of {limits.max_bond_pairs:,} (about 1 GB)")
    return None
