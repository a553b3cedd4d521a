"""IMU streams -> ImageBind's IMU encoder input (6, 2000) float32, and the thread-safe buffer that feeds it.

ImageBind ships no IMU loader; what its IMU encoder expects comes from the model code and the paper:

- **Shape** (model code): ``IMUPreprocessor(img_size=[6, 2000], kernel_size=8)`` cuts the (6, 2000) input into
  250 patches of 8 time steps and projects each flattened (6 x 8) patch linearly, followed by a LayerNorm. There is
  no input normalisation in the model. Because of that LayerNorm a common scale of all six channels hardly
  matters, but their relative scale and offsets do: the channels must be in the units the model was trained on.
- **Channels and units**: the paper (Sec. 3.3, "Encoding modalities") uses accelerometer and gyroscope X, Y, Z from
  Ego4D. Ego4D's IMU CSVs (~200 Hz: 4.975 ms steps in the documented sample) carry GoPro telemetry, whose GPMF
  format gives ``ACCL`` in m/s^2 including gravity and ``GYRO`` in rad/s; Meta's own Ego4D IMU pipeline (IMU2CLIP,
  ``dataset/ego4d/utils/utils.py``) stacks them as acc x, y, z then gyro x, y, z, unnormalised. sensor_msgs/Imu
  has the same units (REP 145: accelerations include gravity), so samples are used as they come, in that order
  (:func:`mm_llm_ros.core.sensor_decoding.decode_imu`).
- **Window**: the paper says "5 second clips resulting in 2K time step IMU readings", so 2000 samples span 5 s, a
  400 Hz grid. (IMU2CLIP resamples Ego4D to 200 Hz, where 2000 samples would be 10 s; ``window_s=10`` gives that
  reading.) The sensor's own rate is resampled onto the grid by linear interpolation, which holds the edge values
  like ``numpy.interp``; sensors more than 1.5x faster than the grid are instead averaged over each grid step
  (``antialias``), a box filter that attenuates vibration above the grid's Nyquist rate before it aliases into
  the window (e.g. 1 kHz samples of a 390 Hz motor tone: ~8x less aliased amplitude; not a brick-wall filter).

Axis frames are not converted: ImageBind saw a head-mounted camera's axes, a robot's IMU has its own. That is a
domain gap no resampling can close; it is documented, not hidden.

A history shorter than ``min_history_s`` (default: the whole window) is refused with a clear reason; one between
that and the window is padded at the front by holding the oldest sample, i.e. "the robot was in that state". A gap
between samples longer than ``max_gap_s`` inside the window ends the usable history there, because interpolating
over it would invent motion.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from mm_llm_ros.core.imagebind.preprocess import PreprocessError

logger = logging.getLogger(__name__)

IMU_CHANNELS = 6  # acc x, y, z (m/s^2), gyro x, y, z (rad/s)
IMU_SAMPLES = 2000  # fixed by the model: IMUPreprocessor(img_size=[6, 2000])
_NS = 1_000_000_000


class ImuBufferError(ValueError):
    """A sample the buffer cannot accept (wrong shape, non-finite values, bad stamp)."""


class ImuWindowError(PreprocessError):
    """The buffered IMU history cannot fill a window; ``reason`` is a stable key ('empty', 'short_history',
    'stale')."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ImuSnapshot(NamedTuple):
    """Buffered samples in time order: ``stamps_ns`` (N,) int64 strictly increasing, ``samples`` (N, 6) float64."""

    stamps_ns: np.ndarray
    samples: np.ndarray


