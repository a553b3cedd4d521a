"""Shared pytest fixtures: source-tree imports, the sample data folder and reproducible seeds."""
import os
import pathlib
import sys

import pytest

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_ROOT.parent
FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'

# Unit tests exercise the source tree, not a stale install/ copy.
if str(PACKAGE_ROOT) not in sys.path:
    sys.path.insert(0, str(PACKAGE_ROOT))


def shared_data_dir() -> pathlib.Path:
    """The real sample data (../shared/data next to the repository, or $MM_LLM_SHARED_DATA)."""
    return pathlib.Path(os.environ.get('MM_LLM_SHARED_DATA', REPO_ROOT.parent / 'shared' / 'data'))


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
    path = shared_data_dir()
    if not (path / 'MANIFEST.md').is_file():
        pytest.skip(f'sample data not found at {path}')
    return path


@pytest.fixture(scope='session')
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture(autouse=True)
def _seed_everything():
    import random

    import numpy as np
    random.seed(0)
    np.random.seed(0)
    try:
        import torch
        torch.manual_seed(0)
    except ImportError:
        pass
