"""The ImageBind-LLM answering pipeline: llm_node's settings and one question -> streamed answer.

    fresh embeddings --fuse (published weights)--> [visual cache] --> bind network + injection --> generate

`build_answerer(LLMConfig)` checks the serving settings, builds the model with `assembly.build_imagebind_llm`
(the one assembly path) and wraps it with the decoder, prompt builder, visual cache and batch scheduler.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional, Sequence

import torch

from mm_llm_ros.core.answering import Generated
from mm_llm_ros.core.device import describe, resolve_device
from mm_llm_ros.core.embedding_store import StoredInput
from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.llm.assembly import NO_LLM_CONFIGURED, ModelConfig, build_imagebind_llm, inject_faults
from mm_llm_ros.core.llm.choice import ANSWER_MODES, NEUTRAL_QUESTION, answer_candidates, choose_answer
from mm_llm_ros.core.llm.batching import BatchDecoder, BatchRequest, BatchScheduler
from mm_llm_ros.core.llm.decoding import DecoderMode, StaticDecoder, fallback_mode, resolve_decoder_mode
from mm_llm_ros.core.llm.fusion import fuse_embeddings
from mm_llm_ros.core.llm.generation import GenerationConfig, GenerationResult, TokenEvent, generate_stream
from mm_llm_ros.core.llm.model import ImageBindLLM
from mm_llm_ros.core.llm.prompt import PromptBuilder, PromptConfig
from mm_llm_ros.core.llm.tokenizer import TextTokenizer
from mm_llm_ros.core.llm.visual_cache import VisualCache
from mm_llm_ros.core.params import defaults
from mm_llm_ros.core.specs import SENSOR_SPECS, sources_of

logger = logging.getLogger(__name__)

__all__ = ['NO_LLM_CONFIGURED', 'LLMAnswerer', 'LLMConfig', 'ModelConfig', 'build_answerer', 'source_weights']


@dataclass(frozen=True)
class LLMConfig:
    """llm_node's settings: the model it loads (`model`) and how it serves it (the rest). Built from parameters only
    (`from_params`), so every default is the one declared in core/params.py."""
    model: ModelConfig
    decoder: str
    modalities: tuple[str, ...]
    context_kinds: tuple[str, ...]
    context_line: str
    context_format: str
    context_max_chars: int
    max_age_s: float
    max_queue: int
    max_batch: int
    prefix_reuse: bool
    max_question_chars: int
    generation: GenerationConfig
    answer_mode: str             # free | choose_from_context (core/llm/choice.py)
    max_new_tokens_cap: int
    prompt_template: str
    prompt_system: str
    prompt_chat_context_template: str
    fusion_weights: Mapping[str, float]   # by source (sensor)
    cache_index_path: str
    cache_size: int
    cache_temperature: float
    cache_weight: float
    description_rate_hz: float
    description_prompt: str
    description_max_new_tokens: int
    diagnostics_period_s: float
    robots: tuple[str, ...]   # fleet mode: robot namespaces (core/fleet.py); empty: the node's own

    @property
    def context_template(self) -> str:
        """The line template AskEngine applies to each stored context: fact lines already name what they are."""
        return '{text}' if self.context_format == 'facts' else self.context_line

    @property
    def sources(self) -> tuple[str, ...]:
        """The embedding sources (sensors) of the configured modalities, subscribed on mm_llm/embedding/<source>."""
        return tuple(source for modality in self.modalities for source in sources_of(modality))

    @property
    def embedding_dim(self) -> int:
        return self.model.embedding_dim

    @classmethod
    def from_params(cls, params: Optional[Mapping[str, object]] = None) -> LLMConfig:
        """From llm_node's parameter values; names left out take their declared defaults."""
        p = {**defaults('llm_node'), **(params or {})}
        generation = GenerationConfig(max_new_tokens=int(p['generation.max_new_tokens']),
                                      temperature=float(p['generation.temperature']),
                                      top_p=float(p['generation.top_p']), seed=int(p['llm.seed']),
                                      context_length=int(p['generation.context_length']))
        return cls(model=ModelConfig.from_params(p), decoder=p['generation.decoder'],
                   modalities=tuple(p['modalities']),
                   context_kinds=tuple(p['context.kinds']), context_line=p['context.line_template'],
                   context_format=p['context.format'],
                   context_max_chars=int(p['context.max_chars']),
                   max_age_s=float(p['max_age_s']), max_queue=int(p['max_queue']),
                   max_batch=int(p['generation.max_batch']), prefix_reuse=bool(p['generation.prefix_reuse']),
                   max_question_chars=int(p['max_question_chars']), generation=generation,
                   answer_mode=p['generation.answer_mode'],
                   max_new_tokens_cap=int(p['generation.max_new_tokens_cap']),
                   prompt_template=p['prompt.template'], prompt_system=p['prompt.system'],
                   prompt_chat_context_template=p['prompt.chat_context_template'],
                   fusion_weights=source_weights(p),
                   cache_index_path=p['cache.index_path'], cache_size=int(p['cache.size']),
                   cache_temperature=float(p['cache.temperature']), cache_weight=float(p['cache.weight']),
                   description_rate_hz=float(p['description.rate_hz']), description_prompt=p['description.prompt'],
                   description_max_new_tokens=int(p['description.max_new_tokens']),
                   diagnostics_period_s=float(p['diagnostics_period_s']), robots=tuple(p['robots']))