class ImuBuffer:
    """Keeps the last ``window_s + margin_s`` seconds of IMU samples, sorted by stamp.

    - Samples arriving up to ``reorder_tolerance_s`` older than the newest one (executor or transport reordering)
      are inserted in place; a sample with an already buffered stamp is dropped and counted as a duplicate.
    - A stamp further back than that is a time jump (bag replay loop, simulation reset): the buffer starts over
      from it and counts a reset, as :class:`mm_llm_ros.core.audio_buffer.AudioRingBuffer` does.
    - Gaps are kept: :func:`preprocess_imu` decides what they mean for a window.

    Memory is bounded by ``(window_s + margin_s) * max_rate_hz`` samples: a faster stream keeps only its newest
    samples. All methods may be called from different threads.
    """

    def __init__(self, window_s: float = 5.0, margin_s: float = 1.0, max_rate_hz: float = 2000.0,
                 reorder_tolerance_s: float = 0.1) -> None:
        for name, value in (('window_s', window_s), ('max_rate_hz', max_rate_hz)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f'{name} must be a positive number, got {value!r}')
        for name, value in (('margin_s', margin_s), ('reorder_tolerance_s', reorder_tolerance_s)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f'{name} must be a number >= 0, got {value!r}')
        self.window_s = float(window_s)
        self._keep_ns = round((window_s + margin_s) * _NS)
        self._tolerance_ns = round(reorder_tolerance_s * _NS)
        self.capacity = max(2, math.ceil((window_s + margin_s) * max_rate_hz))
        self._lock = threading.Lock()
        self._stamps: list[int] = []
        self._samples: list[np.ndarray] = []
        self._resets = 0
        self._duplicates = 0

    @property
    def resets(self) -> int:
        """How many times a stamp far in the past discarded the buffered samples."""
        with self._lock:
            return self._resets

    @property
    def duplicates(self) -> int:
        """Samples dropped because a sample with the same stamp was already buffered."""
        with self._lock:
            return self._duplicates

    def __len__(self) -> int:
        with self._lock:
            return len(self._stamps)

    @property
    def duration_s(self) -> float:
        """Seconds between the oldest and the newest buffered sample."""
        with self._lock:
            return (self._stamps[-1] - self._stamps[0]) / _NS if self._stamps else 0.0

    def append(self, stamp_ns: int, sample: np.ndarray) -> None:
        """Add one (6,) sample (acc xyz m/s^2, gyro xyz rad/s) taken at ``stamp_ns``."""
        if isinstance(stamp_ns, bool) or not isinstance(stamp_ns, (int, np.integer)):
            raise ImuBufferError(f'stamp_ns must be an integer number of nanoseconds, got {stamp_ns!r}')
        sample = np.array(sample, dtype=np.float64).reshape(-1)
        if sample.shape != (IMU_CHANNELS,):
            raise ImuBufferError(f'an IMU sample must have {IMU_CHANNELS} values (acc xyz, gyro xyz), '
                                 f'got {sample.size}')
        if not np.isfinite(sample).all():
            raise ImuBufferError(f'IMU sample has NaN/inf values: {sample.tolist()}')
        stamp_ns = int(stamp_ns)
        with self._lock:
            newest = self._stamps[-1] if self._stamps else None
            if newest is None or stamp_ns > newest:
                self._stamps.append(stamp_ns)
                self._samples.append(sample)
            elif newest - stamp_ns > self._tolerance_ns:
                self._resets += 1
                logger.info('IMU buffer reset: stamp %d is %.3f s before the newest sample', stamp_ns,
                            (newest - stamp_ns) / _NS)
                self._stamps, self._samples = [stamp_ns], [sample]
            else:
                index = bisect.bisect_left(self._stamps, stamp_ns)
                if self._stamps[index] == stamp_ns:
                    self._duplicates += 1
                    return
                self._stamps.insert(index, stamp_ns)
                self._samples.insert(index, sample)
            self._prune()

    def snapshot(self) -> ImuSnapshot | None:
        """A copy of the buffered samples, or None when the buffer is empty."""
        with self._lock:
            if not self._stamps:
                return None
            return ImuSnapshot(np.array(self._stamps, dtype=np.int64), np.stack(self._samples))

    def clear(self) -> None:
        """Drop the buffered samples (not counted as a reset)."""
        with self._lock:
            self._stamps, self._samples = [], []

    def _prune(self) -> None:
        oldest_kept = self._stamps[-1] - self._keep_ns
        drop = bisect.bisect_left(self._stamps, oldest_kept)
        drop = max(drop, len(self._stamps) - self.capacity)
        if drop > 0:
            del self._stamps[:drop]
            del self._samples[:drop]


