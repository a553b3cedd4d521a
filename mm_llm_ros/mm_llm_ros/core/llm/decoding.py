"""Token steppers for `generation`: the eager loop and a static-KV-cache loop that a CUDA graph can replay.

A stepper turns a prompt into the last position's logits (`prefill`) and then one token at a time into the next
logits (`step`). `generation._decode` owns everything else (sampling, streaming, cancellation, context rules), so
every stepper gives the same greedy tokens as the eager one up to floating-point rounding.

- `EagerStepper` calls the transformers model with its dynamic KV cache, as `generate()` does.
- `StaticDecoder` preallocates the KV cache once for `capacity` positions and runs the backbone's own modules
  (embeddings, norms, projections, MLPs, rotary embedding, `lm_head`) with a fixed-shape decode step: the token and
  its position live in device tensors, keys and values are written in place with `index_copy_`, and attention is
  `scaled_dot_product_attention` over the whole cache with a mask of the positions written so far. Nothing in that
  step reads a value back to the host, so on CUDA it is captured once into a `torch.cuda.CUDAGraph` and each token
  costs one graph replay plus the host read of the sampled id (`generation.select_next_token`). Modes:

  | mode | decode step | where |
  |---|---|---|
  | `static` | the step's kernels launched one by one | CPU and CUDA |
  | `cuda_graph` | the step captured into one CUDA graph, replayed per token | CUDA |
  | `compile` | the step compiled by `torch.compile` (kernel fusion, e.g. of int8 dequantisation), then captured into a CUDA graph on CUDA | CPU (needs a C++ compiler) and CUDA |

  `auto` (the node's default) is `static` on the CPU and `compile` on CUDA, falling back to `cuda_graph` with a
  logged reason when compiling fails (no Triton or C compiler, for example).

  The prefill runs eagerly (its length changes per prompt) with causal SDPA over the prompt.

Per-query state stays in place for the graph: the merged ImageBind-LLM folds the visual vector into `o_proj`'s bias
buffer in place (`model.ServedOutputProjection`), so a replay sees the current query's vector. An unmerged model
replaces that vector tensor per query, so graphs (and `compile`) refuse it.

In a graph (and compiled), attention reads all `capacity` key/value slots every token (the mask hides the unused
ones): with a 512-token context that is about 2% of the weight bytes of a LLaMA-7B step. `static`, launched op by
op, attends over the written slots only (a view of the cache, no mask), which on the CPU matters (see
`StaticDecoder._static_step`).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.llm.lean_step import LeanDecodeStep

logger = logging.getLogger(__name__)

DecoderMode = Literal['eager', 'static', 'cuda_graph', 'compile']
DECODER_MODES: tuple[str, ...] = ('auto', 'eager', 'static', 'cuda_graph', 'compile')


def resolve_decoder_mode(name: str, device: torch.device) -> DecoderMode:
    """Map the `generation.decoder` parameter to a mode for `device`.

    auto: static on the CPU (SmolLM2, one thread: 15.3 tok/s against 13.0 eager, the same greedy tokens; compile
    gave 16.6 after 49 s of compiling), compile on CUDA (H200, LLaMA-7B shape, tokens/s graph-replayed vs compiled:
    fp16 145 vs 199, int8 41 vs 101, int4 155 vs 320; see docs/gpu.md). `fallback_mode` says what auto falls back
    to when compiling fails.
    """
    name = (name or 'auto').strip().lower()
    if name not in DECODER_MODES:
        raise ConfigError(f"generation.decoder must be one of {', '.join(DECODER_MODES)}, got '{name}'")
    if name == 'auto':
        return 'compile' if device.type == 'cuda' else 'static'
    if name == 'cuda_graph' and device.type != 'cuda':
        raise ConfigError(f"generation.decoder 'cuda_graph' needs a CUDA device, the model is on '{device}' "
                           "(use 'static' or 'eager' on the CPU)")
    return name  # type: ignore[return-value]


def fallback_mode(name: str, mode: DecoderMode) -> DecoderMode | None:
    """What to decode with when `mode` cannot start: only auto's compile falls back (to cuda_graph); a mode the user
    chose is refused instead."""
    return 'cuda_graph' if (name or 'auto').strip().lower() == 'auto' and mode == 'compile' else None


@functools.cache
def cache_keyword() -> str:
    """The KV-cache argument name of the installed transformers: `cache` in recent 5.x, else `past_key_values`."""
    import inspect

    from transformers import LlamaForCausalLM

    return 'cache' if 'cache' in inspect.signature(LlamaForCausalLM.forward).parameters else 'past_key_values'


def output_cache(output: Any) -> Any:
    cache = getattr(output, 'cache', None)
    return cache if cache is not None else output.past_key_values


def model_device(model: Any) -> torch.device:
    device = getattr(model, 'device', None)
    if isinstance(device, torch.device):
        return device
    parameters = getattr(model, 'parameters', None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device('cpu')


class EagerStepper:
    """The transformers forward with its dynamic KV cache: one model call per token (the reference path)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = model_device(model)
        self._keyword = cache_keyword()
        self._cache: Any = None

    def prefill(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        self._cache = None
        return self._forward(torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device))

    def step(self, token: int) -> torch.Tensor:
        return self._forward(torch.tensor([[token]], dtype=torch.long, device=self.device))

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # logits_to_keep=1: only the last position's logits are needed.
        output = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._keyword: self._cache})
        self._cache = output_cache(output)
        return output.logits[0, -1]


