"""A real `streamlit run app.py` for browser tests: start, wait until healthy, kill, measure.

Used by the end-to-end, concurrency and crash-restart tests. Memory is read from /proc
(VmRSS/VmHWM of the server and of its children, e.g. the isolated checker).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_kib(pid: int, field: str) -> int:
    """A /proc/PID/status field in KiB (VmRSS now, VmHWM the peak); 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def children(pid: int) -> list[int]:
    """Direct and indirect child processes (parent ids from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [child for child, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


class AppServer:
    """One Streamlit server on a free port; `start` again after `kill` reuses port and environment."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **env}
        self.log_path, self.port = log_path, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> str:
        """Start and wait for /_stcore/health; returns the URL. RuntimeError with the log if it fails."""
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(self.port),
                 "--server.headless", "true"], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2).read() == b"ok":
                    return self.url
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"streamlit did not come up in {timeout:g} s:\n{self.log_path.read_text()}")
            time.sleep(0.5)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        """Resident memory of the server and its children (the checker) now."""
        return sum(proc_kib(pid, "VmRSS") for pid in [self.pid, *children(self.pid)])

    def kill(self) -> None:
        """kill -9, as a crash or an OOM kill would end it."""
        os.kill(self.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS, headless=True)


def open_page(page, name: str) -> None:
    """Client-side navigation through the sidebar (a new URL would start a new session)."""
    page.get_by_test_id("stSidebarNav").get_by_role("link", name=name, exact=True).click()


def keep_every_sample(page) -> None:
    """Generate page: 'Best of K' off, so the structures asked for are the samples drawn."""
    page.get_by_role("combobox", name="Best of K").click()
    page.get_by_role("option", name="off (keep every sample)").click()


def press(page, slider, key: str, times: int) -> None:
    slider.focus()
    for _ in range(times):
        page.keyboard.press(key)
