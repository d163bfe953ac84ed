"""Time limits and readable error text for the checks: a block interrupted after N seconds
(also inside library code that swallows exceptions), and any exception as one short line, with
pymatgen's commonest CIF-parser errors put in words. Shared by the validity checks and by the
Explore page's parse (`structure_info`).
"""
from __future__ import annotations

import re
import signal
import threading
from contextlib import contextmanager


class CheckTimeout(BaseException):
    """Raised by the alarm when a check overruns its time limit. A BaseException, like
    KeyboardInterrupt: pymatgen's `except Exception` blocks (CrystalNN has several) swallowed it,
    and a check that overran its limit then ran on to the end."""


@contextmanager
def time_limit(seconds: float | None, repeat: float = 0.25):
    """Interrupt the block with CheckTimeout after `seconds`, and again every `repeat` seconds
    until it ends: pymatgen has bare `except:` clauses that swallow one interruption. Only on
    the main thread, where signals are delivered; elsewhere (e.g. in the checker process's
    caller) it is a no-op."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = [True]

    def alarm(signum, frame):
        if armed[0]:
            raise CheckTimeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, repeat)
    try:
        yield
    finally:
        while armed[0]:  # an alarm may land here too: disarm until it sticks
            try:
                armed[0] = False
            except CheckTimeout:
                continue
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


MAX_REASON_CHARS = 200


def error_text(error: Exception) -> str:
    """An unexpected error as a reason: one line, at most MAX_REASON_CHARS (pymatgen can quote
    a whole loop of numbers in its message)."""
    text = " ".join(f"{type(error).__name__}: {error}".split()).rstrip(":")
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 1] + "…"


# What pymatgen's CIF parser means by its commonest errors (seen in 100,000 fuzzed inputs).
PARSE_ERRORS = [
    (r"ZeroDivisionError", "a loop_ has no column names"),
    (r"zip\(\) argument \d is (?:longer|shorter)", "a loop_'s values do not fill its columns"),
    (r"no structures!", "no structure could be built: cell or atom-site data missing or unreadable"),
    (r"could not convert string to float: ('[^']*')", "a number cannot be read: {0}"),
    (r"(?:KeyError: |in CIF\. )'(_[\w-]+)'$", "the tag {0} is missing"),
    (r"cannot reshape array", "a row or symmetry operator has the wrong number of values"),
    (r"[Ss]ingular matrix", "the cell vectors are not independent (a flat cell)"),
    (r"Occupancy ([\d.]+) exceeded", "atoms overlap: occupancy {0} at one site"),
]


def parse_error_text(error: Exception) -> str:
    """A parser failure as a reason: what it means, then pymatgen's own words (cut short)."""
    raw = error_text(error)
    for pattern, meaning in PARSE_ERRORS:
        found = re.search(pattern, raw)
        if found:
            return f"{meaning.format(*found.groups())} ({raw[:80]}{'…' if len(raw) > 80 else ''})"
    return raw
