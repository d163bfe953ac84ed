"""Untrusted structures are checked in a worker process, so a native crash costs one structure.

spglib, CrystalNN's neighbour search and CifParser run native or unbounded code on whatever
a CIF says. `validity.structure_problem` keeps degenerate cells away from them, but an upload,
an `evaluate` input or a model output is still untrusted: `IsolatedWorker` runs a function in
a child process that is started on first use and replaced when it dies (segfault, out of
memory) or overruns its time limit. The caller gets the function's result or a readable
reason, and the next call gets a fresh worker. Workers fork from a `forkserver` that has
imported pymatgen once, so a replacement starts in tens of milliseconds; torch is never
imported there.
"""
from __future__ import annotations

import atexit
import multiprocessing
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable

from crystallm_core.chem.cif_format import repair_generated_cif
from crystallm_core.chem.validity import (
    CHECK_NAMES,
    CheckResult,
    ValidityConfig,
    ValidityReport,
    check_cif,
)

DEFAULT_TIME_LIMIT = 60.0  # seconds for one call, a backstop behind the per-check limits
PER_CHECK_TIME_LIMIT = 10.0  # seconds for each validity check inside the worker


@dataclass
class Outcome:
    value: Any = None
    error: str | None = None  # why there is no value ("crashed …", "timed out …", "raised …")
    seconds: float = 0.0


def serve(connection, function: Callable) -> None:
    """The worker's loop: one argument in, ("ok", value) or ("error", text) out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    while True:
        try:
            argument = connection.recv()
        except EOFError:
            return
        try:
            connection.send(("ok", function(argument)))
        except Exception as error:
            connection.send(("error", f"raised {type(error).__name__}: {error}"))


def signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {-exitcode}: {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class IsolatedWorker:
    """Calls `function(argument)` in a child process; thread-safe (one call at a time)."""

    def __init__(self, function: Callable, time_limit: float = DEFAULT_TIME_LIMIT,
                 preload: tuple[str, ...] = ("crystallm_core.chem.validity",)):
        self.function, self.time_limit = function, time_limit
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(preload))
        self.process = self.connection = None
        self.restarts = 0  # workers replaced after a crash or a timeout
        self.lock = threading.Lock()
        atexit.register(self.close)

    def start(self) -> None:
        parent, child = self.context.Pipe()
        self.process = self.context.Process(target=serve, args=(child, self.function), daemon=True,
                                            name="crystallm-checker")
        self.process.start()
        child.close()
        self.connection = parent

    def stop(self) -> None:
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(5)
            self.connection.close()
        self.process = self.connection = None

    def close(self) -> None:
        with self.lock:
            self.stop()

    def call(self, argument: Any, time_limit: float | None = None) -> Outcome:
        limit = self.time_limit if time_limit is None else time_limit
        with self.lock:
            if self.process is None or not self.process.is_alive():
                self.start()
            started = time.perf_counter()
            try:
                self.connection.send(argument)
                if self.connection.poll(limit):
                    status, value = self.connection.recv()
                    seconds = time.perf_counter() - started
                    return Outcome(value, None, seconds) if status == "ok" else Outcome(None, value, seconds)
                error = f"timed out after {limit:g} s"
            except (EOFError, OSError):
                self.process.join(5)
                error = f"crashed ({signal_name(self.process.exitcode)})"
            self.stop()
            self.restarts += 1
            return Outcome(None, error, time.perf_counter() - started)


def check_with_limits(cif_text: str) -> ValidityReport:
    """check_cif as the worker runs it: each check bounded by PER_CHECK_TIME_LIMIT."""
    return check_cif(cif_text, ValidityConfig(), time_limit=PER_CHECK_TIME_LIMIT)


CHECKER = IsolatedWorker(check_with_limits)


# Constrained decoding checks a CIF as it ends, and generation then asks again: remember a few.
RECENT_REPORTS: OrderedDict[str, ValidityReport] = OrderedDict()
RECENT_LIMIT = 64
RECENT_LOCK = threading.Lock()


def check_cif_isolated(cif_text: str, worker: IsolatedWorker = CHECKER) -> ValidityReport:
    """check_cif in the checker process; a crash or overrun fails every check with the reason.
    The last few reports of the shared checker are remembered (a copy is returned)."""
    with RECENT_LOCK:
        remembered = RECENT_REPORTS.get(cif_text) if worker is CHECKER else None
    if remembered is not None:
        return replace(remembered, checks=list(remembered.checks))
    outcome = worker.call(cif_text)
    if outcome.error is None:
        if worker is CHECKER:
            with RECENT_LOCK:
                RECENT_REPORTS[cif_text] = outcome.value
                while len(RECENT_REPORTS) > RECENT_LIMIT:
                    RECENT_REPORTS.popitem(last=False)
            return replace(outcome.value, checks=list(outcome.value.checks))
        return outcome.value
    reason = f"checker {outcome.error} on this CIF"
    return ValidityReport([CheckResult(name, False, reason if name == "parses" else "skipped: checker failed")
                           for name in CHECK_NAMES])


def check_sample(text: str, stop_reason: str, max_tokens: int, note: str | None = None) -> tuple[str | None, ValidityReport]:
    """Repair + validity for one generated text; never raises. `note` says why a constrained
    sample was given up."""
    try:
        repaired = repair_generated_cif(text)
    except Exception as error:  # a repair bug must not cost the batch
        repaired = None
        reason = f"repair failed unexpectedly: {type(error).__name__}: {error}"
    else:
        reason = repaired.reason
        repaired = repaired.cif
    if repaired is None:
        report = ValidityReport(checks=[CheckResult("repairable", False, reason or "could not be repaired")],
                                structure=None, formula=None, spacegroup=None)
    else:
        report = check_cif_isolated(repaired)  # model output is untrusted: a native crash costs one sample
    if stop_reason == "length":
        report.checks.insert(0, CheckResult("complete", False, f"stopped at the {max_tokens}-token context limit before <eos>"))
    elif stop_reason == "gave up":
        report.checks.insert(0, CheckResult("complete", False, f"constrained decoding {note or 'gave up'}"))
    return repaired, report
