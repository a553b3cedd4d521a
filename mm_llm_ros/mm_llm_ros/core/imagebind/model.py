"""ImageBind encoder: the official architecture behind a typed config, safe checkpoint loading and one shared,
thread-safe instance per process.

Inputs are already preprocessed and batched (see `preprocess.py`); outputs are float32 numpy embeddings exactly as
the official model returns them (not unit norm: audio and depth carry the model's fixed logit scales).
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mm_llm_ros.core.device import describe, resolve_device, resolve_dtype
from mm_llm_ros.core.errors import CheckpointError, ConfigError
from mm_llm_ros.core.imagebind import official
from mm_llm_ros.core.imagebind.inference import GraphedForward, prepare_for_inference
from mm_llm_ros.core.weights import listing, load_weights, tensor_state_dict

logger = logging.getLogger(__name__)

# Keyword arguments of the official `imagebind_model.imagebind_huge()` (1.2B parameters, 1024-d output).
HUGE_KWARGS: dict[str, Any] = {
    'vision_embed_dim': 1280, 'vision_num_blocks': 32, 'vision_num_heads': 16,
    'text_embed_dim': 1024, 'text_num_blocks': 24, 'text_num_heads': 16,
    'out_embed_dim': 1024, 'audio_drop_path': 0.1, 'imu_drop_path': 0.7,
}
# A 2.4M-parameter model with the same key names, for tests and pipelines without weights. It keeps the 1024-d
# output of the huge model so it plugs into the ImageBind-LLM bind network unchanged; the projection heads that
# this costs are ~0.3M parameters and a fraction of a millisecond.
TINY_KWARGS: dict[str, Any] = {
    'out_embed_dim': 1024,
    'vision_embed_dim': 64, 'vision_num_blocks': 2, 'vision_num_heads': 4,
    'audio_embed_dim': 64, 'audio_num_blocks': 2, 'audio_num_heads': 4,
    'depth_embed_dim': 64, 'depth_num_blocks': 2, 'depth_num_heads': 4,
    'text_embed_dim': 32, 'text_num_blocks': 1, 'text_num_heads': 2,
    'thermal_embed_dim': 32, 'thermal_num_blocks': 1, 'thermal_num_heads': 2,
    'imu_embed_dim': 32, 'imu_num_blocks': 1, 'imu_num_heads': 2,
}
PRESETS: dict[str, dict[str, Any]] = {'huge': HUGE_KWARGS, 'tiny': TINY_KWARGS}

_PREVIEW = 5  # keys listed in an error message before "and N more"


class EncodeError(ValueError):
    """A batch that the encoder cannot take (unknown modality, wrong shape or dtype, non-finite values)."""


def _coerce_override(name: str, value: Any, default: Any) -> Any:
    """Check one override against the type of its default; JSON lists become tuples (kernel_size)."""
    if isinstance(default, tuple):
        ok = (isinstance(value, (list, tuple)) and len(value) == len(default)
              and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        expected = f'a list of {len(default)} integers'
        value = tuple(value) if ok else value
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = 'a number'
        value = float(value) if ok else value
    else:
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = 'an integer'
    if not ok:
        raise ConfigError(f"ImageBind override '{name}' must be {expected}, got {value!r}")
    return value


def validate_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Check override names against the `ImageBindModel` signature and their types against its defaults."""
    if not overrides:
        return {}
    defaults = official.model_defaults()
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(
            f'unknown ImageBind override(s): {", ".join(unknown)}; valid keys: {", ".join(sorted(defaults))}')
    return {name: _coerce_override(name, value, defaults[name]) for name, value in overrides.items()}


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse a JSON object of `ImageBindModel` keyword arguments, e.g. '{"vision_num_blocks": 4}' ('' = none)."""
    if not text or not text.strip():
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f'ImageBind overrides are not valid JSON ({exc}): {text!r}') from exc
    if not isinstance(overrides, dict):
        raise ConfigError(f'ImageBind overrides must be a JSON object, got {type(overrides).__name__}')
    return validate_overrides(overrides)


@dataclass(frozen=True)
class ImageBindConfig:
    """Which ImageBind to build, where its weights are, and where it runs.

    `overrides` replace individual `ImageBindModel` keyword arguments of the preset. Without a `checkpoint` the
    model keeps its random initialisation (seeded by `seed`) only if `allow_random_weights` is set. `compile`
    compiles the transformer blocks with `torch.compile` (see `inference.py`; eager with a logged reason where that
    is impossible). `cuda_graphs` replays each input shape's forward as a CUDA graph on CUDA (ignored elsewhere).
    """

    preset: str = 'huge'
    overrides: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str = ''
    allow_random_weights: bool = False
    seed: int = 0
    device: str = 'auto'
    dtype: str = 'auto'
    compile: bool = False
    cuda_graphs: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"ImageBind preset must be one of {', '.join(PRESETS)}, got '{self.preset}'")
        object.__setattr__(self, 'overrides', validate_overrides(self.overrides))

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> ImageBindConfig:
        """The config of an encoder node's parameters (`core/params.py`: IMAGEBIND_PARAMS and device/dtype)."""
        return cls(preset=p['model.preset'], overrides=parse_overrides(p['model.overrides']),
                   checkpoint=p['model.checkpoint'], allow_random_weights=p['model.allow_random_weights'],
                   seed=p['model.seed'], device=p['device'], dtype=p['dtype'], compile=p['model.compile'],
                   cuda_graphs=p['model.cuda_graphs'])

    def __hash__(self) -> int:  # overrides is a dict, so hash the canonical form (the cache key)
        return hash(self.key)

    @property
    def key(self) -> str:
        """Canonical JSON of every field: equal configs give equal keys."""
        return json.dumps({'preset': self.preset, 'overrides': dict(self.overrides), 'checkpoint': self.checkpoint,
                           'allow_random_weights': self.allow_random_weights, 'seed': self.seed,
                           'device': self.device, 'dtype': self.dtype, 'compile': self.compile,
                           'cuda_graphs': self.cuda_graphs}, sort_keys=True)

    def model_kwargs(self) -> dict[str, Any]:
        """All `ImageBindModel` keyword arguments: its defaults, updated by the preset, then by the overrides."""
        return {**official.model_defaults(), **PRESETS[self.preset], **self.overrides}


