"""Message adapters: round trips through real ROS message classes and their CDR serialisation."""
import types
import wave

import cv2
import numpy as np
import pytest

from mm_llm_ros.core.sensor_decoding import DecodeError
from mm_llm_ros.ros.conversions import (audio_from_msg, audio_to_msg, compressed_image_from_msg,
                                        compressed_image_to_msg, image_from_msg, image_to_msg, ns_to_stamp,
                                        pointcloud_from_msg, pointcloud_to_msg, stamp_to_ns)

NUSCENES_CAM = 'images/nuscenes/n015-2018-07-24-11-22-45+0800__CAM_FRONT__1532402927612460.jpg'
NUSCENES_LIDAR = 'pointclouds/nuscenes_n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin'
STAMP_NS = 1_532_402_927_612_460_123


@pytest.fixture(scope='module')
def ros():
    """The message modules, skipping where no ROS environment is sourced."""
    pytest.importorskip('sensor_msgs.msg')
    pytest.importorskip('mm_llm_ros_interfaces.msg')
    return pytest.importorskip('rclpy.serialization')


def over_the_wire(ros, msg):
    """Serialise to CDR and back, as a subscriber would receive the message."""
    return ros.deserialize_message(ros.serialize_message(msg), type(msg))


def test_readers_only_need_attributes():
    """Duck typing: bag readers and test doubles work without ROS message classes."""
    msg = types.SimpleNamespace(encoding='mono8', height=1, width=2, step=2, is_bigendian=0, data=b'\x05\x06')
    np.testing.assert_array_equal(image_from_msg(msg).rgb, [[[5, 5, 5], [6, 6, 6]]])
    chunk = types.SimpleNamespace(encoding='S16LE', channels=1, sample_rate=8000, data=b'\x00\x40')
    np.testing.assert_array_equal(audio_from_msg(chunk).waveform, [[0.5]])


def test_stamp_round_trip(ros):
    stamp = ns_to_stamp(STAMP_NS)
    assert (stamp.sec, stamp.nanosec) == (1_532_402_927, 612_460_123)
    assert stamp_to_ns(stamp) == STAMP_NS
    before_epoch = ns_to_stamp(-1)
    assert (before_epoch.sec, before_epoch.nanosec) == (-1, 999_999_999)
    assert stamp_to_ns(before_epoch) == -1


@pytest.mark.shared_data
def test_real_camera_frame_as_image(ros, shared_data):
    rgb = cv2.cvtColor(cv2.imread(str(shared_data / NUSCENES_CAM)), cv2.COLOR_BGR2RGB)
    for encoding in ('rgb8', 'bgr8'):
        msg = over_the_wire(ros, image_to_msg(rgb, encoding, STAMP_NS, 'cam_front'))
        assert (msg.height, msg.width, msg.step, msg.encoding) == (900, 1600, 4800, encoding)
        assert stamp_to_ns(msg.header.stamp) == STAMP_NS and msg.header.frame_id == 'cam_front'
        np.testing.assert_array_equal(image_from_msg(msg).rgb, rgb)


@pytest.mark.parametrize('encoding', ['16UC1', '32FC1'])
def test_depth_image(ros, encoding):
    depth = np.array([[0.5, np.nan], [2.25, 10.0]], np.float32)
    decoded = image_from_msg(over_the_wire(ros, image_to_msg(depth, encoding, STAMP_NS, 'depth')))
    np.testing.assert_allclose(decoded.depth_m, depth, rtol=1e-6)


@pytest.mark.shared_data
def test_compressed_images(ros, shared_data):
    rgb = cv2.cvtColor(cv2.imread(str(shared_data / NUSCENES_CAM)), cv2.COLOR_BGR2RGB)
    png = over_the_wire(ros, compressed_image_to_msg(rgb, 'png', STAMP_NS, 'cam_front'))
    assert png.format == 'rgb8; png compressed bgr8'
    np.testing.assert_array_equal(compressed_image_from_msg(png).rgb, rgb)
    jpeg = over_the_wire(ros, compressed_image_to_msg(rgb, 'jpeg', STAMP_NS, 'cam_front', quality=95))
    error = np.abs(compressed_image_from_msg(jpeg).rgb.astype(int) - rgb).mean()
    assert len(jpeg.data) < len(png.data) and error < 3


