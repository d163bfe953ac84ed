"""Generation jobs: a run of one or more requests in a background thread, one at a time per process.

- `GenerationQueue`: several users on one CPU would thrash each other; with the queue each job
  waits its turn and sees its position.
- `GenerationJob`: generates the requests into its Run. Each candidate is scored (surrogate
  band gap, CHGNet E_hull, novelty) as it arrives and stored in the history at once, so a
  crash of the server loses nothing that had finished. A best-N-of-K request is picked (and
  its picks relaxed) when its samples are all in (`best_of.finish`). The page polls `progress()`; Cancel
  sets an event the sampler checks between steps. A job nobody has polled for ABANDON_SECONDS
  (its tab was closed) cancels itself and frees the queue. The thread touches no Streamlit API.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from crystallm_core.chem.judges.scoring import StructureScorer, default_scorer
from crystallm_core.product import best_of
from crystallm_core.product.evaluate import score_candidates
from crystallm_core.product.generation import GenerationRequest, generate
from crystallm_core.product.history import HistoryStore
from crystallm_core.product.run import Candidate, Run

LOG = logging.getLogger(__name__)
ABANDON_SECONDS = 120  # a job unpolled this long has lost its page (tab closed): stop it
HEAD_START_SLOTS = 4  # the sampler's head start for a request someone watches (first structure sooner)


class GenerationQueue:
    """FIFO of tickets; the ticket at the head may generate, the others wait and see their place."""

    def __init__(self):
        self._cond = threading.Condition()
        self._line: list[int] = []
        self._tickets = itertools.count(1)

    def join(self) -> int:
        with self._cond:
            ticket = next(self._tickets)
            self._line.append(ticket)
            return ticket

    def __len__(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._line)

    def position(self, ticket: int) -> int | None:
        """0 = generating now, k = k runs ahead of it, None = not in the queue."""
        with self._cond:
            return self._line.index(ticket) if ticket in self._line else None

    def wait_turn(self, ticket: int, should_cancel: Callable[[], bool], poll_seconds: float = 0.2) -> bool:
        """Block until `ticket` is at the head (True) or `should_cancel()` (False)."""
        with self._cond:
            while self._line[0] != ticket:
                if should_cancel():
                    return False
                self._cond.wait(poll_seconds)
            return True

    def leave(self, ticket: int) -> None:
        with self._cond:
            if ticket in self._line:
                self._line.remove(ticket)
            self._cond.notify_all()


GENERATION_QUEUE = GenerationQueue()


@dataclass
class Progress:
    status: str  # queued | running | done | cancelled | failed
    done: int  # candidates finished
    total: int  # the most candidates the requests may draw
    valid: int
    valid_target: int | None  # with "until N valid" requests: how many valid ones are wanted in all
    fraction: float  # of the work, 0–1 (a request that stops at N valid is done at N valid)
    elapsed: float
    eta: float | None
    position: int | None  # place in the generation queue while queued
    phase: str | None = None  # what runs after sampling (best of K: picking, relaxing the picks)


class QueuedJob:
    """A background thread that waits its turn in a queue (`_work` does the job): start, cancel,
    join, finished. Generation and fine-tuning share it."""

    def __init__(self, queue: GenerationQueue, name: str):
        self.queue = queue
        self.status = "queued"
        self.ticket: int | None = None
        self.started_at: float | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def _work(self) -> None:
        raise NotImplementedError

    def start(self):
        self.ticket = self.queue.join()
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def finished(self) -> bool:
        return self.status in ("done", "cancelled", "failed")


class GenerationJob(QueuedJob):
    """Generates `requests` into `run` in a background thread; the run is stored in `store` as it grows."""

    def __init__(self, loaded_model, requests: Sequence[GenerationRequest], run: Run, store: HistoryStore | None = None,
                 queue: GenerationQueue = GENERATION_QUEUE, scorer: Callable[[], StructureScorer] = default_scorer):
        super().__init__(queue, f"generation-{run.run_id}")
        self.loaded_model, self.requests, self.run = loaded_model, list(requests), run
        self.store, self.scorer = store, scorer
        self.total = sum(r.n for r in self.requests)
        targets = [r.stop_after_valid for r in self.requests]
        self.valid_target = sum(targets) if all(targets) else None
        self.requests_done = 0
        self.request_start = 0  # index of the first candidate of the request being sampled
        self.finished_at: float | None = None
        self.last_polled = time.monotonic()  # progress() is the page's heartbeat
        self.phase: str | None = None  # after sampling: "picking", "relaxing the N picked structures"

    def should_cancel(self) -> bool:
        """Cancel was pressed, or the page stopped polling (tab closed): either way, stop."""
        if time.monotonic() - self.last_polled > ABANDON_SECONDS:
            self._cancel.set()
        return self._cancel.is_set()

    def candidates(self) -> list[Candidate]:
        return list(self.run.candidates)

    def fraction_done(self, candidates: list[Candidate]) -> float:
        """Share of the work done, weighting each request by its most samples."""
        done = sum(r.n for r in self.requests[: self.requests_done])
        if self.requests_done < len(self.requests):
            request, current = self.requests[self.requests_done], candidates[self.request_start:]
            part = len(current) / request.n
            if request.stop_after_valid:
                part = max(part, sum(c.valid for c in current) / request.stop_after_valid)
            done += min(part, 1.0) * request.n
        return done / self.total

    def progress(self) -> Progress:
        self.last_polled = time.monotonic()
        candidates = self.candidates()
        fraction = self.fraction_done(candidates)
        end = self.finished_at or time.time()
        elapsed = end - self.started_at if self.started_at else 0.0
        eta = elapsed / fraction * (1 - fraction) if fraction and not self.finished else None
        position = self.queue.position(self.ticket) if self.status == "queued" else None
        return Progress(self.status, len(candidates), self.total, sum(c.valid for c in candidates), self.valid_target,
                        fraction, elapsed, eta, position, self.phase)

    def _add(self, candidate: Candidate) -> None:
        """A candidate arrived: score it if valid, then store it (a failure costs its scores only)."""
        if candidate.valid:
            try:
                scorer = self.scorer()
                self.run.unavailable = dict(scorer.unavailable)
                score_candidates([candidate], scorer)
            except Exception as error:
                candidate.scores.notes.append(f"scoring failed: {type(error).__name__}: {error}")
        self._store(candidate)

    def _store(self, candidate: Candidate) -> None:
        """Store a candidate in the history (again, after a change); a failure is logged, not raised."""
        if self.store is not None:
            try:
                self.store.add(self.run, candidate)
            except Exception:
                LOG.exception("could not store a candidate of run %s", self.run.run_id)

    def _pick(self, request: GenerationRequest, candidates: list[Candidate]) -> None:
        """Best N of K: pick (and relax) the request's best once all its samples are in; stored again."""
        if not request.keep_best or self.should_cancel():
            return
        self.phase = f"relaxing the {request.keep_best} picked structures" if request.relax else "picking"
        try:
            changed = best_of.finish(self.run, candidates, request, self.scorer())
        except Exception as error:  # the samples stay; only the pick is lost
            LOG.exception("best-of pick of run %s failed", self.run.run_id)
            self.run.error = f"picking the best failed ({type(error).__name__}: {error})"
            changed = []
        self.phase = None
        for candidate in changed:
            self._store(candidate)

    def _work(self) -> None:
        status = "cancelled"
        try:
            if self.queue.wait_turn(self.ticket, self.should_cancel):
                self.status, self.started_at = "running", time.time()
                if self.store is not None:
                    self.store.begin(self.run)
                for request in self.requests:
                    if self.should_cancel():
                        break
                    generate(self.loaded_model, request, self.run, on_candidate=self._add,
                             should_cancel=self.should_cancel, head_start=HEAD_START_SLOTS)
                    self._pick(request, self.run.candidates[self.request_start:])
                    self.requests_done, self.request_start = self.requests_done + 1, len(self.run.candidates)
                status = "cancelled" if self._cancel.is_set() else "done"
        except ValueError as error:  # bad request: the core's message is meant for the user
            status, self.run.error = "failed", str(error)
        except Exception as error:
            LOG.exception("generation job %s failed", self.run.run_id)
            status, self.run.error = "failed", f"generation failed ({type(error).__name__}: {error})"
        finally:
            try:
                self.queue.leave(self.ticket)
                self.run.status = status
                if self.store is not None and self.started_at is not None:  # begun in the history
                    try:
                        self.store.finish(self.run)
                    except Exception:
                        LOG.exception("could not save run %s to the history", self.run.run_id)
            finally:  # always final, or the page would poll a dead thread forever
                self.finished_at = time.time()
                self.status = status  # last: from here on the UI treats the run as final
