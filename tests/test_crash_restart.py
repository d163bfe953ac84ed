"""`kill -9` of the app during a generation, then a restart (issue 9): the history database is
intact, the interrupted run is listed as interrupted with every structure that had finished,
an earlier run is untouched, and the checker process did not outlive the server.

Measurements go to test-artifacts/crash_restart.json (docs/reliability.md quotes them).
"""
from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import pytest
from app_server import CHROMIUM, REPO, AppServer, children, keep_every_sample, launch_chromium, open_page
from run_samples import sample_run

from crystallm_core.product.history import HistoryStore

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium")
N = 2000  # far more than it samples before the kill (the server limit is raised to allow it)
SHOWN = re.compile(rf"(\d+)/{N} structures")


def wait_for_finished(page, at_least: int, timeout: float = 300) -> int:
    """Structures the progress bar says are finished, once there are `at_least`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        labels = page.get_by_text(SHOWN).all_inner_texts()  # never waits for a label that went away
        if labels and (shown := int(SHOWN.search(labels[0]).group(1))) >= at_least:
            return shown
        time.sleep(0.3)
    raise AssertionError(f"fewer than {at_least} structures finished in {timeout:g} s")


def stored_state(db: Path) -> tuple[str, list[tuple]]:
    """integrity_check and (run_id, status, candidates) rows, read without the app's code."""
    with sqlite3.connect(db) as connection:
        integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
        rows = connection.execute("SELECT r.run_id, r.status, COUNT(c.idx) FROM runs r LEFT JOIN candidates c "
                                  "ON c.run_id = r.run_id GROUP BY r.run_id ORDER BY r.created_at").fetchall()
    return integrity, rows


def test_kill_9_during_a_generation_loses_nothing_that_finished(short_model_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=120_000)
    db = tmp_path / "history.sqlite"
    earlier = sample_run()
    HistoryStore(db).save(earlier)
    server = AppServer({"CRYSTALLM_MODEL_DIR": str(short_model_dir), "CRYSTALLM_HISTORY_DB": str(db),
                        "CRYSTALLM_MAX_STRUCTURES": str(N)}, tmp_path / "streamlit.log")
    server.start()
    measured: dict = {}
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.set_default_timeout(120_000)
            page.goto(server.url, wait_until="domcontentloaded")
            open_page(page, "Generate")
            page.get_by_label("Number of structures").fill(str(N))
            keep_every_sample(page)
            page.get_by_role("button", name="Generate", exact=True).click()
            shown = wait_for_finished(page, 3)
            helpers = children(server.pid)  # the isolated checker, if a sample got as far as checking
            killed_at = time.perf_counter()
            server.kill()

            integrity, rows = stored_state(db)
            assert integrity == "ok"
            (old_id, old_status, old_count), (run_id, status, stored) = rows
            assert (old_id, old_status, old_count) == (earlier.run_id, earlier.status, len(earlier.candidates))
            assert status == "running" and shown <= stored < N  # every finished one, written as it came
            deadline = time.time() + 15
            while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in helpers):
                time.sleep(0.2)
            assert not any(Path(f"/proc/{pid}").exists() for pid in helpers), "the checker outlived the server"

            server.start()
            measured["restart_seconds"] = round(time.perf_counter() - killed_at, 1)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(server.url, wait_until="domcontentloaded")
            open_page(page, "History")
            listed = page.get_by_role("combobox", name="Run", exact=True)  # the newest run, chosen first
            expect(listed).to_have_value(re.compile(rf"· 0/{stored} valid · interrupted$"))
            browser.close()
    finally:
        server.stop()

    assert stored_state(db) == ("ok", [(earlier.run_id, earlier.status, len(earlier.candidates)),
                                       (run_id, "interrupted", stored)])
    store = HistoryStore(db)
    interrupted = store.load(run_id)
    assert [c.index for c in interrupted.candidates] == list(range(stored))  # no gap, no duplicate
    assert all(c.report.checks for c in interrupted.candidates)  # each with its checks, as shown before
    assert store.load(earlier.run_id).to_frame().equals(earlier.to_frame())
    measured.update(finished_shown_before_kill=shown, stored_after_kill=stored, interrupted_listed=True,
                    integrity_check="ok", checker_processes_before_kill=len(helpers), checker_processes_left=0)
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    (REPO / "test-artifacts" / "crash_restart.json").write_text(json.dumps(measured, indent=1))
    print(measured)
