"""Weight-only quantisation of the LLM backbone (`llm.quantization: none | int8 | int4`) with torchao.

Applied after `ImageBindLLM.merge_adapters()` (the merge writes W + B A into the base weight in place, which a
quantised weight cannot take), to the seven projections of every decoder layer: q/k/v/o and gate/up/down. What
stays in the model dtype, and why:
- `lm_head` and the token embeddings: SmolLM2 ties them (quantising the head would need a second, untied copy of
  the embedding matrix), the logits are what greedy decoding compares, and for LLaMA-7B they are 4% of the weights;
- the bind network and the prefix queries: they run once per query, not per token, so they cost no decode time;
- the rank-16 LoRA factors kept by the merge: they only serve the once-per-query visual path (`base_output`).

Modes (see docs/quantization.md for the measured drift and the GPUs each suits):
- `int8`: symmetric per-output-channel int8 (`Int8WeightOnlyConfig`, `Int8Tensor`). The linear runs
  `x @ W_int8.to(x.dtype) * scale`: in eager mode the cast materialises a float copy of the weight per call (less
  memory at rest, no speed-up); torch.compile fuses the cast into the matmul.
- `int4`: asymmetric groupwise int4 (group 128; the largest of 128, 64, 32 that divides the input width, so
  SmolLM2's 576-wide projections use 64 and the 64-wide tiny model 64) in torch's own tinygemm kernels: on CUDA
  `Int4WeightOnlyConfig(int4_packing_format='tile_packed_to_4d')` (`aten._weight_int4pack_mm`, bfloat16 only,
  compute capability >= 8.0: weights are quantised from bfloat16 and activations cast to it inside the op), on
  the CPU torchao's `PrototypeInt4WeightOnlyConfig` (`aten._weight_int4pack_mm_for_cpu`, another packing), which
  is fast only for bfloat16 activations: `check_quantization` refuses CPU int4 for any other model dtype.

Both quantised linears are pure tensor programs (no `.item()`, no data-dependent Python branch), so a decode step
can be captured into a CUDA graph. torchao's own C++/CUDA extensions (fp8/mxfp8 CUTLASS kernels) are not used by
these paths; `import_torchao` skips loading them, so a torchao wheel built for another torch or CUDA imports
quietly and still works.

Other int4 kernels on CUDA (`int4_kernel`, for benchmarking; tinygemm stays the default): the same groupwise
asymmetric int4 weights run through
- `fbgemm`: torchao's `preshuffled` packing, Hopper WGMMA kernels (`bf16i4bf16_shuffled`) from `fbgemm-gpu-genai`.
  torchao 0.18 looks for them under their new package name, `mslk`; without mslk the op and the packing function
  are taken from fbgemm's package (`_fbgemm_preshuffled`). bfloat16 activations only;
- `gemlite`: torchao's `UIntxWeightOnlyConfig` (prototype), gemlite's Triton GEMV/GEMM kernels.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from types import ModuleType
from typing import Iterator

import torch
from torch import nn

from mm_llm_ros.core.errors import ConfigError, DependencyError

logger = logging.getLogger(__name__)

MODES = ('none', 'int8', 'int4')
INT4_KERNEL_NAMES = ('tinygemm', 'fbgemm', 'gemlite')  # tinygemm: the default, and the only one on the CPU
INT4_GROUP_SIZES = (128, 64, 32)  # preferred first; tinygemm supports 32..256
TORCHAO_PIN = 'torchao==0.18.0'
# aten ops behind the int4 path, per device type: (pack, matmul).
INT4_KERNELS = {'cpu': ('_convert_weight_to_int4pack_for_cpu', '_weight_int4pack_mm_for_cpu'),
                'cuda': ('_convert_weight_to_int4pack', '_weight_int4pack_mm')}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SKIP_EXTENSIONS_ENV = 'TORCHAO_FORCE_SKIP_LOADING_SO_FILES'
_LORA_FACTORS = ('lora_a', 'lora_b')
# What transformers' torchao integration imports with its modeling code (quantizers/quantizer_torchao.py).
_TRANSFORMERS_IMPORTS = 'torchao.prototype.safetensors.safetensors_support'


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """Skip torchao's C++ extensions and silence its import-time warnings (restored afterwards)."""
    loggers = [logging.getLogger(name) for name in ('torchao', 'torch.utils._pytree')]
    levels = [log.level for log in loggers]
    previous = os.environ.get(_SKIP_EXTENSIONS_ENV)
    os.environ[_SKIP_EXTENSIONS_ENV] = '1'
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
        if previous is None:
            os.environ.pop(_SKIP_EXTENSIONS_ENV, None)
        else:
            os.environ[_SKIP_EXTENSIONS_ENV] = previous


