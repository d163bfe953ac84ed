"""Bring a history database of schema 1 (runs + structures, before the Run data model) to the
current schema, keeping every run and structure (the CIFs are parsed once, here)."""
from __future__ import annotations

import json
import sqlite3
import warnings
from typing import Callable

from pymatgen.core import Structure

from crystallm_core.chem.judges.validity import CheckResult, ValidityReport
from crystallm_core.product.run import Candidate, Run, Scores, candidate_name

OLD_SCORE_NAMES = {"gap_mean": "band_gap_pred", "gap_std": "band_gap_std", "e_hull": "e_hull_pred"}


def old_report(valid: bool, reasons: list[str], formula: str | None, space_group: str | None,
               structure: Structure | None) -> ValidityReport:
    """Schema 1 kept only the failed checks' "name: reason" lines."""
    if valid:
        checks = [CheckResult("checks", True, "every check passed when generated")]
    else:
        checks = [failed_check(reason) for reason in reasons] or [CheckResult("checks", False, "failed when generated")]
    return ValidityReport(checks, structure, formula, space_group)


def failed_check(reason: str) -> CheckResult:
    name, _, text = reason.partition(": ")
    return CheckResult(name, False, text) if text else CheckResult("checks", False, reason)


def parsed(cif: str | None) -> Structure | None:
    if not cif:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Structure.from_str(cif, fmt="cif")
    except Exception:
        return None


def migrate_v1(db: sqlite3.Connection, schema: str, insert: Callable[[sqlite3.Connection, Run], None]) -> None:
    db.execute("ALTER TABLE runs RENAME TO runs_v1")
    db.execute("ALTER TABLE structures RENAME TO structures_v1")
    db.executescript(schema)
    for run_id, created_at, kind, status, model_json, settings_json, error in db.execute(
            "SELECT run_id, created_at, kind, status, model_json, settings_json, error FROM runs_v1").fetchall():
        settings = json.loads(settings_json)
        run = Run(kind=kind, model=json.loads(model_json), requests=[settings],
                  settings={"hit_tolerance": settings.get("tolerance", 0.5)}, status=status, error=error,
                  run_id=run_id, created_at=created_at, versions={})
        rows = db.execute("SELECT idx, valid, formula, spacegroup, reasons_json, cif, raw_text, seconds, "
                          "band_gap_target, e_hull_target, scores_json FROM structures_v1 WHERE run_id = ? "
                          "ORDER BY idx", (run_id,)).fetchall()
        for idx, valid, formula, space_group, reasons, cif, raw, seconds, gap, e_hull, scores in rows:
            structure = parsed(cif) if valid else None
            score_row = {OLD_SCORE_NAMES.get(k, k): v for k, v in json.loads(scores).items()}
            run.candidates.append(Candidate(idx, candidate_name(idx, formula), cif,
                                            old_report(bool(valid), json.loads(reasons), formula, space_group, structure),
                                            structure, raw, gap, e_hull, Scores.from_dict(score_row), seconds))
        insert(db, run)
    db.execute("DROP TABLE structures_v1")
    db.execute("DROP TABLE runs_v1")
