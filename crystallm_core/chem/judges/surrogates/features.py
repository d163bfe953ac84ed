"""Composition + structure descriptors for the gradient-boosted band-gap reading.

Magpie-style: every element gets a row of tabulated properties (pymatgen `Element`), a
composition is summarised by fraction-weighted statistics of those rows, and the structure
adds density, packing, symmetry and nearest-neighbour geometry. The element table is also
handed to the graph network as its atom input features, so both readings share one source
of chemistry but learn independently.
"""
from __future__ import annotations

import re
import warnings
from functools import lru_cache

import numpy as np
from pymatgen.core import Element, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

MAX_Z = 103  # pymatgen tabulates properties up to lawrencium; heavier atoms are rejected
CRYSTAL_SYSTEMS = ["triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic"]
BLOCKS = {"s": 0, "p": 1, "d": 2, "f": 3}
NEIGHBOUR_RADIUS = 6.0  # Å, enough to find the nearest neighbour of every site in MP-20-like cells


def valence_shells(element: Element) -> dict[str, int]:
    """Electrons outside the noble-gas core, by orbital letter ("[Ar].3d10.4s1" -> d=10, s=1)."""
    counts = {"s": 0, "p": 0, "d": 0, "f": 0}
    for n, letter, electrons in re.findall(r"(\d)([spdf])(\d+)", element.electronic_structure.split("]")[-1]):
        counts[letter] += int(electrons)
    return counts


def quantity(value) -> float:
    """A pymatgen FloatWithUnit / float / None as a plain float (NaN when missing)."""
    return float("nan") if value is None else float(value)


def element_row(element: Element) -> dict[str, float]:
    """The tabulated properties of one element (NaN where pymatgen has no value)."""
    shells = valence_shells(element)
    unfilled = {"s": 2, "p": 6, "d": 10, "f": 14}
    row = {
        "Z": element.Z,
        "row": element.row,
        "group": element.group,
        "block": BLOCKS[element.block],
        "electronegativity": quantity(element.X),
        "atomic_radius": quantity(element.atomic_radius),
        "covalent_radius_calc": quantity(element.atomic_radius_calculated),
        "ionic_radius": quantity(element.average_ionic_radius) or float("nan"),
        "mendeleev_number": quantity(element.mendeleev_no),
        "atomic_mass": quantity(element.atomic_mass),
        "ionisation_energy": quantity(element.ionization_energy),
        "electron_affinity": quantity(element.electron_affinity),
        "melting_point": quantity(element.melting_point),
        "molar_volume": quantity(element.molar_volume),
        "is_metal": float(element.is_metal),
    }
    for letter in "spdf":
        row[f"valence_{letter}"] = shells[letter]
        row[f"unfilled_{letter}"] = unfilled[letter] - shells[letter] if shells[letter] else 0
    row["valence_total"] = sum(shells.values())
    row["unfilled_total"] = sum(row[f"unfilled_{letter}"] for letter in "spdf")
    return row


ELEMENT_PROPERTIES: list[str] = list(element_row(Element("H")))


@lru_cache(maxsize=1)
def element_table() -> np.ndarray:
    """(MAX_Z + 1, n_properties) float32; row 0 is unused; missing values → column median."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about noble-gas electronegativity
        rows = [[float("nan")] * len(ELEMENT_PROPERTIES)]
        rows += [list(element_row(Element.from_Z(z)).values()) for z in range(1, MAX_Z + 1)]
    table = np.array(rows, dtype=np.float64)
    medians = np.nanmedian(table[1:], axis=0)
    missing = np.isnan(table)
    table[missing] = np.take(medians, np.nonzero(missing)[1])
    return table.astype(np.float32)


STATS = ["mean", "min", "max", "range", "mad"]
STRUCTURE_FEATURES = [
    "n_elements", "n_sites", "frac_max", "frac_l2", "frac_l3", "frac_l5",
    "ionic_character_max", "ionic_character_mean",
    "density", "volume_per_atom", "packing_fraction", "spacegroup_number", "crystal_system",
    "nn_distance_min", "nn_distance_mean", "nn_distance_max", "nn_ratio_min", "nn_ratio_mean",
    "coordination_mean", "coordination_std",
]


def feature_names() -> list[str]:
    """Column names of `structure_features`, in order."""
    composition = [f"{stat}_{prop}" for prop in ELEMENT_PROPERTIES for stat in STATS]
    fractions = [f"frac_Z{z}" for z in range(1, MAX_Z + 1)]
    return composition + STRUCTURE_FEATURES + fractions


def composition_stats(z: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Fraction-weighted mean, min, max, range and mean absolute deviation of each property."""
    props = element_table()[z]  # (n_elements, n_properties)
    mean = fractions @ props
    low, high = props.min(axis=0), props.max(axis=0)
    mad = fractions @ np.abs(props - mean)
    return np.stack([mean, low, high, high - low, mad], axis=1).reshape(-1)


def neighbour_geometry(structure: Structure, radii: np.ndarray) -> list[float]:
    """Nearest-neighbour distances (raw and relative to summed radii) and a crude coordination number."""
    centres, neighbours, _, distances = structure.get_neighbor_list(NEIGHBOUR_RADIUS)
    n = len(structure)
    nearest = np.full(n, NEIGHBOUR_RADIUS)
    np.minimum.at(nearest, centres, distances)
    nearest_ratio = np.full(n, np.inf)
    np.minimum.at(nearest_ratio, centres, distances / (radii[centres] + radii[neighbours]))
    nearest_ratio[np.isinf(nearest_ratio)] = NEIGHBOUR_RADIUS
    # Neighbours within 20 % of a site's shortest bond: a scale-free coordination number.
    coordination = np.bincount(centres[distances <= 1.2 * nearest[centres]], minlength=n)
    return [nearest.min(), nearest.mean(), nearest.max(), nearest_ratio.min(), nearest_ratio.mean(),
            coordination.mean(), coordination.std()]


def structure_features(structure: Structure, symprec: float = 0.1) -> np.ndarray:
    """One float32 feature vector (see `feature_names`); ValueError for structures it cannot describe."""
    if not structure.is_ordered:
        raise ValueError("disordered structure (partial occupancies) is not supported")
    composition = structure.composition.fractional_composition
    z = np.array([el.Z for el in composition.elements])
    if len(z) == 0 or z.max() > MAX_Z:
        raise ValueError(f"unsupported element (Z > {MAX_Z}) or empty structure")
    fractions = np.array([composition[el] for el in composition.elements])
    electronegativity = element_table()[z, ELEMENT_PROPERTIES.index("electronegativity")]
    ionic = 1.0 - np.exp(-0.25 * np.subtract.outer(electronegativity, electronegativity) ** 2)
    site_z = np.array(structure.atomic_numbers)
    radii = element_table()[site_z, ELEMENT_PROPERTIES.index("atomic_radius")]
    analyzer = SpacegroupAnalyzer(structure, symprec=symprec)
    volume = structure.volume
    basics = [
        len(z), len(structure), fractions.max(), *(np.sum(fractions**p) ** (1 / p) for p in (2, 3, 5)),
        ionic.max(), float(fractions @ ionic @ fractions),
        structure.density, volume / len(structure), float(np.sum(4 / 3 * np.pi * radii**3) / volume),
        analyzer.get_space_group_number(), CRYSTAL_SYSTEMS.index(analyzer.get_crystal_system()),
    ]
    element_fractions = np.zeros(MAX_Z)
    element_fractions[z - 1] = fractions
    vector = np.concatenate([composition_stats(z, fractions), basics,
                             neighbour_geometry(structure, radii), element_fractions])
    return vector.astype(np.float32)
