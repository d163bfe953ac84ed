"""`python -m crystallm_core finetune DATA --out DIR`: fine-tune a model on the user's own structures.

DATA is a CSV / Parquet table with a CIF column (or a column of CIF file paths) and optional
band-gap / E_hull columns, or a folder of .cif files with an optional labels table
(`chem.data.user_data`). Rows are converted by prepare-data's own code (`data_prep.convert_rows`);
rejected rows are reported with their reasons. The kept rows get a formula-disjoint validation
split; training (`lm.training.train`) starts from the shipped model (or --from) with a small
learning rate, evaluates the starting model first, stops early when the validation loss stops
falling and at the time budget, and keeps the best model. DIR becomes a model directory like
any other, with MODEL_CARD.md (`finetune_card`) and rejected.csv (ids and reasons only).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from crystallm_core.chem.data.data_prep import (
    PrepConfig,
    build_dataset,
    convert_rows,
    reason_kinds,
    token_arrays,
)
from crystallm_core.chem.data.splits import DEFAULT_SEED, validation_split
from crystallm_core.chem.data.user_data import ColumnMap, user_rows
from crystallm_core.lm.checkpoints import (
    inference_dtype,
    read_config,
    resolve_model_dir,
    weights_sha256,
)
from crystallm_core.lm.training import TrainConfig, train
from crystallm_core.product.finetune_card import data_summary, write_card


@dataclass
class FineTuneSettings:
    minutes: float = 10.0  # time budget for training (the starting model's evaluation included)
    epochs: float = 3.0  # the most passes over the training rows
    learning_rate: float = 1e-4  # peak; the shipped model was trained at 4e-4 to 8e-4
    batch_size: int = 8
    val_fraction: float = 0.15  # of the rows, by whole formulas
    patience: int = 3  # evaluations without improvement before stopping
    evals_per_epoch: int = 2
    seed: int = DEFAULT_SEED
    device: str = "auto"  # "cuda" when there is one

    def validate(self) -> None:
        checks = {"minutes": self.minutes > 0, "epochs": self.epochs > 0, "learning rate": 0 < self.learning_rate < 1,
                  "batch size": self.batch_size >= 1, "validation fraction": 0 < self.val_fraction < 0.5,
                  "patience": self.patience >= 1, "evaluations per epoch": self.evals_per_epoch >= 1}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid fine-tuning settings: {', '.join(bad)} (minutes, epochs and learning rate "
                             "> 0, validation fraction below 0.5)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got '{self.device}'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for, but this machine has no usable GPU (use auto or cpu)")


@dataclass
class UserData:
    """The user's rows after conversion: kept rows (with split), their tokens, and every rejection."""

    name: str
    rows_in: int
    kept: pd.DataFrame
    tokens: list
    rejected: pd.DataFrame

    def rejected_by_reason(self) -> dict[str, int]:
        return reason_kinds(self.rejected["reason"]).value_counts().to_dict()


@dataclass
class FineTuneResult:
    model_dir: Path
    val_loss_before: float
    val_loss_after: float
    best_step: int
    steps: int
    seconds: float
    data: dict = field(default_factory=dict)


def prepare_user_data(source: Path, max_tokens: int, columns: ColumnMap | None = None, labels: Path | None = None,
                      settings: FineTuneSettings | None = None) -> UserData:
    """Read, convert and split the user's data; ValueError when too little of it is usable."""
    settings = settings or FineTuneSettings()
    rows, early = user_rows(Path(source), columns, labels)
    results = convert_rows(rows, max_tokens) if len(rows) else []
    kept, tokens, rejected = build_dataset(
        rows, results, PrepConfig(data_dir=Path(source), out=Path(source), seed=settings.seed),
        assign_splits=lambda formulas: validation_split(list(formulas), settings.val_fraction, settings.seed))
    data = UserData(Path(source).name, len(rows) + len(early), kept, tokens,
                    pd.concat([early, rejected], ignore_index=True))
    if kept.empty:
        raise ValueError(f"none of the {data.rows_in} rows can be used: {data.rejected_by_reason()}")
    if kept["reduced_formula"].nunique() < 2:
        raise ValueError("fine-tuning needs structures of at least two formulas (validation uses formulas "
                         "never trained on)")
    return data