# --- checkpoints ---------------------------------------------------------------------------------------------------


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The ImageBind checkpoint at `path` as a plain state_dict, read without running code (see core/weights.py)."""
    return tensor_state_dict(load_weights(path, 'ImageBind checkpoint'), path, 'ImageBind checkpoint',
                             "the official format maps names like 'modality_preprocessors.vision.cls_token' to "
                             'tensors')


def _check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], path: str, arch: str) -> None:
    """Raise a CheckpointError listing missing, unexpected and wrongly shaped keys, if any."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [f'{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}'
                  for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k].shape]
    problems = [f'{len(keys)} {what}: {listing(keys, limit=_PREVIEW)}' for what, keys in (
        ('missing keys', missing), ('unexpected keys', unexpected),
        ('shape mismatches (checkpoint != model)', mismatched)) if keys]
    if problems:
        raise CheckpointError(f"ImageBind checkpoint '{path}' does not fit the {arch} architecture: "
                              + '; '.join(problems))


class _NoRandomFill(TorchFunctionMode):
    """Skip the random weight fills during construction when a strict checkpoint load replaces every tensor.

    Building the huge model spends ~80% of its time in `uniform_`/`normal_`. Modes are thread-local, so other
    threads that build modules meanwhile are unaffected (unlike patching `torch.nn.init`).
    """

    _SKIPPED = frozenset({torch.Tensor.uniform_, torch.Tensor.normal_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._SKIPPED:
            return args[0]
        return func(*args, **(kwargs or {}))


def _build_model(config: ImageBindConfig, random_init: bool) -> nn.Module:
    """Construct the official model in eval mode, seeding its random init without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            with contextlib.nullcontext() if random_init else _NoRandomFill():
                model = official.model_class()(**config.model_kwargs())
        except (AssertionError, ValueError, RuntimeError, TypeError) as exc:
            raise ConfigError(f"cannot build ImageBindModel from preset '{config.preset}' with overrides "
                                       f'{dict(config.overrides)}: {exc or type(exc).__name__}') from exc
    return model.eval().requires_grad_(False)


# --- encoder -------------------------------------------------------------------------------------------------------


def _sample_shapes(kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shape of one preprocessed sample per modality (the official model fixes images at 224x224)."""
    return {
        'vision': (3, 224, 224),
        'audio': (1, kwargs['audio_num_mel_bins'], kwargs['audio_target_len']),
        'depth': (1, 224, 224),
        'thermal': (1, 224, 224),
        'imu': (6, 2000),
        'text': (77,),
    }


class ImageBindEncoder:
    """One loaded ImageBind model that embeds batches of any subset of its modalities in a single forward.

    Safe to share between threads: forwards are serialised by a lock. Prefer `get_shared_encoder` so that every
    node of a process uses the same instance.
    """

    def __init__(self, config: ImageBindConfig):
        self.config = config
        self._device = resolve_device(config.device)
        self._dtype = resolve_dtype(config.dtype, self._device)
        kwargs = config.model_kwargs()
        arch = f'imagebind_{config.preset}' + (' (custom)' if config.overrides else '')

        # Fail on weights before spending seconds (huge: ~5 s, 4.8 GB) on building the model.
        state = load_state_dict_file(config.checkpoint) if config.checkpoint else None
        if state is None and not config.allow_random_weights:
            raise CheckpointError(
                'no ImageBind checkpoint given: set model.checkpoint to imagebind_huge.pth (or a state_dict of the '
                'configured architecture), or set model.allow_random_weights to run with random weights')
        self._random_weights = state is None
        model = _build_model(config, random_init=self._random_weights)
        if state is None:
            logger.warning('%s runs with RANDOM weights (seed %d): its embeddings carry no meaning; set '
                           'model.checkpoint for real ones', arch, config.seed)
        else:
            _check_state_dict(model, state, config.checkpoint, arch)
            # assign=True adopts the (memory-mapped) tensors instead of copying them into the built ones.
            model.load_state_dict(state, strict=True, assign=True)
            del state
        self._model_name = f'{arch} (random weights)' if self._random_weights else arch
        self._model = model.to(device=self._device, dtype=self._dtype)
        self._embedding_dim = int(kwargs['out_embed_dim'])
        self._sample_shapes = _sample_shapes(kwargs)
        self.inference_setup = prepare_for_inference(
            self._model, compile=config.compile, warmup=self._warmup_batch() if config.compile else None)
        self._forward: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = self._model
        if config.cuda_graphs and self._device.type == 'cuda':
            self._forward = GraphedForward(self._model)
            self.inference_setup.notes.append('CUDA graphs: one per input shape, captured on first use')
            logger.info('ImageBind: forwards replay as CUDA graphs, one per input shape, captured on first use')
        self._lock = threading.Lock()
        logger.info('loaded %s on %s', self._model_name, describe(self._device, self._dtype))

    def _warmup_batch(self) -> dict[str, torch.Tensor]:
        """One input of each sensor modality, shaped as the nodes send them (audio: 3 clips)."""
        shapes = {'vision': (1, *self._sample_shapes['vision']), 'audio': (1, 3, *self._sample_shapes['audio']),
                  'depth': (1, *self._sample_shapes['depth'])}
        return {m: torch.zeros(shape, device=self._device, dtype=self._dtype) for m, shape in shapes.items()}

    @property
    def model_name(self) -> str:
        """E.g. 'imagebind_huge', or 'imagebind_tiny (random weights)'."""
        return self._model_name

    @property
    def random_weights(self) -> bool:
        """True when no checkpoint was loaded, so embeddings carry no meaning."""
        return self._random_weights

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._sample_shapes)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _prepare(self, modality: str, tensor: torch.Tensor) -> torch.Tensor:
        """Validate one input and move it to the model's device (floating inputs also to its dtype)."""
        sample = self._sample_shapes.get(modality)
        if sample is None:
            raise EncodeError(f"unknown modality '{modality}'; expected one of {', '.join(self.modalities)}")
        if not isinstance(tensor, torch.Tensor):
            raise EncodeError(f'{modality} input must be a torch.Tensor, got {type(tensor).__name__}')
        # The official forward averages a clip axis (B, S, ...) only for inputs of 5 or more dimensions.
        shapes = [f'(B, {", ".join(map(str, sample))})']
        if len(sample) == 3:
            shapes.append(f'(B, S, {", ".join(map(str, sample))})')
        ndim_ok = tensor.ndim == len(sample) + 1 or (len(sample) == 3 and tensor.ndim == len(sample) + 2)
        if not ndim_ok or tuple(tensor.shape[-len(sample):]) != sample or 0 in tensor.shape:
            raise EncodeError(f'{modality} input must have shape {" or ".join(shapes)}, got {tuple(tensor.shape)}')
        if modality == 'text':
            if tensor.dtype != torch.long:
                raise EncodeError(f'text input must be int64 token ids, got {tensor.dtype}')
            return tensor.to(self._device)
        if not tensor.is_floating_point():
            raise EncodeError(f'{modality} input must be a floating point tensor, got {tensor.dtype}')
        if not torch.isfinite(tensor).all():
            raise EncodeError(f'{modality} input contains NaN or infinite values')
        return tensor.to(device=self._device, dtype=self._dtype)

    def encode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Embed preprocessed, batched inputs keyed by modality; returns a float32 (B, D) array per modality.

        Shapes: vision (B, 3, 224, 224), audio (B, S, 1, 128, 204) with S clips averaged as in the official model,
        depth (B, 1, 224, 224). All modalities go through one forward.
        """
        inputs = {modality: self._prepare(modality, tensor) for modality, tensor in batch.items()}
        if not inputs:
            return {}
        with self._lock, torch.inference_mode():
            outputs = self._forward(inputs)
        return {modality: outputs[modality].float().cpu().numpy() for modality in inputs}


_shared_encoders: dict[ImageBindConfig, ImageBindEncoder] = {}
_shared_lock = threading.Lock()


def get_shared_encoder(config: ImageBindConfig) -> ImageBindEncoder:
    """The process-wide encoder for `config`, built on first use; 'auto' device/dtype are resolved first, so
    configs that end up on the same device and dtype share one model."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    config = replace(config, device=str(device), dtype=str(dtype).removeprefix('torch.'))
    with _shared_lock:  # held while building, so concurrent callers never load the model twice
        encoder = _shared_encoders.get(config)
        if encoder is None:
            encoder = _shared_encoders[config] = ImageBindEncoder(config)
        return encoder


def release_shared_encoders() -> None:
    """Forget the shared encoders; their memory is freed once no caller holds them any more."""
    with _shared_lock:
        _shared_encoders.clear()

