"""Fast batched sampling from a PKV model with a static KV cache and slot recycling.

Why not `model.generate`? It copies its dynamic cache every step, keeps finished rows in the
batch until the longest one ends, and knows nothing about prefix keys. Here:

- the cache is one pre-allocated tensor per layer, (rows, heads, prefix + context, head_dim);
  the prefix (ghost tokens) is written once into positions 0…P-1 of each slot;
- every slot has its own length, so a slot whose CIF ended (<eos> or context limit) is handed
  to the caller at once and refilled with a new sample; when no new samples are left the
  batch is compacted (rarely, so copies stay cheap) and finished slots stop costing compute;
- classifier-free guidance runs each slot twice (conditional + all-properties-unknown rows)
  and samples from uncond + s·(cond − uncond);
- `should_cancel` is checked between steps; finished samples are never lost.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .model import CrystaLLMPKV, finish_block, split_heads


DEFAULT_BANNED_IDS = (370, 371, 372, 376)  # <unk> <pad> <bos> <prop>: never part of a CIF


@dataclass
class SamplingSettings:
    temperature: float = 0.7  # the paper protocol; measured more valid CIFs than 1.0 (MODEL_CARD.md)
    top_k: int | None = 15
    top_p: float | None = 0.95
    guidance_scale: float = 1.0
    batch_size: int = 32
    max_tokens: int | None = None  # CIF tokens incl. prompt; None = the model's context

    def validate(self) -> None:
        if not (0.0 < self.temperature <= 5.0):
            raise ValueError(f"temperature must be in (0, 5], got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top-k must be ≥ 1, got {self.top_k}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.guidance_scale <= 10.0):
            raise ValueError(f"guidance scale must be in [0, 10], got {self.guidance_scale}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"max tokens must be ≥ 2, got {self.max_tokens}")
        if not (1 <= self.batch_size <= 512):
            raise ValueError(f"batch size must be in [1, 512], got {self.batch_size}")


@dataclass
class FinishedSample:
    index: int  # order in which the sample was started (stable for a seed)
    token_ids: list[int]  # prompt + generated tokens, <eos> included if produced
    stop_reason: str  # "eos" or "length"
    n_new_tokens: int
    seconds: float


def filter_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), as Hugging Face applies them."""
    logits = logits / settings.temperature
    if settings.top_k is not None and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p is not None and settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) > settings.top_p  # keep the token crossing p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class SlotBatch:
    """The static cache and per-slot state for one sampling call."""

    def __init__(self, model: CrystaLLMPKV, n_slots: int, guided: bool, capacity: int):
        cfg = model.config
        param = next(model.parameters())
        self.model, self.n_slots, self.guided = model, n_slots, guided
        rows = n_slots * (2 if guided else 1)
        shape = (rows, cfg.n_head, cfg.n_prefix_tokens + capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(cfg.n_layer)]
        self.lengths = torch.zeros(n_slots, dtype=torch.long, device=param.device)  # CIF tokens in cache

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Cache rows of the given slots (conditional rows, then their unconditional twins)."""
        return torch.cat([slots, slots + self.n_slots]) if self.guided else slots

    def write_prefix(self, slots: torch.Tensor, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        P = self.model.config.n_prefix_tokens
        rows = self.rows(slots)
        for layer, (k, v) in enumerate(prefix):
            self.keys[layer][rows, :, :P] = k.to(self.keys[layer].dtype)
            self.values[layer][rows, :, :P] = v.to(self.values[layer].dtype)
        self.lengths[slots] = 0

    def prefill(self, slots: torch.Tensor, prompt_ids: torch.Tensor) -> None:
        """Put prompt tokens (the same for all given slots) into the cache of those slots."""
        cfg, tf = self.model.config, self.model.transformer
        P, T = cfg.n_prefix_tokens, prompt_ids.shape[0]
        if T == 0:
            return
        rows = self.rows(slots)
        ids = prompt_ids.unsqueeze(0).expand(rows.shape[0], T)
        positions = torch.arange(P, P + T, device=ids.device)
        hidden = tf.wte(ids) + tf.wpe(positions)
        mask = torch.ones(T, P + T, dtype=torch.bool, device=ids.device).tril(diagonal=P)
        for layer, block in enumerate(tf.h):
            q, k, v = split_heads(block, hidden, cfg.n_head)
            self.keys[layer][rows, :, P : P + T] = k
            self.values[layer][rows, :, P : P + T] = v
            hidden = finish_block(block, hidden, q, self.keys[layer][rows, :, : P + T], self.values[layer][rows, :, : P + T], mask)
        self.lengths[slots] = T

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decoding step for every slot: feed `tokens` (n_slots,), return next-token logits."""
        cfg, tf = self.model.config, self.model.transformer
        P = cfg.n_prefix_tokens
        lengths = torch.cat([self.lengths, self.lengths]) if self.guided else self.lengths
        tokens = torch.cat([tokens, tokens]) if self.guided else tokens
        write_at = P + lengths
        span = int(write_at.max()) + 1  # attend only over the filled part of the cache
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        hidden = (tf.wte(tokens) + tf.wpe(lengths + P)).unsqueeze(1)
        mask = (torch.arange(span, device=tokens.device)[None, :] <= write_at[:, None])[:, None, None, :]
        for layer, block in enumerate(tf.h):
            q, k, v = split_heads(block, hidden, cfg.n_head)
            self.keys[layer][rows, :, write_at] = k[:, :, 0]
            self.values[layer][rows, :, write_at] = v[:, :, 0]
            hidden = finish_block(block, hidden, q, self.keys[layer][:, :, :span], self.values[layer][:, :, :span], mask)
        self.lengths += 1
        return self.model.lm_head(tf.ln_f(hidden[:, 0])).float()

    def keep(self, slots: torch.Tensor) -> None:
        """Compact the batch to the given slots (a copy; done rarely)."""
        rows = self.rows(slots)
        self.keys = [k[rows].contiguous() for k in self.keys]
        self.values = [v[rows].contiguous() for v in self.values]
        self.lengths = self.lengths[slots].contiguous()
        self.n_slots = slots.shape[0]


