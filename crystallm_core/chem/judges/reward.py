"""What reward fine-tuning learns from: a generated structure's readings, judged against the
targets it was asked for (`reward`), and the targets it actually reached (`reached_targets`).

Pure functions of the judges' readings (CHGNet E_hull, the gap head's g ± σ and P(metal)),
so they are cheap and testable without a model. The reward lies in [0, 1]:
- stability: 1 within `stability_threshold` of the E_hull target, decaying as
  exp(-distance / e_hull_scale) beyond it (a target of 0.5 eV/atom asks for 0.5, not for 0);
- band gap: the probability that the gap lies within `gap_tolerance` of the target, from the
  head's own uncertainty, as the ranking computes it (`ranking.gap_within_probability`);
- the mean of the terms whose target is known; an invalid structure gets 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from crystallm_core.chem.judges.ranking import gap_within_probability
from crystallm_core.lm.conditions import BAND_GAP_MAX, E_HULL_MAX


@dataclass(frozen=True)
class RewardSettings:
    stability_threshold: float = 0.1  # eV/atom of slack around the E_hull target
    e_hull_scale: float = 0.25  # eV/atom over which the stability term falls by 1/e
    gap_tolerance: float = 0.5  # eV, as the hit rate's


def stability_term(e_hull: float | None, target: float, settings: RewardSettings) -> float:
    if e_hull is None or not math.isfinite(e_hull):
        return 0.0
    distance = max(0.0, abs(e_hull - target) - settings.stability_threshold)
    return math.exp(-distance / settings.e_hull_scale)


def reward(readings: dict, band_gap_target: float | None, e_hull_target: float | None,
           settings: RewardSettings = RewardSettings()) -> float:
    """Reward in [0, 1] of one structure's readings (keys as the scorer writes them: valid,
    e_hull_pred, band_gap_pred, band_gap_std, p_metal) against the targets asked for."""
    if not readings.get("valid"):
        return 0.0
    terms = []
    if e_hull_target is not None:
        terms.append(stability_term(readings.get("e_hull_pred"), e_hull_target, settings))
    if band_gap_target is not None:
        p_hit = gap_within_probability(band_gap_target, readings.get("band_gap_pred"), readings.get("band_gap_std"),
                                       readings.get("p_metal"), settings.gap_tolerance)
        terms.append(0.0 if p_hit is None else p_hit)  # no reading: nothing to reward
    return sum(terms) / len(terms) if terms else 1.0


def reached_targets(readings: dict) -> tuple[float | None, float | None]:
    """(band gap eV, E_hull eV/atom) the structure reached by the judges' readings, clipped to
    the model's ranges; None where there is no reading (hindsight relabelling: "unknown")."""
    def clipped(key: str, maximum: float) -> float | None:
        value = readings.get(key)
        if value is None or not math.isfinite(value):
            return None
        return min(max(float(value), 0.0), maximum)

    return clipped("band_gap_pred", BAND_GAP_MAX), clipped("e_hull_pred", E_HULL_MAX)
