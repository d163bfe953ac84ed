"""Validity of unprompted generations at a few band-gap targets (the model card's quality table).

    python scripts/measure_validity.py [--model DIR] [--n 64] [--targets 0 1.5 4] [--out validity.json]

For each target (E_hull 0, no composition prompt): fraction that parses, fraction valid (every
check), fraction valid and unique (StructureMatcher, as in the metrics), the most common failure reasons, the median seconds per structure (slot start to
finish, in a batch) and the wall time divided by the number of structures.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

from crystallm_core.chem.metrics import uniqueness_flags
from crystallm_core.lm.checkpoints import load_model
from crystallm_core.lm.sampler import SamplingSettings
from crystallm_core.product.generation import GenerationRequest, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.0, 1.5, 4.0])
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=15)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    loaded = load_model(args.model)
    settings = SamplingSettings(temperature=args.temperature, top_k=args.top_k, guidance_scale=args.guidance_scale,
                                batch_size=args.batch_size)
    rows = []
    for target in args.targets:
        run = generate(loaded, GenerationRequest(band_gap=target, e_hull=0.0, n=args.n, settings=settings, seed=args.seed))
        structures = run.structures
        parses = sum(any(c.name == "parses" and c.passed for c in s.report.checks) for s in structures)
        unique = uniqueness_flags([s.report.structure if s.valid else None for s in structures])
        reasons = Counter(c.name for s in structures for c in s.report.checks if not c.passed)
        row = {
            "band_gap_target": target, "n": len(structures),
            "parseable": parses / len(structures), "valid": sum(s.valid for s in structures) / len(structures),
            "valid_unique": sum(bool(flag) for flag in unique) / len(structures),
            "median_seconds_per_structure": statistics.median(s.seconds for s in structures),
            "wall_seconds_per_structure": run.manifest["wall_seconds"] / len(structures),
            "failed_checks": dict(reasons.most_common()),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = sum(r["n"] for r in rows)
    summary = {
        "model": loaded.info.name, "weights_sha256": loaded.info.weights_sha256, "dtype": loaded.info.dtype,
        "settings": vars(args), "per_target": rows,
        "parseable": sum(r["parseable"] * r["n"] for r in rows) / total,
        "valid": sum(r["valid"] * r["n"] for r in rows) / total,
        "valid_unique": sum(r["valid_unique"] * r["n"] for r in rows) / total,
    }
    print(f"overall: parseable {summary['parseable']:.1%}, valid {summary['valid']:.1%}, "
          f"valid and unique {summary['valid_unique']:.1%} of {total}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
