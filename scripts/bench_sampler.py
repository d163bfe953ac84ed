"""Sampling speed side by side in one run: our sampler, the sampler as it was before the
speed work (commit fc45f4e, run from a temporary git worktree), and transformers' `generate`.

    python scripts/bench_sampler.py [--slots 1 8 32 64] [--threads N] [--baseline-commit fc45f4e]

For each slot count n: n samples with n slots (free decoding, so every path does the same
work), tokens/s and finished CIFs/min, ratios against `generate` and the old sampler; then
one decode step at n slots over 325 cached tokens, its time against the memory roofline
(bytes a step must read — weights plus the cached keys and values — over this machine's
measured read bandwidth). `generate` is how CrystaLLM-pi samples: `generate(do_sample=True)`
with the library's dynamic cache, the prefix keys/values as a pre-filled cache; it runs in
fp32 (its default), ours and the old sampler in the dtype the app uses on this CPU. Same
weights, prompt, sampling settings, seeds and thread count for all.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from crystallm_core.lm.checkpoints import load_model
from crystallm_core.lm.int8_linear import int8_enabled
from crystallm_core.lm.model import CrystaLLMPKV
from crystallm_core.lm.native_attention import native_attention
from crystallm_core.lm.sampler import (
    SamplingSettings,
    linear_layers,
    sample,
    step_milliseconds,
)
from crystallm_core.lm.tokenizer import get_tokenizer
from crystallm_core.product.generation import prepare_for_requests
from crystallm_core.paths import DEFAULT_MODEL_DIR

PROMPT = "<bos>\ndata_["
CONDITIONS = [0.5, 0.0]
SETTINGS = dict(top_k=15, top_p=0.95, temperature=1.0)
CACHED = 325  # typical cached tokens per row in mid-CIF (the profile point)
REPO = Path(__file__).resolve().parents[1]

OLD_SAMPLER = """
import json, sys, time, torch
torch.set_num_threads({threads})
from crystallm_core.checkpoints import load_model
from crystallm_core.sampler import SamplingSettings, sample
from crystallm_core.tokenizer import get_tokenizer
model = load_model({model!r}).model
ids = get_tokenizer().encode({prompt!r})
out = {{}}
for n in {slots}:
    settings = SamplingSettings(batch_size=n, max_tokens=1024, **{settings!r})
    started = time.perf_counter()
    samples = sample(model, ids, {conditions!r}, [True, True], n, settings, seed={seed})
    out[n] = (sum(s.n_new_tokens for s in samples), sum(s.stop_reason == "eos" for s in samples),
              time.perf_counter() - started)
print(json.dumps(out))
"""


@torch.inference_mode()
def run_generate(model: CrystaLLMPKV, prompt_ids: list[int], n: int, seed: int) -> tuple[int, int, float]:
    """transformers' generate, default dynamic cache; returns (new tokens, finished CIFs, seconds)."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    cond = torch.tensor([CONDITIONS], dtype=next(model.parameters()).dtype)
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(model.conditioning(cond)):
        cache.update(k.expand(n, -1, -1, -1).contiguous(), v.expand(n, -1, -1, -1).contiguous(), layer)
    P = model.config.n_prefix_tokens
    ids = torch.tensor([[model.config.pad_token_id] * P + prompt_ids])
    out = model.generate(
        input_ids=ids.expand(n, -1), attention_mask=torch.ones(n, ids.shape[1], dtype=torch.long),
        past_key_values=cache, do_sample=True, max_length=P + 1024, eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id, **SETTINGS)
    seconds = time.perf_counter() - started
    generated = out[:, ids.shape[1]:]
    eos = generated == model.config.eos_token_id
    lengths = torch.where(eos.any(1), eos.int().argmax(1) + 1, torch.full((n,), generated.shape[1]))
    return int(lengths.sum()), int(eos.any(1).sum()), seconds


def run_ours(model: CrystaLLMPKV, prompt_ids: list[int], n: int, seed: int) -> tuple[int, int, float]:
    settings = SamplingSettings(batch_size=n, max_tokens=1024, decoding="free", **SETTINGS)
    started = time.perf_counter()
    samples = sample(model, prompt_ids, CONDITIONS, [True, True], n, settings, seed=seed)
    return (sum(s.n_new_tokens for s in samples), sum(s.stop_reason == "eos" for s in samples),
            time.perf_counter() - started)


