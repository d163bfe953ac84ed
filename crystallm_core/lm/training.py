"""`python -m crystallm_core train --config cfg.json`: train a PKV model from the token cache.

Reads only `tokens.npz` (made by prepare-data), so it runs where pymatgen is absent (a GPU box).
Every row is one structure with its own condition vector. Batches are length-bucketed and
packed (`PackedBatch`): the linear layers, MLPs and LM head compute on real tokens only, and
attention runs through the fused `scaled_dot_product_attention` kernels (`packed_sequence_loss`).
`training_step` is the one step that pre-training, `finetune` and `align` share: bf16 autocast
only where the hardware computes bf16 (a GPU, a CPU with AVX512-BF16 or AMX; emulated bf16 on
an AVX2 CPU was 14× slower than fp32), fp32 master weights, fused AdamW, and no host
synchronisation inside the step. Conditioning dropout replaces each property by "unknown" with
probability `condition_dropout`, which trains the missing-property path and the unconditional
model for classifier-free guidance.

Reproducible: the data order and all dropout randomness derive from (seed, step), so a run
resumed from `resume/` continues exactly as if it had not stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from crystallm_core.lm.checkpoints import inference_dtype, load_model_weights, save_model
from crystallm_core.lm.conditions import (
    BAND_GAP_EXPONENT,
    BAND_GAP_MAX,
    E_HULL_MAX,
    denormalise_band_gap,
    denormalise_e_hull,
    normalise_e_hull,
)
from crystallm_core.lm.model import CrystaLLMPKV, PKVConfig, count_parameters
from crystallm_core.lm.packed_batch import PackedBatch


HIGH_E_HULL = 0.1  # eV/atom: "not on the hull" for E_hull-balanced batches


@dataclass
class TrainConfig:
    data: str = "data/cache/tokens.npz"
    out_dir: str = "runs/train"
    name: str = "crystallm-studio-pkv"
    trained_on: str = "MP-20 + MPTS-52 + WBM (Materials Project data, CC-BY-4.0), formula-disjoint splits"
    # model
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    n_hidden_cond: int = 128  # the published 1024 makes to_kv 34M parameters for two scalars
    dropout: float = 0.1
    context: int = 1024  # CIF tokens incl. <bos>/<eos>; positions = context + prefix
    # optimisation
    batch_size: int = 32
    learning_rate: float = 6e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    warmup_steps: int = 200
    max_steps: int = 5000
    time_budget_s: float | None = None  # fits max_steps to the measured speed; a hard stop at the budget
    grad_clip: float = 1.0
    condition_dropout: float = 0.15
    balance_e_hull: bool = False  # rows with E_hull ≥ 0.1 eV/atom ≥ a third of each batch's labelled rows
    # bookkeeping
    eval_every: int = 250
    eval_rows: int = 1024
    patience: int = 8  # evaluations without improvement before stopping
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 1
    init_from: str | None = None  # model directory to start from (a continued run with a fresh schedule)
    device: str = "auto"
    bf16: bool = True  # where the hardware computes it natively (`uses_bf16`); fp32 elsewhere
    export_dtype: str = "bfloat16"  # shipped weights; loaders cast to the inference dtype

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        return cls(**raw)


class TokenData:
    """Sequences of one split from tokens.npz, served as padded, length-bucketed batches."""

    def __init__(self, npz: dict, split: int, pad_id: int):
        rows = np.flatnonzero(npz["split"] == split)
        self.tokens, self.offsets, self.pad_id = npz["tokens"], npz["offsets"], pad_id
        self.rows = rows
        self.lengths = (self.offsets[rows + 1] - self.offsets[rows]).astype(np.int64)
        self.conditions = npz["conditions"][rows].astype(np.float32)
        self.present = npz["present"][rows].astype(bool)

    def __len__(self) -> int:
        return len(self.rows)

    def sequence(self, pick: int) -> np.ndarray:
        row = self.rows[pick]
        return self.tokens[self.offsets[row] : self.offsets[row + 1]]

    def batch(self, picks: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Right-padded (ids, conditions, present, lengths): the reference step's layout."""
        length = int(self.lengths[picks].max())
        ids = np.full((len(picks), length), self.pad_id, dtype=np.int64)
        for i, pick in enumerate(picks):
            seq = self.sequence(pick)
            ids[i, : len(seq)] = seq
        return (torch.from_numpy(ids), torch.from_numpy(self.conditions[picks]),
                torch.from_numpy(self.present[picks]), torch.from_numpy(self.lengths[picks]))

    def packed(self, picks: np.ndarray, device: torch.device | str = "cpu") -> PackedBatch:
        """The same rows back to back (the fast step's layout)."""
        return PackedBatch.from_sequences([self.sequence(p) for p in picks], self.conditions[picks],
                                          self.present[picks], device)

    def high_hull(self) -> np.ndarray:
        """Rows whose E_hull label is at least HIGH_E_HULL."""
        return self.present[:, 1] & (self.conditions[:, 1] >= normalise_e_hull(HIGH_E_HULL))

    def epoch_batches(self, batch_size: int, seed: int, epoch: int, balance_e_hull: bool = False) -> list[np.ndarray]:
        """Shuffle, sort within windows of 50 batches by length, shuffle the batches.

        `balance_e_hull`: 85 % of the E_hull labels lie below 0.1 eV/atom, so the encoder hardly
        sees what a high target means. Each batch then gets rows with E_hull ≥ HIGH_E_HULL added
        (cycled, so they repeat within an epoch) until they are at least a third of its
        E_hull-labelled rows; every other row still comes once per epoch."""
        rng = np.random.default_rng([seed, epoch])
        high = self.high_hull() if balance_e_hull else np.zeros(len(self), dtype=bool)
        order = rng.permutation(np.flatnonzero(~high))
        extra = rng.permutation(np.flatnonzero(high))
        window = batch_size * 50
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += balanced_batches(chunk, batch_size, self.present[:, 1], extra, len(batches)) if len(extra) \
                else [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]


