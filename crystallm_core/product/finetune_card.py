"""The model card of a fine-tuned model: base model and its hash, a summary of the user's data
(counts, elements, property ranges — never the structures themselves), settings, the loss
curve and the validation loss before and after."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Composition

from crystallm_core.chem.data.data_prep import property_ranges, reason_kinds


def data_summary(kept: pd.DataFrame, rejected: pd.DataFrame, rows_in: int, name: str) -> dict:
    """What the card says about the data: counts, elements, property ranges, token lengths."""
    elements = Counter(e.symbol for formula in kept["reduced_formula"] for e in Composition(formula))
    by_split = kept["split"].value_counts()
    return {
        "file": name, "rows_in": rows_in, "rows_kept": len(kept),
        "rows_train": int(by_split.get("train", 0)), "rows_val": int(by_split.get("val", 0)),
        "formulas_train": int(kept.loc[kept["split"] == "train", "reduced_formula"].nunique()),
        "formulas_val": int(kept.loc[kept["split"] == "val", "reduced_formula"].nunique()),
        "rejected_by_reason": reason_kinds(rejected["reason"]).value_counts().to_dict(),
        "structures_with_element": dict(elements.most_common()),
        "properties": property_ranges(kept, ["band_gap", "e_hull"]),
        "tokens_median": int(np.median(kept["n_tokens"])), "tokens_max": int(kept["n_tokens"].max()),
    }


def number(value, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def card_text(metadata: dict, log: list[dict]) -> str:
    """MODEL_CARD.md of a fine-tuned model, from its metadata.json and training log."""
    ft, cfg = metadata["fine_tune"], metadata["train_config"]
    base, data, settings = ft["base_model"], ft["data"], ft["settings"]
    properties = "\n".join(
        f"| {name} | {data['rows_kept'] - p['missing']} | {number(p['min'])} | {number(p['median'])} | {number(p['max'])} |"
        for name, p in data["properties"].items())
    rejected = ", ".join(f"{reason}: {n}" for reason, n in data["rejected_by_reason"].items()) or "none"
    elements = ", ".join(f"{e} {n}" for e, n in data["structures_with_element"].items())
    curve = "\n".join(f"| {e['step']} | {number(e['train_loss'], 4)} | {number(e['val_loss'], 4)} | {e['elapsed_s']} |"
                      for e in log)
    change = ft["val_loss_after"] - ft["val_loss_before"]
    kept_base = ft["best_step"] == 0
    return f"""# {metadata['name']} — fine-tuned

Fine-tuned by `python -m crystallm_core finetune` (or the app's Fine-tune page) from
**{base['name']}** (`{base['source']}`, weights SHA-256 `{base['weights_sha256']}`; trained on:
{base['trained_on']}).

## Validation loss (nats per token, formula-disjoint validation rows)

| before | after | change |
|---|---|---|
| {ft['val_loss_before']:.4f} | {ft['val_loss_after']:.4f} | {change:+.4f} ({change / ft['val_loss_before']:+.1%}) |

Best at step {ft['best_step']} of {ft['steps']} ({ft['seconds']:.0f} s).{
" No step improved on the starting model, so these are its weights unchanged." if kept_base else ""}

## Data (summary only; no structure is copied here)

`{data['file']}`: {data['rows_in']} rows, **{data['rows_kept']} kept** ({data['rows_train']} training rows of
{data['formulas_train']} formulas, {data['rows_val']} validation rows of {data['formulas_val']} other formulas);
rejected: {rejected} (ids and reasons in `rejected.csv`). Tokens per CIF: median {data['tokens_median']},
max {data['tokens_max']}.

| property | rows with a value | min | median | max |
|---|---|---|---|---|
{properties}

A missing value is "unknown" to the model, as in training.

Structures per element: {elements}.

## Settings

Time budget {settings['minutes']:g} min, at most {settings['epochs']:g} epochs, peak learning rate
{settings['learning_rate']:g} (warm-up {cfg['warmup_steps']} steps, cosine to {cfg['min_lr_ratio']:g}×), batch
{settings['batch_size']}, early stop after {settings['patience']} evaluations without improvement (every
{cfg['eval_every']} steps), validation fraction {settings['val_fraction']:g}, seed {settings['seed']}, device
{cfg['device']}, bf16 {cfg['bf16']}, conditioning dropout {cfg['condition_dropout']}. Architecture as the base
model ({cfg['n_layer']} layers × {cfg['n_embd']}, context {cfg['context']} tokens).

## Loss curve (`training_log.json`)

| step | train loss | val loss | elapsed s |
|---|---|---|---|
{curve}

## Limitations

A few hundred structures teach the model a chemistry's patterns, not physics: check what it
writes (the app checks every structure) and compare with the base model on your own targets.
The validation loss is measured on formulas held out from this data, not on the base model's data.
"""


def write_card(model_dir: Path, metadata: dict, log: list[dict]) -> Path:
    path = Path(model_dir) / "MODEL_CARD.md"
    path.write_text(card_text(metadata, log))
    return path
