"""Local SQLite store of generation runs: settings, manifest and every structure with its scores.

The Streamlit app keeps the run a user is looking at in session state and saves every
finished (or cancelled) run here, so runs survive an app restart and can be reopened,
compared, re-downloaded or deleted. Pure Python (sqlite3 + json), no Streamlit.

Location: $CRYSTALLM_HISTORY_DB, default ~/.crystallm_studio/history.sqlite. Each call opens
its own connection, so the store is safe to use from the app's worker threads.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    label TEXT NOT NULL,
    model_json TEXT NOT NULL,
    settings_json TEXT NOT NULL,
    manifest_json TEXT NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS structures (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    valid INTEGER NOT NULL,
    formula TEXT,
    spacegroup TEXT,
    reasons_json TEXT NOT NULL,
    cif TEXT,
    raw_text TEXT NOT NULL,
    seconds REAL NOT NULL,
    band_gap_target REAL,
    e_hull_target REAL,
    scores_json TEXT NOT NULL,
    PRIMARY KEY (run_id, idx)
);
"""


def default_db_path() -> Path:
    """$CRYSTALLM_HISTORY_DB or ~/.crystallm_studio/history.sqlite."""
    configured = os.environ.get("CRYSTALLM_HISTORY_DB")
    return Path(configured).expanduser() if configured else Path.home() / ".crystallm_studio" / "history.sqlite"


@dataclass
class StructureRecord:
    """One generated sample as the app shows and stores it.

    `scores` holds whatever estimates were available (e.g. gap_mean, gap_std, e_hull); a key
    that is absent means "not available", never a made-up number.
    """

    index: int
    valid: bool
    formula: str | None
    spacegroup: str | None
    reasons: list[str]
    cif: str | None
    raw_text: str
    seconds: float
    band_gap_target: float | None
    e_hull_target: float | None
    scores: dict = field(default_factory=dict)


@dataclass
class RunRecord:
    """A generation run (kind "generate") or target sweep (kind "sweep") and its structures."""

    model: dict
    settings: dict
    manifest: dict
    structures: list[StructureRecord] = field(default_factory=list)
    kind: str = "generate"
    status: str = "done"  # done | cancelled | failed
    error: str | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created_at: float = field(default_factory=time.time)

    @property
    def n_valid(self) -> int:
        return sum(s.valid for s in self.structures)

    @property
    def label(self) -> str:
        """Short human description: when, what was asked, how many came out."""
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created_at))
        targets = self.settings.get("band_gap_targets") or [self.settings.get("band_gap")]
        gap = "/".join("—" if t is None else f"{t:g}" for t in targets)
        return f"{when} · {self.kind} · gap {gap} eV · {self.n_valid}/{len(self.structures)} valid · {self.status}"


@dataclass
class RunSummary:
    """A row of the history list (no structures loaded)."""

    run_id: str
    created_at: float
    kind: str
    status: str
    label: str
    n_structures: int
    n_valid: int


class HistoryStore:
    """Runs in one SQLite file; create with HistoryStore() for the configured location."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser() if path else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection with foreign keys on; commits on success."""
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.execute("PRAGMA foreign_keys = ON")
            with db:
                yield db

    def save(self, run: RunRecord) -> str:
        """Insert or replace a run and all its structures; returns the run id."""
        with self.connect() as db:
            db.execute("DELETE FROM runs WHERE run_id = ?", (run.run_id,))
            db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run.run_id, run.created_at, run.kind, run.status, run.label, json.dumps(run.model),
                 json.dumps(run.settings), json.dumps(run.manifest), run.error),
            )
            db.executemany(
                "INSERT INTO structures VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(run.run_id, s.index, int(s.valid), s.formula, s.spacegroup, json.dumps(s.reasons), s.cif,
                  s.raw_text, s.seconds, s.band_gap_target, s.e_hull_target, json.dumps(s.scores))
                 for s in run.structures],
            )
        return run.run_id

    def list_runs(self) -> list[RunSummary]:
        """All runs, newest first."""
        with self.connect() as db:
            rows = db.execute(
                "SELECT r.run_id, r.created_at, r.kind, r.status, r.label, COUNT(s.idx), COALESCE(SUM(s.valid), 0) "
                "FROM runs r LEFT JOIN structures s ON s.run_id = r.run_id "
                "GROUP BY r.run_id ORDER BY r.created_at DESC"
            ).fetchall()
        return [RunSummary(*row) for row in rows]

    def load(self, run_id: str) -> RunRecord:
        """The full run; raises KeyError for an unknown id."""
        with self.connect() as db:
            row = db.execute(
                "SELECT run_id, created_at, kind, status, model_json, settings_json, manifest_json, error "
                "FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                raise KeyError(f"no run with id {run_id!r} in {self.path}")
            structure_rows = db.execute(
                "SELECT idx, valid, formula, spacegroup, reasons_json, cif, raw_text, seconds, band_gap_target, "
                "e_hull_target, scores_json FROM structures WHERE run_id = ? ORDER BY idx", (run_id,)
            ).fetchall()
        structures = [
            StructureRecord(index=r[0], valid=bool(r[1]), formula=r[2], spacegroup=r[3], reasons=json.loads(r[4]),
                            cif=r[5], raw_text=r[6], seconds=r[7], band_gap_target=r[8], e_hull_target=r[9],
                            scores=json.loads(r[10]))
            for r in structure_rows
        ]
        return RunRecord(run_id=row[0], created_at=row[1], kind=row[2], status=row[3], model=json.loads(row[4]),
                         settings=json.loads(row[5]), manifest=json.loads(row[6]), error=row[7], structures=structures)

    def delete(self, run_id: str) -> bool:
        """Remove a run and its structures; returns whether it existed."""
        with self.connect() as db:
            return db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,)).rowcount > 0

