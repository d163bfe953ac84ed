"""Check and score a Run: validity, band-gap surrogate, CHGNet stability, uniqueness, novelty.

    python -m crystallm_core evaluate PATH        # writes evaluation.csv beside the CIFs

PATH is a run in the run layout (a CLI output directory or a zip downloaded from the app: its
results.csv / manifest supply each structure's targets, so `hit` is filled in) or any folder
or zip of a user's own .cif files. Every file gets a row; a file that cannot be read or parsed
gets its reason instead of numbers, and a missing component (surrogate weights, novelty index,
hull table) leaves its columns empty and says why in `notes`. The app and generation use the
same `score_candidates` as they stream.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Sequence

from pymatgen.core import Structure
from tqdm import tqdm

from crystallm_core.chem.judges.isolation import check_cif_isolated, check_sample
from crystallm_core.chem.judges.metrics import MetricSettings, summarise
from crystallm_core.chem.judges.scoring import StructureScorer
from crystallm_core.chem.judges.stability import HULL_BIAS_NOTE, RelaxSettings
from crystallm_core.chem.judges.validity import (
    SPACE_GROUP_RULES,
    CheckResult,
    ValidityReport,
    judged_as_user_file,
    structure_problem,
)
from crystallm_core.product.run import Candidate, Run, Scores
from crystallm_core.product.run_files import read_run

OUTPUT_NAME = "evaluation.csv"


def check_candidate(candidate: Candidate, model_text: bool = False) -> None:
    """Validity in the isolated checker, and the structure even when a format check failed
    (a user's CIF may not be in the model's format yet be a fine structure). The model's own
    text must state the space group it has; a user's file may state any subgroup of it (P 1)."""
    if candidate.cif is None:
        candidate.report = ValidityReport([CheckResult("parses", False, "file could not be read (or is over 1 MB)")])
        return
    if "data_[" in candidate.cif:  # the model's own text (an invalid/ file of a run): repaired as generated
        candidate.report = check_sample(candidate.cif, "eos", 0)[1]
    elif model_text:
        candidate.report = check_cif_isolated(candidate.cif)
    else:
        candidate.report = judged_as_user_file(check_cif_isolated(candidate.cif))
    candidate.structure = candidate.report.structure
    if candidate.structure is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_str(candidate.cif, fmt="cif")
            candidate.structure = None if structure_problem(structure) else structure
        except Exception:
            candidate.structure = None


SCORE_CHUNK = 16  # structures scored together (CHGNet's batch), then the progress bar moves


def score_candidates(candidates: Sequence[Candidate], scorer: StructureScorer, only_valid: bool = True,
                     progress: bool = False) -> None:
    """Fill each candidate's Scores (valid ones only, unless `only_valid` is False); `progress`
    shows a bar with ETA on stderr."""
    chosen = [c for c in candidates if c.structure is not None and (c.valid or not only_valid)]
    with tqdm(total=len(chosen), desc="scoring", unit="structure", disable=not progress) as bar:
        for start in range(0, len(chosen), SCORE_CHUNK):
            chunk = chosen[start:start + SCORE_CHUNK]
            for candidate, row in zip(chunk, scorer.score([c.structure for c in chunk])):
                candidate.scores = Scores.from_dict(row)
            bar.update(len(chunk))


def evaluate_run(run: Run, settings: MetricSettings | None = None, stability: bool = True,
                 relax: RelaxSettings | None = None, novelty: bool = True, recheck: bool = True,
                 progress: bool = False) -> Run:
    """Check (unless `recheck` is False and the reports are current) and score every candidate,
    with progress bars on stderr if asked. A run a model wrote (its manifest names the model) is
    judged as the model's text, any other folder of CIFs as a user's files."""
    if recheck:
        for candidate in tqdm(run.candidates, desc="checking", unit="file", disable=not progress):
            check_candidate(candidate, model_text=run.model is not None)
    scorer = StructureScorer(stability=stability, relax=relax, novelty=novelty)
    score_candidates(run.candidates, scorer, only_valid=False, progress=progress)
    run.unavailable = dict(scorer.unavailable)
    if settings is not None:
        run.settings.update(stability_threshold=settings.stability_threshold, hit_tolerance=settings.hit_tolerance)
    return run


# ---- command line -------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="a run directory or zip, or any folder or zip of .cif files")
    parser.add_argument("--band-gap-target", type=float, default=None,
                        help="target gap in eV for `hit` (default: each structure's own, from the run)")
    parser.add_argument("--stability-threshold", type=float, default=MetricSettings.stability_threshold,
                        help="E_hull (eV/atom) at or below which a structure counts as stable")
    parser.add_argument("--hit-tolerance", type=float, default=MetricSettings.hit_tolerance,
                        help="|predicted gap - target| (eV) that counts as a hit")
    parser.add_argument("--relax", action="store_true", help="short CHGNet relaxation before E_hull (slow)")
    parser.add_argument("--no-stability", action="store_true", help="skip CHGNet")
    parser.add_argument("--no-novelty", action="store_true", help="skip the training-set comparison")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"CSV path (default: PATH/{OUTPUT_NAME}, or beside a zip)")


def output_path(path: Path, output: Path | None) -> Path:
    if output is not None:
        return output
    return path / OUTPUT_NAME if path.is_dir() else path.with_name(f"{path.stem}_{OUTPUT_NAME}")


def run(args: argparse.Namespace) -> int:
    if not math.isfinite(args.stability_threshold):
        raise ValueError("--stability-threshold must be a finite number")
    for name, value in (("--hit-tolerance", args.hit_tolerance), ("--band-gap-target", args.band_gap_target)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    evaluated = read_run(args.path)
    if args.band_gap_target is not None:
        for candidate in evaluated.candidates:
            candidate.band_gap_target = args.band_gap_target
    settings = MetricSettings(args.stability_threshold, args.hit_tolerance)
    evaluate_run(evaluated, settings, stability=not args.no_stability,
                 relax=RelaxSettings() if args.relax else None, novelty=not args.no_novelty, progress=True)
    frame = evaluated.to_frame(settings)
    output = output_path(args.path, args.output)
    frame.to_csv(output, index=False, float_format="%.4f")
    summary = summarise(frame)
    known = {"stable": frame["stable"].notna().any(), "hit": frame["hit"].notna().any(),
             "valid_unique_novel": frame["novel"].notna().any()}
    known["vsun"] = known["stable"] and known["valid_unique_novel"]
    known["vsun_hit"] = known["vsun"] and known["hit"]
    rates = [f"{k} {v:.1%}" for k, v in summary.items() if k not in ("n", "mean_abs_error") and known.get(k, True)]
    print(f"{len(frame)} files -> {output}\n  " + "  ".join(rates) + " (rates over all files)")
    for rule in sorted(set(frame["space_group_rule"])):
        print(f"  space group rule: {rule}: {SPACE_GROUP_RULES[rule]}")
    for note in evaluated.unavailable.values():
        print(f"  {note}")
    if not args.no_stability:
        print(f"  note: {HULL_BIAS_NOTE}", file=sys.stdout)
    return 0
