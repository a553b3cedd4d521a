"""ImageBind-LLM on top of a Hugging Face LLaMA: bind network, LoRA/bias tuning and gated visual injection.

The published model (ImageBind-LLM, OpenGVLab/LLaMA-Adapter `imagebind_LLM/`) changes a frozen LLaMA in three ways:

1. **Bind network** `F`: a 1024-d ImageBind feature `f` is projected to the LLaMA width and refined by three
   residual SwiGLU blocks (`BindNetwork`).
2. **Fine-tuned LLaMA parts**: rank-16 LoRA (no scaling, no dropout) on wq, wk, wv, wo, w1, w2, w3, zero-initialised
   biases on wq, wo, w1, w2, w3, and all RMSNorm weights (`LoRALinear`; the norms are plain backbone parameters that
   the adapter checkpoint overwrites).
3. **Zero-initialised gated injection** into the last `query_layers` layers (all 32 for the released 7B): with
   `u_l = F(f) + p_l` (`p_l` a learned prefix query), the attention output of *every* position gets the per-head
   value `tanh(gate_l) * wv(u_l)` (base wv, no LoRA) added before the output projection wo.

Everything after `wv(u_l)` in 3. is linear and independent of the position, so the whole visual effect of layer l is
one constant vector `c_l = wo_lin(tanh(gate_l) * wv(u_l))` added to the attention block's output, where `wo_lin` is
wo's weight plus its LoRA update (its bias is added anyway). `ImageBindLLM.set_visual_features` computes the `c_l`
once per query; decoding then costs one vector addition per layer and token, and the backbone keeps its own
attention kernels and KV cache.

Generalisation beyond the official code (which only knows multi-head attention): with grouped-query attention
(`num_key_value_heads < num_attention_heads`, e.g. SmolLM2), the adapter value `wv(u_l)` has one vector per
key/value head; it is repeated to the query heads exactly as transformers' `repeat_kv` repeats the values, so query
head h uses kv head `h // (num_heads // num_kv_heads)`. With as many kv heads as heads this is the official formula.

Inference-time folding (`ImageBindLLM.merge_adapters`): run per token, the seven LoRA pairs (and the tuned biases) of
every layer are many small extra matmuls. Merging folds each `LoRALinear` into its base layer once, W <- W + B A
(computed in float32, cast back to the model dtype), with the tuned bias as the base layer's bias, and each layer's
c_l is folded into wo's bias once per query: a token forward costs what the plain backbone costs plus the tuned
biases the published model adds (one fused bias per projection), with no extra module call
(`GatedOutputProjection.merge`). The visual path needs the base wv without LoRA; instead of a second copy of wv it
is recovered as wv_merged(u) - B A u - bias from the kept rank-r factors (exact in real arithmetic, equal up to the
rounding of the merged weight), once per query. Merging cannot be undone exactly, so it is an inference-only
transform: a merged model refuses `state_dict`, `load_state_dict` and adapter checkpoints (`AdaptersMergedError`);
build a fresh model to save or load weights.

Module names inside the patched backbone (used by `checkpoints.py` to map the official key names):
`self_attn.{q,k,v}_proj` and `mlp.{gate,up,down}_proj` are `LoRALinear`; `self_attn.o_proj` is a
`GatedOutputProjection` whose `proj` is a `LoRALinear` and whose `gate` is the layer's gate.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

logger = logging.getLogger(__name__)

# Official placement: bias on wq, wo, w1, w2, w3 (not wk, wv); LoRA on all seven projections.
_ATTENTION_BIAS = {'q_proj': True, 'k_proj': False, 'v_proj': False, 'o_proj': True}
_MLP_BIAS = {'gate_proj': True, 'up_proj': True, 'down_proj': True}


class ModelError(ValueError):
    """A backbone that cannot be patched, an invalid configuration or invalid visual features."""


class AdaptersMergedError(ModelError):
    """Saving or loading weights of a model whose adapters were merged into the base weights (inference only)."""


@dataclass(frozen=True)
class ImageBindLLMConfig:
    """Hyper-parameters of the ImageBind-LLM additions; the LLaMA sizes come from the backbone's own config.

    Attributes:
        embed_dim: width of the ImageBind feature (1024 for imagebind_huge).
        lora_rank: rank of every LoRA update (official: 16).
        bind_blocks: residual SwiGLU blocks in the bind network (official: 3).
        bind_mult: hidden expansion of those blocks (official: 4, i.e. 4096 -> 16384).
        norm_eps: epsilon of the bind network's RMSNorms (official: 1e-6).
        query_layers: how many of the LAST backbone layers receive the visual vector; None means all
            (official 7B: 32 = all).
    """

    embed_dim: int = 1024
    lora_rank: int = 16
    bind_blocks: int = 3
    bind_mult: int = 4
    norm_eps: float = 1e-6
    query_layers: int | None = None

    def __post_init__(self) -> None:
        for name in ('embed_dim', 'lora_rank', 'bind_blocks', 'bind_mult'):
            if getattr(self, name) < 1:
                raise ModelError(f'ImageBindLLMConfig.{name} must be >= 1, got {getattr(self, name)}')
        if self.norm_eps <= 0:
            raise ModelError(f'ImageBindLLMConfig.norm_eps must be > 0, got {self.norm_eps}')
        if self.query_layers is not None and self.query_layers < 1:
            raise ModelError(f'ImageBindLLMConfig.query_layers must be >= 1 or None, got {self.query_layers}')


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as LLaMA's (used by the bind network)."""

    def __init__(self, dim: int, eps: float = 1e-6, **factory: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class BindBlock(nn.Module):
    """One residual SwiGLU block of the bind network: x + w2(silu(w1 n(x)) * w3 n(x)), no biases."""

    def __init__(self, dim: int, mult: int, eps: float, **factory: Any) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps, **factory)
        self.w1 = nn.Linear(dim, mult * dim, bias=False, **factory)
        self.w2 = nn.Linear(mult * dim, dim, bias=False, **factory)
        self.w3 = nn.Linear(dim, mult * dim, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class BindNetwork(nn.Module):
    """Maps an ImageBind feature (..., embed_dim) to the LLM width (..., hidden_size)."""

    def __init__(self, embed_dim: int, hidden_size: int, blocks: int, mult: int, eps: float, **factory: Any) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, hidden_size, bias=True, **factory)
        self.blocks = nn.ModuleList(BindBlock(hidden_size, mult, eps, **factory) for _ in range(blocks))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.proj(features)
        for block in self.blocks:
            x = block(x)
        return x


