"""Fixtures for integration tests: node processes and a test client over DDS, loopback only."""
import os
import pathlib
import shutil
import subprocess

import pytest

from mm_llm_ros.node_processes import only_loopback
from mm_llm_ros.ros.qos import SENSOR_QOS
from ros_harness import NodeGraph, TestNode

HERE = pathlib.Path(__file__).resolve().parent
CONFIG_DIR = HERE.parents[1] / 'config'


def pytest_collection_modifyitems(items):
    for item in items:
        if pathlib.Path(str(item.fspath)).parent == HERE:
            item.add_marker(pytest.mark.ros)


@pytest.fixture(scope='session', autouse=True)
def isolated_network():
    """Refuse to run ROS processes unless every packet stays on loopback."""
    if not only_loopback():
        pytest.skip('integration tests run only inside the loopback-only namespace: use `make test` '
                    '(or scripts/netns.sh python -m pytest)')
    if os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE') != 'LOCALHOST':
        pytest.skip('ROS_AUTOMATIC_DISCOVERY_RANGE must be LOCALHOST')
    yield
    _clean_shared_memory()


def _clean_shared_memory() -> None:
    """Remove Fast DDS shared-memory segments left by killed processes (live ones are kept)."""
    fastdds = shutil.which('fastdds')
    if fastdds:
        subprocess.run([fastdds, 'shm', 'clean'], capture_output=True, timeout=30, check=False)


@pytest.fixture(scope='module')
def test_node(isolated_network):
    """A DDS participant per test module: one whose transport broke under load takes down one module, not the rest
    of the suite (CI once saw the test process stop receiving from new nodes for all later modules)."""
    node = TestNode()
    yield node
    node.close()


@pytest.fixture
def node_graph(request, tmp_path):
    graph = NodeGraph(tmp_path)
    yield graph
    graph.stop_all()
    failed = any(getattr(request.node, f'rep_{phase}', None) is not None
                 and getattr(request.node, f'rep_{phase}').failed for phase in ('setup', 'call'))
    if failed:
        print(graph.logs())  # lands in the report's captured teardown output
        print(machine_state())
    _clean_shared_memory()


def machine_state() -> str:
    """Load, memory and Fast DDS shared memory when a test failed: a timeout on a starved machine reads the same
    as one on a broken transport unless the report says which."""
    load = ' '.join(f'{value:.1f}' for value in os.getloadavg())
    meminfo = dict(line.split(':', 1) for line in pathlib.Path('/proc/meminfo').read_text().splitlines())
    shm = shutil.disk_usage('/dev/shm')
    ports = sorted(p.name for p in pathlib.Path('/dev/shm').glob('fastdds_port*') if not p.name.endswith('_el'))
    return (f'----- machine: load {load} on {os.cpu_count()} cpus; MemAvailable {meminfo["MemAvailable"].strip()}; '
            f'/dev/shm {shm.used / 2**20:.0f} MiB used; Fast DDS ports {ports}')


@pytest.fixture(scope='session')
def config_dir() -> pathlib.Path:
    return CONFIG_DIR


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f'rep_{report.when}', report)


@pytest.fixture
def collect(test_node):
    """test_node.collect, with the subscriptions removed after the test."""
    made = []

    def subscribe(msg_type, topic, qos=SENSOR_QOS):
        made.append(test_node.collect(msg_type, topic, qos))
        return made[-1]
    yield subscribe
    for collector in made:
        collector.close()


@pytest.fixture
def llm_node(node_graph, config_dir):
    """Starts llm_node on the tiny model with the given parameters and waits until it serves."""
    def start(**params):
        process = node_graph.start('llm_node', params_files=[config_dir / 'tiny.yaml'], params=params)
        process.wait_for_log('serving', timeout_s=60)
        return process
    return start
