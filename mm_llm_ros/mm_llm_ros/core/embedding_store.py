"""The latest embedding per modality, with the stamp of its source sensor message."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np


@dataclass(frozen=True)
class StoredEmbedding:
    modality: str
    vector: np.ndarray          # (D,) float32
    stamp_ns: int               # source sensor message stamp
    received_monotonic: float   # local arrival time; freshness is judged on this clock
    model: str
    source_topic: str


class EmbeddingStore:
    """Thread-safe latest-value store. Freshness uses local arrival time, so a sensor with a skewed or simulated
    clock is still judged correctly; the source stamp is carried through for the answer's provenance."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[str, StoredEmbedding] = {}
        self._generation = 0  # bumps on every update: "new data since last description?"

    def update(self, modality: str, vector: np.ndarray, stamp_ns: int, model: str = '', source_topic: str = '') -> None:
        entry = StoredEmbedding(modality, np.asarray(vector, dtype=np.float32), int(stamp_ns), self._clock(),
                                model, source_topic)
        with self._lock:
            self._latest[modality] = entry
            self._generation += 1

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    def age_s(self, modality: str) -> Optional[float]:
        with self._lock:
            entry = self._latest.get(modality)
        return None if entry is None else self._clock() - entry.received_monotonic

    def ages(self) -> dict[str, float]:
        now = self._clock()
        with self._lock:
            return {m: now - e.received_monotonic for m, e in self._latest.items()}

    def select(self, modalities: Iterable[str], max_age_s: float) -> tuple[list[StoredEmbedding], list[str]]:
        """Entries of the given modalities no older than max_age_s, and the names that were stale or missing."""
        now = self._clock()
        fresh, missing = [], []
        with self._lock:
            for modality in modalities:
                entry = self._latest.get(modality)
                if entry is not None and now - entry.received_monotonic <= max_age_s:
                    fresh.append(entry)
                else:
                    missing.append(modality)
        return fresh, missing