class LoRALinear(nn.Module):
    """A frozen linear layer with an optional zero-initialised bias and a LoRA update.

    y = base(x) + bias + lora_b(lora_a(x)), no scaling and no dropout, `lora_b` zero-initialised: a fresh wrapper
    computes exactly what `base` computes. `base` is kept as is (its own bias, if any, still applies).

    `merge()` folds the update into `base` for inference (see `ImageBindLLM.merge_adapters`); afterwards calling
    the wrapper is calling `base.forward`, and `lora_a`/`lora_b` only serve `base_output`.
    """

    def __init__(self, base: nn.Linear, rank: int, bias: bool) -> None:
        super().__init__()
        factory = {'device': base.weight.device, 'dtype': base.weight.dtype}
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.zeros_(self.lora_b.weight)
        if bias:
            self.bias = nn.Parameter(torch.zeros(base.out_features, **factory))
        else:
            self.register_parameter('bias', None)
        self.merged: bool = False
        # Once merged, the base weight no longer holds the backbone's weight: saving or loading it would be wrong.
        self.register_state_dict_pre_hook(_refuse_if_merged)
        self.register_load_state_dict_pre_hook(_refuse_if_merged)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_b(self.lora_a(x))

    def linear_map(self, x: torch.Tensor) -> torch.Tensor:
        """The linear part only, (W + B A) x, without any bias."""
        if self.merged:
            return F.linear(x, self.base.weight)
        return F.linear(x, self.base.weight) + self._lora(x)

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """What the frozen `base` layer alone computes (W x + its own bias): no LoRA update, no tuned bias.

        After `merge()` this is merged(x) - B A x - bias, from the kept rank-r factors rather than a second copy
        of W: exact in real arithmetic, equal up to the rounding of the merged weight in floating point.
        """
        if not self.merged:
            return self.base(x)
        y = self.base(x) - self._lora(x)
        return y if self.bias is None else y - self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x) + self._lora(x)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def merge(self) -> None:
        """Fold W + B A into the base weight and the tuned bias into the base bias (idempotent, irreversible)."""
        if self.merged:
            return
        weight = self.base.weight
        # float32 accumulation, one rounding to the model dtype (bf16/fp16 sums would round twice).
        merged = torch.addmm(weight.float(), self.lora_b.weight.float(), self.lora_a.weight.float())
        weight.copy_(merged)
        if self.bias is not None:
            if self.base.bias is None:
                self.base.bias = self.bias  # shared, like tied embeddings: no copy
            else:
                self.base.bias.add_(self.bias)
        self.merged = True
        # Calls now go straight to the base layer's forward, as in the plain backbone (an instance attribute
        # shadows the method): on small models the extra Python frame per projection and token is measurable.
        self.forward = self.base.forward


