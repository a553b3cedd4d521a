"""Ctrl-C as a terminal delivers it: every node of the graph in one process group, signalled as a whole.

`ros2 launch` in a terminal: the terminal's SIGINT reaches every node, then launch signals each node again, so a
second SIGINT lands while the nodes are already shutting down. Every node must exit 0, without a traceback, within
2 s, also with a generation in flight; the requests in flight end with a result that says why.
"""
import signal
import sys
import time

import pytest
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray

from mm_llm_ros.node_processes import signal_group
from mm_llm_ros.ros.ask_client import ask_stream_client
from mm_llm_ros_interfaces.action import AskStream
from mm_llm_ros_interfaces.srv import Ask

# ros2 launch sends SIGKILL 5 s after SIGTERM (sigterm_timeout): every node must be gone well before that, also on
# a loaded 2-core CI machine (a quiet one takes under 1 s; one loaded CI run took 3.0 s).
EXIT_WITHIN_S = 4.0
REPEAT_PERIOD_S = 0.005  # how often the repeated signal is sent while nodes shut down (a stimulus, not a wait)


def _start_graph(node_graph, config_dir):
    tiny = [config_dir / 'tiny.yaml']
    # llm_node leads a new process group (process_group=0) that the others join: one terminal's foreground group
    llm = node_graph.start('llm_node', params_files=tiny, process_group=0,
                           params={'generation.context_length': 4096, 'generation.max_new_tokens_cap': 4000})
    group = llm.pid
    grounding = node_graph.start('grounding_node', params_files=tiny, process_group=group)
    encoder = node_graph.start('encoder', params_files=tiny, process_group=group)
    llm.wait_for_log('serving', timeout_s=60)
    grounding.wait_for_log('extracting ', timeout_s=60)
    encoder.wait_for_log('encoding ', timeout_s=60)
    return [llm, grounding, encoder]


def _generation_in_flight(test_node):
    """Start a long /ask_stream goal and return once its first tokens have streamed back."""
    client = ask_stream_client(test_node.node, '/ask_stream')
    test_node.wait_for_action_server(client)
    streamed = []
    goal = test_node.result(client.send_goal_async(
        AskStream.Goal(question='Tell me a long story.', max_new_tokens=4000),
        feedback_callback=lambda msg: streamed.append(msg.feedback.new_text)))
    assert goal.accepted
    result = goal.get_result_async()
    wait_for_feedback(streamed)
    return client, result


@pytest.mark.parametrize('signals', [
    pytest.param((signal.SIGINT,), id='sigint'),
    pytest.param((signal.SIGINT,) * 400, id='sigint-repeated-during-shutdown'),
    pytest.param((signal.SIGTERM,), id='sigterm'),
    pytest.param((signal.SIGTERM,) * 400, id='sigterm-repeated'),
])
def test_every_node_exits_cleanly_when_its_process_group_is_signalled(node_graph, config_dir, test_node, signals):
    processes = _start_graph(node_graph, config_dir)
    client, goal_result = _generation_in_flight(test_node)
    start = time.monotonic()
    for sig in signals:  # bounded: at most len(signals) signals, one every REPEAT_PERIOD_S, until all have exited
        signal_group(processes[0].popen, sig)
        if all(not p.alive() for p in processes):
            break
        time.sleep(REPEAT_PERIOD_S)
    for process in processes:
        process.popen.wait(max(0.1, start + EXIT_WITHIN_S + 8.0 - time.monotonic()))
    elapsed = time.monotonic() - start
    goal = test_node.result(goal_result, timeout_s=1.0)  # delivered before llm_node exited
    client.destroy()
    assert goal.status == GoalStatus.STATUS_ABORTED
    assert goal.result.error == f'llm_node is shutting down ({signals[0].name})'
    for process in processes:
        log = process.log()
        assert process.popen.returncode == 0, f'{process.name} exited {process.popen.returncode}:\n{log}'
        assert 'Traceback' not in log and 'KeyboardInterrupt' not in log, f'{process.name}:\n{log}'
    assert elapsed <= EXIT_WITHIN_S, f'the graph took {elapsed:.2f} s to exit'


def _queue_length(messages):
    for msg in reversed(messages):
        for status in msg.status:
            for kv in status.values:
                if kv.key == 'queue_length':
                    return int(float(kv.value))
    return None


def _wait_for_queue_length(diagnostics, length):
    diagnostics.wait_for(lambda msgs: _queue_length(msgs) == length, timeout_s=30,
                         what=f'llm_node to count {length} request(s) in flight')


