"""The app's non-UI logic: queue, background job (cancel keeps results), results table, zip, CIF helpers."""
from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from types import SimpleNamespace

import pandas as pd
import pytest
from prototypes import rocksalt_nacl, rutile_tio2
from pymatgen.io.cif import CifWriter

from crystallm_core.chem.metrics import MetricSettings
from crystallm_core.chem.structure_info import (
    describe_structure,
    parse_cif,
    xrd_pattern,
)
from crystallm_core.product.app_support import (
    GenerationJob,
    GenerationQueue,
    hit_rate_vs_tolerance,
    results_frame,
    run_zip,
    space_group_choices,
    stored_run_zip,
    sweep_summary,
    unique_flags,
)
from crystallm_core.product.history import HistoryStore, RunRecord, StructureRecord


def record(index: int, structure=None, target: float | None = 1.0, gap: float | None = None, e_hull=None,
           reasons=()) -> StructureRecord:
    scores = {}
    if gap is not None:
        scores.update(band_gap_pred=gap, band_gap_std=0.1)
    if e_hull is not None:
        scores["e_hull_pred"] = e_hull
    cif = str(CifWriter(structure, symprec=0.1)) if structure is not None else None
    return StructureRecord(index=index, valid=structure is not None and not reasons, formula=None if structure is None
                           else structure.composition.reduced_formula, spacegroup=None, reasons=list(reasons), cif=cif,
                           raw_text=cif or "data_[garbage", seconds=0.1, band_gap_target=target, e_hull_target=0.0,
                           scores=scores)


def sample_run() -> RunRecord:
    structures = [record(0, rocksalt_nacl(), gap=1.2, e_hull=0.0), record(1, rocksalt_nacl(), gap=0.2, e_hull=0.3),
                  record(2, rutile_tio2(), target=3.0, gap=2.8), record(3, reasons=["could not be repaired"])]
    return RunRecord(model={"name": "tiny", "weights_sha256": "00" * 32}, settings={"seed": 3, "tolerance": 0.5},
                     manifest={"model": {"name": "tiny"}, "seed": 3, "versions": {"python": "3"}},
                     structures=structures, kind="sweep")


def test_queue_is_fifo_with_positions_and_cancel_while_waiting():
    queue = GenerationQueue()
    first, second, third = queue.join(), queue.join(), queue.join()
    assert [queue.position(t) for t in (first, second, third)] == [0, 1, 2]
    assert queue.wait_turn(first, lambda: False)
    assert queue.wait_turn(third, lambda: True) is False  # cancelled while queued
    queue.leave(third)
    got_turn = threading.Event()
    waiter = threading.Thread(target=lambda: queue.wait_turn(second, lambda: False) and got_turn.set())
    waiter.start()
    time.sleep(0.1)
    assert not got_turn.is_set()
    queue.leave(first)
    waiter.join(5)
    assert got_turn.is_set() and queue.position(second) == 0 and queue.position(first) is None


def test_results_frame_flags_hits_per_target_and_stability():
    frame = results_frame(sample_run().structures, MetricSettings(stability_threshold=0.1, hit_tolerance=0.5))
    assert frame["hit"].tolist() == [True, False, True, None]  # 1.2 vs 1.0, 0.2 vs 1.0, 2.8 vs 3.0, invalid
    assert frame["stable"].tolist()[:2] == [True, False]
    assert pd.isna(frame["band_gap_pred"][3]) and frame["reason"][3] == "could not be repaired"
    assert results_frame([]).empty


def test_uniqueness_and_hit_curve_and_sweep_summary():
    run = sample_run()
    assert unique_flags(run.structures) == [True, False, True, None]  # the second NaCl is a duplicate
    frame = results_frame(run.structures)
    curve = hit_rate_vs_tolerance(frame, [0.1, 0.25, 1.0])
    assert curve["hit_rate"].tolist() == pytest.approx([0.0, 2 / 4, 3 / 4])  # over all samples
    summary = sweep_summary(frame).set_index("target")
    assert summary.loc[1.0, "n"] == 3 and summary.loc[1.0, "mean_pred"] == pytest.approx(0.7)
    assert summary.loc[3.0, "hit"] == 1.0


