"""Local SQLite store of Runs: every candidate with its checks, structure and scores.

The app saves a run as it streams (`begin`, then `add` per candidate, then `finish`), so a
run survives a crash of the server: at the next start, a run left "running" by a process that
is gone is marked "interrupted", with every candidate that had finished. Reloading gives the
same Run (the parsed structures are stored, so nothing parses a CIF again). Pure Python
(sqlite3 + json), no Streamlit; WAL mode, one transaction per write, a connection per call, so
the store is safe to use from the app's worker threads and from several processes.

Location: $CRYSTALLM_HISTORY_DB, default ~/.crystallm_studio/history.sqlite.
"""
from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pymatgen.core import Structure

from crystallm_core.chem.judges.validity import CheckResult, ValidityReport
from crystallm_core.product.history_migration import migrate_v1
from crystallm_core.product.run import Candidate, Run, Scores

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    label TEXT NOT NULL,
    owner_pid INTEGER,
    run_json TEXT NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS candidates (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    valid INTEGER NOT NULL,
    candidate_json TEXT NOT NULL,
    structure_json TEXT,
    PRIMARY KEY (run_id, idx)
);
"""


def default_db_path() -> Path:
    """$CRYSTALLM_HISTORY_DB or ~/.crystallm_studio/history.sqlite."""
    configured = os.environ.get("CRYSTALLM_HISTORY_DB")
    return Path(configured).expanduser() if configured else Path.home() / ".crystallm_studio" / "history.sqlite"


@dataclass
class RunSummary:
    """A row of the history list (no candidates loaded)."""

    run_id: str
    created_at: float
    kind: str
    status: str
    label: str
    n_candidates: int
    n_valid: int


def run_record(run: Run) -> str:
    return json.dumps({"model": run.model, "requests": run.requests, "settings": run.settings,
                       "generation": run.generation, "unavailable": run.unavailable, "versions": run.versions},
                      default=str)


def candidate_row(run_id: str, candidate: Candidate) -> tuple:
    report = candidate.report
    record = {"name": candidate.name, "cif": candidate.cif, "raw_text": candidate.raw_text,
              "checks": [[c.name, c.passed, c.reason] for c in report.checks], "formula": report.formula,
              "space_group": report.spacegroup, "space_group_rule": report.space_group_rule,
              "band_gap_target": candidate.band_gap_target,
              "e_hull_target": candidate.e_hull_target, "scores": candidate.scores.to_dict(),
              "seconds": candidate.seconds, "n_tokens": candidate.n_tokens, "stop_reason": candidate.stop_reason,
              "retries": candidate.retries, "repairs": candidate.repairs, "pick": candidate.pick}
    structure = json.dumps(candidate.structure.as_dict()) if candidate.structure is not None else None
    return run_id, candidate.index, int(candidate.valid), json.dumps(record, default=str), structure


def candidate_of(index: int, record_json: str, structure_json: str | None) -> Candidate:
    record = json.loads(record_json)
    structure = Structure.from_dict(json.loads(structure_json)) if structure_json else None
    report = ValidityReport([CheckResult(*check) for check in record["checks"]], structure, record["formula"],
                            record["space_group"], space_group_rule=record.get("space_group_rule", "exact"))
    return Candidate(index, record["name"], record["cif"], report, structure, record["raw_text"],
                     record["band_gap_target"], record["e_hull_target"], Scores.from_dict(record["scores"]),
                     record["seconds"], record["n_tokens"], record["stop_reason"], record["retries"],
                     record["repairs"], record.get("pick"))  # runs stored before best-of-K have no pick


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


class HistoryStore:
    """Runs in one SQLite file; create with HistoryStore() for the configured location."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser() if path else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.execute("PRAGMA journal_mode = WAL")  # readers never wait for the writer
        with self.connect() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 1:
                migrate_v1(db, SCHEMA, self.insert)
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.mark_interrupted(db)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection with foreign keys on; one transaction, committed on success."""
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.execute("PRAGMA foreign_keys = ON")
            with db:
                yield db

    @staticmethod
    def mark_interrupted(db: sqlite3.Connection) -> None:
        """Runs left "running" by a process that no longer exists were cut short (a crash, kill -9)."""
        for run_id, pid in db.execute("SELECT run_id, owner_pid FROM runs WHERE status = 'running'").fetchall():
            if not process_alive(pid):
                db.execute("UPDATE runs SET status = 'interrupted', label = replace(label, '· running', "
                           "'· interrupted') WHERE run_id = ?", (run_id,))

    def insert(self, db: sqlite3.Connection, run: Run, owner_pid: int | None = None) -> None:
        db.execute("DELETE FROM runs WHERE run_id = ?", (run.run_id,))
        db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (run.run_id, run.created_at, run.kind, run.status, run.label, owner_pid, run_record(run),
                    run.error))
        db.executemany("INSERT INTO candidates VALUES (?, ?, ?, ?, ?)",
                       [candidate_row(run.run_id, c) for c in run.candidates])

    def save(self, run: Run) -> str:
        """Insert or replace a whole run; returns its id."""
        with self.connect() as db:
            self.insert(db, run)
        return run.run_id

    def begin(self, run: Run) -> None:
        """Store a run that is starting (status "running", owned by this process)."""
        with self.connect() as db:
            self.insert(db, run, owner_pid=os.getpid())

    def add(self, run: Run, candidate: Candidate) -> None:
        """Store one finished candidate of a running run, as soon as it exists."""
        with self.connect() as db:
            db.execute("INSERT OR REPLACE INTO candidates VALUES (?, ?, ?, ?, ?)", candidate_row(run.run_id, candidate))
            db.execute("UPDATE runs SET label = ? WHERE run_id = ?", (run.label, run.run_id))

    def finish(self, run: Run) -> None:
        """The run's final status, settings and counts (its candidates are already stored)."""
        with self.connect() as db:
            updated = db.execute("UPDATE runs SET status = ?, label = ?, run_json = ?, error = ? WHERE run_id = ?",
                                 (run.status, run.label, run_record(run), run.error, run.run_id)).rowcount
            if not updated:  # begun elsewhere, or deleted meanwhile: store it whole
                self.insert(db, run)

    def list_runs(self) -> list[RunSummary]:
        """All runs, newest first."""
        with self.connect() as db:
            rows = db.execute(
                "SELECT r.run_id, r.created_at, r.kind, r.status, r.label, COUNT(c.idx), COALESCE(SUM(c.valid), 0) "
                "FROM runs r LEFT JOIN candidates c ON c.run_id = r.run_id "
                "GROUP BY r.run_id ORDER BY r.created_at DESC"
            ).fetchall()
        return [RunSummary(*row) for row in rows]

    def load(self, run_id: str) -> Run:
        """The full run; raises KeyError for an unknown id."""
        with self.connect() as db:
            row = db.execute("SELECT run_id, created_at, kind, status, run_json, error FROM runs WHERE run_id = ?",
                             (run_id,)).fetchone()
            if row is None:
                raise KeyError(f"no run with id {run_id!r} in {self.path}")
            rows = db.execute("SELECT idx, candidate_json, structure_json FROM candidates WHERE run_id = ? "
                              "ORDER BY idx", (run_id,)).fetchall()
        record = json.loads(row[4])
        return Run([candidate_of(*r) for r in rows], kind=row[2], model=record["model"], requests=record["requests"],
                   settings=record["settings"], generation=record["generation"], unavailable=record["unavailable"],
                   status=row[3], error=row[5], run_id=row[0], created_at=row[1], versions=record["versions"])

    def delete(self, run_id: str) -> bool:
        """Remove a run and its candidates; returns whether it existed."""
        with self.connect() as db:
            return db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,)).rowcount > 0
