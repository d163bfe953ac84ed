"""Today's default vs aligned models, same judges, same seeds: the paper protocol (the 8
band-gap targets × N at E_hull 0, T 0.7, constrained) and the E_hull slider (0, 0.1, 0.25,
0.5 eV/atom at 1.5 eV, N_HULL each).

    python scripts/compare_aligned.py --models default runs/align/round_NNN/model \
        [--n 128] [--n-hull 96] [--seed 0] [--out compare.json]

Seeds start at 0, far from the 1,000,000+ that `align` samples with. Rates divide by all
samples; `stable` is valid and CHGNet E_hull ≤ 0.1 eV/atom against our (biased-low) hull.
Sampling is seeded, so models measured in separate processes (say, two at a time on one core
each) get the same seeds and judges as in one process; `--out` gathers rows by model (a
model already in the file is measured again and replaced). Prints the table of the file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from crystallm_core.chem.judges.metrics import MetricSettings, summarise  # noqa: E402
from crystallm_core.lm.checkpoints import inference_dtype, load_model, resolve_model_dir  # noqa: E402
from crystallm_core.lm.sampler import SamplingSettings  # noqa: E402
from crystallm_core.product.align_report import ensemble_gap, share_of, spearman  # noqa: E402
from crystallm_core.product.align_settings import E_HULL_TARGETS, PAPER_BAND_GAPS  # noqa: E402
from crystallm_core.product.evaluate import evaluate_run  # noqa: E402
from crystallm_core.product.generation import GenerationRequest, generate  # noqa: E402

PAPER_SAMPLING = SamplingSettings(temperature=0.7, top_k=30, top_p=0.95, decoding="constrained")


def judged(loaded, cells: list[tuple[float, float]], n: int, seed: int) -> pd.DataFrame:
    run = None
    for k, (gap, hull) in enumerate(cells):
        run = generate(loaded, GenerationRequest(band_gap=gap, e_hull=hull, n=n, settings=PAPER_SAMPLING,
                                                 seed=seed + 1000 * k), run)
    evaluate_run(run, MetricSettings(), recheck=False)
    return run.to_frame(MetricSettings())


def bootstrap_shift(low: pd.Series, high: pd.Series, seed: int, draws: int = 2000) -> tuple[float, float]:
    """90 % interval of median(low) − median(high)."""
    rng = np.random.default_rng(seed)
    a, b = low.dropna().to_numpy(), high.dropna().to_numpy()
    if not len(a) or not len(b):
        return float("nan"), float("nan")
    shifts = [np.median(rng.choice(a, len(a))) - np.median(rng.choice(b, len(b))) for _ in range(draws)]
    return float(np.percentile(shifts, 5)), float(np.percentile(shifts, 95))


def measure(source, n: int, n_hull: int, seed: int) -> dict:
    loaded = load_model(source, dtype=inference_dtype("cpu"))
    protocol = judged(loaded, [(gap, 0.0) for gap in PAPER_BAND_GAPS], n, seed)
    rates = summarise(protocol)
    valid = protocol[protocol["valid"].astype(bool)]
    hull = judged(loaded, [(1.547, target) for target in E_HULL_TARGETS], n_hull, seed + 500)
    hull_valid = hull[hull["valid"].astype(bool)]
    at0 = hull_valid.loc[hull_valid["e_hull_target"] == 0.0, "e_hull_pred"]
    at05 = hull_valid.loc[hull_valid["e_hull_target"] == 0.5, "e_hull_pred"]
    by_gap = valid.groupby("band_gap_target")
    return {
        "model": str(source), "weights_sha256": loaded.info.weights_sha256,
        "samples": len(protocol),
        **{k: round(rates[k], 4) for k in ("valid", "stable", "vsun", "valid_unique_novel", "hit")},
        "unique_of_valid": share_of(valid, "unique"),
        "novel_of_valid": share_of(valid, "novel"),
        "median_gap_by_target": {f"{g:g}": round(float(m), 3) for g, m in by_gap["band_gap_pred"].median().items()},
        "median_ensemble_gap_by_target": {f"{g:g}": round(float(m), 3)
                                          for g, m in ensemble_gap(valid).groupby(valid["band_gap_target"]).median().items()},
        "band_gap_spearman_ensemble": spearman(valid["band_gap_target"], ensemble_gap(valid)),
        "median_e_hull_by_target": {f"{t:g}": round(float(m), 3) for t, m in
                                    hull_valid.groupby("e_hull_target")["e_hull_pred"].median().items()},
        "e_hull_curve_n": {f"{t:g}": int(n) for t, n in hull.groupby("e_hull_target").size().items()},
        "median_e_hull_valid": round(float(valid["e_hull_pred"].median()), 3),
        "band_gap_spearman": spearman(valid["band_gap_target"], valid["band_gap_pred"]),
        "median_gap_at_3.72": float(valid.loc[valid["band_gap_target"] == 3.72, "band_gap_pred"].median()),
        "median_e_hull_at_0": round(float(at0.median()), 3), "median_e_hull_at_0.5": round(float(at05.median()), 3),
        "shift_0_minus_0.5_90pct": bootstrap_shift(at0, at05, seed),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help='model folders; "default" is the shipped model')
    parser.add_argument("--n", type=int, default=128, help="samples per band-gap target")
    parser.add_argument("--n-hull", type=int, default=96, help="samples per E_hull target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("compare_aligned.json"))
    args = parser.parse_args()
    for name in args.models:
        source = resolve_model_dir(None) if name == "default" else Path(name)
        row = {"name": name, **measure(source, args.n, args.n_hull, args.seed), "n_per_target": args.n,
               "n_hull": args.n_hull, "seed": args.seed}
        rows = json.loads(args.out.read_text()) if args.out.is_file() else []
        rows = [r for r in rows if r["name"] != name] + [row]
        args.out.write_text(json.dumps(rows, indent=1))
    print(pd.DataFrame(rows).set_index("name").T.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
