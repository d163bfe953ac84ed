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


def test_a_call_over_the_memory_ceiling_fails_as_too_large_and_the_worker_is_replaced():
    worker = IsolatedWorker(eval, time_limit=20, memory_limit=256 * 1024 ** 2)
    try:
        assert len(worker.call("bytearray(64 * 1024 ** 2)").value) == 64 * 1024 ** 2  # under the ceiling
        outcome = worker.call("bytearray(1024 ** 3)")
        assert outcome.value is None
        assert outcome.error == "too large to score: needed more than the 0.25 GB memory ceiling"
        assert worker.restarts == 1
        assert worker.call("'still here'").value == "still here"
    finally:
        worker.close()


def test_checker_over_its_memory_ceiling_names_it_in_the_reason():
    worker = IsolatedWorker(eval, time_limit=20, memory_limit=128 * 1024 ** 2)
    try:
        report = check_cif_isolated("bytearray(1024 ** 3)", worker)
        assert report.check("parses").reason == ("checker too large to score: needed more than the "
                                                 "0.125 GB memory ceiling on this CIF")
        assert all(c.reason == "skipped: checker failed" for c in report.checks[1:])
    finally:
        worker.close()


def test_a_check_that_runs_out_of_memory_is_not_swallowed_as_a_failed_check():
    from crystallm_core.chem.judges.validity import run_check

    def hungry() -> str:
        raise MemoryError()

    with pytest.raises(MemoryError):
        run_check("parses", hungry)
