"""Thin adapters between ROS messages and the ROS-free decoders in ``mm_llm_ros.core.sensor_decoding``.

The ``*_from_msg`` readers only access message attributes (duck typing), so they work on rclpy messages, on
messages deserialised from bags by other libraries, and on simple test doubles. The ``*_to_msg`` builders import
message classes lazily, so importing this module needs no ROS installation.
"""
from __future__ import annotations

import array

import numpy as np

from mm_llm_ros.core.sensor_decoding import (DEFAULT_LIMITS, DecodedAudio, DecodedImage, DecodedPointCloud,
                                             DecodedThermal, DecodeLimits, decode_audio, decode_compressed_image,
                                             decode_image, decode_imu, decode_pointcloud2, decode_thermal_image,
                                             encode_audio,
                                             encode_compressed_depth, encode_compressed_image, encode_image,
                                             encode_pointcloud2)

_NS_PER_S = 1_000_000_000


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time (or rclpy Time message) -> integer nanoseconds."""
    return stamp.sec * _NS_PER_S + stamp.nanosec


def ns_to_stamp(ns: int):
    """Integer nanoseconds -> builtin_interfaces/Time (nanosec is always in [0, 1e9))."""
    from builtin_interfaces.msg import Time
    sec, nanosec = divmod(int(ns), _NS_PER_S)
    return Time(sec=sec, nanosec=nanosec)


# ------------------------------------------------------------------------------------------------------------
# Readers


def image_from_msg(msg, limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedImage:
    """sensor_msgs/Image -> :class:`DecodedImage` (raises DecodeError)."""
    return decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data, limits)


def compressed_image_from_msg(msg, limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedImage:
    """sensor_msgs/CompressedImage -> :class:`DecodedImage` (raises DecodeError)."""
    return decode_compressed_image(msg.format, msg.data, limits)


def pointcloud_from_msg(msg, limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedPointCloud:
    """sensor_msgs/PointCloud2 -> :class:`DecodedPointCloud` (raises DecodeError)."""
    fields = [(field.name, field.offset, field.datatype, field.count) for field in msg.fields]
    return decode_pointcloud2(fields, msg.height, msg.width, msg.point_step, msg.row_step, msg.is_bigendian,
                              msg.data, msg.is_dense, limits)


def audio_from_msg(msg, limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedAudio:
    """mm_llm_ros_interfaces/AudioChunk -> :class:`DecodedAudio` (raises DecodeError)."""
    return decode_audio(msg.encoding, msg.channels, msg.sample_rate, msg.data, limits)


def append_audio(buffer, msg, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """Decode an AudioChunk into an `AudioRingBuffer`, stamped by its header (raises DecodeError or
    AudioBufferError; the window then stays what it was: a lost chunk is no evidence of silence)."""
    buffer.add(audio_from_msg(msg, limits), stamp_to_ns(msg.header.stamp))


def thermal_from_msg(msg, limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedThermal:
    """A thermal sensor_msgs/Image -> :class:`DecodedThermal`, raw values kept (raises DecodeError)."""
    return decode_thermal_image(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data, limits)


def imu_from_msg(msg, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """sensor_msgs/Imu -> one (6,) sample: acc xyz (m/s^2), gyro xyz (rad/s) (raises DecodeError)."""
    return decode_imu(msg.linear_acceleration, msg.angular_velocity, msg.linear_acceleration_covariance,
                      msg.angular_velocity_covariance)


# The reader of each message a sensor of core/specs.py may have: keyed by the message class name, or by the
# sensor's `reader` where one message type is read two ways (a thermal Image keeps its raw values).
DECODERS = {'Image': image_from_msg, 'CompressedImage': compressed_image_from_msg, 'PointCloud2': pointcloud_from_msg,
            'AudioChunk': audio_from_msg, 'ThermalImage': thermal_from_msg, 'Imu': imu_from_msg}


def message_class(type_name: str):
    """The message class of 'package/msg/Name' (imported now)."""
    import importlib
    package, _, name = type_name.split('/')
    return getattr(importlib.import_module(f'{package}.msg'), name)


# ------------------------------------------------------------------------------------------------------------
# Builders


def image_to_msg(image: np.ndarray, encoding: str, stamp_ns: int, frame_id: str):
    """An array -> sensor_msgs/Image; see ``encode_image`` for the array each encoding expects."""
    from sensor_msgs.msg import Image
    encoded = encode_image(image, encoding)
    return Image(header=_header(stamp_ns, frame_id), height=encoded.height, width=encoded.width,
                 encoding=encoding, is_bigendian=0, step=encoded.step, data=_uint8_array(encoded.data))


def compressed_image_to_msg(image: np.ndarray, fmt: str, stamp_ns: int, frame_id: str, *, quality: int = 90,
                            depth_encoding: str = '16UC1'):
    """An array -> sensor_msgs/CompressedImage.

    ``fmt`` 'jpeg' or 'png' takes (H, W, 3) uint8 RGB; 'compressedDepth' takes (H, W) metres and stores it as
    ``depth_encoding`` (16UC1 or 32FC1) the way compressed_depth_image_transport does.
    """
    from sensor_msgs.msg import CompressedImage
    if fmt == 'compressedDepth':
        format_string, data = encode_compressed_depth(image, depth_encoding)
    else:
        format_string, data = encode_compressed_image(image, fmt, quality=quality)
    return CompressedImage(header=_header(stamp_ns, frame_id), format=format_string, data=_uint8_array(data))


def pointcloud_to_msg(points: np.ndarray, stamp_ns: int, frame_id: str, intensity: np.ndarray | None = None):
    """(N, 3) xyz or (N, 4) xyz + intensity -> an unorganized float32 sensor_msgs/PointCloud2."""
    from sensor_msgs.msg import PointCloud2, PointField
    encoded = encode_pointcloud2(points, intensity)
    width = len(encoded.data) // encoded.point_step
    fields = [PointField(name=field.name, offset=field.offset, datatype=int(field.datatype),
                         count=field.count) for field in encoded.fields]
    finite = bool(np.isfinite(np.asarray(points, np.float32)[:, :3]).all())
    return PointCloud2(header=_header(stamp_ns, frame_id), height=1, width=width, fields=fields,
                       is_bigendian=False, point_step=encoded.point_step, row_step=len(encoded.data),
                       data=_uint8_array(encoded.data), is_dense=finite)


def audio_to_msg(waveform: np.ndarray, sample_rate: int, encoding: str, stamp_ns: int, frame_id: str):
    """(channels, n) float waveform -> mm_llm_ros_interfaces/AudioChunk stamped with its first sample."""
    from mm_llm_ros_interfaces.msg import AudioChunk
    waveform = np.asarray(waveform)
    return AudioChunk(header=_header(stamp_ns, frame_id), sample_rate=int(sample_rate),
                      channels=int(waveform.shape[0]), encoding=encoding,
                      data=_uint8_array(encode_audio(waveform, encoding)))


def imu_to_msg(sample: np.ndarray, stamp_ns: int, frame_id: str):
    """(6,) acc xyz (m/s^2) + gyro xyz (rad/s) -> sensor_msgs/Imu without orientation (covariance[0] = -1)."""
    from geometry_msgs.msg import Vector3
    from sensor_msgs.msg import Imu
    acc, gyro = (Vector3(x=float(v[0]), y=float(v[1]), z=float(v[2])) for v in (sample[:3], sample[3:6]))
    msg = Imu(header=_header(stamp_ns, frame_id), linear_acceleration=acc, angular_velocity=gyro)
    msg.orientation_covariance[0] = -1.0  # no orientation estimate (REP 145)
    return msg


def _header(stamp_ns: int, frame_id: str):
    from std_msgs.msg import Header
    return Header(stamp=ns_to_stamp(stamp_ns), frame_id=frame_id)


def _uint8_array(data: bytes) -> array.array:
    # The generated setters validate plain sequences element by element (seconds for a camera frame) but take
    # an array.array('B') as is.
    buffer = array.array('B')
    buffer.frombytes(data)
    return buffer
