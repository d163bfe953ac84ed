"""Time the app's default Generate request, best 16 of 64, as the page runs it.

    OMP_NUM_THREADS=1 python scripts/bench_best_of.py [--n 16] [--best-of 4] [--relax] [--seed 0]

The shipped model is loaded and prepared as the app does (`prepare_for_requests`), then one
`GenerationJob` (the page's background job: sampling, checks, the scorer on every valid
sample as it arrives, the pick, and with --relax the batched relaxation of the picks) runs
the default request (band gap 1.5 eV, E_hull 0). Reported, from Generate: the first structure
in the table (ranked as they come), the first scored valid one, all N·K sampled, and the N
picked (with --relax: relaxed, re-checked and re-scored) on screen.
"""
from __future__ import annotations

import argparse
import os
import time

from crystallm_core.chem.judges.scoring import default_scorer
from crystallm_core.lm.checkpoints import load_model
from crystallm_core.product.best_of import best_of_counts
from crystallm_core.product.generation import GenerationRequest, new_run, prepare_for_requests
from crystallm_core.product.jobs import GenerationJob


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="structures delivered")
    parser.add_argument("--best-of", type=int, default=4)
    parser.add_argument("--relax", action="store_true", help="relax the picked structures (together)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cold-judges", action="store_true",
                        help="leave the judges to the first request (as the app did before it loaded them with the model)")
    args = parser.parse_args()
    loaded = load_model()
    started = time.perf_counter()
    prepared = prepare_for_requests(loaded)
    if not args.cold_judges:
        default_scorer()  # the app loads the judges with its model (ui/components.cached_model)
    print(f"model prepared{'' if args.cold_judges else ' and judges loaded'} in {time.perf_counter() - started:.1f} s; {prepared['threads']} torch "
          f"thread(s), batch size {prepared['batch_size']}, linear layers {prepared['linear_layers']}")

    request = GenerationRequest(**best_of_counts(args.n, args.best_of), seed=args.seed, relax=args.relax)
    run = new_run(loaded, [request])
    clicked, cpu = time.perf_counter(), time.process_time()
    job = GenerationJob(loaded, [request], run).start()
    first = first_valid = sampled = None
    while not job.finished:
        now = time.perf_counter() - clicked
        job.last_polled = time.monotonic()  # as the page's polling does
        candidates = list(run.candidates)
        if first is None and candidates:
            first = now
        if first_valid is None and any(c.valid and c.scores.band_gap_pred is not None for c in candidates):
            first_valid = now
        if sampled is None and len(candidates) == request.n:
            sampled = now  # the last sample is in (its scores follow within a few tens of ms)
        time.sleep(0.02)
    done = time.perf_counter() - clicked
    summary = run.generation[-1].get("best_of", {})
    print(f"best {args.n} of {request.n}{' + relaxation' if args.relax else ''}, seed {args.seed}: "
          f"first structure in the table {first:.1f} s; first scored valid {first_valid or float('nan'):.1f} s; "
          f"all {request.n} sampled {sampled or float('nan'):.1f} s; "
          f"{summary.get('picked')} picked on screen {done:.1f} s "
          f"({summary.get('within_tolerance')} of {request.n} within the tolerance, {summary.get('valid')} valid)")
    print(f"CPU seconds of this process over the request: {time.process_time() - cpu:.1f} (the checker's own "
          f"process not counted); load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.relax:
        relaxed = [r for c in run.candidates for r in c.repairs if r["kind"] == "relax"]
        print(f"relaxed {len(relaxed)} picks, {sum(r['valid'] for r in relaxed)} still valid; relaxation took "
              f"{done - (sampled or done):.1f} s after sampling")


if __name__ == "__main__":
    main()
