"""The one data model: a Run's table, manifest, files on disk and zip, read back as they were."""
from __future__ import annotations

import io
import json
import zipfile

import pandas as pd
import pytest
from prototypes import diamond_si
from run_samples import sample_run, written_cif

from crystallm_core.chem.judges.metrics import MetricSettings
from crystallm_core.product.run import TABLE_COLUMNS, Run, Scores
from crystallm_core.product.run_files import read_run, run_zip, write_run


def test_table_flags_hits_per_target_stability_and_uniqueness():
    frame = sample_run().to_frame(MetricSettings(stability_threshold=0.1, hit_tolerance=0.5))
    assert list(frame.columns) == TABLE_COLUMNS
    assert frame["hit"].tolist() == [True, False, True, None]  # 1.2 vs 1.0, 0.2 vs 1.0, 2.8 vs 3.0, invalid
    assert frame["stable"].tolist()[:2] == [True, False]
    assert frame["unique"].tolist() == [True, False, True, None]  # the second NaCl is a duplicate
    assert frame["rewinds"].tolist()[:3] == [0, 1, 2]
    assert pd.isna(frame["band_gap_pred"][3]) and frame["reason"][3] == "repairable: no space group symbol"
    assert Run().to_frame().empty and list(Run().to_frame().columns) == TABLE_COLUMNS


def test_manifest_says_how_the_run_was_made():
    run = sample_run()
    manifest = run.manifest()
    assert manifest["format"] == "crystallm-run/1" and manifest["run_id"] == run.run_id
    assert manifest["model"]["weights_sha256"] == "00" * 32 and manifest["requests"][1]["seed"] == 4
    assert manifest["n_candidates"] == 4 and manifest["n_valid"] == 3 and "torch" in manifest["versions"]


def test_scores_drop_nan_and_keep_notes():
    scores = Scores.from_dict({"band_gap_pred": float("nan"), "e_hull_pred": 0.2, "junk": 1, "notes": "a; b"})
    assert scores == Scores(e_hull_pred=0.2, notes=["a", "b"]) and scores.to_dict() == {"e_hull_pred": 0.2,
                                                                                          "notes": ["a", "b"]}


def test_a_directory_and_a_zip_hold_the_same_layout(tmp_path):
    run = sample_run()
    write_run(run, tmp_path / "out")
    on_disk = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    with zipfile.ZipFile(io.BytesIO(run_zip(run, include_invalid=True))) as archive:
        assert sorted(archive.namelist()) == on_disk
    assert on_disk == ["cifs/000_NaCl.cif", "cifs/001_NaCl.cif", "cifs/002_TiO2.cif", "invalid/003_unparsed.cif",
                       "manifest.json", "results.csv"]
    with zipfile.ZipFile(io.BytesIO(run_zip(run))) as archive:
        assert not any(n.startswith("invalid/") for n in archive.namelist())
        assert json.loads(archive.read("manifest.json"))["run_id"] == run.run_id
    with pytest.raises(ValueError, match="already holds another run"):
        write_run(run, tmp_path / "out")


def test_reading_back_keeps_names_indices_and_each_files_targets(tmp_path):
    run = sample_run()
    zipped = tmp_path / "run.zip"
    zipped.write_bytes(run_zip(run, include_invalid=True))
    for source in (write_run(run, tmp_path / "dir"), zipped):
        read = read_run(source)
        assert read.run_id == run.run_id and read.kind == "sweep"
        assert [(c.index, c.name, c.band_gap_target) for c in read.candidates] == [
            (0, "000_NaCl", 1.0), (1, "001_NaCl", 1.0), (2, "002_TiO2", 3.0), (3, "003_unparsed", 1.0)]
        assert read.candidates[2].cif == run.candidates[2].cif
        assert not read.candidates[0].valid  # not checked yet: evaluate does that


def test_any_folder_of_cifs_is_a_run(tmp_path):
    (tmp_path / "mine.cif").write_text(written_cif(diamond_si()))
    (tmp_path / "huge.cif").write_bytes(b"x" * 2_000_000)
    (tmp_path / "notes.txt").write_text("ignored")
    run = read_run(tmp_path)
    assert [c.name for c in run.candidates] == ["huge", "mine"] and run.candidates[0].cif is None
    assert run.kind == "evaluate" and run.candidates[1].band_gap_target is None
    with pytest.raises(ValueError, match="no .cif files"):
        read_run(tmp_path / "empty") if (tmp_path / "empty").mkdir() is None else None
    with pytest.raises(ValueError, match="neither a directory nor a zip"):
        read_run(tmp_path / "notes.txt")
