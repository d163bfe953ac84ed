"""int8 linear layers give nearly the fp32 logits, never stale ones, only where enabled, and the
warm-up keeps them only when they are faster."""
from __future__ import annotations

import pytest
import torch
from conftest import decode_two_rows as decode
from conftest import tiny_config

from crystallm_core.lm import int8_linear, sampler
from crystallm_core.lm.model import CrystaLLMPKV

pytestmark = pytest.mark.skipif(not int8_linear.int8_available(), reason="torch built without fbgemm")


def fp32_model():
    torch.manual_seed(0)
    return CrystaLLMPKV(tiny_config()).eval()


def test_int8_layers_give_nearly_the_fp32_distribution():
    model, tokens = fp32_model(), torch.randint(0, 370, (2, 10))
    with torch.inference_mode():
        plain = decode(model, tokens)
        int8_linear.enable_int8(model)
        quantized = decode(model, tokens)
    assert not torch.equal(plain, quantized)  # the int8 path did run
    p, q = torch.log_softmax(plain, -1), torch.log_softmax(quantized, -1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert kl.max() < 0.01, kl  # nats per token; the shipped model: 0.0001 (scripts/measure_int8.py)


def test_only_an_enabled_model_in_fp32_inference_uses_them():
    model = fp32_model()
    hidden = torch.zeros(1)
    with torch.inference_mode():
        assert int8_linear.int8_linears(model, hidden) is None  # not enabled
        int8_linear.enable_int8(model)
        assert int8_linear.int8_linears(model, hidden) is not None
        assert int8_linear.int8_linears(model, hidden.to(torch.bfloat16)) is None
    assert int8_linear.int8_linears(model, hidden) is None  # gradients on: training never sees them
    int8_linear.enable_int8(model, False)
    with torch.inference_mode():
        assert int8_linear.int8_linears(model, hidden) is None


def test_weights_changed_in_place_are_quantized_again():
    model, tokens = fp32_model(), torch.randint(0, 370, (2, 10))
    int8_linear.enable_int8(model)
    with torch.inference_mode():
        before = decode(model, tokens)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)  # as a fine-tuning step would, in place
    fresh = CrystaLLMPKV(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    int8_linear.enable_int8(fresh)
    with torch.inference_mode():
        after, expected = decode(model, tokens), decode(fresh, tokens)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected)


@pytest.mark.parametrize("int8_ms, kept", [(0.5, True), (2.0, False)])
def test_warm_up_keeps_int8_only_when_faster(monkeypatch, int8_ms, kept):
    model, threads = fp32_model(), torch.get_num_threads()
    monkeypatch.setattr(sampler, "step_milliseconds",
                        lambda m, rows, **kw: int8_ms if int8_linear.int8_enabled(m) else 1.0)
    try:
        result = sampler.warm_up(model)
    finally:
        torch.set_num_threads(threads)
    assert int8_linear.int8_enabled(model) is kept
    assert result["linear_layers"] == ("int8 (fbgemm, dynamic)" if kept else "float32")


def test_int8_can_be_turned_off(monkeypatch):
    model, threads = fp32_model(), torch.get_num_threads()
    monkeypatch.setenv("CRYSTALLM_INT8", "0")
    monkeypatch.setattr(sampler, "step_milliseconds", lambda m, rows, **kw: 0.1 if int8_linear.int8_enabled(m) else 1.0)
    try:
        result = sampler.warm_up(model)
    finally:
        torch.set_num_threads(threads)
    assert not int8_linear.int8_enabled(model) and result["int8_step_ms"] is None


def test_choose_int8_times_fp32_itself_when_not_given(monkeypatch):
    """As `align` calls it, once per round's freshly loaded model."""
    model = fp32_model()
    monkeypatch.setattr(sampler, "step_milliseconds", lambda m, rows, **kw: 0.5 if int8_linear.int8_enabled(m) else 1.0)
    assert sampler.choose_int8(model) == 0.5 and int8_linear.int8_enabled(model)
    assert sampler.choose_int8(model.to(torch.bfloat16)) is None and not int8_linear.int8_enabled(model)
