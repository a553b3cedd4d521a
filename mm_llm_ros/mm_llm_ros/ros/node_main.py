"""The one `main()` every node shares: init, spin on a multi-threaded executor, clean shutdown.

A configuration error (missing checkpoint, bad parameter) ends start-up with one clear log line and exit code 1,
not a stack trace.

Signals: rclpy's own handlers are not installed (they shut the context down at once, before a node could answer
the requests it is serving). `StopSignals` handles SIGINT and SIGTERM instead. While a node starts, the first
signal interrupts its constructor. Once it serves, the executor spins on a thread and the main thread waits for a
signal; the first one starts an orderly stop: a node with `finish_requests(reason)` ends every in-flight request
with that reason, the executor delivers those replies (bounded by FINISH_REQUESTS_S), and the node shuts down.
Every later SIGINT or SIGTERM is ignored: a terminal's Ctrl-C reaches every node of a `ros2 launch` twice (the
terminal signals the process group, then launch signals each node again), and that must not interrupt the
shutdown. Every node then exits 0.
"""
from __future__ import annotations

import logging
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Callable, Optional

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from rclpy.subscription import Subscription
from rclpy.timer import Timer

from mm_llm_ros.core.errors import StartupError


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long a stopping node lets its executor deliver the replies that finish_requests produced; the whole exit must
# fit in the 2 s a terminal (and `ros2 launch`, before it escalates) gives.
FINISH_REQUESTS_S = 1.0
JOIN_EXECUTOR_S = 0.5
POLL_S = 0.005
PROFILE_VARIABLES = ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')
LARGE_DATA_PROFILE = 'fastdds_large_data.xml'


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
        from ament_index_python.packages import get_package_share_directory
        path = pathlib.Path(get_package_share_directory('mm_llm_ros')) / 'config' / LARGE_DATA_PROFILE
    except (ImportError, LookupError, OSError):  # not installed, or no AMENT_PREFIX_PATH (an OSError)
        return None
    return str(path) if path.is_file() else None


class RosLogHandler(logging.Handler):
    """Python logging (the ROS-free core, transformers, torch) into the ROS log, one formatted line per record
    under the Python logger's name. Without it logging's last-resort handler writes warnings as bare text into the
    node's output, beside the node's own formatted lines."""

    SEVERITIES = ((logging.CRITICAL, 'fatal'), (logging.ERROR, 'error'), (logging.WARNING, 'warning'),
                  (logging.INFO, 'info'), (logging.NOTSET, 'debug'))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            method = next(name for level, name in self.SEVERITIES if record.levelno >= level)
            getattr(rclpy.logging.get_logger(record.name), method)(self.format(record))
        except Exception:
            self.handleError(record)


