"""The one `main()` every node shares: init, spin on a multi-threaded executor, clean shutdown.

A configuration error (missing checkpoint, bad parameter) ends start-up with one clear log line and exit code 1,
not a stack trace.

Signals: a terminal's Ctrl-C reaches every node of a `ros2 launch` twice (the terminal signals the process group,
then launch signals each node again). The first SIGINT or SIGTERM stops the executor; from then on SIGINT and
SIGTERM are ignored, so a repeated one cannot interrupt the shutdown with a KeyboardInterrupt traceback and exit
code -2. Every node then exits 0.
"""
from __future__ import annotations

import logging
import os
import pathlib
import signal
import sys
from typing import Callable, Optional

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node


PROFILE_VARIABLES = ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')
LARGE_DATA_PROFILE = 'fastdds_large_data.xml'


class StartupError(RuntimeError):
    """Raised by a node constructor for configuration problems the user must fix."""


def default_fastdds_profile(environ=os.environ) -> Optional[str]:
    """Point Fast DDS at the package's large-data profile unless the user chose a profile; returns the path set.

    Best-effort camera frames larger than Fast DDS's default 512 KB shared-memory segment are nearly all lost
    without it (measured with `ros2 run mm_llm_ros sensor_replay`: 9 of 60 1600x900 frames arrived). Must run
    before rclpy.init (the middleware reads the variable once). Both variable names are set: Fast DDS 3 (Kilted)
    reads the first, Fast DDS 2 (Humble, Jazzy) the second; a user's own setting of either always wins.
    """
    if any(environ.get(name) for name in PROFILE_VARIABLES):
        return None
    path = _installed_profile()
    if path is None:
        return None
    for name in PROFILE_VARIABLES:
        environ[name] = path
    return path


def _installed_profile() -> Optional[str]:
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        path = pathlib.Path(get_package_share_directory('mm_llm_ros')) / 'config' / LARGE_DATA_PROFILE
    except (ImportError, LookupError, PackageNotFoundError):
        return None
    return str(path) if path.is_file() else None


def _ignore_stop_signals() -> None:
    """From here on, SIGINT and SIGTERM cannot interrupt the shutdown (a KeyboardInterrupt already raised by the
    C-level handler but not yet delivered is absorbed by retrying)."""
    for _ in range(3):
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        except KeyboardInterrupt:
            continue


def run_node(factory: Callable[[], Node], args: Optional[list] = None, num_threads: Optional[int] = None) -> int:
    default_fastdds_profile()
    rclpy.init(args=args)
    node = None
    try:
        try:
            node = factory()
        except (StartupError, ValueError, FileNotFoundError) as exc:
            if not rclpy.ok():
                return 0  # stopped while starting (see below)
            rclpy.logging.get_logger('mm_llm_ros').fatal(f'cannot start: {exc}')
            return 1
        except Exception:
            if rclpy.ok():
                raise
            # A SIGINT/SIGTERM during start-up (a launch shutting down) shut the context down under the
            # constructor, whose next create_* call then failed: a requested stop, not an error.
            return 0
        threads = num_threads or getattr(node, 'executor_threads', 4)
        # rclpy's MultiThreadedExecutor polls in a hot loop while a mutually exclusive group is busy with one of its
        # ready callbacks; under a burst of sensor messages that starved the callbacks (15-47 of 150 frames reached a
        # node, the rest overflowed the DDS queue uncounted). Nodes whose callbacks only hand work over use one thread.
        executor = SingleThreadedExecutor() if threads == 1 else MultiThreadedExecutor(num_threads=threads)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        _ignore_stop_signals()
        _shut_down(node)
    return 0


def _shut_down(node: Optional[Node]) -> None:
    for _ in range(3):  # a KeyboardInterrupt delivered late (raised before SIG_IGN) restarts the idempotent steps
        try:
            if node is not None:
                close = getattr(node, 'close', None)
                if close is not None:
                    close()
                node.destroy_node()
            rclpy.try_shutdown()
            break
        except KeyboardInterrupt:
            continue
    _ignore_stop_signals()  # rclpy's shutdown restores the handlers it replaced (Python's KeyboardInterrupt)


def exit_now(code: int) -> None:
    """End the process right after run_node's clean ROS shutdown.

    Interpreter teardown with torch and transformers loaded takes 1-3 s (garbage collection), long enough for
    `ros2 launch` to escalate SIGINT to SIGTERM when several nodes stop together; nothing is left to clean up here.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
