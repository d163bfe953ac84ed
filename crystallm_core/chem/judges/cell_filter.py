"""ASE's FrechetCellFilter (positions and cell relaxed together), with two costs taken out.

Profiled on 16 generated structures relaxed together (one torch thread), a quarter of the
wall time went to the filter rather than to CHGNet:
- `scipy.linalg.logm` of the 3×3 deformation gradient, ~3 ms per call on a CPU (its general
  inverse-scaling-and-squaring algorithm); a deformation gradient is a small, diagonalisable
  matrix near the identity, whose log an eigendecomposition gives in ~30 µs;
- the filter's forces (the matrix log plus nine Fréchet derivatives) recomputed for the same
  geometry: the convergence test and the optimiser's step each ask for them, so they are kept until
  the atoms move.
Same math, same steps: the relaxation's trajectory is unchanged up to rounding.
"""
from __future__ import annotations

import numpy as np
from ase.filters import FrechetCellFilter
from scipy.linalg import logm

# Beyond it the eigendecomposition loses digits and scipy decides. A defective matrix (a shear
# I + e·E12) has eigenvectors of condition ~1e16·e whose eigen-log misses the shear, an error of
# ~e; at 1e6 that error stays below 1e-10 (at 1e8 hypothesis found e = 1e-8 read as 0).
LARGEST_EIGENVECTOR_CONDITION = 1e6


def logm_3x3(matrix: np.ndarray) -> np.ndarray:
    """The principal matrix log of a real 3×3 matrix: by eigendecomposition where it is
    well-conditioned and the log is real, else by scipy's general algorithm."""
    values, vectors = np.linalg.eig(matrix)
    negative_real = (np.abs(values.imag) < 1e-12) & (values.real <= 0)
    if not negative_real.any() and np.linalg.cond(vectors) < LARGEST_EIGENVECTOR_CONDITION:
        log = (vectors * np.log(values.astype(complex))) @ np.linalg.inv(vectors)
        if np.abs(log.imag).max() < 1e-10:
            return log.real
    return np.real_if_close(logm(matrix))


class FastFrechetCellFilter(FrechetCellFilter):
    """FrechetCellFilter with `logm_3x3` and its forces remembered for the current geometry."""

    def __init__(self, atoms) -> None:
        super().__init__(atoms)
        self._utility.logm = logm_3x3
        self.remembered: tuple[bytes, np.ndarray] | None = None

    def get_forces(self, **kwargs) -> np.ndarray:
        # the calculator's results belong to the geometry, so the filter's forces do too
        geometry = self.atoms.positions.tobytes() + self.atoms.cell.array.tobytes() + repr(sorted(kwargs.items())).encode()
        if self.remembered is None or self.remembered[0] != geometry:
            self.remembered = (geometry, super().get_forces(**kwargs))
        return self.remembered[1].copy()
