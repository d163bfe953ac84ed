"""Our static-cache sampler vs transformers' `model.generate`, side by side on one model and CPU.

    python scripts/bench_sampler.py [--model DIR] [--n 32] [--max-tokens 1024]

The baseline is how CrystaLLM-pi generates: `generate(do_sample=True, top_k, top_p,
num_return_sequences=n)` with the library's default dynamic cache, the prefix keys/values
supplied as a pre-filled cache (two placeholder ids stand for the ghost tokens, so CIF tokens
get positions 2…, as in the original). Both use the same model weights, prompt, sampling
settings and thread count; we report tokens/s and finished CIFs/minute, and the ratio.
Without --model, the shipped default is used (a randomly initialised 8×512 model if absent:
then every sample runs to the token limit, which hides the benefit of retiring finished rows).
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from crystallm_core.lm.checkpoints import inference_dtype, load_model
from crystallm_core.lm.model import CrystaLLMPKV, PKVConfig
from crystallm_core.lm.sampler import SamplingSettings, sample
from crystallm_core.lm.tokenizer import get_tokenizer

PROMPT = "<bos>\ndata_["


def load(model_arg: str | None) -> CrystaLLMPKV:
    try:
        return load_model(model_arg, dtype=torch.float32).model
    except ValueError as error:
        if model_arg:
            raise
        print(f"(no shipped model: {error}; using a random 8×512 model)")
        torch.manual_seed(0)
        return CrystaLLMPKV(PKVConfig(n_layer=8, n_head=8, n_embd=512, n_positions=1026)).eval()


@torch.inference_mode()
def run_generate(model: CrystaLLMPKV, prompt_ids: list[int], n: int, max_tokens: int, seed: int) -> tuple[int, int, float]:
    """transformers' generate, default dynamic cache; returns (new tokens, finished CIFs, seconds)."""
    torch.manual_seed(seed)
    cond = torch.tensor([[0.5, 0.0]], dtype=next(model.parameters()).dtype)
    started = time.perf_counter()
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(model.conditioning(cond)):
        cache.update(k.expand(n, -1, -1, -1).contiguous(), v.expand(n, -1, -1, -1).contiguous(), layer)
    P = model.config.n_prefix_tokens
    ids = torch.tensor([[model.config.pad_token_id] * P + prompt_ids])
    out = model.generate(
        input_ids=ids.expand(n, -1), attention_mask=torch.ones(n, ids.shape[1], dtype=torch.long),
        past_key_values=cache, do_sample=True, top_k=15, top_p=0.95, temperature=1.0,
        max_length=P + max_tokens, eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id,
    )
    seconds = time.perf_counter() - started
    generated = out[:, ids.shape[1]:]
    eos = generated == model.config.eos_token_id
    lengths = torch.where(eos.any(1), eos.int().argmax(1) + 1, torch.full((n,), generated.shape[1]))
    return int(lengths.sum()), int(eos.any(1).sum()), seconds


def run_ours(model: CrystaLLMPKV, prompt_ids: list[int], n: int, max_tokens: int, seed: int) -> tuple[int, int, float]:
    settings = SamplingSettings(top_k=15, top_p=0.95, temperature=1.0, batch_size=n, max_tokens=max_tokens)
    started = time.perf_counter()
    samples = sample(model, prompt_ids, [0.5, 0.0], [True, True], n, settings, seed=seed)
    seconds = time.perf_counter() - started
    return sum(s.n_new_tokens for s in samples), sum(s.stop_reason == "eos" for s in samples), seconds


def report(name: str, tokens: int, finished: int, seconds: float) -> float:
    rate = tokens / seconds
    print(f"{name:<42} {tokens:>7} tok {seconds:>8.1f} s {rate:>9.1f} tok/s {60 * finished / seconds:>8.2f} CIFs/min ({finished} with <eos>)")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prompt_ids = get_tokenizer().encode(PROMPT)
    model = load(args.model)
    fast_dtype = inference_dtype()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, n={args.n}, max_tokens={args.max_tokens}, "
          f"fast dtype on this CPU: {fast_dtype}")
    base = report("transformers generate (fp32, dynamic cache)", *run_generate(model.float(), prompt_ids, args.n, args.max_tokens, args.seed))
    ours32 = report("ours (fp32, static cache, slot recycling)", *run_ours(model.float(), prompt_ids, args.n, args.max_tokens, args.seed))
    print(f"ratio ours/generate at fp32: {ours32 / base:.2f}x tokens/s")
    if fast_dtype != torch.float32:
        ours16 = report(f"ours ({fast_dtype}, static cache)", *run_ours(model.to(fast_dtype), prompt_ids, args.n, args.max_tokens, args.seed))
        print(f"ratio ours ({fast_dtype}) / generate (fp32 default): {ours16 / base:.2f}x tokens/s")


if __name__ == "__main__":
    main()