@pytest.mark.parametrize('sig, running', [
    pytest.param(signal.SIGINT, 'ask_stream', id='sigint-stream-running-ask-queued'),
    pytest.param(signal.SIGTERM, 'ask', id='sigterm-ask-running-stream-queued'),
])
def test_requests_in_flight_end_with_the_shutdown_reason(node_graph, config_dir, test_node, sig, running):
    """A running and a queued request, one /ask call and one /ask_stream goal: both callers get a result with
    success false and the reason, the goal is aborted, and llm_node exits 0 within 2 s."""
    llm = node_graph.start('llm_node', params_files=[config_dir / 'tiny.yaml'],
                           params={'generation.context_length': 4096, 'generation.max_new_tokens_cap': 4000,
                                   'description.rate_hz': 0.0})
    llm.wait_for_log('serving', timeout_s=60)
    diagnostics = test_node.collect(DiagnosticArray, '/diagnostics')
    ask = test_node.node.create_client(Ask, '/ask')
    stream = ask_stream_client(test_node.node, '/ask_stream')
    try:
        test_node.wait_for_service(ask)
        test_node.wait_for_action_server(stream)
        _wait_for_queue_length(diagnostics, 0)
        streamed = []

        def send_goal():
            goal = test_node.result(stream.send_goal_async(
                AskStream.Goal(question='Tell me a long story.', max_new_tokens=4000),
                feedback_callback=lambda msg: streamed.append(msg.feedback.new_text)))
            assert goal.accepted
            return goal.get_result_async()

        def call_ask():
            return ask.call_async(Ask.Request(question='Tell me another long story.', max_new_tokens=4000))

        if running == 'ask_stream':
            goal_result = send_goal()
            wait_for_feedback(streamed)  # the goal is generating
            ask_result = call_ask()
        else:
            ask_result = call_ask()
            _wait_for_queue_length(diagnostics, 1)  # the call is generating (the worker was idle)
            goal_result = send_goal()
        _wait_for_queue_length(diagnostics, 2)  # the second request waits in the queue
        assert not ask_result.done() and not goal_result.done()

        start = time.monotonic()
        llm.signal(sig)
        reason = f'llm_node is shutting down ({sig.name})'
        try:
            answer = test_node.result(ask_result, timeout_s=5.0)
            goal = test_node.result(goal_result, timeout_s=5.0)
        except TimeoutError as exc:
            llm.popen.wait(10.0)
            raise AssertionError(f'{exc} (ask done: {ask_result.done()}, goal done: {goal_result.done()}); '
                                 f'llm_node log:\n{llm.log()}') from exc
        code = llm.popen.wait(10.0)
        elapsed = time.monotonic() - start
        log = llm.log()
        assert (answer.success, answer.error) == (False, reason), log
        assert goal.status == GoalStatus.STATUS_ABORTED, log
        assert (goal.result.success, goal.result.error) == (False, reason), log
        assert code == 0 and 'Traceback' not in log, log
        assert elapsed <= EXIT_WITHIN_S, f'llm_node took {elapsed:.2f} s to exit'
    finally:
        stream.destroy()
        test_node.node.destroy_client(ask)
        diagnostics.close()


def wait_for_feedback(streamed, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not streamed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert streamed, 'no feedback from the generation'


SLOW_STARTING_NODE = """
import os, signal, time
from rclpy.node import Node
from mm_llm_ros.ros.node_main import exit_now, run_node

def factory():  # a node whose constructor is still loading a model when the launch is stopped
    print('constructing', flush=True)
    for _ in range({repeats}):
        os.kill(os.getpid(), signal.{signal})
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        sum(range(1000))
    print('constructor finished', flush=True)
    return Node('slow_starter')

exit_now(run_node(factory))
"""


@pytest.mark.parametrize('sig, repeats', [
    pytest.param(signal.SIGINT, 1, id='sigint'),
    pytest.param(signal.SIGINT, 3, id='sigint-repeated'),
    pytest.param(signal.SIGTERM, 2, id='sigterm-repeated'),
])
def test_a_node_stopped_while_it_starts_exits_0_at_once(node_graph, sig, repeats):
    code = SLOW_STARTING_NODE.format(signal=sig.name, repeats=repeats)
    process = node_graph.start_command('slow_starter', [sys.executable, '-c', code])
    start = time.monotonic()
    returncode = process.popen.wait(15.0)
    elapsed = time.monotonic() - start
    log = process.log()
    assert returncode == 0 and 'constructing' in log and 'constructor finished' not in log, log
    assert 'Traceback' not in log and 'KeyboardInterrupt' not in log, log
    assert elapsed <= 5.0, f'{elapsed:.2f} s (the constructor was not interrupted)'


FAILING_NODE = """
from rclpy.node import Node
from mm_llm_ros.ros.node_main import exit_now, run_node

class Failing(Node):
    def __init__(self):
        super().__init__('failing')
        self.create_timer(0.05, self.tick)

    def tick(self):
        raise RuntimeError('a bug in a callback')

exit_now(run_node(Failing))
"""


def test_a_node_whose_executor_fails_exits_non_zero(node_graph):
    """The executor spins on a thread: an exception escaping it must still fail the process (a launch then shuts
    down), not end it with 0 as if it had been stopped."""
    process = node_graph.start_command('failing', [sys.executable, '-c', FAILING_NODE])
    returncode = process.popen.wait(15.0)
    assert returncode not in (0, None) and 'RuntimeError: a bug in a callback' in process.log(), process.log()
