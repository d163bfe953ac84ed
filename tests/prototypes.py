"""Small prototype crystals for tests, built with Structure.from_spacegroup (no data files).

Each function returns a fresh copy: from_spacegroup expands pymatgen's SpaceGroup operators,
which takes ~1 s for F-centred cubic groups, so every prototype is built once per process.
"""
from __future__ import annotations

import functools

from pymatgen.core import Lattice, Structure


def built_once(build):
    cached = functools.cache(build)

    @functools.wraps(build)
    def fresh_copy() -> Structure:
        return cached().copy()

    return fresh_copy


@built_once
def rocksalt_nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])


@built_once
def diamond_si() -> Structure:
    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.43), ["Si"], [[0, 0, 0]])


@built_once
def rutile_tio2() -> Structure:
    return Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"],
                                     [[0, 0, 0], [0.3048, 0.3048, 0]])


@built_once
def perovskite_srtio3() -> Structure:
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(3.905), ["Sr", "Ti", "O"],
                                     [[0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0, 0]])


@built_once
def wurtzite_zno() -> Structure:
    return Structure.from_spacegroup("P6_3mc", Lattice.hexagonal(3.25, 5.207), ["Zn", "O"],
                                     [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.382]])


@built_once
def fcc_cu() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(3.615), ["Cu"], [[0, 0, 0]])


PROTOTYPES = {
    "NaCl": rocksalt_nacl,
    "Si": diamond_si,
    "TiO2": rutile_tio2,
    "SrTiO3": perovskite_srtio3,
    "ZnO": wurtzite_zno,
    "Cu": fcc_cu,
}


def all_prototypes() -> dict[str, Structure]:
    """Fresh Structures keyed by name (callers may mutate them)."""
    return {name: build() for name, build in PROTOTYPES.items()}
