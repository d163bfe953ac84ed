"""The one ranking of generated structures: how well each matches the targets, by the judges.

A pure function of a run's readings (no model, no pymatgen): Generate ("best N of K"), the CLI,
sweeps and campaigns (`top.csv`) all rank with `rank_scores`. The score of a valid structure is
a product of four factors, each in [0, 1]:

    score = P(gap within tolerance) × stability × uniqueness × novelty

- P(gap within tolerance), `p_hit`: the band-gap reading is a two-outcome guess, "a metal
  (0 eV) with probability P(metal), else about g ± σ". With g the reading shown
  (band_gap_pred), σ its calibrated spread (band_gap_std, at least SIGMA_FLOOR) and t ± tol
  the target band, p_hit = P(metal)·[|t| ≤ tol] + (1 − P(metal))·(Φ((t+tol−g)/σ) − Φ((t−tol−g)/σ)).
  No gap target: 1.
- stability: exp(−max(0, E_hull − E_hull target) / E_HULL_SCALE): 1 at or below the target,
  1/e at 0.1 eV/atom above it. The relaxed E_hull is used where there is one (e_hull_relaxed),
  else the static estimate (e_hull_pred). No E_hull target: 1.
- uniqueness: DUPLICATE_FACTOR for a structure that matches an earlier one of the run, else 1.
- novelty: KNOWN_FACTOR for a structure found in the training split, else 1 (unknown: 1).

A reading a row lacks (its scorer failed on it) makes that factor 0: an unverifiable structure
is not picked over a verified one. A judge missing for the whole run (no surrogate, no CHGNet)
is left out of every score instead, so the others still rank.

The gap factor comes from the same band-gap head that shows the hit: a picked structure's
predicted hit rate is what the head believes, not a measurement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

SIGMA_FLOOR = 0.05  # eV: no reading is sharper than this
E_HULL_SCALE = 0.1  # eV/atom above the target that costs a factor e
DUPLICATE_FACTOR = 0.1
KNOWN_FACTOR = 0.5
NORMAL = NormalDist()


@dataclass(frozen=True)
class RankingSettings:
    gap_tolerance: float = 0.5  # eV, as the hit tolerance
    e_hull_scale: float = E_HULL_SCALE
    duplicate_factor: float = DUPLICATE_FACTOR
    known_factor: float = KNOWN_FACTOR


def finite(value) -> bool:
    return value is not None and not pd.isna(value) and math.isfinite(float(value))


def gap_within_probability(target: float | None, reading: float | None, spread: float | None,
                           p_metal: float | None, tolerance: float) -> float | None:
    """P(|gap − target| ≤ tolerance) under the reading's mixture; 1 without a target, None
    without a reading. A missing spread counts as SIGMA_FLOOR, a missing P(metal) as 0."""
    if not finite(target):
        return 1.0
    if not finite(reading):
        return None
    sigma = max(float(spread), SIGMA_FLOOR) if finite(spread) else SIGMA_FLOOR
    metal = min(max(float(p_metal), 0.0), 1.0) if finite(p_metal) else 0.0
    low, high = (float(target) - tolerance - float(reading)) / sigma, (float(target) + tolerance - float(reading)) / sigma
    non_metal = NORMAL.cdf(high) - NORMAL.cdf(low)
    return metal * float(abs(float(target)) <= tolerance) + (1 - metal) * non_metal


def stability_factor(e_hull: float | None, target: float | None, scale: float) -> float | None:
    """1 at or below the E_hull target, exp(−excess / scale) above it; 1 without a target,
    None without an estimate."""
    if not finite(target):
        return 1.0
    if not finite(e_hull):
        return None
    return math.exp(-max(0.0, float(e_hull) - float(target)) / scale)


def known_false(flag) -> bool:
    """False as a reading (None / NaN are unknown, not False)."""
    return flag is not None and not pd.isna(flag) and not bool(flag)


def column(frame: pd.DataFrame, name: str) -> list:
    return frame[name].tolist() if name in frame else [None] * len(frame)


def rank_scores(frame: pd.DataFrame, settings: RankingSettings = RankingSettings()) -> pd.DataFrame:
    """`p_hit`, `stability` and `score` per row of a run table (NaN for invalid rows), same index.

    Columns read: valid, band_gap_target, band_gap_pred, band_gap_std, p_metal, e_hull_target,
    e_hull_pred, e_hull_relaxed (optional), unique, novel; any may be absent."""
    valid = [bool(v) if not pd.isna(v) else False for v in column(frame, "valid")]
    relaxed, static = column(frame, "e_hull_relaxed"), column(frame, "e_hull_pred")
    hulls = [r if finite(r) else s for r, s in zip(relaxed, static)]
    p_hit = [gap_within_probability(t, g, s, p, settings.gap_tolerance) for t, g, s, p in
             zip(column(frame, "band_gap_target"), column(frame, "band_gap_pred"), column(frame, "band_gap_std"),
                 column(frame, "p_metal"))]
    stability = [stability_factor(h, t, settings.e_hull_scale) for h, t in zip(hulls, column(frame, "e_hull_target"))]
    # a judge that read no valid row at all is unavailable for this run: leave its factor out
    gap_judged = any(finite(g) for g, v in zip(column(frame, "band_gap_pred"), valid) if v)
    hull_judged = any(finite(h) for h, v in zip(hulls, valid) if v)
    uniques, novels = column(frame, "unique"), column(frame, "novel")
    scores = []
    for i, ok in enumerate(valid):
        if not ok:
            scores.append(math.nan)
            continue
        gap = p_hit[i] if gap_judged else 1.0
        hull = stability[i] if hull_judged else 1.0
        unique, novel = uniques[i], novels[i]
        score = (gap or 0.0) * (hull or 0.0)
        score *= settings.duplicate_factor if known_false(unique) else 1.0
        score *= settings.known_factor if known_false(novel) else 1.0
        scores.append(score)
    as_float = lambda values: [math.nan if v is None else float(v) for v in values]  # noqa: E731
    nan_if_invalid = lambda values: [v if ok else math.nan for v, ok in zip(as_float(values), valid)]  # noqa: E731
    return pd.DataFrame({"p_hit": nan_if_invalid(p_hit), "stability": nan_if_invalid(stability), "score": scores},
                        index=frame.index)


def ranking_order(scores: pd.Series) -> list:
    """Index labels from best to worst score; rows without a score last; ties keep table order."""
    values = pd.to_numeric(scores, errors="coerce").to_numpy(float)
    keys = np.where(np.isfinite(values), -values, np.inf)
    return list(scores.index[np.argsort(keys, kind="stable")])


def pick_best(scores: pd.Series, keep: int, eligible: pd.Series | None = None) -> pd.Series:
    """True for the `keep` best-scored rows (fewer when fewer are scored, or `eligible`)."""
    allowed = pd.Series(True, index=scores.index) if eligible is None else eligible.fillna(False).astype(bool)
    picked = pd.Series(False, index=scores.index)
    chosen = [label for label in ranking_order(scores) if allowed[label] and finite(scores[label])][:max(keep, 0)]
    picked[chosen] = True
    return picked
