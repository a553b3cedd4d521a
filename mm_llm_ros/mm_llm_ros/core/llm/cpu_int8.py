"""`llm.quantization: int8` on the CPU: decode tokens through torch's VNNI int8 kernel (issue 18).

On the CPU, torchao's weight-only `Int8Tensor` (what `quantization.quantize_linear_weights` applies) casts each
int8 weight back to float per call: it saves memory at rest and no time. A decode step of the embedded SmolLM2 is
a chain of single-row matmuls that stream the weights from memory, so the bytes per weight set the speed. Here each
projection of the merged model, and a copy of the (tied) `lm_head`, is prepacked once for
`torch.ops.quantized.linear_dynamic` (fbgemm/oneDNN on x86: u8 x s8 dot products with VNNI/AVX-512, threaded over
output columns, so a second core helps the single row; QNNPACK on ARM):

- weights: symmetric int8, one scale per output row (the same grid as torchao's `Int8WeightOnlyConfig`);
- activations: quantised to 8 bits per call, from the row's own min/max (`reduce_range=False`). Only
  single-position rows take this path, one row per kernel call (a batch step of n rows makes n calls), so every
  row's scale is its own and a row's tokens do not depend on what else is in the batch;
- everything with more than one position per row (the prompt prefill) and every other input shape runs the float
  weights, exactly as without quantisation: prompt processing, the KV cache it writes and the time to the first
  token stay those of `none`. The visual path (`set_visual_features`: `base_output`, `linear_map`) keeps the float
  weights too, so the bind network's injection is computed exactly as in fp32.

The price is memory: the float weights stay (for the prefill and the visual path) and the int8 copies come on top
(+25% for fp32 weights; SmolLM2-135M: 538 MB + 163 MB).

The merged model calls each projection through an instance attribute (`LoRALinear.merge` points `forward` at the
base layer's), so replacing that attribute reroutes the serial decoder, the eager stepper and the batch decoder
alike; o_proj's per-query bias (the tuned bias plus the visual vector, `ServedOutputProjection.bias`) is added
after the int8 product, and the batch decoder reaches o_proj's matmul through `ServedOutputProjection.linear_map`.
"""
from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mm_llm_ros.core.errors import ConfigError

logger = logging.getLogger(__name__)

KERNEL = 'quantized::linear_dynamic'


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8 of `weight` (out, in), prepacked for `quantized::linear_dynamic` (no bias)."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantised tensor creation is deprecated in torch 2.13 but still the only way in
        warnings.simplefilter('ignore')
        quantised = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(quantised, None)


class Int8Rows:
    """A linear map y = x W^T (+ bias) that runs single-position rows through the int8 kernel, anything else
    through the float weight. Callable in place of an nn.Linear's forward."""

    def __init__(self, weight: torch.Tensor, bias: Callable[[], torch.Tensor | None]) -> None:
        self.weight = weight  # the float weight (shared with the model, not copied)
        self.bias = bias      # read per call: o_proj's bias buffer changes per query
        self.packed = _pack(weight)
        self.dtype = weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias()
        if x.dim() != 3 or x.shape[1] != 1 or x.dtype != self.dtype:  # prefill, 1-D probes: the float weights
            return F.linear(x, self.weight, bias)
        rows = x.reshape(x.shape[0], x.shape[2])
        if self.dtype != torch.float32:
            rows = rows.float()
        if rows.shape[0] == 1:
            y = torch.ops.quantized.linear_dynamic(rows, self.packed, reduce_range=False)
        else:  # one call per row: each row's activations get their own scale (batch-invariant tokens)
            y = torch.cat([torch.ops.quantized.linear_dynamic(row, self.packed, reduce_range=False)
                           for row in rows.split(1)])
        if self.dtype != torch.float32:
            y = y.to(self.dtype)
        if bias is not None:
            y = y + bias
        return y.view(x.shape[0], 1, y.shape[-1])


