"""The model's linear layers with weights pre-packed for oneDNN, for bf16 inference on a CPU.

A decode step multiplies a few rows by every weight matrix: the weights are read once per
step and the layout they are read in decides the speed. `torch.nn.functional.linear` hands
oneDNN the plain (out, in) matrix each call; packed once into oneDNN's blocked layout (what
`torch.compile` with freezing does), the same products ran 1.3-2x faster here
(scripts/bench_sampler.py's setting: 36 vs 76 µs for a 512x2048 layer at 1 row, 105 vs 144 µs at
32 rows). The MLP's tanh-GELU is fused into its first product.

The packed copies are made on first use and made again when a weight changes in place
(fine-tuning in the same process), so they never serve stale weights.
"""
from __future__ import annotations

import functools
import weakref
from pathlib import Path

import torch
from torch import nn


@functools.cache
def packing_available() -> bool:
    """oneDNN can pack bf16 weights here: it needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, and on an
    AVX2-only CPU raises instead (the sampler then keeps the plain layers)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    return torch.cpu._is_avx512_supported() or "avx_ne_convert" in flags


def version_of(weight: torch.Tensor) -> int:
    """How often the weight was changed in place (tensors made in inference mode keep no count)."""
    return -1 if weight.is_inference() else weight._version


class LinearCopies:
    """Copies of a GPT-2 transformer's Conv1D weights and LM head in a faster form (`pack`: this
    module's oneDNN layout, or `int8_linear`'s int8), made again whenever a weight is replaced or
    changed in place, so they never serve stale weights."""

    def __init__(self, model: nn.Module):
        self.layers = [m for block in model.transformer.h
                       for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
        self.head = model.lm_head
        self.version: tuple = ()
        self.packed: dict[int, object] = {}

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> object:
        """The faster form of one (out, in) weight and its bias."""
        raise NotImplementedError

    def refresh(self) -> None:
        """Pack again if any weight was replaced or changed in place since the last packing."""
        weights = [m._parameters["weight"] for m in [*self.layers, self.head]]  # (no Module.__getattr__: every step)
        version = tuple((w.data_ptr(), version_of(w)) for w in weights)
        if version != self.version:
            # GPT-2's Conv1D keeps its weight as (in, out); both packings take the (out, in) matrix.
            self.packed = {id(m): self.pack(m.weight.t(), m.bias) for m in self.layers}
            self.packed[id(self.head)] = self.pack(self.head.weight, self.head.bias)
            self.version = version


class PackedLinears(LinearCopies):
    """Packed weights of a GPT-2 transformer's Conv1D layers and LM head (see the module docstring)."""

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # the bias stays apart: the fused product adds it at call time
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 32)  # 32: a batch-size hint

    def __call__(self, module: nn.Module, x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
        """module(x), then the tanh-approximated GELU if asked (fused into the product)."""
        attr, algorithm = ("gelu", "tanh") if gelu_tanh else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed[id(module)], module.bias, attr, [], algorithm)


PACKED: weakref.WeakKeyDictionary[nn.Module, PackedLinears] = weakref.WeakKeyDictionary()


def packed_linears(model: nn.Module, hidden: torch.Tensor) -> PackedLinears | None:
    """The model's packed linears, current with its weights, where they serve: inference in bf16 on
    a CPU with oneDNN (packed weights have no gradients). None elsewhere."""
    if hidden.device.type != "cpu" or hidden.dtype != torch.bfloat16 or torch.is_grad_enabled() \
            or not packing_available():
        return None
    packed = PACKED.get(model)
    if packed is None:
        packed = PACKED[model] = PackedLinears(model)
    packed.refresh()
    return packed
