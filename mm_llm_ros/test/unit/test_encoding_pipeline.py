"""EncoderWorker: latest-only hand-off, one batched forward per step, rejections by reason, survival."""
import threading

import numpy as np
import pytest
import torch

from mm_llm_ros.core.encoding_pipeline import EncoderWorker, InputRejected, Prepared, Stream
from mm_llm_ros.core.sensor_decoding import DecodeError, DecodeReason


class RecordingEncoder:
    def __init__(self, fail_first=False):
        self.batches = []
        self.fail_first = fail_first

    def encode(self, batch):
        self.batches.append({m: tuple(t.shape) for m, t in batch.items()})
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError('CUDA out of memory')
        return {m: t.flatten(1)[:, :4].numpy() * 2 for m, t in batch.items()}


def prepare_as(modality):
    def prepare(item):
        if item == 'garbage':
            raise DecodeError(DecodeReason.SIZE_MISMATCH, 'data is 3 bytes, expected 12')
        if item == 'not yet':
            return None
        if item == 'no camera info':
            raise InputRejected('no_camera_info', 'no CameraInfo yet')
        return Prepared(modality, torch.full((2, 2), float(item)), stamp_ns=item, frame_id=f'{modality}_frame')
    return prepare


@pytest.fixture
def published():
    return []


def make_worker(streams, published, encoder=None):
    return EncoderWorker(encoder or RecordingEncoder(), streams,
                         lambda stream, item, vector: published.append((stream.name, item.stamp_ns, vector[0])),
                         now_ns=lambda: 10**9)


def test_only_the_freshest_item_is_encoded_and_replaced_ones_are_counted(published):
    camera = Stream('camera', '/camera/image_raw', prepare_as('vision'), max_rate_hz=0)
    worker = make_worker([camera], published)
    for stamp in (1, 2, 3):
        camera.offer(stamp)
    assert worker.step([camera]) == 1
    assert published == [('camera', 3, 6.0)]
    snapshot = camera.snapshot()
    assert (snapshot['received'], snapshot['dropped'], snapshot['encoded']) == (3, 2, 1)


def test_streams_are_batched_into_one_forward(published):
    streams = [Stream('camera', '/a', prepare_as('vision'), 0), Stream('lidar', '/b', prepare_as('depth'), 0),
               Stream('depth_camera', '/c', prepare_as('depth'), 0)]
    encoder = RecordingEncoder()
    worker = make_worker(streams, published, encoder)
    for i, stream in enumerate(streams):
        stream.offer(i + 1)
    assert worker.step(streams) == 3
    assert encoder.batches == [{'vision': (1, 2, 2), 'depth': (2, 2, 2)}]  # one forward, depth batched
    assert sorted(published) == [('camera', 1, 2.0), ('depth_camera', 3, 6.0), ('lidar', 2, 4.0)]


def test_bad_input_is_counted_by_reason_and_logged(published):
    camera = Stream('camera', '/camera/image_raw', prepare_as('vision'), 0)
    messages = []
    worker = EncoderWorker(RecordingEncoder(), [camera], lambda *a: published.append(a),
                           on_rejected=lambda stream, message: messages.append(message))
    for item in ('garbage', 'no camera info', 'garbage', 'not yet'):
        camera.offer(item)
        worker.step([camera])
    assert published == []
    snapshot = camera.snapshot()
    assert snapshot['rejected'] == 3
    assert snapshot['rejected_size_mismatch'] == 2 and snapshot['rejected_no_camera_info'] == 1
    assert messages[0] == 'size_mismatch: data is 3 bytes, expected 12'


def test_the_thread_survives_a_failing_model_and_keeps_encoding(published):
    camera = Stream('camera', '/camera/image_raw', prepare_as('vision'), max_rate_hz=0)
    delivered = threading.Event()
    worker = EncoderWorker(RecordingEncoder(fail_first=True), [camera],
                           lambda stream, item, vector: (published.append(item.stamp_ns), delivered.set()))
    worker.start()
    try:
        camera.offer(1)   # its forward raises
        for stamp in range(2, 200):   # bounded: until one encodes after the failure
            camera.offer(stamp)
            if delivered.wait(0.05):
                break
        assert delivered.is_set() and published[0] >= 2
        assert worker.failures == 1 and worker.running
    finally:
        worker.stop()
    assert not worker.running


def test_rate_limit_holds_items_until_due():
    clock = [0.0]
    camera = Stream('camera', '/camera/image_raw', prepare_as('vision'), max_rate_hz=2.0, clock=lambda: clock[0])
    assert camera.limiter.ready()
    camera.limiter.mark()
    assert not camera.limiter.ready() and camera.limiter.wait_s() == pytest.approx(0.5)
    clock[0] = 0.5
    assert camera.limiter.ready()


def test_latency_is_measured_from_the_sensor_stamp(published):
    camera = Stream('camera', '/camera/image_raw', prepare_as('vision'), 0)
    worker = make_worker([camera], published)
    camera.offer(10**9 - 250_000_000)   # stamped 0.25 s before "now"
    worker.step([camera])
    assert camera.snapshot()['latency_p50_s'] == pytest.approx(0.25)
    assert np.isfinite(camera.snapshot()['preprocess_p50_s'])