def import_torchao() -> ModuleType:
    """`torchao.quantization`, imported quietly; DependencyError if torchao is missing or broken."""
    try:
        with _quiet_import():
            importlib.import_module('torchao')
            with contextlib.suppress(ImportError):  # what transformers imports next, as quietly
                importlib.import_module(_TRANSFORMERS_IMPORTS)
            return importlib.import_module('torchao.quantization')
    except ImportError as exc:
        raise DependencyError(f'weight-only quantisation needs torchao, which does not import ({exc}); '
                                f'install it with: pip install {TORCHAO_PIN}') from exc


def preload_torchao() -> None:
    """Import torchao quietly now if it is installed, whatever the mode.

    transformers imports torchao with its modeling code whenever torchao is installed, which on a CPU build of
    torch prints a warning per CUDA extension it fails to load; importing it first, quietly, keeps that off the
    nodes' stderr. It costs nothing extra: transformers would import it a moment later anyway.
    """
    if 'torchao' not in sys.modules and importlib.util.find_spec('torchao') is not None:
        with contextlib.suppress(DependencyError):
            import_torchao()


def _refuse(mode: str, reason: str) -> ConfigError:
    return ConfigError(f"llm.quantization '{mode}' {reason}")


def model_dtype(mode: str, dtype_name: str, resolved: torch.dtype) -> torch.dtype:
    """The dtype to load the model in: `resolved` (the `dtype` parameter), except that int4 with dtype `auto` takes
    bfloat16, the only activation dtype of the tinygemm kernels on both devices. With float16 activations each
    int4 projection casts its input to bfloat16 and its output back (H200, LLaMA-7B shape: about 2 ms of a 7 ms
    token); an explicit float16 is kept, with that cost logged."""
    if mode != 'int4':
        return resolved
    if (dtype_name or 'auto').strip().lower() == 'auto':
        return torch.bfloat16
    if resolved == torch.float16:
        logger.warning('llm.quantization int4 with dtype float16: every int4 projection casts to bfloat16 and back '
                       '(tinygemm is bfloat16-only); dtype auto or bfloat16 avoids that')
    return resolved


def _check_int4_kernel(int4_kernel: str) -> None:
    if int4_kernel not in INT4_KERNEL_NAMES:
        raise ConfigError(f"int4 kernel '{int4_kernel}' is unknown: choose one of {', '.join(INT4_KERNEL_NAMES)}")


_MSLK_OPS: list = []  # keeps the mslk alias op registered for the life of the process