def _adapters_merged(action: str) -> AdaptersMergedError:
    return AdaptersMergedError(f'cannot {action}: the LoRA adapters are merged into the base weights, an '
                               'inference-only transform that cannot be undone exactly; build a fresh, unmerged '
                               'model for that')


def _refuse_if_merged(module: LoRALinear, *_: Any) -> None:
    """The state_dict and load_state_dict pre-hook of `LoRALinear`."""
    if module.merged:
        raise _adapters_merged('save or load weights')


def linear_rows(x: torch.Tensor, weight: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """(n, 1, C) rows through `weight`, each plus its own bias (n, out): one addmm, rounded once."""
    return torch.addmm(biases, x.view(x.shape[0], -1), weight.t()).unsqueeze(1)


class ServedOutputProjection(nn.Module):
    """wo as a merged model runs it per token: the merged weight (shared, not copied) and a bias buffer that holds
    the tuned bias plus the layer's visual vector c_l. The bias is per-query state, not a parameter."""

    bias: torch.Tensor

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
        self.register_buffer('bias', torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def rows(self, x: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
        """Decode rows (n, 1, C), each with its own bias (n, C) (the batch decoder's per-row visual vectors):
        x W^T + biases in one addmm, rounded once as `forward`'s `F.linear(x, W, bias)` rounds it (a product and a
        separate add round twice, which in bfloat16 changes answers). `cpu_int8` replaces it."""
        return linear_rows(x, self.weight, biases)


class GatedOutputProjection(nn.Module):
    """An attention block's output projection plus that layer's gated visual value.

    Holds the layer's gate (1, num_heads, 1, 1), zero-initialised, and the precomputed visual vector c_l
    (see the module docstring); without a vector it is exactly `proj`.

    `merge()` (inference only) merges `proj` and then serves tokens through `served`, one matmul + bias like the
    backbone's wo, whose bias (the tuned bias plus c_l) each `set_visual_value` rewrites.
    """

    visual_vector: torch.Tensor | None

    def __init__(self, proj: LoRALinear, num_heads: int) -> None:
        super().__init__()
        self.proj = proj
        self.num_heads = num_heads
        self.gate = nn.Parameter(torch.zeros(1, num_heads, 1, 1, device=proj.base.weight.device,
                                             dtype=proj.base.weight.dtype))
        self.register_buffer('visual_vector', None, persistent=False)
        self.served: ServedOutputProjection | None = None

    def set_visual_value(self, value: torch.Tensor | None) -> None:
        """Precompute c = proj.linear_map(tanh(gate) * value) from the per-head value (num_heads, head_dim)."""
        if value is None:
            self.visual_vector = None
        else:
            gated = torch.tanh(self.gate).view(self.num_heads, 1) * value  # (nh, hs)
            self.visual_vector = self.proj.linear_map(gated.reshape(-1))  # (hidden,)
        if self.served is not None:
            self._fold_visual_vector()

    @torch.no_grad()
    def _fold_visual_vector(self) -> None:
        """served.bias = the merged projection's bias + c, in place."""
        bias, tuned, vector = self.served.bias, self.proj.base.bias, self.visual_vector
        if tuned is None:
            bias.zero_()
        else:
            bias.copy_(tuned)
        if vector is not None:
            bias.add_(vector)

    @torch.no_grad()
    def merge(self) -> None:
        """Merge `proj` and serve tokens through one matmul + bias, like the backbone's wo (idempotent)."""
        if self.served is not None:
            return
        self.proj.merge()
        self.served = ServedOutputProjection(self.proj.base.weight)
        self._fold_visual_vector()
        # An instance attribute shadows the method: calls go straight to the served forward, one Python frame less.
        self.forward = self.served.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return y if self.visual_vector is None else y + self.visual_vector


def _decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's decoder layers, after checking that they have the LLaMA projections we patch."""
    layers = getattr(getattr(backbone, 'model', None), 'layers', None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelError(f'{type(backbone).__name__} is not a LLaMA-style causal LM (no model.layers)')
    for index, layer in enumerate(layers):
        for parent, names in (('self_attn', _ATTENTION_BIAS), ('mlp', _MLP_BIAS)):
            module = getattr(layer, parent, None)
            for name in names:
                proj = getattr(module, name, None)
                if isinstance(proj, (LoRALinear, GatedOutputProjection)):
                    raise ModelError(f'layer {index} {parent}.{name} is already patched: wrap a fresh backbone')
                if not isinstance(proj, nn.Linear):
                    raise ModelError(f'layer {index} has no plain nn.Linear {parent}.{name} (got {type(proj).__name__})'
                                     '; only LLaMA-architecture backbones are supported')
    return layers


class ImageBindLLM(nn.Module):
    """A transformers `LlamaForCausalLM` patched in place with the ImageBind-LLM additions.

    Usage: `model.set_visual_features(f)` once per query (f: the fused 1024-d ImageBind feature, shape
    (embed_dim,) or (1, embed_dim); None removes the visual input), then call `model(input_ids=..., cache=...,
    use_cache=True)` exactly like the backbone (all keyword arguments are passed through; its output, with
    `.logits`, is returned). A fresh instance (zero gates, biases and second LoRA factors) computes exactly what
    the backbone computes; zero gates alone remove the visual effect.

    The visual vectors are model state: serve one query at a time per instance. For inference, call
    `merge_adapters()` once all weights are loaded: same results, the per-token cost of the plain backbone plus
    the tuned biases. `model.backbone` is the patched model itself; token loops may call it directly.
    """

    def __init__(self, backbone: LlamaForCausalLM, config: ImageBindLLMConfig | None = None) -> None:
        super().__init__()
        config = config or ImageBindLLMConfig()
        layers = _decoder_layers(backbone)
        text_config = backbone.config
        if getattr(text_config, 'hidden_act', 'silu') != 'silu':
            raise ModelError(f"backbone activation is '{text_config.hidden_act}', LLaMA (and ImageBind-LLM) use silu")
        query_layers = len(layers) if config.query_layers is None else config.query_layers
        if query_layers > len(layers):
            raise ModelError(f'query_layers={query_layers} but the backbone has only {len(layers)} layers')

        self.config = config
        self.backbone = backbone
        self.hidden_size: int = text_config.hidden_size
        self.num_heads: int = text_config.num_attention_heads
        self.num_kv_heads: int = getattr(text_config, 'num_key_value_heads', None) or self.num_heads
        self.head_dim: int = getattr(text_config, 'head_dim', None) or self.hidden_size // self.num_heads
        self.query_layers = query_layers
        # Incremented each time the per-layer visual vectors are (re)computed: once per query, never per token.
        self.visual_vector_computations = 0

        for layer in layers:
            self._patch_layer(layer)
        weight = layers[0].self_attn.q_proj.base.weight
        factory = {'device': weight.device, 'dtype': weight.dtype}
        self.prefix_query = nn.Embedding(query_layers, self.hidden_size, **factory)
        self.bind_network = BindNetwork(config.embed_dim, self.hidden_size, config.bind_blocks, config.bind_mult,
                                        config.norm_eps, **factory)
        logger.debug('patched %d layers (visual injection into the last %d), hidden %d, heads %d/%d kv',
                     len(layers), query_layers, self.hidden_size, self.num_heads, self.num_kv_heads)

    def _patch_layer(self, layer: nn.Module) -> None:
        rank = self.config.lora_rank
        attn, mlp = layer.self_attn, layer.mlp
        for name in ('q_proj', 'k_proj', 'v_proj'):
            setattr(attn, name, LoRALinear(getattr(attn, name), rank, _ATTENTION_BIAS[name]))
        attn.o_proj = GatedOutputProjection(LoRALinear(attn.o_proj, rank, _ATTENTION_BIAS['o_proj']),
                                            self.num_heads)
        for name, bias in _MLP_BIAS.items():
            setattr(mlp, name, LoRALinear(getattr(mlp, name), rank, bias))

    @property
    def layers(self) -> nn.ModuleList:
        """All decoder layers of the (patched) backbone."""
        return self.backbone.model.layers

    @property
    def injected_layers(self) -> list[nn.Module]:
        """The last `query_layers` decoder layers, which receive the visual vector (layer i uses prefix_query[i])."""
        return list(self.layers)[-self.query_layers:]

    @property
    def device(self) -> torch.device:
        return self.prefix_query.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prefix_query.weight.dtype

    @property
    def has_visual_features(self) -> bool:
        return self.injected_layers[0].self_attn.o_proj.visual_vector is not None

    def _check_features(self, features: torch.Tensor) -> torch.Tensor:
        embed_dim = self.config.embed_dim
        if not isinstance(features, torch.Tensor):
            raise ModelError(f'visual features must be a torch.Tensor, got {type(features).__name__}')
        if features.shape not in ((embed_dim,), (1, embed_dim)):
            raise ModelError(f'visual features must have shape ({embed_dim},) or (1, {embed_dim}), '
                             f'got {tuple(features.shape)}')
        if not torch.isfinite(features).all():
            raise ModelError('visual features contain NaN or Inf')
        return features.reshape(embed_dim).to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def set_visual_features(self, features: torch.Tensor | None) -> None:
        """Compute the per-layer visual vectors for one query; None removes them (text-only answers)."""
        if features is None:
            for layer in self.injected_layers:
                layer.self_attn.o_proj.set_visual_value(None)
            return
        bound = self.bind_network(self._check_features(features))  # (hidden,)
        queries = bound + self.prefix_query.weight  # (query_layers, hidden): u_l = F(f) + p_l
        groups = self.num_heads // self.num_kv_heads
        for query, layer in zip(queries, self.injected_layers, strict=True):
            attn = layer.self_attn
            value = attn.v_proj.base_output(query)  # the frozen wv, no LoRA (official)
            value = value.view(self.num_kv_heads, self.head_dim).repeat_interleave(groups, dim=0)  # (nh, hs)
            attn.o_proj.set_visual_value(value)
        self.visual_vector_computations += 1

    def lora_projections(self) -> list[LoRALinear]:
        """Every LoRA-wrapped projection of the backbone (seven per decoder layer)."""
        return [module for module in self.backbone.modules() if isinstance(module, LoRALinear)]

    @property
    def merged(self) -> bool:
        """Whether `merge_adapters` has folded the adapters into the base weights."""
        return self.lora_projections()[0].merged

    def merge_adapters(self) -> None:
        """Fold every LoRA update and tuned bias into its base linear layer, for inference (idempotent).

        Token forwards then run one matmul + bias per projection, like the plain backbone. Results are unchanged
        up to floating-point rounding, and visual features already set stay valid. Irreversible: afterwards
        `state_dict`, `load_state_dict` and adapter checkpoints raise `AdaptersMergedError`.
        """
        if self.merged:
            return
        projections = self.lora_projections()
        for projection in projections:
            projection.merge()
        for layer in self.layers:
            layer.self_attn.o_proj.merge()
        logger.info('merged %d LoRA projections into their base weights (inference only)', len(projections))

    def require_unmerged(self, action: str) -> None:
        """Raise `AdaptersMergedError` naming `action` (e.g. 'load an adapter checkpoint') if merged."""
        if self.merged:
            raise _adapters_merged(action)

    def forward(self, **kwargs: Any) -> Any:
        """Run the patched backbone (input_ids, attention_mask, cache, use_cache, ...) and return its output."""
        return self.backbone(**kwargs)
