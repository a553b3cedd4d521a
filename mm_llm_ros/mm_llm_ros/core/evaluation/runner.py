"""Run predictors over benchmark items with a resumable prediction cache, and pick subsets of items."""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from tqdm import tqdm

from .datasets import EvalItem

logger = logging.getLogger(__name__)


class SelectionError(ValueError):
    """A --subset or --limit that selects nothing or names unknown categories."""


class PredictionError(RuntimeError):
    """A predictor failed on an item (earlier predictions stay cached)."""


@runtime_checkable
class Predictor(Protocol):
    """Anything that answers one benchmark item with free text (the model stack plugs in here)."""

    def predict(self, item: EvalItem) -> str: ...


class FirstOptionPredictor:
    """Deterministic baseline: always answers the first option letter ('A'); for tests and smoke runs."""

    def predict(self, item: EvalItem) -> str:
        if not item.options:
            raise PredictionError(f'item {item.id} has no options; first-option only fits multiple choice')
        return next(iter(item.options))


class ConstantPredictor:
    """Deterministic baseline that always gives the same answer (e.g. 'Yes')."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def predict(self, item: EvalItem) -> str:
        return self.answer


BUILTIN_PREDICTORS: dict[str, Callable[[], Predictor]] = {
    'first-option': FirstOptionPredictor,
    'always-yes': lambda: ConstantPredictor('Yes'),
    'always-no': lambda: ConstantPredictor('No'),
}


# --------------------------------------------------------------------------------------------------- selection


def select_items(items: Sequence[EvalItem], *, subset: Iterable[str] | None = None,
                 limit: int | None = None) -> list[EvalItem]:
    """Keep the items of the `subset` categories, then the first `limit` items, rounded up to whole groups.

    Groups (an MME image's question pair, an MMBench question's rotations) are never split, so every selection
    stays scorable.
    """
    selected = list(items)
    known = sorted({item.category for item in items})
    # 'OCR,count' names two subtasks, unless a category itself contains the comma.
    wanted = [name for entry in (subset or ()) for name in ([entry] if entry in known else entry.split(',')) if name]
    if wanted:
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise SelectionError(f"unknown subset {', '.join(unknown)}; categories are: {', '.join(known)}")
        selected = [item for item in selected if item.category in wanted]
    if limit is not None:
        if limit < 1:
            raise SelectionError(f'limit must be a positive number of items, got {limit}')
        sizes = Counter(item.group for item in selected)
        groups: set[str] = set()
        count = 0
        for item in selected:
            if count >= limit:
                break
            if item.group not in groups:
                groups.add(item.group)
                count += sizes[item.group]
        selected = [item for item in selected if item.group in groups]
    if not selected:
        raise SelectionError('the selection contains no items')
    return selected


# --------------------------------------------------------------------------------------------------- cache


class PredictionCache:
    """Append-only JSONL cache of raw predictions keyed by (benchmark, config, item id).

    Each record also stores the configuration's `fingerprint` (e.g. a hash of its params file); records whose
    fingerprint differs from the current one are ignored, so editing a config never reuses stale answers. A torn
    last line from an interrupted run is skipped.
    """

    def __init__(self, path: str | Path, benchmark: str) -> None:
        self.path = Path(path)
        self.benchmark = benchmark
        self._records: dict[tuple[str, str], dict] = {}
        # A torn last line must be terminated before appending, or the next record would be glued onto it.
        self._terminate_last_line = False
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        text = self.path.read_text(encoding='utf-8')
        self._terminate_last_line = bool(text) and not text.endswith('\n')
        for line_no, line in enumerate(text.splitlines(), start=1):
            try:
                record = json.loads(line)
                key = (record['config'], record['id'])
                keep = record['benchmark'] == self.benchmark and isinstance(record['prediction'], str)
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning('%s:%d: skipping unreadable cache line', self.path, line_no)
                continue
            if keep:
                self._records[key] = record

    def get(self, config: str, item_id: str, fingerprint: str = '') -> str | None:
        record = self._records.get((config, item_id))
        if record is None or record.get('fingerprint', '') != fingerprint:
            return None
        return record['prediction']

    def put(self, config: str, item_id: str, prediction: str, *, fingerprint: str = '',
            seconds: float | None = None) -> None:
        record = {'benchmark': self.benchmark, 'config': config, 'id': item_id, 'fingerprint': fingerprint,
                  'prediction': prediction, 'seconds': seconds}
        self._records[(config, item_id)] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One line per prediction, flushed at once: a crash loses at most the item in flight.
        with self.path.open('a', encoding='utf-8') as handle:
            if self._terminate_last_line:
                handle.write('\n')
                self._terminate_last_line = False
            handle.write(json.dumps(record, ensure_ascii=False) + '\n')


# --------------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class PredictionRun:
    """The raw predictions of one configuration (item id -> text) and how many were computed now."""

    config: str
    predictions: dict[str, str]
    new: int
    cached: int
    seconds: float

    @property
    def seconds_per_item(self) -> float:
        return self.seconds / self.new if self.new else 0.0


def run_predictions(predictor: Predictor, items: Sequence[EvalItem], *, config: str, cache: PredictionCache,
                    fingerprint: str = '', progress: bool = True) -> PredictionRun:
    """Answer every item with `predictor`, reusing cached answers of `config` and caching each new one."""
    predictions: dict[str, str] = {}
    todo = []
    for item in items:
        cached = cache.get(config, item.id, fingerprint)
        if cached is None:
            todo.append(item)
        else:
            predictions[item.id] = cached
    if predictions:
        logger.info('%s: %d of %d predictions reused from %s', config, len(predictions), len(items), cache.path)
    started = time.perf_counter()
    for item in tqdm(todo, desc=config, unit='item', disable=not progress or not todo, mininterval=1.0):
        item_started = time.perf_counter()
        try:
            answer = predictor.predict(item)
        except Exception as exc:
            raise PredictionError(f'config {config!r} failed on item {item.id}: {exc}') from exc
        if not isinstance(answer, str):
            raise PredictionError(f'config {config!r} returned {type(answer).__name__} for item {item.id}, '
                                  'expected str')
        cache.put(config, item.id, answer, fingerprint=fingerprint, seconds=time.perf_counter() - item_started)
        predictions[item.id] = answer
    return PredictionRun(config=config, predictions=predictions, new=len(todo), cached=len(items) - len(todo),
                         seconds=time.perf_counter() - started)


def run_configs(predictors: Mapping[str, Predictor], items: Sequence[EvalItem], *, cache: PredictionCache,
                fingerprints: Mapping[str, str] | None = None, progress: bool = True) -> dict[str, PredictionRun]:
    """Run several configurations on the same items (for side-by-side comparison), one after the other."""
    fingerprints = fingerprints or {}
    return {name: run_predictions(predictor, items, config=name, cache=cache, fingerprint=fingerprints.get(name, ''),
                                  progress=progress)
            for name, predictor in predictors.items()}
