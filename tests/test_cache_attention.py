"""The compiled fused attention over a bf16 cache equals the fp32 matmul form."""
from __future__ import annotations

import pytest
import torch

from crystallm_core.lm.cache_attention import (
    AttentionKernels,
    fused_attention,
    matmul_attention,
)


def attention_inputs(rows: int, queries: int, span: int, capacity: int = 64):
    torch.manual_seed(0)
    q = torch.randn(rows, 2, queries, 16).to(torch.bfloat16)
    keys = torch.randn(rows, 2, capacity, 16).to(torch.bfloat16)[:, :, :span]  # a slice, as the cache is read
    values = torch.randn(rows, 2, capacity, 16).to(torch.bfloat16)[:, :, :span]
    last = span - queries + torch.arange(queries)  # causal within the new tokens
    hidden = torch.arange(span)[None, :] > last[:, None]
    bias = torch.zeros(rows, 1, queries, span).masked_fill(hidden, float("-inf"))
    return q, keys, values, bias


@pytest.mark.parametrize("rows, queries, span", [(3, 1, 40), (4, 3, 33), (1, 1, 7)])
def test_fused_equals_matmul(rows, queries, span):
    inputs = attention_inputs(rows, queries, span)
    torch.testing.assert_close(fused_attention(*inputs), matmul_attention(*inputs), atol=1e-5, rtol=1e-5)


def test_compiled_kernel_equals_matmul_and_follows_new_spans(monkeypatch):
    monkeypatch.setenv("CRYSTALLM_COMPILE", "1")
    kernels = AttentionKernels()
    for span in (20, 21, 35):  # dynamic shapes: a new span is not a new kernel
        inputs = attention_inputs(3, 1, span)
        torch.testing.assert_close(kernels(*inputs), matmul_attention(*inputs), atol=1e-5, rtol=1e-5)
    assert not kernels.failed and kernels.compiled is not None


def test_switched_off_uses_matmuls(monkeypatch):
    monkeypatch.setenv("CRYSTALLM_COMPILE", "0")
    kernels = AttentionKernels()
    inputs = attention_inputs(2, 1, 10)
    torch.testing.assert_close(kernels(*inputs), matmul_attention(*inputs))
    assert kernels.compiled is None
