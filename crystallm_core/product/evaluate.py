"""Score CIF files: validity, band-gap surrogates, CHGNet stability, uniqueness, novelty.

    python -m crystallm_core evaluate DIR        # writes DIR/evaluation.csv

DIR is a generation run (its manifest.json supplies the targets, so `hit` is filled in) or
any folder of a user's own .cif files. Every file gets a row; a file that cannot be read or
parsed gets its reason instead of numbers, and a missing component (surrogate weights,
novelty index, hull table) leaves its columns empty and says why in `notes`.
`evaluate_structures` is the same pipeline for the app, on CIF texts in memory.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd
from pymatgen.core import Structure

from crystallm_core.chem.isolation import check_cif_isolated
from crystallm_core.chem.metrics import (
    MetricSettings,
    add_flags,
    summarise,
    uniqueness_flags,
)
from crystallm_core.chem.scoring import SCORE_COLUMNS, StructureScorer
from crystallm_core.chem.stability import HULL_BIAS_NOTE, RelaxSettings
from crystallm_core.chem.validity import ValidityReport

OUTPUT_NAME = "evaluation.csv"
NAN = float("nan")


def read_structure(
    text: str | None, report: ValidityReport | None = None
) -> tuple[ValidityReport | None, Structure | None, str | None]:
    """(validity report, structure, reason): the structure even when a validity check failed."""
    if text is None and report is None:
        return None, None, "file could not be read"
    try:
        report = report or check_cif_isolated(text)  # untrusted input: checked in the worker process
    except Exception as exc:  # the checker should not raise, but one file must not stop the batch
        return None, None, f"validity check crashed: {type(exc).__name__}: {exc}"
    structure = report.structure
    if structure is None and text:  # a user's CIF may fail our format checks yet be a fine structure
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_str(text, fmt="cif")
        except Exception:
            structure = None
    return report, structure, None


def evaluate_structures(
    cif_texts: Sequence[str | None],
    names: Sequence[str],
    targets: dict | None = None,
    settings: MetricSettings | None = None,
    stability: bool = True,
    relax: RelaxSettings | None = None,
    novelty: bool = True,
    reports: Sequence[ValidityReport | None] | None = None,
) -> pd.DataFrame:
    """One row per CIF text (None = unreadable). `targets` = {"band_gap": eV|None, "e_hull": …}.

    relax: None for the default static CHGNet evaluation, RelaxSettings for a bounded relaxation.
    reports: validity reports already computed (e.g. by generation), to skip re-checking.
    """
    reports = list(reports) if reports is not None else [None] * len(cif_texts)
    if not len(cif_texts) == len(names) == len(reports):
        raise ValueError(f"{len(cif_texts)} CIF texts, {len(names)} names and {len(reports)} reports")
    targets = targets or {}
    parsed = [read_structure(text, report) for text, report in zip(cif_texts, reports)]
    structures = [structure for _, structure, _ in parsed]
    notes: list[list[str]] = [[reason] if reason else [] for _, _, reason in parsed]

    rows = []
    for name, (report, structure, _) in zip(names, parsed):
        rows.append({
            "file": name,
            "formula": (report.formula if report and report.formula else None)
            or (structure.composition.reduced_formula if structure else None),
            "spacegroup": report.spacegroup if report else None,
            "n_atoms": len(structure) if structure else None,
            "valid": bool(report and report.valid),
            "failed_checks": "; ".join(report.failed_reasons) if report else "not checked",
        })
    df = pd.DataFrame(rows).astype({"n_atoms": "Int64"})

    scorer = StructureScorer(stability=stability, relax=relax, novelty=novelty)
    scores = pd.DataFrame(scorer.score(structures), index=df.index, columns=[*SCORE_COLUMNS, "notes"])
    df = pd.concat([df, scores.drop(columns="notes").astype({c: float for c in SCORE_COLUMNS if c != "novel"})],
                   axis=1)
    df["novel"] = [None if pd.isna(v) else bool(v) for v in df["novel"]]
    df["unique"] = uniqueness_flags(structures, df["valid"].tolist())
    for row_notes, score_note in zip(notes, scores["notes"]):
        if isinstance(score_note, str):
            row_notes.append(score_note)
    # a missing component: said on every row (the CSV travels alone) and kept in attrs
    batch_notes = list(scorer.unavailable.values())

    df = add_flags(df, targets.get("band_gap"), settings)
    df["notes"] = ["; ".join(batch_notes + n) for n in notes]
    df.attrs["batch_notes"] = batch_notes
    return df


# ---- command line -------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="folder of .cif files (e.g. a generation run)")
    parser.add_argument("--band-gap-target", type=float, default=None,
                        help="target gap in eV for `hit` (default: manifest.json's, if any)")
    parser.add_argument("--stability-threshold", type=float, default=MetricSettings.stability_threshold,
                        help="E_hull (eV/atom) at or below which a structure counts as stable")
    parser.add_argument("--hit-tolerance", type=float, default=MetricSettings.hit_tolerance,
                        help="|predicted gap - target| (eV) that counts as a hit")
    parser.add_argument("--relax", action="store_true", help="short CHGNet relaxation before E_hull (slow)")
    parser.add_argument("--no-stability", action="store_true", help="skip CHGNet")
    parser.add_argument("--no-novelty", action="store_true", help="skip the training-set comparison")
    parser.add_argument("--output", type=Path, default=None, help=f"CSV path (default DIR/{OUTPUT_NAME})")


def read_targets(directory: Path) -> dict:
    """manifest["targets"] of a generation run, or {} (with a warning if the manifest is broken)."""
    path = directory / "manifest.json"
    if not path.exists():
        return {}
    try:
        targets = json.loads(path.read_text()).get("targets") or {}
        return {k: float(v) if v is not None else None for k, v in targets.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        print(f"warning: ignoring unreadable {path}: {exc}", file=sys.stderr)
        return {}


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() == ".cif")
    if not files:
        raise ValueError(f"no .cif files in {directory}")
    if not math.isfinite(args.stability_threshold):
        raise ValueError("--stability-threshold must be a finite number")
    for name, value in (("--hit-tolerance", args.hit_tolerance), ("--band-gap-target", args.band_gap_target)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    targets = read_targets(directory)
    if args.band_gap_target is not None:
        targets["band_gap"] = args.band_gap_target
    settings = MetricSettings(args.stability_threshold, args.hit_tolerance)
    df = evaluate_structures(
        [read_text(p) for p in files], [p.name for p in files], targets, settings,
        stability=not args.no_stability, relax=RelaxSettings() if args.relax else None,
        novelty=not args.no_novelty,
    )
    output = args.output or directory / OUTPUT_NAME
    df.to_csv(output, index=False, float_format="%.4f")
    summary = summarise(df, targets.get("band_gap"))
    known = {"stable": df["stable"].notna().any(), "hit": df["hit"].notna().any(),
             "valid_unique_novel": df["novel"].notna().any()}
    known["vsun"] = known["stable"] and known["valid_unique_novel"]
    known["vsun_hit"] = known["vsun"] and known["hit"]
    rates = [f"{k} {v:.1%}" for k, v in summary.items() if k not in ("n", "mean_abs_error") and known.get(k, True)]
    if not math.isnan(summary["mean_abs_error"]):
        rates.append(f"mean |gap - target| {summary['mean_abs_error']:.2f} eV (valid)")
    print(f"{len(df)} files -> {output}\n  " + "  ".join(rates) + " (rates over all files)")
    for note in df.attrs["batch_notes"]:
        print(f"  {note}")
    if not args.no_stability:
        print(f"  note: {HULL_BIAS_NOTE}")
    return 0
