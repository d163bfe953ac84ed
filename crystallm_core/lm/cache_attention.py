"""Attention of a few query tokens per row over that row's cached keys and values.

A decode step is one query per row against a few hundred cached positions: per (row, head) a
matrix-vector product. Through `torch.matmul` that is thousands of tiny GEMV calls per step,
each costing more in overhead than the few kB it reads (scripts/bench_sampler.py: 7 GB/s of a
read bandwidth near 40). Written as products and sums instead, `torch.compile` fuses it into
one loop nest per layer that reads each bf16 key and value once and does every product, sum
and the softmax in fp32: 2-3x less time per step than fp32 matmuls on this CPU, with half the
cache memory.

`attend(queries, keys, values, bias, rows)` (keys and values: a layer's whole cache) picks that compiled kernel for short query spans on a CPU
where compiling works (a C++ compiler is needed; CRYSTALLM_COMPILE=0 turns it off) and the
matmul form otherwise (long spans such as a prefill, GPUs, no compiler). Both return fp32.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

SHORT_SPAN = 8  # query tokens per row up to which the fused kernel is used (decode steps, forced spans)


def visible(cache: torch.Tensor, rows: torch.Tensor | None, batch: int, span: int) -> torch.Tensor:
    """Positions 0…span-1 of the cache rows queried: the first `batch` rows (rows None) or `rows`."""
    return cache[:batch, :, :span] if rows is None else cache[rows, :, :span]


def fused_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ/√d + bias)·v, products and sums in fp32; (B, H, T, D) queries over the rows'
    first S cached positions (S = bias.shape[-1]) of a (R, H, C, D) cache. Compiled, the row
    gather is a load inside the loop, not a copy of the rows."""
    batch, span = queries.shape[0], bias.shape[-1]
    keys, values = visible(keys, rows, batch, span), visible(values, rows, batch, span)
    scale = queries.shape[-1] ** -0.5
    scores = (queries[:, :, :, None, :].float() * keys[:, :, None].float()).sum(-1) * scale + bias
    weights = scores.softmax(-1)
    return (weights[..., None] * values[:, :, None].float()).sum(-2)


def matmul_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
    """The same with two fp32 matmuls (copies the rows' bf16 cache to fp32: for long spans and GPUs)."""
    batch, span = queries.shape[0], bias.shape[-1]
    keys, values = visible(keys, rows, batch, span), visible(values, rows, batch, span)
    scale = queries.shape[-1] ** -0.5
    scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scale + bias
    return torch.matmul(scores.softmax(-1), values.float())


class AttentionKernels:
    """Chooses and holds the compiled kernel. If its first call fails (no C++ compiler, an
    unsupported platform) the matmul form is used for good; once it has worked, an error in it
    is a real error and is raised, never hidden behind the fallback."""

    def __init__(self) -> None:
        self.compiled = None
        self.failed = False
        self.proven = False

    def compiling(self) -> bool:
        return not self.failed and os.environ.get("CRYSTALLM_COMPILE", "1") != "0"

    def __call__(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        if keys.device.type == "cpu" and queries.shape[2] <= SHORT_SPAN and self.compiling():
            if self.proven:
                return self.compiled(queries, keys, values, bias, rows)
            try:
                if self.compiled is None:
                    # Strides differ between a view of the first rows and a gathered copy, and
                    # size 1 is specialised: a run meets about a dozen variants, more than
                    # dynamo's default of 8 (past it, the unfused eager form would run).
                    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                    self.compiled = torch.compile(fused_attention, dynamic=True)
                out = self.compiled(queries, keys, values, bias, rows)
                self.proven = True
                return out
            except Exception as error:  # compiling itself failed: stay correct with matmuls
                log.warning("compiled attention unavailable (%s): using matmuls", error)
                self.failed = True
        return matmul_attention(queries, keys, values, bias, rows)


attend = AttentionKernels()
