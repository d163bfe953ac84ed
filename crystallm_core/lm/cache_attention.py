"""Attention of a few query tokens per row over that row's cached keys and values, with matmuls.

The fallback of `CrystaLLMPKV.forward_cached` where the native kernel (`native_attention`) does
not serve: GPUs, dtypes it does not take, machines without a C++ compiler with OpenMP
(CRYSTALLM_NATIVE=0 forces it). `kv_cache.RowQueries` batches a step's tokens into padded
groups for it. Products and the softmax run in fp32 over an fp32 copy of the rows' cache.
"""
from __future__ import annotations

import torch


def visible(cache: torch.Tensor, rows: torch.Tensor | None, batch: int, span: int) -> torch.Tensor:
    """Positions 0…span-1 of the cache rows queried: the first `batch` rows (rows None) or `rows`."""
    return cache[:batch, :, :span] if rows is None else cache[rows, :, :span]


def matmul_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ/√d + bias)·v in fp32: (B, H, T, D) queries over the rows' first S cached
    positions (S = bias.shape[-1]) of a (R, H, C, D) cache."""
    batch, span = queries.shape[0], bias.shape[-1]
    keys, values = visible(keys, rows, batch, span), visible(values, rows, batch, span)
    scale = queries.shape[-1] ** -0.5
    scores = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scale + bias
    return torch.matmul(scores.softmax(-1), values.float())
