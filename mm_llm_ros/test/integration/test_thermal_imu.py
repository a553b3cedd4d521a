"""Thermal camera and IMU over DDS: the demo replay publishes them, the encoder embeds them with ImageBind's thermal
and IMU encoders, and llm_node fuses both into an answer."""
import numpy as np
import pytest
from sensor_msgs.msg import Image, Imu

from mm_llm_ros.core import specs
from mm_llm_ros.ros.conversions import stamp_to_ns, thermal_from_msg
from mm_llm_ros.ros.qos import EMBEDDING_QOS
from mm_llm_ros_interfaces.msg import Embedding
from mm_llm_ros_interfaces.srv import Ask


def test_replay_thermal_and_imu_reach_the_answer(node_graph, test_node, config_dir, collect):
    thermal_frames = collect(Image, '/' + specs.SENSORS['thermal_camera'].topic)
    imu_samples = collect(Imu, '/' + specs.SENSORS['imu'].topic)
    embeddings = {name: collect(Embedding, '/' + specs.SENSORS[name].embedding_topic, EMBEDDING_QOS)
                  for name in ('thermal_camera', 'imu')}
    llm = node_graph.start('llm_node', params_files=[config_dir / 'tiny.yaml'])
    encoder = node_graph.start('encoder', params_files=[config_dir / 'tiny.yaml'],
                               params={'use_camera': False, 'use_audio': False, 'use_lidar': False,
                                       'use_thermal_camera': True, 'use_imu': True})
    llm.wait_for_log('serving', timeout_s=60)
    encoder.wait_for_log('encoding ', timeout_s=60)
    node_graph.start('sensor_replay', params={'wait_for_subscribers': 1, 'loop': True, 'rate_hz': 2.0})

    # The IMU window needs 5 s of history: the first IMU embedding comes about 5 s after the replay starts.
    for name, collector in embeddings.items():
        collector.wait_for(lambda msgs: len(msgs) >= 1, timeout_s=60, what=f'an embedding from {name}')
    for name, modality in (('thermal_camera', 'thermal'), ('imu', 'imu')):
        msg = embeddings[name].messages[0]
        assert msg.modality == modality and np.isfinite(msg.embedding).all() and len(msg.embedding) > 0
    frame = thermal_frames.messages[0]
    assert frame.encoding == 'mono16' and frame.header.frame_id == specs.SENSORS['thermal_camera'].default_frame
    assert 250 < np.median(thermal_from_msg(frame).values / 100.0) < 300  # centikelvin of a cool night street
    # A best-effort subscriber on a loaded machine drops samples in bursts: wait for 200 rather than count them at
    # the moment of the first IMU embedding (95 had arrived then in one CI rehearsal).
    imu_samples.wait_for(lambda msgs: len(msgs) > 200, timeout_s=60, what='200 IMU samples')
    stamps = np.array([stamp_to_ns(m.header.stamp) for m in imu_samples.messages]) / 1e9
    assert np.median(np.diff(np.sort(stamps))) == pytest.approx(1 / 200, rel=0.01)  # published at 200 Hz

    client = test_node.node.create_client(Ask, '/ask')
    try:
        test_node.wait_for_service(client)
        response = test_node.call(client, Ask.Request(
            question='How is the robot moving?', modalities=['thermal', 'imu'], max_new_tokens=4), 60.0)
        assert response.success, response.error
        assert sorted(response.modalities_used) == ['imu', 'thermal_camera'], response.note
    finally:
        test_node.node.destroy_client(client)
