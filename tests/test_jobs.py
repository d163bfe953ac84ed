"""Background generation jobs: the queue, progress, cancel keeps what finished, history as it streams."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from prototypes import rocksalt_nacl
from run_samples import candidate

from crystallm_core.product import jobs
from crystallm_core.product.generation import GenerationRequest
from crystallm_core.product.history import HistoryStore
from crystallm_core.product.jobs import GenerationJob, GenerationQueue
from crystallm_core.product.run import Run


def test_queue_is_fifo_with_positions_and_cancel_while_waiting():
    queue = GenerationQueue()
    first, second, third = queue.join(), queue.join(), queue.join()
    assert [queue.position(t) for t in (first, second, third)] == [0, 1, 2]
    assert queue.wait_turn(first, lambda: False)
    assert queue.wait_turn(third, lambda: True, poll_seconds=0.01) is False  # cancelled while waiting
    queue.leave(first)
    assert queue.position(second) == 0 and queue.position(first) is None


def even_valid(i: int):
    """Even samples are valid NaCl, odd ones unrepairable."""
    return candidate(i, rocksalt_nacl() if i % 2 == 0 else None)


NO_SCORES = SimpleNamespace(unavailable={}, score=lambda structures: [{} for _ in structures])


def test_progress_of_an_until_valid_request_counts_valid_structures():
    until_valid, plain = GenerationRequest(n=20, stop_after_valid=5), GenerationRequest(n=10)
    job = GenerationJob(None, [until_valid, plain], Run(), queue=GenerationQueue(), scorer=lambda: NO_SCORES)
    for i in range(6):  # 3 valid of 6: the first request is 3/5 done (valid beats 6/20 sampled)
        job.run.candidates.append(even_valid(i))
        job._add(job.run.candidates[-1])
    progress = job.progress()
    assert (progress.done, progress.valid, progress.total, progress.valid_target) == (6, 3, 30, None)
    assert progress.fraction == pytest.approx(20 * 3 / 5 / 30)
    job.requests_done, job.request_start = 1, 6  # as if the first request had ended: none of the second yet
    assert job.progress().fraction == pytest.approx(20 / 30)
    assert GenerationJob(None, [until_valid], Run(), queue=GenerationQueue()).progress().valid_target == 5


def fake_generate(loaded, request, run, on_candidate=None, should_cancel=None, head_start=0):
    """Streams alternating valid / invalid candidates until cancelled."""
    for i in range(request.n):
        if should_cancel():
            break
        run.candidates.append(even_valid(len(run.candidates)))
        on_candidate(run.candidates[-1])
        time.sleep(0.05)
    return run


def test_job_scores_valid_candidates_stores_them_as_they_come_and_keeps_them_when_cancelled(tmp_path, monkeypatch):
    class FakeScorer:
        unavailable = {"band gap": "no surrogate weights"}

        def score(self, structures):
            return [{"e_hull_pred": 0.01, "novel": True} for _ in structures]

    monkeypatch.setattr(jobs, "generate", fake_generate)
    store = HistoryStore(tmp_path / "h.sqlite")
    run = Run(requests=[{"n": 1000}], status="running")
    job = GenerationJob(None, [GenerationRequest(n=1000)], run, store=store, queue=GenerationQueue(),
                        scorer=FakeScorer).start()
    deadline = time.time() + 10
    while job.progress().done < 3 and time.time() < deadline:
        time.sleep(0.02)
    assert store.load(run.run_id).status == "running" and len(store.load(run.run_id).candidates) >= 2
    job.cancel()
    assert job.join(10)
    progress = job.progress()
    assert progress.status == "cancelled" and 3 <= progress.done < 1000
    saved = store.load(run.run_id)
    assert saved.status == "cancelled" and len(saved.candidates) == progress.done
    assert saved.unavailable == {"band gap": "no surrogate weights"}
    assert saved.candidates[0].scores.e_hull_pred == 0.01 and saved.candidates[1].scores.e_hull_pred is None


def fake_generate_until_cancelled(loaded, request, run, on_candidate=None, should_cancel=None, head_start=0):
    """Generates nothing, slowly, until asked to stop (or 10 s pass)."""
    deadline = time.time() + 10
    while not should_cancel() and time.time() < deadline:
        time.sleep(0.02)
    return run


def test_job_nobody_polls_cancels_itself_and_frees_the_queue(monkeypatch):
    """A closed tab stops polling: after ABANDON_SECONDS the job stops and leaves the queue."""
    monkeypatch.setattr(jobs, "generate", fake_generate_until_cancelled)
    monkeypatch.setattr(jobs, "ABANDON_SECONDS", 0.3)
    queue = GenerationQueue()
    job = GenerationJob(None, [GenerationRequest(n=1)], Run(), queue=queue).start()
    assert job.join(5) and job.status == "cancelled" and queue.position(job.ticket) is None


def test_job_is_final_even_if_the_history_fails(tmp_path, monkeypatch):
    class BrokenStore:
        def begin(self, run):
            pass

        def finish(self, run):
            raise RuntimeError("disk full")

    monkeypatch.setattr(jobs, "generate", fake_generate_until_cancelled)
    job = GenerationJob(None, [GenerationRequest(n=1)], Run(), store=BrokenStore(), queue=GenerationQueue()).start()
    job.cancel()
    assert job.join(5) and job.finished and job.status == "cancelled"


def test_a_bad_request_fails_the_job_with_the_reason(monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("'Xx' is not a chemical element")

    monkeypatch.setattr(jobs, "generate", refuse)
    job = GenerationJob(None, [GenerationRequest(n=1)], Run(), queue=GenerationQueue()).start()
    assert job.join(5) and job.status == "failed" and job.run.error == "'Xx' is not a chemical element"
