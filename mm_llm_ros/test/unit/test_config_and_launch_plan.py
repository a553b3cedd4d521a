"""Parameter files, their documentation and the launch plan agree with the nodes' declarations."""
import ast
import itertools
import pathlib
import subprocess
import sys

import pytest
import yaml

from mm_llm_ros.core.params import NODE_PARAMS, SHARED_PARAMS
from mm_llm_ros.launch_plan import (LAUNCH_ARGUMENTS, SHIPPED_CONFIGS, NodeFailed, failure_reason, params_file_for,
                                   plan_nodes)

PACKAGE = pathlib.Path(__file__).resolve().parents[2]
REPO = PACKAGE.parent
CONFIGS = sorted((PACKAGE / 'config').glob('*.yaml'))
LAUNCH_FILE = PACKAGE / 'launch' / 'robot.launch.py'


def node_sections(path):
    data = yaml.safe_load(path.read_text())
    for key, section in data.items():
        yield key.removeprefix('/**/'), section['ros__parameters']


def test_the_three_presets_exist():
    assert {p.stem for p in CONFIGS} >= {'robot', 'demo', 'tiny'}


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_every_yaml_parameter_is_declared_by_its_node(path):
    for node, params in node_sections(path):
        if node == '/**':   # the shared section: parameters several nodes declare
            assert set(params) <= {p.name for p in SHARED_PARAMS}, f'{path.name}: {sorted(params)}'
            continue
        assert node in NODE_PARAMS, f'{path.name}: unknown node {node}'
        undeclared = set(params) - set(NODE_PARAMS[node])
        assert not undeclared, f'{path.name}: {node} does not declare {sorted(undeclared)}'
        for name, value in params.items():
            NODE_PARAMS[node][name].validate(value)
            assert type(value) is type(NODE_PARAMS[node][name].default) or (
                isinstance(value, (int, float)) and isinstance(NODE_PARAMS[node][name].default, float)), name


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_every_yaml_parameter_has_a_comment(path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith('    ') and not line.strip().startswith('#') and ':' in line:
            assert lines[i - 1].strip().startswith('#'), f'{path.name}:{i + 1} has no comment: {line.strip()}'


def test_every_declaration_is_documented():
    for node, params in NODE_PARAMS.items():
        for name, param in params.items():
            assert len(param.description) > 15, f'{node}.{name} has no real description'


def test_generated_files_are_up_to_date():
    result = subprocess.run([sys.executable, str(REPO / 'scripts' / 'param_docs.py'), '--check'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_table_lists_every_parameter():
    readme = (REPO / 'README.md').read_text()
    for params in NODE_PARAMS.values():
        for name in params:
            assert f'`{name}`' in readme, name


# ---- launch plan ---------------------------------------------------------------------------------
def resolved(**overrides):
    return {'params_file': str(PACKAGE / 'config' / 'robot.yaml')} | overrides


@pytest.mark.parametrize('single, camera, audio, lidar', list(itertools.product(['true', 'false'], repeat=4)))
def test_plan_resolves_for_every_sensor_combination(single, camera, audio, lidar):
    nodes = plan_nodes(resolved(single_process=single, use_camera=camera, use_audio=audio, use_lidar=lidar,
                                use_grounding='false'))
    names = [n.executable for n in nodes]
    assert names[-1] == 'llm_node' and names.count('llm_node') == 1
    sensors = [s for s, on in (('camera', camera), ('audio', audio), ('lidar', lidar)) if on == 'true']
    if single == 'true':
        assert names[:-1] == (['encoder'] if sensors else [])
        if sensors:
            overrides = nodes[0].parameters[-1]
            assert {k: overrides[k] for k in ('use_camera', 'use_audio', 'use_lidar')} == {
                f'use_{s}': s in sensors for s in ('camera', 'audio', 'lidar')}
    else:   # one encoder process per sensor, each named after it, with the other sensors switched off
        assert names[:-1] == ['encoder'] * len(sensors)
        assert [n.name for n in nodes[:-1]] == [f'{s}_encoder' for s in sensors]
        for node, sensor in zip(nodes, sensors):
            flags = {k: v for k, v in node.parameters[-1].items() if k.startswith('use_')}
            # its own switch turns its sensor on (a depth camera stays as the file says), the others all off
            expected = {f'use_{s}': s == sensor for s in ('camera', 'audio', 'lidar')}
            if sensor != 'camera':
                expected['use_depth_camera'] = False
            assert {k: flags[k] for k in expected} == expected and not any(  # other sensors of core/specs.py: off
                v for k, v in flags.items() if k not in expected), flags
    for node in nodes:
        for params in node.parameters:
            if isinstance(params, dict):
                assert set(params) <= set(NODE_PARAMS[node.executable]), node.executable


@pytest.mark.parametrize('single', ['true', 'false'])
@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_every_config_has_a_section_for_every_node_of_both_launch_modes(path, single):
    """single_process:=false with demo.yaml started encoders with no section (no checkpoint: FATAL). Every encoder
    process is configured by the one `encoder` section, in both launch modes."""
    sections = dict(node_sections(path))
    for node in plan_nodes({'params_file': str(path), 'single_process': single}):
        if node.executable == 'encoder':
            assert 'encoder' in sections, path.name
            if node.name != 'encoder':
                assert node.parameters[0] == sections['encoder']
        else:
            assert node.name in sections, f'{path.name} has no /**/{node.name} section (single_process:={single})'


def test_config_argument_selects_a_shipped_file_and_params_file_wins():
    config_dir = str(PACKAGE / 'config')
    assert params_file_for({'config': 'demo', 'params_file': ''}, config_dir) == str(PACKAGE / 'config' / 'demo.yaml')
    assert params_file_for({'config': 'robot'}, config_dir).endswith('robot.yaml')
    assert params_file_for({}, config_dir).endswith('robot.yaml')
    assert params_file_for({'config': 'demo', 'params_file': '/my.yaml'}, config_dir) == '/my.yaml'
    assert all((PACKAGE / 'config' / f).is_file() for f in SHIPPED_CONFIGS.values())
    with pytest.raises(ValueError, match='config: expected one of robot, demo'):
        params_file_for({'config': 'demos'}, config_dir)


def test_plan_applies_paths_device_and_remappings():
    nodes = plan_nodes(resolved(single_process='false', image_topic='/usb_cam/image_raw', points_topic='/velodyne_points',
                                device='cuda:1', imagebind_checkpoint='/m/imagebind_huge.pth', llama_dir='/m/llama',
                                adapter_checkpoint='/m/7B.pth', respawn='true', log_level='debug'))
    by_name = {n.name: n for n in nodes}
    assert ('camera/image_raw', '/usb_cam/image_raw') in by_name['camera_encoder'].remappings
    assert ('points', '/velodyne_points') in by_name['lidar_encoder'].remappings
    assert by_name['camera_encoder'].parameters[-1].items() >= {
        'device': 'cuda:1', 'model.checkpoint': '/m/imagebind_huge.pth', 'use_camera': True, 'use_audio': False,
        'use_lidar': False}.items()
    assert by_name['llm_node'].parameters[-1] == {'device': 'cuda:1', 'llm.backbone_path': '/m/llama',
                                                  'llm.adapter_checkpoint': '/m/7B.pth'}
    assert all(n.respawn and n.log_level == 'debug' for n in nodes)


def test_grounding_node_gets_the_sensor_remappings():
    nodes = plan_nodes(resolved(image_topic='/cam/image', audio_topic='/mic', points_topic='/lidar'))
    grounding = next(n for n in nodes if n.executable == 'grounding_node')
    assert {('camera/image_raw', '/cam/image'), ('audio', '/mic'), ('points', '/lidar')} <= set(grounding.remappings)
    assert [n.executable for n in plan_nodes(resolved(use_grounding='false'))] == ['encoder', 'llm_node']


def test_empty_path_arguments_keep_the_yaml_values():
    llm = plan_nodes(resolved())[-1]
    assert llm.parameters == (resolved()['params_file'],)


@pytest.mark.parametrize('single', ['true', 'false'])
def test_autostart_false_leaves_the_lifecycle_nodes_unconfigured(single):
    """Every node that holds a model (the encoders, llm_node) gets autostart: false; by default none is overridden,
    so the parameter (true unless a file says otherwise) decides."""
    for node in plan_nodes(resolved(single_process=single, autostart='false', use_grounding='false')):
        assert node.parameters[-1]['autostart'] is False, node.executable
        assert 'autostart' in NODE_PARAMS[node.executable]
    assert all('autostart' not in params for node in plan_nodes(resolved(single_process=single))
               for params in node.parameters[1:])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match='unknown launch argument'):
        plan_nodes(resolved(use_kamera='true'))
    with pytest.raises(ValueError, match='true or false'):
        plan_nodes(resolved(use_camera='maybe'))
    with pytest.raises(ValueError, match='autostart: expected true or false'):
        plan_nodes(resolved(autostart='yes please'))


def test_every_node_is_required_unless_respawned():
    assert all(n.required for n in plan_nodes(resolved()))
    assert not any(n.required for n in plan_nodes(resolved(respawn='true')))


@pytest.mark.parametrize('returncode, reason', [
    (0, None),
    (None, None),
    (1, 'llm_node exited with code 1 (its FATAL line above says why)'),
    (-9, 'llm_node was killed by SIGKILL'),
    (-11, 'llm_node was killed by SIGSEGV'),
    (-200, 'llm_node was killed by signal 200'),
])
def test_a_required_node_failing_is_reported_with_its_reason(returncode, reason):
    assert failure_reason('llm_node', returncode) == reason


def test_launch_file_fails_the_launch_through_the_plan():
    """robot.launch.py registers an exit handler for exactly the required nodes and raises NodeFailed (launch's
    only way to make `ros2 launch` exit non-zero) with failure_reason's text."""
    source = LAUNCH_FILE.read_text()
    tree = ast.parse(source)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert {'failure_reason', 'NodeFailed', 'OnProcessExit'} <= names
    raised = [n.exc for n in ast.walk(tree) if isinstance(n, ast.Raise)]
    assert any(isinstance(e, ast.Call) and getattr(e.func, 'id', '') == 'NodeFailed' for e in raised)
    assert 'spec.required' in source
    assert issubclass(NodeFailed, Exception)  # launch turns an Exception from a handler into return code 1


def test_launch_file_declares_exactly_the_plan_arguments():
    """Parse robot.launch.py without launch_ros: it must declare LAUNCH_ARGUMENTS and use plan_nodes."""
    tree = ast.parse(LAUNCH_FILE.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert {'LAUNCH_ARGUMENTS', 'plan_nodes', 'DeclareLaunchArgument', 'PushRosNamespace'} <= names
    assert all(a.description and a.name for a in LAUNCH_ARGUMENTS)
    nav2_style = {'namespace', 'params_file', 'use_camera', 'use_audio', 'use_lidar', 'device', 'single_process',
                  'log_level', 'respawn', 'image_topic', 'audio_topic', 'points_topic', 'imagebind_checkpoint',
                  'llama_dir', 'adapter_checkpoint', 'cache_index'}
    assert nav2_style <= {a.name for a in LAUNCH_ARGUMENTS}


def test_launch_file_runs_with_launch_ros_when_available():
    pytest.importorskip('launch_ros')
    from launch import LaunchContext
    import importlib.util
    spec = importlib.util.spec_from_file_location('robot_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    context = LaunchContext()
    for entity in description.entities:
        entity.visit(context)
    assert context.launch_configurations['single_process'] == 'true'


def test_a_renamed_parameter_still_works_under_its_old_name_with_a_warning(caplog):
    from mm_llm_ros.core.params import node_params
    sections = {'**': {'lidar.min_range_m': 2.5},
                'grounding_node': {'geometry.max_range_m': 50.0, 'audio.window_s': 3.0, 'audio.top_k': 3}}
    with caplog.at_level('WARNING'):
        values = node_params(sections, 'grounding_node')
    assert values['lidar.max_range_m'] == 50.0 and values['audio_events.window_s'] == 3.0
    assert values['lidar.min_range_m'] == 2.5  # the shared section
    assert 'geometry.max_range_m' not in values and 'audio.window_s' not in values
    assert "'geometry.max_range_m' is deprecated: use 'lidar.max_range_m'" in caplog.text
    assert values['audio_events.top_k'] == 3 and "'audio.top_k' is deprecated" in caplog.text


def test_an_old_name_set_to_its_old_default_still_replaces_the_new_default():
    """geometry.max_range_m defaulted to 60 m, lidar.max_range_m defaults to 80 m: a user's 60 must stay 60."""
    from mm_llm_ros.core.params import NODE_PARAMS, node_params
    assert NODE_PARAMS['grounding_node']['lidar.max_range_m'].default != 60.0
    values = node_params({'grounding_node': {'geometry.max_range_m': 60.0}}, 'grounding_node')
    assert values['lidar.max_range_m'] == 60.0
    default = NODE_PARAMS['grounding_node']['lidar.max_range_m'].default
    assert node_params({}, 'grounding_node')['lidar.max_range_m'] == default
    with pytest.raises(ValueError, match="'geometry.max_range_m' must be a float"):
        node_params({'grounding_node': {'geometry.max_range_m': 'far'}}, 'grounding_node')


def test_a_failing_node_makes_the_launch_raise_when_launch_is_available():
    """With launch installed (a robot, not CI): the registered exit handler raises NodeFailed for exit code 1."""
    pytest.importorskip('launch_ros')
    import importlib.util
    from launch.events.process import ProcessExited
    spec = importlib.util.spec_from_file_location('robot_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    on_exit = module._shutdown_on_failure('encoder')
    event = ProcessExited(action=None, name='encoder-1', cmd=['encoder'], cwd=None, env=None, pid=1, returncode=1)
    with pytest.raises(NodeFailed, match='encoder exited with code 1'):
        on_exit(event, None)
    assert on_exit(ProcessExited(action=None, name='encoder-1', cmd=['encoder'], cwd=None, env=None, pid=1,
                                 returncode=0), None) is None


def test_fleet_roles_split_the_graph_between_robot_and_server():
    """Fleet mode's split deployment: the robot runs the encoders and grounding (under its namespace, pushed by the
    launch file), the GPU server runs llm_node alone, serving the robots listed in `robots`."""
    fleet = str(PACKAGE / 'config' / 'fleet.yaml')
    robot = plan_nodes(resolved(params_file=fleet, role='robot', namespace='robot1'))
    assert [n.executable for n in robot] == ['encoder', 'grounding_node']
    split = plan_nodes(resolved(params_file=fleet, role='robot', single_process='false'))
    assert 'llm_node' not in [n.executable for n in split] and len(split) > 2
    server = plan_nodes(resolved(params_file=fleet, role='server', robots='[robot1, robot2, site_b/robot3]'))
    assert [n.executable for n in server] == ['llm_node']
    assert server[0].parameters == (fleet, {'robots': ['robot1', 'robot2', 'site_b/robot3']})
    # Without `robots`, the file's list is used: fleet.yaml serves robot1 and robot2, batched.
    assert plan_nodes(resolved(params_file=fleet, role='server'))[0].parameters == (fleet,)
    llm = dict(node_sections(PACKAGE / 'config' / 'fleet.yaml'))['llm_node']
    assert llm['robots'] == ['robot1', 'robot2'] and llm['generation.max_batch'] > 1
    assert [n.executable for n in plan_nodes(resolved())] == ['encoder', 'grounding_node', 'llm_node']  # role all


@pytest.mark.parametrize('args, reason', [
    ({'role': 'gpu'}, "role: expected one of all, robot, server, got 'gpu'"),
    ({'role': 'robot', 'robots': 'robot1'}, 'robots: only for role:=server'),
    ({'robots': 'robot1'}, 'robots: only for role:=server'),
    ({'role': 'server', 'robots': 'robot1,robot1'}, "robots: 'robot1' is listed twice"),
    ({'role': 'server', 'robots': 'robot-1'}, "robots: 'robot-1' is not a robot namespace"),
])
def test_bad_fleet_arguments_are_refused(args, reason):
    with pytest.raises(ValueError) as error:
        plan_nodes(resolved(**args))
    assert reason in str(error.value)


def test_the_robots_argument_reads_lists_as_written_on_a_command_line():
    from mm_llm_ros.launch_plan import parse_robots
    assert parse_robots('') == parse_robots('[]') == ()
    assert parse_robots('robot1,robot2') == parse_robots('[robot1, robot2]') == parse_robots("['robot1', 'robot2']") \
        == parse_robots('robot1 robot2') == ('robot1', 'robot2')
