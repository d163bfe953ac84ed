"""Train the crystal graph network from precomputed graphs, within a wall-clock budget.

    python -m crystallm_core.chem.judges.surrogates.train_gnn --graphs data/cache/surrogate_graphs.npz \
        --out runs/gnn --device cuda --time-budget-s 420

Needs only numpy + torch + safetensors (the graphs were built with pymatgen elsewhere, see
graphs.py), so it runs on a bare GPU machine. The learning rate follows a cosine over the time
budget, the weights with the best validation MAE are kept, and the output directory receives
gnn.safetensors, gnn_config.json and gnn_metrics.json (metrics, per-epoch log, settings).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from crystallm_core.chem.judges.surrogates.cgcnn import (
    CrystalGNN,
    GNNConfig,
    GraphStore,
    predict_gap,
    save_gnn,
    standardise,
)
from crystallm_core.chem.judges.surrogates.scoring import (
    gap_metrics,
    gated_gap,
    is_metal,
    report_splits,
)


@dataclass
class TrainConfig:
    time_budget_s: float = 420.0  # training loop only; loading and final evaluation come on top
    max_epochs: int = 2000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_s_fraction: float = 0.03
    train_sources: str = "all"  # or a comma list, e.g. "mp20,mpts52"
    seed: int = 0


def load_graphs(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def learning_rate(config: TrainConfig, progress: float) -> float:
    """Linear warm-up, then cosine decay to zero; progress in [0, 1] of the budget."""
    warm = min(1.0, progress / config.warmup_s_fraction)
    return config.lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train(arrays: dict[str, np.ndarray], model_config: GNNConfig, config: TrainConfig, device: str,
          out_dir: Path | None = None, log_every_s: float = 15.0) -> tuple[CrystalGNN, list[dict]]:
    """Train on the training split, select on validation MAE; return the best model and the log.

    With `out_dir`, every new best model is written there at once, so a run that is killed
    (a one-shot GPU lease running out) still leaves its best weights behind.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    store = GraphStore(arrays, device)
    band_gap, split, source = arrays["band_gap"].astype(np.float64), arrays["split"], arrays["source"]
    train_rows = np.nonzero(split == "train")[0]
    if config.train_sources != "all":
        train_rows = train_rows[np.isin(source[train_rows], config.train_sources.split(","))]
    val_rows = np.nonzero(split == "val")[0]
    target_gap = torch.as_tensor(band_gap, dtype=torch.float32, device=device)
    target_metal = torch.as_tensor(is_metal(band_gap), dtype=torch.float32, device=device)

    model = CrystalGNN(model_config, torch.as_tensor(standardise(arrays["element_features"]))).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best_mae, best_state, log = math.inf, None, []
    start = last_log = time.time()
    for epoch in range(config.max_epochs):
        model.train()
        order = rng.permutation(train_rows)
        losses = []
        for first in range(0, len(order), config.batch_size):
            progress = max((time.time() - start) / config.time_budget_s, epoch / config.max_epochs)
            if progress >= 1.0:  # checked per step: a CPU epoch can outlast a small budget
                break
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(config, progress)
            index = torch.as_tensor(order[first:first + config.batch_size], device=device)
            logit, gap = model(store.batch(index))
            metal = target_metal[index]
            # Classification on every crystal; gap regression (L1, the reported metric) on non-metals.
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, metal)
            loss = loss + ((gap - target_gap[index]).abs() * (1 - metal)).sum() / (1 - metal).sum().clamp(min=1)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimiser.step()
            losses.append(loss.detach())
        if not losses:
            break
        p_metal, gap = predict_gap(model, store, val_rows)
        val = gap_metrics(band_gap[val_rows], gated_gap(p_metal, gap), p_metal)
        entry = {"epoch": epoch + 1, "steps": len(losses), "seconds": round(time.time() - start, 1),
                 "train_loss": float(torch.stack(losses).mean()),
                 "val_mae": round(val["mae"], 4), "val_r2": round(val["r2"], 4), "lr": learning_rate(config, progress)}
        log.append(entry)
        if val["mae"] < best_mae:
            best_mae = val["mae"]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if out_dir is not None:
                save_gnn(model, out_dir)
        if time.time() - last_log > log_every_s:
            print(json.dumps(entry), flush=True)
            last_log = time.time()
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, log


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the band-gap crystal graph network (no pymatgen needed).")
    parser.add_argument("--graphs", type=Path, required=True,
                        help="npz written by python -m crystallm_core.chem.judges.surrogates.graphs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--time-budget-s", type=float, default=TrainConfig.time_budget_s)
    parser.add_argument("--max-epochs", type=int, default=TrainConfig.max_epochs)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--hidden", type=int, default=GNNConfig.hidden)
    parser.add_argument("--layers", type=int, default=GNNConfig.n_layers)
    parser.add_argument("--train-sources", default=TrainConfig.train_sources)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True

    wall = time.time()
    arrays = load_graphs(args.graphs)
    graph_config = json.loads(str(arrays["graph_config"]))
    n_elements, element_dim = arrays["element_features"].shape
    model_config = GNNConfig(n_elements=n_elements, element_dim=element_dim, hidden=args.hidden,
                             n_layers=args.layers, **graph_config)
    config = TrainConfig(args.time_budget_s, args.max_epochs, args.batch_size, args.lr,
                         train_sources=args.train_sources, seed=args.seed)
    model, log = train(arrays, model_config, config, args.device, out_dir=args.out)
    save_gnn(model, args.out)

    store = GraphStore(arrays, args.device)
    held_out = np.nonzero(np.isin(arrays["split"], ["val", "test"]))[0]
    p_metal, gap = predict_gap(model, store, held_out)
    metrics = report_splits(arrays["band_gap"][held_out].astype(np.float64), gated_gap(p_metal, gap), p_metal,
                            arrays["split"][held_out], arrays["source"][held_out])
    on_gpu = str(args.device).startswith("cuda")
    summary = {"metrics": metrics, "graphs": str(args.graphs), "n_graphs": len(store), "best_epoch": int(np.argmin([e["val_mae"] for e in log]) + 1) if log else 0,
               "epochs": len(log), "wall_seconds": round(time.time() - wall, 1), "device": str(args.device),
               "device_name": torch.cuda.get_device_name() if on_gpu else "cpu",
               "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
               "train_config": asdict(config), "model_config": asdict(model_config), "graph_config": graph_config,
               "n_parameters": sum(p.numel() for p in model.parameters()), "log": log}
    (args.out / "gnn_metrics.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}, indent=1))


if __name__ == "__main__":
    main()
