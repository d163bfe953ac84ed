"""What int8 linear layers cost and buy on this CPU, side by side in one run.

    OMP_NUM_THREADS=1 python scripts/measure_int8.py [--n 64] [--seed 0]

1. The fp32 model samples --n CIFs at the app's default request (band gap 1.5 eV, E_hull 0;
   free decoding, T 1.0, top-k 15, top-p 0.95: the distribution the model itself defines).
2. Both paths read those CIFs token by token (decode steps, --n rows): the mean of
   log p_fp32 - log p_int8 over the fp32 model's own tokens estimates KL(fp32 || int8) per
   token; also the share of tokens whose most likely next token differs.
3. A decode step at 16 and 64 rows over 325 cached tokens, fp32 vs int8, alternating runs.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from crystallm_core.lm.checkpoints import load_model
from crystallm_core.lm.conditions import condition_vector
from crystallm_core.lm.int8_linear import enable_int8, int8_available
from crystallm_core.lm.sampler import SamplingSettings, sample, step_milliseconds
from crystallm_core.lm.tokenizer import get_tokenizer

PROMPT = "<bos>\ndata_["


@torch.inference_mode()
def token_log_probs(model, sequences: list[list[int]], conditions: list[float],
                    present: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, steps) log-probabilities of each next token (NaN past a row's end) and the most likely
    token at each step, the rows fed one decode step at a time."""
    rows, longest = len(sequences), max(map(len, sequences))
    cond = torch.tensor([conditions] * rows, dtype=torch.float32)
    cache = model.setup_cache(rows, longest)
    cache.write_prefix(torch.arange(rows), model.conditioning(cond, torch.tensor([present] * rows)))
    padded = torch.tensor([s + [0] * (longest - len(s)) for s in sequences])
    out, top = np.full((rows, longest - 1), np.nan), np.full((rows, longest - 1), -1)
    ones = torch.ones(rows, dtype=torch.long)
    for step in range(longest - 1):
        logits = model.forward_cached(padded[:, step], ones, cache)
        chosen = torch.log_softmax(logits, -1).gather(1, padded[:, step + 1:step + 2])[:, 0]
        live = np.array([step + 1 < len(s) for s in sequences])
        out[live, step] = chosen.numpy()[live]
        top[live, step] = logits.argmax(-1).numpy()[live]
    return out, top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not int8_available():
        raise SystemExit("fbgemm's int8 products are not available in this torch build")
    torch.set_num_threads(1)
    model = load_model(dtype=torch.float32).model
    ids = get_tokenizer().encode(PROMPT)
    conditions, present = condition_vector(1.5, 0.0)
    settings = SamplingSettings(batch_size=args.n, max_tokens=1024, decoding="free", top_k=15, top_p=0.95,
                                temperature=1.0)
    samples = sample(model, ids, conditions, present, args.n, settings, seed=args.seed)
    sequences = [s.token_ids for s in samples]
    fp32, fp32_top = token_log_probs(model, sequences, conditions, present)
    enable_int8(model)
    int8, int8_top = token_log_probs(model, sequences, conditions, present)
    enable_int8(model, False)
    live = ~np.isnan(fp32)
    diff = (fp32 - int8)[live]
    per_row = np.nansum(fp32 - int8, axis=1)
    print(f"{args.n} fp32 samples, {live.sum()} tokens: NLL per token fp32 {-fp32[live].mean():.4f}, "
          f"int8 {-int8[live].mean():.4f}; KL(fp32 || int8) per token ~ {diff.mean():.5f} nats "
          f"(per CIF {per_row.mean():.3f} nats, CIFs of {live.sum(1).mean():.0f} tokens); "
          f"most likely next token differs at {(fp32_top != int8_top)[live].mean():.2%} of tokens")
    for rows in (16, 64):
        times = {"fp32": [], "int8": []}
        for _ in range(3):
            for name in times:
                enable_int8(model, name == "int8")
                times[name].append(step_milliseconds(model, rows, 325, repeats=6, capacity=326))
        enable_int8(model, False)
        fp32_ms, int8_ms = (float(np.median(times[k])) for k in ("fp32", "int8"))
        print(f"decode step at {rows} rows over 325 cached tokens (median of 3 alternating runs): fp32 {fp32_ms:.1f} ms, "
              f"int8 {int8_ms:.1f} ms: {fp32_ms / int8_ms:.2f}x")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"({time.perf_counter() - started:.0f} s)")
