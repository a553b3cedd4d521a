"""The one `main()` every node shares: init, spin on a multi-threaded executor, clean shutdown.

A configuration error (missing checkpoint, bad parameter) ends start-up with one clear log line and exit code 1,
not a stack trace.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node


class StartupError(RuntimeError):
    """Raised by a node constructor for configuration problems the user must fix."""


def run_node(factory: Callable[[], Node], args: Optional[list] = None, num_threads: Optional[int] = None) -> int:
    rclpy.init(args=args)
    node = None
    try:
        try:
            node = factory()
        except (StartupError, ValueError, FileNotFoundError) as exc:
            rclpy.logging.get_logger('mm_llm_ros').fatal(f'cannot start: {exc}')
            return 1
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
        if node is not None:
            close = getattr(node, 'close', None)
            if close is not None:
                close()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def exit_now(code: int) -> None:
    """End the process right after run_node's clean ROS shutdown.

    Interpreter teardown with torch and transformers loaded takes 1-3 s (garbage collection), long enough for
    `ros2 launch` to escalate SIGINT to SIGTERM when several nodes stop together; nothing is left to clean up here.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
