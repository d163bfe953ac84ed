"""`scoring.StructureScorer`: what the app and `evaluate` both use to score structures."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from prototypes import rocksalt_nacl, rutile_tio2

from crystallm_core.chem import scoring, stability


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
    monkeypatch.setitem(sys.modules, "crystallm_core.chem.surrogates",
                        SimpleNamespace(BandGapSurrogate=SimpleNamespace(load=unavailable)))
    monkeypatch.setitem(sys.modules, "crystallm_core.chem.novelty", SimpleNamespace(NoveltyIndex=SimpleNamespace(load=unavailable)))
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
        def predict(self, structures):
            raise RuntimeError("graph too big")

    monkeypatch.setattr(scoring, "load_gap_model", lambda: BrokenSurrogate())
    scorer = scoring.StructureScorer(stability=False, novelty=False)
    rows = scorer.score([rocksalt_nacl(), None])
    assert rows[0] == {"notes": "band gap failed: RuntimeError: graph too big"} and rows[1] == {}
