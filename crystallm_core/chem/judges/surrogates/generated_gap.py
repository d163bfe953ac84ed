"""How our band-gap readings rank generated, unrelaxed structures against a published reading.

The published CrystaLLM-pi generations (`extra/crystallm_pi_generated_dev.csv.gz`) carry the
ALIGNN gap of each structure as written. Here: a fixed split of those rows into a calibration
half (anything fitted reads only these) and a held-out half (what is reported), and the
agreement of a reading with ALIGNN's as Spearman's rank correlation and MAE, each with a
bootstrap 95 % interval, and a paired interval for the difference between two readings.
numpy / scipy only: `scripts/measure_generated_gap.py` does the parsing, checking and reading.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

CALIBRATION, HELD_OUT = "calibration", "held_out"


def split_halves(targets: np.ndarray, seed: int = 0) -> np.ndarray:
    """CALIBRATION or HELD_OUT per row: half of each target's rows at random (fixed seed), so that
    both halves see every requested band gap equally often."""
    rng = np.random.default_rng(seed)
    out = np.full(len(targets), HELD_OUT, dtype=object)
    for target in np.unique(targets):
        rows = rng.permutation(np.nonzero(targets == target)[0])
        out[rows[:len(rows) // 2]] = CALIBRATION
    return out.astype(str)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties: many readings are exactly 0 eV)."""
    rx, ry = rankdata(x), rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def agreement(reading: np.ndarray, reference: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """n, Spearman and MAE of `reading` against `reference`, each with a bootstrap 95 % interval."""
    rng = np.random.default_rng(seed)
    samples = [rng.integers(0, len(reading), len(reading)) for _ in range(n_boot)]
    rho = [spearman(reading[s], reference[s]) for s in samples]
    mae = [np.mean(np.abs(reading[s] - reference[s])) for s in samples]
    return {"n": len(reading), "spearman": round(spearman(reading, reference), 4),
            "spearman_ci": [round(float(v), 4) for v in np.nanpercentile(rho, [2.5, 97.5])],
            "mae": round(float(np.mean(np.abs(reading - reference))), 4),
            "mae_ci": [round(float(v), 4) for v in np.percentile(mae, [2.5, 97.5])]}


def paired_difference(new: np.ndarray, old: np.ndarray, reference: np.ndarray, n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """Spearman and MAE of `new` minus those of `old` on the same rows, with paired bootstrap 95 %
    intervals (the same resampled rows for both readings)."""
    rng = np.random.default_rng(seed)
    d_rho, d_mae = [], []
    for _ in range(n_boot):
        s = rng.integers(0, len(new), len(new))
        d_rho.append(spearman(new[s], reference[s]) - spearman(old[s], reference[s]))
        d_mae.append(np.mean(np.abs(new[s] - reference[s])) - np.mean(np.abs(old[s] - reference[s])))
    return {"d_spearman": round(spearman(new, reference) - spearman(old, reference), 4),
            "d_spearman_ci": [round(float(v), 4) for v in np.nanpercentile(d_rho, [2.5, 97.5])],
            "d_mae": round(float(np.mean(np.abs(new - reference)) - np.mean(np.abs(old - reference))), 4),
            "d_mae_ci": [round(float(v), 4) for v in np.percentile(d_mae, [2.5, 97.5])]}
