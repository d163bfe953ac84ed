"""Score the band-gap ensembles on held-out rows: today's shipped ensemble next to v1 (graph network
+ LightGBM, ± = half their difference), and with `--before DIR` next to another folder's ensemble (the
previous release), on WBM rows and Materials Project rows, in one run.

    OMP_NUM_THREADS=1 nice -n 15 python -m crystallm_core.chem.judges.surrogates.report \
        --out crystallm_core/assets/surrogates/ensemble_metrics.json \
        --predictions crystallm_core/assets/surrogates/test_predictions.csv

Metrics: R², MAE, MAE on non-metals (true gap > 0), metal accuracy, and the share of rows whose
error is within ±1 and ±2 spreads (and within ±1 on the rows read as non-metals, where the app
shows "g ± s"). The CHGNet forward (which the app makes anyway for E_hull)
is timed apart from what the ensemble adds on top of it.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from pymatgen.core import Structure

from crystallm_core.chem.judges.chgnet_features import ChgnetFeatures
from crystallm_core.chem.judges.stability import static_readings
from crystallm_core.chem.judges.surrogates.calibration import coverage, reliability_curve
from crystallm_core.chem.judges.surrogates.chgnet_cache import band_gap_rows
from crystallm_core.chem.judges.surrogates.ensemble import (
    V1_CONFIG,
    BandGapSurrogate,
    EnsembleConfig,
    combine,
    member_columns,
)
from crystallm_core.chem.judges.surrogates.scoring import gap_metrics
from crystallm_core.paths import SURROGATE_DIR, cache_dir

METRICS = ("n", "r2", "mae", "mae_gap_pos", "metal_accuracy", "coverage_1", "coverage_2", "coverage_1_read_gap")


def parse(cifs: Sequence[str]) -> list[Structure | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = []
        for cif in cifs:
            try:
                out.append(Structure.from_str(cif, fmt="cif"))
            except Exception:  # scored as a failed row
                out.append(None)
        return out


def member_readings(table: pd.DataFrame, model_dir: Path, members: list[str],
                    chgnet: Sequence[ChgnetFeatures | None] | None = None) -> dict[str, tuple[np.ndarray, ...]]:
    """Each member's (P(metal), gap, gap variance among its models) for the rows of `table` (column
    cif); NaN where a row fails."""
    surrogate = BandGapSurrogate.load(model_dir, EnsembleConfig(members))
    reasons, readings = surrogate.readings(parse(table.cif), chgnet)
    ok = np.array([reason is None for reason in reasons])
    out = {}
    for member, columns in readings.items():
        full = tuple(np.full(len(table), np.nan) for _ in columns)
        for column, values in zip(full, columns):
            column[ok] = values
        out[member] = full
    return out


def scores(y: np.ndarray, mean: np.ndarray, spread: np.ndarray, p_metal: np.ndarray) -> dict[str, float]:
    """`gap_metrics` plus the ±1 / ±2 coverage of the spread, and ±1 on the rows read as non-metals."""
    gap = mean > 0
    return {**gap_metrics(y, mean, p_metal), "coverage_1": coverage(mean - y, spread),
            "coverage_2": coverage(mean - y, spread, 2.0), "n_read_gap": int(gap.sum()),
            "coverage_1_read_gap": coverage(mean[gap] - y[gap], spread[gap]) if gap.any() else float("nan")}


def subsets(split: np.ndarray, source: np.ndarray) -> dict[str, np.ndarray]:
    wbm = source == "wbm"
    return {f"{part}_{kind}": (split == part) & mask for part in ("test", "val")
            for kind, mask in (("wbm", wbm), ("mp", ~wbm))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Score v1 and the shipped band-gap ensemble on val / test rows.")
    parser.add_argument("--dataset", type=Path, default=cache_dir() / "dataset.parquet")
    parser.add_argument("--models", type=Path, default=SURROGATE_DIR)
    parser.add_argument("--out", type=Path, default=None, help="write the metrics JSON here")
    parser.add_argument("--predictions", type=Path, default=None, help="write the test rows' readings here (CSV)")
    parser.add_argument("--before", type=Path, default=None,
                        help="also score the ensemble of this surrogate folder (e.g. the previous release), same run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    table = band_gap_rows(args.dataset)
    table = table[table.split.isin(["val", "test"])].reset_index(drop=True)
    structures = parse(table.cif)
    start = time.perf_counter()
    chgnet = [None if isinstance(r, str) else r.features
              for r in static_readings([s for s in structures if s is not None])]
    chgnet_ms = 1000 * (time.perf_counter() - start) / len(table)
    chgnet_iter = iter(chgnet)
    chgnet = [next(chgnet_iter) if s is not None else None for s in structures]

    ensembles = {"v1": (args.models, V1_CONFIG), "shipped": (args.models, EnsembleConfig.load(args.models))}
    if args.before:
        ensembles["before"] = (args.before, EnsembleConfig.load(args.before))
    y, split, source = table.band_gap.to_numpy(float), table.split.to_numpy(str), table.source.to_numpy(str)
    summary: dict = {"dataset": str(args.dataset), "rows": len(table),
                     "chgnet_ms_per_structure": round(chgnet_ms, 2), "torch_threads": torch.get_num_threads(),
                     "ensembles": {name: {"models": str(folder), **config.__dict__}
                                   for name, (folder, config) in ensembles.items()}, "metrics": {}}
    columns: dict[str, np.ndarray] = {}
    for name, (folder, config) in ensembles.items():
        start = time.perf_counter()
        readings = member_readings(table, folder, config.members, chgnet)
        summary[f"{name}_ms_per_structure_beyond_chgnet"] = round(1000 * (time.perf_counter() - start) / len(table), 2)
        columns_in = member_columns(readings, config.members)
        mean, spread, p_metal, gated = combine(*columns_in[:2], config, columns_in[2], config.unrelaxed(chgnet))
        ok = np.isfinite(mean)
        summary["failed"] = int((~ok).sum())
        summary["metrics"][name] = {part: scores(y[mask & ok], mean[mask & ok], spread[mask & ok], p_metal[mask & ok])
                                    for part, mask in subsets(split, source).items() if (mask & ok).any()}
        columns.update({f"{name}_pred": mean, f"{name}_std": spread, f"{name}_p_metal": p_metal})
        columns.update({f"{name}_{member}": gated[:, j] for j, member in enumerate(config.members)})
    test = (split == "test") & np.isfinite(columns["shipped_pred"])
    summary["reliability_test"] = {kind: reliability_curve(columns["shipped_pred"][mask] - y[mask],
                                                           columns["shipped_std"][mask])
                                   for kind, mask in (("wbm", test & (source == "wbm")), ("mp", test & (source != "wbm")))}
    print_table(summary["metrics"])
    print(json.dumps({k: v for k, v in summary.items() if k.endswith("structure_beyond_chgnet") or k.startswith("chgnet")}))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    if args.predictions:
        # Rounded to 0.1 meV: far below the error, and keeps the shipped file small.
        rows = pd.DataFrame({"id": table.id, "source": source, "split": split, "true": y,
                             "pred": columns["shipped_pred"], "std": columns["shipped_std"],
                             "p_metal": columns["shipped_p_metal"],
                             **{k.removeprefix("shipped_"): v for k, v in columns.items()
                                if k.startswith("shipped_") and k not in ("shipped_pred", "shipped_std", "shipped_p_metal")},
                             "v1_pred": columns["v1_pred"], "v1_std": columns["v1_std"]})
        rows[test].round(4).to_csv(args.predictions, index=False)
    return summary


def print_table(metrics: dict) -> None:
    """One line per (ensemble, rows), the metrics side by side."""
    print(f"{'ensemble':10}{'rows':9}" + "".join(f"{name[:14]:>15}" for name in METRICS))
    for part in ("test_wbm", "test_mp", "val_wbm", "val_mp"):
        for name, parts in metrics.items():
            if part in parts:
                values = parts[part]
                print(f"{name:10}{part:9}" + "".join(f"{values[m]:>15.3f}" if m != "n" else f"{values[m]:>15d}"
                                                    for m in METRICS))


if __name__ == "__main__":
    main()
