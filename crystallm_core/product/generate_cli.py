"""`python -m crystallm_core generate`: sample structures to a run directory."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from crystallm_core.lm.sampler import DECODINGS, GUIDES, SamplingSettings

DEFAULTS = SamplingSettings()


def optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "unknown", "any") else float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--band-gap", type=optional_float, required=True, help="target band gap in eV ('none' = unknown)")
    parser.add_argument("--e-hull", type=optional_float, default=0.0, help="target E_hull in eV/atom (default 0)")
    parser.add_argument("-n", "--num-samples", type=int, default=16,
                        help="structures to generate (1–256; with --best-of K, structures delivered, n×K ≤ 256)")
    parser.add_argument("--until-valid", action="store_true",
                        help="-n counts valid structures: keep sampling until that many are valid")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="with --until-valid, the most samples to draw (default 4×n, at most 256)")
    parser.add_argument("--best-of", type=int, default=1, metavar="K",
                        help="sample n×K, keep the n best by the ranking score (chem/judges/ranking.py); the rest stay in "
                             "the run, marked not picked; with --relax only the picked ones are relaxed, together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True,
                        help="run directory to write (an unfinished run of the same command there is resumed)")
    parser.add_argument("--model", default=None, help="model directory or hub id (default: the shipped model)")
    parser.add_argument("--composition", default=None, help="e.g. TiO2 (prompt level 2)")
    parser.add_argument("--z", type=int, default=None, help="formula units per cell")
    parser.add_argument("--spacegroup", default=None, help="H-M symbol, e.g. P4_2/mnm (needs --composition)")
    parser.add_argument("--elements", default=None, help="comma-separated element set the model may use, e.g. Li,Fe,P,O")
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature)
    parser.add_argument("--top-k", type=int, default=DEFAULTS.top_k)
    parser.add_argument("--top-p", type=float, default=DEFAULTS.top_p)
    parser.add_argument("--guidance-scale", type=float, default=DEFAULTS.guidance_scale,
                        help="classifier-free guidance (1 = off)")
    parser.add_argument("--guide", choices=GUIDES, default=DEFAULTS.guide,
                        help="the target guidance amplifies: all, or one (contrasted with it unknown)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                        help="slots sampled together (default: the fastest measured here; samples do not depend on it)")
    parser.add_argument("--rescale", action="store_true",
                        help="repair: rescale the cell of a structure that fails only on bond lengths (kept apart)")
    parser.add_argument("--relax", action="store_true",
                        help="repair: relax valid (and bond-only) structures with CHGNet, E_hull before/after")
    parser.add_argument("--no-score", dest="score", action="store_false",
                        help="skip the surrogate band gap, CHGNet E_hull and novelty of valid structures")
    parser.add_argument("--decoding", choices=DECODINGS, default=DEFAULTS.decoding,
                        help="constrained (default): consistent CIFs by construction; free: sample as trained")


def continuation_seed(seed: int, done: int) -> int:
    """A resumed run continues with a seed of its own, so no sample is drawn twice."""
    return (seed * 1_000_003 + done * 0x9E3779B1) % 2**31


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from crystallm_core.chem.judges.scoring import StructureScorer
    from crystallm_core.lm.checkpoints import load_model
    from crystallm_core.lm.sampler import warm_up
    from crystallm_core.product import best_of
    from crystallm_core.product.best_of import best_of_counts
    from crystallm_core.product.evaluate import check_candidate, score_candidates
    from crystallm_core.product.generation import (
        GenerationRequest,
        generate,
        new_run,
        sample_counts,
    )
    from crystallm_core.product.run_files import RunWriter, resumable

    settings = SamplingSettings(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                                guide=args.guide, decoding=args.decoding)
    if args.max_samples is not None and not args.until_valid:
        raise ValueError("--max-samples only applies with --until-valid")
    if args.best_of != 1 and args.until_valid:
        raise ValueError("--best-of and --until-valid cannot be combined")
    counts = best_of_counts(args.num_samples, args.best_of) if args.best_of != 1 else \
        sample_counts(args.num_samples, args.until_valid, args.max_samples)
    request = GenerationRequest(band_gap=args.band_gap, e_hull=args.e_hull, **counts,
                                composition=args.composition, z=args.z, spacegroup=args.spacegroup,
                                elements=[e.strip() for e in args.elements.split(",") if e.strip()] if args.elements else None,
                                settings=settings, seed=args.seed, rescale=args.rescale, relax=args.relax)
    request.validate()
    loaded = load_model(args.model)
    warm_up(loaded.model)  # build the attention kernel, pack the weights, pick threads and batch size here
    run = new_run(loaded, [request])
    previous = resumable(args.out, run.requests)  # before sampling, not after
    if previous is not None:
        manifest, done = previous
        run.run_id, run.generation = manifest.get("run_id", run.run_id), list(manifest.get("generation") or [])
        for candidate in done:
            check_candidate(candidate, model_text=True)
        run.candidates = done
        print(f"resuming {args.out}: {len(done)} structures already there", file=sys.stderr)
    writer = RunWriter(run, args.out, resume=previous is not None)
    scorer = StructureScorer() if args.score else None
    if scorer is not None and request.keep_best and previous is not None:  # the pick needs every sample's scores
        score_candidates([c for c in run.candidates if c.valid], scorer)
    # The bar counts what was asked for: valid structures with --until-valid, samples otherwise.
    bar = (tqdm(total=request.stop_after_valid, initial=run.n_valid, desc="valid structures", unit="valid")
           if request.stop_after_valid else
           tqdm(total=request.n, initial=len(run.candidates), desc="sampling", unit="structure"))

    def arrived(candidate) -> None:
        if scorer is not None and candidate.valid:
            score_candidates([candidate], scorer)
        writer.add(candidate)
        valid = run.n_valid
        status = "valid" if candidate.valid else "invalid: " + "; ".join(candidate.reasons[:2])
        where = (f"{valid}/{request.stop_after_valid} valid, {len(run.candidates)} sampled"
                 if request.stop_after_valid else f"{len(run.candidates)}/{request.n}")
        bar.write(f"[{where}] {candidate.formula or '?'} {candidate.space_group or ''} {status}", file=sys.stderr)
        bar.update(int(candidate.valid) if request.stop_after_valid else 1)

    left = remaining(request, run)
    with bar:
        if left is not None:
            generate(loaded, left, run, on_candidate=arrived)
    if request.keep_best:
        if not run.generation:  # everything was sampled before a resume: a record for the pick
            run.generation.append({"n_requested": request.n, "n_finished": len(run.candidates)})
        for candidate in best_of.finish(run, run.candidates, request, scorer):
            writer.add(candidate)  # the relaxed CIFs under repaired/
        summary = run.generation[-1]["best_of"]
        print(f"picked {summary['picked']} of {summary['sampled']} samples (best {request.keep_best} of "
              f"{request.n} asked for); {best_of.PREDICTION_NOTE}", file=sys.stderr)
        for note in (best_of.shortfall_note(summary), best_of.e_hull_note(summary)):
            if note:
                print(note, file=sys.stderr)
    if scorer is not None:
        run.unavailable = dict(scorer.unavailable)
    run.status = "done"
    writer.finish()
    if request.stop_after_valid and run.n_valid < request.stop_after_valid:
        print(f"only {run.n_valid} of the {request.stop_after_valid} valid structures asked for after "
              f"{len(run.candidates)} samples (raise --max-samples, or lower the temperature)", file=sys.stderr)
    print(f"{run.n_valid}/{len(run.candidates)} valid; wrote {args.out}")
    return 0


def remaining(request, run):
    """What is left of `request` after the candidates already in `run` (None: nothing)."""
    done, valid = len(run.candidates), run.n_valid
    if not done:
        return request
    n = request.n - done
    wanted = None if request.stop_after_valid is None else request.stop_after_valid - valid
    if n < 1 or (wanted is not None and wanted < 1):
        return None
    return replace(request, n=n, stop_after_valid=None if wanted is None else min(wanted, n),
                   seed=continuation_seed(request.seed, done), keep_best=None)  # the CLI picks over the whole run