@functools.lru_cache(maxsize=None)
def _fbgemm_preshuffled() -> None:
    """Make torchao's `preshuffled` int4 tensor run on fbgemm-gpu-genai's kernels when mslk is not installed."""
    try:
        importlib.import_module('fbgemm_gpu.experimental.gen_ai')  # loads the .so: registers torch.ops.fbgemm
        from fbgemm_gpu.experimental.gen_ai.quantize import quantize_int4_preshuffle
        torch.ops.fbgemm.bf16i4bf16_shuffled  # noqa: B018  (an AttributeError if the .so lacks the kernel)
    except (ImportError, OSError, RuntimeError, AttributeError) as exc:
        raise DependencyError(f"int4 kernel 'fbgemm' needs fbgemm-gpu-genai, which does not import or lacks "
                                f"bf16i4bf16_shuffled ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                                'install it with: pip install fbgemm-gpu-genai') from exc
    with _quiet_import():
        preshuffled = importlib.import_module('torchao.quantization.quantize_.workflows.int4.int4_preshuffled_tensor')
    if preshuffled.quantize_int4_preshuffle is not None:
        return  # mslk is installed: torchao uses it as it is
    preshuffled.quantize_int4_preshuffle = quantize_int4_preshuffle
    with contextlib.suppress(AttributeError, RuntimeError):
        torch.ops.mslk.bf16i4bf16_shuffled  # noqa: B018
        return

    # An opaque custom op (with a shape-only fake) so that torch.compile traces it without fbgemm's own fakes.
    @torch.library.custom_op('mslk::bf16i4bf16_shuffled', mutates_args=())
    def bf16i4bf16_shuffled(X: torch.Tensor, W: torch.Tensor, w_scale_group: torch.Tensor,
                            w_zero_group: torch.Tensor) -> torch.Tensor:
        out = torch.ops.fbgemm.bf16i4bf16_shuffled(X.reshape(-1, X.shape[-1]), W, w_scale_group, w_zero_group)
        return out.reshape(*X.shape[:-1], W.shape[0]).clone()

    @bf16i4bf16_shuffled.register_fake
    def _(X, W, w_scale_group, w_zero_group):
        return X.new_empty((*X.shape[:-1], W.shape[0]), dtype=torch.bfloat16)

    _MSLK_OPS.append(bf16i4bf16_shuffled)


def _gemlite_config(group: int):
    try:
        importlib.import_module('gemlite')
        with _quiet_import():
            from torchao.prototype.quantization.quant_api import UIntxWeightOnlyConfig
    except Exception as exc:  # gemlite imports triton and probes the GPU: any failure is "not available"
        raise DependencyError(f"int4 kernel 'gemlite' needs gemlite, which does not import "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                                'install it with: pip install gemlite') from exc
    return UIntxWeightOnlyConfig(group_size=group, bit_width=4, set_inductor_config=False)


def check_quantization(mode: str, device: torch.device | str, dtype: torch.dtype,
                       int4_kernel: str = 'tinygemm') -> None:
    """Raise ConfigError (one line naming the mode and the reason) unless `mode` runs on `device`/`dtype`.

    Checks the mode name, that torchao imports, that torch has the int4 kernels of the device (and, on CUDA,
    compute capability >= 8.0), and then quantises and runs a small probe layer on the device. Touches no model.
    `int4_kernel` other than tinygemm: CUDA only, and its package must import.
    """
    if mode not in MODES:
        raise ConfigError(f"llm.quantization '{mode}' is unknown: choose one of {', '.join(MODES)}")
    _check_int4_kernel(int4_kernel)
    if mode == 'none':
        preload_torchao()
        return
    device = torch.device(device)
    if device.type not in INT4_KERNELS:
        raise _refuse(mode, f'needs a CPU or CUDA device, got {device}')
    if dtype not in _FLOAT_DTYPES:
        raise _refuse(mode, f'needs a float32, float16 or bfloat16 model, got {dtype}')
    import_torchao()
    if mode == 'int4' and int4_kernel != 'tinygemm':
        if device.type != 'cuda':
            raise _refuse(mode, f"with int4 kernel '{int4_kernel}' needs a CUDA device, got {device}")
        if int4_kernel == 'fbgemm' and dtype != torch.bfloat16:
            raise _refuse(mode, f"with int4 kernel 'fbgemm' needs dtype bfloat16 (bf16i4bf16), got {dtype}")
        if int4_kernel == 'fbgemm':
            _fbgemm_preshuffled()
        else:
            _gemlite_config(128)
    elif mode == 'int4':
        if device.type == 'cuda' and torch.version.hip is not None:
            raise _refuse(mode, 'is not supported on ROCm builds (the tinygemm packing differs); use int8')
        missing = [op for op in INT4_KERNELS[device.type] if not hasattr(torch.ops.aten, op)]
        if missing:
            raise _refuse(mode, f'needs the {device.type} int4 kernels, which this torch {torch.__version__} build '
                                f'lacks ({", ".join(missing)}); use int8')
        if device.type == 'cpu' and dtype != torch.bfloat16:
            raise _refuse(mode, f'on the CPU needs dtype bfloat16, got {str(dtype).removeprefix("torch.")}: torch\'s '
                                'CPU int4 kernel is slow for other activations (measured 10x slower than float32 per '
                                'token, 80x per prompt token); set dtype: bfloat16, or use int8')
        if device.type == 'cuda':
            capability = torch.cuda.get_device_capability(device)
            if capability < (8, 0):
                raise _refuse(mode, f'needs compute capability >= 8.0 for the tinygemm kernel, '
                                    f'{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}; '
                                    'use int8')
    _probe(mode, str(device), dtype, int4_kernel)


@functools.lru_cache(maxsize=None)
def _probe(mode: str, device: str, dtype: torch.dtype, int4_kernel: str = 'tinygemm') -> None:
    """Quantise and run a 256 -> 64 linear layer on the device; refuse if that fails or computes garbage."""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(256, 64, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 256, generator=generator) / 16)
    linear = linear.to(device=device, dtype=dtype)
    x = torch.randn(3, 256, generator=generator).to(device=device, dtype=dtype)
    with torch.no_grad():
        reference = linear(x).float()
        try:
            _quantize_linear(linear, mode, int4_kernel=int4_kernel)
            y = linear(x).float()
        except (RuntimeError, AssertionError, ValueError, NotImplementedError) as exc:
            raise _refuse(mode, f'fails on this {device} build of torch {torch.__version__}: '
                                f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""}') from exc
        error = float((y - reference).norm() / reference.norm())
    if not error < 0.3:  # int4 gives about 0.1, int8 about 0.005; NaN fails too
        raise _refuse(mode, f'computes wrong results on this {device} build (relative error {error:.3g})')


