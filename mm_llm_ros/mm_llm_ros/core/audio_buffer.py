"""A thread-safe ring buffer holding the most recent window of a live audio stream.

Audio is kept at the source sample rate: the encoder resamples the whole window at once, which is how the
official ImageBind pipeline resamples whole waveforms, instead of resampling each small chunk (which would add
edge artefacts at every chunk boundary).
"""
from __future__ import annotations

import logging
import math
import threading
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)


class AudioBufferError(ValueError):
    """A chunk the buffer cannot accept (bad shape, or a sample rate/channel count above its bounds)."""


class AudioSnapshot(NamedTuple):
    """The buffered window: ``waveform`` (channels, n) float32, oldest sample first.

    ``end_stamp_ns`` is the time of the newest sample, derived from the header stamp of the chunk it came in
    (which stamps that chunk's first sample).
    """

    waveform: np.ndarray
    sample_rate: int
    end_stamp_ns: int


class AudioRingBuffer:
    """Keeps the last ``window_s`` seconds of (channels, n) chunks.

    Memory is bounded by ``window_s * max_sample_rate * max_channels`` float32 samples. The buffer starts over
    (and counts a reset) when the sample rate or channel count changes, or when a chunk is stamped before the
    previous one (a bag replay loop or a simulation reset), because mixing such audio would be meaningless.
    All methods may be called from different threads.
    """

    def __init__(self, window_s: float, max_sample_rate: int = 192_000, max_channels: int = 16,
                 min_window_s: float = 0.0) -> None:
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f'window_s must be a positive number of seconds, got {window_s}')
        self.min_window_s = float(min_window_s)
        if max_sample_rate <= 0 or max_channels <= 0:
            raise ValueError(f'max_sample_rate and max_channels must be positive, got '
                             f'{max_sample_rate} and {max_channels}')
        self.window_s = float(window_s)
        self.max_sample_rate = int(max_sample_rate)
        self.max_channels = int(max_channels)
        self._lock = threading.Lock()
        self._resets = 0
        self._start_over(channels=0, sample_rate=0)

    @property
    def resets(self) -> int:
        """How many times a format change or a backwards stamp discarded the buffered audio."""
        with self._lock:
            return self._resets

    @property
    def duration_s(self) -> float:
        """Seconds of audio currently held (at most ``window_s``)."""
        with self._lock:
            return self._filled / self._sample_rate if self._sample_rate else 0.0

    def append(self, chunk: np.ndarray, sample_rate: int, stamp_ns: int) -> None:
        """Add a (channels, n) chunk whose first sample was taken at ``stamp_ns``."""
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or not 0 < chunk.shape[0] <= self.max_channels:
            raise AudioBufferError(f'chunk must be (channels, n) with 1..{self.max_channels} channels, '
                                   f'got shape {chunk.shape}')
        if not 0 < sample_rate <= self.max_sample_rate:
            raise AudioBufferError(f'sample_rate must be in 1..{self.max_sample_rate} Hz, got {sample_rate}')
        channels, frames = chunk.shape
        if frames == 0:
            return
        with self._lock:
            if (channels, sample_rate) != (self._channels, self._sample_rate) or stamp_ns < self._last_chunk_ns:
                if self._filled:
                    self._resets += 1
                    logger.info('audio buffer reset: %d ch @ %d Hz stamp %d after %d ch @ %d Hz stamp %d',
                                channels, sample_rate, stamp_ns, self._channels, self._sample_rate,
                                self._last_chunk_ns)
                self._start_over(channels, sample_rate)
            self._write(chunk)
            self._last_chunk_ns = stamp_ns
            self._end_stamp_ns = stamp_ns + round((frames - 1) * 1e9 / sample_rate)

    def add(self, audio, stamp_ns: int) -> None:
        """Add a decoded chunk (`core.sensor_decoding.DecodedAudio`) whose first sample was taken at ``stamp_ns``."""
        self.append(audio.waveform, audio.sample_rate, stamp_ns)

    def snapshot(self) -> AudioSnapshot | None:
        """A copy of the buffered window in time order, or None when nothing has been buffered yet."""
        with self._lock:
            if not self._filled:
                return None
            start = (self._head - self._filled) % self._capacity
            end = start + self._filled
            if end <= self._capacity:
                waveform = self._samples[:, start:end].copy()
            else:  # the window wraps around the end of the ring
                waveform = np.concatenate([self._samples[:, start:], self._samples[:, :end - self._capacity]], axis=1)
            return AudioSnapshot(waveform, self._sample_rate, self._end_stamp_ns)

    def ready_window(self) -> AudioSnapshot | None:
        """The buffered window once it holds at least ``min_window_s`` seconds (the audio window of the encoder and
        of the audio-event extractor alike), else None: keep listening."""
        snapshot = self.snapshot()
        if snapshot is None or snapshot.waveform.shape[1] < self.min_window_s * snapshot.sample_rate:
            return None
        return snapshot

    def clear(self) -> None:
        """Drop the buffered audio (not counted as a reset)."""
        with self._lock:
            self._start_over(self._channels, self._sample_rate)

    def _start_over(self, channels: int, sample_rate: int) -> None:
        self._channels = channels
        self._sample_rate = sample_rate
        self._capacity = max(1, math.ceil(self.window_s * sample_rate))
        self._samples = np.zeros((channels, self._capacity if channels else 0), np.float32)
        self._head = 0  # next column to write
        self._filled = 0
        self._last_chunk_ns = -(1 << 63)
        self._end_stamp_ns = 0

    def _write(self, chunk: np.ndarray) -> None:
        chunk = chunk[:, -self._capacity:]  # only the newest window of an oversized chunk can survive
        frames = chunk.shape[1]
        first = min(frames, self._capacity - self._head)
        self._samples[:, self._head:self._head + first] = chunk[:, :first]
        self._samples[:, :frames - first] = chunk[:, first:]
        self._head = (self._head + frames) % self._capacity
        self._filled = min(self._capacity, self._filled + frames)
