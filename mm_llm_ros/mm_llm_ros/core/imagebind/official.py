"""Import the published ImageBind model code without its data loaders or timm.

The PyPI package `imagebind-unofficial` (byte-identical to facebookresearch/ImageBind) is used for the
architecture only, so checkpoints load with their official key names. Two things stand in the way:

* `imagebind/__init__.py` imports `imagebind.data`, which pulls torchvision, torchaudio, pytorchvideo and av.
  We never need those (preprocessing is ours), so the top-level package is registered as a bare namespace whose
  `__path__` points at the installed folder; its `__init__.py` is never executed.
* The model code does `from timm.layers import DropPath, trunc_normal_`, and timm imports torchvision. When
  `timm.layers` cannot be imported, a two-symbol stand-in is placed in `sys.modules` only while the ImageBind
  modules are imported, then removed again, so nothing else in the process (e.g. transformers' optional
  dependency probes) ever sees a fake `timm`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mm_llm_ros.core.errors import DependencyError

logger = logging.getLogger(__name__)

OFFICIAL_PACKAGE = 'imagebind'
MODEL_MODULE = 'imagebind.models.imagebind_model'
INSTALL_HINT = 'pip install --no-deps imagebind-unofficial==0.1.1'

_import_lock = threading.Lock()


# --- timm stand-in ---------------------------------------------------------------------------------------------


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False,
              scale_by_keep: bool = True) -> torch.Tensor:
    """Stochastic depth per sample, as `timm.layers.drop_path`: zero whole samples (dim 0) with `drop_prob`."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        mask.div_(keep_prob)  # keeps the expected value of the residual branch unchanged
    return x * mask


class DropPath(nn.Module):
    """Module form of `drop_path`, matching `timm.layers.DropPath` (an identity in eval mode)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f'drop_prob={round(self.drop_prob, 3):0.3f}'


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0) -> torch.Tensor:
    """`timm.layers.trunc_normal_`: timm's and torch's implementations are the same algorithm and signature."""
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def _timm_layers_importable() -> bool:
    try:
        importlib.import_module('timm.layers')
    except Exception as exc:  # noqa: BLE001 - a timm built against another torchvision raises RuntimeError too
        logger.debug('timm.layers is not importable (%s); using the built-in DropPath/trunc_normal_', exc)
        return False
    return True


@contextlib.contextmanager
def _timm_stand_in() -> Iterator[None]:
    """Expose the stand-in as `timm`/`timm.layers` for the duration of the block, then restore `sys.modules`."""
    names = ('timm', 'timm.layers')
    saved = {name: sys.modules.get(name) for name in names}
    package = types.ModuleType('timm', doc='mm_llm_ros stand-in for timm (DropPath, trunc_normal_ only)')
    package.__path__ = []  # marks it as a package so `timm.layers` resolves as its submodule
    layers = types.ModuleType('timm.layers')
    layers.DropPath = DropPath
    layers.trunc_normal_ = trunc_normal_
    package.layers = layers
    sys.modules.update({'timm': package, 'timm.layers': layers})
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# --- the official package ----------------------------------------------------------------------------------------


def _register_bare_package() -> None:
    """Put an unexecuted `imagebind` package in `sys.modules` so its submodules import without `imagebind.data`."""
    if OFFICIAL_PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(OFFICIAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(
            f"the ImageBind model code is not installed (no '{OFFICIAL_PACKAGE}' package); run: {INSTALL_HINT}")
    # module_from_spec sets __path__/__spec__ but does not run __init__.py: that is the point.
    sys.modules[OFFICIAL_PACKAGE] = importlib.util.module_from_spec(spec)


def load_model_module() -> types.ModuleType:
    """Return `imagebind.models.imagebind_model`, importing it (once) without torchvision, torchaudio or timm."""
    with _import_lock:
        if MODEL_MODULE in sys.modules:
            return sys.modules[MODEL_MODULE]
        _register_bare_package()
        stand_in = contextlib.nullcontext() if _timm_layers_importable() else _timm_stand_in()
        try:
            with stand_in:
                module = importlib.import_module(MODEL_MODULE)
        except ImportError as exc:
            raise DependencyError(
                f'cannot import {MODEL_MODULE} ({exc}); install the model code with: {INSTALL_HINT}') from exc
        logger.debug('imported %s from %s', MODEL_MODULE, module.__file__)
        return module


def model_class() -> type[nn.Module]:
    """The official `ImageBindModel` class."""
    return load_model_module().ImageBindModel


def model_defaults() -> dict[str, Any]:
    """Keyword arguments of `ImageBindModel.__init__` and their default values."""
    parameters = inspect.signature(model_class().__init__).parameters
    return {name: p.default for name, p in parameters.items() if name != 'self'}