def run_old(commit: str, slots: list[int], threads: int, seed: int) -> dict[int, tuple[int, int, float]]:
    """The old sampler in a detached worktree of `commit`, in a subprocess (its own package)."""
    with tempfile.TemporaryDirectory() as tmp:
        checkout = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(checkout), commit],
                       check=True, capture_output=True)
        try:
            code = OLD_SAMPLER.format(threads=threads, model=str(DEFAULT_MODEL_DIR), prompt=PROMPT, slots=slots,
                                      settings=SETTINGS, conditions=CONDITIONS, seed=seed)
            result = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True,
                                    env={"PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin", "CRYSTALLM_COMPILE": "0"})
            if result.returncode:
                raise RuntimeError(result.stderr[-2000:])
            return {int(k): tuple(v) for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(checkout)], capture_output=True)


def read_bandwidth() -> float:
    """Bytes/s of a streaming read (a sum over 512 MB, best of 5)."""
    data = torch.ones(128 * 1024 * 1024)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best


def step_bytes(model: CrystaLLMPKV, rows: int) -> int:
    """What a decode step must read: every weight once, and every row's cached keys and values."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    element = next(model.parameters()).element_size()
    if int8_enabled(model):  # the blocks' and the head's weights are read as one byte each
        linear = model.lm_head.weight.numel() + sum(p.numel() for n, p in model.transformer.h.named_parameters()
                                                    if p.dim() == 2)
        weights -= linear * (element - 1)
    cache = 2 * cfg.n_layer * rows * (cfg.n_prefix_tokens + CACHED) * cfg.n_embd * element
    return weights + cache


def app_defaults(loaded, seed: int) -> str:
    """What a user of the app waits for: the default request (constrained decoding, n 16, scored
    as the app does) until its first checked structure and until the end."""
    from crystallm_core.product.generation import GenerationRequest, generate

    started = time.perf_counter()
    arrivals: list[float] = []
    run = generate(loaded, GenerationRequest(seed=seed), on_candidate=lambda c: arrivals.append(time.perf_counter()))
    total = time.perf_counter() - started
    return (f"app defaults ({len(run.candidates)} structures, constrained): first checked structure after "
            f"{arrivals[0] - started:.1f} s, all after {total:.1f} s, {sum(c.valid for c in run.candidates)} valid, "
            f"{60 * len(run.candidates) / total:.0f} CIFs/min")


def line(name: str, tokens: int, finished: int, seconds: float) -> float:
    rate = tokens / seconds
    print(f"  {name:<34} {tokens:>6} tok {seconds:>7.1f} s {rate:>8.0f} tok/s {60 * finished / seconds:>7.1f} CIFs/min")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--baseline-commit", default="fc45f4e", help="the old sampler's commit ('' skips it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt_ids = get_tokenizer().encode(PROMPT)
    loaded = load_model()
    model, dtype = loaded.model, next(loaded.model.parameters()).dtype
    # as the app prepares a model: kernel built, weights packed, checker started, threads and batch size measured …
    warmed = prepare_for_requests(loaded)
    torch.set_num_threads(args.threads)  # … but every path here runs at the same thread count
    print(f"torch {torch.__version__}, {args.threads} threads, model {loaded.info.name}, our dtype {dtype}; "
          f"prepared in {warmed['seconds']:.1f} s; decode step at 16 rows by threads {warmed['step_ms']} ms: "
          f"the app would use {warmed['threads']}; step by rows {warmed['batch_ms']} ms: default batch size "
          f"{warmed['batch_size']}")
    print(f"attention: {'native kernel' if native_attention.available() else 'matmul fallback'}; linear layers: "
          f"{linear_layers(model)} (int8 step at 16 rows: {warmed['int8_step_ms']} ms)")
    print(app_defaults(loaded, args.seed))
    old = run_old(args.baseline_commit, args.slots, args.threads, args.seed) if args.baseline_commit else {}
    reference = load_model(dtype=torch.float32).model
    bandwidth = read_bandwidth()
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    for n in args.slots:
        print(f"{n} slots, {n} samples:")
        ours = line(f"ours ({linear_layers(model)})", *run_ours(model, prompt_ids, n, args.seed))
        base = line("transformers generate (fp32)", *run_generate(reference, prompt_ids, n, args.seed))
        ratios = f"ours / generate {ours / base:.1f}x"
        if n in old:
            ratios += f", ours / old sampler {ours / line(f'old sampler ({args.baseline_commit})', *old[n]):.1f}x"
        seconds, needed = step_milliseconds(model, n, CACHED, repeats=10) / 1e3, step_bytes(model, n)
        print(f"  {ratios}\n  decode step over {CACHED} cached tokens: {seconds * 1e3:.1f} ms; it must read "
              f"{needed / 1e6:.0f} MB = {needed / bandwidth * 1e3:.1f} ms at the measured bandwidth: "
              f"{needed / bandwidth / seconds:.0%} of the roofline")


if __name__ == "__main__":
    main()
