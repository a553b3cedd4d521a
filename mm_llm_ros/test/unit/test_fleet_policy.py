"""`fleet_policy`: the package's single-robot SROS2 policy rewritten for a fleet (the running fleet node is checked
against it in test_fleet_node.py)."""
from xml.etree import ElementTree

import pytest

from mm_llm_ros import fleet_policy

ROBOTS = ['robot1', 'site_a/robot2']


@pytest.fixture(scope='module')
def base():
    return ElementTree.parse(fleet_policy.package_policy()).getroot()


def _profiles(policy):
    return {(enclave.get('path'), profile.get('ns'), profile.get('node')): profile
            for enclave in policy.find('enclaves') for profile in enclave.iter('profile')}


def _names(profile):
    return [element.text.strip() for group in profile for element in group]


def test_robot_side_enclaves_are_repeated_per_robot_in_its_namespace(base):
    policy = fleet_policy.fleet_policy(base, ROBOTS)
    profiles = _profiles(policy)
    base_profiles = _profiles(base)
    for (path, ns, node), profile in base_profiles.items():
        if path == '/mm_llm_ros/llm_node':
            continue
        for robot in ROBOTS:
            copied = profiles[(path.replace('/mm_llm_ros/', f'/mm_llm_ros/{robot}/'), f'/{robot}', node)]
            assert _names(copied) == _names(profile)  # relative names now resolve in the robot's namespace
    assert not any(ns == '/' and node != 'llm_node' for _, ns, node in profiles)
    paths = [enclave.get('path') for enclave in policy.find('enclaves')]
    assert len(paths) == len(set(paths))


def test_llm_node_serves_each_robot_and_no_root_names(base):
    served = _names(_profiles(fleet_policy.fleet_policy(base, ROBOTS))[('/mm_llm_ros/llm_node', '/', 'llm_node')])
    original = _names(_profiles(base)[('/mm_llm_ros/llm_node', '/', 'llm_node')])
    relative = [n for n in original if not n.startswith(('/', '~'))]
    assert 'ask' in relative and 'mm_llm/embedding/camera' in relative
    assert not set(relative) & set(served)
    for robot in ROBOTS:
        assert {f'{robot}/{name}' for name in relative} <= set(served)
    assert {n for n in original if n.startswith(('/', '~'))} <= set(served)  # its own and absolute names stay


def test_the_command_writes_a_policy_and_refuses_bad_robots(tmp_path, capsys):
    out = tmp_path / 'fleet.policy.xml'
    assert fleet_policy.main(['--robots', *ROBOTS, '--out', str(out)]) == 0
    assert ElementTree.parse(out).getroot().get('version') == '0.2.0'
    assert fleet_policy.main(['--robots', 'robot1', 'robot1']) == 1
    assert "'robot1' is listed twice" in capsys.readouterr().err
    assert fleet_policy.main(['--robots', 'bad name']) == 1
    assert fleet_policy.main(['--robots', 'r1', '--policy', str(tmp_path / 'missing.xml')]) == 1
    assert 'cannot read' in capsys.readouterr().err
