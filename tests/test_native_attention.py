"""The native cache kernel writes each token's key and value and attends exactly like plain fp32
attention over the row's positions up to the token; bad indexes raise instead of touching memory."""
from __future__ import annotations

import pytest
import torch

from crystallm_core.lm import native_attention as native_module
from crystallm_core.lm.native_attention import NativeAttention

pytestmark = pytest.mark.skipif(not native_module.native_attention.available(),
                                reason="no C++ compiler with OpenMP on this machine")


def cache_and_tokens(dtype: torch.dtype, head_dim: int, n_head: int = 2, rows: int = 5, capacity: int = 48):
    torch.manual_seed(0)
    keys = torch.randn(rows, n_head, capacity, head_dim).to(dtype)
    values = torch.randn(rows, n_head, capacity, head_dim).to(dtype)
    # row 3 feeds a span of three tokens (they must see each other), row 0 one token, row 4 one
    # token at the last position of the cache
    token_rows = torch.tensor([3, 3, 3, 0, 4])
    positions = torch.tensor([20, 21, 22, 7, capacity - 1])
    qkv = torch.randn(5, 3 * n_head * head_dim).to(dtype)
    return keys, values, qkv, token_rows, positions


def reference(keys, values, qkv, token_rows, positions):
    """Write with indexing, then attend token by token in fp32."""
    keys, values = keys.clone(), values.clone()
    n_head, head_dim = keys.shape[1], keys.shape[3]
    q, k, v = (part.view(-1, n_head, head_dim) for part in qkv.split(n_head * head_dim, dim=1))
    keys[token_rows, :, positions] = k
    values[token_rows, :, positions] = v
    out = []
    for n, (row, last) in enumerate(zip(token_rows.tolist(), positions.tolist())):
        kk, vv = keys[row, :, :last + 1].float(), values[row, :, :last + 1].float()
        weights = (q[n].float()[:, None] @ kk.transpose(-1, -2) * head_dim ** -0.5).softmax(-1)
        out.append((weights @ vv)[:, 0].reshape(-1))
    return keys, values, torch.stack(out)


@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 64), (torch.bfloat16, 16), (torch.float32, 64),
                                             (torch.float32, 16)])
def test_writes_then_attends_like_the_reference(dtype, head_dim):
    keys, values, qkv, token_rows, positions = cache_and_tokens(dtype, head_dim)
    want_keys, want_values, want = reference(keys, values, qkv, token_rows, positions)
    got = native_module.native_attention(qkv, keys, values, token_rows, positions)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
    # bf16 output: one rounding of the fp32 result; fp32: summation order only
    tolerance = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.float(), want, **tolerance)
    assert got.dtype == dtype


@pytest.mark.parametrize("row, position", [(5, 3), (-1, 3), (0, 48), (0, -1)])
def test_a_token_outside_the_cache_raises_and_writes_nothing(row, position):
    keys, values, qkv, token_rows, positions = cache_and_tokens(torch.float32, 16)
    token_rows[1], positions[1] = row, position
    before = keys.clone()
    with pytest.raises(IndexError, match="outside the cache"):
        native_module.native_attention(qkv, keys, values, token_rows, positions)
    assert torch.equal(keys, before)


def test_without_a_compiler_it_says_so_once_and_stays_off(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CRYSTALLM_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    kernel = NativeAttention()
    assert not kernel.available() and not kernel.available()
    assert sum("native attention kernel unavailable" in r.message for r in caplog.records) == 1
    assert not kernel.supports(torch.zeros(1), torch.zeros(1, 1, 1, 1))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("CRYSTALLM_NATIVE", "0")
    assert not NativeAttention().available()


def test_the_avx512_path_without_bf16_dot_products_gives_the_same(monkeypatch, tmp_path):
    """CPUs with AVX-512 but no AVX512-BF16 widen the rows to fp32 instead: built here with that
    instruction set switched off, the kernel must agree with the reference too."""
    monkeypatch.setenv("CRYSTALLM_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(native_module, "FLAGS", (*native_module.FLAGS, "-mno-avx512bf16"))
    kernel = NativeAttention()
    if not kernel.available():
        pytest.skip("this compiler or CPU has no such switch")
    keys, values, qkv, token_rows, positions = cache_and_tokens(torch.bfloat16, 64)
    _, _, want = reference(keys, values, qkv, token_rows, positions)
    torch.testing.assert_close(kernel(qkv, keys, values, token_rows, positions).float(), want, atol=1e-2, rtol=1e-2)
