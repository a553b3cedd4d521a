"""The CPU decode step in few torch calls (issue 18): `LeanDecodeStep`.

At the embedded SmolLM2's size a decode step on the CPU is a chain of single-row products plus some 70 small
torch calls and 10 module calls per layer, and the calls cost as much as the products: the generic step (the
decoders' `_forward`, transformers' layers) spends about a sixth of a float32 token and half of an int8 token
outside the products. `LeanDecodeStep` runs the same operations on the same inputs in about 30 calls per layer,
compiled once by TorchScript, and gives the generic step's logits bit for bit (tested):

- hidden states are (n, C), one row per sequence; rotary cos/sin come from a table computed once by the model's
  own rotary embedding; RMSNorm and rotate_half are transformers' formulas in a few calls each (`_rms_norm`);
- each row attends over its own written slots without a mask, as the serial step does;
- the products are the model's own: float32 weights through `torch.mm` on their W^T views, the call `F.linear`
  makes without its transposes (a bias through `F.linear` itself, inside the product as `nn.Linear` adds it; an
  all-zero bias left out, which changes no value; q+k+v and gate+up in one product each where
  `store_column_major` stored them as views of one tensor), or, for a model that `cpu_int8.apply_cpu_int8`
  rerouted, the prepacked int8 products (fused q+k+v and gate+up, one kernel call per row) with the biases added
  after, as `Int8Rows` adds them.

`StaticDecoder` (mode `static`, the CPU default) and `BatchDecoder` build it with `for_model`, which returns None
for anything it does not reproduce exactly (another dtype or device, an unmerged ImageBind-LLM, an activation
other than SiLU, torchao-quantised weights); the generic step runs there. Measured on SmolLM2, one thread
(docs/cpu.md): int8 69 tokens/s with the lean step in Python, 96 in TorchScript (the host of 2026-12-04); float32
16.7 with the generic step, 19.0 lean on the weights as loaded, 20.6 lean on `store_column_major`'s (`bench/cpu.py`,
the host of 2026-12-05).
"""

import contextlib
import logging
import mmap
import warnings
from typing import Final, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mm_llm_ros.core.llm.cpu_int8 import FusedInt8Rows, Int8Rows, int8_product, joined_bias

logger = logging.getLogger(__name__)


class LeanDecodeStep:
    """The decode step of `StaticDecoder` (mode `static`) and `BatchDecoder` on the CPU, for a float32 model or one
    that `apply_cpu_int8` rerouted. Built by `for_model`. Where TorchScript cannot compile the step, the same
    module runs in Python (`python`): the same numbers, about 30% slower."""

    def __init__(self, backbone: nn.Module, capacity: int, int8: bool) -> None:
        self.python = _LeanStep(backbone, capacity, int8)
        self.scripted = _script(self.python)
        # o_proj's biases hold the query's visual vector (ServedOutputProjection.bias): read at every step.
        self.o_biases = [_CurrentBias(_o_bias_owner(layer.self_attn.o_proj)) for layer in backbone.model.layers]

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
        if _float_weights(backbone) is None:
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


@torch.no_grad()
def store_column_major(backbone: nn.Module) -> int:
    """Store a float32 CPU backbone's projection and lm_head weights column-major; return how many were stored
    anew (0 where a projection is not a plain float32 CPU linear, or where they are stored so already).

    Each weight W (out, in) becomes the transposed view of a contiguous W^T, and a layer's q, k and v (and its
    gate and up) become views of one such tensor, so that `LeanDecodeStep` multiplies each group in one call. MKL's
    single-row product streams this layout at the read bandwidth of one core, the row-major one at about 90% of it
    (a sum of row dot products against column updates). The model computes the same maps in float32, only each
    product sums in another order: logits move by rounding (greedy tokens of the embedded SmolLM2 identical on 20
    of 20 prompts, `bench/cpu.py`); prefill, generic step and lean step read the same tensors, so the lean step
    stays bit-equal to the generic one. The tied embedding is stored with lm_head; a token lookup gathers its row
    from the columns.

    Each tensor is replaced, not copied. The backbone's other tensors (norms, biases: a few MB) are copied into
    memory of their own as well: transformers loads safetensors into one private map of the file, which stays
    mapped, weights and all, while any tensor in it lives. So the weights move from that map to anonymous memory:
    the embedded SmolLM2's process holds about 1.0 GB instead of 0.9 (the map's clean pages were the file's).
    """
    layers = _float_weights(backbone)
    if layers is None or layers[-1][0].dtype != torch.float32 or layers[-1][0].device.type != 'cpu':
        return 0
    groups = [group for q, k, v, o, gate, up, down in layers[:-1]
              for group in ((q, k, v), (gate, up), (o,), (down,))] + [layers[-1]]
    groups = [group for group in groups if not (group[0].stride(0) == 1 and _joined(group) is not None)]
    sizes = [_aligned(sum(weight.numel() for weight in group)) for group in groups]
    arena = _huge_page_floats(sum(sizes))
    count, start = 0, 0
    for group, size in zip(groups, sizes):
        count += _store_column_major(group, arena[start:start + size])
        start += size
    if count:
        stored = {id(weight) for group in layers for weight in group}
        for tensor in (*backbone.parameters(), *backbone.buffers()):
            if id(tensor) not in stored and not tensor.is_inference():
                tensor.data = tensor.data.clone()
    return count


