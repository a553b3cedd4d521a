"""The sensor_replay executable over DDS: what it publishes, on which topics and frames, at which rates."""
import threading
import time

import numpy as np
import pytest
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, Imu, PointCloud2
from std_msgs.msg import String

from mm_llm_ros.core.replay import synthetic
from mm_llm_ros.core.replay.sensor_files import read_points
from mm_llm_ros.ros.conversions import (audio_from_msg, compressed_image_from_msg, image_from_msg,
                                        pointcloud_from_msg, stamp_to_ns)
from mm_llm_ros_interfaces.msg import AudioChunk

EXIT_TIMEOUT_S = 20.0


def start_replay(node_graph, **params):
    return node_graph.start('sensor_replay', params={'wait_for_subscribers': 1, 'loop': True, **params})


def wait_for_exit(process, timeout_s=EXIT_TIMEOUT_S) -> int:
    return process.popen.wait(timeout_s)


def stamps_s(msgs):
    return np.array([stamp_to_ns(m.header.stamp) for m in msgs]) / 1e9


def test_synthetic_scene_streams_every_sensor_live(node_graph, collect):
    duration_s, rate_hz = 4.0, 2.0
    images = collect(Image, '/camera/image_raw')
    infos = collect(CameraInfo, '/camera/camera_info')
    clouds = collect(PointCloud2, '/points')
    audio = collect(AudioChunk, '/audio')
    process = start_replay(node_graph, duration_s=duration_s, rate_hz=rate_hz)
    assert wait_for_exit(process) == 0, process.log()
    assert 'replay finished after' in process.log()

    expected_frames = int(duration_s * rate_hz)
    for collector in (images, clouds):  # best effort on loopback: allow one lost sample
        assert expected_frames - 1 <= len(collector.messages) <= expected_frames
        stamps = stamps_s(collector.messages)
        assert np.all(np.diff(stamps) > 0)
        assert np.median(np.diff(stamps)) == pytest.approx(1 / rate_hz, abs=0.05)
    image = images.messages[0]
    assert image.header.frame_id == 'camera_optical_frame' and (image.width, image.height) == (1280, 720)
    np.testing.assert_array_equal(image_from_msg(image).rgb, synthetic.street_image())

    info_by_stamp = {stamp_to_ns(m.header.stamp): m for m in infos.messages}
    paired = [info_by_stamp.get(stamp_to_ns(m.header.stamp)) for m in images.messages]
    assert sum(info is not None for info in paired) >= expected_frames - 2  # same stamp as its image
    info = next(info for info in paired if info is not None)
    assert info.header.frame_id == 'camera_optical_frame' and (info.width, info.height) == (1280, 720)
    assert tuple(info.k) == synthetic.INTRINSICS.k

    cloud = clouds.messages[0]
    assert cloud.header.frame_id == 'lidar'
    decoded = pointcloud_from_msg(cloud)
    expected = read_points_from_seed()
    np.testing.assert_array_equal(decoded.xyz, expected.xyz)
    np.testing.assert_array_equal(decoded.intensity, expected.intensity)

    chunks = audio.messages
    assert len(chunks) >= int(duration_s / 0.1) - 2
    assert all(c.header.frame_id == 'microphone' and c.sample_rate == 16000 and c.channels == 1 for c in chunks)
    assert all(len(audio_from_msg(c).waveform[0]) == 1600 for c in chunks)
    gaps = np.diff([stamp_to_ns(c.header.stamp) for c in chunks])
    assert np.count_nonzero(gaps == 100_000_000) >= len(gaps) - 2  # stamps = start + sample offset, exact
    # Real time, not a burst: the audio arrived over (nearly) the whole replay, like the frames.
    assert stamps_s(chunks)[-1] - stamps_s(chunks)[0] == pytest.approx(duration_s - 0.1, abs=0.25)


