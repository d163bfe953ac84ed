"""One Candidate, one Run: the single data model of the CLI, the app, `evaluate` and the history.

A `Candidate` is one structure: what the model wrote, the CIF, the parsed Structure (kept, so
nothing parses a CIF twice), the validity report, the targets it was asked for, typed
`Scores`, post-decoding repairs and timings. A `Run` is the requests, model, settings and
candidates of one generation, target sweep or evaluation. It has ONE table (`to_frame`: the
live table in the app, results.csv on disk, evaluation.csv; with each row's ranking score,
`chem.judges.ranking`, and for "best N of K" whether it was picked) and ONE manifest; `run_files`
writes and reads it as a directory or zip, `history` stores and reloads it.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import asdict, dataclass, field, fields

import pandas as pd
from pymatgen.core import Structure

from crystallm_core.chem.judges.metrics import MetricSettings, add_flags, uniqueness_flags
from crystallm_core.chem.judges.ranking import RankingSettings, rank_scores
from crystallm_core.chem.judges.validity import ValidityReport
from crystallm_core.product.versions import package_versions

RUN_FORMAT = "crystallm-run/1"
KINDS = ("generate", "sweep", "evaluate")


@dataclass
class Scores:
    """Estimates for one structure; None means "not available", never a made-up number."""

    band_gap_pred: float | None = None  # surrogate ensemble, eV
    band_gap_std: float | None = None  # its ± spread, eV
    band_gap_gnn: float | None = None
    band_gap_gbm: float | None = None
    p_metal: float | None = None
    e_form_pred: float | None = None  # CHGNet formation energy, eV/atom
    e_hull_pred: float | None = None  # against our MP-20-like hull, eV/atom (biased low)
    novel: bool | None = None  # no train-split structure matches
    notes: list[str] = field(default_factory=list)  # why something is missing

    @classmethod
    def from_dict(cls, row: dict) -> Scores:
        """From a scorer row or a stored dict; NaN and unknown keys are dropped."""
        known = {f.name for f in fields(cls)} - {"notes"}
        values = {k: v for k, v in row.items() if k in known and v is not None
                  and not (isinstance(v, float) and math.isnan(v))}
        notes = row.get("notes") or []
        return cls(**values, notes=[n for n in (notes.split("; ") if isinstance(notes, str) else notes) if n])

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v != []}


@dataclass
class Candidate:
    index: int
    name: str  # file stem, e.g. "003_TiO2"
    cif: str | None  # the repaired CIF (generated) or the file as read; None when there is none
    report: ValidityReport
    structure: Structure | None = None  # parsed, also when a check failed (None: unreadable)
    raw_text: str | None = None  # what the model wrote, brackets kept (None: not generated here)
    band_gap_target: float | None = None
    e_hull_target: float | None = None
    scores: Scores = field(default_factory=Scores)
    seconds: float | None = None  # slot start to finish, for generated structures
    n_tokens: int | None = None
    stop_reason: str | None = None  # "eos", "length", "gave up"
    retries: dict | None = None  # constrained decoding's rewinds
    repairs: list[dict] = field(default_factory=list)  # post-decoding repairs, each with its kind
    pick: dict | None = None  # best N of K: {"picked": bool, "of": samples drawn, "keep": N}; None: no pick

    @property
    def e_hull_relaxed(self) -> float | None:
        """The E_hull estimate after the relaxation repair, if there was one."""
        return next((r["details"].get("e_hull_after") for r in self.repairs
                     if r["kind"] == "relax" and r.get("details", {}).get("e_hull_after") is not None), None)

    @property
    def valid(self) -> bool:
        return self.report.valid

    @property
    def formula(self) -> str | None:
        return self.report.formula or (self.structure.composition.reduced_formula if self.structure else None)

    @property
    def space_group(self) -> str | None:
        return self.report.spacegroup

    @property
    def reasons(self) -> list[str]:
        return self.report.failed_reasons

    @property
    def file_name(self) -> str:
        return self.name + ".cif"

    @property
    def valid_after_repair(self) -> bool:
        """Valid as written, or made valid by one of the optional repairs (counted apart)."""
        return self.valid or any(r["valid"] for r in self.repairs)


def describe_repair(repair: dict) -> str:
    """One line per repair for tables: what was done and whether it passes every check."""
    details, mark = repair.get("details", {}), "valid" if repair["valid"] else "still invalid"
    if repair["kind"] == "rescale" and details.get("factor"):
        return f"rescale ×{details['factor']:.3f}: {mark}"
    if repair["kind"] == "relax" and details.get("e_hull_after") is not None:
        before = details.get("e_hull_before")
        return (f"relax, E_hull {before:.3f} → {details['e_hull_after']:.3f} eV/atom: {mark}" if before is not None
                else f"relax, E_hull → {details['e_hull_after']:.3f} eV/atom: {mark}")
    return f"{repair['kind']}: {mark}"


def candidate_name(index: int, formula: str | None) -> str:
    """How a run names a candidate's files: zero-padded index and formula."""
    return f"{index:03d}_{formula or 'unparsed'}"


TABLE_COLUMNS = ["index", "file", "formula", "space_group", "valid", "reason", "space_group_rule", "band_gap_target", "band_gap_pred",
                 "band_gap_std", "band_gap_gnn", "band_gap_gbm", "p_metal", "e_hull_target", "e_form_pred",
                 "e_hull_pred", "e_hull_relaxed", "unique", "novel", "stable", "hit", "vsun", "p_hit", "score",
                 "picked", "picked_from", "seconds", "n_tokens", "stop_reason",
                 "rewinds", "repairs", "valid_after_repair", "notes"]