def forward_python_logging(level: int = logging.WARNING) -> RosLogHandler:
    """Route Python logging records of `level` and above into the ROS log (once per process)."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, RosLogHandler)), None)
    if handler is None:
        handler = RosLogHandler(level)
        root.addHandler(handler)
    return handler


class StopSignals:
    """SIGINT and SIGTERM of a node process, from `rclpy.init` on (rclpy's handlers are off).

    The first signal is the one that counts: during start-up it raises KeyboardInterrupt in the main thread (the
    constructor is interrupted), later it only wakes `wait()`. Every later signal is ignored. Python runs signal
    handlers in the main thread, but the kernel may deliver a signal to any thread (DDS, torch); the wake-up pipe
    (`signal.set_wakeup_fd`) ends a `wait()` blocked in read() whichever thread received it.
    """

    WAKE = b'\0'  # no signal has number 0

    def __init__(self):
        self.received: Optional[str] = None
        self.interrupting = True
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self.received is not None:
            return  # a repeated signal while stopping: harmless
        self.received = signal.Signals(signum).name
        if self.interrupting:
            raise KeyboardInterrupt

    def wake(self) -> None:
        """End `wait()` without a signal (the executor stopped on its own)."""
        try:
            os.write(self._write, self.WAKE)
        except OSError:  # the pipe is full: wait() wakes anyway
            pass

    def wait(self) -> Optional[str]:
        """Block until the first SIGINT/SIGTERM (returns its name) or `wake()` (returns None)."""
        numbers = {int(sig) for sig in STOP_SIGNALS}
        while True:
            for byte in os.read(self._read, 64):
                if byte in numbers:
                    self.received = self.received or signal.Signals(byte).name
                    return self.received
                if byte == self.WAKE[0]:
                    return self.received


def run_node(factory: Callable[[], Node], args: Optional[list] = None, num_threads: Optional[int] = None) -> int:
    default_fastdds_profile()
    forward_python_logging()
    stop = StopSignals()
    node, spinner = None, None
    try:
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
        try:
            node = factory()
        except (StartupError, ValueError, FileNotFoundError) as exc:
            if stop.received:
                return 0  # stopped while starting (see below)
            rclpy.logging.get_logger('mm_llm_ros').fatal(f'cannot start: {exc}')
            return 1
        except Exception:
            if not stop.received:
                raise
            # A SIGINT/SIGTERM during start-up (a launch shutting down) interrupted the constructor wherever it
            # was, e.g. inside a library that turned the KeyboardInterrupt into its own error: a requested stop.
            return 0
        threads = num_threads or getattr(node, 'executor_threads', 4)
        # rclpy's MultiThreadedExecutor polls in a hot loop while a mutually exclusive group is busy with one of its
        # ready callbacks; under a burst of sensor messages that starved the callbacks (15-47 of 150 frames reached a
        # node, the rest overflowed the DDS queue uncounted). Nodes whose callbacks only hand work over use one thread.
        executor = SingleThreadedExecutor() if threads == 1 else MultiThreadedExecutor(num_threads=threads)
        executor.add_node(node)
        stop.interrupting = False
        failures: list[BaseException] = []
        spinner = threading.Thread(target=_spin, args=(executor, stop, failures), name='executor', daemon=True)
        spinner.start()
        reason = stop.wait()
        if reason is not None:
            _finish_requests(node, executor, f'{node.get_name()} is shutting down ({reason})')
        if failures:
            raise failures[0]  # as if spun here: a traceback and a non-zero exit, after the shutdown below
    except KeyboardInterrupt:
        pass  # the first signal arrived while the node was starting
    finally:
        stop.interrupting = False
        _shut_down(node, spinner)
    return 0


def _spin(executor, stop: StopSignals, failures: list) -> None:
    try:
        executor.spin()
    except ExternalShutdownException:
        pass
    except BaseException as exc:  # handed to the main thread, which fails as spin() there would have
        failures.append(exc)
    finally:
        stop.wake()


def _finish_requests(node: Node, executor, reason: str) -> None:
    """Let a node end its in-flight requests with `reason`, then wait (bounded) until the executor has sent the
    replies: rclpy keeps every callback in progress (a service call, an action goal, the sending of its result) as
    a task of the executor until it is done. That list (`Executor._tasks`) is private, but the public way,
    `Executor.shutdown(timeout_sec)`, does not wait in rclpy 9.1 (it tests its own flag after setting it); an rclpy
    without the list makes this wait end at once, as before."""
    finish = getattr(node, 'finish_requests', None)
    if finish is None:
        return
    try:
        finish(reason)
    except Exception as exc:  # never let the stop itself fail
        node.get_logger().error(f'ending requests failed: {type(exc).__name__}: {exc}')
        return
    deadline = time.monotonic() + FINISH_REQUESTS_S
    while time.monotonic() < deadline:
        if all(task.done() for task, entity, _ in list(getattr(executor, '_tasks', ()))
               if not isinstance(entity, (Subscription, Timer))):  # sensor traffic goes on: not a reply
            return
        time.sleep(POLL_S)
    node.get_logger().warning(f'replies to in-flight requests not all sent within {FINISH_REQUESTS_S:g} s')


def _shut_down(node: Optional[Node], spinner: Optional[threading.Thread]) -> None:
    rclpy.try_shutdown()  # wakes the executor, whose spin then returns
    if spinner is not None:
        spinner.join(JOIN_EXECUTOR_S)
    if node is not None:
        close = getattr(node, 'close', None)
        if close is not None:
            close()
        node.destroy_node()


def exit_now(code: int) -> None:
    """End the process right after run_node's clean ROS shutdown.

    Interpreter teardown with torch and transformers loaded takes 1-3 s (garbage collection), long enough for
    `ros2 launch` to escalate SIGINT to SIGTERM when several nodes stop together; nothing is left to clean up here.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
