"""The matmul attention (the fallback of the native kernel) over a bf16 cache equals plain fp32 attention."""
from __future__ import annotations

import pytest
import torch

from crystallm_core.lm.cache_attention import matmul_attention


def attention_inputs(rows: int, queries: int, span: int, capacity: int = 64, cache_rows: int = 6):
    """Queries of `rows` rows over a layer's whole bf16 cache of `cache_rows` rows (as attention reads it)."""
    torch.manual_seed(0)
    q = torch.randn(rows, 2, queries, 16).to(torch.bfloat16)
    keys = torch.randn(cache_rows, 2, capacity, 16).to(torch.bfloat16)
    values = torch.randn(cache_rows, 2, capacity, 16).to(torch.bfloat16)
    last = span - queries + torch.arange(queries)  # causal within the new tokens
    hidden = torch.arange(span)[None, :] > last[:, None]
    bias = torch.zeros(rows, 1, queries, span).masked_fill(hidden, float("-inf"))
    return q, keys, values, bias


def reference(q, keys, values, bias, rows=None):
    """Plain fp32 attention over an explicit copy of the rows' visible positions."""
    span = bias.shape[-1]
    picked = slice(0, q.shape[0]) if rows is None else rows
    k, v = keys[picked, :, :span].float(), values[picked, :, :span].float()
    weights = ((q.float() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias).softmax(-1)
    return weights @ v


@pytest.mark.parametrize("rows, queries, span", [(3, 1, 40), (4, 3, 33), (1, 1, 7)])
@pytest.mark.parametrize("gathered", [False, True])
def test_matmul_attention_equals_the_reference(rows, queries, span, gathered):
    inputs = attention_inputs(rows, queries, span)
    picked = torch.tensor([5, 0, 3, 2][:rows]) if gathered else None  # any rows, in any order
    torch.testing.assert_close(matmul_attention(*inputs, picked), reference(*inputs, picked), atol=1e-5, rtol=1e-5)
