"""`python -m crystallm_core evaluate PATH` and `evaluate_run`: hand-made folders, runs and app zips."""
from __future__ import annotations

import argparse
import json
import math

import pandas as pd
import pytest
from prototypes import diamond_si, rocksalt_nacl, rutile_tio2
from run_samples import sample_run, written_cif
from test_validity import ZERO_ANGLE_CIF

import crystallm_core.chem.judges.surrogates
from crystallm_core.chem.judges import scoring, stability
from crystallm_core.chem.data.hull import HullReference
from crystallm_core.chem.judges.novelty import NoveltyIndex, encode_structure
from crystallm_core.product import evaluate
from crystallm_core.product.history import HistoryStore
from crystallm_core.product.run_files import read_run, run_zip, write_run


class FakeSurrogate:
    """Predicts 1.2 eV for everything (the real weights are not needed to test the plumbing)."""

    @classmethod
    def load(cls):
        return cls()

    def predict(self, structures, chgnet=None):
        from crystallm_core.chem.judges.surrogates.ensemble import GapPrediction

        return [GapPrediction(mean=1.2, std=0.1, gnn=1.1, gbm=1.3, p_metal=0.2, reason=None) for _ in structures]


class MissingSurrogate:
    @classmethod
    def load(cls):
        raise FileNotFoundError("band-gap surrogate file missing: gnn.safetensors")


@pytest.fixture
def offline_components(monkeypatch):
    """Tiny novelty index (NaCl, TiO2 'in training'), tiny hull, fake surrogate."""
    index = NoveltyIndex({"NaCl": [encode_structure(rocksalt_nacl())], "TiO2": [encode_structure(rutile_tio2())]})
    monkeypatch.setattr(NoveltyIndex, "load", classmethod(lambda cls, path=None: index))
    hull = HullReference(pd.DataFrame({
        "formula": ["Na", "Cl", "Ti", "O", "Si", "NaCl", "TiO2"],
        "e_form_per_atom": [0, 0, 0, 0, 0, -2.1, -3.3],
        "source_id": ["Na", "Cl", "Ti", "O", "Si", "nacl", "tio2"]}))
    monkeypatch.setattr(stability, "load_hull", lambda: hull)
    monkeypatch.setattr(crystallm_core.chem.judges.surrogates, "BandGapSurrogate", FakeSurrogate, raising=False)
    scoring.load_gap_model.cache_clear()
    yield
    scoring.load_gap_model.cache_clear()  # do not leak the fake into other tests


@pytest.fixture
def run_dir(tmp_path):
    nacl = written_cif(rocksalt_nacl())
    perturbed = rocksalt_nacl()
    perturbed.perturb(0.01, seed=1)
    files = {
        "000_NaCl.cif": nacl,
        "001_NaCl.cif": written_cif(perturbed),  # a duplicate of 000
        "002_TiO2.cif": written_cif(rutile_tio2()),  # in the (tiny) training set
        "003_Si.cif": written_cif(diamond_si()),
        "004_bad_formula.cif": nacl.replace("_chemical_formula_sum 'Na4 Cl4'", "_chemical_formula_sum 'Na4 Cl8'"),
        "005_garbage.cif": "this is not a CIF\n_cell_length_a banana\n",
        "006_empty.cif": "",
        "008_zero_angle.cif": ZERO_ANGLE_CIF,  # used to segfault the whole run inside spglib
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "007_binary.cif").write_bytes(b"\x00\xff\xfe\x89PNG\r\n")
    (tmp_path / "notes.txt").write_text("not a CIF file: ignored")
    (tmp_path / "manifest.json").write_text(json.dumps({"targets": {"band_gap": 1.0, "e_hull": 0.0}}))
    return tmp_path


