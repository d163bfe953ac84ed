"""Train the CHGNet gap head, choose the ensemble members and calibrate the "±", in one command.

    OMP_NUM_THREADS=1 nice -n 15 python -m crystallm_core.chem.surrogates.train_head \
        --out crystallm_core/assets/surrogates

1. CHGNet crystal features (cache_dir()/chgnet_features.npz) and descriptors
   (cache_dir()/surrogate_features.npz) of every band-gap row;
2. LightGBM classifier + non-metal regressor on the **train** split, early stopping on val, for
   CHGNet features alone and next to the descriptors (the latter is shipped as "head");
3. member sets (head, + gnn, + gbm, …) scored on the **WBM rows of val** (hypothetical
   structures, the closest stand-in for generated ones); the best R² there is kept;
4. spread model chosen on val by interval score, its scale fitted so that ±1 covers 68 % of the
   val rows read as non-metals.
The test split is never looked at here: `python -m crystallm_core.chem.surrogates.report`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from crystallm_core.chem.stability import chgnet_feature_names
from crystallm_core.chem.surrogates.calibration import (
    TARGET_COVERAGE,
    coverage,
    fit_scale,
)
from crystallm_core.chem.surrogates.chgnet_cache import (
    CACHE_FILE,
    band_gap_rows,
    cached_chgnet_features,
)
from crystallm_core.chem.surrogates.ensemble import (
    READINGS,
    EnsembleConfig,
    combine,
    head_feature_names,
)
from crystallm_core.chem.surrogates.report import member_readings
from crystallm_core.chem.surrogates.scoring import gap_metrics, gated_gap
from crystallm_core.chem.surrogates.train_gbm import cached_features, train_gbm
from crystallm_core.paths import SURROGATE_DIR, cache_dir

SIGMA_RELATIVE = (0.0, 0.05, 0.1, 0.2, 0.3)
SIGMA_FLOOR = (0.05, 0.1, 0.2, 0.3, 0.5)


def interval_score(error: np.ndarray, spread: np.ndarray, level: float = TARGET_COVERAGE) -> float:
    """Mean interval score of [reading ± spread] at `level` (Gneiting & Raftery 2007): width plus a
    penalty for misses; lower is better, and it rewards narrow bands only where they still hold."""
    alpha = 1 - level
    return float(np.mean(2 * spread + 2 / alpha * np.clip(np.abs(error) - spread, 0, None)))


def calibrate(config: EnsembleConfig, p_metal: np.ndarray, gap: np.ndarray, y: np.ndarray) -> tuple[EnsembleConfig, dict]:
    """The spread model (sigma_relative, sigma_floor) with the best interval score on these rows, its
    scale fitted so that ±1 covers 68 % of the rows read as non-metals (calibration.py says why)."""
    best = None
    for relative, floor in itertools.product(SIGMA_RELATIVE, SIGMA_FLOOR):
        trial = EnsembleConfig(config.members, "mixture", relative, floor, 1.0)
        mean, spread, _, _ = combine(p_metal, gap, trial)
        gapped = mean > 0
        trial.scale = fit_scale(mean[gapped] - y[gapped], spread[gapped])
        score = interval_score(mean - y, trial.scale * spread)
        if best is None or score < best[0]:
            best = (score, trial, mean - y, trial.scale * spread, gapped)
    score, chosen, error, spread, gapped = best
    return chosen, {"interval_score": round(score, 4), "coverage_1": coverage(error, spread),
                    "coverage_2": coverage(error, spread, 2), "coverage_1_read_nonmetal": coverage(error[gapped], spread[gapped])}


def select_members(readings: dict[str, tuple[np.ndarray, np.ndarray]], y: np.ndarray, wbm: np.ndarray,
                   ) -> tuple[list[str], list[dict]]:
    """Every member set that contains the head, scored on the WBM rows of val; the best R² wins."""
    table = []
    for size in range(1, len(READINGS) + 1):
        for members in itertools.combinations(READINGS, size):
            if "head" not in members:
                continue
            p = np.mean([readings[m][0] for m in members], axis=0)
            gap = gated_gap(p, np.mean([readings[m][1] for m in members], axis=0))
            table.append({"members": list(members), **gap_metrics(y[wbm], gap[wbm], p[wbm])})
    best = max(table, key=lambda row: row["r2"])
    return best["members"], table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the CHGNet gap head and calibrate the ensemble.")
    parser.add_argument("--dataset", type=Path, default=cache_dir() / "dataset.parquet")
    parser.add_argument("--out", type=Path, default=SURROGATE_DIR)
    parser.add_argument("--chgnet-cache", type=Path, default=cache_dir() / CACHE_FILE)
    parser.add_argument("--features-cache", type=Path, default=cache_dir() / "surrogate_features.npz")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    table = band_gap_rows(args.dataset)
    start = time.time()
    chgnet = cached_chgnet_features(table, args.chgnet_cache)
    descriptors = cached_features(table, args.features_cache, workers=1)
    featurise_seconds = time.time() - start
    both = np.hstack([chgnet, descriptors])
    ok = ~np.isnan(chgnet).all(axis=1) & ~np.isnan(descriptors).all(axis=1)
    y, split, source = table.band_gap.to_numpy(float), table.split.to_numpy(str), table.source.to_numpy(str)

    log: dict = {"rows": int(ok.sum()), "failed_rows": int((~ok).sum()), "featurise_seconds": round(featurise_seconds)}
    val = ok & (split == "val")
    wbm = source[val] == "wbm"
    variants = {"chgnet_only": (chgnet, chgnet_feature_names()), "head": (both, head_feature_names())}
    models, heads = {}, {}
    for name, (matrix, names) in variants.items():
        start = time.time()
        models[name], rounds = train_gbm(matrix[ok], y[ok], split[ok], names=names)
        heads[name] = models[name].predict(matrix[val])
        p, gap = heads[name]
        log[name] = {**rounds, "train_seconds": round(time.time() - start),
                     "val_wbm": gap_metrics(y[val][wbm], gated_gap(p, gap)[wbm], p[wbm]),
                     "val_mp": gap_metrics(y[val][~wbm], gated_gap(p, gap)[~wbm], p[~wbm])}
        print(name, json.dumps(log[name]), flush=True)
    models["head"].save(args.out, prefix="head")

    shipped = member_readings(table[val].reset_index(drop=True), args.out, members=["gnn", "gbm"],
                              chgnet=list(chgnet[val]))
    readings = {"head": heads["head"], **shipped}
    members, log["member_sets_val_wbm"] = select_members(readings, y[val], wbm)
    p_metal = np.stack([readings[m][0] for m in members], 1)
    gap = np.stack([readings[m][1] for m in members], 1)
    config, log["calibration_val"] = calibrate(EnsembleConfig(members), p_metal, gap, y[val])
    config.save(args.out)
    log["ensemble_config"] = config.__dict__
    (args.out / "head_metrics.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({k: log[k] for k in ("member_sets_val_wbm", "calibration_val", "ensemble_config")}, indent=1))


if __name__ == "__main__":
    main()