def balanced_batches(rows: np.ndarray, batch_size: int, labelled: np.ndarray, high: np.ndarray,
                     drawn: int) -> list[np.ndarray]:
    """Batches of `rows` (in order), each topped up from the cycled `high` rows so that they make
    at least a third of its labelled rows: h high rows balance L other labelled rows when 2h ≥ L."""
    batches, position, cursor = [], 0, drawn * batch_size
    while position < len(rows):
        take = others = 0
        while position + take < len(rows):
            with_next = others + int(labelled[rows[position + take]])
            if take + 1 + -(-with_next // 2) > batch_size:
                break
            take, others = take + 1, with_next
        take = max(take, 1)
        own = rows[position : position + take]
        n_high = -(-int(labelled[own].sum()) // 2)
        batches.append(np.concatenate([own, high[(cursor + np.arange(n_high)) % len(high)]]))
        position, cursor = position + take, cursor + n_high
    return batches


def learning_rate(step: int, cfg: TrainConfig, max_steps: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(cfg: TrainConfig) -> CrystaLLMPKV:
    config = PKVConfig(
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_hidden_cond=cfg.n_hidden_cond,
        n_positions=cfg.context + 2, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        cond_dropout=cfg.dropout,
    )
    return CrystaLLMPKV(config)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = True) -> torch.optim.AdamW:
    """Weight decay on matrices only (not biases, LayerNorms, embeddings of unknowns). `fused`:
    one kernel for every parameter's update (CPU and CUDA), instead of one loop per tensor."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "unknown_embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "unknown_embedding" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def native_bf16(device: torch.device) -> bool:
    """Does this device compute bf16 matrix products in hardware (else autocast only emulates it)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and inference_dtype(device) == torch.bfloat16  # the sampler's own test


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.bf16 and native_bf16(device)


def autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, device))


