"""Load a script from `bench/` as a module for its tests (the bench folder is not a package)."""
from __future__ import annotations

import contextlib
import importlib.util
import pathlib
import sys
from collections.abc import Iterator
from types import ModuleType

BENCH = pathlib.Path(__file__).resolve().parents[3] / 'bench'


@contextlib.contextmanager
def bench_module(name: str) -> Iterator[ModuleType]:
    """`bench/<name>.py` imported as `bench_<name>` for the duration of the block."""
    spec = importlib.util.spec_from_file_location(f'bench_{name}', BENCH / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]
