"""What reward fine-tuning learns from: a generated structure's readings, judged against the
targets it was asked for (`reward`), and the targets it actually reached (`reached_targets`).

Pure functions of the judges' readings (CHGNet E_hull, the gap head's g ± σ and P(metal), the
graph ensemble's GNN and LightGBM readings), so they are cheap and testable without a model.
The reward lies in [0, 1]:
- stability: 1 within `stability_threshold` of the E_hull target, decaying as
  exp(-distance / e_hull_scale) beyond it (a target of 0.5 eV/atom asks for 0.5, not for 0);
- band gap, from both gap judges: the mean of the head's probability that the gap lies within
  `gap_tolerance` of the target (`ranking.gap_within_probability`) and the ensemble's closeness
  (1 within the tolerance, decaying beyond it). On a generated, unrelaxed structure the head
  reads "metal" for most samples (63 % below 0.1 eV in a first align round, none above 1.5 eV)
  where the ensemble spreads 0–6.6 eV: one judge alone is too easy to game or too blind;
- the mean of the terms whose target is known; an invalid structure gets 0.
`reached_targets` labels a structure with the gap only where the two judges agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from crystallm_core.chem.judges.ranking import finite, gap_within_probability
from crystallm_core.lm.conditions import BAND_GAP_MAX, E_HULL_MAX


@dataclass(frozen=True)
class RewardSettings:
    stability_threshold: float = 0.1  # eV/atom of slack around the E_hull target
    e_hull_scale: float = 0.25  # eV/atom over which the stability term falls by 1/e
    gap_tolerance: float = 0.5  # eV, as the hit rate's
    judges_agree_within: float = 0.75  # eV: a hindsight gap label needs the head and the ensemble this close


def closeness(value: float | None, target: float, slack: float, scale: float) -> float:
    """1 within `slack` of the target, exp(-excess / scale) beyond it; 0 without a reading."""
    if not finite(value):
        return 0.0
    return math.exp(-max(0.0, abs(value - target) - slack) / scale)


def stability_term(e_hull: float | None, target: float, settings: RewardSettings) -> float:
    return closeness(e_hull, target, settings.stability_threshold, settings.e_hull_scale)


def ensemble_reading(readings: dict) -> float | None:
    """The graph ensemble's gap: the mean of its GNN and LightGBM readings present (None if neither)."""
    values = [readings.get(k) for k in ("band_gap_gnn", "band_gap_gbm") if finite(readings.get(k))]
    return sum(values) / len(values) if values else None


def gap_term(readings: dict, target: float, settings: RewardSettings) -> float:
    """The head's P(hit), averaged with the ensemble's closeness where the ensemble read the structure."""
    p_hit = gap_within_probability(target, readings.get("band_gap_pred"), readings.get("band_gap_std"),
                                   readings.get("p_metal"), settings.gap_tolerance)
    head = 0.0 if p_hit is None else p_hit  # no reading: nothing to reward
    ensemble = ensemble_reading(readings)
    if ensemble is None:
        return head
    return (head + closeness(ensemble, target, settings.gap_tolerance, settings.gap_tolerance)) / 2


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
        terms.append(gap_term(readings, band_gap_target, settings))
    return sum(terms) / len(terms) if terms else 1.0


def consensus_gap(readings: dict, settings: RewardSettings = RewardSettings()) -> float | None:
    """The gap both judges vouch for: the mean of the head's and the ensemble's readings when
    they agree within `judges_agree_within`, None when they disagree; the head's reading where
    the ensemble did not read. On a first round's unrelaxed samples the head alone read
    ≤ 1.5 eV for every one (63 % below 0.1 eV) where the ensemble spread 0–6.6 eV: labels from
    one judge would teach the gap encoder that nearly everything is a metal."""
    head, ensemble = readings.get("band_gap_pred"), ensemble_reading(readings)
    if not finite(head):
        return None
    if ensemble is None:
        return float(head)
    return (head + ensemble) / 2 if abs(head - ensemble) <= settings.judges_agree_within else None


def reached_targets(readings: dict, settings: RewardSettings = RewardSettings()) -> tuple[float | None, float | None]:
    """(band gap eV, E_hull eV/atom) the structure reached by the judges' readings, clipped to
    the model's ranges; None where there is no reading or the gap judges disagree (hindsight
    relabelling: "unknown")."""
    def clipped(value, maximum: float) -> float | None:
        return min(max(float(value), 0.0), maximum) if finite(value) else None

    return clipped(consensus_gap(readings, settings), BAND_GAP_MAX), clipped(readings.get("e_hull_pred"), E_HULL_MAX)
