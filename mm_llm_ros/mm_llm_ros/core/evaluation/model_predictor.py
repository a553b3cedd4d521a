"""The nodes' model stack as a benchmark predictor, built from a ROS 2 parameter file, no ROS needed.

    image --preprocess_vision--> ImageBind (encoder node) --vision embedding--> ImageBind-LLM (llm_node) --> answer
      `--OCR (grounding_node, optional)--> "Text read by the camera: 'STOP' (0.98, center)" as context --'

    config = ModelPredictorConfig.from_params_file('config/demo.yaml', context=('ocr',))
    predictor = ModelPredictor(config)   # cheap: nothing is loaded yet
    predictor.predict(item)              # the first item loads the models (or reuses loaded ones)

Models are shared per process and keyed by their configuration, so two predictors of the same parameter file, one
with and one without OCR context, load ImageBind and the LLM once.

Prompting follows the usual protocol for instruction-tuned models: greedy decoding, an answer-format line after the
question (see `instruction`) and a short answer budget: the authors' MME script allows 30 tokens; a letter needs
a few, and longer answers only risk naming a second option (which MMBench's rules score as unmatched).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from mm_llm_ros.core.answering import AskEngine, AskLimits, AskRequest, context_block, validate_question
from mm_llm_ros.core.embedding_store import ModalityStore, StoredInput
from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.grounding import OcrConfig, OcrExtractor, config_from_params
from mm_llm_ros.core.grounding.facts import prompt_text
from mm_llm_ros.core.imagebind.model import ImageBindConfig, get_shared_encoder
from mm_llm_ros.core.llm.adapters import adapter_path
from mm_llm_ros.core.llm.assembly import NO_LLM_CONFIGURED, ModelConfig
from mm_llm_ros.core.llm.pipeline import LLMAnswerer, LLMConfig, build_answerer
from mm_llm_ros.core.params import node_params, read_params_file
from mm_llm_ros.core.sensor_decoding import DecodedImage
from mm_llm_ros.core.sensor_inputs import InputContext
from mm_llm_ros.core.specs import CONTEXT_KIND_SPECS, resolve, sensor_for_replay_kind, sources_of

from .datasets import EvalItem
from .runner import PredictionError

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 30
MAX_NEW_TOKENS_MULTIPLE_CHOICE = 10
# Answer-format lines of LLaVA-1.5's evaluation prompts, which VLMEvalKit also uses for MMBench.
MULTIPLE_CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_SUFFIX = 'Answer the question using a single word or phrase.'
# Benchmark images stand for this sensor's frames (core/specs.py: the sensor sensor_replay publishes images on).
IMAGE_SENSOR = sensor_for_replay_kind('image')
# Benchmarks hold images only, so only the grounding context read from that sensor can be computed for them.
IMAGE_CONTEXT_KINDS = tuple(k.name for k in CONTEXT_KIND_SPECS if k.sensor == IMAGE_SENSOR.name)
# Where the encoder parameters are read from: the shared encoder node, else the one of the image sensor.
ENCODER_NODES = ('encoder', f'{IMAGE_SENSOR.launch_switch}_encoder')

T = TypeVar('T')


def instruction(item: EvalItem) -> str:
    """The question as the model is asked it: options listed as `A. text` lines for multiple choice.

    MME questions already end with "Please answer yes or no."; the short-answer line keeps the answers to the
    single word the official parsers expect.
    """
    lines = [item.hint] if item.hint else []
    lines.append(item.question)
    if item.options:
        lines += [f'{letter}. {text}' for letter, text in item.options.items()]
        lines.append(MULTIPLE_CHOICE_SUFFIX)
    else:
        lines.append(SHORT_ANSWER_SUFFIX)
    return '\n'.join(lines)


@dataclass(frozen=True)
class ModelPredictorConfig:
    """The encoder, the LLM and the perception context of one evaluated configuration.

    `context` lists the grounding results added to the prompt ('ocr': the grounding node's OCR of the image,
    configured by `ocr` and cut to `context_text_max_chars` like its published text). Decoding is always greedy;
    answers get at most `max_new_tokens` tokens (`max_new_tokens_multiple_choice` for multiple choice).
    """

    imagebind: ImageBindConfig
    llm: LLMConfig
    context: tuple[str, ...] = ()
    ocr: OcrConfig = field(default_factory=OcrConfig)
    context_text_max_chars: int = 200
    max_new_tokens: int = MAX_NEW_TOKENS
    max_new_tokens_multiple_choice: int = MAX_NEW_TOKENS_MULTIPLE_CHOICE

    def __post_init__(self) -> None:
        unsupported = [kind for kind in self.context if kind not in IMAGE_CONTEXT_KINDS]
        if unsupported:
            raise ConfigError(f"context {', '.join(unsupported)} cannot be computed from benchmark images; "
                                   f"supported: {', '.join(IMAGE_CONTEXT_KINDS)}")
        ignored = [kind for kind in self.context if kind not in self.llm.context_kinds]
        if ignored:
            raise ConfigError(f"llm_node context.kinds lack {', '.join(ignored)}: the node would not use "
                                   'that context')
        if IMAGE_SENSOR.modality not in self.llm.modalities:
            raise ConfigError(f"llm_node modalities lack '{IMAGE_SENSOR.modality}': the model would never see "
                                   'the images')
        out_dim = self.imagebind.model_kwargs()['out_embed_dim']
        if out_dim != self.llm.embedding_dim:
            raise ConfigError(f'ImageBind embeds into {out_dim} dimensions but llm_node embedding_dim is '
                                   f'{self.llm.embedding_dim}')
        if min(self.max_new_tokens, self.max_new_tokens_multiple_choice) < 1:
            raise ConfigError('answer budgets (max_new_tokens) must be at least 1 token')

    @classmethod
    def from_params_file(cls, path: str | Path, context: Sequence[str] = ()) -> ModelPredictorConfig:
        """Read the `encoder` (or `camera_encoder`), `llm_node` and `grounding_node` sections, as the nodes would.

        Raises `ConfigError` (or `core.params.ParamsFileError`) when the file cannot give a runnable stack;
        missing weight files are reported here rather than after the first configuration has run.
        """
        sections = read_params_file(path)
        encoder_node = next((node for node in ENCODER_NODES if node in sections), None)
        if encoder_node is None:
            raise ConfigError(f'{path} has no {" or ".join(ENCODER_NODES)} section (the ImageBind settings)')
        if 'llm_node' not in sections:
            raise ConfigError(f'{path} has no llm_node section (the LLM settings)')
        imagebind = ImageBindConfig.from_params(node_params(sections, encoder_node))
        llm = LLMConfig.from_params(node_params(sections, 'llm_node'))
        grounding = node_params(sections, 'grounding_node')
        _check_weights(imagebind, llm.model)
        ocr = config_from_params(OcrConfig, grounding, IMAGE_CONTEXT_KINDS[0])
        return cls(imagebind=imagebind, llm=replace(llm, generation=replace(llm.generation, temperature=0.0)),
                   context=tuple(context), ocr=ocr, context_text_max_chars=grounding['text_max_chars'])

    @property
    def description(self) -> str:
        """One line for reports: which weights, which LLM, which context."""
        weights = self.imagebind.checkpoint or 'random weights'
        llm = self.llm.model.preset or self.llm.model.backbone_path
        adapter = self.llm.model.adapter_checkpoint or 'no adapter checkpoint'
        context = ', '.join(self.context) or 'none'
        return f'imagebind {self.imagebind.preset} ({weights}) + llm {llm} ({adapter}), context: {context}'


def _check_weights(imagebind: ImageBindConfig, llm: ModelConfig) -> None:
    if not imagebind.checkpoint and not imagebind.allow_random_weights:
        raise ConfigError('no ImageBind checkpoint: set model.checkpoint (imagebind_huge.pth) or '
                               'model.allow_random_weights')
    if not llm.preset and not llm.backbone_path:
        raise ConfigError(NO_LLM_CONFIGURED)
    for what, value in (('model.checkpoint', imagebind.checkpoint), ('llm.backbone_path', llm.backbone_path),
                        ('llm.adapter_checkpoint', adapter_path(llm.adapter_checkpoint))):
        if value and not Path(value).expanduser().exists():
            raise ConfigError(f'{what} not found: {value}')


class _SharedModels:
    """Process-wide models keyed by their configuration, each built once, on first use."""

    def __init__(self) -> None:
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: str, build: Callable[[], T]) -> T:
        with self._lock:  # held while building, so two callers never load the same model twice
            if key not in self._models:
                self._models[key] = build()
            return self._models[key]

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


_answerers = _SharedModels()
_ocr_extractors = _SharedModels()


def release_shared_models() -> None:
    """Forget the shared LLMs and OCR engines (the shared encoders: `imagebind.model.release_shared_encoders`)."""
    _answerers.clear()
    _ocr_extractors.clear()


def _key(config: Any) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)


class ModelPredictor:
    """Answers a benchmark item as llm_node answers /ask: a fresh vision embedding of the item's image, optional
    perception context, the node's prompt template, greedy decoding."""

    def __init__(self, config: ModelPredictorConfig) -> None:
        self.config = config

    @property
    def description(self) -> str:
        return self.config.description

    def predict(self, item: EvalItem) -> str:
        if 'context' in item.metadata:
            return self._ask_with_context(item)
        question = instruction(item)
        refused = validate_question(question, self.config.llm.max_question_chars)
        if refused is not None:
            raise PredictionError(f'item {item.id}: {refused}')
        image = np.asarray(item.load_image())
        budget = self.config.max_new_tokens_multiple_choice if item.options else self.config.max_new_tokens
        generated = self._answerer().answer(question, [self._embed(image)], budget, on_text=lambda text: None,
                                            should_stop=lambda: False, context=self._context(image))
        logger.debug('%s -> %r (%s)', item.id, generated.text, generated.stopped_reason)
        return generated.text.strip()  # as llm_node's answers

    def _ask_with_context(self, item: EvalItem) -> str:
        """A grounded-benchmark item (`metadata['context']`: the [kind, text, json] of each PerceptionContext the
        node received) answered exactly as llm_node answers /ask: the messages go into a store as the node's
        context callback puts them there, and `AskEngine` builds the prompt (the live context formatter, the
        node's template) and answers with the node's answer budget. Only the kinds in `context.kinds` are used,
        as the node subscribes to no others; no sensor embeddings are given (a scene has context only)."""
        llm = self.config.llm
        contexts = ModalityStore()   # llm_node's perception-context store, by kind
        for kind, text, json_text in item.metadata['context']:
            if kind in llm.context_kinds:
                contexts.update(kind, prompt_text(kind, text, json_text, llm.context_format, llm.context_max_chars),
                                stamp_ns=0)
        engine = AskEngine(self._answerer(), ModalityStore(), AskLimits(
            known_modalities=llm.sources + tuple(llm.context_kinds),
            groups={m: sources_of(m) for m in llm.modalities}, max_queue=1,
            max_question_chars=llm.max_question_chars, default_max_age_s=llm.max_age_s,
            default_max_new_tokens=llm.generation.max_new_tokens, max_new_tokens_cap=llm.max_new_tokens_cap),
            line_template=llm.context_template, contexts=contexts)
        engine.start()
        try:
            result = engine.submit(AskRequest(item.question)).wait()
        finally:
            engine.stop()
        if not result.success:
            raise PredictionError(f'item {item.id}: {result.error}')
        logger.debug('%s -> %r (%.2f s)', item.id, result.answer, result.latency_s)
        return result.answer

    def _answerer(self) -> LLMAnswerer:
        return _answerers.get(_key(self.config.llm), lambda: build_answerer(self.config.llm))

    def _embed(self, image: np.ndarray) -> StoredInput:
        encoder = get_shared_encoder(self.config.imagebind)
        modality = IMAGE_SENSOR.modality
        tensor = resolve(IMAGE_SENSOR.preprocess)(DecodedImage('rgb8', rgb=image), InputContext({}))
        vector = encoder.encode({modality: tensor[None]})[modality][0]
        return StoredInput(IMAGE_SENSOR.name, vector, stamp_ns=0, received_monotonic=0.0, model=encoder.model_name,
                           source_topic='')

    def _context(self, image: np.ndarray) -> str | None:
        """The context block llm_node would build from the grounding node's results for this image."""
        if not self.config.context:   # only the OCR of the image can be asked for (IMAGE_CONTEXT_KINDS)
            return None
        ocr = _ocr_extractors.get(_key(self.config.ocr), lambda: OcrExtractor(self.config.ocr))
        result = ocr(image)
        kind, llm = IMAGE_CONTEXT_KINDS[0], self.config.llm
        # As grounding_node publishes the result (text and JSON) and llm_node's context callback stores it.
        text = prompt_text(kind, result.to_text(self.config.context_text_max_chars), json.dumps(result.to_dict()),
                           llm.context_format, llm.context_max_chars)
        return context_block(llm.context_template, [(kind, text)])
