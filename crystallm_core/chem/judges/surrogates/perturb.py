"""Off-equilibrium copies of training structures, for a gap reading that survives generated geometry.

A generative model writes structures near, not at, a local minimum: cells a few per cent off
and atoms a tenth of an ångström away from where a relaxation would put them. The training rows
are all relaxed (DFT minima), so a head trained on them alone has never seen that geometry.
`perturbed` makes a copy with a random symmetric strain of the cell and a random displacement of
every atom; `train_head --augment N` trains on N such copies of each train row, labelled with the
original row's gap (a small distortion rarely changes a PBE gap much, and the aim is a reading of
the structure the model *meant*).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pymatgen.core import Lattice, Structure


@dataclass(frozen=True)
class Perturbation:
    strain: float = 0.03  # standard deviation of each component of the symmetric strain tensor
    jitter: float = 0.05  # Å, standard deviation of each Cartesian component of an atom's displacement


def perturbed(structure: Structure, rng: np.random.Generator, perturbation: Perturbation = Perturbation()) -> Structure:
    """A strained, jittered copy of `structure` (same species and order)."""
    noise = rng.normal(0.0, perturbation.strain, (3, 3))
    deformation = np.eye(3) + (noise + noise.T) / 2
    lattice = Lattice(structure.lattice.matrix @ deformation)
    cart = lattice.get_cartesian_coords(structure.frac_coords)
    cart = cart + rng.normal(0.0, perturbation.jitter, cart.shape)
    return Structure(lattice, structure.species, cart, coords_are_cartesian=True)


def perturbed_rows(table: pd.DataFrame, copies: int, perturbation: Perturbation = Perturbation(), seed: int = 0,
                   ) -> pd.DataFrame:
    """`copies` perturbed CIFs of each row of `table` (columns id, cif, ...): ids "<id>~<k>", the
    other columns copied. Row i's k-th copy depends only on (seed, i, k), so a cache of their
    features stays valid when more copies are asked for."""
    out = []
    for i, row in enumerate(table.itertuples(index=False)):
        structure = Structure.from_str(row.cif, fmt="cif")
        for k in range(copies):
            rng = np.random.default_rng([seed, i, k])
            out.append({**row._asdict(), "id": f"{row.id}~{k}",
                        "cif": perturbed(structure, rng, perturbation).to(fmt="cif")})
    return pd.DataFrame(out, columns=table.columns)
