"""Our band-gap readings of the published CrystaLLM-pi generations against the published ALIGNN reading.

    OMP_NUM_THREADS=1 nice -n 15 python scripts/measure_generated_gap.py \
        [--models crystallm_core/assets/surrogates] [--models OTHER_DIR ...] [--out generated_gap.json]

Rows: `extra/crystallm_pi_generated_dev.csv.gz` (2,000 generations, structures as written, not
relaxed) that are valid by their checker (`is_valid`) and by ours (`check_cif_isolated`), split
by a fixed seed into a calibration half and a held-out half (`generated_gap.split_halves`).
For each model folder: the shipped ensemble's reading, and each member's own (the head; the v1
graph network and LightGBM when their files are there), as Spearman and MAE against ALIGNN with
bootstrap 95 % intervals, on the held-out half and on all valid rows, and on the held-out rows whose
composition has an ionic reading (`charge_balanced`); then each reading of the later folders minus
the first folder's reading (paired intervals). With --balance-check it also counts, in the DFT
labels of MP-20 and WBM, how often compositions with an anion but no charge-balanced oxidation states
are metals (what ALIGNN, which cannot count electrons, reads on such generations is the yardstick's
own blind spot: model card). Our checks and the CHGNet
features are cached in cache_dir()/generated_gap/, so a second run only reads.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pymatgen.core import Composition

from crystallm_core.chem.data.data_prep import read_csvs
from crystallm_core.chem.data.hull import FORMULA_SUM
from crystallm_core.chem.judges.chgnet_features import ChgnetFeatures
from crystallm_core.chem.judges.isolation import check_cif_isolated
from crystallm_core.chem.judges.surrogates.chgnet_cache import cached_features
from crystallm_core.chem.judges.surrogates.ensemble import V1_CONFIG, EnsembleConfig, combine, member_columns
from crystallm_core.chem.judges.surrogates.generated_gap import (
    HELD_OUT,
    agreement,
    paired_difference,
    split_halves,
)
from crystallm_core.chem.judges.surrogates.report import member_readings
from crystallm_core.chem.judges.surrogates.scoring import gated_gap, is_metal
from crystallm_core.paths import SURROGATE_DIR, cache_dir, data_dir

GENERATED_FILE = "extra/crystallm_pi_generated_dev.csv.gz"
ANIONS = {"H", "N", "P", "As", "O", "S", "Se", "Te", "F", "Cl", "Br", "I"}
BALANCE_KINDS = ("balanced", "not balanced", "other")  # what `charge_balanced` returns


def formula_of(cif: str) -> str:
    """The CIF's _chemical_formula_sum (what the model wrote; no parsing of the structure)."""
    found = FORMULA_SUM.search(cif)
    return found.group(1).strip() if found else ""


def charge_balanced(formula: str) -> str:
    """'balanced' (pymatgen finds common oxidation states summing to zero), 'not balanced' (a
    compound with an anion where none do: DFT reads most such compositions as metals), or 'other'
    (no anion, or one element: metals and intermetallics, where balance says nothing)."""
    try:
        composition = Composition(formula)
        if len(composition) < 2:
            return "other"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if composition.oxi_state_guesses(max_sites=-50):
                return "balanced"
    except Exception:
        return "other"
    return "not balanced" if {element.symbol for element in composition} & ANIONS else "other"


def balance_check(data: Path) -> dict:
    """In the DFT labels of MP-20 and WBM: per balance kind, rows, the share of metals (gap 0) and of
    gaps over 1 eV."""
    mp = read_csvs(data / "mp20").drop_duplicates("material_id")
    wbm = pd.read_csv(data / "wbm/wbm_val_dev.csv.gz")
    out = {}
    for name, formulas, gap in (("mp20", mp.pretty_formula, mp.band_gap), ("wbm", wbm.cif.map(formula_of), wbm.band_gap)):
        kind = formulas.map(charge_balanced).to_numpy()
        gap = gap.to_numpy(float)
        out[name] = {k: {"n": int((kind == k).sum()), "metal_share": round(float(is_metal(gap[kind == k]).mean()), 3),
                         "gap_over_1_share": round(float((gap[kind == k] > 1).mean()), 3)}
                     for k in BALANCE_KINDS}
    return out


def cif_key(cif: str) -> str:
    """A row's cache key: the file's ids repeat (one per prompt, across targets), its CIFs do not."""
    return hashlib.sha1(cif.encode()).hexdigest()[:16]


def our_validity(table: pd.DataFrame, cache: Path) -> pd.Series:
    """Our checker's verdict per row (column key; cached: the bond check takes minutes on 2,000 CIFs)."""
    known = pd.read_csv(cache).set_index("key").valid if cache.exists() else pd.Series(dtype=bool)
    todo = table[~table.key.isin(known.index)]
    if len(todo):
        verdicts = pd.Series([check_cif_isolated(cif).valid for cif in todo.cif], index=todo.key.to_numpy())
        known = pd.concat([known, verdicts])
        cache.parent.mkdir(parents=True, exist_ok=True)
        known.rename("valid").rename_axis("key").reset_index().to_csv(cache, index=False)
    return known.loc[table.key].astype(bool)


