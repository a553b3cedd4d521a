"""The `ask` executable over DDS: stopped while streaming, it cancels its goal and the node frees the slot.

A terminal's Ctrl-C reaches `ros2 run`'s whole process group and `ros2 run` forwards another SIGINT to the
client, so the client is stopped once, twice, or with SIGTERM by a supervisor.
"""
import signal
import time

import pytest
from diagnostic_msgs.msg import DiagnosticArray

from mm_llm_ros.ros.ask_client import EXIT_INTERRUPTED, ask_stream_client

EXIT_WITHIN_S = 5.0   # generous on a loaded 2-core machine; the cancel itself is a few ms on loopback


def _value(messages, key):
    for msg in reversed(messages):
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            if key in values:
                return float(values[key])
    return None


@pytest.mark.parametrize('signals', [
    pytest.param((signal.SIGINT,), id='sigint'),
    pytest.param((signal.SIGINT, signal.SIGINT), id='sigint-twice'),
    pytest.param((signal.SIGTERM,), id='sigterm'),
])
def test_stopped_stream_cancels_its_goal(node_graph, test_node, config_dir, signals):
    llm = node_graph.start('llm_node', params_files=[config_dir / 'tiny.yaml'],
                           params={'generation.context_length': 4096, 'generation.max_new_tokens_cap': 4000,
                                   'description.rate_hz': 0.0})
    llm.wait_for_log('serving', timeout_s=60)
    diagnostics = test_node.collect(DiagnosticArray, '/diagnostics')
    try:
        diagnostics.wait_for(lambda msgs: _value(msgs, 'cancelled_requests') == 0, what='llm_node diagnostics')
        client = node_graph.start('ask', args=['Tell me a long story.', '--stream', '--max-new-tokens', '4000'])
        # The client prints streamed tokens as they arrive: wait until some have (the goal is running).
        baseline = len(client.log())
        deadline = time.monotonic() + 30.0
        while len(client.log().strip()) <= baseline and client.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.alive() and client.log().strip(), f'no streamed text:\n{client.log()}'
        start = time.monotonic()
        for sig in signals:
            client.signal(sig)
        code = client.popen.wait(EXIT_WITHIN_S + 10.0)
        elapsed = time.monotonic() - start
        log = client.log()
        assert code == EXIT_INTERRUPTED, log
        assert 'goal cancelled' in log and 'Traceback' not in log, log
        assert elapsed <= EXIT_WITHIN_S
        # The node counted the cancel and holds nothing in flight: the slot is free at once.
        diagnostics.wait_for(lambda msgs: _value(msgs, 'cancelled_requests') == 1
                             and _value(msgs, 'queue_length') == 0, timeout_s=10, what='the cancel to be counted')
    finally:
        diagnostics.close()


def test_the_stream_client_can_be_created_while_an_executor_spins(test_node, monkeypatch):
    """rclpy's ActionClient registers with its node before it creates the lock its wait-set methods take; an
    executor spinning in another thread that polls it in between dies (seen in a CI rehearsal). Made deterministic
    here: the registration itself polls the client, as that executor would next."""
    import rclpy

    node = rclpy.create_node('spin_race', context=test_node.context)  # not spun: a failure here stays here
    try:
        register = node.add_waitable

        def register_and_poll(waitable):
            register(waitable)
            waitable.get_num_entities()

        monkeypatch.setattr(node, 'add_waitable', register_and_poll)
        client = ask_stream_client(node, 'spin_race_stream')
        assert client.get_num_entities().num_subscriptions == 2  # feedback and status
    finally:
        node.destroy_node()
