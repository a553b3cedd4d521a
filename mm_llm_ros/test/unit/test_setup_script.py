"""scripts/setup.sh: bad use gets one clear line (no stack trace), and a second run does nothing slow."""
import os
import pathlib
import shutil
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
SETUP = REPO / 'scripts' / 'setup.sh'


def run_setup(tmp_path, env_overrides, timeout=120, wrap=()):
    env = dict(os.environ, MM_LLM_VENV=str(tmp_path / 'venv'), MM_LLM_SETUP_LOGS=str(tmp_path / 'logs'),
               **env_overrides)
    return subprocess.run([*wrap, 'bash', str(SETUP)], capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_clear_error(done, *phrases):
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith('setup: error:'), done.stderr
    assert 'Traceback' not in done.stdout + done.stderr
    for phrase in phrases:
        assert phrase in errors[0]


def test_wrong_python_version(tmp_path):
    fake = tmp_path / 'python3.8'
    fake.write_text('#!/bin/sh\necho 3.8\n')
    fake.chmod(0o755)
    assert_one_clear_error(run_setup(tmp_path, {'PYTHON': str(fake)}), 'Python 3.8 is not supported', '3.10-3.13')


def test_missing_python(tmp_path):
    assert_one_clear_error(run_setup(tmp_path, {'PYTHON': str(tmp_path / 'nope')}), 'not found')


def test_missing_compiler(tmp_path):
    """A PATH with every tool except the C++ compiler."""
    shims = tmp_path / 'bin'
    shims.mkdir()
    hidden = {'c++', 'g++', 'x86_64-linux-gnu-g++', 'aarch64-linux-gnu-g++'}
    for directory in ('/usr/local/bin', '/usr/bin', '/bin', str(pathlib.Path(shutil.which('python3')).parent)):
        for tool in pathlib.Path(directory).iterdir():
            target = shims / tool.name
            if tool.name not in hidden and not target.exists() and os.access(tool, os.X_OK):
                target.symlink_to(tool)
    done = run_setup(tmp_path, {'PATH': str(shims)})
    assert_one_clear_error(done, 'C++ compiler', 'build-essential')


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which('unshare'), reason='needs a private network namespace')
def test_no_network_to_the_package_index(tmp_path):
    """In a namespace without any network, pip cannot reach the index: one line, pointing at the log."""
    done = run_setup(tmp_path, {}, timeout=300, wrap=('unshare', '--net'))
    assert_one_clear_error(done, 'cannot reach the Python package index', str(tmp_path / 'logs' / 'pip.log'))


def test_second_run_is_a_no_op():
    """The workspace this suite runs in was set up by the same command; running it again only checks stamps. A first
    run brings them up to date where package files were edited since (a developer's workspace: it rebuilds then);
    the run after it must do nothing."""
    if not (REPO / '.venv' / '.mm_llm_ros_deps').exists():
        pytest.skip('the suite is not running in a workspace set up by scripts/setup.sh')
    first = subprocess.run(['bash', str(SETUP)], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    started = time.monotonic()
    done = subprocess.run(['bash', str(SETUP)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'setup: ready: source install/setup.bash'
    assert time.monotonic() - started < 15
