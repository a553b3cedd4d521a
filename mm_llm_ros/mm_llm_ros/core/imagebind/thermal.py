"""Thermal camera frames -> ImageBind's thermal encoder input (1, 224, 224) float32.

ImageBind ships no thermal loader. Its thermal encoder was trained on LLVIP (1280x1024 infrared frames of night
streets from a HIKVISION surveillance camera, stored as 8-bit grey JPEGs saved with three equal channels). LLVIP
publishes no temperatures: its frames are the camera's display output, white-hot (warm = bright) and, as
surveillance thermal cameras do, contrast-stretched by the camera's gain control (an inference from the data, not
documented by LLVIP). The model code fixes a single channel of 224x224 (``ThermalPreprocessor`` with a
one-channel 16x16 patch conv). So this module does two things (constants in :class:`ThermalPreprocessConfig`):

1. **Radiometric values -> 8-bit intensity**, like that camera's gain control: pixels in kelvin (or raw counts) are
   windowed linearly to [0, 255] (white-hot) and rounded to 8 bits, as LLVIP's JPEGs were. The default window is
   per frame, between the 1st and 99th percentile of the valid pixels, widened to at least ``min_span`` so the
   noise of a uniform scene is not stretched to full contrast. A ``fixed`` window (e.g. 253.15-323.15 K) keeps
   brightness comparable between frames instead. mono8 frames are already such an image and are used as they are.
2. **The evaluation geometry of every other ImageBind image modality**: Pillow bicubic resize of the short side to
   224, centre crop, scaling to [0, 1] (torchvision's ``ToTensor``), i.e. exactly ``Image.open(f).convert('L')``
   followed by ``Resize(224, BICUBIC)``, ``CenterCrop(224)``, ``ToTensor()``, the loader that the ImageBind
   community converged on (ImageBind issue #37, PR #73). No mean/std normalisation by default: the PR #73 thread
   reports LLVIP zero-shot accuracy 62.4% without it and 55.2% with ``Normalize(0.5, 0.5)``, against 63.4% in the
   ImageBind paper. ``mean``/``std`` are configurable should the official recipe ever be published.

How pixels are read depends on the message encoding and ``units``:

========================  ==================================================  ================================
encoding                  ``units: kelvin`` (default)                         ``units: counts``
========================  ==================================================  ================================
mono8, 8UC1               8-bit intensity, used as is                         8-bit intensity, used as is
mono16, 16UC1             ``value * kelvin_per_count`` K (default 0.01:       raw sensor counts
                          centikelvin, FLIR Lepton/Boson radiometric output);
                          0 is invalid
32FC1                     kelvin; non-finite and <= 0 are invalid             counts; non-finite is invalid
========================  ==================================================  ================================

Invalid pixels are excluded from the window and drawn black (coldest).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.imagebind.preprocess import PreprocessError, _resize_and_crop

logger = logging.getLogger(__name__)

THERMAL_UNITS = ('kelvin', 'counts')
PLAUSIBLE_KELVIN = (150.0, 1000.0)  # a median outside this is almost certainly not kelvin
THERMAL_WINDOWS = ('percentile', 'fixed')
DEFAULT_MIN_SPAN_K = 5.0  # a uniform scene is shown with at least this much temperature contrast


@dataclasses.dataclass(frozen=True)
class ThermalPreprocessConfig:
    """How a thermal frame becomes the 8-bit intensity image ImageBind's thermal encoder was trained on.

    Attributes:
        units: what 16-bit and float pixels are, ``kelvin`` or ``counts`` (see the module docstring's table).
        kelvin_per_count: scale of 16-bit pixels when ``units`` is kelvin (0.01 = centikelvin).
        window: ``percentile`` (per frame, like a camera's gain control) or ``fixed``.
        percentiles: (low, high) percentiles of the valid pixels that map to 0 and 255 in ``percentile`` mode.
        fixed_range: (low, high) in kelvin or counts that map to 0 and 255; required in ``fixed`` mode.
        min_span: smallest window width in the pixels' units; None = 5 K for kelvin, none for counts.
        mean, std: normalisation of the [0, 1] crop (default: none, see the module docstring).
    """

    units: str = 'kelvin'
    kelvin_per_count: float = 0.01
    window: str = 'percentile'
    percentiles: tuple[float, float] = (1.0, 99.0)
    fixed_range: tuple[float, float] | None = None
    min_span: float | None = None
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.units not in THERMAL_UNITS:
            raise ConfigError(f"thermal units must be one of {', '.join(THERMAL_UNITS)}, got {self.units!r}")
        if self.window not in THERMAL_WINDOWS:
            raise ConfigError(
                f"thermal window must be one of {', '.join(THERMAL_WINDOWS)}, got {self.window!r}")
        if not (_is_number(self.kelvin_per_count) and self.kelvin_per_count > 0):
            raise ConfigError(f'kelvin_per_count must be a positive number, got {self.kelvin_per_count!r}')
        low, high = _pair(self.percentiles, 'percentiles')
        if not 0 <= low < high <= 100:
            raise ConfigError(f'percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles!r}')
        if self.fixed_range is not None:
            low, high = _pair(self.fixed_range, 'fixed_range')
            if not low < high:
                raise ConfigError(f'fixed_range must be (low, high) with low < high, got {self.fixed_range!r}')
        elif self.window == 'fixed':
            raise ConfigError('thermal window "fixed" needs fixed_range (low, high) in the pixel units, '
                                     'e.g. (253.15, 323.15) kelvin for -20..50 degC')
        if self.min_span is not None and not (_is_number(self.min_span) and self.min_span >= 0):
            raise ConfigError(f'min_span must be a number >= 0, got {self.min_span!r}')
        if not (_is_number(self.mean) and _is_number(self.std) and self.std > 0):
            raise ConfigError(f'mean must be a number and std a positive number, got {self.mean!r}, '
                                     f'{self.std!r}')
        object.__setattr__(self, 'percentiles', tuple(float(v) for v in self.percentiles))
        if self.fixed_range is not None:
            object.__setattr__(self, 'fixed_range', tuple(float(v) for v in self.fixed_range))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ThermalPreprocessConfig:
        """Build from parameter-like values keyed by field name (missing keys keep their defaults).

        An empty ``fixed_range`` list (ROS parameters cannot be None) means none; ``min_span`` < 0 means the
        default for the units.
        """
        unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown thermal setting(s): {', '.join(unknown)}")
        values = dict(values)
        if 'fixed_range' in values and not len(values['fixed_range'] or ()):
            values['fixed_range'] = None
        if 'min_span' in values and _is_number(values['min_span']) and values['min_span'] < 0:
            values['min_span'] = None
        for key in ('percentiles', 'fixed_range'):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    @property
    def effective_min_span(self) -> float:
        """The window's minimum width in the pixels' units."""
        if self.min_span is not None:
            return float(self.min_span)
        return DEFAULT_MIN_SPAN_K if self.units == 'kelvin' else 0.0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def _pair(value: object, name: str) -> tuple[float, float]:
    try:
        low, high = value
    except (TypeError, ValueError):
        raise ConfigError(f'{name} must be a (low, high) pair, got {value!r}') from None
    if not (_is_number(low) and _is_number(high)):
        raise ConfigError(f'{name} must be two finite numbers, got {value!r}')
    return float(low), float(high)


def _physical_values(values: np.ndarray, config: ThermalPreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) uint16/float pixels -> (float64 values in kelvin or counts, validity mask)."""
    if values.dtype == np.uint16:
        physical = values.astype(np.float64)
        if config.units == 'kelvin':
            physical *= config.kelvin_per_count
            return physical, values > 0
        return physical, np.ones(values.shape, bool)
    physical = values.astype(np.float64)
    with np.errstate(invalid='ignore'):
        valid = np.isfinite(physical) & ((physical > 0) if config.units == 'kelvin' else True)
    return physical, valid


def thermal_window(values: np.ndarray, valid: np.ndarray, config: ThermalPreprocessConfig) -> tuple[float, float]:
    """(low, high) of the linear map to 8 bits, in the pixels' units (see :class:`ThermalPreprocessConfig`)."""
    if config.window == 'fixed':
        low, high = config.fixed_range
    else:
        low, high = (float(v) for v in np.percentile(values[valid], config.percentiles))
    span = config.effective_min_span
    if high - low < span:
        middle = (low + high) / 2.0
        low, high = middle - span / 2.0, middle + span / 2.0
    if not high > low:  # a constant frame and no minimum span: any window shows it as one grey level
        high = low + 1.0
    return low, high


_warned: set[tuple[str, float]] = set()


def _warn_if_not_kelvin(kelvin: np.ndarray, dtype: np.dtype, config: ThermalPreprocessConfig) -> None:
    """Log once per pixel type and scale when a frame read as kelvin has an implausible median (raw counts?)."""
    median = float(np.median(kelvin[::7]))  # a subsample is plenty to tell 300 K from 8000 "K"
    key = (str(dtype), config.kelvin_per_count)
    if PLAUSIBLE_KELVIN[0] <= median <= PLAUSIBLE_KELVIN[1] or key in _warned:
        return
    _warned.add(key)
    scale = f' with kelvin_per_count {config.kelvin_per_count:g}' if dtype == np.uint16 else ''
    logger.warning('thermal frame read as kelvin%s has a median of %.1f K: are these raw counts? Set units to '
                   "counts (or the camera's kelvin_per_count)", scale, median)


def thermal_to_intensity(values: np.ndarray,
                         config: ThermalPreprocessConfig = ThermalPreprocessConfig()) -> np.ndarray:
    """A decoded thermal frame (H, W) -> the (H, W) uint8 white-hot intensity image LLVIP-style.

    Args:
        values: uint8 intensity (returned as is), uint16 counts/centikelvin or float kelvin/counts, as
            :func:`mm_llm_ros.core.sensor_decoding.decode_thermal_image` returns them.
        config: units and window.

    Raises:
        PreprocessError: wrong shape or dtype, or no valid pixel.
    """
    if not isinstance(values, np.ndarray):
        raise PreprocessError(f'thermal image must be a numpy array, got {type(values).__name__}')
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[..., 0]
    if values.ndim != 2 or values.size == 0:
        raise PreprocessError(f'thermal image must be a non-empty (H, W) array, got shape {values.shape}')
    if values.dtype == np.uint8:
        return values
    if values.dtype != np.uint16 and values.dtype.kind != 'f':
        raise PreprocessError(f'thermal image must be uint8, uint16 or float, got {values.dtype}')
    physical, valid = _physical_values(values, config)
    if not valid.any():
        raise PreprocessError(f'thermal image has no valid pixel (units {config.units}: '
                              + ('0, non-finite and <= 0 are invalid)' if config.units == 'kelvin'
                                 else 'non-finite values are invalid)'))
    if config.units == 'kelvin':
        _warn_if_not_kelvin(physical[valid], values.dtype, config)
    low, high = thermal_window(physical, valid, config)
    scaled = np.clip((physical - low) * (255.0 / (high - low)), 0.0, 255.0)
    scaled[~valid] = 0.0
    return np.rint(scaled).astype(np.uint8)


def preprocess_thermal(values: np.ndarray,
                       config: ThermalPreprocessConfig = ThermalPreprocessConfig()) -> torch.Tensor:
    """A decoded thermal frame (H, W) -> ImageBind thermal input (1, 224, 224) float32.

    The 8-bit intensity image of :func:`thermal_to_intensity` is resized (Pillow bicubic, short side 224),
    centre-cropped, scaled to [0, 1] and normalised with ``config.mean``/``config.std``.
    """
    crop = _resize_and_crop(np.ascontiguousarray(thermal_to_intensity(values, config)))
    tensor = torch.tensor(crop, dtype=torch.float32).div_(255).unsqueeze(0)
    if config.mean != 0.0 or config.std != 1.0:
        tensor = (tensor - config.mean) / config.std
    return tensor
