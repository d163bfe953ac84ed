"""Choose the band-gap ensemble's blend of the head with v1 (model card, "Generated, unrelaxed structures").

    OMP_NUM_THREADS=1 python scripts/measure_generated_gap.py --models OLD_SURROGATE_DIR --readings generated.csv
    OMP_NUM_THREADS=1 python scripts/choose_gap_blend.py --readings generated.csv [--dataset data/cache/dataset.parquet]

A grid of v1's share of the metal vote and of the gap (v1 = GNN and LightGBM, half each); each point
is scored by Spearman against ALIGNN on the **calibration half** of the generated rows and vetoed
unless its R² and MAE on the **val WBM rows** are no worse than the head's alone. Prints the table
and the weights of the best point that passes, as `ensemble_config.json` takes them. The held-out
half and test are not read here (`measure_generated_gap.py` and `report` score the choice).
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from crystallm_core.chem.judges.surrogates.chgnet_cache import band_gap_rows
from crystallm_core.chem.judges.surrogates.generated_gap import CALIBRATION, spearman
from crystallm_core.chem.judges.surrogates.report import member_readings
from crystallm_core.chem.judges.surrogates.scoring import gap_metrics, gated_gap
from crystallm_core.paths import SURROGATE_DIR, cache_dir

MEMBERS = ("head", "gnn", "gbm")


def blend(p_metal: np.ndarray, gap: np.ndarray, metal_share: float, gap_share: float) -> tuple[np.ndarray, np.ndarray]:
    """(reading, P(metal)) of (n, 3) member columns with v1 holding these shares (GNN and LightGBM half each)."""
    metal_w = np.array([1 - metal_share, metal_share / 2, metal_share / 2])
    gap_w = np.array([1 - gap_share, gap_share / 2, gap_share / 2])
    p = p_metal @ metal_w
    return gated_gap(p, gap @ gap_w), p


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=Path, required=True, help="measure_generated_gap.py --readings CSV")
    parser.add_argument("--dataset", type=Path, default=cache_dir() / "dataset.parquet")
    parser.add_argument("--models", type=Path, default=SURROGATE_DIR, help="folder with the head, GNN and LightGBM")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for path, made_by in ((args.readings, "measure_generated_gap.py --readings"), (args.dataset, "prepare-data")):
        if not path.is_file():
            raise SystemExit(f"{path} not found (made by {made_by})")

    generated = pd.read_csv(args.readings)
    calibration = (generated.half == CALIBRATION).to_numpy()
    alignn = generated.alignn.to_numpy()[calibration]
    gen_p, gen_gap = (np.stack([generated[f"0:{m}_{k}"].to_numpy()[calibration] for m in MEMBERS], 1)
                      for k in ("p_metal", "gap"))
    table = band_gap_rows(args.dataset)
    val = table[(table.split == "val") & (table.source == "wbm")].reset_index(drop=True)
    readings = member_readings(val, args.models, list(MEMBERS))
    val_p, val_gap = (np.stack([readings[m][k] for m in MEMBERS], 1) for k in (0, 1))
    ok = np.isfinite(val_gap).all(axis=1)
    truth = val.band_gap.to_numpy(float)[ok]

    rows = []
    for metal_share, gap_share in itertools.product(np.round(np.arange(0, 0.61, 0.1), 2),
                                                    np.round(np.arange(0, 0.31, 0.05), 2)):
        reading, _ = blend(gen_p, gen_gap, metal_share, gap_share)
        val_reading, val_p_metal = blend(val_p[ok], val_gap[ok], metal_share, gap_share)
        scores = gap_metrics(truth, val_reading, val_p_metal)
        rows.append({"metal_share": metal_share, "gap_share": gap_share,
                     "spearman_calibration": spearman(reading, alignn), "mae_calibration": np.abs(reading - alignn).mean(),
                     "val_wbm_r2": scores["r2"], "val_wbm_mae": scores["mae"], "val_wbm_mae_gap_pos": scores["mae_gap_pos"]})
    grid = pd.DataFrame(rows)
    head = grid.iloc[0]  # shares 0, 0: the head alone
    allowed = grid[(grid.val_wbm_r2 >= head.val_wbm_r2) & (grid.val_wbm_mae <= head.val_wbm_mae)]
    print(grid.round(4).sort_values("spearman_calibration", ascending=False).to_string(index=False))
    best = allowed.sort_values("spearman_calibration", ascending=False).iloc[0]
    choice = {"members": list(MEMBERS),
              "metal_weights": [round(1 - best.metal_share, 4), round(best.metal_share / 2, 4), round(best.metal_share / 2, 4)],
              "gap_weights": [round(1 - best.gap_share, 4), round(best.gap_share / 2, 4), round(best.gap_share / 2, 4)]}
    print(json.dumps({"val_wbm_rows": int(ok.sum()), "chosen": best.round(4).to_dict(), "ensemble_config": choice}, indent=1))


if __name__ == "__main__":
    main()