def run_decoder_layers(layers: Sequence[nn.Module], hidden: torch.Tensor,
                       attention: Callable[[int, nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """LLaMA's decoder layers over (B, T, C) `hidden`: pre-norm attention, then pre-norm MLP, each added to the
    residual stream. `attention(index, layer, normed)` is the caller's attention over its own KV cache."""
    for index, layer in enumerate(layers):
        hidden = hidden + attention(index, layer, layer.input_layernorm(hidden))
        hidden = hidden + mlp_output(layer.mlp, layer.post_attention_layernorm(hidden))
    return hidden


def mlp_output(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LLaMA's MLP, down(act(gate(x)) * up(x)); decode rows take a fused gate+up product where the model has one
    (`mlp.decode_gate_up`, added by `cpu_int8`)."""
    fused = getattr(mlp, 'decode_gate_up', None)
    if fused is None or x.shape[1] != 1:
        return mlp(x)
    gate, up = fused(x)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def rotated_qkv(attn: nn.Module, x: torch.Tensor, head_dim: int,
                rotary: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, C) -> query (B, nh, T, hs), key and value (B, nkv, T, hs); query and key rotated (RoPE). Decode rows
    take a fused q+k+v product where the model has one (`attn.decode_qkv`, added by `cpu_int8`)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    shape = (*x.shape[:2], -1, head_dim)
    fused = getattr(attn, 'decode_qkv', None)
    projected = fused(x) if fused is not None and x.shape[1] == 1 else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
    query, key, value = (p.view(shape).transpose(1, 2) for p in projected)
    query, key = apply_rotary_pos_emb(query, key, *rotary)
    return query, key, value


def reusable_prefix(previous: Sequence[int], prompt_ids: Sequence[int]) -> int:
    """Leading cache slots a prompt can take over from a previous prompt's (their common prefix), leaving at least
    two prompt tokens to run: the logits after the prompt come from a prefill, which `cpu_int8` keeps in float."""
    common = 0
    for a, b in zip(previous, prompt_ids):
        if a != b:
            break
        common += 1
    return max(0, min(common, len(prompt_ids) - 2))


def _unmerged_injection(model: nn.Module) -> bool:
    """Whether an ImageBind-LLM output projection still replaces its visual vector per query (not graph-safe)."""
    from mm_llm_ros.core.llm.model import GatedOutputProjection

    return any(isinstance(m, GatedOutputProjection) and m.served is None for m in model.modules())


class StaticDecoder:
    """A static KV cache and a fixed-shape decode step over a transformers LLaMA (plain or ImageBind-LLM patched).

    Create once per model and reuse for every generation (the cache and the captured graph are kept); one
    generation at a time. `prefill(prompt)` starts a sequence, `step(token)` continues it; both return the next
    position's logits (vocab,), in the model dtype, as the eager path does.
    """

    def __init__(self, model: nn.Module, capacity: int, mode: DecoderMode = 'static',
                 reuse_prefix: bool = True) -> None:
        if mode not in ('static', 'cuda_graph', 'compile'):
            raise ConfigError(f"StaticDecoder runs 'static', 'cuda_graph' or 'compile', not '{mode}'")
        base = getattr(model, 'model', None)
        if not isinstance(getattr(base, 'layers', None), nn.ModuleList) or not hasattr(model, 'lm_head'):
            raise ConfigError(f'{type(model).__name__} is not a LLaMA-style causal LM (model.layers, lm_head)')
        self.device = model_device(model)
        if mode == 'cuda_graph' and self.device.type != 'cuda':
            raise ConfigError(f"decoder 'cuda_graph' needs the model on a CUDA device, it is on '{self.device}'")
        if mode != 'static' and _unmerged_injection(model):
            raise ConfigError(f"decoder '{mode}' needs a merged ImageBind-LLM (call merge_adapters() first): "
                               'the unmerged model replaces its visual vectors per query, which a graph cannot see')
        self.model = model
        self.mode = mode
        self.capacity = capacity
        config = model.config
        self.vocab_size: int = model.get_input_embeddings().num_embeddings
        self._layers = base.layers
        self._base = base
        first = self._layers[0].self_attn
        self.head_dim: int = first.head_dim
        self.num_kv_heads: int = config.num_key_value_heads or config.num_attention_heads
        self.gqa = self.num_kv_heads != config.num_attention_heads
        dtype = base.embed_tokens.weight.dtype  # the activations' dtype (never quantised)
        shape = (1, self.num_kv_heads, capacity, self.head_dim)  # (B, nkv, L, hs)
        self._keys = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in self._layers]
        self._values = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in self._layers]
        # Decode-step inputs as device tensors: a graph replays with whatever they hold.
        self._token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self._position = torch.zeros((1,), dtype=torch.long, device=self.device)
        self._slots = torch.arange(capacity, device=self.device)
        self._length = 0
        self._prompt: list[int] = []  # the last completed prefill's prompt: its slots are reusable (prefix reuse)
        self._state: list[torch.Tensor | None] = []
        self.reused = 0  # slots the last prefill reused
        self.reuse_prefix = reuse_prefix  # generation.prefix_reuse
        self._step_fn = self._static_step if mode == 'static' else self._decode_step
        # On the CPU (float32, or int8 from cpu_int8): the same step in far fewer torch calls (lean_step).
        self._lean_step = LeanDecodeStep.for_model(model, capacity) if mode == 'static' else None
        self._first_row = torch.zeros(1, dtype=torch.long)  # the lean step's cache row (this cache has one)
        if mode == 'compile':
            self._step_fn = torch.compile(self._decode_step, fullgraph=True, dynamic=False)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: torch.Tensor | None = None

    # ---- the public stepper interface --------------------------------------------------------------------------
    def warm_up(self) -> None:
        """One prefill and two steps: captures the CUDA graph (and compiles) now, not during the first question.
        The second step is for TorchScript (the CPU lean step), which profiles its first run and optimises on the
        second (42 and 16 ms for SmolLM2, then 10)."""
        self.prefill([0])
        self.step(0)
        self.step(0)

    def prefill(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Start a sequence with `prompt_ids` (1 <= len <= capacity); returns the logits after its last token."""
        length = len(prompt_ids)
        if not 0 < length <= self.capacity:
            raise ConfigError(f'prompt of {length} tokens does not fit the static cache of {self.capacity}')
        if max(prompt_ids) >= self.vocab_size:
            raise IndexError(f'token id {max(prompt_ids)} >= vocabulary size {self.vocab_size}')
        state = self._query_state()
        start = self._reusable(prompt_ids, state)
        self._prompt = []  # until this prefill completes, no slot is known to be reusable
        for cache in self._keys + self._values:  # stale slots stay masked, but must not hold NaN/Inf (0 * NaN)
            cache[:, :, start:].zero_()
        input_ids = torch.tensor([list(prompt_ids[start:])], dtype=torch.long, device=self.device)
        positions = torch.arange(start, length, device=self.device)
        with torch.inference_mode():
            logits = self._forward(input_ids, positions, decode=False, start=start)
        self._length = length
        self._prompt, self._state = list(prompt_ids), state
        self.reused = start
        return logits[0]

    def _query_state(self) -> list[torch.Tensor | None]:
        """What a layer's keys and values depend on besides the tokens: ImageBind-LLM's per-query visual value in
        o_proj (the merged bias buffer, or the unmerged visual vector), copied; None for a plain backbone's layer."""
        state = []
        for layer in self._layers:
            o_proj = layer.self_attn.o_proj
            served = getattr(o_proj, 'served', None)
            tensor = served.bias if served is not None else getattr(o_proj, 'visual_vector', None)
            state.append(None if tensor is None else tensor.detach().clone())
        return state

    def _reusable(self, prompt_ids: Sequence[int], state: list[torch.Tensor | None]) -> int:
        """How many leading cache slots already hold this prompt's keys and values: the previous prompt's common
        prefix (decode steps only write after it) if the per-query state is unchanged."""
        previous = self._prompt
        if not self.reuse_prefix or not previous or len(state) != len(self._state) or any(
                (a is None) != (b is None) or (a is not None and not torch.equal(a, b))
                for a, b in zip(state, self._state, strict=True)):
            return 0
        return reusable_prefix(previous, prompt_ids)

    def step(self, token: int) -> torch.Tensor:
        """Feed the next token (at position = tokens so far); returns the logits after it."""
        if self._length >= self.capacity:
            raise ConfigError(f'the static cache of {self.capacity} positions is full')
        self._token.fill_(token)
        self._position.fill_(self._length)
        self._length += 1
        if self.mode == 'static' or self.device.type != 'cuda':
            with torch.inference_mode():
                return self._step_fn()[0]
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._graph_logits[0]

    # ---- the model ---------------------------------------------------------------------------------------------
    def _decode_step(self) -> torch.Tensor:
        """The fixed-shape step (graphs, compile): attention over the whole cache, unwritten slots masked."""
        return self._forward(self._token, self._position, decode=True)

    def _static_step(self) -> torch.Tensor:
        """The step launched op by op: attention over the written slots only (a view, no mask), whose count the host
        knows. On the CPU with the default 1024-slot context this is most of the attention time (SmolLM2: about
        300 us per layer and token masked over the whole cache, 60 us over 300 written slots)."""
        if self._lean_step is not None:
            return self._lean_step(self._token.view(1), self._position, self._first_row, [0], [self._length],
                                   self._keys, self._values)
        return self._forward(self._token, self._position, decode=True, span=self._length)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, decode: bool,
                 span: int | None = None, start: int = 0) -> torch.Tensor:
        """The backbone's layers with the static cache; (1, T) ids at `positions` -> last position's (1, vocab).
        A decode step with `span` attends over the first `span` slots, without a mask; a prefill from `start` > 0
        (slots before it reused) over the prefix and itself, causally."""
        hidden = self._base.embed_tokens(input_ids)  # (1, T, C)
        rotary = self._base.rotary_emb(hidden, positions.unsqueeze(0))
        if decode:
            mask = None if span is not None else (self._slots <= positions[-1]).view(1, 1, 1, -1)
        elif start:
            span = start + input_ids.shape[1]
            mask = (self._slots[:span].view(1, -1) <= positions.view(-1, 1)).view(1, 1, -1, span)  # (1, 1, T, L)
        else:
            mask = None
        hidden = run_decoder_layers(self._layers, hidden, lambda index, layer, x: self._attention(
            layer.self_attn, index, x, rotary, positions, mask, span))
        hidden = self._base.norm(hidden[:, -1:])
        return self.model.lm_head(hidden)[:, -1]

    def _attention(self, attn: nn.Module, index: int, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                   positions: torch.Tensor, mask: torch.Tensor | None, span: int | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        query, key, value = rotated_qkv(attn, x, self.head_dim, rotary)  # (B, nh | nkv, T, hs)
        keys, values = self._keys[index], self._values[index]
        keys.index_copy_(2, positions, key)
        values.index_copy_(2, positions, value)
        if span is not None:  # static decode (the written slots, all visible) or a prefill after reused slots
            out = F.scaled_dot_product_attention(query, keys[:, :, :span], values[:, :, :span], attn_mask=mask,
                                                 scale=attn.scaling, enable_gqa=self.gqa)
        elif mask is None:  # prefill: causal attention within the prompt, which starts at position 0
            out = F.scaled_dot_product_attention(query, key, value, is_causal=length > 1, scale=attn.scaling,
                                                 enable_gqa=self.gqa)
        else:  # decode: the whole cache, unwritten slots masked
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=attn.scaling,
                                                 enable_gqa=self.gqa)
        return attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    # ---- CUDA graph --------------------------------------------------------------------------------------------
    def _capture(self) -> None:
        """Warm the step up on a side stream (cuBLAS handles, compilation), then capture it into one graph.

        The warm-up writes the current token's key/value to its slot, exactly as the replay that follows does.
        """
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                self._step_fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            self._graph_logits = self._step_fn()
        self._graph = graph
        logger.info("decode step captured into a CUDA graph (%d layers, %d cache positions, mode '%s')",
                    len(self._layers), self.capacity, self.mode)
