"""Fast batched sampling from a PKV model: a static KV cache, slot recycling, and an optional
per-sample decoding constraint (jump-forward spans, token masks, rewinds).

Why not `model.generate`? It copies its dynamic cache every step, keeps finished rows in the
batch until the longest one ends, and knows nothing about prefix keys. Here:

- the cache (`model.StaticKVCache`) is allocated once; the prefix (ghost tokens) is written
  once per sample; every slot has its own length;
- a slot whose CIF ended (<eos>, context limit, or its constraint gave up) is handed to the
  caller at once and refilled with a new sample; a step computes only the rows of the slots
  that have something to feed, so an empty or waiting slot costs nothing;
- with `head_start`, a few slots run alone until the first sample ends, and only then is the
  batch filled: the first structure arrives at a small batch's speed (on 2 cores a decode step
  of 4 rows took about a third of one of 32), for the price of a slower start;
- with a constraint, each slot feeds what it has pending: the sampled token plus the tokens
  the constraint forces after it. Every step is one forward of all slots' pending tokens,
  packed back to back (`CrystaLLMPKV.forward_cached`). A rewind lowers the slot's cache
  length and re-feeds the last kept token: no copy;
- classifier-free guidance runs each slot twice (conditional + all-properties-unknown rows)
  and samples from uncond + s·(cond − uncond);
- `should_cancel` is checked between steps; finished samples are never lost.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from crystallm_core.lm.conditions import PROPERTIES
from crystallm_core.lm.int8_linear import enable_int8, int8_available, int8_enabled
from crystallm_core.lm.model import CrystaLLMPKV
from crystallm_core.lm.packed_linear import packing_available

DEFAULT_BANNED_IDS = (370, 371, 372, 376)  # <unk> <pad> <bos> <prop>: never part of a CIF
DECODINGS = ("constrained", "free")
GUIDES = ("all", *PROPERTIES)  # which targets classifier-free guidance amplifies


@dataclass
class SamplingSettings:
    temperature: float = 0.7  # the paper protocol; measured more valid CIFs than 1.0 (MODEL_CARD.md)
    top_k: int | None = 15
    top_p: float | None = 0.95
    guidance_scale: float = 1.0
    batch_size: int | None = None  # slots; None = what `warm_up` measured best here (sample_generator: why it is safe)
    max_tokens: int | None = None  # CIF tokens incl. prompt; None = the model's context
    decoding: str = "constrained"  # "constrained": consistent CIFs by construction; "free": as trained
    guide: str = "all"  # guidance contrasts with this target (or all) unknown; the others stay given

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
        if self.batch_size is not None and not (1 <= self.batch_size <= 512):
            raise ValueError(f"batch size must be in [1, 512], got {self.batch_size}")
        if self.guide not in GUIDES:
            raise ValueError(f"guide must be one of {', '.join(GUIDES)}, got {self.guide!r}")
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {self.decoding!r}")


@dataclass
class ConstraintStep:
    """What follows a token under a constraint."""

    forced: list[int] = field(default_factory=list)  # tokens the decoder writes next
    rewind_to: int | None = None  # keep this many tokens, then `forced` follows them
    finished: bool = False  # <eos> written
    gave_up: str | None = None  # why the sample cannot be finished
    waiting: bool = False  # a judgement runs in the background: ask `poll()` until it is in


class DecodingConstraint(Protocol):
    """A per-sample state machine (e.g. `constraints.CifConstraint`)."""

    def start(self, prompt_ids: list[int]) -> ConstraintStep: ...
    def allowed(self) -> frozenset[int]: ...
    def advance(self, token: int) -> ConstraintStep: ...
    def poll(self) -> ConstraintStep | None: ...
    def retry_counts(self) -> dict: ...


@dataclass
class FinishedSample:
    index: int  # order in which the sample was started (stable for a seed)
    token_ids: list[int]  # prompt + generated tokens, <eos> included if produced
    stop_reason: str  # "eos", "length" or "gave up"
    n_new_tokens: int  # tokens after the prompt (sampled and forced)
    seconds: float
    retries: dict | None = None  # the constraint's rewinds (None with free decoding)
    note: str | None = None  # e.g. why a constrained sample was given up


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of sample `index` of a call with `seed`: each sample draws from its own,
    so what it writes does not depend on the batch size, the slot it ran in, or its neighbours
    (a batch size measured per machine, or a campaign split across workers, changes nothing) —
    up to the rounding of batched kernels: exact in the fp32 tests; in bf16, or with int8 layers
    (whose activations are quantized over the whole step), a draw that falls within rounding of a
    token boundary can flip."""
    state = np.random.SeedSequence([int(seed) % 2 ** 64, int(index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def draw(probabilities: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row by inverting the row's cumulative distribution at uniforms[row] in [0, 1).
    Scaled by the row's total, the draw always lands on a token of positive probability."""
    cumulative = probabilities.cumsum(dim=-1)
    return torch.searchsorted(cumulative, uniforms[:, None] * cumulative[:, -1:], right=True)[:, 0]


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


@dataclass
class Slot:
    """One sample in flight: its tokens, the ones not yet in the cache, its constraint."""

    index: int
    tokens: list[int]
    pending: list[int]
    constraint: DecodingConstraint | None
    generator: torch.Generator  # this sample's own random stream (sample_generator)
    started_at: float = field(default_factory=time.perf_counter)
    waiting: bool = False  # its constraint is judging it in the background: nothing is sampled


class MaskCache:
    """Vocabulary masks of allowed-token sets, built once per distinct set."""

    def __init__(self, vocab_size: int, banned: tuple[int, ...], device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self.free = torch.ones(vocab_size, dtype=torch.bool, device=device)
        self.free[list(banned)] = False
        self.masks: dict[frozenset[int], torch.Tensor] = {}

    def mask(self, allowed: frozenset[int] | None) -> torch.Tensor:
        if allowed is None:
            return self.free
        mask = self.masks.get(allowed)
        if mask is None:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            mask[list(allowed)] = True
            mask &= self.free
            self.masks[allowed] = mask
        return mask


class SlotBatch:
    """The slots of one sampling call over a static cache (rows = slots, or 2 × slots with guidance)."""

    def __init__(self, model: CrystaLLMPKV, n_slots: int, guided: bool, capacity: int,
                 prefix: list[tuple[torch.Tensor, torch.Tensor]]):
        self.model, self.guided, self.prefix = model, guided, prefix
        self.n_prefix = model.config.n_prefix_tokens
        self.cache = model.setup_cache(n_slots * (2 if guided else 1), capacity)
        self.slots: list[Slot | None] = [None] * n_slots

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def rows(self, slots: list[int]) -> torch.Tensor:
        """Cache rows of the given slots (conditional rows, then their unconditional twins)."""
        index = torch.tensor(slots, dtype=torch.long, device=self.cache.lengths.device)
        return torch.cat([index, index + self.n_slots]) if self.guided else index

    def place(self, slot: int, sample: Slot) -> None:
        """Start a sample in a slot: fresh prefix, empty CIF part."""
        rows = self.rows([slot])
        # prefix rows are [cond] or [cond, uncond], one each: the rows of one slot take them in order
        self.cache.write_prefix(rows, [(k, v) for k, v in self.prefix])
        self.slots[slot] = sample

    def rewind(self, slot: int, cif_tokens: int) -> None:
        rows = self.rows([slot])
        self.cache.rewind(rows, torch.full_like(rows, self.n_prefix + cif_tokens))

    def step(self) -> torch.Tensor:
        """Feed the slots' pending tokens in one forward over their rows only; return next-token
        logits per row (zeros for a row that fed nothing: an idle slot, or one waiting on its check
        with nothing to feed, whose draw the sampler ignores). Rows left out cost nothing, so a
        batch that is filling up or draining runs at the speed of the slots it holds."""
        for i, sample_ in enumerate(self.slots):
            if sample_ is not None and not sample_.pending and not sample_.waiting:
                self.rewind(i, len(sample_.tokens) - 1)  # its check just ended: feed the last token again
                sample_.pending = sample_.tokens[-1:]
        active = [i for i, s in enumerate(self.slots) if s is not None and s.pending]
        rows = self.rows(active)
        pending = [self.slots[i].pending for i in active] * (2 if self.guided else 1)
        device = self.cache.lengths.device
        tokens = torch.tensor([t for p in pending for t in p], dtype=torch.long, device=device)
        counts = torch.tensor([len(p) for p in pending], dtype=torch.long, device=device)
        computed = self.model.forward_cached(tokens, counts, self.cache, rows)
        logits = computed.new_zeros((self.cache.rows, computed.shape[1]))
        logits[rows] = computed
        for i in active:
            self.slots[i].pending = []
        return logits


DEFAULT_BATCH_SIZE = 32
BATCH_SIZES = (8, 16, 32, 64)  # tried by warm_up
BATCH_TOLERANCE = 0.9  # the smallest batch size within this share of the best throughput is kept
measured_batch_size = DEFAULT_BATCH_SIZE  # set by warm_up; used where settings.batch_size is None


def batch_size_of(settings: SamplingSettings) -> int:
    return settings.batch_size or measured_batch_size


@torch.inference_mode()
def warm_up(model: CrystaLLMPKV, max_threads: int | None = None) -> dict:
    """Prepare a process for sampling before a user waits on it: the first forward builds the
    native attention kernel and packs the weights, here rather than in a request. Time decode
    steps at 1 thread and at every core (or `max_threads`, a worker's share) and keep the faster
    (on a busy or shared machine one thread often wins: OpenMP threads wait on each other), and
    time them at each of BATCH_SIZES rows to set the
    default batch size: the smallest within BATCH_TOLERANCE of the best rows per second (more
    slots than that only delay every structure). An fp32 model on a CPU gets int8 linear layers
    (`int8_linear`) where they make the step faster (CRYSTALLM_INT8=0: never).
    Returns {"seconds", "threads", "step_ms": {threads: ms}, "int8_step_ms", "linear_layers",
    "batch_size", "batch_ms": {rows: ms}}."""
    global measured_batch_size
    started = time.perf_counter()
    device = next(model.parameters()).device
    timings = {}
    if device.type == "cpu":
        cores = max_threads or os.cpu_count() or 1
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            timings[threads] = probe_step_ms(model)
        torch.set_num_threads(min(timings, key=timings.get))
    int8_ms = choose_int8(model, min(timings.values())) if timings else None
    batch_ms = {rows: step_milliseconds(model, rows=rows, cached=200, repeats=4, capacity=201) for rows in BATCH_SIZES}
    best = max(rows / ms for rows, ms in batch_ms.items())
    measured_batch_size = min(rows for rows, ms in batch_ms.items() if rows / ms >= BATCH_TOLERANCE * best)
    return {"seconds": round(time.perf_counter() - started, 2), "threads": torch.get_num_threads(),
            "step_ms": {k: round(v, 2) for k, v in timings.items()},
            "int8_step_ms": None if int8_ms is None else round(int8_ms, 2), "linear_layers": linear_layers(model),
            "batch_size": measured_batch_size,
            "batch_ms": {k: round(v, 2) for k, v in batch_ms.items()}}


def choose_int8(model: CrystaLLMPKV, fp32_ms: float | None = None) -> float | None:
    """Enable int8 linear layers for an fp32 model on a CPU if a decode step at 16 rows is faster
    with them than in fp32 (`fp32_ms`, measured here when None); their step time, None where they
    were not tried. Their cost in the model's distribution: KL 0.0001 nats per token
    (scripts/measure_int8.py)."""
    enable_int8(model, False)
    device = next(model.parameters()).device
    if next(model.parameters()).dtype != torch.float32 or device.type != "cpu" or not int8_available() \
            or os.environ.get("CRYSTALLM_INT8", "1") == "0":
        return None
    if fp32_ms is None:
        fp32_ms = probe_step_ms(model)
    enable_int8(model)
    int8_ms = probe_step_ms(model)
    enable_int8(model, int8_ms < fp32_ms)
    return int8_ms


def linear_layers(model: CrystaLLMPKV) -> str:
    """How the model's products run here, for a run's manifest: "int8", "bf16 (oneDNN-packed)" or the dtype."""
    dtype = next(model.parameters()).dtype
    if int8_enabled(model):
        return "int8 (fbgemm, dynamic)"
    if dtype == torch.bfloat16 and next(model.parameters()).device.type == "cpu" and packing_available():
        return "bf16 (oneDNN-packed)"
    return str(dtype).removeprefix("torch.")


def probe_step_ms(model: CrystaLLMPKV) -> float:
    """The warm-up's yardstick for choosing threads and int8 layers: a decode step of 16 rows over
    120 cached tokens (short, so preparing a model stays quick)."""
    return step_milliseconds(model, rows=16, cached=120, capacity=121)


@torch.inference_mode()
def step_milliseconds(model: CrystaLLMPKV, rows: int, cached: int, repeats: int = 6,
                      capacity: int | None = None) -> float:
    """Median milliseconds of a decode step (one token per row) over `cached` tokens per row, in a
    cache of `capacity` CIF tokens per row (None: the model's context, as sampling allocates)."""
    device = next(model.parameters()).device
    cached = min(cached, model.config.max_cif_tokens - 1)  # a short-context model: what it holds
    cache = model.setup_cache(rows, capacity)
    model.forward_cached(torch.zeros(rows * cached, dtype=torch.long, device=device),
                         torch.full((rows,), cached, dtype=torch.long, device=device), cache)
    ones = torch.ones(rows, dtype=torch.long, device=device)
    times = []
    for _ in range(repeats):
        cache.lengths -= 1
        started = time.perf_counter()
        model.forward_cached(torch.zeros(rows, dtype=torch.long, device=device), ones, cache)
        times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)[len(times) // 2]


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
    constraint_factory: Callable[[], DecodingConstraint] | None = None,
    head_start: int = 0,
) -> list[FinishedSample]:
    """Draw `n` CIF token sequences for one condition vector; returns them sorted by index.

    With `constraint_factory`, every sample is decoded under a fresh constraint (the caller
    decides which; `settings.decoding` is for the caller, the sampler does not read it).
    With `head_start` > 0, that many slots run alone until the first sample ends (an
    interactive request shows its first structure sooner); 0 starts every slot at once.
    """
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

    cond = torch.tensor([conditions], dtype=torch.float32, device=device)
    present = torch.tensor([condition_present], dtype=torch.bool, device=device)
    if guided:  # the twin: the guided properties "unknown", the others as given
        dropped = torch.tensor([[settings.guide in ("all", name) for name in PROPERTIES]], device=device)
        twin = present & ~dropped
        cond, present = torch.cat([cond, cond * twin]), torch.cat([present, twin])
    prefix = model.conditioning(cond.to(param.dtype), present)  # computed once, reused for every slot

    batch = SlotBatch(model, min(n, batch_size_of(settings)), guided, capacity, prefix)
    masks = MaskCache(cfg.vocab_size, banned_ids, device)
    finished: list[FinishedSample] = []
    next_index = 0

    def new_sample() -> Slot:
        nonlocal next_index
        constraint = constraint_factory() if constraint_factory is not None else None
        forced = constraint.start(list(prompt_ids)).forced if constraint is not None else []
        tokens = list(prompt_ids) + forced
        next_index += 1
        return Slot(next_index - 1, tokens, list(tokens), constraint, sample_generator(seed, next_index - 1))

    def finish(slot: int, stop_reason: str, note: str | None = None) -> None:
        sample_ = batch.slots[slot]
        tokens = sample_.tokens[:capacity]
        done = FinishedSample(sample_.index, tokens, stop_reason, len(tokens) - len(prompt_ids),
                              time.perf_counter() - sample_.started_at,
                              sample_.constraint.retry_counts() if sample_.constraint is not None else None, note)
        finished.append(done)
        if on_finished is not None:
            on_finished(done)
        if next_index < n:
            batch.place(slot, new_sample())
        else:
            batch.slots[slot] = None

    def follow(slot: int, sample_: Slot, step: ConstraintStep, written: list[int]) -> None:
        """Apply what the constraint said after `written` (the sampled token, or none after a wait)."""
        sample_.waiting = step.waiting
        if step.gave_up:
            sample_.tokens += written
            finish(slot, "gave up", step.gave_up)
            return
        if step.rewind_to is not None:
            keep = step.rewind_to
            batch.rewind(slot, keep - 1)  # the last kept token is fed again for fresh logits
            sample_.tokens = sample_.tokens[:keep] + step.forced
            sample_.pending = sample_.tokens[keep - 1:]
            return
        sample_.tokens += [*written, *step.forced]
        sample_.pending = [*written, *step.forced]
        if step.finished:
            finish(slot, "eos")
        elif len(sample_.tokens) >= capacity:
            finish(slot, "length")

    for slot in range(min(head_start, batch.n_slots) if head_start > 0 else batch.n_slots):
        batch.place(slot, new_sample())

    while any(s is not None for s in batch.slots):
        if should_cancel is not None and should_cancel():
            break
        # A head start is over once a sample ended: fill the batch, between steps (a slot placed
        # mid-step would take a token it never drew).
        if finished and next_index < n:
            for slot in range(batch.n_slots):
                if batch.slots[slot] is None and next_index < n:
                    batch.place(slot, new_sample())
        for slot, sample_ in enumerate(batch.slots):
            while sample_ is not None and len(sample_.tokens) >= capacity:  # forced tokens filled the context
                finish(slot, "length")
                sample_ = batch.slots[slot]
        if all(s is None or (s.waiting and not s.pending) for s in batch.slots):
            time.sleep(0.001)  # every slot waits on its check: nothing to compute meanwhile
            for slot, sample_ in enumerate(batch.slots):
                step = sample_.constraint.poll() if sample_ is not None else None
                if step is not None:
                    follow(slot, sample_, step, [])
            continue
        logits = batch.step()
        if guided:
            uncond, logits = logits[batch.n_slots:], logits[: batch.n_slots]
            logits = uncond + settings.guidance_scale * (logits - uncond)
        if constraint_factory is None:  # one mask for every row
            allowed, empty = masks.free, [False] * batch.n_slots
        else:
            allowed = torch.stack([masks.mask(s.constraint.allowed() if s is not None and not s.waiting else None)
                                   for s in batch.slots])
            nothing = ~allowed.any(dim=1)
            allowed[nothing] = masks.free  # (a slot with nothing allowed is given up below)
            empty = nothing.tolist()
        logits = logits.masked_fill(~allowed, float("-inf"))
        # a waiting slot draws nothing: how long its check takes must not shift its random stream
        uniforms = torch.tensor([float(torch.rand((), generator=s.generator)) if s is not None and not s.waiting
                                 else 0.5 for s in batch.slots], device=device)
        tokens = draw(filter_logits(logits, settings).softmax(dim=-1), uniforms)

        for slot, token in enumerate(tokens.tolist()):
            sample_ = batch.slots[slot]
            if sample_ is None:
                continue
            if sample_.waiting:
                step = sample_.constraint.poll()
                if step is not None:
                    follow(slot, sample_, step, [])
                continue
            if empty[slot]:
                finish(slot, "gave up", "no token is allowed here (element set too narrow?)")
                continue
            if sample_.constraint is not None:
                follow(slot, sample_, sample_.constraint.advance(token), [token])
                continue
            sample_.tokens.append(token)
            sample_.pending = [token]
            if token == eos_id:
                finish(slot, "eos")
            elif len(sample_.tokens) >= capacity:
                finish(slot, "length")

    return sorted(finished, key=lambda s: s.index)
