"""The graph robot.launch.py starts, run from the same plan and YAML files, answers end to end; the demo runs."""
import subprocess
import time

import pytest

from mm_llm_ros.launch_plan import plan_nodes
from mm_llm_ros.node_processes import executable_path
from mm_llm_ros.ros.qos import LATCHED_QOS, SERVICE_QOS
from mm_llm_ros_interfaces.msg import PerceptionContext
from mm_llm_ros_interfaces.srv import Ask


def test_launch_plan_graph_answers_about_a_replayed_scene(node_graph, test_node, config_dir):
    """robot.launch.py's nodes (encoder, grounding_node, llm_node) with tiny.yaml, fed by sensor_replay."""
    specs = plan_nodes({'params_file': str(config_dir / 'tiny.yaml')})
    assert [s.executable for s in specs] == ['encoder', 'grounding_node', 'llm_node']
    processes = [node_graph.start_spec(spec) for spec in specs]
    node_graph.start('sensor_replay', params={'source': '', 'loop': True, 'duration_s': 120.0})

    client = test_node.node.create_client(Ask, '/ask', qos_profile=SERVICE_QOS)
    ocr = test_node.collect(PerceptionContext, '/mm_llm/context/ocr', LATCHED_QOS)
    test_node.wait_for_service(client, timeout_s=60)
    # OCR is the slowest input (seconds per frame on 2 loaded cores): wait for its first result, not for a number
    # of answers, which take milliseconds with the tiny model.
    ocr.wait_for(timeout_s=120, what='the first OCR result')
    wanted = {'camera', 'audio', 'lidar', 'ocr', 'geometry'}  # sources and context kinds
    response = None
    # The rest of the scene arrives within seconds, but a tiny-model answer takes milliseconds: bound the tries by
    # time as well as by count (a count alone ran out before the first embedding on a loaded machine).
    deadline = time.monotonic() + 90.0
    for _ in range(5000):  # each try is a real request
        response = test_node.call(client, Ask.Request(question='What text can you read?', max_new_tokens=4,
                                                      max_age_s=30.0), 60)
        if wanted <= set(response.modalities_used) or time.monotonic() > deadline:
            break
    assert response.success, response.error
    assert wanted <= set(response.modalities_used)
    assert len(response.source_stamps) == len(response.modalities_used)
    assert all(p.alive() for p in processes)
    test_node.node.destroy_client(client)
    ocr.close()


