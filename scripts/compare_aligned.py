"""Today's default vs an aligned model, same judges, same seeds, one run: a small paper protocol
(the 8 band-gap targets, E_hull 0) and the E_hull slider (0 vs 0.5 eV/atom at 1.5 eV).

    python scripts/compare_aligned.py --model runs/align/round_NNN/model [--n 16] [--n-hull 32] [--seed 0]

Seeds start at 0, far from the 1,000,000+ that `align` samples with. Rates divide by all
samples; `stable` is valid and CHGNet E_hull ≤ 0.1 eV/atom against our (biased-low) hull.
Prints one table and writes it as JSON next to the aligned model (compare_default.json).
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
from crystallm_core.product.align import PAPER_BAND_GAPS, spearman  # noqa: E402
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
    hull = judged(loaded, [(1.547, 0.0), (1.547, 0.5)], n_hull, seed + 500)
    hull_valid = hull[hull["valid"].astype(bool)]
    at0 = hull_valid.loc[hull_valid["e_hull_target"] == 0.0, "e_hull_pred"]
    at05 = hull_valid.loc[hull_valid["e_hull_target"] == 0.5, "e_hull_pred"]
    return {
        "model": str(source), "samples": len(protocol),
        **{k: round(rates[k], 4) for k in ("valid", "stable", "vsun", "valid_unique_novel", "hit")},
        "median_e_hull_valid": round(float(valid["e_hull_pred"].median()), 3),
        "band_gap_spearman": spearman(valid["band_gap_target"], valid["band_gap_pred"]),
        "median_gap_at_3.72": float(valid.loc[valid["band_gap_target"] == 3.72, "band_gap_pred"].median()),
        "median_e_hull_at_0": round(float(at0.median()), 3), "median_e_hull_at_0.5": round(float(at05.median()), 3),
        "shift_0_minus_0.5_90pct": bootstrap_shift(at0, at05, seed),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=16, help="samples per band-gap target")
    parser.add_argument("--n-hull", type=int, default=32, help="samples per E_hull target")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [measure(resolve_model_dir(None), args.n, args.n_hull, args.seed),
            measure(Path(args.model), args.n, args.n_hull, args.seed)]
    print(pd.DataFrame(rows).set_index("model").T.to_string())
    (Path(args.model) / "compare_default.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
