"""The CPU decode step in few torch calls (issue 18): `LeanDecodeStep`.

At the embedded SmolLM2's size a decode step on the CPU is a chain of single-row products plus some 70 small
torch calls and 10 module calls per layer, and the calls cost as much as the products: the generic step (the
decoders' `_forward`, transformers' layers) spends about a sixth of a float32 token and half of an int8 token
outside the products. `LeanDecodeStep` runs the same operations on the same inputs in about 30 calls per layer,
compiled once by TorchScript, and gives the generic step's logits bit for bit (tested):

- hidden states are (n, C), one row per sequence; rotary cos/sin come from a table computed once by the model's
  own rotary embedding; RMSNorm and rotate_half are transformers' formulas in a few calls each (`_rms_norm`);
- each row attends over its own written slots without a mask, as the serial step does;
- the products are the model's own: float32 weights through `F.linear` (bias inside the product, as
  `nn.Linear` adds it), or, for a model that `cpu_int8.apply_cpu_int8` rerouted, the prepacked int8 products
  (fused q+k+v and gate+up, one kernel call per row) with the biases added after, as `Int8Rows` adds them.

`StaticDecoder` (mode `static`, the CPU default) and `BatchDecoder` build it with `for_model`, which returns None
for anything it does not reproduce exactly (another dtype or device, an unmerged ImageBind-LLM, an activation
other than SiLU, torchao-quantised weights); the generic step runs there. Measured on SmolLM2, one thread
(docs/cpu.md): int8 69 tokens/s with the lean step in Python, 96 in TorchScript (the host of 2026-12-04); float32
16.8 with the generic step, 19.2 lean (`bench/cpu.py`, the host of 2026-12-05).
"""

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Final, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mm_llm_ros.core.llm.cpu_int8 import FusedInt8Rows, Int8Rows, int8_product

logger = logging.getLogger(__name__)


class LeanDecodeStep:
    """The decode step of `StaticDecoder` (mode `static`) and `BatchDecoder` on the CPU, for a float32 model or one
    that `apply_cpu_int8` rerouted. Built by `for_model`. Where TorchScript cannot compile the step, the same
    module runs in Python (`python`): the same numbers, about 30% slower."""

    def __init__(self, backbone: nn.Module, capacity: int, int8: bool) -> None:
        self.python = _LeanStep(backbone, capacity, int8)
        self.scripted = _script(self.python)
        # o_proj's biases hold the query's visual vector (ServedOutputProjection.bias): read at every step.
        self.o_biases = [_o_bias(layer.self_attn.o_proj) for layer in backbone.model.layers]

    @property
    def int8(self) -> bool:
        """Whether the step runs `cpu_int8`'s products (else the float32 weights)."""
        return self.python.int8

    @classmethod
    def for_model(cls, backbone: nn.Module, capacity: int) -> 'LeanDecodeStep | None':
        """The lean step for `backbone`, or None where it would not compute what the generic step computes."""
        layers = getattr(getattr(backbone, 'model', None), 'layers', None)
        embed = getattr(getattr(backbone, 'model', None), 'embed_tokens', None)
        if not layers or embed is None or embed.weight.dtype != torch.float32 or embed.weight.device.type != 'cpu':
            return None
        if not all(type(layer.mlp.act_fn).__name__ in ('SiLU', 'SiLUActivation')
                   and hasattr(layer.input_layernorm, 'variance_epsilon') for layer in layers):
            return None
        if isinstance(getattr(backbone.lm_head, 'forward', None), Int8Rows):
            if not all(isinstance(getattr(layer.self_attn, 'decode_qkv', None), FusedInt8Rows) for layer in layers):
                return None
            return cls(backbone, capacity, int8=True)
        if any(getattr(layer.self_attn, 'decode_qkv', None) is not None for layer in layers):
            return None  # int8 products on some maps only: not a layout this step knows
        projections = [_float_linear(module) for layer in layers for module in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
            layer.mlp.up_proj, layer.mlp.down_proj)]
        if None in projections or _float_linear(backbone.lm_head) is None or None in (
                _o_weight(layer.self_attn.o_proj) for layer in layers):
            return None
        return cls(backbone, capacity, int8=False)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, row_ids: list[int],
                 spans: list[int], keys: list[torch.Tensor], values: list[torch.Tensor],
                 o_bias: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """One decode step of n rows of the KV cache `keys`/`values` (B, nkv, L, hs) per layer: `tokens[i]` at
        `positions[i]` in cache row `rows[i]` ((n,) long tensors; `row_ids` the same rows as ints), each row
        attending over its first `spans[i]` slots (its position + 1). `o_bias`: o_proj's bias per layer, (C,) or
        per row (n, C); None reads the model's (the current query's). Returns the next logits (n, vocab)."""
        if o_bias is None:
            o_bias = [bias() for bias in self.o_biases]
        step = self.scripted if self.scripted is not None else self.python
        return step(tokens, positions, rows, row_ids, spans, keys, values, o_bias)


