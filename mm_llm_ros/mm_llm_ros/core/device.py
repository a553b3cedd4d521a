"""Device and dtype selection shared by the ImageBind encoder and the LLM."""
from __future__ import annotations

import logging
import re

import torch

from mm_llm_ros.core.errors import DeviceError

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ('auto', 'cpu', 'cuda', 'cuda:N')
DTYPE_CHOICES = ('auto', 'float32', 'float16', 'bfloat16')
_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """Map a `device` parameter (auto|cpu|cuda|cuda:N) to a torch device; auto picks CUDA when present."""
    name = (name or 'auto').strip().lower()
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cpu':
        return torch.device('cpu')
    match = re.fullmatch(r'cuda(?::(\d+))?', name)
    if match is None:
        raise DeviceError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got '{name}'")
    if not torch.cuda.is_available():
        raise DeviceError(f"device '{name}' requested but CUDA is not available (torch {torch.__version__})")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device('cuda', index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a `dtype` parameter to a torch dtype; auto is float16 on CUDA and float32 on CPU."""
    name = (name or 'auto').strip().lower()
    if name == 'auto':
        return torch.float16 if device.type == 'cuda' else torch.float32
    if name not in _DTYPES:
        raise DeviceError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got '{name}'")
    dtype = _DTYPES[name]
    if device.type == 'cpu' and dtype == torch.float16:
        logger.warning('float16 on CPU is slow and poorly supported; consider float32 or bfloat16')
    if device.type == 'cpu' and dtype == torch.bfloat16 and not cpu_has_native_bfloat16():
        logger.warning('this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so bfloat16 is emulated and '
                       'slower than float32; consider float32')
    return dtype


def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 products natively here (AVX512-BF16 or AMX), where batches of rows decode in
    about the time of one (docs/design.md, "bfloat16 batches best on CPUs with AMX or AVX512-BF16")."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """Human-readable device summary for logs and diagnostics, e.g. 'cuda:0 (NVIDIA H100) float16' or
    'cpu float32 (2 threads)'."""
    if device.type == 'cuda':
        return f'{device} ({torch.cuda.get_device_name(device)}) {str(dtype).removeprefix("torch.")}'
    threads = torch.get_num_threads()
    return f'{device} {str(dtype).removeprefix("torch.")} ({threads} thread{"s" if threads > 1 else ""})'


def apply_cpu_threads(count: int) -> None:
    """Set torch's intra-op CPU threads for this process (`cpu_threads`); 0 keeps torch's default."""
    if count < 0:
        raise DeviceError(f'cpu_threads must be >= 0 (0: one per core), got {count}')
    if count:
        torch.set_num_threads(count)