def source_weights(p: Mapping[str, object]) -> dict[str, float]:
    """The fusion weight of every source: `fusion.source_weights.<source>`, or when negative its modality's
    `fusion.weights.<modality>`."""
    weights = {}
    for sensor in SENSOR_SPECS:
        own = float(p[f'fusion.source_weights.{sensor.name}'])
        weights[sensor.name] = own if own >= 0 else float(p[f'fusion.weights.{sensor.modality}'])
    return weights


class LLMAnswerer:
    """Answers questions for `AskEngine`: one at a time with `answer` (the model holds per-query visual state), or,
    with a `BatchScheduler`, up to `max_batch` together through `begin` + `step` (one thread drives those)."""

    def __init__(self, model: ImageBindLLM, tokenizer: TextTokenizer, prompt: PromptBuilder,
                 generation: GenerationConfig, fusion_weights: Mapping[str, float],
                 visual_cache: Optional[VisualCache] = None, name: str = '',
                 decoder: Optional[StaticDecoder] = None, batch: Optional[BatchScheduler] = None,
                 answer_mode: str = 'free'):
        if answer_mode not in ANSWER_MODES:
            raise ConfigError(f'generation.answer_mode must be one of {ANSWER_MODES}, got {answer_mode!r}')
        self.answer_mode = answer_mode
        self.model = model
        self.decoder = decoder
        self.batch = batch
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.generation = generation
        self.fusion_weights = dict(fusion_weights)
        self.visual_cache = visual_cache
        self.device_description = describe(model.device, model.dtype)
        self.description = f'{name} on {self.device_description}'
        if decoder is not None:
            self.description += f', {decoder.mode} decoder'
        if batch is not None:
            self.description += f', batches of up to {batch.decoder.max_batch}'
        if answer_mode != 'free':
            self.description += f', answers {answer_mode.replace("_", " ")}'
        self.sensors_inform_answers = any(bool(p.detach().abs().max() > 0)
                                          for n, p in model.named_parameters() if n.endswith('gate'))
        self._lock = threading.Lock()

    def visual_features(self, embeddings: Sequence[StoredInput]) -> Optional[torch.Tensor]:
        """The published fusion of the given embeddings, refined by the visual cache when configured."""
        if not embeddings:
            return None
        features = fuse_embeddings({e.modality: e.value for e in embeddings}, self.fusion_weights)  # keyed by source
        if self.visual_cache is not None:
            features = self.visual_cache(features)
        return features

    def answer(self, question: str, embeddings: Sequence[StoredInput], max_new_tokens: int,
               on_text: Callable[[str], None], should_stop: Callable[[], bool],
               context: Optional[str] = None, choose: bool = False) -> Generated:
        """Generate the answer, or with `choose` (AskEngine: `answer_mode` choose_from_context, a user's question
        with perception context) choose it among the context's lines and "cannot tell" by the model's likelihood;
        the chosen answer is streamed as one piece."""
        config = replace(self.generation, max_new_tokens=max_new_tokens)
        if choose and not context:
            raise ValueError('choosing an answer from the context needs a context')
        with self._lock:
            features = self.visual_features(embeddings)
            self.model.set_visual_features(None if features is None else features.to(self.model.device))
            prompt_ids = self.prompt.encode(self.tokenizer, question, context)
            if choose:
                neutral_ids = self.prompt.encode(self.tokenizer, NEUTRAL_QUESTION, context)
                return self._choose(prompt_ids, neutral_ids, answer_candidates(context), on_text, should_stop)
            # The patched backbone is the model; calling it directly saves the wrapper's Python call per token.
            stream = generate_stream(self.model.backbone, self.tokenizer, prompt_ids, config, should_stop,
                                     self.decoder)
            for event in stream:
                if event.text:
                    on_text(event.text)
            result = stream.result
        return _generated(result)

    def _choose(self, prompt_ids: Sequence[int], neutral_ids: Sequence[int], candidates: Sequence[str],
                on_text: Callable[[str], None], should_stop: Callable[[], bool]) -> Generated:
        choice = choose_answer(self.model.backbone, self.tokenizer, prompt_ids, candidates, neutral_ids, should_stop)
        if choice is None:
            return Generated('', 0, math.nan, math.nan, 'cancelled')
        logger.debug('chose %r among %d candidates (%.2f s): %s', choice.text, len(candidates), choice.elapsed_s,
                     ', '.join(f'{s:.2f}' for s in choice.scores))
        on_text(choice.text)
        n_tokens = len(self.tokenizer.encode(choice.text, bos=False))
        return Generated(choice.text, n_tokens, choice.elapsed_s, n_tokens / max(choice.elapsed_s, 1e-9), 'chosen')

    # ---- continuous batching (AskEngine's batched worker) ----------------------------------------------------------
    @property
    def max_batch(self) -> int:
        return 1 if self.batch is None else self.batch.decoder.max_batch

    @property
    def free_rows(self) -> int:
        return 0 if self.batch is None else self.batch.free

    @property
    def running(self) -> int:
        return 0 if self.batch is None else self.batch.running

    def begin(self, question: str, embeddings: Sequence[StoredInput], max_new_tokens: int,
              on_text: Callable[[str], None], should_stop: Callable[[], bool], on_done: Callable[[Generated], None],
              context: Optional[str] = None, tag: object = None) -> None:
        """Prefill this question into a free batch row (its first token is streamed now); `step()` continues it and
        `on_done` gets its answer when it leaves. Raises on an unusable prompt or when no row is free."""
        config = replace(self.generation, max_new_tokens=max_new_tokens)
        features = self.visual_features(embeddings)
        prompt_ids = self.prompt.encode(self.tokenizer, question, context)

        def prepare() -> None:  # the row's o_proj biases are read from the model right after this
            self.model.set_visual_features(None if features is None else features.to(self.model.device))

        def on_token(event: TokenEvent) -> None:
            if event.text:
                on_text(event.text)
        with self._lock:
            self.batch.join(BatchRequest(prompt_ids, config, on_done=lambda r: on_done(_generated(r)),
                                         on_token=on_token, should_stop=should_stop, prepare=prepare, tag=tag))

    def step(self) -> None:
        """One decode forward over every running question."""
        with self._lock:
            self.batch.step()

    def abort(self) -> list[object]:
        """Drop every running question without an answer (after a failed step); returns their tags."""
        with self._lock:
            return [request.tag for request in self.batch.abort()]