def _store_column_major(weights: tuple[nn.Parameter, ...], memory: torch.Tensor) -> int:
    """Make `weights` ((out_i, in) each) consecutive row blocks of one column-major tensor, in place, in the front
    of the 1-D float tensor `memory`."""
    inputs, outputs = weights[0].shape[1], sum(weight.shape[0] for weight in weights)
    columns = memory[:inputs * outputs].view(inputs, outputs)  # (in, sum of out_i), contiguous
    start = 0
    for weight in weights:
        block = columns[:, start:start + weight.shape[0]]
        block.copy_(weight.detach().t())
        weight.data = block.t()
        start += weight.shape[0]
    return len(weights)


def _aligned(count: int, floats: int = 16) -> int:
    """`count` rounded up to whole 64-byte lines of float32, so that each stored group starts on one."""
    return -(-count // floats) * floats


def _huge_page_floats(count: int) -> torch.Tensor:
    """A 1-D float32 CPU tensor of `count` elements in memory that the kernel backs with 2 MB pages if it can.

    A decode step streams every weight once, so on 4 kB pages it walks the page tables for each of some 130,000
    pages per token. Linux gives anonymous memory transparent huge pages on request (`MADV_HUGEPAGE`; Ubuntu's
    default THP mode, `madvise`, gives them on request only), and torch's allocator asks only when
    THP_MEM_ALLOC_ENABLE is set at start-up. Measured on SmolLM2's weights at two threads: all products of a token
    1.5-3% faster. Where the platform has no such call, ordinary memory.
    """
    if count == 0 or not hasattr(mmap, 'MADV_HUGEPAGE'):
        return torch.empty(count)
    memory = mmap.mmap(-1, count * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # THP disabled or unsupported: 4 kB pages, same numbers
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=torch.float32, count=count)  # the tensor keeps the map alive


def _joined(weights: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The one tensor (sum of out_i, in) whose consecutive row blocks `weights` are, or None."""
    first = weights[0]
    offset = first.storage_offset()
    for weight in weights:
        if (weight.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or weight.dim() != 2
                or weight.stride() != first.stride() or weight.shape[1] != first.shape[1]
                or weight.storage_offset() != offset):
            return None
        offset += weight.shape[0] * weight.stride(0)
    return first.as_strided((sum(weight.shape[0] for weight in weights), first.shape[1]), first.stride(),
                            first.storage_offset())


def _float_weights(backbone: nn.Module) -> list[tuple[nn.Parameter, ...]] | None:
    """Per layer the float weights of q, k, v, o, gate, up and down, then (lm_head's,); None where a projection is
    not a plain float linear (`_float_linear`, `_o_weight`)."""
    layers = []
    for layer in backbone.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [_float_linear(module) for module in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj,
                                                         mlp.up_proj, mlp.down_proj)]
        o_weight = _o_weight(attn.o_proj)
        if None in linears or o_weight is None:
            return None
        q, k, v, gate, up, down = (linear.weight for linear in linears)
        layers.append((q, k, v, o_weight, gate, up, down))
    head = _float_linear(backbone.lm_head)
    return None if head is None else layers + [(head.weight,)]


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


def _o_bias_owner(o_proj: nn.Module) -> nn.Module:
    """The module whose `bias` o_proj adds: a merged ImageBind-LLM's served buffer (which the int8 product adds
    too, `apply_cpu_int8`), or a plain linear's."""
    served = getattr(o_proj, 'served', None)
    return served if served is not None else o_proj


class _CurrentBias:
    """Reads `owner.bias` at each step: None while it is all zero, so that the step multiplies without it (as it
    leaves out the other all-zero biases). The embedded default's o_proj biases are: bias tuning without an adapter
    checkpoint, zero-initialised gates. Each query rewrites them in place (`set_visual_value`), so the zero check
    runs again only when the tensor or its version counter changed, not at every step: about +1% a float32
    token (paired rounds, two threads)."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner
        self.checked: torch.Tensor | None = None
        self.version, self.zero = -1, False

    def __call__(self) -> torch.Tensor | None:
        bias = self.owner.bias
        if bias is None or bias.is_inference():  # an inference tensor has no version counter: check every time
            return _nonzero(bias)
        if bias is not self.checked or bias._version != self.version:
            self.checked, self.version, self.zero = bias, bias._version, not bool(bias.any())
        return None if self.zero else bias


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
    # float32: the model's own weights seen as W^T (in, out) views and their biases (None where all zero), per
    # layer [q, k, v] and [gate, up] (not copied), or [the joined weight] where they are views of one tensor
    # (`store_column_major`).
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
        self.norm2 = [layer.post_attention_layernorm.weight for layer in layers]
        self.norm = base.norm.weight
        # RMSNorm's scalars as 0-dim tensors: a Python number becomes a new tensor at each call (about 1 us)
        self.eps1 = [torch.tensor(float(layer.input_layernorm.variance_epsilon)) for layer in layers]
        self.eps2 = [torch.tensor(float(layer.post_attention_layernorm.variance_epsilon)) for layer in layers]
        self.norm_eps = torch.tensor(float(base.norm.variance_epsilon))
        self.width = torch.tensor(float(self.embed.shape[1]))
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
                for linears, weights, biases in (
                        ([_float_linear(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)], self.qkv_weights,
                         self.qkv_biases),
                        ([_float_linear(p) for p in (mlp.gate_proj, mlp.up_proj)], self.gate_up_weights,
                         self.gate_up_biases)):
                    joined = _joined([linear.weight for linear in linears])
                    if joined is not None:
                        weights.append([joined.t()])  # one product (store_column_major)
                        biases.append([_nonzero(joined_bias(linears))])
                    else:
                        weights.append([linear.weight.t() for linear in linears])
                        biases.append([_nonzero(linear.bias) for linear in linears])
                self.o_weights.append(_o_weight(attn.o_proj).t())
                down_linear = _float_linear(mlp.down_proj)
                self.down_weights.append(down_linear.weight.t())
                self.down_biases.append(_nonzero(down_linear.bias))
            head_linear = _float_linear(backbone.lm_head)
            self.head_weights, self.head_bias = [head_linear.weight.t()], _nonzero(head_linear.bias)
        self.gate_width: int = layers[0].mlp.gate_proj.out_features
        self.half: int = self.head_dim // 2
        with torch.inference_mode():
            cos, sin = base.rotary_emb(self.embed[:1].view(1, 1, -1), torch.arange(capacity).unsqueeze(0))
        # (capacity, head_dim); sin with its first half negated, for the rotation in `forward`
        self.cos, self.sin = cos[0], torch.cat((-sin[0, :, :self.half], sin[0, :, self.half:]), dim=-1)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, row_ids: List[int],
                spans: List[int], keys: List[torch.Tensor], values: List[torch.Tensor],
                o_bias: List[Optional[torch.Tensor]]) -> torch.Tensor:
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        n = tokens.shape[0]
        cos = self.cos.index_select(0, positions).unsqueeze(1)  # (n, 1, hs)
        sin = self.sin.index_select(0, positions).unsqueeze(1)
        h = self.embed.index_select(0, tokens)  # (n, C)
        for i in range(self.layers):
            x = _rms_norm(h, self.norm1[i], self.eps1[i], self.width)
            heads = self._qkv(x, i).view(n, nh + 2 * nkv, hd)
            qk = heads[:, :nh + nkv]
            # transformers' q * cos + rotate_half(q) * sin with rotate_half(q) = (-q2, q1), as (q2, q1) times the
            # signed table (-sin1, sin2): the same products bit for bit (a sign flip is exact), in one call.
            qk = torch.roll(qk, self.half, -1).mul_(sin).add_(qk * cos)  # (in place: fewer allocations)
            if n == 1:  # the serial decoder's step: its one slot (position spans[0] - 1), no index tensors
                keys[i].select(0, row_ids[0]).select(1, spans[0] - 1).copy_(qk[0, nh:])
                values[i].select(0, row_ids[0]).select(1, spans[0] - 1).copy_(heads[0, nh + nkv:])
            else:
                keys[i][rows, :, positions] = qk[:, nh:]
                values[i][rows, :, positions] = heads[:, nh + nkv:]
            query = qk[:, :nh].reshape(n, nh, 1, hd)
            # Each row over its own written slots, without a mask, as the serial step attends (a masked attention
            # over a longer span sums in another order: BatchDecoder).
            if keys[i].size(0) == 1:  # the serial decoder's one-row cache
                out = F.scaled_dot_product_attention(query, keys[i].narrow(2, 0, spans[0]),
                                                     values[i].narrow(2, 0, spans[0]), scale=self.scaling,
                                                     enable_gqa=self.gqa)
            else:
                outs: List[torch.Tensor] = []
                for r in range(n):
                    outs.append(F.scaled_dot_product_attention(
                        query.narrow(0, r, 1), keys[i].narrow(0, row_ids[r], 1).narrow(2, 0, spans[r]),
                        values[i].narrow(0, row_ids[r], 1).narrow(2, 0, spans[r]), scale=self.scaling,
                        enable_gqa=self.gqa))
                out = outs[0] if n == 1 else torch.cat(outs)
            h.add_(self._o(out.view(n, nh * hd), i, o_bias[i]))  # h is this step's own tensor
            x = _rms_norm(h, self.norm2[i], self.eps2[i], self.width)
            h.add_(self._mlp(x, i))
        h = _rms_norm(h, self.norm, self.norm_eps, self.width)
        if self.int8:
            return _with_bias(int8_product(h, self.head[0]), self.head_bias)
        return _product(h, self.head_weights[0], self.head_bias)

    def _qkv(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """q, k and v of rows x (n, C), side by side (n, (nh + 2 nkv) hs)."""
        if self.int8:
            return _with_bias(int8_product(x, self.qkv[i]), self.qkv_bias[i])
        weights, biases = self.qkv_weights[i], self.qkv_biases[i]
        if len(weights) == 1:  # q, k and v joined
            return _product(x, weights[0], biases[0])
        return torch.cat([_product(x, weights[0], biases[0]), _product(x, weights[1], biases[1]),
                          _product(x, weights[2], biases[2])], dim=1)

    def _o(self, x: torch.Tensor, i: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """o_proj of rows x (n, C) with this query's bias, (C,) or per row (n, C)."""
        if self.int8:
            return _with_bias(int8_product(x, self.o[i]), bias)
        return _product(x, self.o_weights[i], bias)

    def _mlp(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """LLaMA's MLP, down(silu(gate(x)) * up(x))."""
        if self.int8:
            gate_up = _with_bias(int8_product(x, self.gate_up[i]), self.gate_up_bias[i])
            width = self.gate_width
            return _with_bias(int8_product(F.silu(gate_up[:, :width]).mul_(gate_up[:, width:]), self.down[i]),
                              self.down_bias[i])
        weights, biases = self.gate_up_weights[i], self.gate_up_biases[i]
        if len(weights) == 1:  # gate and up joined
            gate_up = _product(x, weights[0], biases[0])
            gated = F.silu(gate_up[:, :self.gate_width]).mul_(gate_up[:, self.gate_width:])
        else:
            gated = F.silu(_product(x, weights[0], biases[0])).mul_(_product(x, weights[1], biases[1]))
        return _product(gated, self.down_weights[i], self.down_biases[i])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm on float32 rows (n, width), op for op (so bit for bit); `eps` and `width` 0-dim
    float32 tensors. `F.rms_norm` gives the same numbers through a composite of about a dozen calls: 30 us a row
    here against about 8. In place where the tensor is this function's own (the same kernels, fewer allocations); a
    product commutes exactly. The mean as the sum and division it runs (`x * x` is what `pow(2)` computes), and
    mean + eps as one `addcdiv` (eps + sum / width: the same two roundings) on 0-dim tensors: +0.5%, then
    about +1% a float32 token (paired rounds, two threads)."""
    return (x * torch.addcdiv(eps, (x * x).sum(-1, keepdim=True), width).rsqrt_()).mul_(weight)


def _product(x: torch.Tensor, transposed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ W^T (+ bias) for rows x (n, in) and `transposed` the (in, out) view W^T. Without a bias (all-zero ones
    are dropped: 0 + s is s) the `mm` that `F.linear(x, W)` calls, less its transposes and the zero bias's copy and
    add: about 3 us a product, 2% of a float32 token at two threads. With one, `F.linear` itself: TorchScript
    splits an `addmm` written out into `mm` + `add`, which rounds otherwise than the bias inside the product."""
    if bias is None:
        return torch.mm(x, transposed)
    return F.linear(x, transposed.t(), bias)


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