def _float_linear(module: nn.Module) -> nn.Linear | None:
    """The plain float nn.Linear a (merged) projection computes with its own forward, or None (another module, or
    a weight that torchao quantised: a tensor subclass)."""
    from mm_llm_ros.core.llm.model import LoRALinear
    from mm_llm_ros.core.llm.quantization import is_plain

    if isinstance(module, LoRALinear):  # merged: its forward is the base layer's (`LoRALinear.merge`)
        if module.merged and module.__dict__.get('forward') == module.base.forward:
            module = module.base
        else:
            return None
    plain = type(module) is nn.Linear and 'forward' not in module.__dict__ and is_plain(module.weight)
    return module if plain else None


def _o_weight(o_proj: nn.Module) -> torch.Tensor | None:
    """o_proj's float weight: a merged ImageBind-LLM's served projection or a plain nn.Linear; None otherwise."""
    from mm_llm_ros.core.llm.model import GatedOutputProjection
    from mm_llm_ros.core.llm.quantization import is_plain

    if isinstance(o_proj, GatedOutputProjection):
        served = o_proj.served
        merged = served is not None and o_proj.__dict__.get('forward') == served.forward
        return served.weight if merged and is_plain(served.weight) else None
    linear = _float_linear(o_proj)
    return None if linear is None else linear.weight


def _o_bias(o_proj: nn.Module) -> Callable[[], torch.Tensor | None]:
    """Reads o_proj's current bias: a merged ImageBind-LLM's served buffer (which the int8 product adds too,
    `apply_cpu_int8`), or a plain linear's."""
    served = getattr(o_proj, 'served', None)
    return functools.partial(getattr, served if served is not None else o_proj, 'bias')


