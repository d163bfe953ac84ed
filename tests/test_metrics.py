"""Uniqueness, novelty, flags and aggregated rates (denominator = all samples)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from prototypes import diamond_si, rocksalt_nacl, rutile_tio2
from pymatgen.core import Lattice, Structure

from crystallm_core.chem.judges import metrics
from crystallm_core.chem.judges.novelty import (
    NOVELTY_INDEX_PATH,
    NoveltyIndex,
    decode_structure,
    encode_structure,
)


def perturbed(structure: Structure, amount: float = 0.02, seed: int = 0) -> Structure:
    out = structure.copy()
    out.perturb(amount, min_distance=amount / 2, seed=seed)
    return out


@pytest.fixture
def tiny_index() -> NoveltyIndex:
    """A 'training set' holding rock-salt NaCl and rutile TiO2."""
    return NoveltyIndex({"NaCl": [encode_structure(rocksalt_nacl())], "TiO2": [encode_structure(rutile_tio2())]})


def test_uniqueness_same_prototype_twice():
    nacl = rocksalt_nacl()
    supercell = nacl.copy()
    supercell.make_supercell([2, 1, 1])
    cscl_type = Structure(Lattice.cubic(3.3), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # other polymorph
    batch = [nacl, perturbed(nacl), supercell, diamond_si(), None, cscl_type]
    assert metrics.uniqueness_flags(batch) == [True, False, False, True, None, True]


def test_uniqueness_prefers_valid_structures():
    nacl = rocksalt_nacl()
    # the invalid copy comes first, but the valid one keeps the "unique" slot
    assert metrics.uniqueness_flags([nacl, perturbed(nacl)], valid=[False, True]) == [False, True]


def test_encode_roundtrip_and_novelty(tiny_index):
    decoded = decode_structure(encode_structure(rutile_tio2()))
    assert np.allclose(decoded.lattice.abc, rutile_tio2().lattice.abc, atol=1e-4)
    assert tiny_index.is_novel(perturbed(rocksalt_nacl())) is False
    assert tiny_index.is_novel(Structure(Lattice.cubic(3.3), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])) is True
    assert tiny_index.is_novel(diamond_si()) is True  # formula never seen
    assert tiny_index.known_formula("NaCl") and not tiny_index.known_formula("Si")
    assert metrics.novelty_flags([rutile_tio2(), None], tiny_index) == [False, None]


def test_index_save_load(tmp_path, tiny_index):
    path = tmp_path / "index.json.gz"
    tiny_index.save(path)
    loaded = NoveltyIndex.load(path)
    assert len(loaded) == 2 and loaded.is_novel(rocksalt_nacl()) is False
    with pytest.raises(FileNotFoundError, match="--build"):
        NoveltyIndex.load(tmp_path / "missing.json.gz")


@pytest.mark.skipif(not NOVELTY_INDEX_PATH.exists(), reason="shipped novelty index not built")
def test_shipped_index_knows_its_training_structures():
    index = NoveltyIndex.load()
    assert len(index) > 10_000
    formula = next(iter(index.entries))
    known = decode_structure(index.entries[formula][0])
    assert index.is_novel(perturbed(known, 0.01)) is False


def flag_frame() -> pd.DataFrame:
    """Five samples: an invalid one, a duplicate, a known one, and two new ones (one unstable)."""
    return pd.DataFrame({
        "valid": [False, True, True, True, True],
        "unique": [None, False, True, True, True],
        "novel": [None, True, False, True, True],
        "e_hull_pred": [np.nan, 0.0, 0.05, 0.08, 0.3],
        "band_gap_pred": [np.nan, 1.4, 0.9, 2.2, 1.6],
    })


def test_flags_and_rates_over_all_samples():
    df = metrics.add_flags(flag_frame(), band_gap_target=1.5)
    assert df["stable"].tolist() == [None, True, True, True, False]
    assert df["hit"].tolist() == [None, True, False, False, True]
    assert df["vsun"].tolist() == [False, False, False, True, False]
    assert metrics.funnel_counts(df) == {"generated": 5, "valid": 4, "unique": 3, "novel": 2, "stable": 1}
    s = metrics.summarise(df, band_gap_target=1.5)
    assert (s["valid"], s["valid_unique"], s["valid_unique_novel"], s["vsun"]) == (0.8, 0.6, 0.4, 0.2)
    assert s["hit"] == pytest.approx(0.4) and s["stable"] == pytest.approx(0.6) and s["vsun_hit"] == 0.0
    assert s["mean_abs_error"] == pytest.approx((0.1 + 0.6 + 0.7 + 0.1) / 4)


def test_thresholds_are_configurable_and_targets_optional():
    strict = metrics.MetricSettings(stability_threshold=0.01, hit_tolerance=1.0)
    df = metrics.add_flags(flag_frame(), band_gap_target=1.5, settings=strict)
    assert df["stable"].tolist() == [None, True, False, False, False]
    assert df["hit"].tolist() == [None, True, True, True, True]
    no_target = metrics.add_flags(flag_frame())
    assert no_target["hit"].isna().all() and metrics.summarise(no_target)["hit"] == 0.0
    assert math.isnan(metrics.summarise(no_target)["mean_abs_error"])


def test_hit_rate_curve_is_monotone():
    curve = metrics.hit_rate_curve([0.0, 1.0, 2.0, None], [True, True, False, True], target=1.0)
    assert curve["hit_rate"].is_monotonic_increasing
    assert curve.set_index("tolerance").loc[0.5, "hit_rate"] == 0.25  # 1 hit / 4 samples
    assert curve["hit_rate"].iloc[-1] == 0.5  # the invalid sample never hits


def test_empty_batch():
    empty = metrics.add_flags(pd.DataFrame(columns=["valid", "unique", "novel", "e_hull_pred", "band_gap_pred"]))
    assert metrics.funnel_counts(empty)["generated"] == 0
    assert math.isnan(metrics.summarise(empty)["valid"])
