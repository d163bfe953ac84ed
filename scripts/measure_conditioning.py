"""Has the model learned to use its conditions? Test-split NLL with true vs shuffled vs unknown conditions.

    python scripts/measure_conditioning.py --model DIR --data data/cache/tokens.npz --out cond.json

Reports validation and test loss (nats/token) and, on the test split, the mean NLL per token
with each row's true condition vector, with condition vectors shuffled across rows, and with
both properties "unknown", plus bootstrap 95 % intervals of the differences (rows resampled).
Needs only torch + numpy (runs on a GPU box without pymatgen).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from crystallm_core.lm.checkpoints import load_model_weights
from crystallm_core.lm.training import TokenData


@torch.no_grad()
def row_nll(model, data: TokenData, conditions: np.ndarray, present: np.ndarray, device, batch_size=32):
    """Summed NLL and token count per row, with the given condition vectors."""
    order = np.argsort(data.lengths, kind="stable")
    sums, counts = np.zeros(len(data)), np.zeros(len(data))
    for start in range(0, len(order), batch_size):
        picks = order[start : start + batch_size]
        ids, _, _, lengths = data.batch(picks)
        cond = torch.from_numpy(conditions[picks]).to(device)
        mask = torch.from_numpy(present[picks]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            nll, count = model.sequence_loss(ids.to(device), cond, mask, lengths.to(device))
        sums[picks], counts[picks] = nll.float().cpu().numpy(), count.float().cpu().numpy()
    return sums, counts


def bootstrap_difference(a: np.ndarray, b: np.ndarray, counts: np.ndarray, rng, n_boot=2000) -> dict:
    """Mean per-token (a − b) with a 95 % interval, resampling rows."""
    diffs = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(a), len(a))
        diffs.append((a[pick].sum() - b[pick].sum()) / counts[pick].sum())
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"mean": float((a.sum() - b.sum()) / counts.sum()), "ci95": [float(low), float(high)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="data/cache/tokens.npz")
    parser.add_argument("--out", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model_weights(args.model, device=device, dtype=torch.float32)
    npz = dict(np.load(args.data, allow_pickle=False))
    rng = np.random.default_rng(args.seed)
    result = {}
    for name, split in (("val", 1), ("test", 2)):
        data = TokenData(npz, split, model.config.pad_token_id)
        true_sum, counts = row_nll(model, data, data.conditions, data.present, device)
        result[f"{name}_loss"] = float(true_sum.sum() / counts.sum())
        result[f"{name}_rows"] = len(data)
        if name != "test":
            continue
        perm = rng.permutation(len(data))
        shuffled_sum, _ = row_nll(model, data, data.conditions[perm], data.present[perm], device)
        unknown_sum, _ = row_nll(model, data, np.zeros_like(data.conditions), np.zeros_like(data.present), device)
        result["test_loss_shuffled_conditions"] = float(shuffled_sum.sum() / counts.sum())
        result["test_loss_unknown_conditions"] = float(unknown_sum.sum() / counts.sum())
        result["shuffled_minus_true"] = bootstrap_difference(shuffled_sum, true_sum, counts, rng)
        result["unknown_minus_true"] = bootstrap_difference(unknown_sum, true_sum, counts, rng)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
