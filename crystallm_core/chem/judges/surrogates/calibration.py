"""The "±" of a band-gap reading: a spread derived from the model, rescaled on held-out rows.

numpy only. A gated reading is a two-outcome guess: "metal (0 eV) with probability p, else a
gap g known to about ±sigma". `mixture_spread` is the standard deviation of that guess about
the reading shown; `fit_scale` finds the factor k so that |error| <= k * spread on a target
share of held-out rows (68 %: what "±1" means for a normal error), and `coverage` checks it.

Metals read as 0 eV are exactly right most of the time, so on a set with many metals the share
of rows with zero error alone can exceed 68 %: no rescaling brings coverage down to it there.
The scale is therefore fitted on rows read as non-metals (the gaps the app shows as "g ± s").
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

TARGET_COVERAGE = 0.68


def mixture_spread(p_metal: np.ndarray, gap: np.ndarray, reading: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Standard deviation, about `reading`, of "0 eV with probability p_metal, else gap ± sigma"."""
    p, gap, reading, sigma = (np.asarray(a, dtype=float) for a in (p_metal, gap, reading, sigma))
    return np.sqrt(p * reading**2 + (1 - p) * ((gap - reading) ** 2 + sigma**2))


def coverage(error: np.ndarray, spread: np.ndarray, k: float = 1.0) -> float:
    """Share of rows whose absolute error is within k spreads."""
    return float(np.mean(np.abs(np.asarray(error)) <= k * np.asarray(spread)))


def fit_scale(error: np.ndarray, spread: np.ndarray, target: float = TARGET_COVERAGE) -> float:
    """Smallest k with coverage(error, spread, k) >= target."""
    ratios = np.sort(np.abs(np.asarray(error, dtype=float)) / np.maximum(np.asarray(spread, dtype=float), 1e-9))
    return float(ratios[max(int(np.ceil(target * len(ratios))) - 1, 0)])


def reliability_curve(error: np.ndarray, spread: np.ndarray,
                      nominal: np.ndarray = np.round(np.arange(0.05, 1.0, 0.05), 2)) -> dict[str, list[float]]:
    """Observed share of rows inside the central interval of each nominal probability (±z spreads,
    z from a normal distribution): on the diagonal when the spread is calibrated."""
    z = [NormalDist().inv_cdf(0.5 + p / 2) for p in nominal]
    return {"nominal": [float(p) for p in nominal], "observed": [coverage(error, spread, k) for k in z]}