def _generated(result: GenerationResult) -> Generated:
    ttft = result.time_to_first_token_s
    return Generated(result.text, result.n_tokens, math.nan if ttft is None else ttft, result.tokens_per_s,
                     result.stopped_reason)


def build_answerer(config: LLMConfig) -> LLMAnswerer:
    """Load the configured model once. Raises a `core.errors.StartupError` subclass with a clear message on any
    problem; the serving settings are checked before any weight is loaded."""
    decoder_mode = resolve_decoder_mode(config.decoder, resolve_device(config.model.device))
    if config.max_batch < 1 or config.max_queue < config.max_batch:
        raise ConfigError(f'generation.max_batch must be >= 1 and <= max_queue ({config.max_queue}), got '
                          f'{config.max_batch}: the queue counts waiting + decoding questions')
    assembled = build_imagebind_llm(config.model)
    model, tokenizer = assembled.model, assembled.tokenizer
    decoder = _static_decoder(model, decoder_mode, config.generation.context_length,
                              fallback_mode(config.decoder, decoder_mode), config.prefix_reuse)
    if config.model.preset == 'tiny':  # armed after the warm-up
        inject_faults(model)
    cache = None
    if config.cache_index_path:
        cache = VisualCache.from_index_file(config.cache_index_path, config.cache_size, config.cache_temperature,
                                           config.cache_weight)
    prompt = prompt_builder(config, tokenizer)
    batch = None
    if config.max_batch > 1:
        batch = BatchScheduler(BatchDecoder(model.backbone, config.max_batch, config.generation.context_length,
                                            reuse_prefix=config.prefix_reuse), tokenizer)
        logger.info('continuous batching: up to %d answers per decode step', config.max_batch)
    return LLMAnswerer(model, tokenizer, prompt, config.generation, config.fusion_weights, cache, assembled.name,
                       decoder, batch, config.answer_mode)


def prompt_builder(config: LLMConfig, tokenizer: TextTokenizer) -> PromptBuilder:
    """The node's prompt (template, system message, context bound), as answers and adapter tuning build it."""
    return PromptBuilder(PromptConfig(template=config.prompt_template, max_context_chars=config.context_max_chars,
                                      system_prompt=config.prompt_system or None,
                                      chat_user_template_with_context=config.prompt_chat_context_template),
                         chat_tokenizer=tokenizer if config.prompt_template == 'chat' else None)


def _static_decoder(model: ImageBindLLM, mode: DecoderMode, capacity: int,
                    fallback: Optional[DecoderMode] = None, reuse_prefix: bool = True) -> Optional[StaticDecoder]:
    """The `generation.decoder` stepper for the merged model (None: eager), its KV cache sized to the context and
    warmed up (graph captured, step compiled). If that fails, `fallback` is used, else a `ConfigError` names why."""
    if mode == 'eager':
        return None
    decoder = StaticDecoder(model.backbone, capacity=capacity, mode=mode, reuse_prefix=reuse_prefix)
    try:
        decoder.warm_up()
    except Exception as exc:  # torch.compile can fail in many ways (no Triton, no C compiler, an unsupported op)
        reason = f'{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ""}'
        if fallback is None:
            raise ConfigError(f"generation.decoder '{mode}' cannot start: {reason}") from exc
        logger.warning("generation.decoder auto: '%s' cannot start (%s); decoding with '%s'", mode, reason, fallback)
        return _static_decoder(model, fallback, capacity, reuse_prefix=reuse_prefix)
    logger.info("generation.decoder '%s': static KV cache of %d positions, warmed up", mode, capacity)
    return decoder