def int4_group_size(in_features: int, preferred: int | None = None) -> int | None:
    """The int4 group size for a weight `in_features` wide: `preferred` (default 128) if it divides the width,
    else the largest of 128, 64, 32 that does."""
    sizes = INT4_GROUP_SIZES if preferred is None else (preferred, *INT4_GROUP_SIZES)
    return next((size for size in sizes if in_features % size == 0), None)


def _config(mode: str, device: torch.device, in_features: int, group_size: int | None = None,
            int4_kernel: str = 'tinygemm'):
    quantization = import_torchao()
    # set_inductor_config=False: torchao would otherwise flip process-wide inductor settings
    # (coordinate-descent tuning: much longer compiles) as a side effect of quantising.
    if mode == 'int8':
        return quantization.Int8WeightOnlyConfig(set_inductor_config=False)  # per-row (output channel) scales
    group = int4_group_size(in_features, group_size)
    if group is None:
        return None
    if int4_kernel != 'tinygemm' and device.type != 'cuda':
        raise _refuse(mode, f"with int4 kernel '{int4_kernel}' needs a CUDA device, got {device}")
    if int4_kernel == 'gemlite':
        return _gemlite_config(group)
    if int4_kernel == 'fbgemm':
        _fbgemm_preshuffled()
        return quantization.Int4WeightOnlyConfig(group_size=group, int4_packing_format='preshuffled',
                                                 set_inductor_config=False)
    if device.type == 'cuda':
        return quantization.Int4WeightOnlyConfig(group_size=group, int4_packing_format='tile_packed_to_4d',
                                                 set_inductor_config=False)
    with _quiet_import():
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    return PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)


@torch.no_grad()
def _quantize_linear(linear: nn.Linear, mode: str, group_size: int | None = None,
                     int4_kernel: str = 'tinygemm') -> bool:
    """Replace `linear.weight` by its torchao quantised tensor; False (left as is) if the shape does not fit."""
    config = _config(mode, linear.weight.device, linear.in_features, group_size, int4_kernel)
    if config is None:
        return False
    if mode == 'int4' and linear.weight.device.type == 'cuda' and linear.weight.dtype != torch.bfloat16:
        # tinygemm and fbgemm are bfloat16-only: quantise from bfloat16 (its range covers float16 and float32
        # weights). gemlite takes float16 too, but bfloat16 keeps the kernels' rows comparable.
        linear.weight = nn.Parameter(linear.weight.to(torch.bfloat16), requires_grad=False)
    import_torchao().quantize_(linear, config)
    return not is_plain(linear.weight)