@dataclasses.dataclass(frozen=True)
class ImuWindowConfig:
    """The IMU window fed to ImageBind (see the module docstring for where each number comes from).

    Attributes:
        window_s: seconds the ``IMU_SAMPLES`` samples span (paper: 5 s, a 400 Hz grid).
        max_gap_s: longest hole between samples that is interpolated over; a longer one ends the usable history.
        min_history_s: shortest contiguous history accepted (None: the whole window); the rest of the window is
            padded by holding the oldest sample.
        antialias: box-average sensors faster than the grid over each grid step before sampling.
    """

    window_s: float = 5.0
    max_gap_s: float = 0.1
    min_history_s: float | None = None
    antialias: bool = True

    def __post_init__(self) -> None:
        for name in ('window_s', 'max_gap_s'):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                raise ValueError(f'IMU {name} must be a positive number of seconds, got {value!r}')
        if self.min_history_s is not None and not (
                isinstance(self.min_history_s, (int, float)) and 0 < self.min_history_s <= self.window_s):
            raise ValueError(f'IMU min_history_s must be in (0, window_s={self.window_s}], '
                             f'got {self.min_history_s!r}')

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ImuWindowConfig:
        """Build from parameter-like values keyed by field name (missing keys keep their defaults).

        ``min_history_s`` <= 0 means None (the whole window), since ROS parameters cannot be None.
        """
        unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown IMU window setting(s): {', '.join(unknown)}")
        values = dict(values)
        minimum = values.get('min_history_s')
        if isinstance(minimum, (int, float)) and not isinstance(minimum, bool) and minimum <= 0:
            values['min_history_s'] = None
        return cls(**values)

    @property
    def rate_hz(self) -> float:
        """The grid rate: IMU_SAMPLES / window_s."""
        return IMU_SAMPLES / self.window_s

    @property
    def required_history_s(self) -> float:
        return self.window_s if self.min_history_s is None else float(self.min_history_s)


def grid_times_s(config: ImuWindowConfig = ImuWindowConfig()) -> np.ndarray:
    """(IMU_SAMPLES,) sample times in seconds relative to the window's end (the last one is 0)."""
    return (np.arange(IMU_SAMPLES, dtype=np.float64) - (IMU_SAMPLES - 1)) / config.rate_hz


