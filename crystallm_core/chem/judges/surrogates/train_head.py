"""Train the CHGNet gap head, choose the ensemble members and calibrate the "±", in one command.

    OMP_NUM_THREADS=1 nice -n 15 python -m crystallm_core.chem.judges.surrogates.train_head \
        --out crystallm_core/assets/surrogates

1. CHGNet features, the crystal vector and each atom's features (cache_dir()/chgnet_features.npz),
   and descriptors (cache_dir()/surrogate_features.npz) of every band-gap row;
2. a deep ensemble of networks (`head.py`) on the **train** split, each network's epoch chosen on
   val, for each input variant of `--variants` (CHGNet features; also next to the descriptors);
3. each head variant alone and with the shipped gnn / gbm readings, scored on the **WBM rows of
   val** (hypothetical structures, the closest stand-in for generated ones): the best R² is kept;
4. spread model chosen by interval score, its scale fitted so that ±1 covers 68 % of the **WBM**
   rows read as non-metals (on hypothetical structures the errors are larger: a scale fitted on
   MP-dominated rows covered only 58 % of the WBM test rows read as non-metals). By default
   (`--calibrate-on oof_wbm`) those rows are the val rows plus the train rows read out of fold:
   5 heads, each trained without one fifth of the train formulas, read that fifth (`--workers` at
   a time). That is ~1,185 WBM rows read as non-metals instead of the ~55 of val alone, whose
   scale moved by 15 % from one head to the next; `val_wbm` / `val` fit on val rows only. The
   log keeps these heads' metrics on the train rows (WBM and MP apart): the larger held-out set.
`--calibrate-only` redoes step 4 for the head already in --out (no new shipped head).
The test split is never looked at here: `python -m crystallm_core.chem.judges.surrogates.report`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from crystallm_core.chem.judges.chgnet_features import ATOM_FEATURE_DIM, ChgnetFeatures
from crystallm_core.chem.judges.surrogates.calibration import (
    TARGET_COVERAGE,
    coverage,
    fit_scale,
)
from crystallm_core.chem.judges.surrogates.chgnet_cache import (
    CACHE_FILE,
    band_gap_rows,
    cached_chgnet_features,
)
from crystallm_core.chem.judges.surrogates.ensemble import (
    EnsembleConfig,
    combine,
    member_columns,
)
from crystallm_core.chem.judges.surrogates.head import (
    AtomTable,
    GapHead,
    HeadConfig,
    load_head,
    save_head,
)
from crystallm_core.chem.judges.surrogates.perturb import Perturbation, perturbed_rows
from crystallm_core.chem.judges.surrogates.report import member_readings
from crystallm_core.chem.judges.surrogates.scoring import gap_metrics, gated_gap, is_metal
from crystallm_core.chem.judges.surrogates.train_gbm import cached_features
from crystallm_core.paths import SURROGATE_DIR, cache_dir

SIGMA_RELATIVE = (0.0, 0.05, 0.1, 0.2, 0.3)
SIGMA_FLOOR = (0.05, 0.1, 0.2, 0.3, 0.5)


def train_head(features: np.ndarray, atoms: Sequence[np.ndarray], band_gap: np.ndarray, split: np.ndarray,
               config: HeadConfig, epochs: int = 60, batch_size: int = 256, weight: np.ndarray | None = None,
               select: np.ndarray | None = None, start: GapHead | None = None, lr: float = 1e-3) -> GapHead:
    """Fit each network (its own seed) on the train rows: BCE on metal / non-metal plus Huber on the
    gap of non-metals, each row's terms times weight[row] (default 1); keep each network's weights
    from the epoch with the lowest MAE of the gated reading on the val rows where `select` holds
    (default: all). `atoms`: each row's (n_sites, n_atom_inputs) atom features. `start`: fine-tune a
    copy of this head (its networks and standardisation; `config` is then its config) instead."""
    torch.manual_seed(0)  # the initial weights too: a run is reproducible whatever ran before it
    head = GapHead(config) if start is None else copy.deepcopy(start)
    train = np.nonzero(split == "train")[0]
    val = np.nonzero((split == "val") & (True if select is None else select))[0]
    row_weight = torch.as_tensor(np.ones(len(split)) if weight is None else weight, dtype=torch.float32)
    table = AtomTable(atoms, head.config.n_atom_inputs)
    if start is None:
        head.fit_standardisation(features[train], table.rows(train)[0])
    x, table, y = head.standardise(features), head.atom_table(table), torch.tensor(band_gap, dtype=torch.float32)
    metal = torch.as_tensor(is_metal(band_gap), dtype=torch.float32)
    val_batches = [(rows, *table.rows(rows)) for rows in np.array_split(val, max(1, len(val) // 1024))]
    for seed, model in enumerate(head.models):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        optimiser = torch.optim.AdamW(model.parameters(), lr, weight_decay=1e-4)
        best = (np.inf, None)
        for _ in range(epochs):
            model.train()
            order = rng.permutation(train)
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                logit, gap = model(x[rows], *table.rows(rows))
                w = row_weight[rows]
                loss = (nn.functional.binary_cross_entropy_with_logits(logit, metal[rows], reduction="none") * w).mean()
                nonmetal = metal[rows] == 0
                if nonmetal.any():
                    huber = nn.functional.huber_loss(gap[nonmetal], y[rows][nonmetal], reduction="none")
                    loss = loss + (huber * w[nonmetal]).sum() / w[nonmetal].sum()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            model.eval()
            with torch.no_grad():
                outputs = [model(x[rows], batch_atoms, owner) for rows, batch_atoms, owner in val_batches]
            p_metal = torch.sigmoid(torch.cat([logit for logit, _ in outputs])).numpy()
            gap = torch.cat([g for _, g in outputs]).numpy()
            mae = float(np.mean(np.abs(gated_gap(p_metal, gap) - band_gap[val])))
            if mae < best[0]:
                best = (mae, {k: v.clone() for k, v in model.state_dict().items()})
        model.load_state_dict(best[1])
    return head.eval()


def fold_readings(features: np.ndarray, atoms: Sequence[np.ndarray], band_gap: np.ndarray, split: np.ndarray,
                  held_out: np.ndarray, config: HeadConfig, epochs: int, recipe: dict) -> tuple[np.ndarray, ...]:
    """(P(metal), gap, gap variance among the networks) of the held-out rows, read by a head trained
    without them."""
    torch.set_num_threads(1)  # also in a worker process
    head = train_head(features, atoms, band_gap, np.where(held_out, "held_out", split), config, epochs, **recipe)
    p, gap = head.predict(features[held_out], [atoms[i] for i in np.nonzero(held_out)[0]])
    return p.mean(axis=1), gap.mean(axis=1), gap.var(axis=1)


def out_of_fold_readings(features: np.ndarray, atoms: Sequence[np.ndarray], band_gap: np.ndarray, split: np.ndarray,
                         groups: np.ndarray, config: HeadConfig, epochs: int, folds: int = 5, workers: int = 1,
                         **recipe) -> tuple[np.ndarray, ...]:
    """(P(metal), gap, gap variance among the networks) of every train row, each read by a head
    trained on the other train rows (folds by formula, as the splits are: no polymorph of a row's
    formula helps read it); NaN for the other rows. `recipe`: train_head's weight / select, as
    shipped. `workers` > 1 trains that many folds at once, in processes of one thread each."""
    fold_of = np.full(len(split), -1)
    train_groups = np.unique(groups[split == "train"])
    order = np.random.default_rng(0).permutation(len(train_groups))
    fold_of_group = dict(zip(train_groups[order], np.arange(len(train_groups)) % folds))
    train = split == "train"
    fold_of[train] = [fold_of_group[g] for g in groups[train]]
    out = tuple(np.full(len(split), np.nan) for _ in range(3))
    jobs = [(features, atoms, band_gap, split, fold_of == fold, config, epochs, recipe) for fold in range(folds)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 \
            else contextlib.nullcontext() as pool:
        results = pool.map(fold_readings, *zip(*jobs)) if pool else (fold_readings(*job) for job in jobs)
        for fold, readings in enumerate(results):
            held_out = fold_of == fold
            for column, values in zip(out, readings):
                column[held_out] = values
            print(f"out-of-fold readings: fold {fold + 1}/{folds} ({int(held_out.sum())} rows)", flush=True)
    return out


def interval_score(error: np.ndarray, spread: np.ndarray, level: float = TARGET_COVERAGE) -> float:
    """Mean interval score of [reading ± spread] at `level` (Gneiting & Raftery 2007): width plus a
    penalty for misses; lower is better, and it rewards narrow bands only where they still hold."""
    alpha = 1 - level
    return float(np.mean(2 * spread + 2 / alpha * np.clip(np.abs(error) - spread, 0, None)))


def calibrate(config: EnsembleConfig, p_metal: np.ndarray, gap: np.ndarray, gap_var: np.ndarray, y: np.ndarray,
              scale_rows: np.ndarray | None = None) -> tuple[EnsembleConfig, dict]:
    """The spread model (sigma_relative, sigma_floor) with the best interval score on these rows, its
    scale fitted so that ±1 covers 68 % of the rows read as non-metals among `scale_rows` (None:
    all; calibration.py says why only those)."""
    best = None
    chosen_rows = np.ones(len(y), bool) if scale_rows is None else scale_rows
    for relative, floor in itertools.product(SIGMA_RELATIVE, SIGMA_FLOOR):
        trial = replace(config, spread="mixture", sigma_relative=relative, sigma_floor=floor, scale=1.0)
        mean, spread, _, _ = combine(p_metal, gap, trial, gap_var)
        gapped = mean > 0
        fitted = gapped & chosen_rows
        trial.scale = fit_scale(mean[fitted] - y[fitted], spread[fitted])
        score = interval_score(mean - y, trial.scale * spread)
        if best is None or score < best[0]:
            best = (score, trial, mean - y, trial.scale * spread, gapped)
    score, chosen, error, spread, gapped = best
    return chosen, {"interval_score": round(score, 4), "coverage_1": coverage(error, spread),
                    "coverage_2": coverage(error, spread, 2),
                    "coverage_1_read_nonmetal": coverage(error[gapped], spread[gapped]),
                    "n_scale_rows": int((gapped & chosen_rows).sum())}


def select(heads: dict[str, tuple[np.ndarray, ...]], shipped: dict[str, tuple[np.ndarray, ...]], y: np.ndarray,
           wbm: np.ndarray) -> tuple[tuple[str, list[str]], list[dict]]:
    """Each head variant alone and with the shipped readings, scored on the WBM rows of val; best R² wins."""
    table = []
    for variant, head in heads.items():
        for size in range(len(shipped) + 1):
            for extra in itertools.combinations(shipped, size):
                readings = [head, *(shipped[m] for m in extra)]
                p = np.mean([r[0] for r in readings], axis=0)
                gap = gated_gap(p, np.mean([r[1] for r in readings], axis=0))
                table.append({"head": variant, "members": ["head", *extra], **gap_metrics(y[wbm], gap[wbm], p[wbm])})
    best = max(table, key=lambda row: row["r2"])
    return (best["head"], best["members"]), table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the CHGNet gap head and calibrate the ensemble.")
    parser.add_argument("--dataset", type=Path, default=cache_dir() / "dataset.parquet")
    parser.add_argument("--out", type=Path, default=SURROGATE_DIR)
    parser.add_argument("--chgnet-cache", type=Path, default=cache_dir() / CACHE_FILE)
    parser.add_argument("--features-cache", type=Path, default=cache_dir() / "surrogate_features.npz")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--wbm-weight", type=float, default=1.0, help="loss weight of WBM (hypothetical) train rows")
    parser.add_argument("--select-on", choices=["val", "val_wbm"], default="val",
                        help="val rows that choose each model's epoch")
    parser.add_argument("--calibrate-on", choices=["val", "val_wbm", "oof_wbm"], default="oof_wbm",
                        help="rows whose non-metal readings fit the scale of the ±: val rows, val WBM rows, or "
                             "val WBM rows and WBM train rows read out of fold")
    parser.add_argument("--calibrate-only", action="store_true", help="only recalibrate the head in --out")
    parser.add_argument("--variants", default="chgnet",
                        help="comma list of head inputs to train and choose among: chgnet, chgnet+descriptors")
    parser.add_argument("--workers", type=int, default=2, help="processes for the out-of-fold heads (one thread each)")
    parser.add_argument("--augment", type=int, default=0,
                        help="perturbed copies of each train row (random strain and atom jitter, the row's gap)")
    parser.add_argument("--strain", type=float, default=Perturbation.strain, help="--augment: strain standard deviation")
    parser.add_argument("--jitter", type=float, default=Perturbation.jitter, help="--augment: atom jitter (Å)")
    parser.add_argument("--finetune-from", type=Path, default=None,
                        help="start from the head in this folder (its networks and standardisation) instead of anew")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (e.g. 3e-4 with --finetune-from)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    table = band_gap_rows(args.dataset)
    if args.calibrate_only:
        recalibrate(table, args)
        return
    start = time.time()
    chgnet, atoms = cached_chgnet_features(table, args.chgnet_cache)
    variants = args.variants.split(",")
    if args.augment and variants != ["chgnet"]:
        raise SystemExit("--augment needs --variants chgnet (perturbed rows have no descriptors)")
    # the descriptors (a symmetry analysis per row) only where a variant reads them
    descriptors = cached_features(table, args.features_cache, workers=1) if variants != ["chgnet"] \
        else np.zeros((len(table), 0), np.float32)
    ok = ~np.isnan(chgnet).all(axis=1)
    if descriptors.shape[1]:  # (an all() over no columns would call every row failed)
        ok &= ~np.isnan(descriptors).all(axis=1)
    table, chgnet, descriptors = table[ok].reset_index(drop=True), chgnet[ok], descriptors[ok]
    atoms = [atoms[i] for i in np.nonzero(ok)[0]]
    if args.augment:
        table, chgnet, atoms = augmented(table, chgnet, atoms, args)
        descriptors = np.zeros((len(table), 0), np.float32)
    y, split, source = table.band_gap.to_numpy(float), table.split.to_numpy(str), table.source.to_numpy(str)
    log: dict = {"dataset": str(args.dataset), "rows": int(ok.sum()), "failed_rows": int((~ok).sum()),
                 "augment": {"copies": args.augment, "strain": args.strain, "jitter": args.jitter,
                             "rows": int(table.id.str.contains("~").sum())},
                 "wbm_weight": args.wbm_weight, "select_on": args.select_on,
                 "featurise_seconds": round(time.time() - start)}
    val = split == "val"
    wbm = source[val] == "wbm"
    trained, heads = {}, {}
    val_atoms = [atoms[i] for i in np.nonzero(val)[0]]
    for name in variants:
        matrix = head_inputs(name, chgnet, descriptors)
        start = time.time()
        start_from = load_head(args.finetune_from) if args.finetune_from else None
        config = start_from.config if start_from else HeadConfig(matrix.shape[1], ATOM_FEATURE_DIM,
                                                                 descriptors=name != "chgnet")
        trained[name] = train_head(matrix, atoms, y, split, config, args.epochs, start=start_from, lr=args.lr,
                                   **recipe(args, source))
        p, gap = trained[name].predict(matrix[val], val_atoms)
        heads[name] = (p.mean(axis=1), gap.mean(axis=1), gap.var(axis=1))
        reading = gated_gap(heads[name][0], heads[name][1])
        log[name] = {"train_seconds": round(time.time() - start),
                     "val_wbm": gap_metrics(y[val][wbm], reading[wbm], heads[name][0][wbm]),
                     "val_mp": gap_metrics(y[val][~wbm], reading[~wbm], heads[name][0][~wbm])}
        print(name, json.dumps(log[name]), flush=True)

    shipped = member_readings(table[val].reset_index(drop=True), args.out, ["gnn", "gbm"])
    (variant, members), log["candidates_val_wbm"] = select(heads, shipped, y[val], wbm)
    save_head(trained[variant], args.out)
    columns = member_columns({"head": heads[variant], **shipped}, members)
    config, log["calibration"] = calibrate_on_rows(args, members, columns, table, head_inputs(variant, chgnet, descriptors),
                                                   atoms, trained[variant].config)
    config.save(args.out)
    log["chosen"] = {"head": variant, "calibrate_on": args.calibrate_on, **config.__dict__}
    (args.out / "head_metrics.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({k: log[k] for k in ("candidates_val_wbm", "calibration", "chosen")}, indent=1))


def augmented(table: pd.DataFrame, chgnet: np.ndarray, atoms: list[np.ndarray], args: argparse.Namespace,
              ) -> tuple[pd.DataFrame, np.ndarray, list[np.ndarray]]:
    """The rows with `--augment` perturbed copies of each train row appended (split "train", the
    original's gap and source; ids "<id>~<k>"), their CHGNet features cached beside the others'."""
    train = table[table.split == "train"].reset_index(drop=True)
    copies = perturbed_rows(train, args.augment, Perturbation(args.strain, args.jitter))
    cache = args.chgnet_cache.with_name(f"chgnet_perturbed_s{args.strain:g}_j{args.jitter:g}.npz")
    extra, extra_atoms = cached_chgnet_features(copies, cache)
    ok = ~np.isnan(extra).all(axis=1)
    return (pd.concat([table, copies[ok]], ignore_index=True), np.vstack([chgnet, extra[ok]]),
            atoms + [extra_atoms[i] for i in np.nonzero(ok)[0]])


def head_inputs(variant: str, chgnet: np.ndarray, descriptors: np.ndarray) -> np.ndarray:
    """The head's crystal-level inputs of a --variants name."""
    if variant not in ("chgnet", "chgnet+descriptors"):
        raise SystemExit(f"unknown head variant {variant!r}: chgnet or chgnet+descriptors")
    return chgnet if variant == "chgnet" else np.hstack([chgnet, descriptors])


def recipe(args: argparse.Namespace, source: np.ndarray) -> dict:
    """train_head's row weights and epoch-choosing rows from --wbm-weight / --select-on."""
    return {"weight": np.where(source == "wbm", args.wbm_weight, 1.0),
            "select": source == "wbm" if args.select_on == "val_wbm" else None}


def calibrate_on_rows(args: argparse.Namespace, members: list[str], val_columns: list[np.ndarray], table: pd.DataFrame,
                      features: np.ndarray, atoms: Sequence[np.ndarray], head_config: HeadConfig,
                      ) -> tuple[EnsembleConfig, dict]:
    """Step 4: the spread model and scale, fitted on the rows `--calibrate-on` names. `val_columns`:
    the members' readings of the val rows of `table`; `features`, `atoms`: the head's inputs for every row.
    Out-of-fold readings exist for the head alone; with other members it falls back to val WBM rows."""
    y, split, source = table.band_gap.to_numpy(float), table.split.to_numpy(str), table.source.to_numpy(str)
    val = split == "val"
    columns, truth, on_wbm = list(val_columns), y[val], source[val] == "wbm"
    how, extra = args.calibrate_on, {}
    if how == "oof_wbm" and members != ["head"]:
        how = "val_wbm"
    if how == "oof_wbm":  # WBM rows only, for the interval score too: val, then train read out of fold
        groups = pd.read_parquet(args.dataset, columns=["id", "reduced_formula"]).set_index("id").reduced_formula
        origin = table.id.str.split("~").str[0]  # a perturbed copy is held out with its original
        oof = out_of_fold_readings(features, atoms, y, split, groups.loc[origin].to_numpy(str), head_config,
                                   args.epochs, workers=args.workers, **recipe(args, source))  # the shipped head's recipe
        original = (origin == table.id).to_numpy()  # scored and calibrated on the structures as given
        rows = (split == "train") & (source == "wbm") & original
        columns = [np.concatenate([column[on_wbm], reading[rows][:, None]]) for column, reading in zip(columns, oof)]
        truth = np.concatenate([truth[on_wbm], y[rows]])
        on_wbm = np.ones(len(truth), bool)
        # the head's own errors on the train rows read out of fold: the larger held-out set
        extra["out_of_fold_train"] = {
            kind: gap_metrics(y[part], gated_gap(oof[0][part], oof[1][part]), oof[0][part])
            for kind, part in (("wbm", rows), ("mp", (split == "train") & (source != "wbm") & original))}
    ok = np.isfinite(columns[1]).all(axis=1)
    config, log = calibrate(EnsembleConfig(members), *(c[ok] for c in columns), truth[ok],
                            None if how == "val" else on_wbm[ok])
    return config, {"rows": how, "n": int(ok.sum()), **log, **extra}


def recalibrate(table: pd.DataFrame, args: argparse.Namespace) -> None:
    """Step 4 alone for the shipped members in args.out (features from the caches), saved to the
    ensemble config and head_metrics.json."""
    chgnet, atoms = cached_chgnet_features(table, args.chgnet_cache)
    ok = ~np.isnan(chgnet).all(axis=1)
    table, chgnet, atoms = table[ok].reset_index(drop=True), chgnet[ok], [atoms[i] for i in np.nonzero(ok)[0]]
    head_config = load_head(args.out).config
    features = np.hstack([chgnet, cached_features(table, args.features_cache, workers=1)]) \
        if head_config.descriptors else chgnet
    val = table[table.split == "val"].reset_index(drop=True)
    members = EnsembleConfig.load(args.out).members
    chgnet_val = [ChgnetFeatures(chgnet[i], atoms[i]) for i in np.nonzero((table.split == "val").to_numpy())[0]]
    columns = member_columns(member_readings(val, args.out, members, chgnet_val), members)
    config, calibration = calibrate_on_rows(args, members, columns, table, features, atoms, head_config)
    config.save(args.out)
    metrics_file = args.out / "head_metrics.json"
    log = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    log.pop("calibration_val", None)
    log["calibration"] = calibration
    log["chosen"] = {**log.get("chosen", {}), "calibrate_on": args.calibrate_on, **config.__dict__}
    metrics_file.write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({"calibration": calibration, "chosen": log["chosen"]}, indent=1))


if __name__ == "__main__":
    main()
