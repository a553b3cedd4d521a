"""The replay timeline: when each image, cloud and audio chunk is due, as seconds after the replay started.

Due times are computed from the start (``k / rate``, sample counts), never by adding periods, so a replay that
runs for hours does not drift; the player only sleeps until ``start + due_s``.

- A :class:`FrameTrack` publishes file ``k % files`` at ``k / rate_hz``.
- An :class:`AudioTrack` plays its clips back to back in chunks of ``audio_chunk_s``. A chunk is due when its
  last sample has been "recorded" (as a microphone driver publishes) and is stamped with its first sample's time,
  so consecutive chunks tile the time line without gaps or overlaps.
- :func:`recorded_timeline` replays recorded messages (a bag) at their recorded offsets.

Bounds: with ``loop`` off every track plays its files once; ``duration_s`` > 0 keeps only data that starts
before it (the last audio chunk is cut at ``duration_s``). With ``loop`` on and no duration the timeline is
infinite; it is generated lazily.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar, Union

T = TypeVar('T')

_EPS = 1e-9  # seconds; absorbs float rounding in "starts before duration" comparisons


@dataclasses.dataclass(frozen=True)
class TimelineConfig:
    loop: bool = True
    duration_s: float = 0.0  # 0 = unbounded (one pass when loop is off)
    audio_chunk_s: float = 0.1

    def __post_init__(self) -> None:
        if not (self.duration_s >= 0 and math.isfinite(self.duration_s)):
            raise ValueError(f'duration_s must be >= 0 (0 = no limit), got {self.duration_s}')
        if not (0 < self.audio_chunk_s <= 10):
            raise ValueError(f'audio_chunk_s must be in (0, 10] seconds, got {self.audio_chunk_s}')

    @property
    def bounded(self) -> bool:
        """True when every timeline built with this config ends."""
        return not self.loop or self.duration_s > 0

    def within(self, start_s: float) -> bool:
        return self.duration_s == 0 or start_s < self.duration_s - _EPS


@dataclasses.dataclass(frozen=True)
class FrameTrack:
    """A stream that publishes one of ``files`` files every ``1 / rate_hz`` seconds."""

    files: int
    rate_hz: float

    def __post_init__(self) -> None:
        if self.files < 1:
            raise ValueError(f'a frame track needs at least one file, got {self.files}')
        if not (self.rate_hz > 0 and math.isfinite(self.rate_hz)):
            raise ValueError(f'rate_hz must be positive, got {self.rate_hz}')


@dataclasses.dataclass(frozen=True)
class AudioTrack:
    """Audio clips played back to back: ``(frames, sample_rate)`` per file."""

    clips: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.clips or sum(frames for frames, _ in self.clips) == 0:
            raise ValueError('an audio track needs at least one non-empty clip')
        if any(rate <= 0 or frames < 0 for frames, rate in self.clips):
            raise ValueError(f'audio clips need positive sample rates and frame counts, got {self.clips}')


Track = Union[FrameTrack, AudioTrack]


@dataclasses.dataclass(frozen=True)
class ReplayEvent:
    """One message to publish."""

    due_s: float  # when to publish, seconds after the replay start
    stream: int  # index of the track (= the scene's stream)
    index: int  # file within the stream
    stamp_s: float  # time of the data: due_s for frames, the first sample for audio chunks
    samples: tuple[int, int] | None = None  # audio chunks: [start, stop) frames of the file


class Scheduler:
    """Merges the tracks' events into one time-ordered sequence (ties: lower stream index first)."""

    def __init__(self, tracks: Sequence[Track], config: TimelineConfig) -> None:
        if not tracks:
            raise ValueError('nothing to schedule: no tracks')
        self.tracks = tuple(tracks)
        self.config = config

    def events(self) -> Iterator[ReplayEvent]:
        generators = [self._track_events(stream, track) for stream, track in enumerate(self.tracks)]
        return heapq.merge(*generators, key=lambda event: (event.due_s, event.stream))

    def _track_events(self, stream: int, track: Track) -> Iterator[ReplayEvent]:
        if isinstance(track, FrameTrack):
            return self._frame_events(stream, track)
        return self._audio_events(stream, track)

    def _frame_events(self, stream: int, track: FrameTrack) -> Iterator[ReplayEvent]:
        for k in itertools.count():
            due = k / track.rate_hz
            if (not self.config.loop and k >= track.files) or not self.config.within(due):
                return
            yield ReplayEvent(due, stream, k % track.files, due)

    def _audio_events(self, stream: int, track: AudioTrack) -> Iterator[ReplayEvent]:
        clip_start_s = 0.0
        passes = itertools.count() if self.config.loop else range(1)
        for _ in passes:
            for index, (frames, rate) in enumerate(track.clips):
                chunk = max(1, round(self.config.audio_chunk_s * rate))
                for start in range(0, frames, chunk):
                    stamp = clip_start_s + start / rate
                    if not self.config.within(stamp):
                        return
                    stop = min(start + chunk, frames)
                    if self.config.duration_s:  # cut the chunk at the duration
                        stop = min(stop, start + math.ceil((self.config.duration_s - stamp) * rate - _EPS))
                    yield ReplayEvent(stamp + (stop - start) / rate, stream, index, stamp, (start, stop))
                clip_start_s += frames / rate


@dataclasses.dataclass(frozen=True)
class TimedItem(Generic[T]):
    due_s: float
    item: T
    pass_index: int = 0


def recorded_timeline(open_items: Callable[[], Iterable[tuple[int, T]]],
                      config: TimelineConfig) -> Iterator[TimedItem[T]]:
    """Recorded ``(time_ns, item)`` pairs at their offsets from the first one.

    ``open_items`` is called once per pass, so a file can be streamed instead of held in memory. A looped pass
    starts one mean message interval after the previous pass's last message, keeping a periodic topic's rhythm.
    """
    offset_s = 0.0
    passes = itertools.count() if config.loop else range(1)
    for pass_index in passes:
        first_ns = last_ns = None
        count = 0
        for time_ns, item in open_items():
            first_ns = time_ns if first_ns is None else first_ns
            last_ns = time_ns
            count += 1
            due = offset_s + max(0, time_ns - first_ns) * 1e-9
            if not config.within(due):
                return
            yield TimedItem(due, item, pass_index)
        if count == 0:
            return
        span_s = (last_ns - first_ns) * 1e-9
        offset_s += span_s + (span_s / (count - 1) if count > 1 and span_s > 0 else 1.0)
