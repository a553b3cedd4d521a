"""The latest input per modality (an embedding vector, or perception-context text), with its source stamp."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import numpy as np


@dataclass(frozen=True)
class StoredInput:
    modality: str               # vision, audio, depth, point, or a context kind (ocr, audio_events, geometry)
    value: Union[np.ndarray, str]  # (D,) float32 embedding, or context text
    stamp_ns: int               # source sensor message stamp
    received_monotonic: float   # local arrival time; freshness is judged on this clock
    model: str
    source_topic: str
    # What else the input's message carried, read once on arrival: for a perception context, its scene entities
    # (`core/grounding/entities.py`), so a description's entities come from exactly the contexts it used.
    payload: Any = None


class ModalityStore:
    """Thread-safe latest-value store. Freshness uses local arrival time, so a sensor with a skewed or simulated
    clock is still judged correctly; the source stamp is carried through for the answer's provenance."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[str, StoredInput] = {}
        self._generation = 0  # bumps on every update: "new data since last description?"

    def update(self, modality: str, value: Union[np.ndarray, str], stamp_ns: int, model: str = '',
               source_topic: str = '', payload: Any = None) -> None:
        if not isinstance(value, str):
            value = np.asarray(value, dtype=np.float32)
        entry = StoredInput(modality, value, int(stamp_ns), self._clock(), model, source_topic, payload)
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

    def now(self) -> float:
        """The store's clock (arrival times and ages are measured on it)."""
        return self._clock()

    def ages(self) -> dict[str, float]:
        now = self._clock()
        with self._lock:
            return {m: now - e.received_monotonic for m, e in self._latest.items()}

    def select(self, modalities: Iterable[str], max_age_s: float) -> tuple[list[StoredInput], list[str]]:
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
