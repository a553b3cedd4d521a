"""Autoregressive decoding with a KV cache, token streaming and cancellation (batch size 1).

Semantics follow the official ImageBind-LLM `generate` (OpenGVLab/LLaMA-Adapter, `imagebind_LLM/llama`):

- temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) is sampled with nucleus (top-p)
  filtering, exactly as its `sample_top_p`: sorted by probability, a token is dropped when the probability mass
  *before* it already exceeds top_p, the rest is renormalised.
- at most `total_len = min(context_length, prompt_len + max_new_tokens)` positions; generation stops at EOS, which
  is not part of the returned tokens or text.

Beyond the official loop:

- the prompt is run once (prefill) and each further step feeds only the newest token, reusing the KV cache;
- a prompt that fits the context is used whole, as in the official code (the answer gets the room left). One that
  leaves no room at all (>= `context_length` tokens; the official code fails on it) is cut to its most recent
  tokens, keeping a leading BOS, so that `min(max_new_tokens, context_length // 2)` tokens can follow, and a
  warning is logged. The end of a prompt (the question and the "Response:" cue) matters more than its beginning,
  but cutting is a last resort: `prompt.PromptBuilder` bounds the variable part of prompts;
- sampling uses a per-call `torch.Generator`, so a seed gives the same tokens whatever other threads do;
- text is streamed per token: the generated ids are decoded as a whole and the new suffix is emitted, holding back
  a trailing U+FFFD (an incomplete multi-byte UTF-8 character) until its remaining bytes arrive. An incomplete
  character left at the end is dropped, so the streamed pieces always concatenate to the final text;
- `should_stop` is polled before every model call, so a cancellation costs at most the step already running;
- the model calls go through a stepper (`decoding.py`): the transformers forward with its dynamic cache by default,
  or a `StaticDecoder` (static KV cache, decode step replayed as a CUDA graph) passed as `decoder`; the loop, the
  sampling and the token events are the same for both, with one host synchronisation per token (the sampled id).

The model is a transformers causal LM, or anything called the same way (`model.ImageBindLLM` passes its keyword
arguments through): `model(input_ids=..., <kv cache>=..., use_cache=True, logits_to_keep=1)` returning `.logits`
(1, T, vocab) and the updated cache. transformers renamed the cache argument and output field from
`past_key_values` to `cache` during 5.x; both spellings are supported. Visual features are set on the model
beforehand; generation does not know about them.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from .decoding import EagerStepper, StaticDecoder

if TYPE_CHECKING:
    from .tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

StopReason = Literal['eos', 'max_new_tokens', 'context', 'cancelled']
_INCOMPLETE_CHARACTER = '\ufffd'


class GenerationError(ValueError):
    """Invalid generation settings or an unusable prompt."""


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; the defaults are the official ImageBind-LLM demo settings.

    Attributes:
        max_new_tokens: generated tokens at most (official max_gen_len).
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus sampling mass (ignored when greedy).
        seed: seed of the per-call sampling generator; None draws a fresh one (reported in the result).
        context_length: prompt plus generated tokens at most (official max_seq_len).
        stop_on_eos: stop when the tokenizer's EOS is generated (benchmarks turn it off for fixed lengths).
    """

    max_new_tokens: int = 256
    temperature: float = 0.1
    top_p: float = 0.75
    seed: int | None = None
    context_length: int = 512
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f'max_new_tokens must be >= 1, got {self.max_new_tokens}')
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationError(f'temperature must be a finite number >= 0, got {self.temperature}')
        if not 0 < self.top_p <= 1:
            raise GenerationError(f'top_p must be in (0, 1], got {self.top_p}')
        if self.context_length < 2:
            raise GenerationError(f'context_length must be >= 2, got {self.context_length}')

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (never EOS) and the text it completes ('' while a character is incomplete)."""

    token_id: int
    text: str
    index: int
    elapsed_s: float


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one generation.

    `tokens_per_s` is the decode speed after the first token, (tokens - 1) / (last - first token time), counting an
    EOS that ended the answer as a token; 0.0 when fewer than two tokens were produced. `time_to_first_token_s`
    covers prompt truncation, prefill and the first sampling step (None when nothing was produced).
    """

    text: str
    token_ids: list[int]
    n_tokens: int
    n_prompt_tokens: int
    time_to_first_token_s: float | None
    tokens_per_s: float
    stopped_reason: StopReason
    seed: int | None