@torch.inference_mode()
def sample(
    model: CrystaLLMPKV,
    prompt_ids: list[int],
    conditions: list[float],
    condition_present: list[bool],
    n: int,
    settings: SamplingSettings | None = None,
    seed: int = 0,
    eos_id: int = 373,
    banned_ids: tuple[int, ...] = DEFAULT_BANNED_IDS,
    on_finished: Callable[[FinishedSample], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[FinishedSample]:
    """Draw `n` CIF token sequences for one condition vector; returns them sorted by index."""
    settings = settings or SamplingSettings()
    settings.validate()
    if n < 1:
        raise ValueError(f"number of samples must be ≥ 1, got {n}")
    cfg = model.config
    param = next(model.parameters())
    device = param.device
    capacity = min(settings.max_tokens or cfg.max_cif_tokens, cfg.max_cif_tokens)
    if not prompt_ids or len(prompt_ids) >= capacity:
        raise ValueError(f"prompt must have 1…{capacity - 1} tokens, got {len(prompt_ids)}")
    guided = settings.guidance_scale != 1.0
    generator = torch.Generator(device=device).manual_seed(int(seed))

    cond = torch.tensor([conditions], dtype=torch.float32, device=device)
    present = torch.tensor([condition_present], dtype=torch.bool, device=device)
    if guided:  # unconditional twin: every property "unknown"
        cond, present = torch.cat([cond, torch.zeros_like(cond)]), torch.cat([present, torch.zeros_like(present)])
    prefix = model.conditioning(cond.to(param.dtype), present)  # computed once, reused for every slot

    n_slots = min(n, settings.batch_size)
    batch = SlotBatch(model, n_slots, guided, capacity)
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)

    def start(slots: torch.Tensor) -> None:
        # prefix rows are [cond] or [cond, uncond]; slot rows are k conditional, then k unconditional.
        slot_prefix = [(pk.repeat_interleave(len(slots), 0), pv.repeat_interleave(len(slots), 0)) for pk, pv in prefix]
        batch.write_prefix(slots, slot_prefix)
        batch.prefill(slots, prompt[:-1])

    slots = torch.arange(n_slots, device=device)
    start(slots)
    tokens = prompt[-1].repeat(n_slots)
    generated: list[list[int]] = [[] for _ in range(n_slots)]
    sample_index = list(range(n_slots))
    started_at = [time.perf_counter()] * n_slots
    next_index, finished = n_slots, []
    alive = [True] * n_slots
    banned = torch.tensor(banned_ids, dtype=torch.long, device=device)

    while any(alive):
        if should_cancel is not None and should_cancel():
            break
        logits = batch.step(tokens)
        if guided:
            uncond, logits = logits[batch.n_slots :], logits[: batch.n_slots]
            logits = uncond + settings.guidance_scale * (logits - uncond)
        logits[:, banned] = float("-inf")
        tokens = torch.multinomial(filter_logits(logits, settings).softmax(dim=-1), 1, generator=generator)[:, 0]

        done_slots = []
        for slot, token in enumerate(tokens.tolist()):
            if not alive[slot]:
                continue
            generated[slot].append(token)
            if token == eos_id or len(prompt_ids) + len(generated[slot]) >= capacity:
                done = FinishedSample(
                    index=sample_index[slot],
                    token_ids=list(prompt_ids) + generated[slot],
                    stop_reason="eos" if token == eos_id else "length",
                    n_new_tokens=len(generated[slot]),
                    seconds=time.perf_counter() - started_at[slot],
                )
                finished.append(done)
                if on_finished is not None:
                    on_finished(done)
                done_slots.append(slot)
        refill = done_slots[: max(0, n - next_index)]
        if refill:
            start(torch.tensor(refill, device=device))
            for slot in refill:
                generated[slot], sample_index[slot] = [], next_index
                started_at[slot] = time.perf_counter()
                tokens[slot] = prompt[-1]
                next_index += 1
        for slot in done_slots[len(refill) :]:
            alive[slot] = False
        dead = [s for s in range(batch.n_slots) if not alive[s]]
        if dead and any(alive) and len(dead) * 2 >= batch.n_slots:
            # Compact: copying the cache costs about one step, so do it only when it halves the batch.
            keep = [s for s in range(batch.n_slots) if alive[s]]
            batch.keep(torch.tensor(keep, dtype=torch.long, device=device))
            tokens = tokens[keep]
            generated = [generated[s] for s in keep]
            sample_index = [sample_index[s] for s in keep]
            started_at = [started_at[s] for s in keep]
            alive = [True] * len(keep)
        elif dead:
            batch.lengths[torch.tensor(dead, device=device)] = 0  # idle slots scribble harmlessly at position P
    return sorted(finished, key=lambda s: s.index)