def condition_dropout(batch: PackedBatch, probability: float) -> PackedBatch:
    """Each property of each row becomes "unknown" with `probability` (uses the global RNG)."""
    if probability <= 0:
        return batch
    keep = torch.rand(batch.present.shape, device=batch.present.device) >= probability
    return batch.with_present(batch.present & keep)


def training_step(model: CrystaLLMPKV, optimizer: torch.optim.Optimizer, batch: PackedBatch, cfg: TrainConfig,
                  device: torch.device, weights: torch.Tensor | None = None) -> torch.Tensor:
    """One optimiser step on a packed batch; returns the mean NLL per token as a device tensor
    (read it only when logging: `.item()` waits for the device). `weights` (B,) scale each
    sequence's summed NLL (reward-weighted fine-tuning); the loss is still per token."""
    with autocast(cfg, device):
        nll, count = model.packed_sequence_loss(batch)
    loss = (nll if weights is None else nll * weights).sum() / count.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate_loss(model, data: TokenData, cfg: TrainConfig, device: torch.device, rows: int | None = None) -> float:
    """Mean NLL per predicted token (nats) over the first `rows` sequences of a split."""
    model.eval()
    picks = np.arange(min(len(data), rows or len(data)))
    picks = picks[np.argsort(data.lengths[picks], kind="stable")]
    total, count = 0.0, 0.0
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for start in range(0, len(picks), cfg.batch_size):
        chunk = picks[start : start + cfg.batch_size]
        with autocast(cfg, device):
            nll, _ = model.packed_sequence_loss(data.packed(chunk, device))
        total += nll.sum().double()
        count += int((data.lengths[chunk] - 1).sum())
    model.train()
    return float(total) / max(count, 1)


