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
- `StaticDecoder` (mode `static`, the CPU default) runs the decode step as `Int8DecodeStep`: the same kernels on
  the same inputs in about 33 calls per layer, compiled by TorchScript, bit-equal logits (tested). Measured in one
  process, one thread, variants interleaved: 49 tokens/s with a kernel call per projection, 57 fused, 69 with the
  lean step in Python, 96 with it in TorchScript. `BatchDecoder` runs its decode rows through the same step (n
  rows, one kernel call per row and product, each row's own o_proj biases): 191 tokens/s for 8 rows at one thread,
  124 op by op.

The other maps are rerouted through an instance attribute (`LoRALinear.merge` points `forward` at the base layer's):
down_proj, o_proj and lm_head decode in int8 in every decoder; o_proj's per-query bias (the tuned bias plus the
visual vector, `ServedOutputProjection.bias`) is added after the int8 product, and the batch decoder reaches
o_proj's rows through `ServedOutputProjection.rows`.
"""

import functools
import logging
import warnings
from collections.abc import Callable
from typing import List, Optional

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
        self.bias = None
        if any(linear.bias is not None for linear in linears):
            self.bias = torch.cat([linear.bias if linear.bias is not None else weight.new_zeros(linear.out_features)
                                   for linear in linears]).detach()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _int8_rows(x, self.packed, self.bias).split(self.sizes, dim=-1)


def _int8_rows(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, C) decode rows through the int8 kernel, one call per row."""
    rows = x.reshape(x.shape[0], x.shape[2])
    y = _rows(rows if x.dtype == torch.float32 else rows.float(), packed)
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(x.shape[0], 1, y.shape[-1])


class Int8DecodeStep:
    """The decode step of `StaticDecoder` (mode `static`) and of `BatchDecoder` for a model that `apply_cpu_int8`
    rerouted: the same kernels on the same inputs as the generic step, in about 33 torch calls per layer instead of
    about 70 plus ten module calls, run by TorchScript (`_Int8Step`). At SmolLM2's size the int8 products take about
    5 ms of a token and Python and dispatch most of the rest, so the number of calls and the cost of each set the
    speed.

    Built by `for_model`, which returns None for anything else (float weights, another dtype, an activation other
    than SiLU), where the generic step runs. Where TorchScript cannot compile the step, the same module runs in
    Python (`python`): the same numbers, about 30% slower."""

    def __init__(self, backbone: nn.Module, capacity: int) -> None:
        self.python = _Int8Step(backbone, capacity)
        self.scripted = _script(self.python)
        # o_proj's biases hold the query's visual vector (ServedOutputProjection.bias): read at every step.
        self.o_products: list[Int8Rows] = [layer.self_attn.o_proj.forward for layer in backbone.model.layers]

    @classmethod
    def for_model(cls, backbone: nn.Module, capacity: int) -> 'Int8DecodeStep | None':
        layers = getattr(getattr(backbone, 'model', None), 'layers', None)
        if not layers or not isinstance(getattr(getattr(backbone, 'lm_head', None), 'forward', None), Int8Rows):
            return None
        if backbone.model.embed_tokens.weight.dtype != torch.float32 or not all(
                isinstance(getattr(layer.self_attn, 'decode_qkv', None), FusedInt8Rows)
                and type(layer.mlp.act_fn).__name__ in ('SiLU', 'SiLUActivation') for layer in layers):
            return None
        return cls(backbone, capacity)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, row_ids: list[int],
                 spans: list[int], keys: list[torch.Tensor], values: list[torch.Tensor],
                 o_bias: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """One decode step of n rows of the KV cache `keys`/`values` (B, nkv, L, hs) per layer: `tokens[i]` at
        `positions[i]` in cache row `rows[i]` ((n,) long tensors; `row_ids` the same rows as ints), each row
        attending over its first `spans[i]` slots (its position + 1). `o_bias`: o_proj's bias per layer, (C,) or
        per row (n, C); None reads the model's (the current query's). Returns the next logits (n, vocab)."""
        if o_bias is None:
            o_bias = [product.bias() for product in self.o_products]
        step = self.scripted if self.scripted is not None else self.python
        return step(tokens, positions, rows, row_ids, spans, keys, values, o_bias)


class _Int8Step(nn.Module):
    """The lean int8 decode step. Differences from the generic step, none in the arithmetic: hidden states are
    (n, C), one row per sequence; rotary cos/sin are read from a table computed once by the model's own rotary
    embedding; RMSNorm and rotate_half are transformers' formulas in a few calls each (`_rms_norm`); the kernel is
    called without its Python wrapper. Written in the TorchScript subset: torch.compile cannot take the
    kernel's prepacked weights (a TorchScript class)."""

    qkv_bias: List[Optional[torch.Tensor]]
    gate_up_bias: List[Optional[torch.Tensor]]
    down_bias: List[Optional[torch.Tensor]]
    head_bias: Optional[torch.Tensor]

    def __init__(self, backbone: nn.Module, capacity: int) -> None:
        super().__init__()
        base, config = backbone.model, backbone.config
        layers = base.layers
        first = layers[0].self_attn
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads or config.num_attention_heads
        self.head_dim: int = first.head_dim
        self.scaling, self.gqa = float(first.scaling), self.num_kv_heads != self.num_heads
        self.embed = base.embed_tokens.weight
        self.norm1 = [layer.input_layernorm.weight for layer in layers]
        self.eps1 = [float(layer.input_layernorm.variance_epsilon) for layer in layers]
        self.norm2 = [layer.post_attention_layernorm.weight for layer in layers]
        self.eps2 = [float(layer.post_attention_layernorm.variance_epsilon) for layer in layers]
        qkv: list[FusedInt8Rows] = [layer.self_attn.decode_qkv for layer in layers]
        gate_up: list[FusedInt8Rows] = [layer.mlp.decode_gate_up for layer in layers]
        down: list[Int8Rows] = [layer.mlp.down_proj.forward for layer in layers]
        # Merged biases are fixed; all-zero ones (bias tuning without a checkpoint) are skipped: adding +0 changes
        # no value. o_proj's biases hold the query's visual vector: passed per step.
        self.qkv, self.qkv_bias = [p.packed for p in qkv], [_nonzero(p.bias) for p in qkv]
        self.o = [layer.self_attn.o_proj.forward.packed for layer in layers]
        self.gate_up, self.gate_up_bias = [p.packed for p in gate_up], [_nonzero(p.bias) for p in gate_up]
        self.gate_width = [p.sizes[0] for p in gate_up]
        self.down, self.down_bias = [p.packed for p in down], [_nonzero(p.bias()) for p in down]
        self.norm, self.norm_eps = base.norm.weight, float(base.norm.variance_epsilon)
        head: Int8Rows = backbone.lm_head.forward
        self.head, self.head_bias = head.packed, _nonzero(head.bias())
        self.half: int = self.head_dim // 2
        with torch.inference_mode():
            cos, sin = base.rotary_emb(self.embed[:1].view(1, 1, -1), torch.arange(capacity).unsqueeze(0))
        self.cos, self.sin = cos[0], sin[0]  # (capacity, head_dim)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, row_ids: List[int],
                spans: List[int], keys: List[torch.Tensor], values: List[torch.Tensor],
                o_bias: List[Optional[torch.Tensor]]) -> torch.Tensor:
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        n = tokens.shape[0]
        cos = self.cos.index_select(0, positions).unsqueeze(1)  # (n, 1, hs)
        sin = self.sin.index_select(0, positions).unsqueeze(1)
        h = self.embed.index_select(0, tokens)  # (n, C)
        for i in range(len(self.qkv)):
            x = _rms_norm(h, self.norm1[i], self.eps1[i])
            heads = _with_bias(_rows(x, self.qkv[i]), self.qkv_bias[i]).view(n, nh + 2 * nkv, hd)
            qk = heads[:, :nh + nkv]
            rotated = torch.cat((-qk[:, :, self.half:], qk[:, :, :self.half]), dim=-1)  # transformers' rotate_half
            qk = qk * cos + rotated * sin
            if n == 1:  # the serial decoder's step: index_copy_ costs a third of an index_put_
                keys[i].narrow(0, row_ids[0], 1).index_copy_(2, positions, qk[:, nh:].view(1, nkv, 1, hd))
                values[i].narrow(0, row_ids[0], 1).index_copy_(2, positions, heads[:, nh + nkv:].view(1, nkv, 1, hd))
            else:
                keys[i][rows, :, positions] = qk[:, nh:]
                values[i][rows, :, positions] = heads[:, nh + nkv:]
            query = qk[:, :nh].reshape(n, nh, 1, hd)
            # Each row over its own written slots, without a mask, as the serial step attends (a masked attention
            # over a longer span sums in another order: BatchDecoder).
            outs: List[torch.Tensor] = []
            for r in range(n):
                outs.append(F.scaled_dot_product_attention(
                    query.narrow(0, r, 1), keys[i].narrow(0, row_ids[r], 1).narrow(2, 0, spans[r]),
                    values[i].narrow(0, row_ids[r], 1).narrow(2, 0, spans[r]), scale=self.scaling,
                    enable_gqa=self.gqa))
            out = outs[0] if n == 1 else torch.cat(outs)
            h = h + _with_bias(_rows(out.view(n, nh * hd), self.o[i]), o_bias[i])
            x = _rms_norm(h, self.norm2[i], self.eps2[i])
            gate_up = _with_bias(_rows(x, self.gate_up[i]), self.gate_up_bias[i])
            width = self.gate_width[i]
            y = _rows(F.silu(gate_up[:, :width]) * gate_up[:, width:], self.down[i])
            h = h + _with_bias(y, self.down_bias[i])
        h = _rms_norm(h, self.norm, self.norm_eps)
        return _with_bias(_rows(h, self.head), self.head_bias)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm on float32 rows, op for op (so bit for bit). `F.rms_norm` gives the same numbers
    through a composite of about a dozen calls: 30 us a row here against about 8."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rows(x: torch.Tensor, packed: torch.classes.quantized.LinearPackedParamsBase) -> torch.Tensor:
    """(n, C) rows through the int8 kernel, one call per row: each row's activations get their own scale, so a
    row's tokens do not depend on the rest of the batch."""
    if x.shape[0] == 1:
        return torch.ops.quantized.linear_dynamic(x, packed, False)
    return torch.cat([torch.ops.quantized.linear_dynamic(row, packed, False) for row in x.split(1)])


def _nonzero(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None or not bool(bias.any()) else bias


def _with_bias(y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if bias is None:
        return y
    return y + bias


def _script(step: _Int8Step) -> torch.jit.ScriptModule | None:
    """`step` compiled by TorchScript, or None where this torch cannot (the Python module runs instead)."""
    try:
        with warnings.catch_warnings():  # torch 2.13 marks torch.jit.script deprecated; it still runs this step
            warnings.simplefilter('ignore', DeprecationWarning)
            return torch.jit.script(step)
    except Exception as exc:  # noqa: BLE001 - any TorchScript failure leaves the slower Python step
        logger.warning('int8 decode step: TorchScript failed (%s: %s); decoding through the Python step',
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else '')
        return None


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
