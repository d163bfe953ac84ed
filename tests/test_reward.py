"""The reward and the hindsight targets that reward fine-tuning learns from."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crystallm_core.chem.judges.reward import RewardSettings, reached_targets, reward

readings = st.fixed_dictionaries({
    "valid": st.booleans(),
    "e_hull_pred": st.one_of(st.none(), st.floats(-1, 6)),
    "band_gap_pred": st.one_of(st.none(), st.floats(0, 20)),
    "band_gap_std": st.one_of(st.none(), st.floats(0, 3)),
    "p_metal": st.one_of(st.none(), st.floats(0, 1)),
})
targets = st.one_of(st.none(), st.floats(0, 12.2))


@given(readings, targets, st.one_of(st.none(), st.floats(0, 0.5)))
def test_reward_lies_in_the_unit_interval_and_is_zero_for_invalid(row, gap, hull):
    value = reward(row, gap, hull)
    assert 0.0 <= value <= 1.0
    if not row["valid"]:
        assert value == 0.0


def test_stability_term_asks_for_the_target_not_for_zero():
    at = lambda e, target: reward({"valid": True, "e_hull_pred": e}, None, target)  # noqa: E731
    assert at(0.05, 0.0) == 1.0 and at(0.5, 0.5) == 1.0
    assert at(1.5, 0.0) < at(0.4, 0.0) < 1.0
    assert at(0.0, 0.5) < 1.0  # far below a 0.5 target is not what was asked for
    assert at(1.0, 0.5) == pytest.approx(math.exp(-0.4 / RewardSettings().e_hull_scale))


def test_gap_term_uses_the_metal_reading_and_the_spread():
    at = lambda gap, std, metal, target: reward(  # noqa: E731
        {"valid": True, "band_gap_pred": gap, "band_gap_std": std, "p_metal": metal}, target, None)
    assert at(0.0, 0.1, 1.0, 0.072) == pytest.approx(1.0)
    assert at(0.0, 0.1, 1.0, 3.72) == 0.0  # a metal never hits 3.7 eV
    assert at(3.7, 0.1, 0.0, 3.72) > 0.99 and at(3.7, 2.0, 0.0, 3.72) < 0.25
    assert at(None, None, None, 1.0) == 0.0


def test_reached_targets_clip_to_the_model_range_and_keep_unknowns():
    assert reached_targets({"band_gap_pred": 25.0, "e_hull_pred": -0.2}) == (17.891, 0.0)
    assert reached_targets({"band_gap_pred": float("nan")}) == (None, None)


def test_gap_term_averages_the_head_with_the_ensemble():
    row = {"valid": True, "band_gap_pred": 3.7, "band_gap_std": 0.1, "p_metal": 0.0}
    alone = reward(row, 3.72, None)
    agreeing = reward({**row, "band_gap_gnn": 3.5, "band_gap_gbm": 3.9}, 3.72, None)
    disagreeing = reward({**row, "band_gap_gnn": 0.0, "band_gap_gbm": 0.2}, 3.72, None)
    assert alone == pytest.approx(agreeing) and agreeing > 0.99
    assert disagreeing < 0.55  # one judge alone cannot earn the whole term


def test_hindsight_gap_needs_both_judges_to_agree():
    head_only = {"band_gap_pred": 0.0, "e_hull_pred": 0.3}
    assert reached_targets(head_only) == (0.0, 0.3)
    assert reached_targets({**head_only, "band_gap_gnn": 0.2, "band_gap_gbm": 0.4}) == (pytest.approx(0.15), 0.3)
    assert reached_targets({**head_only, "band_gap_gnn": 3.0, "band_gap_gbm": 2.0}) == (None, 0.3)
    assert reached_targets({**head_only, "band_gap_gnn": float("nan"), "band_gap_gbm": 3.0}) == (None, 0.3)