def model_readings(table: pd.DataFrame, model_dir: Path, chgnet: list[ChgnetFeatures]) -> dict[str, np.ndarray]:
    """'ensemble' (as shipped in model_dir) and each loadable member's own gated reading, per row."""
    config = EnsembleConfig.load(model_dir)
    members = list(dict.fromkeys(config.members + [m for m, f in (("gnn", "gnn.safetensors"),
                                                                    ("gbm", "gbm_regressor.txt"))
                                                   if (model_dir / f).is_file()]))
    readings = member_readings(table, model_dir, members, chgnet)
    out = {}
    ensembles = {"ensemble": config, "v1": V1_CONFIG}  # v1: the ensemble shipped before the head
    for name, ensemble in ensembles.items():
        if set(ensemble.members) <= set(readings):
            p_metal, gap, gap_var = member_columns(readings, ensemble.members)
            out[name] = combine(p_metal, gap, ensemble, gap_var, ensemble.unrelaxed(chgnet))[0]
    out.update({member: gated_gap(p, gap) for member, (p, gap, _) in readings.items()})
    out["unrelaxed"] = config.unrelaxed(chgnet).astype(float)
    for suffix, column in (("p_metal", 0), ("gap", 1), ("gap_var", 2)):
        out.update({f"{member}_{suffix}": values[column] for member, values in readings.items()})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data_dir() / GENERATED_FILE)
    parser.add_argument("--models", type=Path, action="append", default=None,
                        help="surrogate folder(s); the first is the baseline (default: the shipped one)")
    parser.add_argument("--cache", type=Path, default=cache_dir() / "generated_gap")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration / held-out split")
    parser.add_argument("--readings", type=Path, default=None, help="write every row's readings here (CSV)")
    parser.add_argument("--out", type=Path, default=None, help="write the metrics JSON here")
    parser.add_argument("--balance-check", action="store_true",
                        help="also count metals among charge-balanced / not balanced compositions in MP-20 and WBM")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not args.data.is_file():
        raise SystemExit(f"no generated structures at {args.data} (the shared data folder: see its README)")
    models = args.models or [SURROGATE_DIR]

    table = pd.read_csv(args.data)
    table["key"] = [cif_key(cif) for cif in table.cif]
    table["half"] = split_halves(table.target_band_gap.to_numpy(), args.seed)
    theirs = table[table.is_valid & table.alignn_band_gap.notna()].reset_index(drop=True)
    ours = our_validity(theirs, args.cache / "validity.csv").to_numpy()
    rows = theirs[ours].reset_index(drop=True)
    features = cached_features(rows[["key", "cif"]].rename(columns={"key": "id"}),
                               args.cache / "chgnet_features.npz", verbose=False)
    read = np.array([not np.isnan(f.crystal).all() for f in features])
    rows = rows[read].reset_index(drop=True)
    chgnet = [f for f, ok in zip(features, read) if ok]
    summary: dict = {"data": str(args.data), "rows": len(table), "valid_theirs": len(theirs),
                     "valid_both": int(ours.sum()), "chgnet_failed": int((~read).sum()),
                     "held_out": int((rows.half == HELD_OUT).sum()), "seed": args.seed, "readings": {}}
    columns = {}
    for index, model_dir in enumerate(models):
        for name, values in model_readings(rows, model_dir, chgnet).items():
            columns[f"{index}:{name}"] = values
    alignn = rows.alignn_band_gap.to_numpy(float)
    held_out = (rows.half == HELD_OUT).to_numpy()
    balance = rows.cif.map(formula_of).map(charge_balanced).to_numpy()
    summary["balance_kinds"] = {k: int((balance == k).sum()) for k in BALANCE_KINDS}
    summary["alignn_over_1_share"] = {k: round(float((alignn[balance == k] > 1).mean()), 3)
                                      for k in BALANCE_KINDS if (balance == k).any()}
    baseline = columns["0:ensemble"]
    for name, values in columns.items():
        if name.endswith("unrelaxed"):  # the share of rows the gate reads as unrelaxed
            summary[name.replace("unrelaxed", "unrelaxed_share")] = round(float(np.mean(values)), 4)
            continue
        if name.endswith(("_p_metal", "_gap", "_gap_var")):
            continue
        ok = np.isfinite(values)
        kept = ok & held_out & (balance != "not balanced")
        summary["readings"][name] = {"held_out": agreement(values[ok & held_out], alignn[ok & held_out]),
                                     "all": agreement(values[ok], alignn[ok]),
                                     "held_out_without_not_balanced": agreement(values[kept], alignn[kept])}
        if name != "0:ensemble":
            both = ok & held_out & np.isfinite(baseline)
            summary["readings"][name]["held_out_vs_baseline"] = paired_difference(values[both], baseline[both],
                                                                                  alignn[both])
        print(f"{name:22}", json.dumps(summary["readings"][name]), flush=True)
    if args.balance_check:
        summary["dft_balance_check"] = balance_check(data_dir())
        print(json.dumps(summary["dft_balance_check"]), flush=True)
    if args.readings:
        pd.DataFrame({"id": rows.id, "key": rows.key, "half": rows.half, "target": rows.target_band_gap, "alignn": alignn,
                      "balance": balance, **columns}).to_csv(args.readings, index=False)
    if args.out:
        args.out.write_text(json.dumps({**summary, "models": [str(m) for m in models]}, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
