"""Continuous batching: several sequences decode together, one forward per step, each with its own state.

`BatchDecoder` is `decoding.StaticDecoder` with a batch dimension: a static KV cache of `max_batch` rows, each row
one sequence with its own length. `BatchScheduler` runs `generation._decode`'s loop for every row at once: a newcomer
is prefilled alone between two steps (`join`), then each `step()` feeds the newest token of every running row in one
forward; a row that stops (EOS, token budget, context, cancellation) leaves at once and frees its row for the next.

Design (see docs/design.md, "Continuous batching"):

- **Cache layout.** Keys and values per layer are (max_batch, nkv, capacity, hs), preallocated. Row r's token at
  position p is written to [r, :, p] (`index_put` with per-row positions); in a decode step each row attends over
  its own written slots, without a mask, as the serial step does (rows of one length in one call). Rows never
  move, so a leaving row costs nothing. We do not use transformers' dynamic cache with left padding: joining a
  running batch would re-pad (copy) every row's cache, and a padded row's positions and masks
  must be rebuilt per join; a fixed row per sequence keeps each row's positions exactly those of the serial path.
- **Per-row visual vector.** The merged ImageBind-LLM folds a query's visual vector into o_proj's bias (one
  (hidden,) buffer: `model.ServedOutputProjection`). Here o_proj runs as `x @ W.T + bias[rows]` with a
  (max_batch, hidden) bias table per layer, the bias added as the serial path adds it
  (`ServedOutputProjection.rows`): when a sequence joins, the model's visual features are set for it and each
  layer's current o_proj bias (o_proj applied to a zero vector: the tuned bias plus c_l) is copied into its row.
  The model's own single-sequence path (`StaticDecoder`, `EagerStepper`) is untouched.
- **Prefill** runs one newcomer at a time (batch 1, causal attention over its prompt), exactly as the serial
  decoder; running rows wait for it (no chunked prefill: prompts here are a few hundred tokens at most). Concurrent
  askers share the chat template, the system message and the perception context: a newcomer copies the keys and
  values of the longest common prompt prefix from any row whose o_proj biases (visual vectors) are its own, and
  prefills only the rest (`admit`, `_reusable`; the serial decoder reuses its previous prompt the same way).
- **Sampling** is per row with the row's own settings and its own seeded `torch.Generator` (`generation`'s
  `select_next_token`), so a seeded request draws the same tokens whatever else is in the batch.

Every operation of a decode row is the serial step's; only the products differ. oneDNN's bfloat16 products give a
row the same bits in any batch of up to 16 rows, and int8 runs each row as its own kernel call, so in bfloat16 and
int8 a batch row's logits are the serial ones bit for bit (tested). float32 products over several rows sum in
another order than over one, so float32 rows equal the serial ones up to that rounding (the unit tests check token
equality on the tiny model).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mm_llm_ros.core.errors import ConfigError

from .decoding import model_device, reusable_prefix, rotated_qkv, run_decoder_layers
from .generation import (GenerationConfig, GenerationError, GenerationResult, IncrementalDecoder, StopReason,
                         TokenEvent, _check_prompt, _fit_prompt, _sampling_generator, select_next_token)
from .lean_step import LeanDecodeStep

if TYPE_CHECKING:
    from .tokenizer import TextTokenizer

logger = logging.getLogger(__name__)


def _output_projection(o_proj: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """o_proj for decode rows (n, 1, C), each with its own bias (n, C): a merged ImageBind-LLM projection's
    `ServedOutputProjection.rows` (the product and the bias rounded as the serial path rounds them), or a plain
    nn.Linear's product plus the bias."""
    from mm_llm_ros.core.llm.model import GatedOutputProjection, linear_rows

    if isinstance(o_proj, nn.Linear):
        return lambda x, biases, weight=o_proj.weight: linear_rows(x, weight, biases)
    if isinstance(o_proj, GatedOutputProjection) and o_proj.served is not None:
        return o_proj.served.rows
    raise ConfigError('batched decoding needs a plain LLaMA or a merged ImageBind-LLM (call merge_adapters() '
                       f'first): o_proj is a {type(o_proj).__name__} that is not merged')


