"""The SQLite run store: Runs round-trip, listing, deletion, runs cut short, old databases."""
from __future__ import annotations

import json
import sqlite3

import pytest
from run_samples import sample_run

from crystallm_core.product.history import HistoryStore, default_db_path


def test_round_trip_gives_the_same_run(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite")
    run = sample_run()
    store.save(run)
    loaded = store.load(run.run_id)
    assert loaded.to_frame().equals(run.to_frame()) and loaded.manifest() == run.manifest()
    assert loaded.candidates[0].structure == run.candidates[0].structure  # stored, not parsed again
    assert loaded.candidates[3].cif is None and loaded.candidates[3].raw_text == "data_[garbage"
    assert loaded.candidates[1].retries == run.candidates[1].retries


def test_list_is_newest_first_with_counts(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite")
    old, new = sample_run(), sample_run()
    old.created_at, new.kind = 1.0e9, "generate"
    new.candidates = new.candidates[:2]
    store.save(old)
    store.save(new)
    summaries = store.list_runs()
    assert [s.run_id for s in summaries] == [new.run_id, old.run_id]
    assert (summaries[1].n_candidates, summaries[1].n_valid, summaries[1].kind) == (4, 3, "sweep")
    assert "3/4 valid" in summaries[1].label


def test_delete_removes_run_and_candidates(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite")
    keep, drop = sample_run(), sample_run()
    store.save(keep)
    store.save(drop)
    assert store.delete(drop.run_id) is True and store.delete(drop.run_id) is False
    assert [s.run_id for s in store.list_runs()] == [keep.run_id]
    with pytest.raises(KeyError):
        store.load(drop.run_id)
    with store.connect() as db:
        assert db.execute("SELECT COUNT(*) FROM candidates WHERE run_id = ?", (drop.run_id,)).fetchone()[0] == 0


def test_streamed_run_survives_its_process(tmp_path):
    """begin/add as a job does; a run whose process died is listed as interrupted with what finished."""
    path = tmp_path / "h.sqlite"
    store = HistoryStore(path)
    run = sample_run()
    done, run.candidates = run.candidates, []
    run.status = "running"
    store.begin(run)
    for candidate in done[:2]:
        run.candidates.append(candidate)
        store.add(run, candidate)
    assert HistoryStore(path).load(run.run_id).status == "running"  # its process (this one) is alive
    with store.connect() as db:
        db.execute("UPDATE runs SET owner_pid = ? WHERE run_id = ?", (2**22 + 12345, run.run_id))  # no such process
    reopened = HistoryStore(path)  # as after a restart
    loaded = reopened.load(run.run_id)
    assert loaded.status == "interrupted" and len(loaded.candidates) == 2
    assert reopened.list_runs()[0].label.endswith("· interrupted")
    run.status = "done"
    run.candidates = done
    reopened.finish(run)
    assert reopened.load(run.run_id).status == "done"


def test_wal_mode_and_location_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYSTALLM_HISTORY_DB", str(tmp_path / "env.sqlite"))
    assert default_db_path() == tmp_path / "env.sqlite"
    store = HistoryStore()
    store.save(sample_run())
    with store.connect() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    monkeypatch.delenv("CRYSTALLM_HISTORY_DB")
    assert default_db_path().name == "history.sqlite" and default_db_path().parent.name == ".crystallm_studio"


def test_a_schema_1_database_is_migrated(tmp_path):
    from prototypes import rocksalt_nacl
    from run_samples import written_cif

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE runs (run_id TEXT PRIMARY KEY, created_at REAL NOT NULL, kind TEXT NOT NULL,
              status TEXT NOT NULL, label TEXT NOT NULL, model_json TEXT NOT NULL, settings_json TEXT NOT NULL,
              manifest_json TEXT NOT NULL, error TEXT);
            CREATE TABLE structures (run_id TEXT NOT NULL, idx INTEGER NOT NULL, valid INTEGER NOT NULL,
              formula TEXT, spacegroup TEXT, reasons_json TEXT NOT NULL, cif TEXT, raw_text TEXT NOT NULL,
              seconds REAL NOT NULL, band_gap_target REAL, e_hull_target REAL, scores_json TEXT NOT NULL,
              PRIMARY KEY (run_id, idx));
            PRAGMA user_version = 1;""")
        db.execute("INSERT INTO runs VALUES ('old1', 1.0e9, 'generate', 'done', 'x', ?, ?, '{}', NULL)",
                   (json.dumps({"name": "tiny"}), json.dumps({"band_gap": 1.5, "tolerance": 0.3, "seed": 2})))
        db.execute("INSERT INTO structures VALUES ('old1', 0, 1, 'NaCl', 'Fm-3m', '[]', ?, 'raw', 0.5, 1.5, 0.0, ?)",
                   (written_cif(rocksalt_nacl()), json.dumps({"band_gap_pred": 1.4, "e_hull_pred": 0.0})))
        db.execute("INSERT INTO structures VALUES ('old1', 1, 0, NULL, NULL, ?, NULL, 'raw', 0.5, 1.5, 0.0, '{}')",
                   (json.dumps(["bond_lengths: Na–Cl too long"]),))
    run = HistoryStore(path).load("old1")
    frame = run.to_frame()
    assert frame["valid"].tolist() == [True, False] and frame["hit"].tolist() == [True, None]
    assert run.metric_settings().hit_tolerance == 0.3 and run.candidates[0].structure.composition.reduced_formula == "NaCl"
    assert run.candidates[1].reasons == ["bond_lengths: Na–Cl too long"]