def read_points_from_seed():
    """The cloud the node generates (seed 0), read back as the node reads it."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        scene = synthetic.write_synthetic_scene(folder)
        return read_points(scene.streams[1].files[0])


def test_compressed_transport(node_graph, collect):
    images = collect(CompressedImage, '/camera/image_raw/compressed')
    for msg_type, topic in ((PointCloud2, '/points'), (AudioChunk, '/audio'), (Image, '/thermal/image_raw'),
                            (Imu, '/imu')):
        collect(msg_type, topic)  # wait_for_subscribers counts every replayed topic
    process = start_replay(node_graph, duration_s=1.5, image_transport='compressed')
    assert wait_for_exit(process) == 0, process.log()
    assert images.messages and 'without 1 subscriber' not in process.log(), process.log()
    msg = images.messages[0]
    assert 'jpeg' in msg.format and msg.header.frame_id == 'camera_optical_frame'
    assert compressed_image_from_msg(msg).rgb.shape == (720, 1280, 3)


@pytest.mark.shared_data
def test_nuscenes_scene(node_graph, collect, shared_data):
    topics = {'/camera/image_raw': Image, '/camera/camera_info': CameraInfo, '/points': PointCloud2,
              '/audio': AudioChunk, **{f'/cameras/{name}/image_raw': Image for name in
                                       ('cam_front_left', 'cam_front_right', 'cam_back', 'cam_back_left',
                                        'cam_back_right')}}
    collectors = {topic: collect(msg_type, topic) for topic, msg_type in topics.items()}
    process = start_replay(node_graph, source=f'nuscenes:{shared_data}', duration_s=2.0)
    assert wait_for_exit(process) == 0, process.log()
    for topic, collector in collectors.items():
        assert collector.messages, f'nothing on {topic}'
    front = collectors['/camera/image_raw'].messages[0]
    assert front.header.frame_id == 'CAM_FRONT' and (front.width, front.height) == (1600, 900)
    info = collectors['/camera/camera_info'].messages[0]
    assert info.header.frame_id == 'CAM_FRONT' and info.k[0] == pytest.approx(1266.417203046554)
    assert collectors['/cameras/cam_back/image_raw'].messages[0].header.frame_id == 'CAM_BACK'
    cloud = collectors['/points'].messages[0]
    assert cloud.header.frame_id == 'LIDAR_TOP' and cloud.width == 34688
    assert pointcloud_from_msg(cloud).intensity.max() == 255.0
    chunk = collectors['/audio'].messages[0]
    assert chunk.sample_rate == 44100 and chunk.channels == 1


@pytest.mark.shared_data
def test_mcap_bag_replays_in_order_with_recorded_timing(node_graph, test_node, shared_data):
    received = []  # (arrival time, text)
    lock = threading.Lock()

    def on_message(msg):
        with lock:
            received.append((time.monotonic(), msg.data))
    subscription = test_node.node.create_subscription(String, '/topic', on_message,
                                                      QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    process = start_replay(node_graph, source=str(shared_data / 'bags/rosbag2_talker_mcap/talker.mcap'),
                           loop=False)
    try:
        assert wait_for_exit(process) == 0, process.log()
    finally:
        test_node.node.destroy_subscription(subscription)
    with lock:
        arrivals, texts = zip(*received) if received else ((), ())
    assert list(texts) == [f'Hello, world! {i}' for i in range(10)]
    # Recorded every 0.5 s, 4.53 s in all. A loaded machine can deliver two at once, so the span is what is checked:
    # a replay that ignored the recorded timing would deliver all ten within a fraction of a second.
    assert 4.0 < arrivals[-1] - arrivals[0] < 9.0
    assert np.median(np.diff(arrivals)) > 0.25
    assert 'published /topic 10' in process.log()


def test_bad_source_fails_fast_with_a_clear_message(node_graph, tmp_path):
    process = node_graph.start('sensor_replay', params={'source': str(tmp_path / 'missing.mcap')})
    assert wait_for_exit(process) == 1
    assert 'not found' in process.log() and 'Traceback' not in process.log()
