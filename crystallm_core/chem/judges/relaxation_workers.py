"""Relax a batch on every core: worker processes take chunks of the structures.

`batch_relaxation.relax_batch` runs CHGNet and the ASE optimisers in one Python process: a
CHGNet forward over a batch of generated structures is many small tensor ops and the optimisers
are Python, so a second torch thread buys little. Separate processes buy more: the structures
are handed out in chunks (`guided_chunks`); this process relaxes one chunk at a time on one torch
thread and each long-lived worker process (`isolation.IsolatedWorker`: started on first use,
CHGNet loaded once there, replaced if it dies) does the same, each taking the next chunk when it
finishes one. A chunk a worker could not relax (it crashed, or overran its time or memory
ceiling) is tried again one structure per call in the replaced worker: the structures that relax
alone get their relaxation, and the one that brought the worker down gets the reason, never a
second try in this process (a server's memory is not put at stake by a structure that took 4 GB).
Only when no worker can start at all are the chunks relaxed here. Each structure follows the
steps it would follow alone, so the results are `relax_batch`'s up to rounding.

Measured side by side (2-core AVX2 CPU, 2026-12-06, three alternating runs): 16 generated
structures (`scripts/bench_relax.py`'s) one process at two torch threads 12.6-13.9 s, at one
18.0-19.6 s, on two processes 10.3-10.5 s; the app's 15 picks (14-40 sites, up to 100 steps)
21.5-27.1 / 27.7-33.2 / 17.3-18.3 s. Splitting each step's CHGNet forward over the processes
instead (the optimisers all here) did worse, 20.3-22.2 s on the picks: a step waits for the slower
share and the optimisers' own work is not shared.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from pymatgen.core import Structure

from crystallm_core.chem.judges.batch_relaxation import relax_batch
from crystallm_core.chem.judges.isolation import IsolatedWorker, Outcome
from crystallm_core.chem.judges.stability import Relaxation, RelaxSettings

MIN_SHARE = 2  # structures per process: with fewer, a second process is not worth starting
WORKER_MEMORY_LIMIT = 4 * 1024 ** 3  # bytes a call may add (CHGNet and its graphs for one chunk)
WORKER_START_SECONDS = 60.0  # added to a chunk's time bound: a fresh worker imports torch and CHGNet


def relax_chunk(argument: tuple[list[Structure], RelaxSettings, int]) -> list[Relaxation | str]:
    """What a worker runs: `relax_batch` of its chunk, on one torch thread."""
    structures, settings, batch_size = argument
    with one_thread():
        return relax_batch(structures, settings, batch_size)


WORKERS: list[IsolatedWorker] = []
WORKERS_LOCK = threading.Lock()


def worker(i: int) -> IsolatedWorker:
    """The i-th relaxation worker (created on first use; its process starts on its first call)."""
    with WORKERS_LOCK:
        while len(WORKERS) <= i:
            WORKERS.append(IsolatedWorker(relax_chunk, memory_limit=WORKER_MEMORY_LIMIT))
        return WORKERS[i]


def default_processes() -> int:
    """Every core this process may use, counting itself."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def guided_chunks(structures: Sequence[Structure], processes: int) -> list[list[int]]:
    """Indices of `structures` in chunks that shrink as the work runs out (OpenMP's "guided"
    schedule): each chunk a 1/(2 × processes) share of the structures not yet handed out, the
    largest structures first. A structure's steps are not known before it is relaxed (2 to 46 for
    16 generated ones), so shares fixed up front finish far apart (5.1 vs 12.7 s); processes that
    take the next chunk when they finish one end together, and the large first chunks keep most of
    the batching."""
    order = sorted(range(len(structures)), key=lambda i: -len(structures[i]))
    chunks = []
    while order:
        size = max(1, -(-len(order) // (2 * processes)))
        chunks.append(sorted(order[:size]))
        order = order[size:]
    return chunks


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread while processes share the cores (`relax_batch` keeps NumPy's BLAS at one:
    with OpenBLAS at a thread per core, 16 structures on 2 processes took 25.9 s instead of 9.1 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def relax_on_cores(structures: Sequence[Structure], settings: RelaxSettings | None = None,
                   batch_size: int = 16, processes: int | None = None) -> list[Relaxation | str]:
    """`relax_batch` of `structures`, in `guided_chunks` taken by `processes` processes as each
    finishes its last (default: one per core, at most one per MIN_SHARE structures; 1: all here)."""
    settings = settings or RelaxSettings()
    processes = min(processes or default_processes(), max(len(structures) // MIN_SHARE, 1))
    if processes <= 1:
        return relax_batch(structures, settings, batch_size)
    chunks = deque(guided_chunks(structures, processes))
    lock = threading.Lock()
    results: list[Relaxation | str | None] = [None] * len(structures)
    unstarted: list[list[int]] = []  # chunks no worker could start for: relaxed here at the end

    def next_chunk() -> list[int] | None:
        with lock:
            return chunks.popleft() if chunks else None

    def store(chunk: list[int], relaxed: list) -> None:
        for i, result in zip(chunk, relaxed):
            results[i] = result

    def relax_here(chunk: list[int]) -> None:
        store(chunk, relax_batch([structures[i] for i in chunk], settings, batch_size))

    def in_worker(k: int, chunk: list[int]) -> Outcome | None:
        """Worker k's outcome for `chunk`; None if no worker process could start."""
        bound = settings.max_seconds * len(chunk) + WORKER_START_SECONDS
        try:
            outcome = worker(k).call(([structures[i] for i in chunk], settings, batch_size), time_limit=bound)
        except Exception:  # the worker could not start
            return None
        if outcome.error is None and len(outcome.value) != len(chunk):
            return Outcome(None, f"returned {len(outcome.value)} results for {len(chunk)} structures")
        return outcome

    def stopped(error: str) -> str:
        return f"relaxation stopped: the worker {error}"

    def retry_alone(k: int, chunk: list[int]) -> list[int]:
        """A failed chunk's structures one per call (the worker is replaced on the first): each
        gets its relaxation or its own reason. Returns those left when no worker could start."""
        for position, i in enumerate(chunk):
            alone = in_worker(k, [i])
            if alone is None:
                return chunk[position:]
            results[i] = alone.value[0] if alone.error is None else stopped(alone.error)
        return []

    def feed(k: int) -> None:
        while (chunk := next_chunk()) is not None:
            outcome = in_worker(k, chunk)
            if outcome is not None and outcome.error is None:
                store(chunk, outcome.value)
                continue
            if outcome is not None and len(chunk) == 1:
                results[chunk[0]] = stopped(outcome.error)
                continue
            left = chunk if outcome is None else retry_alone(k, chunk)
            if left:
                with lock:
                    unstarted.append(left)
                return  # no worker starts here: the others and this process take the rest

    threads = [threading.Thread(target=feed, args=(k,), daemon=True) for k in range(processes - 1)]
    for thread in threads:
        thread.start()
    with one_thread():
        while (chunk := next_chunk()) is not None:
            relax_here(chunk)
        for thread in threads:
            thread.join()
        for chunk in unstarted:
            relax_here(chunk)
    return results