def save_resume(path: Path, model, optimizer, state: dict) -> None:
    """Resumable checkpoint in safetensors + JSON (no pickle)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(path / "model.safetensors"))
    opt_state = optimizer.state_dict()
    tensors = {f"{pid}.{key}": value for pid, entry in opt_state["state"].items() for key, value in entry.items()}
    save_file({k: v.reshape(-1).clone() if v.dim() == 0 else v for k, v in tensors.items()}, str(path / "optimizer.safetensors"))
    (path / "state.json").write_text(json.dumps(state))


def load_resume(path: Path, model, optimizer) -> dict:
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    model.tie_weights()
    opt_state = optimizer.state_dict()
    for key, value in load_file(str(path / "optimizer.safetensors")).items():
        pid, name = key.split(".", 1)
        opt_state["state"].setdefault(int(pid), {})[name] = value.reshape(()) if name == "step" else value
    optimizer.load_state_dict(opt_state)
    return json.loads((path / "state.json").read_text())


def histogram(values: np.ndarray, edges: np.ndarray) -> dict:
    counts, edges = np.histogram(values, bins=edges)
    return {"edges": edges.round(4).tolist(), "counts": counts.tolist()}


def data_stats(npz: dict) -> dict:
    """Histograms of the training split's targets (physical units), for the UI's density hints."""
    train = npz["split"] == 0
    gap = np.array([denormalise_band_gap(v) for v in npz["conditions"][train & npz["present"][:, 0], 0]])
    hull = np.array([denormalise_e_hull(v) for v in npz["conditions"][train & npz["present"][:, 1], 1]])
    return {"n_train": int(train.sum()), "n_band_gap": len(gap), "n_e_hull": len(hull),
            "band_gap_hist": histogram(gap, np.append(np.linspace(0, 12, 49), BAND_GAP_MAX)),  # last bin: 12 eV and up
            "e_hull_hist": histogram(hull, np.array([0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5.5]))}


def train(cfg: TrainConfig, resume: bool = True, stop_at_step: int | None = None,
          on_progress: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> Path | None:
    """Train and export the best model; `stop_at_step` saves a resume checkpoint there and returns None
    (as an interrupted run would leave it). A run from `init_from` is evaluated at step 0 first, and
    that model is the one to beat. `on_progress` gets {step, max_steps, loss, val_loss, elapsed_s}
    after every step; `should_stop()` true ends the run without exporting anything (returns None)."""
    torch.manual_seed(cfg.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    out = Path(cfg.out_dir)
    npz = dict(np.load(cfg.data, allow_pickle=False))
    lengths = np.diff(npz["offsets"])
    train_data, val_data = TokenData(npz, 0, 371), TokenData(npz, 1, 371)
    if int(lengths.max()) > cfg.context:
        raise ValueError(f"token cache holds sequences of {int(lengths.max())} tokens; the context is {cfg.context}")
    model = build_model(cfg)
    if cfg.init_from:
        model.load_state_dict(load_model_weights(cfg.init_from, dtype=torch.float32).state_dict())
    model = model.to(device)
    optimizer = make_optimizer(model, cfg)
    state = {"step": 0, "best_val": float("inf"), "best_step": -1, "bad_evals": 0, "max_steps": cfg.max_steps,
             "log": [], "elapsed_s": 0.0}
    if resume and (out / "resume" / "state.json").is_file():
        state = load_resume(out / "resume", model, optimizer)
        if not cfg.time_budget_s:
            state["max_steps"] = cfg.max_steps  # the config may extend an interrupted run
        print(f"resumed at step {state['step']}", flush=True)
    print(f"model {count_parameters(model):,} parameters on {device} ({'bf16' if uses_bf16(cfg, device) else 'fp32'}); "
          f"train {len(train_data)} / val {len(val_data)} rows", flush=True)

    epoch_plan = {0: train_data.epoch_batches(cfg.batch_size, cfg.seed, 0, cfg.balance_e_hull)}  # one epoch's at a time
    steps_per_epoch = len(epoch_plan[0])
    best_path = out / "resume" / "best.safetensors"
    best_state = load_file(str(best_path)) if resume and state["step"] and best_path.is_file() else None
    t0, tokens_seen = time.perf_counter() - state["elapsed_s"], 0
    step = first_step = state["step"]
    if cfg.init_from and step == 0:
        val = evaluate_loss(model, val_data, cfg, device, cfg.eval_rows)
        state["log"].append({"step": 0, "train_loss": None, "val_loss": round(val, 4), "elapsed_s": 0.0})
        state.update(best_val=val, best_step=0)
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        print(f"step 0 val_loss {val:.4f} (the starting model)", flush=True)
    timer_start = time.perf_counter()
    model.train()
    while step < state["max_steps"]:
        if should_stop is not None and should_stop():
            return None
        epoch, position = divmod(step, steps_per_epoch)
        if epoch not in epoch_plan:  # built once per epoch, not at every step
            epoch_plan = {epoch: train_data.epoch_batches(cfg.batch_size, cfg.seed, epoch, cfg.balance_e_hull)}
        batches = epoch_plan[epoch]
        picks = batches[position % len(batches)]  # balanced epochs may differ by a batch
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout + conditioning dropout, resumable
        batch = condition_dropout(train_data.packed(picks, device), cfg.condition_dropout)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg, state["max_steps"])
        loss = training_step(model, optimizer, batch, cfg, device)
        step += 1
        tokens_seen += int((train_data.lengths[picks] - 1).sum())  # from the host's lengths: no sync
        elapsed = time.perf_counter() - t0
        over_budget = bool(cfg.time_budget_s) and elapsed >= cfg.time_budget_s
        if cfg.time_budget_s:
            # Time steps from 10 on (after start-up and kernel warm-up) and fit max_steps to the budget;
            # re-fitted once at step 300, since early steps can be slow (e.g. a GPU shared at start).
            if step == first_step + 10:
                timer_start = time.perf_counter()
            elif step in (first_step + 40, first_step + 300) and step < state["max_steps"]:
                per_step = (time.perf_counter() - timer_start) / (step - first_step - 10)
                fit = step + int((cfg.time_budget_s - elapsed) / (per_step * 1.1))  # 10 % for evaluation
                state["max_steps"] = max(step + 1, min(cfg.max_steps, fit))
                print(f"{per_step * 1000:.0f} ms/step: time budget {cfg.time_budget_s:.0f} s → max_steps {state['max_steps']}", flush=True)
        if step % cfg.log_every == 0:
            eta = (state["max_steps"] - step) * elapsed / max(step, 1)
            print(f"step {step}/{state['max_steps']} loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"{tokens_seen / elapsed:,.0f} tok/s elapsed {elapsed:.0f}s eta {eta:.0f}s", flush=True)
        if step % cfg.eval_every == 0 or step == state["max_steps"] or over_budget:
            val = evaluate_loss(model, val_data, cfg, device, cfg.eval_rows)
            state["log"].append({"step": step, "train_loss": round(loss.item(), 4), "val_loss": round(val, 4),
                                 "elapsed_s": round(elapsed, 1)})
            print(f"step {step} val_loss {val:.4f} (best {min(val, state['best_val']):.4f})", flush=True)
            if val < state["best_val"]:
                state.update(best_val=val, best_step=step, bad_evals=0)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                state["bad_evals"] += 1
                if state["bad_evals"] >= cfg.patience:
                    print(f"early stop: no improvement for {cfg.patience} evaluations", flush=True)
                    break
        if on_progress is not None:
            on_progress({"step": step, "max_steps": state["max_steps"], "loss": loss.item(),
                         "val_loss": state["log"][-1]["val_loss"] if state["log"] else None,
                         "elapsed_s": time.perf_counter() - t0})
        if step % cfg.checkpoint_every == 0:
            state.update(step=step, elapsed_s=elapsed)
            save_resume(out / "resume", model, optimizer, state)
            if best_state is not None:
                save_file({k: v.contiguous() for k, v in best_state.items() if k != "lm_head.weight"}, str(best_path))
        if step == stop_at_step:
            return None
        if over_budget:
            print(f"time budget of {cfg.time_budget_s:.0f} s reached at step {step}", flush=True)
            break
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
        model.tie_weights()
    state.update(step=step, elapsed_s=time.perf_counter() - t0)
    return export(model.cpu(), cfg, state, npz, out)


def export(model, cfg: TrainConfig, state: dict, npz: dict, out: Path) -> Path:
    model_dir = out / "model"
    metadata = {
        "name": cfg.name,
        "trained_on": cfg.trained_on,
        "normalisation": {"band_gap": {"max": BAND_GAP_MAX, "exponent": BAND_GAP_EXPONENT, "kind": "power-log"},
                          "e_hull": {"max": E_HULL_MAX, "kind": "linear"}},
        "tokenizer": "CrystaLLM-pi CIF vocabulary (377 tokens), crystallm_core.lm.tokenizer",
        "train_config": asdict(cfg),
        "best_val_loss": state["best_val"], "best_step": state["best_step"], "steps": state["step"],
        "train_seconds": round(state["elapsed_s"], 1),
    }
    save_model(model, model_dir, metadata, dtype=getattr(torch, cfg.export_dtype))
    (model_dir / "training_log.json").write_text(json.dumps(state["log"], indent=1))
    (model_dir / "training_data_stats.json").write_text(json.dumps(data_stats(npz)))
    print(f"exported best model (step {state['best_step']}, val {state['best_val']:.4f}) to {model_dir}", flush=True)
    return model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="JSON file with TrainConfig fields")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing resume/ checkpoint")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig.from_json(args.config)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in {f.name for f in fields(TrainConfig)}:
            raise ValueError(f"unknown config key '{key}'")
        try:
            setattr(cfg, key, json.loads(value))
        except json.JSONDecodeError:
            setattr(cfg, key, value)  # a plain string such as a path
    if not Path(cfg.data).is_file():
        raise ValueError(f"token cache {cfg.data} not found: run `python -m crystallm_core prepare-data` first")
    train(cfg, resume=not args.no_resume)
    return 0


if __name__ == "__main__":  # the GPU box runs this module alone (no pymatgen there)
    import sys

    parser = argparse.ArgumentParser(prog="python -m crystallm_core.lm.training")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
