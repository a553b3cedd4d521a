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


# Input topic names as the encoder nodes use them (relative, so a pushed namespace applies).
TOPICS = {'image': 'camera/image_raw', 'camera_info': 'camera/camera_info', 'depth': 'camera/depth/image_raw',
          'audio': 'audio', 'points': 'points'}
EMBEDDING_TOPIC = 'mm_llm/embedding/{modality}'
# Parameter files shipped in config/ that `config:=<name>` selects (tiny.yaml is for tests only).
SHIPPED_CONFIGS = {'robot': 'robot.yaml', 'demo': 'demo.yaml'}
CONTEXT_TOPIC = 'mm_llm/context/{kind}'


@dataclass(frozen=True)
class LaunchArgument:
    name: str
    default: str
    description: str


# Defaults that are paths are filled in by the launch file (package share directory).
LAUNCH_ARGUMENTS = (
    LaunchArgument('namespace', '', 'Namespace pushed onto every node of the stack.'),
    LaunchArgument('config', 'robot', 'Shipped parameter file: robot (official weights on a GPU; give their paths) '
                   'or demo (runs anywhere with nothing downloaded). Ignored when params_file is given.'),
    LaunchArgument('params_file', '', 'Parameter YAML for all nodes (default: config/<config>.yaml).'),
    LaunchArgument('use_camera', 'true', 'Start the camera encoder (vision).'),
    LaunchArgument('use_audio', 'true', 'Start the audio encoder.'),
    LaunchArgument('use_lidar', 'true', 'Start the lidar encoder (depth projection).'),
    LaunchArgument('use_grounding', 'true', 'Start grounding_node: OCR, audio events and lidar geometry as prompt '
                   'context for the LLM (each part switchable in the parameter file).'),
    LaunchArgument('image_topic', 'camera/image_raw', 'sensor_msgs/Image input (its /compressed sibling when '
                   'camera.transport is compressed).'),
    LaunchArgument('camera_info_topic', 'camera/camera_info', 'sensor_msgs/CameraInfo for lidar projection.'),
    LaunchArgument('depth_topic', 'camera/depth/image_raw', 'Depth image input (16UC1 mm or 32FC1 m).'),
    LaunchArgument('audio_topic', 'audio', 'mm_llm_ros_interfaces/AudioChunk input.'),
    LaunchArgument('points_topic', 'points', 'sensor_msgs/PointCloud2 input.'),
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
    use = {s: _truthy(values[f'use_{s}'], f'use_{s}') for s in ('camera', 'audio', 'lidar')}
    respawn = _truthy(values['respawn'], 'respawn')
    log_level = values['log_level']
    device = _non_empty({'device': values['device']})
    lifecycle = {} if _truthy(values['autostart'], 'autostart') else {'autostart': False}  # lifecycle nodes only
    encoder_overrides = device | lifecycle | _non_empty({'model.checkpoint': values['imagebind_checkpoint']})
    llm_overrides = device | lifecycle | _non_empty({'llm.backbone_path': values['llama_dir'],
                                         'llm.adapter_checkpoint': values['adapter_checkpoint'],
                                         'cache.index_path': values['cache_index']})
    remaps = {
        'camera': ((TOPICS['image'], values['image_topic']),
                   (TOPICS['image'] + '/compressed', values['image_topic'] + '/compressed'),
                   (TOPICS['depth'], values['depth_topic'])),
        'audio': ((TOPICS['audio'], values['audio_topic']),),
        'lidar': ((TOPICS['points'], values['points_topic']), (TOPICS['camera_info'], values['camera_info_topic'])),
    }

    def spec(executable, overrides, remappings=()):
        parameters = (values['params_file'],) + ((overrides,) if overrides else ())
        return NodeSpec(executable, executable, parameters, tuple(remappings), respawn, log_level)

    nodes = []
    if _truthy(values['single_process'], 'single_process'):
        if any(use.values()):
            flags = {f'use_{s}': on for s, on in use.items()}
            nodes.append(spec('encoder', encoder_overrides | flags,
                              [r for s in use if use[s] for r in remaps[s]]))
    else:
        for sensor, executable in (('camera', 'camera_encoder'), ('audio', 'audio_encoder'),
                                   ('lidar', 'lidar_encoder')):
            if use[sensor]:
                nodes.append(spec(executable, encoder_overrides, remaps[sensor]))
    if _truthy(values['use_grounding'], 'use_grounding'):
        nodes.append(spec('grounding_node', {}, [r for s in ('camera', 'audio', 'lidar') for r in remaps[s]]))
    nodes.append(spec('llm_node', llm_overrides))
    return nodes
