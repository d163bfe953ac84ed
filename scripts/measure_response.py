"""How far each slider steers: response curves of the shipped model, measured.

    python scripts/measure_response.py [--n 32] [--relax 6] [--variant default guide-e_hull ...]
        [--out crystallm_core/assets/default_model/response_curves.json]

Two sweeps, each with the other target fixed: E_hull targets 0, 0.05, 0.1, 0.25, 0.5 eV/atom at
a band gap of 1.5 eV, and the paper's eight band-gap targets at E_hull 0. Per point: n samples
(constrained decoding, T 0.7, one seed per point), and for the valid structures the surrogate
band gap and the CHGNet E_hull estimate (static; and after the bounded CHGNet relaxation for
the first `--relax` valid structures of each E_hull point). Reported per point: the median with
a 90 % bootstrap interval, the share within tolerance (0.1 eV/atom, 0.5 eV); per sweep:
Spearman's rank correlation between target and outcome over all valid structures, and for
E_hull the difference of medians between targets 0 and 0.5 with its 90 % interval (E_hull
steers in the right direction when that interval lies below 0). Variants: the default
settings; `guide-e_hull` (guidance 2 contrasting E_hull with "E_hull unknown" only); `guide-all`
(guidance 2 against both unknown); `best-of-4` and `best-of-8`, the ranked variants: n × K
samples per point, all scored, the n best picked by `product.best_of` (chem/judges/ranking.py's
score, only samples whose gap reading is within tolerance; fewer when fewer are) and the
statistics taken over the picked ones (where n × K exceeds a request's limit, the point is
sampled as equal parts, seeds seed, seed + 1, ..., each picked on its own). `hit_rate` is hits over the n asked for (over all n
samples for the unranked variants, as the paper counts). The ranked hit rate is what the same
gap head predicts, not a measurement. The results feed the Model page and the model card.

    python scripts/measure_response.py --variant default best-of-4 best-of-8 --n 16
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from crystallm_core.chem.decoding.repair import relax_many
from crystallm_core.chem.judges.scoring import StructureScorer
from crystallm_core.lm.checkpoints import load_model
from crystallm_core.lm.sampler import linear_layers, warm_up
from crystallm_core.paths import DEFAULT_MODEL_DIR
from crystallm_core.product.best_of import best_of_counts, pick
from crystallm_core.product.evaluate import score_candidates
from crystallm_core.product.generation import GenerationRequest, generate
from crystallm_core.product.server_settings import server_settings
from crystallm_core.product.service import DEFAULT_SAMPLING

E_HULL_TARGETS = (0.0, 0.05, 0.1, 0.25, 0.5)  # eV/atom, at FIXED_GAP
FIXED_GAP = 1.5
GAP_TARGETS = (0.072, 0.180, 0.681, 1.547, 2.440, 3.720, 6.776, 12.145)  # the paper's, at E_hull 0
TOLERANCE = {"e_hull": 0.1, "band_gap": 0.5}
VARIANTS = {
    "default": {},
    "guide-e_hull": {"guidance_scale": 2.0, "guide": "e_hull"},
    "guide-all": {"guidance_scale": 2.0, "guide": "all"},
    "best-of-4": {},
    "best-of-8": {},
}
BEST_OF = {"best-of-4": 4, "best-of-8": 8}  # ranked variants: default settings, n × K samples, n picked


def median_interval(values: np.ndarray, rng: np.random.Generator, n_boot: int = 2000) -> list[float | None]:
    """Median and its 90 % bootstrap interval ([None] * 3 without values)."""
    if len(values) == 0:
        return [None, None, None]
    boots = np.median(rng.choice(values, (n_boot, len(values))), axis=1)
    return [round(float(np.median(values)), 4), round(float(np.quantile(boots, 0.05)), 4),
            round(float(np.quantile(boots, 0.95)), 4)]


def difference_interval(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n_boot: int = 2000) -> list[float] | None:
    """median(a) - median(b) and its 90 % bootstrap interval."""
    if len(a) == 0 or len(b) == 0:
        return None
    boots = (np.median(rng.choice(a, (n_boot, len(a))), axis=1) - np.median(rng.choice(b, (n_boot, len(b))), axis=1))
    return [round(float(np.median(a) - np.median(b)), 4), round(float(np.quantile(boots, 0.05)), 4),
            round(float(np.quantile(boots, 0.95)), 4)]


def request_parts(n: int, best_of: int, limit: int) -> list[int]:
    """How many structures each request of a point delivers: one request where n × best_of
    samples fit a request's limit, else equal parts that do (each its own seed, picked on its own)."""
    per_request = max(1, limit // best_of)
    parts = -(-n // per_request)
    return [n // parts + (1 if k < n % parts else 0) for k in range(parts)]


def measure_point(loaded, scorer: StructureScorer, band_gap: float, e_hull: float, n: int, seed: int,
                  settings, n_relax: int, best_of: int = 1) -> dict:
    """One target pair: sample (n × best_of, keeping the n best), score, relax the first few."""
    started = time.perf_counter()
    sampled = scored = 0.0
    valid, point = [], {"band_gap_target": band_gap, "e_hull_target": e_hull, "n": n, "n_valid": 0}
    for k, part in enumerate(request_parts(n, best_of, server_settings().max_structures)):
        request = GenerationRequest(band_gap=band_gap, e_hull=e_hull, seed=seed + k, settings=settings,
                                    **best_of_counts(part, best_of))
        begun = time.perf_counter()
        run = generate(loaded, request)
        sampled += time.perf_counter() - begun
        begun = time.perf_counter()
        mine = [c for c in run.candidates if c.valid]
        score_candidates(mine, scorer)
        if best_of > 1:
            run.settings["hit_tolerance"] = TOLERANCE["band_gap"]
            summary = pick(run, run.candidates, part, band_gap)
            mine = [c for c in run.candidates if c.pick["picked"]]
            for key, value in (("n_sampled", len(run.candidates)), ("n_sampled_valid", summary["valid"]),
                               ("n_within_tolerance", summary["within_tolerance"])):
                point[key] = point.get(key, 0) + value
        scored += time.perf_counter() - begun
        valid += mine
    point["n_valid"] = len(valid)
    chosen = valid[:n_relax]
    repairs = relax_many([c.structure for c in chosen], [c.report for c in chosen]) if chosen else []
    relaxed = [r.details["e_hull_after"] for r in repairs if r is not None and r.details.get("e_hull_after") is not None]
    return {**point,
            "band_gap": [c.scores.band_gap_pred for c in valid if c.scores.band_gap_pred is not None],
            "e_hull": [c.scores.e_hull_pred for c in valid if c.scores.e_hull_pred is not None],
            "e_hull_relaxed": relaxed,
            "seconds": {"sampling": round(sampled, 1), "scoring": round(scored, 1),
                        "relaxing": round(time.perf_counter() - started - sampled - scored, 1)}}


def summarise(points: list[dict], swept: str, rng: np.random.Generator) -> dict:
    """Per-point medians, shares within tolerance, and the sweep's rank correlation."""
    target_key = f"{swept}_target"
    rows, targets, outcomes = [], [], []
    for point in points:
        values = np.array(point[swept], dtype=float)
        within = int(np.sum(np.abs(values - point[target_key]) <= TOLERANCE[swept]))
        row = {"target": point[target_key], "n": point["n"], "n_valid": point["n_valid"],
               "median": median_interval(values, rng),
               "within_tolerance": round(within / len(values), 3) if len(values) else None,
               "hit_rate": round(within / point["n"], 3)}
        row.update({k: point[k] for k in ("n_sampled", "n_within_tolerance") if k in point})
        if swept == "e_hull":
            row["median_relaxed"] = median_interval(np.array(point["e_hull_relaxed"], dtype=float), rng)
            row["n_relaxed"] = len(point["e_hull_relaxed"])
        rows.append(row)
        targets += [point[target_key]] * len(values)
        outcomes += list(values)
    rho, p_value = spearmanr(targets, outcomes) if len(set(targets)) > 1 and outcomes else (float("nan"), float("nan"))
    summary = {"points": rows, "spearman": round(float(rho), 3), "spearman_p": float(p_value),
               "n_valid": len(outcomes)}
    if swept == "e_hull":
        by_target = {p["e_hull_target"]: np.array(p["e_hull"], dtype=float) for p in points}
        lowest, highest = min(by_target), max(by_target)
        summary["median_difference_low_minus_high"] = difference_interval(by_target[lowest], by_target[highest], rng)
        summary["steers"] = bool(summary["median_difference_low_minus_high"]
                                 and summary["median_difference_low_minus_high"][2] < 0)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="samples per target point")
    parser.add_argument("--relax", type=int, default=6, help="valid structures relaxed per E_hull point")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--skip-gap-sweep", action="store_true", help="only the E_hull sweep (for the variants)")
    parser.add_argument("--skip-e-hull-sweep", action="store_true",
                        help="only the band-gap sweep (what best of K buys on the paper's targets)")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR / "response_curves.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other variants already in --out (same model weights only); each variant "
                             "records its own samples per point and seed")
    args = parser.parse_args()
    loaded = load_model()
    warm_up(loaded.model)  # as the app prepares a model: threads, batch size, int8 layers where faster
    scorer = StructureScorer(novelty=False)
    rng = np.random.default_rng(0)
    results = {"model": loaded.info.name, "weights_sha256": loaded.info.weights_sha256,
               "samples_per_point": args.n, "seed": args.seed, "tolerance": TOLERANCE, "variants": {}}
    if args.merge and args.out.is_file():
        previous = json.loads(args.out.read_text())
        if previous.get("weights_sha256") != loaded.info.weights_sha256:
            raise SystemExit(f"{args.out} was measured on other weights: not merging")
        for kept in previous.get("variants", {}).values():
            kept.setdefault("samples_per_point", previous["samples_per_point"])
            kept.setdefault("seed", previous["seed"])
        results.update({k: previous[k] for k in ("samples_per_point", "seed")}, variants=previous["variants"])
    for name in args.variant:
        settings = replace(DEFAULT_SAMPLING, **VARIANTS[name])
        started = time.perf_counter()
        best_of = BEST_OF.get(name, 1)
        variant = {"settings": {k: getattr(settings, k) for k in ("temperature", "top_k", "top_p", "guidance_scale",
                                                                   "guide", "decoding")},
                   "best_of": best_of, "samples_per_point": args.n, "seed": args.seed,
                   "linear_layers": linear_layers(loaded.model)}
        if not args.skip_e_hull_sweep:
            hull_points = [measure_point(loaded, scorer, FIXED_GAP, e, args.n, args.seed, settings, args.relax,
                                         best_of) for e in E_HULL_TARGETS]
            variant["e_hull_sweep"] = {"band_gap": FIXED_GAP, **summarise(hull_points, "e_hull", rng)}
        if not args.skip_gap_sweep and (name == "default" or best_of > 1):
            gap_points = [measure_point(loaded, scorer, g, 0.0, args.n, args.seed, settings, 0, best_of)
                          for g in GAP_TARGETS]
            variant["band_gap_sweep"] = {"e_hull": 0.0, **summarise(gap_points, "band_gap", rng)}
        variant["seconds"] = round(time.perf_counter() - started, 1)
        results["variants"][name] = variant
        if "e_hull_sweep" in variant:
            sweep = variant["e_hull_sweep"]
            print(f"{name}: E_hull medians {[p['median'][0] for p in sweep['points']]} "
                  f"(targets {list(E_HULL_TARGETS)}), Spearman {sweep['spearman']}, "
                  f"difference 0 - 0.5: {sweep['median_difference_low_minus_high']}, steers: {sweep['steers']}")
        if "band_gap_sweep" in variant:
            gap = variant["band_gap_sweep"]
            print(f"{name}: band-gap medians {[p['median'][0] for p in gap['points']]}, Spearman {gap['spearman']}, "
                  f"hit rates {[p['hit_rate'] for p in gap['points']]}")
        args.out.write_text(json.dumps(results, indent=1))  # after every variant: nothing lost
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
