"""Test harness: real node processes over real DDS, inside the loopback-only network namespace.

`NodeGraph` starts installed executables as process groups, with parameters passed exactly as `ros2 run`/launch
would (`--ros-args -p/--params-file/-r`). `TestNode` is the test process's own rclpy node, spun on a background
executor, with waits on graph conditions (matched endpoints, services, messages) that always have timeouts.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from mm_llm_ros.launch_plan import NodeSpec
from mm_llm_ros.node_processes import (command_for, executable_path, ros_args, signal_group, start_process,
                                       stop_processes)

DEFAULT_TIMEOUT_S = 20.0
POLL_S = 0.02


def wait_until(condition: Callable[[], Any], timeout_s: float = DEFAULT_TIMEOUT_S, what: str = 'condition'):
    """Poll `condition` until it returns a truthy value; raise TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f'timed out after {timeout_s:.1f} s waiting for {what}')
        time.sleep(POLL_S)


def services_by_node(graph_api, node: str, namespace: str = '/') -> list:
    """`graph_api.get_service_names_and_types_by_node`, or [] while the graph cache does not know `node` yet: its
    services can be matched before its node-info message arrives, and the query then raises."""
    from rclpy.node import NodeNameNonExistentError
    try:
        return graph_api.get_service_names_and_types_by_node(node, namespace)
    except NodeNameNonExistentError:
        return []


