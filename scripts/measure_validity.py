"""Validity of unprompted generations at a few band-gap targets, per decoding, side by side.

    python scripts/measure_validity.py [--model DIR] [--n 64] [--targets 0 1.5 4]
                                       [--decodings constrained free] [--out validity.json]

For each decoding and target (E_hull 0, no composition prompt, the same seed for every
decoding): fraction that parses, fraction valid (every check), valid and unique
(StructureMatcher, as in the metrics), the most common failure reasons, rewinds per sample
and their causes (constrained only), tokens per second, valid CIFs per minute and the time
to the first finished structure, all from the wall time of `generate` (checks included).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from crystallm_core.chem.judges.metrics import uniqueness_flags
from crystallm_core.lm.checkpoints import load_model
from crystallm_core.lm.sampler import DECODINGS, SamplingSettings
from crystallm_core.product.generation import GenerationRequest, generate, prepare_for_requests


def measure(loaded, target: float, settings: SamplingSettings, n: int, seed: int) -> dict:
    first: list[float] = []
    started = time.perf_counter()
    run = generate(loaded, GenerationRequest(band_gap=target, e_hull=0.0, n=n, settings=settings, seed=seed),
                   on_candidate=lambda s: first or first.append(time.perf_counter() - started))
    wall = time.perf_counter() - started
    structures = run.candidates
    valid = sum(s.valid for s in structures)
    parses = sum(any(c.name == "parses" and c.passed for c in s.report.checks) for s in structures)
    unique = uniqueness_flags([s.report.structure if s.valid else None for s in structures])
    retries = [s.retries for s in structures if s.retries]
    causes: Counter = Counter()
    for r in retries:
        causes.update(r["reasons"])
    return {
        "decoding": settings.decoding, "band_gap_target": target, "n": len(structures),
        "parseable": parses / len(structures), "valid": valid / len(structures),
        "valid_unique": sum(bool(flag) for flag in unique) / len(structures),
        "gave_up": sum(s.stop_reason == "gave up" for s in structures),
        "rewinds_per_sample": {level: sum(r[level] for r in retries) / len(structures) for level in ("row", "cell", "restart")}
        if retries else None,
        "rewind_causes": dict(causes.most_common()),
        "tokens_per_second": sum(s.n_tokens for s in structures) / wall,
        "valid_per_minute": valid / wall * 60, "wall_seconds": wall, "first_structure_seconds": first[0],
        "failed_checks": dict(Counter(c.name for s in structures for c in s.report.checks if not c.passed).most_common()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.0, 1.5, 4.0])
    parser.add_argument("--decodings", nargs="+", choices=DECODINGS, default=list(DECODINGS))
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=15)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    loaded = load_model(args.model)
    prepared = prepare_for_requests(loaded)  # as the app does: no decoding pays for compiling or the checker's start
    print(f"prepared in {prepared['seconds']} s, {prepared['threads']} threads", flush=True)
    rows = []
    for target in args.targets:
        for decoding in args.decodings:
            settings = SamplingSettings(temperature=args.temperature, top_k=args.top_k, guidance_scale=args.guidance_scale,
                                        batch_size=args.batch_size, decoding=decoding)
            rows.append(measure(loaded, target, settings, args.n, args.seed))
            print(json.dumps(rows[-1]), flush=True)
    summary = {"model": loaded.info.name, "weights_sha256": loaded.info.weights_sha256, "dtype": loaded.info.dtype,
               "settings": vars(args), "per_target": rows, "overall": {}}
    for decoding in args.decodings:
        mine = [r for r in rows if r["decoding"] == decoding]
        total, wall = sum(r["n"] for r in mine), sum(r["wall_seconds"] for r in mine)
        overall = {key: sum(r[key] * r["n"] for r in mine) / total for key in ("parseable", "valid", "valid_unique")}
        overall["valid_per_minute"] = sum(r["valid"] * r["n"] for r in mine) / wall * 60
        overall["tokens_per_second"] = sum(r["tokens_per_second"] * r["wall_seconds"] for r in mine) / wall
        summary["overall"][decoding] = overall
        print(f"{decoding}: parseable {overall['parseable']:.1%}, valid {overall['valid']:.1%}, valid and unique "
              f"{overall['valid_unique']:.1%} of {total}; {overall['valid_per_minute']:.1f} valid CIFs/min, "
              f"{overall['tokens_per_second']:.0f} tokens/s")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
