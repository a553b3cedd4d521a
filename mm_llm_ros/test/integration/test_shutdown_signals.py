"""Ctrl-C as a terminal delivers it: every node of the graph in one process group, signalled as a whole.

`ros2 launch` in a terminal: the terminal's SIGINT reaches every node, then launch signals each node again, so a
second SIGINT lands while the nodes are already shutting down. Every node must exit 0, without a traceback, within
2 s, also with a generation in flight.
"""
import signal
import time

import pytest
from rclpy.action import ActionClient

from mm_llm_ros.node_processes import signal_group
from mm_llm_ros_interfaces.action import AskStream

EXIT_WITHIN_S = 2.0
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
    client = ActionClient(test_node.node, AskStream, '/ask_stream')
    test_node.wait_for_action_server(client)
    streamed = []
    goal = test_node.result(client.send_goal_async(
        AskStream.Goal(question='Tell me a long story.', max_new_tokens=4000),
        feedback_callback=lambda msg: streamed.append(msg.feedback.new_text)))
    assert goal.accepted
    deadline = time.monotonic() + 30.0
    while not streamed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert streamed, 'no feedback from the generation'
    return client


@pytest.mark.parametrize('signals', [
    pytest.param((signal.SIGINT,), id='sigint'),
    pytest.param((signal.SIGINT,) * 400, id='sigint-repeated-during-shutdown'),
    pytest.param((signal.SIGTERM,), id='sigterm'),
    pytest.param((signal.SIGTERM,) * 400, id='sigterm-repeated'),
])
def test_every_node_exits_cleanly_when_its_process_group_is_signalled(node_graph, config_dir, test_node, signals):
    processes = _start_graph(node_graph, config_dir)
    client = _generation_in_flight(test_node)
    start = time.monotonic()
    for sig in signals:  # bounded: at most len(signals) signals, one every REPEAT_PERIOD_S, until all have exited
        signal_group(processes[0].popen, sig)
        if all(not p.alive() for p in processes):
            break
        time.sleep(REPEAT_PERIOD_S)
    for process in processes:
        process.popen.wait(max(0.1, start + EXIT_WITHIN_S + 8.0 - time.monotonic()))
    elapsed = time.monotonic() - start
    client.destroy()
    for process in processes:
        log = process.log()
        assert process.popen.returncode == 0, f'{process.name} exited {process.popen.returncode}:\n{log}'
        assert 'Traceback' not in log and 'KeyboardInterrupt' not in log, f'{process.name}:\n{log}'
    assert elapsed <= EXIT_WITHIN_S, f'the graph took {elapsed:.2f} s to exit'
