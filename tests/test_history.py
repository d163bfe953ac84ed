"""The SQLite run store: round trip, listing, deletion, persistence across instances, location."""
from __future__ import annotations

import math

import pytest

from crystallm_core.product.history import (
    HistoryStore,
    RunRecord,
    StructureRecord,
    default_db_path,
)


def make_run(n: int = 3, created_at: float = 1_700_000_000.0, kind: str = "generate") -> RunRecord:
    structures = [
        StructureRecord(index=i, valid=i % 2 == 0, formula="NaCl" if i % 2 == 0 else None,
                        spacegroup="Fm-3m" if i % 2 == 0 else None,
                        reasons=[] if i % 2 == 0 else ["formula: data_ and sum disagree"],
                        cif=f"data_NaCl\n# sample {i}\n" if i % 2 == 0 else None, raw_text=f"raw {i}",
                        seconds=0.5 + i, band_gap_target=1.5, e_hull_target=0.0,
                        scores={"band_gap_pred": 1.2 + i, "band_gap_std": 0.1, "novel": True} if i % 2 == 0 else {})
        for i in range(n)
    ]
    return RunRecord(model={"name": "tiny", "weights_sha256": "ab" * 32}, kind=kind,
                     settings={"band_gap": 1.5, "e_hull": 0.0, "n": n, "seed": 7, "tolerance": 0.5},
                     manifest={"model": {"name": "tiny"}, "seed": 7}, structures=structures, created_at=created_at)


def test_round_trip_keeps_every_field(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite")
    run = make_run()
    store.save(run)
    loaded = store.load(run.run_id)
    assert loaded == run
    assert loaded.structures[0].scores["band_gap_pred"] == pytest.approx(1.2)
    assert loaded.structures[1].cif is None and loaded.structures[1].reasons == ["formula: data_ and sum disagree"]


def test_list_is_newest_first_with_counts(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite")
    old, new = make_run(3, created_at=1.0e9), make_run(5, created_at=2.0e9, kind="sweep")
    store.save(old)
    store.save(new)
    summaries = store.list_runs()
    assert [s.run_id for s in summaries] == [new.run_id, old.run_id]
    assert (summaries[0].n_structures, summaries[0].n_valid, summaries[0].kind) == (5, 3, "sweep")
    assert "3/5 valid" in summaries[0].label


def test_delete_removes_run_and_structures(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite")
    keep, drop = make_run(), make_run()
    store.save(keep)
    store.save(drop)
    assert store.delete(drop.run_id) is True
    assert store.delete(drop.run_id) is False
    assert [s.run_id for s in store.list_runs()] == [keep.run_id]
    with pytest.raises(KeyError):
        store.load(drop.run_id)
    with store.connect() as db:
        assert db.execute("SELECT COUNT(*) FROM structures WHERE run_id = ?", (drop.run_id,)).fetchone()[0] == 0


def test_survives_a_new_store_instance_and_resave_replaces(tmp_path):
    path = tmp_path / "nested" / "h.sqlite"
    run = make_run()
    HistoryStore(path).save(run)
    run.status = "cancelled"
    run.structures = run.structures[:1]
    reopened = HistoryStore(path)  # as after an app restart
    reopened.save(run)
    loaded = reopened.load(run.run_id)
    assert loaded.status == "cancelled" and len(loaded.structures) == 1
    assert len(reopened.list_runs()) == 1


def test_location_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYSTALLM_HISTORY_DB", str(tmp_path / "env.sqlite"))
    assert default_db_path() == tmp_path / "env.sqlite"
    HistoryStore().save(make_run())
    assert (tmp_path / "env.sqlite").is_file()
    monkeypatch.delenv("CRYSTALLM_HISTORY_DB")
    assert default_db_path().name == "history.sqlite" and default_db_path().parent.name == ".crystallm_studio"


def test_nan_and_missing_scores_survive(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite")
    run = make_run(1)
    run.structures[0].scores = {"band_gap_pred": float("nan")}
    run.structures[0].band_gap_target = None
    store.save(run)
    loaded = store.load(run.run_id).structures[0]
    assert math.isnan(loaded.scores["band_gap_pred"]) and loaded.band_gap_target is None
