"""`scoring.StructureScorer`: what the app and `evaluate` both use to score structures."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from prototypes import rocksalt_nacl, rutile_tio2

from crystallm_core.chem.judges import scoring, stability


@pytest.fixture
def no_components(monkeypatch):
    """No surrogate weights, no novelty index, no CHGNet (counted: it must be tried once only)."""
    calls = []

    def missing_chgnet():
        calls.append(1)
        raise ImportError("no chgnet")

    def unavailable():
        raise FileNotFoundError("no weights")

    monkeypatch.setattr(stability, "load_chgnet", missing_chgnet)
    monkeypatch.setitem(sys.modules, "crystallm_core.chem.judges.surrogates",
                        SimpleNamespace(BandGapSurrogate=SimpleNamespace(load=unavailable)))
    monkeypatch.setitem(sys.modules, "crystallm_core.chem.judges.novelty",
                        SimpleNamespace(NoveltyIndex=SimpleNamespace(load=unavailable)))
    scoring.load_gap_model.cache_clear()
    yield calls
    scoring.load_gap_model.cache_clear()  # do not leak the failure into other tests


def test_missing_components_are_named_once_and_never_invented(no_components, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("CHGNet must not be retried per structure")

    monkeypatch.setattr(stability, "estimate_stability", never)
    scorer = scoring.StructureScorer()
    first, second = scorer.score([rocksalt_nacl()]), scorer.score([rutile_tio2(), None])
    assert len(no_components) == 1
    assert set(scorer.unavailable) == {"band gap", "stability", "novelty"}
    assert "no chgnet" in scorer.unavailable["stability"] and "no weights" in scorer.unavailable["band gap"]
    assert first == [{}] and second == [{}, {}]


def test_a_failing_component_becomes_a_note_not_a_crash(monkeypatch):
    class BrokenSurrogate:
        def predict(self, structures, chgnet=None):
            raise RuntimeError("graph too big")

    monkeypatch.setattr(scoring, "load_gap_model", lambda: BrokenSurrogate())
    scorer = scoring.StructureScorer(stability=False, novelty=False)
    rows = scorer.score([rocksalt_nacl(), None])
    assert rows[0] == {"notes": "band gap failed: RuntimeError: graph too big"} and rows[1] == {}


def test_the_gap_model_reuses_the_stability_pass_chgnet_features(monkeypatch):
    import numpy as np

    from crystallm_core.chem.judges.stability import StabilityEstimate
    from crystallm_core.chem.judges.surrogates import GapPrediction

    features = [np.full(3, 1.0), None]  # the second structure's CHGNet pass failed
    seen = {}

    def estimates(structures, relax=False, relax_settings=None):
        return [StabilityEstimate(-4.0, -1.0, 0.05, False, 0.1, features=features[0]),
                StabilityEstimate(None, None, None, False, 0.1, "CHGNet failed: isolated atom")]

    class Surrogate:
        def predict(self, structures, chgnet=None):
            seen["chgnet"] = chgnet
            return [GapPrediction(2.0, 0.3, 0.1, head=2.0), GapPrediction(0.0, 0.05, 0.9, head=0.0)]

    monkeypatch.setattr(stability, "load_chgnet", lambda: None)
    monkeypatch.setattr(stability, "estimate_stability", estimates)
    monkeypatch.setattr(scoring, "load_gap_model", lambda: Surrogate())
    rows = scoring.StructureScorer(novelty=False, independent_gap=False).score([rocksalt_nacl(), rutile_tio2()])
    assert seen["chgnet"][0] is features[0] and seen["chgnet"][1] is None  # no second CHGNet pass here
    assert rows[0] == {"band_gap_pred": 2.0, "band_gap_std": 0.3, "p_metal": 0.1, "e_form_pred": -1.0,
                       "e_hull_pred": 0.05}  # readings of non-members (NaN) are left out
    assert rows[1]["band_gap_pred"] == 0.0 and "isolated atom" in rows[1]["notes"]


def test_the_older_ensemble_reads_beside_the_head_independently():
    """The shipped head picks and shows the hit; the GNN + LightGBM reading is filled beside it.
    The shipped v4.1 ensemble reads those members itself (they vote on P(metal)), so the separate
    older ensemble is not run again for them: both ways give the same numbers."""
    [row] = scoring.StructureScorer(stability=False, novelty=False).score([rutile_tio2()])
    assert {"band_gap_pred", "band_gap_gnn", "band_gap_gbm"} <= set(row)
    [alone] = scoring.StructureScorer(stability=False, novelty=False, independent_gap=False).score([rutile_tio2()])
    assert alone["band_gap_pred"] == pytest.approx(row["band_gap_pred"])
    assert alone.get("band_gap_gnn") == pytest.approx(row["band_gap_gnn"])
    independent = scoring.load_independent_gap_model().predict([rutile_tio2()])[0]
    assert row["band_gap_gnn"] == pytest.approx(independent.gnn, abs=1e-6)