@dataclass
class Run:
    """A generation (kind "generate"), target sweep ("sweep") or evaluation of files ("evaluate")."""

    candidates: list[Candidate] = field(default_factory=list)
    kind: str = "generate"
    model: dict | None = None  # name, source, weights_sha256, … (None: files not generated here)
    requests: list[dict] = field(default_factory=list)  # the GenerationRequests, as dicts
    settings: dict = field(default_factory=dict)  # hit tolerance, stability threshold, …
    generation: list[dict] = field(default_factory=list)  # per request: wall time, counts, rewinds
    unavailable: dict[str, str] = field(default_factory=dict)  # score family -> why it is missing
    status: str = "done"  # running | done | cancelled | failed | interrupted
    error: str | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created_at: float = field(default_factory=time.time)
    versions: dict = field(default_factory=package_versions)

    @property
    def n_valid(self) -> int:
        return sum(c.valid for c in self.candidates)

    @property
    def label(self) -> str:
        """Short human description: when, what was asked, how many came out."""
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created_at))
        gaps = sorted({c.band_gap_target for c in self.candidates} | {r.get("band_gap") for r in self.requests},
                      key=lambda t: (t is None, t or 0))
        gap = "/".join("—" if t is None else f"{t:g}" for t in gaps) or "—"
        return f"{when} · {self.kind} · gap {gap} eV · {self.n_valid}/{len(self.candidates)} valid · {self.status}"

    def metric_settings(self) -> MetricSettings:
        defaults = MetricSettings()
        return MetricSettings(self.settings.get("stability_threshold", defaults.stability_threshold),
                              self.settings.get("hit_tolerance", defaults.hit_tolerance))

    def unique_flags(self) -> list[bool | None]:
        """Uniqueness within the run (valid structures first); computed once per set of candidates."""
        key = tuple(c.name for c in self.candidates)
        cached = getattr(self, "_unique", None)
        if cached is None or cached[0] != key:
            flags = uniqueness_flags([c.structure for c in self.candidates], [c.valid for c in self.candidates])
            cached = (key, flags)
            self._unique = cached
        return cached[1]

    def to_frame(self, settings: MetricSettings | None = None, unique: bool = True) -> pd.DataFrame:
        """The run's one table: a row per candidate with its checks, scores and metric flags.
        `unique=False` skips structure matching (the live table while a run streams in)."""
        settings = settings or self.metric_settings()
        flags = self.unique_flags() if unique else [None] * len(self.candidates)
        rows = []
        for candidate, is_unique in zip(self.candidates, flags):
            scores = candidate.scores
            rows.append({
                "index": candidate.index, "file": candidate.file_name, "formula": candidate.formula,
                "space_group": candidate.space_group, "valid": candidate.valid,
                "reason": "; ".join(candidate.reasons), "space_group_rule": candidate.report.space_group_rule,
                "band_gap_target": candidate.band_gap_target,
                **{name: getattr(scores, name) for name in ("band_gap_pred", "band_gap_std", "band_gap_gnn",
                                                            "band_gap_gbm", "p_metal")},
                "e_hull_target": candidate.e_hull_target, "e_form_pred": scores.e_form_pred,
                "e_hull_pred": scores.e_hull_pred, "e_hull_relaxed": candidate.e_hull_relaxed, "unique": is_unique,
                "novel": scores.novel, "picked": None if candidate.pick is None else candidate.pick["picked"],
                "picked_from": None if candidate.pick is None else candidate.pick["of"],
                "seconds": candidate.seconds, "n_tokens": candidate.n_tokens, "stop_reason": candidate.stop_reason,
                "rewinds": sum(candidate.retries.get(k, 0) for k in ("row", "cell", "restart"))
                if candidate.retries else None,
                "repairs": "; ".join(describe_repair(r) for r in candidate.repairs),
                "valid_after_repair": candidate.valid_after_repair,
                "notes": "; ".join([*self.unavailable.values(), *scores.notes]),
            })
        derived = ("stable", "hit", "vsun", "p_hit", "score")
        frame = pd.DataFrame(rows, columns=[c for c in TABLE_COLUMNS if c not in derived])
        numeric = ["band_gap_target", "band_gap_pred", "band_gap_std", "band_gap_gnn", "band_gap_gbm", "p_metal",
                   "e_hull_target", "e_form_pred", "e_hull_pred", "e_hull_relaxed", "seconds"]
        frame[numeric] = frame[numeric].astype(float)
        frame[["n_tokens", "rewinds", "picked_from"]] = frame[["n_tokens", "rewinds", "picked_from"]].astype("Int64")
        if frame.empty:
            return frame.reindex(columns=TABLE_COLUMNS)
        # a hit needs each row's own target (a sweep has several): flag per target group
        parts = [add_flags(group, None if pd.isna(target) else float(target), settings)
                 for target, group in frame.groupby("band_gap_target", dropna=False, sort=False)]
        frame = pd.concat(parts).sort_index()
        frame[["p_hit", "score"]] = rank_scores(frame, RankingSettings(gap_tolerance=settings.hit_tolerance))[
            ["p_hit", "score"]]
        return frame[TABLE_COLUMNS]

    def manifest(self) -> dict:
        """Everything needed to reproduce and read the run: model id + hash, requests (targets,
        prompt, sampling and decoding settings, seeds), settings, counts, versions."""
        return {
            "format": RUN_FORMAT, "tool": "CrystaLLM Studio", "run_id": self.run_id, "kind": self.kind,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at)),
            "status": self.status, "error": self.error, "model": self.model, "requests": self.requests,
            "settings": self.settings, "generation": self.generation, "n_candidates": len(self.candidates),
            "n_valid": self.n_valid, "n_valid_after_repair": sum(c.valid_after_repair for c in self.candidates),
            "scores_unavailable": self.unavailable, "versions": self.versions,
        }
