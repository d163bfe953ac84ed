"""Formula-disjoint train / validation / test splits.

The split of a row depends only on its reduced formula and the seed (a hash, not a random
draw over the table), so every module — generator training, surrogates, novelty, benchmarks —
agrees on the test set without passing files around, and adding rows never moves old ones.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Sequence

TEST_FRACTION = 0.05
VALIDATION_FRACTION = 0.05
DEFAULT_SEED = 1


def split_of(reduced_formula: str, seed: int = DEFAULT_SEED) -> str:
    """Return "train", "val" or "test" for a reduced formula such as "SiO2"."""
    u = int(formula_hash(reduced_formula, seed)[:12], 16) / float(16**12)
    if u < TEST_FRACTION:
        return "test"
    if u < TEST_FRACTION + VALIDATION_FRACTION:
        return "val"
    return "train"


def formula_hash(reduced_formula: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{reduced_formula}".encode()).hexdigest()


def validation_split(formulas: Sequence[str], fraction: float, seed: int = DEFAULT_SEED) -> list[str]:
    """"train" / "val" per row, formula-disjoint, with about `fraction` of the rows in "val".

    For small tables (a user's fine-tuning data): whole formulas, in hash order, go to "val"
    while it holds less than `fraction` of the rows (none that would overshoot it by half);
    with two or more formulas both splits get at least one.
    """
    counts = Counter(formulas)
    ordered = sorted(counts, key=lambda f: formula_hash(f, seed))
    wanted, chosen, held = fraction * len(formulas), set(), 0
    for formula in ordered:
        if held >= wanted:
            break
        if held + counts[formula] <= 1.5 * wanted and len(chosen) < len(counts) - 1:
            chosen.add(formula)
            held += counts[formula]
    if not chosen and len(counts) > 1:
        chosen.add(min(ordered, key=counts.__getitem__))
    return ["val" if f in chosen else "train" for f in formulas]
