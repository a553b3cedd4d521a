"""What robot.launch.py starts, as plain data (no launch/launch_ros imports).

`launch/robot.launch.py` declares `LAUNCH_ARGUMENTS` and turns `plan_nodes()` into launch_ros Node actions; the
test suite starts the very same executables, parameter files, overrides and remappings as processes, so CI (which
has no `ros2 launch`) exercises exactly what a robot runs.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Mapping, Optional

from mm_llm_ros.core.fleet import robot_namespaces
from mm_llm_ros.core.specs import CAMERA_INFO_TOPIC, LAUNCH_SWITCHES, SENSOR_SPECS

def _sensors(switch: str) -> tuple:
    return tuple(s for s in SENSOR_SPECS if s.launch_switch == switch)


def _primary(switch: str) -> tuple:
    """The sensors a launch switch turns on: those on by default (the camera, not the depth camera), else all."""
    return tuple(s for s in _sensors(switch) if s.enabled_by_default) or _sensors(switch)


def _switch_flags(switch: str, on: bool) -> dict[str, bool]:
    """Encoder parameters for `use_<switch>`: on, its primary sensors on (others as the file says); off, all off."""
    return {s.enable_param: True for s in _primary(switch)} if on else {s.enable_param: False for s in _sensors(switch)}


# Parameter files shipped in config/ that `config:=<name>` selects (tiny.yaml is for tests only).
SHIPPED_CONFIGS = {'robot': 'robot.yaml', 'demo': 'demo.yaml', 'fleet': 'fleet.yaml'}

# What a launch starts (fleet mode splits the graph between machines): everything; the robot's half (encoders and
# grounding, under `namespace`); or the GPU server's half (llm_node, serving the namespaces in `robots`).
ROLES = {'all': ('encoders', 'grounding', 'llm'), 'robot': ('encoders', 'grounding'), 'server': ('llm',)}


@dataclass(frozen=True)
class LaunchArgument:
    name: str
    default: str
    description: str


# Defaults that are paths are filled in by the launch file (package share directory).
LAUNCH_ARGUMENTS = (
    LaunchArgument('namespace', '', 'Namespace pushed onto every node of the stack (fleet mode: the robot\'s name on '
                   'the robot, e.g. robot1; empty on the server).'),
    LaunchArgument('config', 'robot', 'Shipped parameter file: robot (official weights on a GPU; give their paths), '
                   'demo (runs anywhere with nothing downloaded) or fleet (a GPU server serving robot1 and robot2). '
                   'Ignored when params_file is given.'),
    LaunchArgument('role', 'all', 'What this machine runs: all (the whole stack), robot (the encoders and '
                   'grounding_node: fleet mode\'s robot side, with namespace:=<robot>) or server (llm_node only: fleet '
                   'mode\'s GPU server, with robots:=...).'),
    LaunchArgument('robots', '', "Fleet mode: robot namespaces llm_node serves, e.g. 'robot1,robot2' or "
                   "'[robot1, robot2]'; empty keeps the YAML's (llm_node's robots parameter)."),
    LaunchArgument('params_file', '', 'Parameter YAML for all nodes (default: config/<config>.yaml).'),
    # A sensor most robots lack (thermal, IMU) is switched by the parameter file unless the launch says otherwise.
    *(LaunchArgument(f'use_{switch}', 'true' if any(s.enabled_by_default for s in _sensors(switch)) else '',
                     f'Encode the {switch} inputs (' + ', '.join(s.name for s in _sensors(switch)) + ')'
                     + ('.' if any(s.enabled_by_default for s in _sensors(switch)) else
                        "; empty: as the parameter file's encoder section says (" +
                        ', '.join(s.enable_param for s in _sensors(switch)) + ').'))
      for switch in LAUNCH_SWITCHES),
    LaunchArgument('use_grounding', 'true', 'Start grounding_node: OCR, audio events and lidar geometry as prompt '
                   'context for the LLM (each part switchable in the parameter file).'),
    *(LaunchArgument(s.topic_argument, s.topic, f"{s.msg_type.replace('/msg/', '/')} input of the {s.name} sensor"
                     + (f' (its /compressed sibling when {s.compressed_param} is compressed).' if s.compressed_param
                        else '.')) for s in SENSOR_SPECS),
    LaunchArgument('camera_info_topic', CAMERA_INFO_TOPIC, 'sensor_msgs/CameraInfo for the depth camera\'s focal '
                   'length and lidar projection.'),
    LaunchArgument('device', '', "Torch device for all models (auto, cpu, cuda, cuda:N); empty keeps the YAML's."),
    LaunchArgument('imagebind_checkpoint', '', "ImageBind checkpoint (imagebind_huge.pth); empty keeps the YAML's."),
    LaunchArgument('llama_dir', '', "LLaMA backbone directory (Meta or HF format); empty keeps the YAML's."),
    LaunchArgument('adapter_checkpoint', '', "ImageBind-LLM adapter (7B.pth); empty keeps the YAML's."),
    LaunchArgument('cache_index', '', "FAISS visual-cache index; empty keeps the YAML's."),
    LaunchArgument('single_process', 'true', 'Run all encoders in one process sharing one ImageBind model.'),
    LaunchArgument('autostart', 'true', 'Bring llm_node and the encoders (lifecycle nodes) to active on start, as nav2 '
                   'does; false starts them unconfigured, for `ros2 lifecycle set <node> configure` and `activate` '
                   '(true keeps the parameter file\'s autostart, true by default).'),
    LaunchArgument('log_level', 'info', 'Log level of every node.'),
    LaunchArgument('respawn', 'false', 'Restart a node that exits.'),
    LaunchArgument('fastdds_profile', '', 'Fast DDS XML profile for large camera frames (default: '
                   'config/fastdds_large_data.xml); set to "none" to keep the environment\'s.'),
)


@dataclass(frozen=True)
class NodeSpec:
    executable: str
    name: str
    parameters: tuple = ()          # YAML paths and override dicts, applied in order
    remappings: tuple = ()          # (from, to) pairs
    respawn: bool = False
    log_level: str = 'info'

    @property
    def required(self) -> bool:
        """A node the graph cannot do without: its failure brings the whole launch down (a respawned node is
        restarted instead)."""
        return not self.respawn


class NodeFailed(RuntimeError):
    """Raised by robot.launch.py's exit handler when a required node fails. launch (3.x) has no way to give a
    Shutdown a return code; an exception raised by an event handler shuts the launch down with its message and
    makes `ros2 launch` exit 1."""


def failure_reason(node_name: str, returncode: Optional[int]) -> Optional[str]:
    """Why a node's exit must bring the launch down, or None for a clean exit (0: Ctrl-C, a finished replay)."""
    if returncode in (0, None):
        return None
    if returncode < 0:
        try:
            how = f'was killed by {signal.Signals(-returncode).name}'
        except ValueError:
            how = f'was killed by signal {-returncode}'
    else:
        how = f'exited with code {returncode}'
    return f'{node_name} {how} (its FATAL line above says why)' if returncode > 0 else f'{node_name} {how}'


