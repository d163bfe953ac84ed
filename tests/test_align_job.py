"""Reward fine-tuning as a background job (the Fine-tune page's target region): validation, a
real tiny run that leaves a loadable model, cancel, and errors as messages."""
from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import tiny_config

from crystallm_core.lm.checkpoints import load_model_weights, read_metadata, save_model
from crystallm_core.lm.model import CrystaLLMPKV
from crystallm_core.paths import DEFAULT_MODEL_DIR
from crystallm_core.product import align_job
from crystallm_core.product.align_settings import AlignSettings
from crystallm_core.product.align_job import AlignJob, TargetRegion, element_list, remaining_seconds, start_align
from crystallm_core.product.jobs import GenerationQueue
from crystallm_core.product.server_settings import allowed_model_source

OXIDES = TargetRegion(2.0, 3.0, 0.0, required_elements=["O"])


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYSTALLM_FINETUNE_DIR", str(tmp_path / "tuned"))
    return tmp_path / "tuned"


@pytest.mark.parametrize("region, message", [
    (TargetRegion(3.0, 2.0), "0 ≤ low ≤ high ≤ 12"),
    (TargetRegion(2.0, 13.0), "0 ≤ low ≤ high ≤ 12"),
    (TargetRegion(-1.0, 2.0), "0 ≤ low ≤ high ≤ 12"),
    (TargetRegion(2.0, 3.0, 0.7), "E_hull target must lie in 0–0.5"),
    (TargetRegion(2.0, 3.0, required_elements=["Xx", "O"]), "not chemical elements: Xx"),
    (TargetRegion(2.0, 3.0, elements=["li"]), "not chemical elements: li"),
    (TargetRegion(2.0, 3.0, required_elements=["O"], elements=["Li", "Fe"]), "O must be contained"),
])
def test_a_bad_region_is_refused_with_a_message(tuned_dir, region, message):
    with pytest.raises(ValueError, match=message):
        start_align("mine", None, region)
    assert not tuned_dir.exists()  # nothing claimed


@pytest.mark.parametrize("kwargs, message", [
    (dict(rounds=0), "rounds must be 1–50"), (dict(rounds=51), "rounds must be 1–50"),
    (dict(minutes=0), "more than 0 minutes"), (dict(name="../up"), "name the model with letters"),
])
def test_bad_settings_and_names_are_refused(tuned_dir, kwargs, message):
    arguments = dict(name="mine", base=None, region=OXIDES) | kwargs
    with pytest.raises(ValueError, match=message):
        start_align(**arguments)


def test_region_helpers():
    assert element_list(" Li, Fe  O ") == ["Li", "Fe", "O"] and element_list("  ") is None
    assert TargetRegion(2.0, 2.0, None, ["O"]).describe() == "band gap 2 eV, any E_hull, containing O"
    assert remaining_seconds(0.0, 0, 4, None) is None  # no round finished: no estimate
    assert remaining_seconds(120.0, 2, 4, None) == pytest.approx(120.0)  # 60 s a round, 2 to go
    assert remaining_seconds(120.0, 2, 4, minutes=2.5) == pytest.approx(60.0)  # the budget lets one more start
    assert remaining_seconds(200.0, 2, 4, minutes=3.0) == 0.0


def test_a_taken_name_is_refused(tuned_dir):
    (tuned_dir / "mine").mkdir(parents=True)
    with pytest.raises(ValueError, match="already exists"):
        start_align("mine", None, OXIDES)


def test_a_tiny_job_leaves_a_model_the_home_page_loads(tuned_dir):
    job = start_align("oxides", str(DEFAULT_MODEL_DIR), OXIDES, rounds=1, minutes=10, cells_per_round=1,
                      samples_per_cell=2, relax_per_round=1, replay_per_round=0, free_samples=1)
    assert (tuned_dir / "oxides").is_dir()  # the name is claimed at once
    assert job.join(timeout=600), "the job did not end"
    assert job.status == "done", job.error
    progress = job.progress()
    assert (progress.rounds_done, progress.rounds, progress.fraction, progress.eta) == (1, 1, 1.0, None)
    assert progress.reports[0]["n"] == 2 and progress.reports[0]["accepted"] and progress.elapsed > 0
    assert job.model_dir == tuned_dir / "oxides"
    source = allowed_model_source(str(job.model_dir))  # inside the model roots, as Home requires
    load_model_weights(source)
    metadata = read_metadata(job.model_dir / "metadata.json")
    assert metadata["name"] == "oxides" and metadata["target_region"]["required_elements"] == ["O"]
    state = json.loads((job.run_dir / "state.json").read_text())
    assert state["settings"]["grid"][0][1] == 0.0 and state["settings"]["required_elements"] == ["O"]


def test_cancel_while_queued_leaves_nothing(tuned_dir):
    queue = GenerationQueue()
    queue.join()  # another job holds the CPU
    out = tuned_dir / "waiting"
    out.mkdir(parents=True)
    job = AlignJob(out, None, OXIDES, AlignSettings(rounds=1), queue=queue).start()
    assert job.progress().status == "queued" and job.progress().position == 1
    job.cancel()
    assert job.join(timeout=10) and job.status == "cancelled"
    assert job.model_dir is None and not out.exists() and queue.position(job.ticket) is None


def fake_align(finish):
    """An `align` that finishes one round (a tiny model) and then does `finish(should_stop)`."""
    def run(out, base, settings, on_round=None, should_stop=None):
        torch.manual_seed(0)
        model = save_model(CrystaLLMPKV(tiny_config()), out / "round_000" / "model", {"name": "round 0"})
        report = {"round": 0, "n": 2, "accepted": True, "stable": 0.5, "seconds": 1.0}
        (out / "state.json").write_text(json.dumps({"current": str(model), "rounds": [report], "stopped": None}))
        on_round(report)
        return finish(should_stop)
    return run


def wait_until_stopped(should_stop):
    while not should_stop():
        time.sleep(0.01)


def run_fake(tuned_dir, monkeypatch, finish) -> AlignJob:
    monkeypatch.setattr(align_job, "align", fake_align(finish))
    out = tuned_dir / "fake"
    out.mkdir(parents=True)
    return AlignJob(out, None, OXIDES, AlignSettings(rounds=3, minutes=5), queue=GenerationQueue()).start()


def test_cancel_keeps_the_finished_rounds_model(tuned_dir, monkeypatch):
    job = run_fake(tuned_dir, monkeypatch, wait_until_stopped)
    deadline = time.time() + 30
    while not job.reports and time.time() < deadline:
        time.sleep(0.01)
    progress = job.progress()
    assert progress.status == "running" and progress.rounds_done == 1 and progress.eta is not None
    job.cancel()
    assert job.join(timeout=10) and job.status == "cancelled"
    assert job.model_dir == tuned_dir / "fake" and load_model_weights(job.model_dir) is not None
    assert "towards band gap 2–3 eV" in read_metadata(job.model_dir / "metadata.json")["trained_on"]


@pytest.mark.parametrize("error, message", [
    (ValueError("the model cannot write these elements: Og"), "the model cannot write these elements: Og"),
    (RuntimeError("boom"), "reward fine-tuning failed (RuntimeError: boom)"),
])
def test_errors_are_messages(tuned_dir, monkeypatch, error, message):
    def fail(should_stop):
        raise error
    job = run_fake(tuned_dir, monkeypatch, fail)
    assert job.join(timeout=10) and job.status == "failed" and job.error == message
    assert job.model_dir is not None  # the round finished before the error is kept