@pytest.mark.slow
def test_demo_runs_on_the_generated_scene(tmp_path):
    """README command 1 without ../shared: the generated scene, the real SmolLM2, real answers, exit 0."""
    done = subprocess.run([str(executable_path('demo')), '--scene', '', '--log-dir', str(tmp_path)],
                          capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count('Q (ask') == 4 and 'demo finished' in done.stdout
    assert "received ocr           'LOADING DOCK B'" in done.stdout
    assert 'tokens/s' in done.stdout and 'zero-gated' in done.stdout


@pytest.mark.slow
@pytest.mark.shared_data
def test_demo_preset_reads_the_truck_sign_on_the_nuscenes_scene(node_graph, test_node, config_dir, shared_data):
    """Issue 6, acceptance 4: with OCR context, the real SmolLM2 at temperature 0 answers with 'POKKA'."""
    for spec in plan_nodes({'params_file': str(config_dir / 'demo.yaml')}):
        node_graph.start_spec(spec)
    node_graph.start('sensor_replay', params={'source': f'nuscenes:{shared_data}', 'loop': True,
                                              'duration_s': 300.0})
    client = test_node.node.create_client(Ask, '/ask', qos_profile=SERVICE_QOS)
    test_node.wait_for_service(client, timeout_s=180)  # first start converts the GGUF once (~20-40 s)
    request = Ask.Request(question='What text can you read?', modalities=['ocr'], max_age_s=60.0)
    response = None
    for _ in range(60):  # until the first OCR result has arrived; bounded
        response = test_node.call(client, request, 120, resend_after_s=60)  # the embedded model's answer
        if 'ocr' in response.modalities_used:
            break
    assert response.success and response.modalities_used == ['ocr'], (response.error, response.note)
    assert 'POKKA' in response.answer.upper(), response.answer
    test_node.node.destroy_client(client)


def test_one_process_per_sensor_reads_the_one_encoder_section(node_graph, config_dir):
    """single_process:=false with demo.yaml, which has one encoder section: each process takes its settings."""
    specs = [s for s in plan_nodes({'params_file': str(config_dir / 'demo.yaml'), 'single_process': 'false',
                                    'use_grounding': 'false'}) if s.executable == 'encoder']
    # demo.yaml also turns on the thermal camera and the IMU its replay publishes.
    assert [s.name for s in specs] == ['camera_encoder', 'audio_encoder', 'lidar_encoder', 'thermal_encoder',
                                       'imu_encoder']
    processes = [node_graph.start_spec(spec) for spec in specs]
    for process, sensor in zip(processes, ('camera', 'audio', 'lidar', 'thermal_camera', 'imu')):
        process.wait_for_log('encoding ', timeout_s=120)
        log = process.log()
        assert f'encoding {sensor} <- ' in log and 'imagebind_tiny (random weights)' in log, log[-2000:]
        assert log.count(' <- ') == 1  # only its own sensor


def test_fleet_split_deployment_serves_a_robot_from_the_server(node_graph, test_node, config_dir):
    """Fleet mode as launched on two machines, here in one network namespace: role:=robot namespace:=robot1 (the
    encoder and grounding_node, fed by robot1's sensor replay), and role:=server robots:=robot1,robot2 (llm_node
    alone). /robot1/ask answers from robot1's sensors; /robot2/ask, whose robot publishes nothing, from none."""
    from mm_llm_ros.node_processes import command_for
    tiny = str(config_dir / 'tiny.yaml')
    robot = plan_nodes({'params_file': tiny, 'role': 'robot', 'namespace': 'robot1'})
    server = plan_nodes({'params_file': tiny, 'role': 'server', 'robots': 'robot1,robot2'})
    assert [s.executable for s in robot] == ['encoder', 'grounding_node'] and [s.executable for s in server] == [
        'llm_node']
    # robot.launch.py pushes `namespace` onto the robot's nodes; as processes that is a `__ns` remapping.
    for spec in robot:
        node_graph.start_command(spec.name, command_for(spec) + ['-r', '__ns:=/robot1'])
    llm = node_graph.start_spec(server[0])
    node_graph.start('sensor_replay', params={'source': '', 'loop': True, 'duration_s': 120.0},
                     remap={'__ns': '/robot1'})
    clients = {r: test_node.node.create_client(Ask, f'/{r}/ask', qos_profile=SERVICE_QOS) for r in ('robot1', 'robot2')}
    try:
        for client in clients.values():
            test_node.wait_for_service(client, timeout_s=60)
        wanted = {'camera', 'audio', 'lidar'}
        response = None
        # The encoder's first embeddings arrive within seconds, a tiny-model answer in milliseconds: bounded by
        # time as well as by count, as above.
        deadline = time.monotonic() + 90.0
        for _ in range(5000):  # each try is a real request
            response = test_node.call(clients['robot1'], Ask.Request(question='What is around?', max_new_tokens=4,
                                                                     max_age_s=30.0), 60)
            if wanted <= set(response.modalities_used) or time.monotonic() > deadline:
                break
        assert response.success and wanted <= set(response.modalities_used), response.note
        other = test_node.call(clients['robot2'], Ask.Request(question='What is around?', max_new_tokens=4,
                                                              max_age_s=30.0), 60)
        assert other.success and other.modalities_used == [] and 'nothing perceived' in other.note
        assert llm.alive() and 'serving /robot1/ask and /robot1/ask_stream, /robot2/ask' in llm.log()
    finally:
        for client in clients.values():
            test_node.node.destroy_client(client)