def cli_args(directory, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args([str(directory)])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_cli_writes_one_row_per_file(run_dir, offline_components, capsys):
    assert evaluate.run(cli_args(run_dir)) == 0
    df = pd.read_csv(run_dir / evaluate.OUTPUT_NAME).set_index("file")
    assert len(df) == 9 and "notes.txt" not in df.index
    printed = capsys.readouterr()
    assert "biased low" in printed.out
    assert "checking: 100%" in printed.err and "scoring: 100%" in printed.err  # tqdm bars with ETA on stderr

    assert df.loc["000_NaCl.cif", "valid"] and df.loc["000_NaCl.cif", "space_group"] == "Fm-3m"
    assert df.loc["000_NaCl.cif", "unique"] and not df.loc["001_NaCl.cif", "unique"]
    assert not df.loc["000_NaCl.cif", "novel"] and df.loc["003_Si.cif", "novel"]
    assert not df.loc["002_TiO2.cif", "novel"]
    assert -2.4 < df.loc["000_NaCl.cif", "e_form_pred"] < -1.8
    assert math.isfinite(df.loc["003_Si.cif", "e_hull_pred"])
    assert df.loc["003_Si.cif", "hit"] and df.loc["003_Si.cif", "band_gap_pred"] == pytest.approx(1.2)
    assert df.loc["003_Si.cif", "vsun"] == (df.loc["003_Si.cif", "e_hull_pred"] <= 0.1)

    assert not df.loc["004_bad_formula.cif", "valid"] and isinstance(df.loc["004_bad_formula.cif", "reason"], str)
    assert not df.loc["004_bad_formula.cif", "hit"]  # a hit needs a valid structure
    assert "cell angle alpha = 0° is outside 10–170°" in df.loc["008_zero_angle.cif", "reason"]
    assert "not scored" in df.loc["008_zero_angle.cif", "notes"]
    for bad in ("005_garbage.cif", "006_empty.cif", "007_binary.cif", "008_zero_angle.cif"):
        assert not df.loc[bad, "valid"] and len(str(df.loc[bad, "reason"])) > 3
        assert math.isnan(df.loc[bad, "band_gap_pred"]) and math.isnan(df.loc[bad, "e_hull_pred"])


def test_missing_surrogate_degrades_gracefully(tmp_path, offline_components, monkeypatch):
    monkeypatch.setattr(crystallm_core.chem.judges.surrogates, "BandGapSurrogate", MissingSurrogate, raising=False)
    scoring.load_gap_model.cache_clear()
    (tmp_path / "si.cif").write_text(written_cif(diamond_si()))
    (tmp_path / "gone.cif").write_bytes(b"x" * 2_000_000)
    run = read_run(tmp_path)
    for candidate in run.candidates:
        candidate.band_gap_target = 1.0
    df = evaluate.evaluate_run(run, stability=False).to_frame().set_index("file")
    assert df["band_gap_pred"].isna().all() and df["hit"].isna().all()
    assert "band-gap surrogate unavailable" in df.loc["si.cif", "notes"]
    assert "could not be read" in df.loc["gone.cif", "reason"]


def test_without_targets_hit_is_unknown(tmp_path, offline_components):
    (tmp_path / "a.cif").write_text(written_cif(rocksalt_nacl()))
    df = evaluate.evaluate_run(read_run(tmp_path), stability=False, novelty=False).to_frame()
    assert df.loc[0, "valid"] and df["hit"].isna().all() and df["novel"].isna().all()
    assert math.isnan(df.loc[0, "e_hull_pred"]) and df.loc[0, "stable"] is None


def test_bad_path_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="neither a directory nor a zip"):
        evaluate.run(cli_args(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no .cif files"):
        evaluate.run(cli_args(tmp_path))


def test_an_app_zip_is_scored_for_hits_against_each_files_target(tmp_path, offline_components):
    """The zip the app offers is a run: evaluate finds every structure's own target in it."""
    zipped = tmp_path / "crystallm_run.zip"
    zipped.write_bytes(run_zip(sample_run()))
    assert evaluate.run(cli_args(zipped)) == 0
    df = pd.read_csv(tmp_path / f"crystallm_run_{evaluate.OUTPUT_NAME}").set_index("file")
    assert list(df.index) == ["000_NaCl.cif", "001_NaCl.cif", "002_TiO2.cif"]
    assert df["band_gap_target"].tolist() == [1.0, 1.0, 3.0]
    assert df.loc["000_NaCl.cif", "hit"] and not df.loc["002_TiO2.cif", "hit"]  # fake surrogate says 1.2 eV


def test_round_trip_generate_write_evaluate_history_reload(tmp_path, offline_components):
    """One table all the way: a run scored as it was made equals the same run written, read back,
    evaluated, stored and reloaded."""
    run = evaluate.evaluate_run(sample_run(), stability=False, recheck=False)
    written = write_run(run, tmp_path / "run")
    again = evaluate.evaluate_run(read_run(written), stability=False)
    store = HistoryStore(tmp_path / "h.sqlite")
    store.save(again)
    reloaded = store.load(again.run_id)
    columns = ["file", "formula", "space_group", "valid", "reason", "band_gap_target", "band_gap_pred", "unique",
               "novel", "hit", "vsun"]
    for frame in (again.to_frame(), reloaded.to_frame()):
        pd.testing.assert_frame_equal(frame[columns], run.to_frame()[columns])
