import math

import pytest

from crystallm_core.lm.conditions import (
    BAND_GAP_MAX,
    condition_vector,
    denormalise_band_gap,
    denormalise_e_hull,
    normalise_band_gap,
    normalise_e_hull,
)


def test_published_band_gap_targets_round_trip():
    # The paper's normalised targets and their eV values (reference §4).
    for normalised, ev in [(0.05, 0.072), (0.25, 0.681), (0.5, 2.440), (0.9, 12.145)]:
        assert denormalise_band_gap(normalised) == pytest.approx(ev, abs=2e-3)
        assert normalise_band_gap(ev) == pytest.approx(normalised, abs=1e-3)


def test_range_ends():
    assert normalise_band_gap(0.0) == 0.0
    assert normalise_band_gap(BAND_GAP_MAX) == pytest.approx(1.0)
    assert normalise_e_hull(5.418) == pytest.approx(1.0)
    assert denormalise_e_hull(normalise_e_hull(0.1)) == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [float("nan"), -0.1, 18.0, float("inf"), "abc"])
def test_bad_band_gap_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match="band gap"):
        normalise_band_gap(bad)


def test_bad_e_hull_message_names_the_range():
    with pytest.raises(ValueError, match=r"E_hull must be ≤ 5.418"):
        normalise_e_hull(6)


def test_missing_property_is_masked():
    values, present = condition_vector(None, 0.05)
    assert present == [False, True]
    assert values[0] == 0.0 and math.isclose(values[1], 0.05 / 5.418)