def interpolate_linear(times: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation of all channels at once: (N,), (N, C), (M,) -> (M, C).

    Times must be strictly increasing. Outside [times[0], times[-1]] the edge values are held, as numpy.interp.
    """
    if times.size == 1:
        return np.repeat(values[:1], query.size, axis=0)
    index = np.clip(np.searchsorted(times, query, side='right') - 1, 0, times.size - 2)
    left, right = times[index], times[index + 1]
    weight = np.clip((query - left) / (right - left), 0.0, 1.0)[:, None]
    return values[index] * (1.0 - weight) + values[index + 1] * weight


def box_average(times: np.ndarray, values: np.ndarray, query: np.ndarray, width: float) -> np.ndarray:
    """Mean of the piecewise-linear signal over [q - width/2, q + width/2] for each query time: (M, C).

    The signal is the one :func:`interpolate_linear` describes (edges held), integrated exactly.
    """
    if times.size == 1:
        return np.repeat(values[:1], query.size, axis=0)
    segment = np.diff(times)[:, None] * (values[1:] + values[:-1]) / 2.0
    knots = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(segment, axis=0)])  # integral at times

    def integral(t: np.ndarray) -> np.ndarray:
        inside = np.clip(t, times[0], times[-1])
        index = np.clip(np.searchsorted(times, inside, side='right') - 1, 0, times.size - 2)
        at = interpolate_linear(times, values, inside)
        partial = knots[index] + (inside - times[index])[:, None] * (values[index] + at) / 2.0
        before = np.minimum(t - times[0], 0.0)[:, None] * values[0]  # held first value, negative length
        after = np.maximum(t - times[-1], 0.0)[:, None] * values[-1]
        return partial + before + after

    half = width / 2.0
    return (integral(query + half) - integral(query - half)) / width


def _check_stream(stamps_ns: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stamps_ns, samples = np.asarray(stamps_ns), np.asarray(samples)
    if stamps_ns.ndim != 1 or stamps_ns.dtype.kind not in 'iu':
        raise PreprocessError(f'IMU stamps must be a 1-D integer array of nanoseconds, got {stamps_ns.dtype} '
                              f'{stamps_ns.shape}')
    if samples.shape != (stamps_ns.size, IMU_CHANNELS):
        raise PreprocessError(f'IMU samples must be ({stamps_ns.size}, {IMU_CHANNELS}) for {stamps_ns.size} '
                              f'stamps, got {samples.shape}')
    if stamps_ns.size and np.any(np.diff(stamps_ns) <= 0):
        raise PreprocessError('IMU stamps must be strictly increasing (use ImuBuffer to sort and deduplicate)')
    if samples.dtype.kind != 'f' or not np.isfinite(samples).all():
        raise PreprocessError('IMU samples must be finite floats')
    return stamps_ns.astype(np.int64), samples.astype(np.float64)


def preprocess_imu(stamps_ns: np.ndarray, samples: np.ndarray, config: ImuWindowConfig = ImuWindowConfig(),
                   end_ns: int | None = None) -> torch.Tensor:
    """An IMU stream -> ImageBind IMU input (6, 2000) float32: the ``config.window_s`` seconds ending at ``end_ns``.

    Args:
        stamps_ns: (N,) strictly increasing sample stamps (an :class:`ImuSnapshot`).
        samples: (N, 6) acc xyz in m/s^2 and gyro xyz in rad/s.
        config: window length, gap and history rules.
        end_ns: end of the window (default: the newest sample). Samples after it are ignored; it may lie at most
            ``max_gap_s`` after the last sample before it (that value is held).

    Raises:
        ImuWindowError: no samples ('empty'), a window end too far after the last sample ('stale'), or less than
            ``config.required_history_s`` of contiguous history ('short_history').
        PreprocessError: malformed arrays.
    """
    stamps_ns, samples = _check_stream(stamps_ns, samples)
    end_ns = int(stamps_ns[-1]) if end_ns is None and stamps_ns.size else end_ns
    if end_ns is not None:
        keep = stamps_ns <= end_ns
        stamps_ns, samples = stamps_ns[keep], samples[keep]
    if not stamps_ns.size:
        raise ImuWindowError('empty', 'no IMU samples at or before the window end')
    times = (stamps_ns - end_ns) / _NS  # seconds relative to the window end, <= 0
    if -times[-1] > config.max_gap_s:
        raise ImuWindowError('stale', f'the newest IMU sample is {-times[-1]:.3f} s before the window end '
                                      f'(max_gap_s {config.max_gap_s:g})')
    gaps = np.flatnonzero(np.diff(times) > config.max_gap_s)
    first = int(gaps[-1]) + 1 if gaps.size else 0  # the contiguous history starts after the last long gap
    grid = grid_times_s(config)
    history_s = -times[first]
    step = 1.0 / config.rate_hz
    if history_s + config.max_gap_s < config.required_history_s - step:  # N samples span window_s - 1 step
        why = (f'a gap of {times[first] - times[first - 1]:.3f} s ends it' if first
               else 'the stream starts there')
        raise ImuWindowError('short_history', f'only {history_s:.3f} s of contiguous IMU history ({why}); '
                                              f'{config.required_history_s:g} s are needed')
    # Keep the last sample a step before the grid (exact interpolation and box averages), nothing before a gap.
    start = max(first, int(np.searchsorted(times, grid[0] - step, side='right')) - 1)
    times, samples = times[start:], samples[start:]
    median_dt = float(np.median(np.diff(times))) if times.size > 1 else math.inf
    if config.antialias and median_dt < step / 1.5:
        window = box_average(times, samples, grid, step)
    else:
        window = interpolate_linear(times, samples, grid)
    return torch.from_numpy(np.ascontiguousarray(window.T, dtype=np.float32))
