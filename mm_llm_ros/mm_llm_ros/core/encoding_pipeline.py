"""From sensor callbacks to embeddings without ever blocking a callback.

Each input stream owns a one-item `LatestSlot`: a callback only `offer`s its message and returns. One worker
thread takes the freshest item of every stream that is due (at most `max_rate_hz` each), prepares it (decode +
preprocess, errors counted per reason), encodes all prepared inputs in ONE ImageBind forward (inputs of the same
modality are batched), and hands each embedding to `publish`. Nothing queues up: under overload older frames are
replaced and counted as drops.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch

from mm_llm_ros.core.latest_worker import LatestInput
from mm_llm_ros.core.scheduling import BackgroundLoop, RollingStats

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A preprocessed, unbatched model input with the provenance of its sensor message."""
    modality: str
    tensor: torch.Tensor
    stamp_ns: int
    frame_id: str


class InputRejected(ValueError):
    """A message that cannot be encoded; `reason` is a short counter key (e.g. 'size_mismatch')."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class BatchEncoder(Protocol):
    def encode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]: ...


class Stream(LatestInput):
    """One input (a camera, a microphone, a lidar) feeding the worker: a `LatestInput` with what encoding it took.

    `prepare(item)` turns what the callback offered into a `Prepared` input, returns None when there is nothing to
    encode yet (e.g. too little audio), or raises `InputRejected`/`ValueError` for bad input.
    """

    def __init__(self, name: str, source_topic: str, prepare: Callable[[Any], Optional[Prepared]],
                 max_rate_hz: float, clock=time.monotonic):
        super().__init__(max_rate_hz, clock)
        self.name = name
        self.source_topic = source_topic
        self.prepare = prepare
        self.encodes = RollingStats(clock=clock)     # values: latency from sensor stamp to publish (s)
        self.preprocess_s = RollingStats(clock=clock)
        self.dropped_inactive = 0  # arrived while the node was inactive (lifecycle): never decoded nor encoded

    def reject(self, reason: str) -> None:
        self.count(reason)

    def drop_inactive(self) -> None:
        with self._counters_lock:
            self.dropped_inactive += 1

    def discard_pending(self) -> None:
        """Forget the item not yet encoded (counted as dropped while inactive), so that a paused node does not
        encode a stale message when it resumes."""
        if self.slot:
            self.slot.take()
            self.drop_inactive()

    def snapshot(self) -> dict[str, Any]:
        rejected = self.counters()   # the named counters are the rejection reasons
        with self._counters_lock:
            dropped_inactive = self.dropped_inactive
        return {'received': self.slot.received, 'dropped': self.slot.dropped, 'encoded': self.encodes.count,
                'dropped_inactive': dropped_inactive,
                'rejected': sum(rejected.values()), **{f'rejected_{k}': v for k, v in rejected.items()},
                'input_rate_hz': self.inputs.rate_hz(), 'encode_rate_hz': self.encodes.rate_hz(),
                'latency_p50_s': self.encodes.percentile(50), 'latency_p95_s': self.encodes.percentile(95),
                'preprocess_p50_s': self.preprocess_s.percentile(50)}


PublishFn = Callable[[Stream, Prepared, np.ndarray], None]


class EncoderWorker(BackgroundLoop):
    """The single thread that prepares, batches, encodes and publishes for a set of streams."""

    def __init__(self, encoder: BatchEncoder, streams: Sequence[Stream], publish: PublishFn,
                 now_ns: Callable[[], int] = time.time_ns, on_rejected: Optional[Callable[[Stream, str], None]] = None):
        super().__init__('encoder-worker')
        self.encoder = encoder
        self.streams = list(streams)
        self.publish = publish
        self.now_ns = now_ns
        self.on_rejected = on_rejected or (lambda stream, message: None)
        self.model_s = RollingStats()
        self.failures = 0
        for stream in self.streams:
            stream.wakeup = self._wakeup

    def _loop(self) -> None:
        while not self._stop.is_set():
            due = [s for s in self.streams if s.slot and s.limiter.ready()]
            if not due:
                waits = [s.limiter.wait_s() for s in self.streams if s.slot]
                self._wakeup.wait(min(waits) if waits else 0.5)
                self._wakeup.clear()
                continue
            try:
                self.step(due)
            except Exception:  # never let one bad batch kill the worker
                self.failures += 1
                logger.exception('encoding failed')

    def step(self, streams: Sequence[Stream]) -> int:
        """Prepare, encode and publish the pending item of each stream; returns how many were published."""
        prepared: list[tuple[Stream, Prepared]] = []
        for stream in streams:
            item = stream.take()
            started = time.perf_counter()
            try:
                result = stream.prepare(item)
            except InputRejected as exc:
                self.reject(stream, exc.reason, str(exc))
                continue
            except (ValueError, TypeError, OverflowError, MemoryError) as exc:
                reason = getattr(exc, 'reason', type(exc).__name__)
                self.reject(stream, getattr(reason, 'value', reason), str(exc))
                continue
            stream.preprocess_s.add(time.perf_counter() - started)
            if result is not None:
                prepared.append((stream, result))
        if not prepared:
            return 0
        by_modality: dict[str, list[tuple[Stream, Prepared]]] = collections.defaultdict(list)
        for stream, item in prepared:
            by_modality[item.modality].append((stream, item))
        batch = {m: torch.stack([p.tensor for _, p in items]) for m, items in by_modality.items()}
        started = time.perf_counter()
        embeddings = self.encoder.encode(batch)
        self.model_s.add(time.perf_counter() - started)
        for modality, items in by_modality.items():
            for row, (stream, item) in enumerate(items):
                self.publish(stream, item, embeddings[modality][row])
                stream.encodes.add(max(0.0, (self.now_ns() - item.stamp_ns) / 1e9))
        return len(prepared)

    def reject(self, stream: Stream, reason: str, message: str) -> None:
        stream.reject(str(reason))
        self.on_rejected(stream, f'{reason}: {message}')