def is_plain(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is an ordinary tensor or parameter, not a (torchao quantised) tensor subclass."""
    return type(tensor) in (torch.Tensor, nn.Parameter)


def _decoder_layers(module: nn.Module) -> nn.ModuleList:
    backbone = getattr(module, 'backbone', module)  # ImageBindLLM or a bare LlamaForCausalLM
    layers = getattr(getattr(backbone, 'model', None), 'layers', None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(f'cannot quantise {type(module).__name__}: not a LLaMA-style causal LM '
                                '(no model.layers)')
    return layers


def _holders(module: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (submodule, attribute) that holds each parameter, keyed by the parameter's id (shared weights)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for submodule in module.modules():
        for name, parameter in submodule._parameters.items():
            if parameter is not None:
                holders.setdefault(id(parameter), []).append((submodule, name))
    return holders


def quantize_linear_weights(module: nn.Module, mode: str, int4_group_size: int | None = None,
                            int4_kernel: str = 'tinygemm') -> int:
    """Quantise (weight-only, in place) every linear weight of the decoder layers; return how many.

    `module` is a transformers LLaMA (`LlamaForCausalLM`) or an `ImageBindLLM` whose adapters are merged. A weight
    shared by several modules (the merged wo and its `ServedOutputProjection`) is quantised once and stays shared.
    Leaves lm_head, embeddings, norms, the bind network and the LoRA factors in the model dtype (module docstring).
    `int4_group_size` overrides the default of 128 (e.g. 32 for weights that were 4-bit in groups of 32 before,
    like the embedded SmolLM2's Q4_1 GGUF: the same grid comes back). Call `check_quantization` first for a clear
    refusal; 'none' returns 0 and changes nothing. `int4_kernel` picks the CUDA int4 kernel (module docstring):
    'tinygemm' (default), 'fbgemm' or 'gemlite'; ConfigError if unknown or its package does not import.
    """
    if mode not in MODES:
        raise ConfigError(f"llm.quantization '{mode}' is unknown: choose one of {', '.join(MODES)}")
    _check_int4_kernel(int4_kernel)
    if mode == 'none':
        return 0
    if getattr(module, 'merged', True) is False:
        raise ConfigError(f"llm.quantization '{mode}': merge the adapters first (merge_adapters writes "
                                'W + B A into the base weights, which a quantised weight cannot take)')
    layers = _decoder_layers(module)
    holders = _holders(module)
    targets = [(f'{index}.{name}', linear) for index, layer in enumerate(layers)
               for name, linear in layer.named_modules()
               if isinstance(linear, nn.Linear) and name.rsplit('.', 1)[-1] not in _LORA_FACTORS]
    weight = targets[0][1].weight if targets else None
    if mode == 'int4' and weight is not None and weight.device.type == 'cpu' and weight.dtype != torch.bfloat16:
        logger.warning("llm.quantization 'int4' on the CPU with %s weights: the kernel is only fast with bfloat16",
                       weight.dtype)
    count, skipped = 0, []
    for name, linear in targets:
        original = linear.weight
        if not is_plain(original):
            continue  # already quantised (shared with a module seen before, or a second call)
        if not _quantize_linear(linear, mode, int4_group_size, int4_kernel):
            skipped.append(name)
            continue
        for holder, attribute in holders.get(id(original), []):
            if holder is not linear:
                setattr(holder, attribute, linear.weight)  # e.g. ServedOutputProjection.weight: still shared
        count += 1
    if skipped:
        logger.warning("llm.quantization '%s': %d weights left unquantised (input width not a multiple of 32): %s",
                       mode, len(skipped), ', '.join(skipped[:4]))
    return count


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor; a quantised tensor subclass counts its inner tensors (packed data, scales)."""
    if is_plain(tensor):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(tensor_bytes(inner) for name in names if (inner := getattr(tensor, name)) is not None)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by `module`'s parameters, each shared parameter once, quantised tensors by their packed data."""
    return sum(tensor_bytes(parameter) for parameter in module.parameters())
