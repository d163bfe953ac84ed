"""How far generated structures are from a CHGNet local minimum (the model card's relaxation table).

    python scripts/measure_relaxation.py [--n 48] [--band-gap 1.5] [--invalid] [--out relaxation.json]

Generates unprompted structures at one target (E_hull 0, default sampling) until `--n` are
valid, then relaxes each valid one (`relaxation.relax_and_check`, default bounds, space group
kept) and reports medians of the E_hull estimate before and after, |volume change|, FIRE
steps, seconds, and how many relaxed structures pass every validity check. With `--invalid`,
it draws `--n` samples and relaxes those that parse but failed only the bond-length check:
can a relaxation repair them?
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from crystallm_core.chem.judges.relaxation import relax_and_check
from crystallm_core.lm.checkpoints import load_model
from crystallm_core.product.generation import GenerationRequest, generate, sample_counts


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--band-gap", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--invalid", action="store_true", help="relax the samples that failed only on bond lengths")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    loaded = load_model()
    if args.invalid:
        request = GenerationRequest(band_gap=args.band_gap, e_hull=0.0, n=args.n, seed=args.seed)
        chosen = [s for s in generate(loaded, request).candidates
                  if s.report.structure is not None and [c.name for c in s.report.checks if not c.passed] == ["bond_lengths"]]
    else:
        request = GenerationRequest(band_gap=args.band_gap, e_hull=0.0, **sample_counts(args.n, until_valid=True),
                                    seed=args.seed)
        chosen = [s for s in generate(loaded, request).candidates if s.valid]
    rows = []
    for s in chosen:
        try:
            report = relax_and_check(s.report.structure)
        except Exception as error:  # e.g. isolated atoms: counted, not fatal
            rows.append({"formula": s.formula, "error": f"{type(error).__name__}: {error}"})
            continue
        rows.append({"formula": s.formula, "e_hull_before": report.before.e_hull, "e_hull_after": report.after.e_hull,
                     "volume_change": report.volume_change, "steps": report.relaxation.steps,
                     "converged": report.relaxation.converged, "seconds": report.relaxation.seconds,
                     "still_valid": report.validity.valid,
                     "same_spacegroup": report.validity.spacegroup == report.spacegroup_before})
        print(json.dumps(rows[-1]), flush=True)
    done = [r for r in rows if "error" not in r]
    summary = {
        "model": loaded.info.name, "weights_sha256": loaded.info.weights_sha256, "settings": vars(args),
        "n_relaxed": len(done), "n_failed": len(rows) - len(done),
        "median_e_hull_before": median([r["e_hull_before"] for r in done]),
        "median_e_hull_after": median([r["e_hull_after"] for r in done]),
        "median_abs_volume_change": median([abs(r["volume_change"]) for r in done]),
        "converged": sum(r["converged"] for r in done) / len(done),
        "still_valid": sum(r["still_valid"] for r in done) / len(done),
        "same_spacegroup": sum(r["same_spacegroup"] for r in done) / len(done),
        "median_steps": median([r["steps"] for r in done]), "median_seconds": median([r["seconds"] for r in done]),
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