@dataclass
class NodeProcess:
    name: str
    popen: subprocess.Popen
    log_path: pathlib.Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors='replace') if self.log_path.exists() else ''

    def signal(self, sig: int) -> None:
        signal_group(self.popen, sig)

    def stop(self, timeout_s: float = 10.0) -> Optional[int]:
        """SIGINT, then SIGKILL of the whole process group if it does not exit in time."""
        stop_processes([self.popen], timeout_s)
        return self.popen.returncode

    def wait_for_log(self, text: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        wait_until(lambda: text in self.log() or not self.alive(), timeout_s, f"'{text}' in {self.name}'s log")
        if text not in self.log():
            raise RuntimeError(f'{self.name} exited ({self.popen.returncode}) before logging {text!r}:\n{self.log()}')


@dataclass
class NodeGraph:
    """Starts node executables as separate process groups and tears them all down."""
    log_dir: pathlib.Path
    processes: list[NodeProcess] = field(default_factory=list)

    def start(self, executable: str, *, name: Optional[str] = None, params: Optional[dict] = None,
              params_files: Iterable[str | os.PathLike] = (), remap: Optional[dict] = None,
              args: Iterable[str] = (), env: Optional[dict] = None, log_level: str = 'info',
              process_group: Optional[int] = None, unset_env: Iterable[str] = ()) -> NodeProcess:
        name = name or executable
        parameters = [*params_files, *([params] if params else [])]
        command = [str(executable_path(executable)), *args,
                   *ros_args(name=name, default_name=executable, parameters=parameters,
                             remappings=(remap or {}).items(), log_level=log_level)]
        return self.start_command(name, command, env, process_group, unset_env)

    def start_spec(self, spec: NodeSpec, env: Optional[dict] = None) -> NodeProcess:
        """Start a node exactly as robot.launch.py would for this plan entry."""
        return self.start_command(spec.name, command_for(spec), env)

    def start_command(self, name: str, command: list[str], env: Optional[dict] = None,
                      process_group: Optional[int] = None, unset_env: Iterable[str] = ()) -> NodeProcess:
        log_path = self.log_dir / f'{name}-{len(self.processes)}.log'
        process = NodeProcess(name, start_process(command, log_path, env, process_group, unset_env), log_path)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def logs(self) -> str:
        return '\n'.join(f'----- {p.name} (pid {p.pid}, exit {p.popen.returncode}) -----\n{p.log()}'
                         for p in self.processes)


class TestNode:
    """The test process's rclpy node, spinning on a background executor thread."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = 'test_client'):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import MultiThreadedExecutor
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def close(self) -> None:
        import rclpy
        self.executor.shutdown()
        # The spin thread leaves its wait once the executor is shut down; destroying the node while it still waits
        # on the node's entities segfaulted the test process in a CI rehearsal.
        self._thread.join(5.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    # ---- graph waits -------------------------------------------------------------------------
    def wait_for_service(self, client, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not client.wait_for_service(timeout_sec=timeout_s):
            raise TimeoutError(f'service {client.srv_name} not available after {timeout_s} s')

    def wait_for_action_server(self, client, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not client.wait_for_server(timeout_sec=timeout_s):
            raise TimeoutError(f'action server not available after {timeout_s} s')

    def wait_for_subscribers(self, publisher, count: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        wait_until(lambda: publisher.get_subscription_count() >= count, timeout_s,
                   f'{count} subscriber(s) on {publisher.topic_name}')

    def wait_for_publishers(self, subscription, count: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        wait_until(lambda: subscription.get_publisher_count() >= count, timeout_s,
                   f'{count} publisher(s) on {subscription.topic_name}')

    def result(self, future, timeout_s: float = DEFAULT_TIMEOUT_S):
        """Wait for a future that the background executor completes."""
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout_s):
            raise TimeoutError(f'no result after {timeout_s} s')
        return future.result()

    def call(self, client, request, timeout_s: float = DEFAULT_TIMEOUT_S, resend_after_s: float = 15.0):
        """Call an idempotent service and wait for its response, sending the request again (bounded by `timeout_s`)
        when none came within `resend_after_s`: a response sent before the server has discovered this client's
        response reader is lost for good (seen once in CI: a tiny-model /ask with no reply in 120 s)."""
        self.wait_for_service(client, timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            future = client.call_async(request)
            done = threading.Event()
            future.add_done_callback(lambda _: done.set())
            if done.wait(max(0.0, min(resend_after_s, deadline - time.monotonic()))):
                return future.result()
            client.remove_pending_request(future)
            if time.monotonic() >= deadline:
                raise TimeoutError(f'no response from {client.srv_name} after {timeout_s} s')

    def publish_until(self, publisher, make_msg: Callable[[], Any], done: Callable[[], Any],
                      period_s: float = 0.05, timeout_s: float = DEFAULT_TIMEOUT_S, what: str = 'a reply'):
        """Publish at a fixed rate until `done()` is truthy: best-effort samples sent right after discovery can be
        lost, so sensors are emulated as what they are, periodic publishers. Bounded in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            publisher.publish(make_msg())
            next_send = time.monotonic() + period_s
            while time.monotonic() < next_send:
                value = done()
                if value:
                    return value
                time.sleep(POLL_S)
            if time.monotonic() > deadline:
                raise TimeoutError(f'no {what} after publishing for {timeout_s:.1f} s on {publisher.topic_name}')

    def collect(self, msg_type, topic: str, qos=10) -> 'MessageCollector':
        return MessageCollector(self, msg_type, topic, qos)


class MessageCollector:
    """Subscribes to a topic and records every message, with a waitable predicate."""

    def __init__(self, test_node: TestNode, msg_type, topic: str, qos):
        self._cond = threading.Condition()
        self.messages: list = []
        self.test_node = test_node
        self.subscription = test_node.node.create_subscription(msg_type, topic, self._callback, qos)

    def _callback(self, msg) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list], Any] = bool, timeout_s: float = DEFAULT_TIMEOUT_S,
                 what: str = 'messages'):
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                value = predicate(self.messages)
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f'timed out after {timeout_s:.1f} s waiting for {what} on '
                                       f'{self.subscription.topic_name} (got {len(self.messages)})')
                self._cond.wait(min(remaining, 0.5))

    def wait_for_count(self, count: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> list:
        self.wait_for(lambda msgs: len(msgs) >= count, timeout_s, f'{count} message(s)')
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self.test_node.node.destroy_subscription(self.subscription)
