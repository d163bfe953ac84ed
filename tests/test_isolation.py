"""A native crash or a runaway check costs one structure, never the process (issue 9)."""
from __future__ import annotations

import pytest
from test_validity import ZERO_ANGLE_CIF

from crystallm_core.chem.judges.isolation import IsolatedWorker, check_cif_isolated
from crystallm_core.chem.judges.validity import CHECK_NAMES

SEGFAULT = "__import__('ctypes').string_at(0)"


@pytest.fixture
def worker():
    worker = IsolatedWorker(eval, time_limit=20)
    yield worker
    worker.close()


def test_segfault_costs_one_call_and_the_worker_is_replaced(worker):
    assert worker.call("1 + 1").value == 2
    outcome = worker.call(SEGFAULT)
    assert outcome.value is None and outcome.error == "crashed (signal 11: SIGSEGV)"
    assert worker.restarts == 1
    assert worker.call("2 * 3").value == 6  # a fresh worker took over


def test_overrun_is_killed_with_its_reason(worker):
    outcome = worker.call("__import__('time').sleep(30)", time_limit=0.5)
    assert outcome.error == "timed out after 0.5 s" and outcome.seconds < 5
    assert worker.call("'still here'").value == "still here"


def test_exception_is_reported_and_keeps_the_worker(worker):
    assert worker.call("1 / 0").error == "raised ZeroDivisionError: division by zero"
    assert worker.restarts == 0


def test_crashing_checker_fails_every_check_with_the_reason(worker):
    report = check_cif_isolated(SEGFAULT, worker)
    assert [c.name for c in report.checks] == CHECK_NAMES and not report.valid
    assert report.check("parses").reason == "checker crashed (signal 11: SIGSEGV) on this CIF"


def test_zero_angle_cif_through_the_shared_checker():
    report = check_cif_isolated(ZERO_ANGLE_CIF)
    assert report.check("sane_cell").reason == "cell angle alpha = 0° is outside 10–170°"
    assert report.check("space_group").reason == "skipped: cell is not sane"
