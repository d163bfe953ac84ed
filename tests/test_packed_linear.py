"""bf16 inference through oneDNN-packed weights gives the plain layers' logits, and never stale ones."""
from __future__ import annotations

import pytest
import torch
from conftest import decode_two_rows as decode
from conftest import tiny_config

from crystallm_core.lm import packed_linear
from crystallm_core.lm.model import CrystaLLMPKV

pytestmark = pytest.mark.skipif(not packed_linear.packing_available(), reason="torch built without oneDNN")


def bf16_model():
    torch.manual_seed(0)
    return CrystaLLMPKV(tiny_config()).eval().to(torch.bfloat16)


def test_packed_weights_give_the_plain_layers_logits(monkeypatch):
    model, tokens = bf16_model(), torch.randint(0, 370, (2, 10))
    with torch.inference_mode():
        packed = decode(model, tokens)
        assert packed_linear.PACKED.get(model) is not None  # the packed path did run
        monkeypatch.setattr(packed_linear, "packing_available", lambda: False)
        plain = decode(model, tokens)
    # the same bf16 products in another blocking order: differences of a few bf16 roundings
    torch.testing.assert_close(packed, plain, atol=0.05, rtol=0.02)


def test_weights_changed_in_place_are_packed_again():
    model, tokens = bf16_model(), torch.randint(0, 370, (2, 10))
    with torch.inference_mode():
        before = decode(model, tokens)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)  # as a fine-tuning step would, in place
    with torch.inference_mode():
        after = decode(model, tokens)
        fresh = decode(bf16_model_with(model), tokens)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh)


def bf16_model_with(model):
    """A new model object holding a copy of `model`'s current weights (nothing packed yet)."""
    copy = CrystaLLMPKV(model.config).eval().to(torch.bfloat16)
    copy.load_state_dict(model.state_dict())
    return copy


def test_training_never_uses_packed_weights():
    model = bf16_model()
    assert packed_linear.packed_linears(model, torch.zeros(1, dtype=torch.bfloat16)) is None  # grad enabled
    with torch.inference_mode():
        assert packed_linear.packed_linears(model, torch.zeros(1)) is None  # fp32
