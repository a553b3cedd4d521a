"""Start node executables as `ros2 run` / robot.launch.py would, without the ros2 CLI (no rclpy import).

Used by the demo and by the integration tests, so both run the installed executables with the same
`--ros-args` a launch file produces from a `launch_plan.NodeSpec`.
"""
from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
from typing import Any, Iterable, Mapping, Optional, Sequence

from mm_llm_ros.launch_plan import NodeSpec

PACKAGE = 'mm_llm_ros'


def executable_path(name: str, package: str = PACKAGE) -> pathlib.Path:
    """Path of an installed node executable (`lib/<package>/<name>` under the package's prefix)."""
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix
    try:
        prefix = get_package_prefix(package)
    except PackageNotFoundError as exc:
        raise FileNotFoundError(f"package '{package}' is not installed: build it (scripts/setup.sh) and source "
                                'install/setup.bash') from exc
    path = pathlib.Path(prefix) / 'lib' / package / name
    if not path.exists():
        raise FileNotFoundError(f'{path} not found: rebuild the workspace (scripts/setup.sh or colcon build)')
    return path


def param_literal(value: Any) -> str:
    """A parameter value as `-p name:=value` expects it (YAML syntax)."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return '[' + ','.join(param_literal(v) for v in value) + ']'
    return repr(value)


def ros_args(*, name: Optional[str] = None, default_name: Optional[str] = None,
             parameters: Iterable[str | os.PathLike | Mapping[str, Any]] = (),
             remappings: Iterable[tuple[str, str]] = (), log_level: str = 'info') -> list[str]:
    """`--ros-args ...` for a node: YAML files and override dicts in order, remappings and log level."""
    args = ['--ros-args', '--log-level', log_level]
    if name and name != default_name:
        args += ['-r', f'__node:={name}']
    for entry in parameters:
        if isinstance(entry, Mapping):
            for key, value in entry.items():
                args += ['-p', f'{key}:={param_literal(value)}']
        else:
            args += ['--params-file', str(entry)]
    for src, dst in remappings:
        args += ['-r', f'{src}:={dst}']
    return args


def command_for(spec: NodeSpec) -> list[str]:
    return [str(executable_path(spec.executable)),
            *ros_args(name=spec.name, default_name=spec.executable, parameters=spec.parameters,
                      remappings=spec.remappings, log_level=spec.log_level)]


def start_process(command: list[str], log_path: pathlib.Path, env: Optional[Mapping[str, str]] = None,
                  process_group: Optional[int] = None, unset_env: Iterable[str] = ()) -> subprocess.Popen:
    """Start a node in its own process group (so it can be signalled as a whole), output into log_path.

    With `process_group`, join that group instead, as the nodes of `ros2 launch` in a terminal share the
    terminal's group (Ctrl-C signals all of them at once). `unset_env` names variables removed for the process.
    """
    proc_env = dict(os.environ, PYTHONUNBUFFERED='1', RCUTILS_LOGGING_BUFFERED_STREAM='0', **(env or {}))
    for name in unset_env:
        proc_env.pop(name, None)
    group = {'start_new_session': True} if process_group is None else {'process_group': process_group}
    with open(log_path, 'wb') as log_file:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=proc_env,
                                stdin=subprocess.DEVNULL, **group)


def signal_group(process: subprocess.Popen, sig: int) -> None:
    """Send sig to the process group of a still-running process."""
    if process.poll() is None:
        try:
            os.killpg(os.getpgid(process.pid), sig)
        except ProcessLookupError:
            pass


def stop_processes(processes: Iterable[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGINT every still-running process group, then SIGKILL those that have not exited within timeout_s."""
    processes = list(processes)
    for process in processes:
        signal_group(process, signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
            process.wait(5.0)


def only_loopback() -> bool:
    """True when this process's network namespace has no interface but loopback.

    (socket.if_nameindex asks the kernel about the current namespace; /sys/class/net would show the host's.)
    """
    return {name for _, name in socket.if_nameindex()} <= {'lo'}


def reexec_in_loopback_namespace(netns_script: pathlib.Path, script: pathlib.Path, argv: Sequence[str]) -> None:
    """Re-execute `script argv` through scripts/netns.sh unless this process already sees only loopback.

    MM_LLM_NO_NETNS=1 skips this (as it does for pytest); inside netns.sh with other interfaces present, refuse.
    """
    if only_loopback() or os.environ.get('MM_LLM_NO_NETNS') == '1':
        return
    if os.environ.get('MM_LLM_IN_NETNS') == '1':
        raise SystemExit(f'{script.name}: this namespace has interfaces besides loopback; refusing to run DDS here')
    os.execv(str(netns_script), [str(netns_script), sys.executable, str(script), *argv])
