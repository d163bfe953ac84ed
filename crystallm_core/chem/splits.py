"""Formula-disjoint train / validation / test splits.

The split of a row depends only on its reduced formula and the seed (a hash, not a random
draw over the table), so every module — generator training, surrogates, novelty, benchmarks —
agrees on the test set without passing files around, and adding rows never moves old ones.
"""
from __future__ import annotations

import hashlib

TEST_FRACTION = 0.05
VALIDATION_FRACTION = 0.05
DEFAULT_SEED = 1


def split_of(reduced_formula: str, seed: int = DEFAULT_SEED) -> str:
    """Return "train", "val" or "test" for a reduced formula such as "SiO2"."""
    digest = hashlib.sha256(f"{seed}:{reduced_formula}".encode()).hexdigest()
    u = int(digest[:12], 16) / float(16**12)
    if u < TEST_FRACTION:
        return "test"
    if u < TEST_FRACTION + VALIDATION_FRACTION:
        return "val"
    return "train"