def train_config(base_dir: Path, work: Path, data: UserData, settings: FineTuneSettings, name: str) -> TrainConfig:
    """Training settings for fine-tuning `base_dir`: its architecture, a small learning rate, early stopping."""
    config, _ = read_config(base_dir)
    n_train = int((data.kept["split"] == "train").sum())
    steps_per_epoch = math.ceil(n_train / settings.batch_size)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if settings.device == "auto" else settings.device
    return TrainConfig(
        data=str(work / "tokens.npz"), out_dir=str(work), name=name,
        trained_on=f"fine-tuned on {len(data.kept)} user structures ({data.name})",
        n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, n_hidden_cond=config.n_hidden_cond,
        dropout=config.resid_pdrop, context=config.n_positions - 2,
        batch_size=settings.batch_size, learning_rate=settings.learning_rate,
        warmup_steps=min(10, steps_per_epoch), max_steps=max(1, math.ceil(settings.epochs * steps_per_epoch)),
        time_budget_s=settings.minutes * 60, eval_every=max(1, steps_per_epoch // settings.evals_per_epoch),
        eval_rows=len(data.kept), patience=settings.patience, checkpoint_every=10**9, log_every=10,
        seed=settings.seed, init_from=str(base_dir), device=device,
        bf16=device == "cuda" or inference_dtype(device) == torch.bfloat16,
    )


def empty_output(out: Path) -> Path:
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder: choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def finetune(source: Path, out: Path, base: str | Path | None = None, columns: ColumnMap | None = None,
             labels: Path | None = None, settings: FineTuneSettings | None = None,
             on_progress: Callable[[dict], None] | None = None,
             should_stop: Callable[[], bool] | None = None, data: UserData | None = None) -> FineTuneResult | None:
    """Fine-tune and write the model directory `out`; None when `should_stop` ended it (nothing written)."""
    settings = settings or FineTuneSettings()
    settings.validate()
    out = empty_output(out)
    base_dir = resolve_model_dir(base)
    config, published = read_config(base_dir)
    if published:
        raise ValueError("fine-tuning starts from a CrystaLLM Studio model; published CrystaLLM-pi checkpoints "
                         "(no 'unknown property' embedding) are not supported")
    data = data or prepare_user_data(Path(source), config.n_positions - 2, columns, labels, settings)
    base_meta = json.loads((base_dir / "metadata.json").read_text()) if (base_dir / "metadata.json").is_file() else {}
    base_info = {"name": base_meta.get("name", base_dir.name), "source": str(base_dir),
                 "weights_sha256": weights_sha256(base_dir), "trained_on": base_meta.get("trained_on", "unknown")}
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-finetune-", dir=out.parent))
    try:
        np.savez(work / "tokens.npz", **token_arrays(data.kept, data.tokens))
        cfg = train_config(base_dir, work, data, settings, name=f"{base_info['name']}+{out.name}")
        cfg.trained_on += f"; base {base_info['name']} ({base_info['trained_on']})"
        model_dir = train(cfg, resume=False, on_progress=on_progress, should_stop=should_stop)
        if model_dir is None:
            return None
        if out.exists():
            out.rmdir()
        shutil.move(str(model_dir), str(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return finish(out, data, base_info, settings)


def finish(out: Path, data: UserData, base_info: dict, settings: FineTuneSettings) -> FineTuneResult:
    """Add the fine-tune record to metadata.json, write the card and rejected.csv; the result."""
    metadata = json.loads((out / "metadata.json").read_text())
    log = json.loads((out / "training_log.json").read_text())
    summary = data_summary(data.kept, data.rejected, data.rows_in, data.name)
    record = {"base_model": base_info, "data": summary, "settings": asdict(settings),
              "val_loss_before": log[0]["val_loss"], "val_loss_after": metadata["best_val_loss"],
              "best_step": metadata["best_step"], "steps": metadata["steps"],
              "seconds": metadata["train_seconds"]}
    metadata["fine_tune"] = record
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2))
    data.rejected[["id", "reason"]].to_csv(out / "rejected.csv", index=False)
    write_card(out, metadata, log)
    return FineTuneResult(out, record["val_loss_before"], record["val_loss_after"], record["best_step"],
                          record["steps"], record["seconds"], summary)


# ---- command line --------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="CSV/Parquet table, or a folder of .cif files")
    parser.add_argument("--out", type=Path, required=True, help="new model directory to write")
    parser.add_argument("--from", dest="base", default=None, help="model to start from (default: the shipped one)")
    parser.add_argument("--minutes", type=float, default=FineTuneSettings.minutes, help="time budget")
    parser.add_argument("--epochs", type=float, default=FineTuneSettings.epochs, help="most passes over the data")
    parser.add_argument("--learning-rate", type=float, default=FineTuneSettings.learning_rate)
    parser.add_argument("--batch-size", type=int, default=FineTuneSettings.batch_size)
    parser.add_argument("--val-fraction", type=float, default=FineTuneSettings.val_fraction)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    parser.add_argument("--cif-column", help="column with CIF text (default: cif)")
    parser.add_argument("--path-column", help="column with CIF file paths, relative to the table (default: path)")
    parser.add_argument("--band-gap-column", help="band gap in eV (default: band_gap; empty = unknown)")
    parser.add_argument("--e-hull-column", help="energy above hull in eV/atom (default: e_hull; empty = unknown)")
    parser.add_argument("--id-column", help="row ids, or in --labels the CIF file names (default: id)")
    parser.add_argument("--labels", type=Path, help="labels table for a folder of CIFs")


def run(args: argparse.Namespace) -> int:
    if not args.data.exists():
        raise ValueError(f"{args.data} does not exist")
    settings = FineTuneSettings(minutes=args.minutes, epochs=args.epochs, learning_rate=args.learning_rate,
                                batch_size=args.batch_size, val_fraction=args.val_fraction, seed=args.seed,
                                device=args.device)
    settings.validate()
    empty_output(args.out)
    columns = ColumnMap(args.cif_column, args.path_column, args.band_gap_column, args.e_hull_column, args.id_column)
    base_dir = resolve_model_dir(args.base)
    config, _ = read_config(base_dir)
    data = prepare_user_data(args.data, config.n_positions - 2, columns, args.labels, settings)
    print(f"{data.rows_in} rows: {len(data.kept)} kept "
          f"({(data.kept['split'] == 'train').sum()} train / {(data.kept['split'] == 'val').sum()} validation), "
          f"{len(data.rejected)} rejected", flush=True)
    for reason, count in data.rejected_by_reason().items():
        print(f"  rejected {count}: {reason}", flush=True)
    for _, row in data.rejected.head(10).iterrows():
        print(f"    {row['id']}: {row['reason']}", flush=True)
    with tqdm(desc="fine-tuning", unit="step") as bar:
        def advanced(progress: dict) -> None:
            bar.total = progress["max_steps"]
            bar.update(progress["step"] - bar.n)
            val = progress.get("val_loss")
            bar.set_postfix_str(f"loss {progress['loss']:.3f}" + (f", validation {val:.3f}" if val is not None else ""))

        result = finetune(args.data, args.out, base_dir, settings=settings, data=data, on_progress=advanced)
    print(f"validation loss {result.val_loss_before:.4f} → {result.val_loss_after:.4f} (best step {result.best_step} "
          f"of {result.steps}, {result.seconds:.0f} s); model written to {result.model_dir}")
    return 0