def test_zip_holds_valid_cifs_csv_manifest_and_optionally_invalid():
    run = sample_run()
    with zipfile.ZipFile(io.BytesIO(run_zip(run))) as archive:
        names = archive.namelist()
        assert sorted(n for n in names if n.startswith("cifs/")) == ["cifs/000_NaCl.cif", "cifs/001_NaCl.cif",
                                                                     "cifs/002_TiO2.cif"]
        assert not any(n.startswith("invalid/") for n in names)
        table = pd.read_csv(archive.open("results.csv"))
        manifest = json.loads(archive.read("manifest.json"))
        assert parse_cif(archive.read("cifs/002_TiO2.cif").decode()).composition.reduced_formula == "TiO2"
    assert len(table) == 4 and {"formula", "valid", "band_gap_pred", "hit", "unique"} <= set(table.columns)
    assert manifest["seed"] == 3
    with zipfile.ZipFile(io.BytesIO(run_zip(run, include_invalid=True))) as archive:
        assert archive.read("invalid/003_unparsed.cif").decode() == "data_[garbage"


def test_zip_of_a_stored_run_and_of_one_deleted_meanwhile(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite")
    run = sample_run()
    store.save(run)
    with zipfile.ZipFile(io.BytesIO(stored_run_zip(store, run.run_id))) as archive:
        assert "cifs/002_TiO2.cif" in archive.namelist()
    store.delete(run.run_id)
    with zipfile.ZipFile(io.BytesIO(stored_run_zip(store, run.run_id))) as archive:
        assert archive.namelist() == ["RUN_DELETED.txt"] and b"was deleted" in archive.read("RUN_DELETED.txt")


def test_parse_cif_reports_corrupt_input():
    assert parse_cif(str(CifWriter(rocksalt_nacl()))).composition.reduced_formula == "NaCl"
    for bad in ("", "not a cif at all", "data_x\n_cell_length_a 5\n"):
        with pytest.raises(ValueError):
            parse_cif(bad)


def test_structure_description_and_xrd():
    summary = describe_structure(rocksalt_nacl())
    assert summary["space group"] == "Fm-3m (#225)" and summary["crystal system"] == "cubic"
    assert summary["density (g/cm³)"] == pytest.approx(2.164, abs=0.01)
    peaks = xrd_pattern(rocksalt_nacl())
    strongest = peaks.loc[peaks["intensity"].idxmax()]
    assert strongest["two_theta"] == pytest.approx(31.7, abs=0.1) and strongest["hkl"] == "(2 0 0)"


def test_space_group_choices_cover_all_230_in_model_notation():
    choices = space_group_choices()
    assert [n for n, _ in choices] == list(range(1, 231))
    assert dict(choices)[14] == "P2_1/c" and dict(choices)[225] == "Fm-3m"


class FakeGenerated:
    """Stands in for a GeneratedStructure: even samples are valid NaCl, odd ones invalid."""

    def __init__(self, i):
        self.index, self.valid, self.spacegroup, self.raw_text, self.seconds = i, i % 2 == 0, None, "raw", 0.01
        self.formula, self.reasons, self.cif = ("NaCl", [], "cif") if self.valid else (None, ["fake"], None)
        self.report = SimpleNamespace(structure=rocksalt_nacl() if self.valid else None)


def test_progress_of_an_until_valid_request_counts_valid_structures():
    from crystallm_core.product.generation import GenerationRequest

    until_valid, plain = GenerationRequest(n=20, stop_after_valid=5), GenerationRequest(n=10)
    job = GenerationJob(None, [until_valid, plain], RunRecord(model={}, settings={}, manifest={}),
                        queue=GenerationQueue(), scorer=lambda: SimpleNamespace(unavailable={}, score=lambda s: [{}]))
    for i in range(6):  # 3 valid of 6: the first request is 3/5 done (valid beats 6/20 sampled)
        job._add(FakeGenerated(i), until_valid)
    progress = job.progress()
    assert (progress.done, progress.valid, progress.total, progress.valid_target) == (6, 3, 30, None)
    assert progress.fraction == pytest.approx(20 * 3 / 5 / 30)
    job.requests_done, job.request_start = 1, 6  # as if the first request had ended: none of the second yet
    assert job.progress().fraction == pytest.approx(20 / 30)
    assert GenerationJob(None, [until_valid], RunRecord(model={}, settings={}, manifest={}),
                         queue=GenerationQueue()).progress().valid_target == 5


def test_job_keeps_structures_when_cancelled_and_saves_history(tmp_path, monkeypatch):
    """A fake generate() streams structures until cancelled; the job keeps and stores them."""
    from crystallm_core.product import generation

    class FakeScorer:
        unavailable = {"band gap": "no surrogate weights"}

        def score(self, structures):
            return [{"e_hull_pred": 0.01, "novel": s.composition.reduced_formula == "NaCl"} for s in structures]

    def fake_generate(loaded, request, on_structure=None, should_cancel=None):
        for i in range(request.n):
            if should_cancel():
                break
            on_structure(FakeGenerated(i))
            time.sleep(0.05)
        return generation.GenerationRun([], {"fake": True}, cancelled=should_cancel())

    monkeypatch.setattr(generation, "generate", fake_generate)
    store = HistoryStore(tmp_path / "h.sqlite")
    run = RunRecord(model={}, settings={"seed": 0, "n": 1000}, manifest={})
    job = GenerationJob(None, [generation.GenerationRequest(n=1000)], run, store=store, queue=GenerationQueue(),
                        scorer=FakeScorer).start()
    deadline = time.time() + 10
    while job.progress().done < 3 and time.time() < deadline:
        time.sleep(0.02)
    job.cancel()
    assert job.join(10)
    progress = job.progress()
    assert progress.status == "cancelled" and 3 <= progress.done < 1000
    saved = store.load(run.run_id)
    assert saved.status == "cancelled" and len(saved.structures) == progress.done
    assert saved.manifest["generation"] == [{"fake": True}] and saved.manifest["n_generated"] == progress.done
    assert saved.manifest["scores_unavailable"] == {"band gap": "no surrogate weights"}
    assert saved.structures[0].scores == {"e_hull_pred": 0.01, "novel": True} and saved.structures[1].scores == {}


def fake_generate_until_cancelled(loaded, request, on_structure=None, should_cancel=None):
    """Generates nothing, slowly, until asked to stop (or 10 s pass)."""
    from crystallm_core.product import generation

    deadline = time.time() + 10
    while not should_cancel() and time.time() < deadline:
        time.sleep(0.02)
    return generation.GenerationRun([], {"fake": True}, cancelled=should_cancel())


def test_job_nobody_polls_cancels_itself_and_frees_the_queue(monkeypatch):
    """A closed tab stops polling: after ABANDON_SECONDS the job stops and leaves the queue."""
    from crystallm_core.product import app_support, generation

    monkeypatch.setattr(generation, "generate", fake_generate_until_cancelled)
    monkeypatch.setattr(app_support, "ABANDON_SECONDS", 0.3)
    queue = GenerationQueue()
    job = GenerationJob(None, [generation.GenerationRequest(n=1)], RunRecord(model={}, settings={}, manifest={}),
                        queue=queue).start()
    assert job.join(5) and job.status == "cancelled" and queue.position(job.ticket) is None


def test_job_is_final_even_if_the_manifest_fails(monkeypatch):
    from crystallm_core.product import app_support, generation

    def broken_manifest(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(generation, "generate", fake_generate_until_cancelled)
    monkeypatch.setattr(app_support, "run_manifest", broken_manifest)
    job = GenerationJob(None, [generation.GenerationRequest(n=1)], RunRecord(model={}, settings={}, manifest={}),
                        queue=GenerationQueue()).start()
    job.cancel()
    assert job.join(5) and job.finished and job.status == "cancelled"