class BatchDecoder:
    """A static KV cache of `max_batch` rows and a decode step over any subset of them.

    `admit(row, prompt)` prefills one sequence into `row` and returns the logits after its prompt (vocab,); its
    o_proj biases are taken from the model as it is at that moment (set the query's visual features first).
    `step(rows, tokens)` feeds one token per listed row and returns their next logits (n, vocab).
    """

    def __init__(self, model: nn.Module, max_batch: int, capacity: int, reuse_prefix: bool = True) -> None:
        if max_batch < 1:
            raise ConfigError(f'max_batch must be >= 1, got {max_batch}')
        base = getattr(model, 'model', None)
        if not isinstance(getattr(base, 'layers', None), nn.ModuleList) or not hasattr(model, 'lm_head'):
            raise ConfigError(f'{type(model).__name__} is not a LLaMA-style causal LM (model.layers, lm_head)')
        self.model = model
        self.device = model_device(model)
        self.max_batch = max_batch
        self.capacity = capacity
        self.vocab_size: int = model.get_input_embeddings().num_embeddings
        self._base = base
        self._layers = base.layers
        config = model.config
        self.head_dim: int = self._layers[0].self_attn.head_dim
        self.num_kv_heads: int = config.num_key_value_heads or config.num_attention_heads
        self.gqa = self.num_kv_heads != config.num_attention_heads
        dtype = base.embed_tokens.weight.dtype
        shape = (max_batch, self.num_kv_heads, capacity, self.head_dim)  # (B, nkv, L, hs)
        self._keys = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in self._layers]
        self._values = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in self._layers]
        self._products = [_output_projection(layer.self_attn.o_proj) for layer in self._layers]
        hidden = config.hidden_size
        self._biases = [torch.zeros((max_batch, hidden), device=self.device, dtype=dtype) for _ in self._layers]
        self._slots = torch.arange(capacity, device=self.device)
        self.lengths = [0] * max_batch  # tokens written per row
        self._prompts: list[Optional[list[int]]] = [None] * max_batch  # each row's last prompt (prefix reuse)
        self.reused = 0  # slots the last admit took over from a previous prompt
        self.reuse_prefix = reuse_prefix  # generation.prefix_reuse
        # On the CPU (float32, or int8 from cpu_int8): decode steps in far fewer torch calls (lean_step).
        self._lean_step = LeanDecodeStep.for_model(model, capacity)

    # ---- rows ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def admit(self, row: int, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Start row `row` with `prompt_ids`; returns the logits after the prompt's last token (vocab,)."""
        length = len(prompt_ids)
        if not 0 <= row < self.max_batch:
            raise ConfigError(f'row {row} outside the batch of {self.max_batch}')
        if not 0 < length <= self.capacity:
            raise ConfigError(f'prompt of {length} tokens does not fit the static cache of {self.capacity}')
        if max(prompt_ids) >= self.vocab_size:
            raise IndexError(f'token id {max(prompt_ids)} >= vocabulary size {self.vocab_size}')
        hidden = self._biases[0].shape[1]
        zero = torch.zeros(hidden, device=self.device, dtype=self._biases[0].dtype)
        biases = [layer.self_attn.o_proj(zero) for layer in self._layers]  # the tuned bias + this query's c_l
        donor, start = self._reusable(prompt_ids, biases)
        for bias, keys, values, row_bias in zip(self._biases, self._keys, self._values, biases, strict=True):
            if start and donor != row:  # another row's prompt holds this prefix: copy its keys and values
                keys[row, :, :start] = keys[donor, :, :start]
                values[row, :, :start] = values[donor, :, :start]
            keys[row, :, start:].zero_()  # stale slots stay masked, but must not hold NaN/Inf (0 * NaN)
            values[row, :, start:].zero_()
            bias[row] = row_bias
        self._prompts[row] = None  # until this prefill completes, its slots are not reusable
        input_ids = torch.tensor([list(prompt_ids[start:])], dtype=torch.long, device=self.device)
        positions = torch.arange(start, length, device=self.device).unsqueeze(0)
        logits = self._prefill(row, input_ids, positions, span=length)
        self.lengths[row] = length
        self._prompts[row] = list(prompt_ids)
        self.reused = start
        return logits[0]

    def _reusable(self, prompt_ids: Sequence[int], biases: list[torch.Tensor]) -> tuple[int, int]:
        """(row, slots): the row whose last prompt shares the longest prefix with `prompt_ids`, under the same
        per-query o_proj biases (keys and values after the first layer depend on them), and how many of its leading
        slots hold this prompt's keys and values. Decode steps write after a prompt, so a finished row's prompt
        slots stay valid until the row is admitted again."""
        best = (0, 0)
        if not self.reuse_prefix:
            return best
        for row, previous in enumerate(self._prompts):
            if previous is None:
                continue
            slots = reusable_prefix(previous, prompt_ids)
            if slots > best[1] and all(torch.equal(table[row], bias) for table, bias in zip(self._biases, biases)):
                best = (row, slots)
        return best

    @torch.inference_mode()
    def step(self, rows: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Feed `tokens[i]` to row `rows[i]` (at its next position); returns (len(rows), vocab) logits."""
        for row in rows:
            if self.lengths[row] >= self.capacity:
                raise ConfigError(f'row {row}: the static cache of {self.capacity} positions is full')
        input_ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)  # (n, 1)
        positions = torch.tensor([[self.lengths[r]] for r in rows], device=self.device)  # (n, 1)
        index = torch.tensor(list(rows), device=self.device)
        if self._lean_step is not None:  # the lean step, with each row's own o_proj biases
            logits = self._lean_step(input_ids.view(-1), positions.view(-1), index, list(rows),
                                     [self.lengths[r] + 1 for r in rows], self._keys, self._values,
                                     [table.index_select(0, index) for table in self._biases])
        else:
            hidden = self._base.embed_tokens(input_ids)  # (n, 1, C)
            rotary = self._base.rotary_emb(hidden, positions)
            groups = self._span_groups(rows)
            hidden = run_decoder_layers(self._layers, hidden, lambda layer_index, layer, x: self._decode_attention(
                layer.self_attn, layer_index, x, rotary, index, positions, groups))
            logits = self.model.lm_head(self._base.norm(hidden))[:, -1]
        for row in rows:
            self.lengths[row] += 1
        return logits

    # ---- the model -----------------------------------------------------------------------------------------------
    def _prefill(self, row: int, input_ids: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
        """One row's prompt (1, T) at `positions` (1, T), the last of which is `span` - 1, exactly as the serial
        decoder prefills it (the model holds this row's query) -> the last position's logits (1, vocab)."""
        hidden = self._base.embed_tokens(input_ids)  # (1, T, C)
        rotary = self._base.rotary_emb(hidden, positions)
        mask = None
        if span > input_ids.shape[1]:  # after reused slots: causal over the prefix and itself
            mask = (self._slots[:span].view(1, -1) <= positions.view(-1, 1)).view(1, 1, -1, span)
        hidden = run_decoder_layers(self._layers, hidden, lambda layer_index, layer, x: self._prefill_attention(
            layer.self_attn, layer_index, x, rotary, row, mask, span))
        hidden = self._base.norm(hidden[:, -1:])
        return self.model.lm_head(hidden)[:, -1]

    def _prefill_attention(self, attn: nn.Module, index: int, x: torch.Tensor,
                           rotary: tuple[torch.Tensor, torch.Tensor], row: int, mask: Optional[torch.Tensor],
                           span: int) -> torch.Tensor:
        length = x.shape[1]
        query, key, value = rotated_qkv(attn, x, self.head_dim, rotary)  # (1, nh | nkv, T, hs)
        keys, values = self._keys[index], self._values[index]
        keys[row, :, span - length:span] = key[0]
        values[row, :, span - length:span] = value[0]
        if mask is None:  # causal attention within the prompt, which starts at position 0
            out = F.scaled_dot_product_attention(query, key, value, is_causal=length > 1, scale=attn.scaling,
                                                 enable_gqa=self.gqa)
        else:  # after `span - length` reused slots (`admit`)
            out = F.scaled_dot_product_attention(query, keys[row:row + 1, :, :span], values[row:row + 1, :, :span],
                                                 attn_mask=mask, scale=attn.scaling, enable_gqa=self.gqa)
        return attn.o_proj(out.transpose(1, 2).reshape(1, length, -1))

    def _decode_attention(self, attn: nn.Module, index: int, x: torch.Tensor,
                          rotary: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor, positions: torch.Tensor,
                          groups: list[tuple[Any, Any, int]]) -> torch.Tensor:
        """One token per row, written at the row's own position. Each row attends over its own written slots,
        without a mask, as the serial step does: a masked attention over a longer span sums in another order,
        which in bfloat16 changes answers. Rows of one length share a call (`_span_groups`)."""
        batch = x.shape[0]
        query, key, value = rotated_qkv(attn, x, self.head_dim, rotary)  # (n, nh | nkv, 1, hs)
        keys, values = self._keys[index], self._values[index]
        slots = positions[:, 0]
        keys[rows, :, slots] = key[:, :, 0]
        values[rows, :, slots] = value[:, :, 0]
        out = torch.empty_like(query)
        for members, cache_rows, span in groups:
            out[members] = F.scaled_dot_product_attention(query[members], keys[cache_rows, :, :span],
                                                          values[cache_rows, :, :span], scale=attn.scaling,
                                                          enable_gqa=self.gqa)
        biases = self._biases[index].index_select(0, rows)  # (n, C): each row's own visual vector
        return self._products[index](out.transpose(1, 2).reshape(batch, 1, -1), biases)

    def _span_groups(self, rows: Sequence[int]) -> list[tuple[Any, Any, int]]:
        """The step's rows grouped by attended span (their length + 1): (positions in `rows`, cache rows, span) per
        group, each index a slice where consecutive (a view), else a tensor (a gather). Host bookkeeping only."""
        by_span: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_span.setdefault(self.lengths[row] + 1, []).append(i)
        return [(self._index(members), self._index([rows[i] for i in members]), span)
                for span, members in by_span.items()]

    def _index(self, items: list[int]) -> slice | torch.Tensor:
        if items == list(range(items[0], items[0] + len(items))):
            return slice(items[0], items[0] + len(items))
        return torch.tensor(items, device=self.device)


@dataclass
class BatchRequest:
    """One sequence for `BatchScheduler.join`.

    `prepare` runs just before the prefill, with the model to itself (e.g. setting the query's visual features);
    `on_token` gets each token (never EOS), `on_done` the result once the sequence leaves; `should_stop` is polled
    before every model call that includes this sequence.
    """

    prompt_ids: Sequence[int]
    config: GenerationConfig
    on_done: Callable[[GenerationResult], None]
    on_token: Callable[[TokenEvent], None] = lambda _event: None
    should_stop: Callable[[], bool] = lambda: False
    prepare: Optional[Callable[[], None]] = None
    tag: Any = None


@dataclass
class _Row:
    request: BatchRequest
    row: int
    prompt: list[int]
    budget: int
    generator: Optional[torch.Generator]
    seed: Optional[int]
    eos_id: Optional[int]
    text: IncrementalDecoder
    start: float
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)


class BatchScheduler:
    """`generation._decode`'s loop for up to `decoder.max_batch` sequences at once (one thread drives it)."""

    def __init__(self, decoder: BatchDecoder, tokenizer: TextTokenizer) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self._rows: dict[int, _Row] = {}
        self.steps = 0  # decode forwards run (for tests and benchmarks)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def free(self) -> int:
        return self.decoder.max_batch - len(self._rows)

    def running_requests(self) -> list[BatchRequest]:
        return [state.request for state in self._rows.values()]

    def join(self, request: BatchRequest) -> None:
        """Prefill `request` into a free row and emit its first token (it may also finish right away).

        Raises GenerationError for an unusable prompt and ConfigError when no row is free.
        """
        _check_prompt(request.prompt_ids)
        free = [row for row in range(self.decoder.max_batch) if row not in self._rows]
        if not free:
            raise ConfigError(f'all {self.decoder.max_batch} batch rows are busy')
        start = time.perf_counter()
        config = request.config
        prompt = _fit_prompt(request.prompt_ids, config, self.tokenizer.bos_id)
        budget = min(config.context_length, len(prompt) + config.max_new_tokens) - len(prompt)
        if len(prompt) + budget > self.decoder.capacity:
            raise GenerationError(f'{len(prompt) + budget} tokens exceed the batch cache of '
                                  f'{self.decoder.capacity} positions (generation.context_length)')
        generator, seed = _sampling_generator(config, self.decoder.device)
        state = _Row(request, free[0], prompt, budget, generator, seed,
                     self.tokenizer.eos_id if config.stop_on_eos else None, IncrementalDecoder(self.tokenizer), start)
        if request.should_stop():
            self._finish(state, 'cancelled')
            return
        if request.prepare is not None:
            request.prepare()
        try:
            logits = self.decoder.admit(state.row, prompt)
        except IndexError as exc:
            raise GenerationError(f'token ids outside the model vocabulary in the prompt ({exc})') from exc
        self._rows[state.row] = state
        self._advance(state, select_next_token(logits, config, generator))

    def step(self) -> None:
        """One decode forward over every running row; cancelled rows leave first, finished ones after."""
        for state in list(self._rows.values()):
            if state.request.should_stop():
                self._finish(state, 'cancelled')
        if not self._rows:
            return
        states = sorted(self._rows.values(), key=lambda s: s.row)
        logits = self.decoder.step([s.row for s in states], [s.token_ids[-1] for s in states])
        self.steps += 1
        greedy = [i for i, s in enumerate(states) if s.request.config.greedy]
        tokens: dict[int, int] = {}
        if greedy:  # one host read for all greedy rows
            picked = torch.argmax(logits[greedy], dim=-1).tolist()
            tokens.update(zip(greedy, picked))
        for i, state in enumerate(states):
            token = tokens[i] if i in tokens else select_next_token(logits[i], state.request.config, state.generator)
            self._advance(state, token)

    def abort(self) -> list[BatchRequest]:
        """Drop every running row without a result (after a failed forward); returns their requests."""
        requests = self.running_requests()
        self._rows.clear()
        return requests

    def _advance(self, state: _Row, token: int) -> None:
        """Record one sampled token of `state`, as one iteration of `generation._decode` does."""
        now = time.perf_counter()
        state.token_times.append(now)
        if token == state.eos_id:
            self._finish(state, 'eos')
            return
        index = len(state.token_ids)
        state.token_ids.append(token)
        state.request.on_token(TokenEvent(token_id=token, text=state.text.push(token), index=index,
                                          elapsed_s=now - state.start))
        if len(state.token_ids) >= state.budget:
            self._finish(state, 'max_new_tokens' if state.budget == state.request.config.max_new_tokens
                         else 'context')

    def _finish(self, state: _Row, reason: StopReason) -> None:
        self._rows.pop(state.row, None)
        times = state.token_times
        decode_time = times[-1] - times[0] if len(times) > 1 else 0.0
        state.request.on_done(GenerationResult(
            text=state.text.text, token_ids=state.token_ids, n_tokens=len(state.token_ids),
            n_prompt_tokens=len(state.prompt),
            time_to_first_token_s=times[0] - state.start if times else None,
            tokens_per_s=(len(times) - 1) / decode_time if decode_time > 0 else 0.0,
            stopped_reason=reason, seed=state.seed))