@pytest.mark.shared_data
def test_compressed_depth(ros, shared_data):
    millimetres = cv2.imread(str(shared_data / 'depth/nyu/sync_depth_00000.png'), cv2.IMREAD_UNCHANGED)
    depth = np.where(millimetres == 0, np.nan, millimetres / 1000.0)
    msg = over_the_wire(ros, compressed_image_to_msg(depth, 'compressedDepth', STAMP_NS, 'depth'))
    assert msg.format == '16UC1; compressedDepth png'
    np.testing.assert_allclose(compressed_image_from_msg(msg).depth_m, depth, rtol=1e-6)


@pytest.mark.shared_data
def test_real_lidar_sweep_as_pointcloud2(ros, shared_data):
    points = np.fromfile(shared_data / NUSCENES_LIDAR, '<f4').reshape(-1, 5)
    msg = over_the_wire(ros, pointcloud_to_msg(points[:, :4], STAMP_NS, 'lidar_top'))
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 34688, 16, 34688 * 16)
    assert [(f.name, f.offset, f.datatype) for f in msg.fields] == [
        ('x', 0, 7), ('y', 4, 7), ('z', 8, 7), ('intensity', 12, 7)]
    assert msg.is_dense
    decoded = pointcloud_from_msg(msg)
    np.testing.assert_array_equal(decoded.xyz, points[:, :3])
    np.testing.assert_array_equal(decoded.intensity, points[:, 3])


@pytest.mark.shared_data
def test_driver_style_pointcloud2_with_padding(ros, shared_data):
    """A Velodyne-driver layout (22-byte points) built directly with message classes, not our encoder."""
    from sensor_msgs.msg import PointCloud2, PointField
    points = np.fromfile(shared_data / NUSCENES_LIDAR, '<f4').reshape(-1, 5)[:1000]
    dtype = np.dtype({'names': ['x', 'y', 'z', 'intensity', 'ring', 'time'],
                      'formats': ['<f4', '<f4', '<f4', '<f4', '<u2', '<f4'],
                      'offsets': [0, 4, 8, 12, 16, 18], 'itemsize': 22})
    records = np.zeros(len(points), dtype)
    for column, name in enumerate(['x', 'y', 'z', 'intensity', 'ring']):
        records[name] = points[:, column]
    fields = [PointField(name=name, offset=offset, datatype=datatype, count=1) for name, offset, datatype in
              [('x', 0, 7), ('y', 4, 7), ('z', 8, 7), ('intensity', 12, 7), ('ring', 16, 4), ('time', 18, 7)]]
    msg = PointCloud2(height=1, width=len(points), fields=fields, is_bigendian=False, point_step=22,
                      row_step=22 * len(points), data=records.tobytes(), is_dense=True)
    decoded = pointcloud_from_msg(over_the_wire(ros, msg))
    np.testing.assert_array_equal(decoded.xyz, points[:, :3])


@pytest.mark.shared_data
@pytest.mark.parametrize('encoding', ['S16LE', 'F32LE'])
def test_real_audio_as_audio_chunk(ros, shared_data, encoding):
    with wave.open(str(shared_data / 'audio/imagebind_dog.wav')) as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), '<i2').reshape(-1, 2).T
    waveform = pcm / 32768.0
    msg = over_the_wire(ros, audio_to_msg(waveform, 44100, encoding, STAMP_NS, 'mic'))
    assert (msg.channels, msg.sample_rate, msg.encoding) == (2, 44100, encoding)
    decoded = audio_from_msg(msg)
    assert decoded.sample_rate == 44100
    np.testing.assert_allclose(decoded.waveform, waveform, atol=0 if encoding == 'S16LE' else 1e-7)


def test_bad_messages_raise_decode_errors(ros):
    from sensor_msgs.msg import Image
    msg = Image(height=2, width=2, encoding='rgb8', step=6, data=bytes(11))
    with pytest.raises(DecodeError) as info:
        image_from_msg(msg)
    assert info.value.reason == 'size_mismatch'
