"""A normal run leaves only the nodes' own log lines: no Python warnings, no progress bars, no tracebacks.

The nodes robot.launch.py starts with config:=demo (the models a user first meets: the embedded SmolLM2, the tiny
ImageBind, OCR, audio events, lidar geometry) fed by sensor_replay's generated scene, asked through /ask and
/ask_stream, then stopped with SIGINT. Every line each process wrote must be a formatted ROS log line.
"""
import re
import time

import pytest
from action_msgs.msg import GoalStatus

from mm_llm_ros.launch_plan import plan_nodes
from mm_llm_ros.ros.ask_client import ask_stream_client
from mm_llm_ros.ros.qos import LATCHED_QOS, SERVICE_QOS
from mm_llm_ros_interfaces.action import AskStream
from mm_llm_ros_interfaces.msg import PerceptionContext
from mm_llm_ros_interfaces.srv import Ask

ROS_LOG_LINE = re.compile(r'^\[(DEBUG|INFO|WARN|ERROR|FATAL)\] \[\d+\.\d+\] \[[\w.]+\]: \S')
NOISE = (re.compile(r'\w*Warning: '),            # Python warnings (warnings.warn), also inside a ROS line
         re.compile(r'\d+%\|'),                  # tqdm bars ('Loading weights:  42%|####')
         re.compile(r'Traceback|Exception'))
START_TIMEOUT_S = 120.0


def unexpected_lines(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if line.strip() and (not ROS_LOG_LINE.match(line) or any(p.search(line) for p in NOISE))]


def test_unexpected_lines_are_found():
    """The check itself: a bare warning, a progress bar, a traceback and a warning logged through ROS are noise."""
    log = '\n'.join([
        '[INFO] [1796396403.662077262] [llm_node]: LLM ready: tiny-random-0 on cpu float32, static decoder',
        '[WARN] [1796396415.945154713] [mm_llm_ros.core.imagebind.model]: imagebind_tiny runs with RANDOM weights',
        'imagebind_tiny runs with RANDOM weights (seed 0): its embeddings carry no meaning',
        'Loading weights: 100%|##########| 272/272 [00:00<00:00, 1234.5it/s]',
        '/venv/lib/python3.11/site-packages/torch/nn/modules/module.py:1: UserWarning: deprecated',
        '[WARN] [1796396415.9] [py.warnings]: x.py:3: FutureWarning: soon',
        'Traceback (most recent call last):',
        '',
    ])
    assert unexpected_lines(log) == log.splitlines()[2:7]


@pytest.mark.slow
def test_a_normal_run_of_the_demo_graph_logs_no_warnings_bars_or_tracebacks(node_graph, test_node, config_dir):
    processes = [node_graph.start_spec(spec) for spec in plan_nodes({'params_file': str(config_dir / 'demo.yaml')})]
    assert [p.name for p in processes] == ['encoder', 'grounding_node', 'llm_node']
    processes.append(node_graph.start('sensor_replay', params={'source': '', 'loop': True, 'duration_s': 300.0}))
    contexts = {kind: test_node.collect(PerceptionContext, f'/mm_llm/context/{kind}', LATCHED_QOS)
                for kind in ('ocr', 'audio_events', 'geometry')}
    ask = test_node.node.create_client(Ask, '/ask', qos_profile=SERVICE_QOS)
    stream = ask_stream_client(test_node.node, '/ask_stream')
    try:
        test_node.wait_for_service(ask, timeout_s=START_TIMEOUT_S)
        test_node.wait_for_action_server(stream, timeout_s=START_TIMEOUT_S)
        for kind, collector in contexts.items():  # every extractor has run its model at least once
            collector.wait_for(timeout_s=START_TIMEOUT_S, what=f'the first {kind} result')
        response = None
        # Until an embedding has arrived (the encoder ran its model); each try is a request, a tiny-model answer
        # takes milliseconds, so the tries are bounded by time as well as by count.
        deadline = time.monotonic() + 90.0
        for _ in range(5000):
            response = test_node.call(ask, Ask.Request(question='What do you see?', max_new_tokens=4, max_age_s=30.0), 60)
            if 'camera' in response.modalities_used or time.monotonic() > deadline:
                break
        assert response.success and 'camera' in response.modalities_used, (response.error, response.note)
        goal = test_node.result(stream.send_goal_async(AskStream.Goal(question='Describe the scene.',
                                                                      max_new_tokens=8)))
        assert goal.accepted
        assert test_node.result(goal.get_result_async(), 60).status == GoalStatus.STATUS_SUCCEEDED
    finally:
        stream.destroy()
        test_node.node.destroy_client(ask)
        for collector in contexts.values():
            collector.close()
    for process in processes:  # the graph first, while the sensors still stream (as Ctrl-C on a robot), then replay
        assert process.stop() == 0, process.log()
    assert 'not all sent' not in processes[2].log()  # sensor traffic does not hold up llm_node's stop
    noise = {p.name: unexpected_lines(p.log()) for p in processes}
    assert not any(noise.values()), '\n'.join(f'{name}: {lines}' for name, lines in noise.items() if lines)
