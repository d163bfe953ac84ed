"""Untrusted structures are checked in a worker process, so a native crash costs one structure.

spglib, CrystalNN's neighbour search and CifParser run native or unbounded code on whatever
a CIF says. `validity.structure_problem` keeps degenerate cells away from them, but an upload,
an `evaluate` input or a model output is still untrusted: `IsolatedWorker` runs a function in
a child process that is started on first use and replaced when it dies (segfault, out of
memory) or overruns its time limit. The caller gets the function's result or a readable
reason, and the next call gets a fresh worker. Each call may also use at most `memory_limit`
bytes beyond what the worker holds once started (RLIMIT_AS, set in the child): a structure that
needs more fails with "too large to score" and the worker is replaced, where it would otherwise
grow until the kernel's OOM killer picks a process (the server, say).

The child is a plain `python -m crystallm_core.chem.judges.isolation MODULE NAME` speaking
length-prefixed pickles on its stdin/stdout, not a multiprocessing child: those re-run the
caller's main script on start, which breaks any script or notebook cell that calls
`generate` at top level. torch is never imported there.
"""
from __future__ import annotations

import atexit
import importlib
import os
import pickle
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable

from crystallm_core.chem.cif.cif_format import repair_generated_cif
from crystallm_core.chem.judges.validity import (
    CHECK_NAMES,
    CheckResult,
    ValidityConfig,
    ValidityReport,
    check_cif,
)

DEFAULT_TIME_LIMIT = 60.0  # seconds for one call, a backstop behind the per-check limits
PER_CHECK_TIME_LIMIT = 10.0  # seconds for each validity check inside the worker
START_TIME_LIMIT = 120.0  # seconds for a worker to import what it needs (slow on a busy machine)
# Bytes one call may add to the worker's address space. A check of a 2,000-site cell stays far
# below it; the guards of `crowding` keep the known memory sinks out, this catches the unknown.
DEFAULT_MEMORY_LIMIT = 2 * 1024 ** 3
HEADER = struct.Struct("!I")


@dataclass
class Outcome:
    value: Any = None
    error: str | None = None  # why there is no value ("crashed …", "timed out …", "raised …")
    seconds: float = 0.0


class WorkerGone(Exception):
    """The worker's pipe closed: it died."""


def write_frame(stream, value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def read_exactly(fd: int, size: int, deadline: float) -> bytes | None:
    """`size` bytes from fd, or None when the deadline passes first; WorkerGone at end of file."""
    chunks, left = [], size
    while left:
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([fd], [], [], wait)[0]:
            return None
        chunk = os.read(fd, left)
        if not chunk:
            raise WorkerGone()
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, deadline: float) -> Any:
    """The next value from fd; TimeoutError when the deadline passes, WorkerGone if it died."""
    header = read_exactly(fd, HEADER.size, deadline)
    body = None if header is None else read_exactly(fd, HEADER.unpack(header)[0], deadline)
    if body is None:
        raise TimeoutError()
    return pickle.loads(body)


def too_large(memory_limit: int) -> str:
    return f"too large to score: needed more than the {memory_limit / 1024 ** 3:g} GB memory ceiling"


def cap_address_space(extra_bytes: int) -> None:
    """Let this process map at most `extra_bytes` more than it has mapped now (its libraries loaded),
    or less where a limit set from outside (ulimit -v) is lower."""
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    wanted = mapped + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


def serve(module: str, name: str, memory_limit: int) -> None:
    """The worker's loop: one argument in, ("ok", value), ("error", text) or, when the call ran
    out of its memory ceiling, ("fatal", text) out, on the original stdout (print() and native
    libraries' output go to stderr instead)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    function = importlib.import_module(module)
    for part in name.split("."):
        function = getattr(function, part)
    cap_address_space(memory_limit)
    write_frame(replies, ("ready", None))
    requests = sys.stdin.buffer
    while True:
        header = requests.read(HEADER.size)
        if len(header) < HEADER.size:
            return
        argument = pickle.loads(requests.read(HEADER.unpack(header)[0]))
        try:
            write_frame(replies, ("ok", function(argument)))
        except MemoryError:  # the heap may be left fragmented or half-built: the parent replaces us
            write_frame(replies, ("fatal", too_large(memory_limit)))
            return
        except Exception as error:
            write_frame(replies, ("error", f"raised {type(error).__name__}: {error}"))


def signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {-exitcode}: {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class IsolatedWorker:
    """Calls `function(argument)` in a child process; thread-safe (one call at a time).
    `function` must be importable by module and name (a module-level function or a builtin)."""

    def __init__(self, function: Callable, time_limit: float = DEFAULT_TIME_LIMIT,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT):
        self.target = (function.__module__ or "builtins", function.__qualname__)
        self.time_limit, self.memory_limit = time_limit, memory_limit
        self.process: subprocess.Popen | None = None
        self.restarts = 0  # workers replaced after a crash or a timeout
        self.lock = threading.Lock()
        atexit.register(self.close)

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "crystallm_core.chem.judges.isolation", *self.target,
                                         str(self.memory_limit)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            read_frame(self.process.stdout.fileno(), time.monotonic() + START_TIME_LIMIT)
        except (TimeoutError, WorkerGone):
            self.stop()
            raise RuntimeError("the checker process could not start") from None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process.stdin.close()
            self.process.stdout.close()
        self.process = None

    def close(self) -> None:
        with self.lock:
            self.stop()

    def ensure_started(self) -> None:
        """Start the worker now if it is not running (its start takes about a second)."""
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self.start()

    def call(self, argument: Any, time_limit: float | None = None) -> Outcome:
        limit = self.time_limit if time_limit is None else time_limit
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self.start()
            started = time.monotonic()
            try:
                write_frame(self.process.stdin, argument)
                status, value = read_frame(self.process.stdout.fileno(), started + limit)
                seconds = time.monotonic() - started
                if status != "fatal":
                    return Outcome(value, None, seconds) if status == "ok" else Outcome(None, value, seconds)
                error = value
            except TimeoutError:
                error = f"timed out after {limit:g} s"
            except (WorkerGone, BrokenPipeError, OSError):
                error = f"crashed ({signal_name(self.process.wait(5))})"
            seconds = time.monotonic() - started  # (replacing the worker is not the call's time)
            self.stop()
            self.restarts += 1
            return Outcome(None, error, seconds)


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


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
