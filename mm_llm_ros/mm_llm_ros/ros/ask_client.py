"""ask: command-line client for /ask (and /ask_stream with --stream).

    ros2 run mm_llm_ros ask "What is in front of the robot?" [--modalities vision audio] [--stream]

Prints the answer, the modalities used and the latency. Exit codes: 0 answered, 1 failed, 2 timed out,
130 stopped by SIGINT (Ctrl-C) or SIGTERM.

Stopping: however the client is stopped (one or several SIGINTs, as a terminal and `ros2 run` both send one, or
SIGTERM), a streamed goal is cancelled before the client exits, so the node frees its slot at once. A plain /ask
service call cannot be cancelled; that request runs to its end in the node.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Optional

import rclpy
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions
from rclpy.utilities import remove_ros_args

from mm_llm_ros.ros.qos import FEEDBACK_QOS, SERVICE_QOS
from mm_llm_ros_interfaces.action import AskStream
from mm_llm_ros_interfaces.srv import Ask

EXIT_FAILED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 130
CANCEL_TIMEOUT_S = 3.0

# Set by SIGINT/SIGTERM. rclpy's own handlers are not installed: they would shut the context down at the first
# signal, before the goal could be cancelled.
_stop_requested = threading.Event()


def _on_stop_signal(_signum, _frame) -> None:
    _stop_requested.set()


def parse_args(argv):
    parser = argparse.ArgumentParser(prog='ask', description='Ask the mm_llm_ros ImageBind-LLM node a question.')
    parser.add_argument('question')
    parser.add_argument('--modalities', nargs='*', default=[], help='sensors (camera, lidar, ...), modalities (vision, '
                        'depth, ...) or context kinds (ocr, ...); empty: everything fresh')
    parser.add_argument('--max-age', type=float, default=0.0, help='max sensor data age in s (0: node default)')
    parser.add_argument('--max-new-tokens', type=int, default=0, help='0: node default')
    parser.add_argument('--stream', action='store_true', help='use /ask_stream and print tokens as they arrive')
    parser.add_argument('--service', default='ask', help='service name (default: ask)')
    parser.add_argument('--action', default='ask_stream', help='action name (default: ask_stream)')
    parser.add_argument('--timeout', type=float, default=120.0, help='seconds to wait for the node and the answer')
    return parser.parse_args(argv)


class SpinSafeActionClient(ActionClient):
    """rclpy's ActionClient (9.1) registers with its node before it creates the lock that its wait-set methods take,
    so an executor spinning in another thread can call them first and die ("'ActionClient' object has no attribute
    '_lock'"; seen in a CI rehearsal, after which every wait on that executor timed out). Here the lock exists
    before the registration; `ActionClient.__init__` then replaces it with its own."""

    def __init__(self, *args, **kwargs) -> None:
        self._lock = threading.Lock()
        super().__init__(*args, **kwargs)


def ask_service_client(node, name: str = 'ask'):
    """The /ask client of every caller in this package, with the server's reliable depth-256 QoS."""
    return node.create_client(Ask, name, qos_profile=SERVICE_QOS)


def ask_stream_client(node, name: str = 'ask_stream') -> ActionClient:
    """The /ask_stream client of every caller in this package, its goal, result and cancel services with the
    server's QoS (the default depth 10 drops requests when many callers arrive at once), and its feedback with the
    server's deep FEEDBACK_QOS (with continuous batching tokens come faster than a client drains them)."""
    return SpinSafeActionClient(node, AskStream, name, goal_service_qos_profile=SERVICE_QOS,
                                result_service_qos_profile=SERVICE_QOS, cancel_service_qos_profile=SERVICE_QOS,
                                feedback_sub_qos_profile=FEEDBACK_QOS)


def _fill_request(request, args):
    request.question = args.question
    request.modalities = list(args.modalities)
    request.max_age_s = float(args.max_age)
    request.max_new_tokens = int(args.max_new_tokens)
    return request


def _spin_until(condition, executor, deadline: float, interruptible: bool = True) -> bool:
    """Spin until `condition()` holds, the deadline passes or (if interruptible) a stop signal arrives."""
    while not condition() and time.monotonic() < deadline and not (interruptible and _stop_requested.is_set()):
        executor.spin_once(timeout_sec=0.1)
    return condition()


def _wait(future, executor, deadline: float, interruptible: bool = True) -> bool:
    return _spin_until(future.done, executor, deadline, interruptible)


def _interrupted() -> int:
    print('\ninterrupted', file=sys.stderr)
    return EXIT_INTERRUPTED


def _cancel(goal_handle, executor) -> int:
    """Cancel the goal and wait (bounded) until the node confirms, so the node frees the slot before we exit."""
    cancel_future = goal_handle.cancel_goal_async()
    if _wait(cancel_future, executor, time.monotonic() + CANCEL_TIMEOUT_S, interruptible=False):
        print('\ninterrupted: goal cancelled', file=sys.stderr)
    else:
        print(f'\ninterrupted: the node did not confirm the cancel within {CANCEL_TIMEOUT_S:g} s', file=sys.stderr)
    return EXIT_INTERRUPTED


def _print_result(result) -> int:
    if not result.success:
        print(f'error: {result.error}', file=sys.stderr)
        return EXIT_FAILED
    if result.note:
        print(f'note: {result.note}', file=sys.stderr)
    used = ', '.join(result.modalities_used) or 'none (text only)'
    print(f'[modalities: {used}; latency {result.latency_s:.2f} s; {result.tokens_generated} tokens, '
          f'{result.tokens_per_s:.1f} tokens/s]', file=sys.stderr)
    return 0


def _wait_for_server(is_ready, what: str, executor, timeout_s: float) -> tuple[float, Optional[int]]:
    """The request's deadline, and None once the server is ready, else the exit code (stopped or timed out)."""
    deadline = time.monotonic() + timeout_s
    if _spin_until(is_ready, executor, deadline):
        return deadline, None
    if _stop_requested.is_set():
        return deadline, _interrupted()
    print(f'error: {what} not available after {timeout_s:g} s', file=sys.stderr)
    return deadline, EXIT_TIMEOUT


def ask(node, executor, args) -> int:
    client = ask_service_client(node, args.service)
    deadline, code = _wait_for_server(client.service_is_ready, f"service '{client.srv_name}'", executor, args.timeout)
    if code is not None:
        return code
    future = client.call_async(_fill_request(Ask.Request(), args))
    if not _wait(future, executor, deadline):
        if _stop_requested.is_set():
            return _interrupted()  # a service call cannot be cancelled: the node still answers it
        print(f'error: no answer within {args.timeout:g} s', file=sys.stderr)
        return EXIT_TIMEOUT
    result = future.result()
    if result.success:
        print(result.answer)
    return _print_result(result)


def ask_stream(node, executor, args) -> int:
    client = ask_stream_client(node, args.action)
    deadline, code = _wait_for_server(client.server_is_ready, f"action '{args.action}'", executor, args.timeout)
    if code is not None:
        return code

    def on_feedback(feedback_msg):
        print(feedback_msg.feedback.new_text, end='', flush=True)

    goal_future = client.send_goal_async(_fill_request(AskStream.Goal(), args), feedback_callback=on_feedback)
    # Not interruptible: once sent, the goal must be known to be cancelled.
    if not _wait(goal_future, executor, deadline, interruptible=False):
        print('error: goal not acknowledged in time', file=sys.stderr)
        return EXIT_TIMEOUT
    goal_handle = goal_future.result()
    if not goal_handle.accepted:
        print('error: goal rejected', file=sys.stderr)
        return EXIT_FAILED
    result_future = goal_handle.get_result_async()
    if not _wait(result_future, executor, deadline):
        if _stop_requested.is_set():
            return _cancel(goal_handle, executor)
        goal_handle.cancel_goal_async()
        print(f'\nerror: no answer within {args.timeout:g} s (goal cancelled)', file=sys.stderr)
        return EXIT_TIMEOUT
    print()
    return _print_result(result_future.result().result)


def main(argv=None) -> None:
    argv = sys.argv if argv is None else argv
    args = parse_args(remove_ros_args(argv)[1:])
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_stop_signal)
    node = rclpy.create_node('ask_client')
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    code = EXIT_FAILED
    try:
        code = (ask_stream if args.stream else ask)(node, executor, args)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # nothing may interrupt the shutdown itself
            signal.signal(sig, signal.SIG_IGN)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    raise SystemExit(code)


if __name__ == '__main__':
    main()
