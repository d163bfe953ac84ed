"""`python -m crystallm_core generate`: sample structures to a run directory."""
from __future__ import annotations

import argparse
import sys

from crystallm_core.lm.sampler import DECODINGS, SamplingSettings


def optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "unknown", "any") else float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--band-gap", type=optional_float, required=True, help="target band gap in eV ('none' = unknown)")
    parser.add_argument("--e-hull", type=optional_float, default=0.0, help="target E_hull in eV/atom (default 0)")
    parser.add_argument("-n", "--num-samples", type=int, default=16, help="structures to generate (1–256)")
    parser.add_argument("--until-valid", action="store_true",
                        help="-n counts valid structures: keep sampling until that many are valid")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="with --until-valid, the most samples to draw (default 4×n, at most 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--model", default=None, help="model directory or hub id (default: the shipped model)")
    parser.add_argument("--composition", default=None, help="e.g. TiO2 (prompt level 2)")
    parser.add_argument("--z", type=int, default=None, help="formula units per cell")
    parser.add_argument("--spacegroup", default=None, help="H-M symbol, e.g. P4_2/mnm (needs --composition)")
    parser.add_argument("--elements", default=None, help="comma-separated element set the model may use, e.g. Li,Fe,P,O")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=15)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1 = off)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--decoding", choices=DECODINGS, default=SamplingSettings.decoding,
                        help="constrained (default): consistent CIFs by construction; free: sample as trained")


def run(args: argparse.Namespace) -> int:
    from crystallm_core.lm.checkpoints import load_model
    from crystallm_core.product.generation import (
        GenerationRequest,
        check_run_dir,
        generate,
        sample_counts,
        write_run,
    )

    settings = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                                decoding=args.decoding)
    if args.max_samples is not None and not args.until_valid:
        raise ValueError("--max-samples only applies with --until-valid")
    request = GenerationRequest(band_gap=args.band_gap, e_hull=args.e_hull,
                                **sample_counts(args.num_samples, args.until_valid, args.max_samples),
                                composition=args.composition, z=args.z, spacegroup=args.spacegroup,
                                elements=[e.strip() for e in args.elements.split(",") if e.strip()] if args.elements else None,
                                settings=settings, seed=args.seed)
    request.validate()
    check_run_dir(args.out)  # before sampling, not after
    loaded = load_model(args.model)

    counts = {"done": 0, "valid": 0}

    def report(structure) -> None:
        counts["done"] += 1
        counts["valid"] += structure.valid
        status = "valid" if structure.valid else "invalid: " + "; ".join(structure.reasons[:2])
        where = (f"{counts['valid']}/{request.stop_after_valid} valid, {counts['done']} sampled"
                 if request.stop_after_valid else f"{counts['done']}/{request.n}")
        print(f"[{where}] {structure.formula or '?'} {structure.spacegroup or ''} {status}", file=sys.stderr)

    run_result = generate(loaded, request, on_structure=report)
    out = write_run(run_result, args.out)
    n_valid = run_result.manifest["n_valid"]
    if request.stop_after_valid and n_valid < request.stop_after_valid:
        print(f"only {n_valid} of the {request.stop_after_valid} valid structures asked for after {request.n} samples "
              "(raise --max-samples, or lower the temperature)", file=sys.stderr)
    print(f"{n_valid}/{run_result.manifest['n_finished']} valid; wrote {out}")
    return 0