class _LeanStep(nn.Module):
    """The step itself, in the TorchScript subset (torch.compile cannot take the int8 kernel's prepacked weights,
    a TorchScript class). `int8` is a constant: TorchScript drops the other mode's branches."""

    int8: Final[bool]
    # int8: one prepacked product per fused map, its biases fixed (all-zero ones dropped: +0 changes no value).
    qkv: List[torch.classes.quantized.LinearPackedParamsBase]
    qkv_bias: List[Optional[torch.Tensor]]
    gate_up: List[torch.classes.quantized.LinearPackedParamsBase]
    gate_up_bias: List[Optional[torch.Tensor]]
    o: List[torch.classes.quantized.LinearPackedParamsBase]
    down: List[torch.classes.quantized.LinearPackedParamsBase]
    down_bias: List[Optional[torch.Tensor]]
    head: List[torch.classes.quantized.LinearPackedParamsBase]
    head_bias: Optional[torch.Tensor]
    # float32: the model's own weights and biases, per layer [q, k, v] and [gate, up] (not copied).
    qkv_weights: List[List[torch.Tensor]]
    qkv_biases: List[List[Optional[torch.Tensor]]]
    gate_up_weights: List[List[torch.Tensor]]
    gate_up_biases: List[List[Optional[torch.Tensor]]]
    o_weights: List[torch.Tensor]
    down_weights: List[torch.Tensor]
    down_biases: List[Optional[torch.Tensor]]
    head_weights: List[torch.Tensor]

    def __init__(self, backbone: nn.Module, capacity: int, int8: bool) -> None:
        super().__init__()
        base, config = backbone.model, backbone.config
        layers = base.layers
        first = layers[0].self_attn
        self.int8 = int8
        self.layers: int = len(layers)
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads or config.num_attention_heads
        self.head_dim: int = first.head_dim
        self.scaling, self.gqa = float(first.scaling), self.num_kv_heads != self.num_heads
        self.embed = base.embed_tokens.weight
        self.norm1 = [layer.input_layernorm.weight for layer in layers]
        self.eps1 = [float(layer.input_layernorm.variance_epsilon) for layer in layers]
        self.norm2 = [layer.post_attention_layernorm.weight for layer in layers]
        self.eps2 = [float(layer.post_attention_layernorm.variance_epsilon) for layer in layers]
        self.norm, self.norm_eps = base.norm.weight, float(base.norm.variance_epsilon)
        self.qkv, self.qkv_bias, self.gate_up, self.gate_up_bias, self.o, self.down, self.down_bias = ([] for _ in
                                                                                                        range(7))
        self.head, self.head_bias = [], None
        self.qkv_weights, self.qkv_biases, self.gate_up_weights, self.gate_up_biases = [], [], [], []
        self.o_weights, self.down_weights, self.down_biases, self.head_weights = [], [], [], []
        if int8:
            qkv: list[FusedInt8Rows] = [layer.self_attn.decode_qkv for layer in layers]
            gate_up: list[FusedInt8Rows] = [layer.mlp.decode_gate_up for layer in layers]
            down: list[Int8Rows] = [layer.mlp.down_proj.forward for layer in layers]
            self.qkv, self.qkv_bias = [p.packed for p in qkv], [_nonzero(p.bias) for p in qkv]
            self.o = [layer.self_attn.o_proj.forward.packed for layer in layers]
            self.gate_up, self.gate_up_bias = [p.packed for p in gate_up], [_nonzero(p.bias) for p in gate_up]
            self.down, self.down_bias = [p.packed for p in down], [_nonzero(p.bias()) for p in down]
            head: Int8Rows = backbone.lm_head.forward
            self.head, self.head_bias = [head.packed], _nonzero(head.bias())
        else:
            for layer in layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv_linears = [_float_linear(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
                gate_up_linears = [_float_linear(p) for p in (mlp.gate_proj, mlp.up_proj)]
                self.qkv_weights.append([linear.weight for linear in qkv_linears])
                self.qkv_biases.append([linear.bias for linear in qkv_linears])
                self.gate_up_weights.append([linear.weight for linear in gate_up_linears])
                self.gate_up_biases.append([linear.bias for linear in gate_up_linears])
                self.o_weights.append(_o_weight(attn.o_proj))
                down_linear = _float_linear(mlp.down_proj)
                self.down_weights.append(down_linear.weight)
                self.down_biases.append(down_linear.bias)
            head_linear = _float_linear(backbone.lm_head)
            self.head_weights, self.head_bias = [head_linear.weight], head_linear.bias
        self.gate_width: int = layers[0].mlp.gate_proj.out_features
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
        for i in range(self.layers):
            x = _rms_norm(h, self.norm1[i], self.eps1[i])
            heads = self._qkv(x, i).view(n, nh + 2 * nkv, hd)
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
            h = h + self._o(out.view(n, nh * hd), i, o_bias[i])
            x = _rms_norm(h, self.norm2[i], self.eps2[i])
            h = h + self._mlp(x, i)
        h = _rms_norm(h, self.norm, self.norm_eps)
        if self.int8:
            return _with_bias(int8_product(h, self.head[0]), self.head_bias)
        return F.linear(h, self.head_weights[0], self.head_bias)

    def _qkv(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """q, k and v of rows x (n, C), side by side (n, (nh + 2 nkv) hs)."""
        if self.int8:
            return _with_bias(int8_product(x, self.qkv[i]), self.qkv_bias[i])
        weights, biases = self.qkv_weights[i], self.qkv_biases[i]
        return torch.cat([F.linear(x, weights[0], biases[0]), F.linear(x, weights[1], biases[1]),
                          F.linear(x, weights[2], biases[2])], dim=1)

    def _o(self, x: torch.Tensor, i: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """o_proj of rows x (n, C) with this query's bias, (C,) or per row (n, C)."""
        if self.int8:
            return _with_bias(int8_product(x, self.o[i]), bias)
        return F.linear(x, self.o_weights[i], bias)

    def _mlp(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """LLaMA's MLP, down(silu(gate(x)) * up(x))."""
        if self.int8:
            gate_up = _with_bias(int8_product(x, self.gate_up[i]), self.gate_up_bias[i])
            width = self.gate_width
            return _with_bias(int8_product(F.silu(gate_up[:, :width]) * gate_up[:, width:], self.down[i]),
                              self.down_bias[i])
        weights, biases = self.gate_up_weights[i], self.gate_up_biases[i]
        gated = F.silu(F.linear(x, weights[0], biases[0])) * F.linear(x, weights[1], biases[1])
        return F.linear(gated, self.down_weights[i], self.down_biases[i])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm on float32 rows, op for op (so bit for bit). `F.rms_norm` gives the same numbers
    through a composite of about a dozen calls: 30 us a row here against about 8."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _nonzero(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None or not bool(bias.any()) else bias


def _with_bias(y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if bias is None:
        return y
    return y + bias


def _script(step: _LeanStep) -> torch.jit.ScriptModule | None:
    """`step` compiled by TorchScript, or None where this torch cannot (the Python module runs instead)."""
    try:
        with warnings.catch_warnings():  # torch 2.13 marks torch.jit.script deprecated; it still runs this step
            warnings.simplefilter('ignore', DeprecationWarning)
            return torch.jit.script(step)
    except Exception as exc:  # noqa: BLE001 - any TorchScript failure leaves the slower Python step
        logger.warning('lean decode step: TorchScript failed (%s: %s); decoding through the Python step',
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else '')
        return None
