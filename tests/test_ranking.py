"""The ranking score: a pure function of the judges' readings (chem/judges/ranking.py)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crystallm_core.chem.judges.ranking import (
    RankingSettings,
    gap_within_probability,
    pick_best,
    rank_scores,
    ranking_order,
    stability_factor,
)

gaps = st.floats(0, 12)
spreads = st.floats(0, 3)
probabilities = st.floats(0, 1)


def row(**values) -> dict:
    base = dict(valid=True, band_gap_target=2.0, band_gap_pred=2.0, band_gap_std=0.3, p_metal=0.1,
                e_hull_target=0.0, e_hull_pred=0.0, unique=True, novel=True)
    return {**base, **values}


@given(gaps, gaps, spreads, probabilities, st.floats(0.05, 2))
def test_gap_probability_is_a_probability(target, reading, spread, p_metal, tolerance):
    p = gap_within_probability(target, reading, spread, p_metal, tolerance)
    assert 0.0 <= p <= 1.0 + 1e-12


@given(st.floats(0.6, 12), spreads, probabilities)
def test_gap_probability_falls_as_the_reading_moves_away(target, spread, p_metal):
    near = gap_within_probability(target, target, spread, p_metal, 0.5)
    far = gap_within_probability(target, target + 2.0, spread, p_metal, 0.5)
    assert near >= far


@given(gaps, spreads, st.floats(0.05, 2))
def test_a_wider_tolerance_never_lowers_the_probability(reading, spread, tolerance):
    assert gap_within_probability(1.5, reading, spread, 0.2, tolerance + 0.5) >= \
        gap_within_probability(1.5, reading, spread, 0.2, tolerance) - 1e-12


def test_gap_probability_cases():
    # a sure non-metal read exactly at the target, sharp: almost certainly within ±0.5
    assert gap_within_probability(2.0, 2.0, 0.05, 0.0, 0.5) == pytest.approx(1.0)
    # one spread each side: the normal's 68 %
    assert gap_within_probability(2.0, 2.0, 0.5, 0.0, 0.5) == pytest.approx(0.6827, abs=1e-3)
    # a sure metal hits a target near 0 and misses one at 2 eV
    assert gap_within_probability(0.2, 3.0, 0.3, 1.0, 0.5) == pytest.approx(1.0)
    assert gap_within_probability(2.0, 0.0, 0.3, 1.0, 0.5) == pytest.approx(0.0)
    assert gap_within_probability(None, 5.0, 0.3, 0.5, 0.5) == 1.0  # no target: anything goes
    assert gap_within_probability(2.0, None, 0.3, 0.5, 0.5) is None  # no reading: unknown


def test_stability_factor():
    assert stability_factor(-0.05, 0.0, 0.1) == 1.0
    assert stability_factor(0.1, 0.0, 0.1) == pytest.approx(math.exp(-1))
    assert stability_factor(0.3, 0.25, 0.1) == pytest.approx(math.exp(-0.5))
    assert stability_factor(None, 0.0, 0.1) is None
    assert stability_factor(1.0, None, 0.1) == 1.0


@given(st.lists(st.tuples(gaps, spreads, probabilities, st.floats(-0.2, 2), st.booleans(), st.booleans(),
                          st.booleans()), min_size=1, max_size=20))
@settings(max_examples=60, deadline=None)
def test_scores_lie_in_0_1_and_invalid_rows_have_none(rows):
    frame = pd.DataFrame([row(band_gap_pred=g, band_gap_std=s, p_metal=p, e_hull_pred=e, valid=v, unique=u, novel=n)
                          for g, s, p, e, v, u, n in rows])
    scores = rank_scores(frame)
    valid = frame["valid"].to_numpy()
    assert scores["score"][valid].between(0, 1).all()
    assert scores["score"][~valid].isna().all()


def test_ranking_prefers_hits_stability_uniqueness_and_novelty():
    frame = pd.DataFrame([
        row(),  # 0: on target, on the hull
        row(band_gap_pred=0.0, p_metal=0.9),  # 1: a metal
        row(e_hull_pred=0.4),  # 2: far above the hull
        row(unique=False),  # 3: a duplicate of an earlier structure
        row(novel=False),  # 4: in the training set
        row(valid=False),  # 5: invalid
        row(band_gap_pred=float("nan")),  # 6: its gap could not be read
    ])
    scores = rank_scores(frame)
    order = ranking_order(scores["score"])
    assert order[0] == 0 and order[-1] == 5
    assert scores["score"][4] > scores["score"][3]
    assert scores["score"][6] == 0.0
    assert pick_best(scores["score"], 2).tolist() == [True, False, False, False, True, False, False]


def test_relaxed_hull_is_preferred_over_static():
    frame = pd.DataFrame([row(e_hull_pred=0.5, e_hull_relaxed=0.0), row(e_hull_pred=0.5)])
    scores = rank_scores(frame)
    assert scores["stability"].tolist() == pytest.approx([1.0, math.exp(-5)])


def test_a_judge_missing_for_the_whole_run_is_left_out():
    frame = pd.DataFrame([row(e_hull_pred=None, band_gap_pred=2.0), row(e_hull_pred=None, band_gap_pred=4.0)])
    scores = rank_scores(frame)
    assert scores["score"][0] > scores["score"][1] > 0  # ranked by the gap alone, not all 0


def test_tolerance_comes_from_the_settings():
    frame = pd.DataFrame([row(band_gap_pred=3.0, band_gap_std=0.05, p_metal=0.0)])
    assert rank_scores(frame, RankingSettings(gap_tolerance=0.5))["p_hit"][0] == pytest.approx(0.0, abs=1e-6)
    assert rank_scores(frame, RankingSettings(gap_tolerance=1.5))["p_hit"][0] == pytest.approx(1.0)


@given(st.lists(st.one_of(st.none(), st.floats(0, 1)), max_size=30), st.integers(0, 40))
def test_pick_best_takes_the_top_scored(values, keep):
    scores = pd.Series([float("nan") if v is None else v for v in values], dtype=float)
    picked = pick_best(scores, keep)
    scored = scores.notna()
    assert picked.sum() == min(keep, int(scored.sum()))
    if picked.any() and (~picked & scored).any():
        assert scores[picked].min() >= scores[~picked & scored].max()


def test_pick_best_only_among_eligible():
    scores = pd.Series([0.9, 0.8, 0.7])
    assert pick_best(scores, 2, pd.Series([False, True, True])).tolist() == [False, True, True]
