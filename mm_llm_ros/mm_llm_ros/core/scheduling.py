"""Non-blocking hand-off from sensor callbacks to a worker: keep only the freshest item, count what is dropped."""
from __future__ import annotations

import collections
import threading
import time
from typing import Generic, Optional, TypeVar

T = TypeVar('T')


class LatestSlot(Generic[T]):
    """A one-item mailbox. `put` never blocks; an unconsumed older item is replaced and counted as dropped."""

    def __init__(self):
        self._lock = threading.Lock()
        self._item: Optional[T] = None
        self._has_item = False
        self.received = 0
        self.dropped = 0

    def put(self, item: T) -> bool:
        """Store item; return True if it replaced an item the worker never took."""
        with self._lock:
            replaced = self._has_item
            self._item, self._has_item = item, True
            self.received += 1
            self.dropped += int(replaced)
            return replaced

    def take(self) -> Optional[T]:
        with self._lock:
            item, self._item, self._has_item = self._item, None, False
            return item

    def __bool__(self) -> bool:
        with self._lock:
            return self._has_item


class RateLimiter:
    """Allows an event at most every 1/max_hz seconds (max_hz <= 0 means unlimited)."""

    def __init__(self, max_hz: float, clock=time.monotonic):
        self._period = 1.0 / max_hz if max_hz > 0 else 0.0
        self._clock = clock
        self._last = -float('inf')

    def ready(self) -> bool:
        return self._clock() - self._last >= self._period

    def wait_s(self) -> float:
        return max(0.0, self._period - (self._clock() - self._last))

    def mark(self) -> None:
        self._last = self._clock()


class RollingStats:
    """Bounded window of samples (latencies, durations) with rate and percentile summaries for diagnostics."""

    def __init__(self, window: int = 200, clock=time.monotonic):
        self._clock = clock
        self._values: collections.deque = collections.deque(maxlen=window)
        self._times: collections.deque = collections.deque(maxlen=window)
        self._lock = threading.Lock()
        self.count = 0

    def add(self, value: float = 0.0) -> None:
        with self._lock:
            self._values.append(float(value))
            self._times.append(self._clock())
            self.count += 1

    def rate_hz(self, horizon_s: float = 10.0) -> float:
        now = self._clock()
        with self._lock:
            recent = [t for t in self._times if now - t <= horizon_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)

    def percentile(self, q: float) -> float:
        with self._lock:
            values = sorted(self._values)
        if not values:
            return float('nan')
        index = min(len(values) - 1, max(0, round(q / 100.0 * (len(values) - 1))))
        return values[index]


class BackgroundLoop:
    """A daemon thread running `_loop()` until `stop()`; `_wakeup` interrupts its waits early."""

    def __init__(self, name: str):
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the loop to end after the work in hand and wait for it (at most `timeout_s`)."""
        self._stop.set()
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        raise NotImplementedError
