"""Slow per-message work off the callback thread: one worker thread, fed only the freshest item.

A subscription callback `offer`s its message and returns at once. The worker takes the newest item whenever it is
free, at most `max_rate_hz` times a second; an item replaced before the worker took it is counted as dropped. So
under load nothing queues up, and each result is as fresh as the work allows.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Generic, Optional, TypeVar

from mm_llm_ros.core.scheduling import BackgroundLoop, LatestSlot, RateLimiter, RollingStats

logger = logging.getLogger(__name__)

T = TypeVar('T')


class LatestInput(Generic[T]):
    """One input fed by a callback: the freshest offered item (an unread one is replaced and counted as dropped), a
    rate limit, the offer rate and named counters.

    The one primitive of both workers: `LatestWorker` handles one input on its own thread, `EncoderWorker`
    (core/encoding_pipeline.py) batches several (its `Stream`s).
    """

    def __init__(self, max_rate_hz: float, clock=time.monotonic):
        self.slot: LatestSlot[T] = LatestSlot()
        self.limiter = RateLimiter(max_rate_hz, clock)
        self.inputs = RollingStats(clock=clock)
        self.wakeup: Optional[threading.Event] = None   # set on every offer: the consuming thread's event
        self._counters: collections.Counter = collections.Counter()
        self._counters_lock = threading.Lock()

    def offer(self, item: T) -> None:
        """Hand an item over (from a callback): never blocks, never raises."""
        self.slot.put(item)
        self.inputs.add()
        if self.wakeup is not None:
            self.wakeup.set()

    def take(self) -> Optional[T]:
        """The waiting item (None if there is none), starting the rate limit's next period."""
        item = self.slot.take()
        self.limiter.mark()
        return item

    def count(self, key: str, amount: int = 1) -> None:
        """Add to a named counter; safe from any thread."""
        with self._counters_lock:
            self._counters[key] += amount

    def counters(self) -> dict[str, int]:
        with self._counters_lock:
            return dict(self._counters)


class LatestWorker(LatestInput[T], BackgroundLoop):
    """Calls `handle(item)` on its own thread for the freshest offered item, at most `max_rate_hz` times a second.

    An exception from `handle` is logged and counted in `failures`, and the thread goes on with the next item.
    `count(key)` keeps named counters (results, rejected inputs by reason...) that `snapshot()` reports.
    """

    def __init__(self, name: str, handle: Callable[[T], None], max_rate_hz: float, clock=time.monotonic):
        BackgroundLoop.__init__(self, name)
        LatestInput.__init__(self, max_rate_hz, clock)
        self.wakeup = self._wakeup
        self.name = name
        self._handle = handle
        self.runs = RollingStats(clock=clock)   # values: seconds `handle` took
        self.failures = 0

    def run_pending(self) -> bool:
        """Handle the waiting item now, ignoring the rate limit; False when there was none (the loop's step)."""
        if not self.slot:
            return False
        item = self.take()
        started = time.perf_counter()
        try:
            self._handle(item)
        except Exception:  # one bad item must not end the stream
            self.failures += 1
            logger.exception('%s: handling an item failed', self.name)
        self.runs.add(time.perf_counter() - started)
        return True

    def snapshot(self) -> dict[str, Any]:
        """Counts, rates and handling latencies, for diagnostics."""
        counters = self.counters()
        return {'received': self.slot.received, 'dropped': self.slot.dropped, 'runs': self.runs.count,
                'failures': self.failures, 'input_rate_hz': self.inputs.rate_hz(), 'run_rate_hz': self.runs.rate_hz(),
                'latency_p50_s': self.runs.percentile(50), 'latency_p95_s': self.runs.percentile(95), **counters}

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.slot:
                # An offer between the check above and this wait leaves the event set, so none is missed.
                self._wakeup.wait()
                self._wakeup.clear()
            elif not self.limiter.ready():
                self._stop.wait(self.limiter.wait_s())   # newer items may still replace this one meanwhile
            else:
                self.run_pending()