@functools.lru_cache(maxsize=None)
def check_cpu_int8() -> None:
    """Raise ConfigError unless this torch build runs the int8 kernel correctly on a 256 -> 64 probe."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=generator) / 16
    x = torch.randn(1, 1, 256, generator=generator)
    try:
        y = Int8Rows(weight, lambda: None)(x)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        raise ConfigError(f"llm.quantization 'int8' on the CPU needs torch's {KERNEL} kernel (engine "
                           f"{torch.backends.quantized.engine}), which fails on this torch {torch.__version__}: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    reference = F.linear(x, weight)
    error = float((y - reference).norm() / reference.norm())
    if not error < 0.05:  # about 0.01 measured; NaN fails too
        raise ConfigError(f"llm.quantization 'int8' on the CPU: {KERNEL} computes wrong results on this build "
                           f'(relative error {error:.3g})')


def _projections(model: nn.Module) -> list[tuple[nn.Module, nn.Linear]]:
    """(module whose forward to reroute, the linear layer it computes) for every merged projection but o_proj."""
    from mm_llm_ros.core.llm.model import GatedOutputProjection, LoRALinear

    served = {id(module.proj) for module in model.modules() if isinstance(module, GatedOutputProjection)}
    found = []
    for module in model.modules():
        if isinstance(module, LoRALinear) and id(module) not in served:  # o_proj runs through its served forward
            if not module.merged:
                raise ConfigError("llm.quantization 'int8' on the CPU: merge the adapters first")
            found.append((module, module.base))
    return found


@torch.no_grad()
def apply_cpu_int8(model: nn.Module) -> int:
    """Route the decode rows of a merged ImageBind-LLM (`model`) through int8 kernels; return the maps rerouted.

    Reroutes q/k/v and gate/up/down (their merged `LoRALinear`s), o_proj (its `GatedOutputProjection` and
    `ServedOutputProjection.linear_map`) and `lm_head` (an int8 copy: the tied embedding stays float for the token
    lookup). Idempotent per model. Call `check_cpu_int8` first for a clear refusal.
    """
    from mm_llm_ros.core.llm.model import GatedOutputProjection

    backbone = getattr(model, 'backbone', None)
    if backbone is None or getattr(model, 'merged', False) is not True:
        raise ConfigError("llm.quantization 'int8' on the CPU needs a merged ImageBind-LLM (merge_adapters first)")
    if getattr(model, '_cpu_int8', False):
        return 0
    count = 0
    for module, linear in _projections(model):
        module.forward = Int8Rows(linear.weight, functools.partial(getattr, linear, 'bias'))
        count += 1
    for module in model.modules():
        if isinstance(module, GatedOutputProjection):
            served = module.served
            matmul = Int8Rows(served.weight, lambda: None)
            served.linear_map = matmul  # the batch decoder's o_proj product (its own per-row biases follow)
            module.forward = Int8Rows(served.weight, functools.partial(getattr, served, 'bias'))
            module.forward.packed = matmul.packed  # one int8 copy per weight
            count += 1
    head = backbone.lm_head
    head.forward = Int8Rows(head.weight, functools.partial(getattr, head, 'bias'))
    model._cpu_int8 = True
    logger.info("llm.quantization 'int8' on the CPU: %d projections and lm_head decode through %s (%s engine), "
                'prefill and the visual path keep the float weights', count, KERNEL, torch.backends.quantized.engine)
    return count + 1


def int8_bytes(model: nn.Module) -> int:
    """Bytes of the int8 copies that `apply_cpu_int8` added (weights + per-row scales), each copy once."""
    seen, total = set(), 0
    for module in model.modules():
        forward = module.__dict__.get('forward')
        if isinstance(forward, Int8Rows) and id(forward.packed) not in seen:
            seen.add(id(forward.packed))
            out_features, in_features = forward.weight.shape
            total += out_features * (in_features + 8)
    return total