def _truthy(value: str, name: str = '') -> bool:
    value = str(value).strip().lower()
    if value not in ('true', 'false', '1', '0', 'yes', 'no', 'on', 'off'):
        raise ValueError(f"{name + ': ' if name else ''}expected true or false, got '{value}'")
    return value in ('true', '1', 'yes', 'on')


def _switch_on(switch: str, value: str, section: Mapping) -> bool:
    """`use_<switch>`: true or false as given; empty, whether the file's encoder section enables one of its sensors."""
    if str(value).strip():
        return _truthy(value, f'use_{switch}')
    return any(bool(section.get(s.enable_param, s.enabled_by_default)) for s in _sensors(switch))


def _non_empty(pairs: Mapping[str, str]) -> dict:
    return {k: v for k, v in pairs.items() if v}


def params_file_for(args: Mapping[str, str], config_dir: str) -> str:
    """The parameter file a launch uses: params_file when given, else the shipped file that `config` names."""
    if args.get('params_file'):
        return args['params_file']
    name = (args.get('config') or 'robot').strip()
    if name not in SHIPPED_CONFIGS:
        raise ValueError(f"config: expected one of {', '.join(SHIPPED_CONFIGS)}, got '{name}' "
                         '(or give params_file:=<path>)')
    return os.path.join(config_dir, SHIPPED_CONFIGS[name])


