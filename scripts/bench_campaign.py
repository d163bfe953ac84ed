"""Campaign engine throughput against the plain `generate` path, side by side in one run.

    python scripts/bench_campaign.py [--samples 32] [--targets 0.5 2.0] [--chunk 16] [--workers 1 2]

The same work four ways — every target's samples with the shipped model, constrained decoding,
validity checks, no scoring (scoring is the same code on every path): `generate` per target in
this process; the campaign without Ray (`--local`); the campaign on a local Ray with 1 and with
2 sampler actors. Prints samples/min and the ratio to plain `generate`, end to end and in steady
state (from the first finished chunk to the last: what a long campaign sees), and an estimate for N
GPU workers from the measured per-worker rate (assumes work items far outnumber workers, one
model per GPU, and a CPU pool that keeps up with validity checks).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from crystallm_core.lm.checkpoints import load_model
from crystallm_core.lm.sampler import warm_up
from crystallm_core.product.campaign import run_campaign
from crystallm_core.product.campaign_spec import parse_spec
from crystallm_core.product.generation import generate


def spec(targets: list[float], samples: int, chunk: int, batch: int):
    return parse_spec({"samples_per_target": samples, "chunk_size": chunk, "seed": 1,
                       "targets": {"band_gap": targets, "e_hull": [0.0]}, "sampling": {"batch_size": batch},
                       "scores": {"surrogate": False, "stability": False, "novelty": False}})


def steady(finished: list[float], chunk: int) -> float:
    """Samples per minute from the first finished chunk to the last (start-up left out)."""
    return (len(finished) - 1) * chunk / (max(finished) - min(finished)) * 60


def committed(directory: Path, chunk: int) -> float:
    """The same from a campaign folder: when each chunk's rows were committed."""
    return steady([p.stat().st_mtime for p in (directory / "rows").glob("*.parquet")], chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="per target")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    campaign = spec(args.targets, args.samples, args.chunk, args.chunk)
    total = args.samples * len(args.targets)
    rates = {}

    loaded = load_model()
    warm_up(loaded.model)  # as every sampler actor does when it starts (their start is timed below)
    started = time.perf_counter()
    finished = []  # when each chunk was done
    for item in campaign.work_items():  # the same chunks and seeds as the campaign, one after another
        generate(loaded, campaign.request(item))
        finished.append(time.time())
    rates["plain generate (this process)"] = (total / (time.perf_counter() - started) * 60, steady(finished, args.chunk))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run_campaign(campaign, Path(tmp) / "local", backend="local", progress=False)
        rates["campaign, no Ray"] = (total / (time.perf_counter() - started) * 60, committed(Path(tmp) / "local", args.chunk))
        for workers in args.workers:
            started = time.perf_counter()
            run_campaign(campaign, Path(tmp) / f"ray{workers}", workers=workers, progress=False)
            rates[f"campaign on local Ray, {workers} worker(s)"] = (
                total / (time.perf_counter() - started) * 60, committed(Path(tmp) / f"ray{workers}", args.chunk))
    base, base_steady = rates["plain generate (this process)"]
    print(f"{total} samples ({len(args.targets)} targets × {args.samples}), chunks of {args.chunk}, no scoring")
    print("  (end to end includes each path's start: Ray, actors, their warm-up; steady state is the rate from the "
          "first finished chunk to the last)")
    for name, (rate, steady_rate) in rates.items():
        print(f"  {name:<40} end to end {rate:7.1f} samples/min ({rate / base:4.2f}×)   "
              f"steady state {steady_rate:7.1f} samples/min ({steady_rate / base_steady:4.2f}× plain generate)")
    one = rates.get("campaign on local Ray, 1 worker(s)", (None, None))[1]
    if one:
        print(f"estimate on N GPU workers: about N × (one worker's rate on its GPU); on CPU actors here one worker "
              f"gives {one:.0f}/min, so N CPU-bound workers ≈ N × {one:.0f}/min while cores last")


if __name__ == "__main__":
    main()
