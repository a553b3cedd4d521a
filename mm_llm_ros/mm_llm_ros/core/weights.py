"""The one way every model here reads a weights file: without running code, memory-mapped, with clear errors.

`.safetensors` files go through safetensors; anything else through `torch.load(weights_only=True)`, memory-mapped
when it is a zip checkpoint (every `torch.save` since 1.6, incl. the official imagebind_huge.pth and the LLaMA
shards), so a 4.5 GiB or 13 GiB checkpoint never holds a second copy in RAM and a pickle that carries code is refused.
Every problem raises `CheckpointError` naming the file.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mm_llm_ros.core.errors import CheckpointError

PathLike = str | os.PathLike[str]

MAX_LISTED = 8  # names listed in an error message before "and N more"


def listing(items: list[str], sep: str = ', ', limit: int = MAX_LISTED) -> str:
    """The first `limit` items, and how many more there are."""
    shown = sep.join(items[:limit])
    return shown if len(items) <= limit else f'{shown} and {len(items) - limit} more'


def load_weights(path: PathLike, what: str = 'checkpoint') -> Any:
    """Read `path` (a `what`, e.g. 'ImageBind checkpoint', named in errors) on the CPU without executing code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} '{path}' does not exist (checkpoint file not found)")
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            return load_file(path, device='cpu')
        return torch.load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - torch/safetensors report bad files as RuntimeError, EOFError, ...
        # torch words it 'Unsupported global: GLOBAL x' or 'unsupported GLOBAL x whose module is blocked'.
        unsafe = re.search(r'unsupported (?:global: )?GLOBAL (\S+)', str(exc), re.IGNORECASE)
        if isinstance(exc, pickle.UnpicklingError) and unsafe:
            raise CheckpointError(
                f"refused to load {what} '{path}' for safety: the pickle references {unsafe.group(1)}, which the "
                'weights-only unpickler does not run; only plain tensors and containers are accepted (torch.save '
                'of a state_dict, or safetensors)') from exc
        # weights_only failures bury the reason after this marker; other errors lead with it.
        detail = str(exc).split('WeightsUnpickler error:')[-1].strip().split('\n')[0][:200]
        raise CheckpointError(f"cannot read {what} '{path}' (corrupt or truncated?): not a readable PyTorch "
                              f'checkpoint ({type(exc).__name__}: {detail or "empty or truncated file"})') from exc


def tensor_state_dict(obj: Any, path: PathLike, what: str = 'checkpoint',
                      expected: str = '') -> dict[str, torch.Tensor]:
    """`obj` as a plain name -> tensor dict, or a CheckpointError saying what was found instead (and `expected`)."""
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    found = f'keys {listing(sorted(map(str, obj)))}' if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"{what} '{path}' is not a plain state_dict of tensors (found {found})"
                          + (f'; {expected}' if expected else ''))