def plan_nodes(args: Mapping[str, str]) -> list[NodeSpec]:
    """The nodes robot.launch.py starts for resolved launch-argument values."""
    known = {a.name for a in LAUNCH_ARGUMENTS}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f'unknown launch argument(s): {", ".join(sorted(unknown))}')
    values = {a.name: a.default for a in LAUNCH_ARGUMENTS} | dict(args)
    if not values['params_file']:
        raise ValueError('params_file must be resolved to a YAML path')
    section = _encoder_section(values['params_file'])
    use = {s: _switch_on(s, values[f'use_{s}'], section) for s in LAUNCH_SWITCHES}
    respawn = _truthy(values['respawn'], 'respawn')
    log_level = values['log_level']
    device = _non_empty({'device': values['device']})
    lifecycle = {} if _truthy(values['autostart'], 'autostart') else {'autostart': False}  # lifecycle nodes only
    encoder_overrides = device | lifecycle | _non_empty({'model.checkpoint': values['imagebind_checkpoint']})
    llm_overrides = device | lifecycle | _non_empty({'llm.backbone_path': values['llama_dir'],
                                                     'llm.adapter_checkpoint': values['adapter_checkpoint'],
                                                     'cache.index_path': values['cache_index']})
    role = values['role'].strip()
    if role not in ROLES:
        raise ValueError(f"role: expected one of {', '.join(ROLES)}, got '{role}'")
    parts = ROLES[role]
    robots = parse_robots(values['robots'])
    if robots and role != 'server':
        raise ValueError(f"robots: only for role:=server (llm_node alone, serving robots that run role:=robot), "
                         f"not role:={role}")
    if robots:
        llm_overrides['robots'] = list(robots)
    remaps = {switch: _remappings(switch, values) for switch in LAUNCH_SWITCHES}

    def spec(executable, overrides, remappings=(), name=None, first=()):
        parameters = tuple(first) + (values['params_file'],) + ((overrides,) if overrides else ())
        return NodeSpec(executable, name or executable, parameters, tuple(remappings), respawn, log_level)

    nodes = []
    if 'encoders' in parts and _truthy(values['single_process'], 'single_process'):
        if any(use.values()):
            flags = {name: value for switch, on in use.items() for name, value in _switch_flags(switch, on).items()}
            nodes.append(spec('encoder', encoder_overrides | flags,
                              [r for s in use if use[s] for r in remaps[s]]))
    elif 'encoders' in parts:
        # One `encoder` process per launch switch, named after it (node names must differ), configured by the file's
        # one `encoder` section in both launch modes (a `<switch>_encoder` section, if any, still applies on top).
        for switch in LAUNCH_SWITCHES:
            if use[switch]:
                flags = {name: value for other in LAUNCH_SWITCHES
                         for name, value in _switch_flags(other, other == switch).items()}
                nodes.append(spec('encoder', encoder_overrides | flags, remaps[switch], name=f'{switch}_encoder',
                                  first=(section,) if section else ()))
    if 'grounding' in parts and _truthy(values['use_grounding'], 'use_grounding'):
        nodes.append(spec('grounding_node', {}, dict.fromkeys(r for s in LAUNCH_SWITCHES for r in remaps[s])))
    if 'llm' in parts:
        nodes.append(spec('llm_node', llm_overrides))
    return nodes


def parse_robots(value: str) -> tuple[str, ...]:
    """The `robots` launch argument: names separated by commas or spaces, optionally in brackets; () when empty.
    Raises ValueError naming a bad entry (core/fleet.py's rule, which llm_node applies too)."""
    text = str(value).strip()
    if text.startswith('[') and text.endswith(']'):
        text = text[1:-1]
    names = [n.strip().strip('\'"') for n in text.replace(',', ' ').split()]
    return robot_namespaces(names) if names else ()


def _encoder_section(params_file: str) -> dict:
    """The `encoder` section of a parameter file (empty when the file has none or cannot be read here)."""
    from mm_llm_ros.core.params import ParamsFileError, read_params_file
    try:
        return dict(read_params_file(params_file).get('encoder', {}))
    except ParamsFileError:
        return {}   # the node reports an unreadable file itself, with its name


def _remappings(switch: str, values: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Input remappings of the sensors a launch switch starts (topic arguments of core/specs.py)."""
    pairs = []
    for sensor in (s for s in SENSOR_SPECS if s.launch_switch == switch):
        pairs.append((sensor.topic, values[sensor.topic_argument]))
        if sensor.compressed_param:
            pairs.append((sensor.topic + '/compressed', values[sensor.topic_argument] + '/compressed'))
        if sensor.uses_camera_info and (CAMERA_INFO_TOPIC, values['camera_info_topic']) not in pairs:
            pairs.append((CAMERA_INFO_TOPIC, values['camera_info_topic']))
    return tuple(pairs)
