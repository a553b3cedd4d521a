"""Shared pytest fixtures: source-tree imports, the sample data folder and reproducible seeds."""
import os
import pathlib
import shutil
import sys

import pytest

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_ROOT.parent
FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'

# Unit tests exercise the source tree, not a stale install/ copy.
if str(PACKAGE_ROOT) not in sys.path:
    sys.path.insert(0, str(PACKAGE_ROOT))


def pytest_configure(config):
    """Re-execute pytest inside a loopback-only network namespace so no DDS packet can leave this machine.

    `make test` already runs inside one (scripts/netns.sh); this covers a plain `pytest` invocation as root.
    """
    netns = REPO_ROOT / 'scripts' / 'netns.sh'
    if (os.environ.get('MM_LLM_IN_NETNS') == '1' or os.environ.get('MM_LLM_NO_NETNS') == '1'
            or os.geteuid() != 0 or not shutil.which('unshare') or not netns.is_file()
            or not (REPO_ROOT / 'install' / 'setup.bash').is_file()):
        return
    capture = config.pluginmanager.getplugin('capturemanager')
    if capture is not None:
        capture.stop_global_capturing()
    os.chdir(config.invocation_params.dir)
    os.execv(str(netns), [str(netns), sys.executable, '-m', 'pytest', *config.invocation_params.args])


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
