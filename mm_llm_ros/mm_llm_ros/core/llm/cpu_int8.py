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

At this size a decode step is mostly calls, not weights (SmolLM2, one thread: the int8 products read 135 MB, about
5 ms a token; the rest of the 20 ms was some 70 torch calls and 10 module calls per layer), so the int8 path cuts
calls:
- q, k and v run as one fused product per layer (`FusedInt8Rows`, `attn.decode_qkv`), gate and up as another
  (`mlp.decode_gate_up`): the same numbers as separate calls (the row is quantised once either way), 121 kernel
  calls per token instead of 211. The decoders reach them through `decoding.rotated_qkv` and
  `decoding.mlp_output`; q/k/v/gate/up's own forwards stay float (the prefill, and `generation.decoder: eager`,
  which calls transformers' layers and so decodes those five in float);
- `StaticDecoder` (mode `static`, the CPU default) runs the decode step as `lean_step.LeanDecodeStep`: the same
  kernels on the same inputs in about 33 calls per layer, compiled by TorchScript, bit-equal logits (tested).
  Measured in one process, one thread, variants interleaved: 49 tokens/s with a kernel call per projection, 57
  fused, 69 with the lean step in Python, 96 with it in TorchScript. `BatchDecoder` runs its decode rows through
  the same step (n rows, one kernel call per row and product, each row's own o_proj biases): 191 tokens/s for 8
  rows at one thread, 124 op by op.

The other maps are rerouted through an instance attribute (`LoRALinear.merge` points `forward` at the base layer's):
down_proj, o_proj and lm_head decode in int8 in every decoder; o_proj's per-query bias (the tuned bias plus the
visual vector, `ServedOutputProjection.bias`) is added after the int8 product, and the batch decoder reaches
o_proj's rows through `ServedOutputProjection.rows`.
"""

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
        self.shape = tuple(weight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias()
        if x.dim() != 3 or x.shape[1] != 1 or x.dtype != self.dtype:  # prefill, 1-D probes: the float weights
            return F.linear(x, self.weight, bias)
        return _int8_rows(x, self.packed, bias)


class FusedInt8Rows:
    """One int8 product for several maps of the same decode rows (q, k and v; gate and up): one kernel call and
    one activation quantisation instead of several. Its results are those of the maps' own `Int8Rows`, bit for bit:
    every output row of the weight keeps its own scale, and the input row is quantised from the same min/max.
    Decode rows only ((B, 1, C), the model dtype): callers use the maps' own forwards for anything else."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.sizes = [linear.out_features for linear in linears]
        weight = torch.cat([linear.weight for linear in linears])
        self.packed = _pack(weight)
        self.shape = tuple(weight.shape)
        # Merged q/k/v and gate/up biases are fixed (only o_proj's changes per query), so they are joined once.
        self.bias = joined_bias(linears)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _int8_rows(x, self.packed, self.bias).split(self.sizes, dim=-1)


def joined_bias(linears: list[nn.Linear]) -> torch.Tensor | None:
    """The biases of `linears` side by side for one joined product, zeros for a map without one (the product plus
    zero is the product, bit for bit: an ImageBind-LLM tunes q's bias, not k's and v's); None where none has one."""
    if all(linear.bias is None for linear in linears):
        return None
    return torch.cat([linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
                      for linear in linears]).detach()


def _int8_rows(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, C) decode rows through the int8 kernel, one call per row."""
    rows = x.reshape(x.shape[0], x.shape[2])
    y = int8_product(rows if x.dtype == torch.float32 else rows.float(), packed)
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(x.shape[0], 1, y.shape[-1])


def int8_product(x: torch.Tensor, packed: torch.classes.quantized.LinearPackedParamsBase) -> torch.Tensor:
    """(n, C) float32 rows through the int8 kernel, one call per row: each row's activations get their own scale,
    so a row's tokens do not depend on the rest of the batch."""
    if x.shape[0] == 1:
        return torch.ops.quantized.linear_dynamic(x, packed, False)
    return torch.cat([torch.ops.quantized.linear_dynamic(row, packed, False) for row in x.split(1)])


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


def _linear(projection: nn.Module) -> nn.Linear:
    """The linear layer a (merged) projection computes."""
    from mm_llm_ros.core.llm.model import LoRALinear

    if isinstance(projection, LoRALinear):
        if not projection.merged:
            raise ConfigError("llm.quantization 'int8' on the CPU: merge the adapters first")
        return projection.base
    return projection


@torch.no_grad()
def apply_cpu_int8(model: nn.Module) -> int:
    """Route the decode rows of a merged ImageBind-LLM (`model`) through int8 kernels; return the maps rerouted.

    Adds one fused int8 product per layer for q, k and v (`self_attn.decode_qkv`) and one for gate and up
    (`mlp.decode_gate_up`), which the decoders call for decode rows (`decoding.rotated_qkv`, `decoding.mlp_output`);
    those projections' own forwards stay float. Reroutes down_proj, o_proj (its `GatedOutputProjection` and
    `ServedOutputProjection.rows`) and `lm_head` (an int8 copy: the tied embedding stays float for the token
    lookup). Idempotent per model. Call `check_cpu_int8` first for a clear refusal.
    """
    from mm_llm_ros.core.llm.model import GatedOutputProjection

    backbone = getattr(model, 'backbone', None)
    if backbone is None or getattr(model, 'merged', False) is not True:
        raise ConfigError("llm.quantization 'int8' on the CPU needs a merged ImageBind-LLM (merge_adapters first)")
    if getattr(model, '_cpu_int8', False):
        return 0
    count = 0
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.decode_qkv = FusedInt8Rows([_linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj)])
        mlp.decode_gate_up = FusedInt8Rows([_linear(mlp.gate_proj), _linear(mlp.up_proj)])
        down = _linear(mlp.down_proj)
        mlp.down_proj.forward = Int8Rows(down.weight, functools.partial(getattr, down, 'bias'))
        count += 6
    for module in model.modules():
        if isinstance(module, GatedOutputProjection):
            served = module.served
            matmul = Int8Rows(served.weight, lambda: None)
            # The batch decoder's o_proj rows: the int8 product, then each row's bias, as `forward` adds it.
            served.rows = lambda x, biases, matmul=matmul: matmul(x) + biases.unsqueeze(1)
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
        for product in module.__dict__.values():
            if isinstance(product, (Int8Rows, FusedInt8Rows)) and id(product.packed) not in seen:
                seen.add(id(product.packed))
                out_features, in_features = product.shape
                total += out_features * (in_features + 8)
    return total
