"""Relax a batch on every core: worker processes take their share of the structures.

`batch_relaxation.relax_batch` runs CHGNet and the ASE optimisers in one Python process. A
CHGNet forward over a batch of generated structures is many small tensor ops and the optimisers
are Python, so a second torch thread buys almost nothing (16 structures: 23.9 s at one thread,
22.4 s at two). Separate processes do: the structures are split into shares of about equal size
(sites), this process relaxes one share with one torch thread and each other share goes to a
long-lived worker process (`isolation.IsolatedWorker`: started on first use, CHGNet loaded
once there, replaced if it dies), all at the same time. A share a worker cannot relax (it crashed,
overran its time or memory ceiling, or could not start) is relaxed here afterwards: no structure
loses its relaxation to a worker. Each structure follows the steps it would follow alone, so the
results are those of `relax_batch` up to rounding.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from pymatgen.core import Structure

from crystallm_core.chem.judges.batch_relaxation import relax_batch
from crystallm_core.chem.judges.isolation import IsolatedWorker, Outcome
from crystallm_core.chem.judges.stability import Relaxation, RelaxSettings

MIN_SHARE = 2  # structures: below two per process, a share is not worth a process
WORKER_MEMORY_LIMIT = 4 * 1024 ** 3  # bytes a call may add (CHGNet and its graphs for one share)
WORKER_START_SECONDS = 60.0  # added to a share's time bound: a fresh worker imports torch and CHGNet


def relax_share(argument: tuple[list[Structure], RelaxSettings, int]) -> list[Relaxation | str]:
    """What a worker runs: `relax_batch` of its share, on one torch thread."""
    structures, settings, batch_size = argument
    torch.set_num_threads(1)
    return relax_batch(structures, settings, batch_size)


WORKERS: list[IsolatedWorker] = []
WORKERS_LOCK = threading.Lock()


def worker(i: int) -> IsolatedWorker:
    """The i-th relaxation worker (created on first use; its process starts on its first call)."""
    with WORKERS_LOCK:
        while len(WORKERS) <= i:
            WORKERS.append(IsolatedWorker(relax_share, memory_limit=WORKER_MEMORY_LIMIT))
        return WORKERS[i]


def default_processes() -> int:
    """Every core this process may use, counting itself."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def split_by_sites(structures: Sequence[Structure], parts: int) -> list[list[int]]:
    """Indices of `structures` in `parts` shares of about equal total sites (largest first, each
    to the lightest share): a CHGNet step costs about the same per site."""
    shares: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for i in sorted(range(len(structures)), key=lambda i: -len(structures[i])):
        lightest = loads.index(min(loads))
        shares[lightest].append(i)
        loads[lightest] += len(structures[i])
    return [sorted(share) for share in shares if share]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def relax_on_cores(structures: Sequence[Structure], settings: RelaxSettings | None = None,
                   batch_size: int = 16, processes: int | None = None) -> list[Relaxation | str]:
    """`relax_batch` of `structures`, their shares relaxed at once by `processes` processes
    (default: one per core, at most one per MIN_SHARE structures; 1: all here)."""
    settings = settings or RelaxSettings()
    processes = min(processes or default_processes(), max(len(structures) // MIN_SHARE, 1))
    if processes <= 1:
        return relax_batch(structures, settings, batch_size)
    here, *elsewhere = split_by_sites(structures, processes)
    outcomes: list[Outcome | None] = [None] * len(elsewhere)

    def run(k: int, share: list[int]) -> None:
        bound = settings.max_seconds * len(share) + WORKER_START_SECONDS
        argument = ([structures[i] for i in share], settings, batch_size)
        try:
            outcomes[k] = worker(k).call(argument, time_limit=bound)
        except Exception as error:  # the worker could not start
            outcomes[k] = Outcome(None, f"could not start: {error}")

    threads = [threading.Thread(target=run, args=(k, share), daemon=True) for k, share in enumerate(elsewhere)]
    for thread in threads:
        thread.start()
    results: list[Relaxation | str | None] = [None] * len(structures)
    with torch_threads(1):
        for i, result in zip(here, relax_batch([structures[i] for i in here], settings, batch_size)):
            results[i] = result
        for thread in threads:
            thread.join()
        for share, outcome in zip(elsewhere, outcomes):
            relaxed = outcome.value if outcome is not None and outcome.error is None else None
            if relaxed is None or len(relaxed) != len(share):  # the worker failed: relax its share here
                relaxed = relax_batch([structures[i] for i in share], settings, batch_size)
            for i, result in zip(share, relaxed):
                results[i] = result
    return results
