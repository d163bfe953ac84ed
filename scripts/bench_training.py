"""Training tokens per second: the reference step vs the fast step, same batches, one run.

    python scripts/bench_training.py [--steps 4] [--batch-size 8] [--model DIR] [--emulated-bf16]

Reference: right-padded batches through `sequence_loss` (the explicit-mask attention path),
foreach AdamW, as `train` ran before the fast step. Fast: `training_step` on `PackedBatch`es
(no padding in the linear layers, fused SDPA, fused AdamW, bf16 only where the hardware has
it). Both start from the same weights and see the same batches; steps alternate (reference,
fast, reference, …) so machine noise hits both alike. Batches come from real MP-20 CIFs
(the shared data) in two orders: shuffled (what `align` and a small fine-tune see) and
length-bucketed (what pre-training sees). `--emulated-bf16` also times the old default of
bf16 autocast on a CPU without native bf16 (one step: it is slow).

Each order also prints the model FLOPs per second of both paths as a share of this CPU's
measured fp32 matrix-product peak (torch.mm, same threads, same run): a ratio target above
peak / reference cannot be met by mechanics alone.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from crystallm_core.chem.data.data_prep import RowProcessor, load_sources  # noqa: E402
from crystallm_core.lm.checkpoints import load_model_weights, resolve_model_dir  # noqa: E402
from crystallm_core.lm.packed_batch import PackedBatch  # noqa: E402
from crystallm_core.lm.training import TrainConfig, make_optimizer, native_bf16, training_step  # noqa: E402
from crystallm_core.paths import data_dir  # noqa: E402


def real_sequences(n: int, seed: int) -> list[np.ndarray]:
    rows = load_sources(data_dir())
    rows = rows[rows["source"] == "mp20"].sample(n, random_state=seed)
    process = RowProcessor(None, 1024)
    return [r["tokens"].astype(np.int64) for r in map(process, rows.to_dict("records")) if r["reason"] is None]


def matmul_peak(n: int = 1024, seconds: float = 3.0) -> float:
    """fp32 FLOP/s of square matrix products on this CPU (the threads torch uses now)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    start, products = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        products += 1
    return 2 * n**3 * products / (time.perf_counter() - start)


def step_flops(config, lengths: list[int]) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward) on real tokens:
    the block and LM-head matrix products per token, and causal attention per sequence."""
    d, layers = config.n_embd, config.n_layer
    inner = config.n_inner or 4 * d
    per_token = 2 * (layers * (4 * d * d + 2 * d * inner) + d * config.vocab_size)
    attention = sum(2 * layers * d * t * t for t in lengths)  # QK^T and AV, half the square each
    return 3 * (per_token * sum(lengths) + attention)


def reference_step(model, optimizer, sequences, conditions, present, bf16: bool) -> int:
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), 371)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.from_numpy(seq)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        nll, count = model.sequence_loss(ids, torch.from_numpy(conditions), torch.from_numpy(present), lengths)
    loss = nll.sum() / count.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return ids.numel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per order and path")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--emulated-bf16", action="store_true")
    parser.add_argument("--no-dropout", action="store_true",
                        help="both paths without dropout (as align trains): attention then takes the fused kernel")
    args = parser.parse_args()
    device = torch.device("cpu")
    sequences = real_sequences(args.batch_size * (args.steps + 1) * 2, args.seed)
    n_batches = args.steps + 1
    rng = np.random.default_rng(args.seed)
    shuffled = [sequences[i : i + args.batch_size] for i in range(0, n_batches * args.batch_size, args.batch_size)]
    by_length = sorted(sequences[n_batches * args.batch_size :], key=len)
    bucketed = [by_length[i : i + args.batch_size] for i in range(0, n_batches * args.batch_size, args.batch_size)]
    cfg = TrainConfig(learning_rate=1e-5)
    source = resolve_model_dir(args.model)
    models = {name: load_model_weights(source, dtype=torch.float32).train(not args.no_dropout)
              for name in ("reference", "fast")}
    optimizers = {"reference": make_optimizer(models["reference"], cfg, fused=False),
                  "fast": make_optimizer(models["fast"], cfg, fused=True)}
    peak = matmul_peak()
    print(f"fp32 matrix-product peak: {peak / 1e9:.0f} GFLOP/s")
    print(f"dropout {'off' if args.no_dropout else 'on'}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16(device)}")
    for order, batches in (("shuffled", shuffled), ("length-bucketed", bucketed)):
        times = {"reference": [], "fast": []}
        real = padded = 0
        flops = 0.0
        for step, batch in enumerate(batches):
            conditions = rng.random((len(batch), 2)).astype(np.float32)
            present = rng.random((len(batch), 2)) > 0.15
            for name in ("reference", "fast"):
                start = time.perf_counter()
                if name == "reference":
                    cells = reference_step(models[name], optimizers[name], batch, conditions, present,
                                           bf16=native_bf16(device))
                else:
                    packed = PackedBatch.from_sequences(batch, conditions, present, device)
                    float(training_step(models[name], optimizers[name], packed, cfg, device))  # wait for the step
                if step:  # the first step of each warms up
                    times[name].append(time.perf_counter() - start)
            if step:
                real += sum(len(s) for s in batch)
                flops += step_flops(models["fast"].config, [len(s) for s in batch])
                padded += cells
        per_step = {name: statistics.median(t) for name, t in times.items()}
        tokens = real / args.steps
        print(f"{order}: {tokens:.0f} real tokens per batch ({padded / max(real, 1):.2f}x padded); "
              f"reference {tokens / per_step['reference']:.0f} tok/s ({min(times['reference']):.2f}-"
              f"{max(times['reference']):.2f} s/step), fast {tokens / per_step['fast']:.0f} tok/s "
              f"({min(times['fast']):.2f}-{max(times['fast']):.2f} s/step): "
              f"ratio {per_step['reference'] / per_step['fast']:.2f}x")
        achieved = {name: flops / args.steps / seconds for name, seconds in per_step.items()}
        print(f"  model FLOP/s: reference {achieved['reference'] / 1e9:.0f} G ({achieved['reference'] / peak:.0%} of "
              f"peak), fast {achieved['fast'] / 1e9:.0f} G ({achieved['fast'] / peak:.0%}); 3x the reference would "
              f"be {3 * achieved['reference'] / peak:.0%} of peak")
    if args.emulated_bf16 and not native_bf16(device):
        batch = shuffled[0]
        conditions, present = np.zeros((len(batch), 2), np.float32), np.ones((len(batch), 2), bool)
        start = time.perf_counter()
        reference_step(models["reference"], optimizers["reference"], batch, conditions, present, bf16=True)
        emulated = time.perf_counter() - start
        start = time.perf_counter()
        float(training_step(models["fast"], optimizers["fast"], PackedBatch.from_sequences(batch, conditions, present),
                            cfg, device))
        fast = time.perf_counter() - start
        print(f"old default on this CPU (bf16 autocast, emulated): {emulated:.1f} s/step vs fast {fast:.1f} s/step: "
              f"ratio {emulated / fast:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
