"""One hostile text through everything that reads CIFs: repair → validity (in the isolated
checker) → the Explore page's description and XRD → scoring; what broke and how long it took.

A finding is an exception a stage promised not to raise (repair and check never raise;
parse_cif and xrd_pattern raise only readable ValueErrors; describe_structure and the scorer
never raise), or a rejection without a reason a person can read. Scoring is batched
(`Scoring.add`), since the surrogate costs ~5 ms a structure in a batch and ~0.8 s alone.
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field

from pymatgen.core import Structure

from crystallm_core.chem.cif.cif_format import repair_generated_cif
from crystallm_core.chem.judges.isolation import IsolatedWorker, check_cif_isolated
from crystallm_core.chem.judges.scoring import StructureScorer
from crystallm_core.chem.judges.structure_info import (
    describe_structure,
    parse_cif,
    xrd_pattern,
)
from crystallm_core.chem.judges.validity import structure_problem

RAW_EXCEPTION = re.compile(r"^(?:repair failed: )?[A-Z]\w*(?:Error|Exception)\b")


@dataclass
class FuzzOutcome:
    valid: bool = False
    reasons: list[str] = field(default_factory=list)  # why it was rejected (first failed check or repair)
    findings: list[str] = field(default_factory=list)  # "stage: Type: message" of anything that broke
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    structure: Structure | None = None  # to score: parsed and sane

    @property
    def raw_reason(self) -> bool:
        """The rejection reason is a bare exception text rather than a sentence of ours."""
        return any(RAW_EXCEPTION.match(reason.split(": ", 1)[-1]) for reason in self.reasons)


def unreadable(reason: str) -> bool:
    """A reason no one can read: empty, several lines, a traceback, or pages long."""
    return not reason.strip() or "\n" in reason or "Traceback" in reason or len(reason) > 600


class Timer:
    def __init__(self, outcome: FuzzOutcome, stage: str):
        self.outcome, self.stage = outcome, stage

    def __enter__(self):
        self.started = time.perf_counter()

    def __exit__(self, kind, error, traceback):
        self.outcome.stage_seconds[self.stage] = time.perf_counter() - self.started
        if error is not None:
            self.outcome.findings.append(f"{self.stage}: {type(error).__name__}: {error}"[:300])
        return True  # recorded, not raised: the harness goes on


def explore(text: str, outcome: FuzzOutcome) -> Structure | None:
    """What the Explore page does with an upload: parse, describe, XRD (ValueErrors are its messages)."""
    with Timer(outcome, "explore"):
        try:
            structure = parse_cif(text)
        except ValueError:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            describe_structure(structure)
            try:
                xrd_pattern(structure)
            except ValueError:
                pass
        return structure
    return None


def run_one(text: str, worker: IsolatedWorker, with_explore: bool = True) -> FuzzOutcome:
    """Repair, check and (optionally) explore one text; never raises."""
    outcome = FuzzOutcome()
    started = time.perf_counter()
    repaired = None
    with Timer(outcome, "repair"):
        repaired = repair_generated_cif(text)
    cif = repaired.cif if repaired is not None and repaired.ok else text  # a user's CIF is checked as it is
    report = None
    with Timer(outcome, "check"):
        report = check_cif_isolated(cif, worker)
    if report is not None:
        outcome.valid = report.valid
        failed = [f"{c.name}: {c.reason}" for c in report.checks if not c.passed]
        outcome.reasons = ([f"repair: {repaired.reason}"] if repaired is not None and not repaired.ok else []) + failed[:1]
        bad = [reason for reason in outcome.reasons if unreadable(reason)]
        if bad or (not report.valid and not failed):
            outcome.findings.append(f"unreadable reason: {bad[:1] or 'none given'}")
        structure = report.structure
        if structure is not None and structure_problem(structure) is None:
            outcome.structure = structure
    if with_explore:
        explored = explore(text, outcome)
        if outcome.structure is None and explored is not None and structure_problem(explored) is None:
            outcome.structure = explored
    outcome.seconds = time.perf_counter() - started
    return outcome


class Scoring:
    """Batches sane structures for a scorer; findings when it raises or gives rows that do not fit."""

    def __init__(self, scorer: StructureScorer, batch: int = 64):
        self.scorer, self.batch = scorer, batch
        self.pending: list[Structure] = []
        self.scored = 0
        self.seconds = 0.0
        self.findings: list[str] = []

    def add(self, structure: Structure) -> None:
        self.pending.append(structure)
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        started = time.perf_counter()
        try:
            rows = self.scorer.score(self.pending)
            if len(rows) != len(self.pending):
                self.findings.append(f"score: {len(rows)} rows for {len(self.pending)} structures")
            for row in rows:
                if any(isinstance(v, float) and v != v for v in row.values()):
                    self.findings.append(f"score: NaN in {row}"[:300])
        except Exception as error:
            self.findings.append(f"score: {type(error).__name__}: {error}"[:300])
        self.seconds += time.perf_counter() - started
        self.scored += len(self.pending)
        self.pending = []
