"""Bring up mm_llm_ros on a robot: the ImageBind encoder(s) and the ImageBind-LLM node.

    ros2 launch mm_llm_ros robot.launch.py image_topic:=/usb_cam/image_raw llama_dir:=/models/LLaMA/7B \
        adapter_checkpoint:=/models/7B.pth imagebind_checkpoint:=/models/imagebind_huge.pth
    ros2 launch mm_llm_ros robot.launch.py config:=demo      # no weights, no GPU: the embedded default

Fleet mode (README): each robot runs its encoders and grounding_node, one GPU server runs llm_node for all of them:

    ros2 launch mm_llm_ros robot.launch.py config:=fleet role:=robot namespace:=robot1     # on robot1
    ros2 launch mm_llm_ros robot.launch.py config:=fleet role:=server robots:=robot1,robot2 llama_dir:=...

A node that cannot start (a missing checkpoint, no CUDA) exits 1 with its one-line FATAL reason; the launch then
shuts down with that node named, instead of running a partial graph, and `ros2 launch` exits 1.

llm_node and the encoders are lifecycle nodes that bring themselves to active (their `autostart` parameter), so
they are plain launch_ros Node actions and need no lifecycle events from here; `autostart:=false` leaves them
unconfigured for `ros2 lifecycle set <node> configure` / `activate` or a lifecycle manager.

Which nodes start, with which parameters and remappings, is decided by `mm_llm_ros.launch_plan` (shared with the
tests); this file only declares the arguments and turns that plan into launch_ros actions.
"""
import os
import re

from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, GroupAction, OpaqueFunction, RegisterEventHandler,
                            SetEnvironmentVariable)
from launch.event_handlers import OnProcessExit
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node, PushRosNamespace

from mm_llm_ros.launch_plan import LAUNCH_ARGUMENTS, NodeFailed, failure_reason, params_file_for, plan_nodes


def _default(name: str, share: str) -> str:
    if name == 'fastdds_profile':
        return os.path.join(share, 'config', 'fastdds_large_data.xml')
    return next(a.default for a in LAUNCH_ARGUMENTS if a.name == name)


def _fastdds_profile_variable() -> str:
    """The variable the installed Fast DDS reads its XML profile from.

    Fast DDS 2 (rmw_fastrtps_cpp < 9: Humble, Jazzy) reads only FASTRTPS_DEFAULT_PROFILES_FILE; Fast DDS 3 (Kilted
    on) reads only FASTDDS_DEFAULT_PROFILES_FILE and warns about the old name.
    """
    try:
        with open(os.path.join(get_package_share_directory('rmw_fastrtps_cpp'), 'package.xml')) as f:
            major = int(re.search(r'<version>\s*(\d+)', f.read()).group(1))
    except (PackageNotFoundError, OSError, AttributeError):
        return 'FASTDDS_DEFAULT_PROFILES_FILE'
    return 'FASTRTPS_DEFAULT_PROFILES_FILE' if major < 9 else 'FASTDDS_DEFAULT_PROFILES_FILE'


def _shutdown_on_failure(node_name: str):
    """Bring the whole launch down when a required node fails (its FATAL line says why), with a non-zero exit code:
    the raised NodeFailed ends the launch with its message and return code 1. A node that exits 0 (Ctrl-C, a
    finished replay) does not."""
    def on_exit(event, _context):
        reason = failure_reason(node_name, event.returncode)
        if reason is not None:
            raise NodeFailed(f'shutting the launch down: {reason}')
        return None
    return on_exit


def _launch_setup(context):
    values = {a.name: LaunchConfiguration(a.name).perform(context) for a in LAUNCH_ARGUMENTS}
    values['params_file'] = params_file_for(values, os.path.join(get_package_share_directory('mm_llm_ros'),
                                                                 'config'))
    actions = []
    profile = values['fastdds_profile']
    if profile and profile != 'none':
        actions.append(SetEnvironmentVariable(_fastdds_profile_variable(), profile))
    nodes, handlers = [], []
    for spec in plan_nodes(values):
        node = Node(package='mm_llm_ros', executable=spec.executable, name=spec.name, output='screen',
                    parameters=list(spec.parameters), remappings=list(spec.remappings), respawn=spec.respawn,
                    respawn_delay=2.0, arguments=['--ros-args', '--log-level', spec.log_level])
        nodes.append(node)
        if spec.required:
            handlers.append(RegisterEventHandler(OnProcessExit(target_action=node,
                                                               on_exit=_shutdown_on_failure(spec.name))))
    actions.append(GroupAction([PushRosNamespace(values['namespace']), *nodes]))
    return actions + handlers


def generate_launch_description():
    share = get_package_share_directory('mm_llm_ros')
    arguments = [DeclareLaunchArgument(a.name, default_value=_default(a.name, share), description=a.description)
                 for a in LAUNCH_ARGUMENTS]
    return LaunchDescription([*arguments, OpaqueFunction(function=_launch_setup)])