def top_p_filter(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nucleus filtering of (..., vocab) probabilities: (renormalised sorted probabilities, their token ids).

    A token is kept when the mass of the more probable tokens before it is at most `top_p`, so the kept set is the
    smallest prefix whose mass reaches top_p (ties broken by sort order).
    """
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > top_p, 0.0)
    return sorted_probs / sorted_probs.sum(dim=-1, keepdim=True), sorted_ids


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token id per row of (batch, vocab) probabilities with nucleus filtering; returns (batch, 1)."""
    kept_probs, sorted_ids = top_p_filter(probs, top_p)
    choice = torch.multinomial(kept_probs, num_samples=1, generator=generator)
    return torch.gather(sorted_ids, -1, choice)


def select_next_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    """The next token for (vocab,) logits: argmax when greedy, else temperature + top-p sampling."""
    if config.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    return int(sample_top_p(probs.unsqueeze(0), config.top_p, generator))


def truncate_prompt(prompt_ids: Sequence[int], max_tokens: int, bos_id: int | None) -> list[int]:
    """Keep the most recent `max_tokens` prompt tokens; a leading BOS stays in front (it anchors LLaMA prompts)."""
    prompt = list(prompt_ids)
    if len(prompt) <= max_tokens:
        return prompt
    keep_bos = bos_id is not None and prompt[0] == bos_id and max_tokens > 1
    head = prompt[:1] if keep_bos else []
    tail = prompt[len(prompt) - (max_tokens - len(head)):]
    logger.warning('prompt of %d tokens cut to its last %d tokens to fit context_length', len(prompt), max_tokens)
    return head + tail


class IncrementalDecoder:
    """Turns a growing token sequence into text pieces that never split a multi-byte character."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self.text = ''  # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one token and return the newly completed text (possibly '')."""
        self._ids.append(token_id)
        decoded = self._tokenizer.decode(self._ids)
        if decoded.endswith(_INCOMPLETE_CHARACTER):
            return ''
        if not decoded.startswith(self.text):
            # Some tokenizers rewrite earlier text once more tokens arrive; what was streamed cannot be taken back.
            logger.debug('decoded text is not an extension of the streamed text: %r vs %r', decoded, self.text)
        piece = decoded[len(self.text):]
        self.text += piece
        return piece


class GenerationStream(Iterator[TokenEvent]):
    """Iterates over `TokenEvent`s; once exhausted, `result` holds the `GenerationResult`.

    Breaking out of the loop (or `close()`) abandons the generation without a result; use `should_stop` to end it
    early with one.
    """

    def __init__(self, events: Generator[TokenEvent, None, GenerationResult]) -> None:
        self._events = events
        self.result: GenerationResult | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> TokenEvent:
        try:
            return next(self._events)
        except StopIteration as stop:
            if self.result is None:
                self.result = stop.value
            raise

    def close(self) -> None:
        self._events.close()


def _check_prompt(prompt_ids: Sequence[int]) -> None:
    if len(prompt_ids) == 0:
        raise GenerationError('the prompt has no tokens')
    if min(prompt_ids) < 0:
        raise GenerationError(f'prompt token ids must be >= 0, got {min(prompt_ids)}')


def _fit_prompt(prompt_ids: Sequence[int], config: GenerationConfig, bos_id: int | None) -> list[int]:
    """The prompt unchanged if it fits the context, else its most recent tokens with room left for the answer."""
    if len(prompt_ids) < config.context_length:
        return list(prompt_ids)
    answer_room = min(config.max_new_tokens, config.context_length // 2)
    return truncate_prompt(prompt_ids, config.context_length - answer_room, bos_id)


def _sampling_generator(config: GenerationConfig, device: torch.device) -> tuple[torch.Generator | None, int | None]:
    """A private generator for this call (None when greedy) and its seed: fresh from the OS when none is set."""
    if config.greedy:
        return None, config.seed
    generator = torch.Generator(device=device)
    seed = generator.seed() if config.seed is None else config.seed
    generator.manual_seed(seed)
    return generator, seed


def _stepper(model: Any, decoder: StaticDecoder | None, total_length: int) -> EagerStepper | StaticDecoder:
    """The given static decoder when the sequence fits its cache, else the eager path (logged: it is slower)."""
    if decoder is None:
        return EagerStepper(model)
    if total_length > decoder.capacity:
        logger.warning('%d tokens exceed the static cache (%d positions): decoding eagerly', total_length,
                       decoder.capacity)
        return EagerStepper(model)
    return decoder


@torch.inference_mode()
def _decode(model: Any, tokenizer: TextTokenizer, prompt_ids: Sequence[int], config: GenerationConfig,
            should_stop: Callable[[], bool] | None,
            decoder: StaticDecoder | None) -> Generator[TokenEvent, None, GenerationResult]:
    start = time.perf_counter()
    prompt = _fit_prompt(prompt_ids, config, tokenizer.bos_id)
    budget = min(config.context_length, len(prompt) + config.max_new_tokens) - len(prompt)
    stepper = _stepper(model, decoder, len(prompt) + budget)
    generator, seed = _sampling_generator(config, stepper.device)
    eos_id = tokenizer.eos_id if config.stop_on_eos else None
    text = IncrementalDecoder(tokenizer)

    token_ids: list[int] = []
    token_times: list[float] = []
    stopped: StopReason | None = None
    for index in range(budget):
        if should_stop is not None and should_stop():
            stopped = 'cancelled'
            break
        try:
            logits = stepper.prefill(prompt) if index == 0 else stepper.step(token_ids[-1])
        except IndexError as exc:  # an id outside the embedding table
            raise GenerationError(f'token ids outside the model vocabulary in the prompt ({exc})') from exc
        token = select_next_token(logits, config, generator)  # the one host synchronisation per token
        token_times.append(time.perf_counter())
        if token == eos_id:
            stopped = 'eos'
            break
        token_ids.append(token)
        yield TokenEvent(token_id=token, text=text.push(token), index=index, elapsed_s=token_times[-1] - start)
    if stopped is None:
        stopped = 'max_new_tokens' if budget == config.max_new_tokens else 'context'

    decode_time = token_times[-1] - token_times[0] if len(token_times) > 1 else 0.0
    return GenerationResult(
        text=text.text,
        token_ids=token_ids,
        n_tokens=len(token_ids),
        n_prompt_tokens=len(prompt),
        time_to_first_token_s=token_times[0] - start if token_times else None,
        tokens_per_s=(len(token_times) - 1) / decode_time if decode_time > 0 else 0.0,
        stopped_reason=stopped,
        seed=seed,
    )


def generate_stream(model: Any, tokenizer: TextTokenizer, prompt_ids: Sequence[int],
                    config: GenerationConfig | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    decoder: StaticDecoder | None = None) -> GenerationStream:
    """Generate from `prompt_ids`, yielding one `TokenEvent` per token; the stream's `result` is set at the end.

    Args:
        model: a causal LM called as `model(input_ids=, past_key_values=, use_cache=True)` (see module docstring).
        tokenizer: provides `decode`, `bos_id` and `eos_id`.
        prompt_ids: the encoded prompt (e.g. `PromptBuilder.encode`).
        config: decoding settings (defaults: the official ones).
        should_stop: polled before each model call; returning True ends the stream with reason 'cancelled'.
        decoder: a `StaticDecoder` over `model` (static KV cache, CUDA graph); None decodes eagerly. A sequence
            longer than its cache is decoded eagerly.
    """
    config = config or GenerationConfig()
    _check_prompt(prompt_ids)
    return GenerationStream(_decode(model, tokenizer, prompt_ids, config, should_stop, decoder))


def generate(model: Any, tokenizer: TextTokenizer, prompt_ids: Sequence[int], config: GenerationConfig | None = None,
             should_stop: Callable[[], bool] | None = None,
             decoder: StaticDecoder | None = None) -> GenerationResult:
    """Generate the whole answer at once; same arguments as `generate_stream`."""
    stream = generate_stream(model, tokenizer, prompt_ids, config, should_stop, decoder)
    for _ in stream:
        pass
    assert stream.result is not None  # an exhausted stream always has its result
    return stream.result
