"""The model's linear layers as int8 weights for fbgemm, for sampling on CPUs without fast bf16.

On an AVX2-only CPU (no AVX-512, so no oneDNN bf16 packing: `packed_linear`) a decode step runs
its products in fp32, and they are half of the sampling time. fbgemm multiplies int8 weights by
activations quantized on the fly (`quantized.linear_dynamic`): at the app's 64 rows the model's
four products per block ran 1.66x faster here (AVX2 EPYC, 1 thread: 5.6 vs 3.4 ms per block;
2.45x at 16 rows). The weights are quantized once per output channel (symmetric); the shipped
weights are bf16, so they already carry only 8 significant bits.

What it costs is measured, not assumed: `scripts/measure_int8.py` reads the fp32 model's own
samples under both and prints the KL divergence per token and the step times side by side
(shipped model: KL 0.00009 nats per token; a whole decode step 1.68x faster at 16 rows, 1.37x
at 64).
Activations are quantized per call, over every row of the step, so a sample's rounding can
depend on its neighbours in the batch (the random draws never do: `sampler.sample_generator`).

The quantized copies are made on first use and again when a weight changes in place, so they
never serve stale weights (as `packed_linear` does).
"""
from __future__ import annotations

import functools
import warnings
import weakref

import torch
from torch import nn

from crystallm_core.lm.packed_linear import LinearCopies


@functools.cache
def int8_available() -> bool:
    """fbgemm's int8 products exist in this torch build (x86 with AVX2 or newer; torch marks these
    operators deprecated, so a build without them simply samples in fp32)."""
    try:
        return ("fbgemm" in torch.backends.quantized.supported_engines and torch.cpu._is_avx2_supported()
                and all(hasattr(torch.ops.quantized, op) for op in ("linear_prepack", "linear_dynamic")))
    except (AttributeError, RuntimeError):
        return False


class Int8Linears(LinearCopies):
    """Int8 weights of a GPT-2 transformer's Conv1D layers and LM head (see the module docstring)."""

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> object:
        """fbgemm's packed int8 form of an (out, in) weight: one symmetric scale per output row."""
        weight = weight.detach().float().contiguous()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # torch marks its quantized tensors deprecated; fbgemm still takes them
            warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated", category=UserWarning)
            quantized = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long), 0,
                                                   torch.qint8)
        return torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.detach().float())

    def __call__(self, module: nn.Module, x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
        """module(x), then the tanh-approximated GELU if asked. reduce_range: 7-bit activations keep
        AVX2's 16-bit pairwise sums from saturating (what torch's dynamic quantization does on fbgemm)."""
        out = torch.ops.quantized.linear_dynamic(x, self.packed[id(module)], True)
        return nn.functional.gelu(out, approximate="tanh") if gelu_tanh else out


INT8: weakref.WeakKeyDictionary[nn.Module, Int8Linears] = weakref.WeakKeyDictionary()


def enable_int8(model: nn.Module, enabled: bool = True) -> None:
    """Let `int8_linears` serve this model's fp32 inference on the CPU (the sampler's warm-up decides)."""
    if enabled:
        INT8.setdefault(model, Int8Linears(model))
    else:
        INT8.pop(model, None)


def int8_enabled(model: nn.Module) -> bool:
    return model in INT8


def int8_linears(model: nn.Module, hidden: torch.Tensor) -> Int8Linears | None:
    """The model's int8 linears, current with its weights, where they serve: a model they were
    enabled for, fp32 inference on a CPU (no gradients). None elsewhere."""
    linears = INT8.get(model)
    if linears is None or hidden.device.type != "cpu" or hidden.dtype != torch.float32 or torch.is_grad_enabled():
        return None
    linears.refresh()
    return linears
