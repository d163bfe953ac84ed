"""Fine-tuning on a chemical family the shipped model saw little of: beryllium compounds.

The shipped model's training split holds 182 Be-containing structures (0.5 % of 34.5 K). The
LeMaterial sample in ../shared/data/extra (Alexandria, OQMD, JARVIS; never used in training)
holds ~1,100 Be compounds of ≤ 20 atoms. This script takes N of them whose reduced formula
appears nowhere in the project's own data (MP-20, MPTS-52, WBM), writes them as a user's CSV
(no properties: both "unknown"), fine-tunes the shipped model on them with
`product.finetune` (timed: conversion + training + writing), and compares the base and the
fine-tuned model:
  - validation loss (formula-disjoint rows of the family) before and after;
  - generation prompted with the element set of each validation formula (e.g. {Be, Ni, Zr}):
    share of the samples whose structure contains Be and contains all prompted elements,
    and the share valid;
  - generation with no prompt at all: share of the samples containing Be, and their formulas;
  - what it forgot: validation loss on the project's own validation rows (tokens.npz in
    the cache, when prepare-data has been run), base and fine-tuned.

    CRYSTALLM_CACHE_DIR=/path/to/cache nice -n 15 python scripts/measure_finetune.py --n 500 --minutes 20 \
        --out runs/finetune_be
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pymatgen.core import Composition

from crystallm_core.chem.data.hull import FORMULA_SUM
from crystallm_core.chem.data.splits import formula_hash
from crystallm_core.lm.checkpoints import load_model
from crystallm_core.lm.training import TokenData, TrainConfig, evaluate_loss
from crystallm_core.paths import cache_dir, data_dir
from crystallm_core.product.finetune import (
    FineTuneSettings,
    finetune,
    prepare_user_data,
)
from crystallm_core.product.generation import GenerationRequest, generate
from crystallm_core.product.service import SamplingSettings

def formula_of(cif: str) -> Composition:
    return Composition(FORMULA_SUM.search(cif).group(1))


def known_formulas(root: Path) -> set[str]:
    """Reduced formulas of every structure in the project's own training sources (all splits)."""
    formulas = set()
    for folder in ("mp20", "mpts52", "wbm"):
        for path in sorted((root / folder).glob("*.csv.gz")):
            formulas |= {formula_of(cif).reduced_formula for cif in pd.read_csv(path, usecols=["cif"])["cif"]}
    return formulas


def family_table(root: Path, element: str, n: int, seed: int) -> pd.DataFrame:
    extra = pd.read_csv(root / "extra" / "lemat_genbench_baseline.csv.gz")
    extra = extra[extra["source"] != "mp"]
    compositions = extra["cif"].map(formula_of)
    keep = compositions.map(lambda c: element in c.as_dict() and c.num_atoms <= 20)
    family = extra[keep].assign(reduced=compositions[keep].map(lambda c: c.reduced_formula))
    family = family[~family["reduced"].isin(known_formulas(root))].drop_duplicates("reduced")
    return family.sample(min(n, len(family)), random_state=seed)[["id", "source", "cif"]]


def generation_shares(model_dir, element_sets: list[list[str]], samples: int, element: str) -> dict:
    loaded = load_model(model_dir)
    settings = SamplingSettings()
    prompted = {"samples": 0, "parsed": 0, "valid": 0, "with_element": 0, "with_all_prompted": 0}
    for i, elements in enumerate(element_sets):
        run = generate(loaded, GenerationRequest(band_gap=None, e_hull=None, n=samples, elements=elements, seed=i,
                                                 settings=settings))
        for c in run.candidates:
            present = set(c.structure.composition.as_dict()) if c.structure is not None else set()
            prompted["samples"] += 1
            prompted["parsed"] += c.structure is not None
            prompted["valid"] += c.valid
            prompted["with_element"] += element in present
            prompted["with_all_prompted"] += set(elements) <= present
    free = generate(loaded, GenerationRequest(band_gap=None, e_hull=None, n=samples * 4, seed=99, settings=settings))
    unprompted = sum(c.structure is not None and element in c.structure.composition.as_dict() for c in free.candidates)
    shares = {k: round(v / prompted["samples"], 3) for k, v in prompted.items() if k != "samples"}
    return {"prompted": prompted, "prompted_shares": shares, "unprompted_samples": len(free.candidates),
            "unprompted_with_element": unprompted,
            "unprompted_formulas": Counter(c.formula for c in free.candidates).most_common(10)}


def general_val_loss(model_dir, tokens: Path, rows: int = 256) -> float:
    """Mean NLL per token on the first `rows` validation rows of the project's own token cache."""
    loaded = load_model(model_dir, dtype=torch.float32)
    data = TokenData(dict(np.load(tokens, allow_pickle=False)), 1, 371)
    return round(evaluate_loss(loaded.model, data, TrainConfig(batch_size=8, bf16=True), torch.device("cpu"), rows), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--element", default="Be")
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--sets", type=int, default=8, help="validation element sets to prompt with")
    parser.add_argument("--samples", type=int, default=8, help="samples per element set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_be"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    table = family_table(data_dir(), args.element, args.n, seed=0)
    csv = args.out / f"{args.element}_family.csv"
    table.to_csv(csv, index=False)
    print(f"{len(table)} {args.element} structures from {table['source'].value_counts().to_dict()}", flush=True)

    settings = FineTuneSettings(minutes=args.minutes, epochs=args.epochs)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    data = prepare_user_data(csv, 1024, settings=settings)
    prepared = time.perf_counter() - start
    result = finetune(csv, args.out / "model", None, settings=settings, data=data)
    wall = time.perf_counter() - start
    val = data.kept[data.kept["split"] == "val"]
    ordered = sorted(val["reduced_formula"].unique(), key=lambda f: formula_hash(f, 0))[: args.sets]
    element_sets = [sorted(Composition(f).as_dict()) for f in ordered]
    report = {
        "element": args.element, "rows": len(table), "kept": len(data.kept), "rejected": data.rejected_by_reason(),
        "train_rows": int((data.kept["split"] == "train").sum()), "val_rows": len(val),
        "threads": args.threads, "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "wall_s": round(wall, 1), "convert_s": round(prepared, 1),
        "train_s": result.seconds, "steps": result.steps, "best_step": result.best_step,
        "val_loss_before": result.val_loss_before, "val_loss_after": result.val_loss_after,
        "element_sets": element_sets, "samples_per_set": args.samples,
    }
    print(json.dumps(report, indent=1), flush=True)
    for name, model in (("base", None), ("finetuned", result.model_dir)):
        report[name] = generation_shares(model, element_sets, args.samples, args.element)
        print(name, json.dumps(report[name]), flush=True)
    tokens = cache_dir() / "tokens.npz"
    if tokens.is_file():
        report["own_val_loss"] = {"base": general_val_loss(None, tokens), "finetuned": general_val_loss(result.model_dir, tokens)}
        print("own validation rows", report["own_val_loss"], flush=True)
    (args.out / "measure.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
