"""Train the LightGBM band-gap reading on the training split; report val / test metrics.

    nice -n 10 python -m crystallm_core.chem.judges.surrogates.train_gbm --out crystallm_core/assets/surrogates

Features are cached in cache_dir()/surrogate_features.npz (keyed by row id) because computing
them (CIF parsing + symmetry analysis) dominates the run time.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from multiprocessing import Pool
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from pymatgen.core import Structure

from crystallm_core.chem.judges.surrogates.features import feature_names, structure_features
from crystallm_core.chem.judges.surrogates.gbm import GBMModel
from crystallm_core.chem.judges.surrogates.scoring import gated_gap, is_metal, report_splits
from crystallm_core.paths import SURROGATE_DIR, cache_dir

COMMON = {"learning_rate": 0.03, "num_leaves": 63, "min_data_in_leaf": 10, "feature_fraction": 0.5,
          "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0, "verbose": -1, "seed": 0}
CLASSIFIER_PARAMS = {**COMMON, "objective": "binary"}
REGRESSOR_PARAMS = {**COMMON, "objective": "huber", "alpha": 1.0}  # robust to the few 8-16 eV outliers


def features_of_cif(cif: str) -> np.ndarray | None:
    """Worker: CIF text -> feature vector, or None when the row cannot be featurised."""
    warnings.filterwarnings("ignore")
    try:
        return structure_features(Structure.from_str(cif, fmt="cif"))
    except Exception:  # unreadable rows are dropped from training, and counted
        return None


def cached_features(table: pd.DataFrame, cache: Path, workers: int) -> np.ndarray:
    """(len(table), n_features) matrix with NaN rows for failures; reuses `cache` where ids match."""
    names = feature_names()
    known: dict[str, np.ndarray] = {}
    if cache.exists():
        stored = np.load(cache, allow_pickle=False)
        if list(stored["feature_names"]) == names:
            known = dict(zip(stored["ids"], stored["features"]))
    todo = [i for i, row_id in enumerate(table.id) if row_id not in known]
    if todo:
        with Pool(workers) as pool:
            fresh = pool.map(features_of_cif, table.cif.iloc[todo].tolist(), chunksize=64)
        for i, vector in zip(todo, fresh):
            known[table.id.iloc[i]] = np.full(len(names), np.nan, np.float32) if vector is None else vector
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, ids=np.array(list(known), dtype=str), features=np.stack(list(known.values())),
                            feature_names=np.array(names))
    return np.stack([known[row_id] for row_id in table.id])


def train_gbm(features: np.ndarray, band_gap: np.ndarray, split: np.ndarray, max_rounds: int = 5000,
              threads: int = 1) -> tuple[GBMModel, dict]:
    """Fit classifier and regressor with early stopping on the validation split.

    One thread by default: it trains in about 30 s, while on a shared, oversubscribed machine
    LightGBM's OpenMP threads spin-wait (a 2-thread run under load took 31 minutes).
    """
    names = feature_names()
    metal = is_metal(band_gap).astype(float)
    train, val = split == "train", split == "val"
    stop = [lgb.early_stopping(200, verbose=False)]

    def fit(params: dict, rows_train: np.ndarray, rows_val: np.ndarray, target: np.ndarray) -> lgb.Booster:
        data = lgb.Dataset(features[rows_train], target[rows_train], feature_name=names, free_raw_data=False)
        valid = lgb.Dataset(features[rows_val], target[rows_val], reference=data)
        return lgb.train({**params, "num_threads": threads}, data, max_rounds, valid_sets=[valid], callbacks=stop)

    classifier = fit(CLASSIFIER_PARAMS, train, val, metal)
    nonmetal = metal == 0
    regressor = fit(REGRESSOR_PARAMS, train & nonmetal, val & nonmetal, band_gap)
    rounds = {"classifier_rounds": classifier.best_iteration, "regressor_rounds": regressor.best_iteration}
    return GBMModel(classifier, regressor), rounds


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the LightGBM band-gap surrogate.")
    parser.add_argument("--dataset", type=Path, default=cache_dir() / "dataset.parquet")
    parser.add_argument("--out", type=Path, default=SURROGATE_DIR)
    parser.add_argument("--features-cache", type=Path, default=cache_dir() / "surrogate_features.npz")
    parser.add_argument("--train-sources", default="all", help="comma list of sources to train on, or 'all'")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    table = pd.read_parquet(args.dataset, columns=["id", "source", "band_gap", "split", "cif"])
    table = table[table.band_gap.notna()].reset_index(drop=True)
    start = time.time()
    features = cached_features(table, args.features_cache, args.workers)
    featurise_seconds = time.time() - start
    ok = ~np.isnan(features).all(axis=1)
    band_gap, split, source = table.band_gap.to_numpy(float), table.split.to_numpy(str), table.source.to_numpy(str)
    fit_split = split.copy()
    if args.train_sources != "all":  # other sources still count for evaluation, never for fitting
        fit_split[~np.isin(source, args.train_sources.split(",")) & (split == "train")] = "unused"
    start = time.time()
    model, rounds = train_gbm(features[ok], band_gap[ok], fit_split[ok])
    train_seconds = time.time() - start
    p_metal, gap = model.predict(features[ok])
    metrics = report_splits(band_gap[ok], gated_gap(p_metal, gap), p_metal, split[ok], source[ok])
    model.save(args.out)
    log = {"metrics": metrics, **rounds, "rows": int(ok.sum()), "failed_rows": int((~ok).sum()),
           "train_sources": args.train_sources, "featurise_seconds": round(featurise_seconds, 1),
           "train_seconds": round(train_seconds, 1), "dataset": str(args.dataset)}
    (args.out / "gbm_metrics.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
