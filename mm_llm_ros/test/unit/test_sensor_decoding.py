"""Sensor payload decoding: every encoding, real sensor layouts, a slow reference decoder, and fuzzing."""
import math
import struct
import threading
import tracemalloc
import wave

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mm_llm_ros.core.audio_buffer import AudioBufferError, AudioRingBuffer
from mm_llm_ros.core.sensor_decoding import (DecodeError, DecodeLimits, DecodeReason, EncodeError, PointField,
                                             PointFieldType as T, decode_audio, decode_compressed_image,
                                             decode_image, decode_pointcloud2, encode_audio,
                                             encode_compressed_depth, encode_compressed_image, encode_image,
                                             encode_pointcloud2)

NUSCENES_CAM = 'images/nuscenes/n015-2018-07-24-11-22-45+0800__CAM_FRONT__1532402927612460.jpg'
NUSCENES_LIDAR = 'pointclouds/nuscenes_n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin'
COLOUR = ('rgb8', 'bgr8', 'rgba8', 'bgra8')
_FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


def fuzz(max_examples):
    return settings(_FUZZ, max_examples=max_examples)


# Small limits for fuzzing: a decoder that allocates before checking them would blow the memory budget below.
SMALL = DecodeLimits(max_bytes=1 << 16, max_pixels=1 << 14, max_points=4096, max_fields=16,
                     max_audio_samples=1 << 14, max_audio_channels=8, max_sample_rate=96_000)
MEMORY_BUDGET = 4 << 20  # bytes; 64x SMALL.max_bytes


def raises(reason, call, *args, **kwargs):
    with pytest.raises(DecodeError) as info:
        call(*args, **kwargs)
    assert info.value.reason == reason, str(info.value)
    assert isinstance(info.value, ValueError) and str(info.value)
    return info.value


@pytest.fixture(scope='module')
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope='module')
def nuscenes_points(shared_data):
    return np.fromfile(shared_data / NUSCENES_LIDAR, '<f4').reshape(-1, 5)


# --------------------------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize('encoding', COLOUR)
@pytest.mark.parametrize('padding', [0, 5])
def test_colour_round_trip_with_row_padding(encoding, padding, rng):
    rgb = rng.integers(0, 256, (7, 9, 3), np.uint8)
    encoded = encode_image(rgb, encoding, row_padding=padding)
    assert encoded.step == 9 * len(encoding[:-1]) + padding
    decoded = decode_image(encoding, encoded.height, encoded.width, encoded.step, False, encoded.data)
    assert decoded.rgb.dtype == np.uint8 and decoded.depth_m is None
    np.testing.assert_array_equal(decoded.rgb, rgb)


def test_bgr8_bytes_are_swapped_to_rgb():
    data = bytes([1, 2, 3, 0, 4, 5, 6, 0])  # 2 rows of 1 pixel, step 4: one padding byte per row
    decoded = decode_image('bgr8', 2, 1, 4, False, data)
    np.testing.assert_array_equal(decoded.rgb, [[[3, 2, 1]], [[6, 5, 4]]])


def test_rgb8_is_a_read_only_zero_copy_view(rng):
    encoded = encode_image(rng.integers(0, 256, (4, 6, 3), np.uint8), 'rgb8', row_padding=3)
    buffer = bytearray(encoded.data)
    decoded = decode_image('rgb8', encoded.height, encoded.width, encoded.step, 0, buffer)
    assert np.shares_memory(decoded.rgb, np.frombuffer(buffer, np.uint8))
    assert not decoded.rgb.flags.writeable


def test_mono8_is_replicated_grey():
    decoded = decode_image('mono8', 2, 2, 3, False, bytes([10, 20, 99, 30, 40, 99]))
    np.testing.assert_array_equal(decoded.rgb, np.repeat(np.array([[10, 20], [30, 40]], np.uint8)[..., None], 3, 2))


@pytest.mark.parametrize('big_endian', [False, True])
def test_mono16_keeps_the_high_byte(big_endian):
    order = '>' if big_endian else '<'
    values = [[0x1234, 0xFF00], [0x00FF, 0x8001]]
    step = 5  # odd: 4 bytes of pixels plus one of padding, so rows are not 2-byte aligned
    data = b''.join(struct.pack(order + '2H', *row) + b'\x00' for row in values)
    decoded = decode_image('mono16', 2, 2, step, big_endian, data)
    np.testing.assert_array_equal(decoded.rgb[..., 0], [[0x12, 0xFF], [0x00, 0x80]])
    np.testing.assert_array_equal(decoded.rgb[..., 0], decoded.rgb[..., 2])


@pytest.mark.parametrize('big_endian', [False, True])
def test_16uc1_is_millimetres_with_zero_invalid(big_endian):
    order = '>' if big_endian else '<'
    data = struct.pack(order + '3H', 0, 1500, 65535) + b'\x00\x00' + struct.pack(order + '3H', 1, 2, 0) + b'\x00\x00'
    decoded = decode_image('16UC1', 2, 3, 8, big_endian, data)
    assert decoded.is_depth and decoded.rgb is None and decoded.depth_m.dtype == np.float32
    np.testing.assert_allclose(decoded.depth_m, [[np.nan, 1.5, 65.535], [0.001, 0.002, np.nan]], rtol=1e-6)


@pytest.mark.parametrize('big_endian', [False, True])
def test_32fc1_marks_non_finite_and_non_positive_invalid(big_endian):
    values = [2.5, math.nan, math.inf, -1.0, 0.0, 0.25]
    data = struct.pack(('>' if big_endian else '<') + '6f', *values)
    decoded = decode_image('32FC1', 2, 3, 12, big_endian, data)
    np.testing.assert_array_equal(decoded.depth_m, [[2.5, np.nan, np.nan], [np.nan, np.nan, 0.25]])


@pytest.mark.parametrize('encoding', ['16UC1', '32FC1'])
def test_depth_round_trip(encoding, rng):
    depth = rng.uniform(0.3, 9.0, (5, 4)).astype(np.float32)
    depth[1, 2] = np.nan
    encoded = encode_image(depth, encoding, is_bigendian=True, row_padding=2)
    decoded = decode_image(encoding, encoded.height, encoded.width, encoded.step, True, encoded.data)
    np.testing.assert_allclose(decoded.depth_m, depth, atol=5e-4 if encoding == '16UC1' else 0)


@pytest.mark.shared_data
def test_real_camera_frame_round_trip(shared_data):
    rgb = cv2.cvtColor(cv2.imread(str(shared_data / NUSCENES_CAM)), cv2.COLOR_BGR2RGB)
    for encoding in COLOUR:
        encoded = encode_image(rgb, encoding, row_padding=64)
        decoded = decode_image(encoding, encoded.height, encoded.width, encoded.step, False, encoded.data)
        assert decoded.shape == (900, 1600)
        np.testing.assert_array_equal(decoded.rgb, rgb)


def test_encoding_names_are_case_insensitive_and_reported_canonically():
    assert decode_image('16uc1', 1, 1, 2, False, b'\x01\x00').encoding == '16UC1'
    assert decode_image(' RGB8 ', 1, 1, 3, False, b'abc').encoding == 'rgb8'


GOOD_IMAGE = dict(encoding='rgb8', height=2, width=2, step=6, is_bigendian=False, data=bytes(12))


@pytest.mark.parametrize('change, reason', [
    (dict(encoding='yuv422'), 'unknown_encoding'),
    (dict(encoding=None), 'unknown_encoding'),
    (dict(step=5), 'bad_step'),
    (dict(data=bytes(11)), 'size_mismatch'),
    (dict(data=bytes(13)), 'size_mismatch'),
    (dict(step=7), 'size_mismatch'),
    (dict(data=b''), 'empty'),
    (dict(data='not bytes'), 'bad_data'),
    (dict(width=0), 'bad_dimensions'),
    (dict(height=-2), 'bad_dimensions'),
    (dict(height=2.0), 'bad_dimensions'),
    (dict(height=1 << 40, width=1 << 40), 'too_large'),
])
def test_bad_images_are_rejected_with_a_reason(change, reason):
    raises(reason, decode_image, **{**GOOD_IMAGE, **change})


def test_image_byte_limit_is_checked():
    raises('too_large', decode_image, **GOOD_IMAGE, limits=DecodeLimits(max_bytes=8))


def test_encode_image_rejects_wrong_arrays():
    with pytest.raises(EncodeError):
        encode_image(np.zeros((2, 2), np.uint8), 'rgb8')
    with pytest.raises(EncodeError):
        encode_image(np.zeros((2, 2, 3), np.uint8), 'yuv422')


def test_16uc1_encoder_marks_unrepresentable_depth_invalid():
    encoded = encode_image(np.array([[np.nan, -1.0, 70.0, 1.2345]]), '16UC1')
    assert struct.unpack('<4H', encoded.data) == (0, 0, 0, 1234)


# --------------------------------------------------------------------------------------------------------------
# Compressed images


@pytest.mark.shared_data
def test_real_jpeg_matches_opencv(shared_data):
    data = (shared_data / NUSCENES_CAM).read_bytes()
    decoded = decode_compressed_image('rgb8; jpeg compressed bgr8', data)
    expected = cv2.cvtColor(cv2.imread(str(shared_data / NUSCENES_CAM)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decoded.rgb, expected)


@pytest.mark.parametrize('fmt', ['png', 'jpeg'])
def test_compressed_round_trip(fmt, rng):
    blocks = rng.integers(0, 256, (3, 4, 3), np.uint8)
    rgb = np.repeat(np.repeat(blocks, 16, 0), 16, 1)
    format_string, data = encode_compressed_image(rgb, fmt, quality=100)
    assert format_string == f'rgb8; {fmt} compressed bgr8'
    for declared in (format_string, fmt, ''):  # the codec comes from the magic bytes, not the string
        decoded = decode_compressed_image(declared, data).rgb
        if fmt == 'png':
            np.testing.assert_array_equal(decoded, rgb)
        else:  # lossy: chroma is subsampled and smoothed across block edges; block centres survive
            centres = decoded.reshape(3, 16, 4, 16, 3)[:, 4:12, :, 4:12].astype(int)
            np.testing.assert_allclose(centres, np.broadcast_to(blocks[:, None, :, None], centres.shape), atol=3)


def test_grey_rgba_and_16_bit_pngs_become_rgb():
    grey = np.array([[0, 128], [255, 7]], np.uint8)
    np.testing.assert_array_equal(decode_compressed_image('png', cv2.imencode('.png', grey)[1]).rgb[..., 1], grey)
    bgra = np.dstack([np.full((2, 2), 10), np.full((2, 2), 20), np.full((2, 2), 30), np.full((2, 2), 0)])
    decoded = decode_compressed_image('png', cv2.imencode('.png', bgra.astype(np.uint8))[1])
    np.testing.assert_array_equal(decoded.rgb[0, 0], [30, 20, 10])
    bgr16 = np.full((2, 2, 3), 0x1280, np.uint16)
    bgr16[..., 0] = 0xFF00
    decoded = decode_compressed_image('bgr16; png compressed bgr16', cv2.imencode('.png', bgr16)[1])
    np.testing.assert_array_equal(decoded.rgb[1, 1], [0x12, 0x12, 0xFF])


@pytest.mark.shared_data
def test_real_compressed_depth_16uc1(shared_data):
    # compressed_depth_image_transport's 16UC1 payload is a 12-byte header + a 16-bit millimetre PNG, which is
    # exactly what the NYU depth file is (mm, 0 = invalid).
    png = (shared_data / 'depth/nyu/sync_depth_00000.png').read_bytes()
    decoded = decode_compressed_image('16UC1; compressedDepth', struct.pack('<iff', 0, 0, 0) + png)
    millimetres = cv2.imread(str(shared_data / 'depth/nyu/sync_depth_00000.png'), cv2.IMREAD_UNCHANGED)
    expected = np.where(millimetres == 0, np.nan, millimetres / 1000.0)
    assert decoded.shape == (480, 640) and decoded.encoding == '16UC1'
    np.testing.assert_allclose(decoded.depth_m, expected, rtol=1e-6)


def test_compressed_depth_32fc1_inverse_depth_quantisation(rng):
    depth = rng.uniform(0.5, 9.5, (6, 7)).astype(np.float32)
    depth[0, 0], depth[0, 1], depth[0, 2] = np.nan, 12.0, 0.0  # invalid, beyond depth_max, invalid
    fmt, data = encode_compressed_depth(depth, '32FC1', depth_max=10.0)
    assert fmt == '32FC1; compressedDepth png'
    decoded = decode_compressed_image(fmt, data).depth_m
    assert np.isnan(decoded[0, :3]).all()
    # Quantisation of inverse depth: error grows with d^2 / (q (q + 1)); 0.5 step at 10 m is ~5 mm.
    np.testing.assert_allclose(decoded[1:], depth[1:], atol=5e-3)


def test_16_bit_png_declared_as_depth_is_depth():
    mm = np.array([[0, 2000]], np.uint16)
    decoded = decode_compressed_image('16UC1; png compressed 16UC1', cv2.imencode('.png', mm)[1])
    np.testing.assert_array_equal(decoded.depth_m, [[np.nan, 2.0]])


def _png_claiming(width, height):
    png = bytearray(cv2.imencode('.png', np.zeros((2, 2), np.uint8))[1].tobytes())
    png[16:24] = struct.pack('>II', width, height)
    return bytes(png)


def _jpeg_claiming(width, height):
    jpeg = bytearray(cv2.imencode('.jpg', np.zeros((8, 8), np.uint8))[1].tobytes())
    sof = jpeg.index(b'\xff\xc0')
    jpeg[sof + 5:sof + 9] = struct.pack('>HH', height, width)
    return bytes(jpeg)


@pytest.mark.parametrize('fmt, data, reason', [
    ('png', _png_claiming(100_000, 100_000), 'too_large'),
    ('jpeg', _jpeg_claiming(65535, 65535), 'too_large'),
    ('png', _png_claiming(0, 5), 'bad_dimensions'),
    ('jpeg', b'\xff\xd8\xff\xe0\x00\x10JFIF', 'decode_failed'),
    ('png', b'\x89PNG\r\n\x1a\n' + bytes(40), 'decode_failed'),
    ('bmp', b'BM' + bytes(100), 'unsupported'),
    ('jpeg', b'', 'empty'),
    ('16UC1; compressedDepth rvl', bytes(40), 'unsupported'),
    ('mono8; compressedDepth', bytes(40), 'unsupported'),
    ('16UC1; compressedDepth', bytes(12), 'size_mismatch'),
    (None, b'\xff\xd8', 'unknown_encoding'),
])
def test_bad_compressed_images_are_rejected(fmt, data, reason):
    raises(reason, decode_compressed_image, fmt, data)


def test_compressed_depth_requires_a_16_bit_png():
    png8 = cv2.imencode('.png', np.zeros((2, 2), np.uint8))[1].tobytes()
    raises('decode_failed', decode_compressed_image, '16UC1; compressedDepth png', bytes(12) + png8)


# --------------------------------------------------------------------------------------------------------------
# Point clouds: a deliberately slow reference decoder (one struct.unpack_from per value, like a textbook
# read_points) that the vectorised decoder must match exactly.

_STRUCT_CODES = {1: 'b', 2: 'B', 3: 'h', 4: 'H', 5: 'i', 6: 'I', 7: 'f', 8: 'd'}


def reference_read_points(fields, height, width, point_step, row_step, is_bigendian, data):
    order = '>' if is_bigendian else '<'
    layout = {name: (offset, datatype) for name, offset, datatype, _ in fields}
    xyz, intensity = [], []
    with np.errstate(over='ignore'):
        for row in range(height):
            for column in range(width):
                base = row * row_step + column * point_step

                def read(name):
                    offset, datatype = layout[name]
                    return np.float32(struct.unpack_from(order + _STRUCT_CODES[datatype], data, base + offset)[0])

                point = [read(axis) for axis in 'xyz']
                if all(math.isfinite(value) for value in point):
                    xyz.append(point)
                    if 'intensity' in layout:
                        intensity.append(read('intensity'))
    return (np.array(xyz, np.float32).reshape(-1, 3),
            np.array(intensity, np.float32) if 'intensity' in layout else None)


def pack_points(columns, layout, point_step, big_endian=False, height=1, row_padding=0):
    """Pack named columns into rows of `point_step` bytes with a structured dtype (independent of the decoder)."""
    order = '>' if big_endian else '<'
    dtype = np.dtype({'names': [name for name, *_ in layout],
                      'formats': [order + np.dtype(code).str[1:] for _, _, code in layout],
                      'offsets': [offset for _, offset, _ in layout], 'itemsize': point_step})
    records = np.zeros(len(columns[layout[0][0]]), dtype)
    for name, _, _ in layout:
        records[name] = columns[name]
    rows = records.view(np.uint8).reshape(height, -1)
    padded = np.zeros((height, rows.shape[1] + row_padding), np.uint8)
    padded[:, :rows.shape[1]] = rows
    datatypes = {'f4': T.FLOAT32, 'f8': T.FLOAT64, 'u2': T.UINT16, 'u4': T.UINT32, 'u1': T.UINT8}
    fields = [(name, offset, int(datatypes[code]), 1) for name, offset, code in layout]
    return fields, padded.shape[1], padded.tobytes()


def assert_matches_reference(fields, height, width, point_step, row_step, is_bigendian, data):
    decoded = decode_pointcloud2(fields, height, width, point_step, row_step, is_bigendian, data)
    xyz, intensity = reference_read_points(fields, height, width, point_step, row_step, is_bigendian, data)
    np.testing.assert_array_equal(decoded.xyz, xyz)
    assert decoded.xyz.dtype == np.float32 and decoded.xyz.flags.c_contiguous
    assert decoded.dropped == height * width - len(xyz)
    if intensity is None:
        assert decoded.intensity is None
    else:
        np.testing.assert_array_equal(decoded.intensity, intensity)
    return decoded


@pytest.mark.shared_data
def test_kitti_layout(shared_data):
    data = (shared_data / 'pointclouds/kitti_000008.bin').read_bytes()
    fields = [('x', 0, 7, 1), ('y', 4, 7, 1), ('z', 8, 7, 1), ('intensity', 12, 7, 1)]
    count = len(data) // 16
    assert count == 17238
    decoded = assert_matches_reference(fields, 1, count, 16, len(data), False, data)
    raw = np.frombuffer(data, '<f4').reshape(-1, 4)
    np.testing.assert_array_equal(decoded.xyz, raw[:, :3])
    np.testing.assert_array_equal(decoded.intensity, raw[:, 3])


@pytest.mark.shared_data
def test_nuscenes_layout(shared_data, nuscenes_points):
    data = (shared_data / NUSCENES_LIDAR).read_bytes()
    fields = [('x', 0, 7, 1), ('y', 4, 7, 1), ('z', 8, 7, 1), ('intensity', 12, 7, 1), ('ring', 16, 7, 1)]
    decoded = assert_matches_reference(fields, 1, 34688, 20, len(data), False, data)
    np.testing.assert_array_equal(decoded.xyz, nuscenes_points[:, :3])


VELODYNE = [('x', 0, 'f4'), ('y', 4, 'f4'), ('z', 8, 'f4'), ('intensity', 12, 'f4'), ('ring', 16, 'u2'),
            ('time', 18, 'f4')]  # velodyne_pointcloud XYZIRT: packed, point_step 22, unaligned floats
OUSTER = [('x', 0, 'f4'), ('y', 4, 'f4'), ('z', 8, 'f4'), ('intensity', 16, 'f4'), ('t', 20, 'u4'),
          ('reflectivity', 24, 'u2'), ('ring', 26, 'u2'), ('ambient', 28, 'u2'), ('range', 32, 'u4')]


@pytest.mark.shared_data
@pytest.mark.parametrize('layout, point_step', [(VELODYNE, 22), (OUSTER, 48)], ids=['velodyne', 'ouster'])
@pytest.mark.parametrize('big_endian', [False, True])
def test_padded_vendor_layouts(layout, point_step, big_endian, nuscenes_points):
    points = nuscenes_points[:4000]
    columns = {'x': points[:, 0], 'y': points[:, 1], 'z': points[:, 2], 'intensity': points[:, 3],
               'ring': points[:, 4], 'time': np.linspace(0, 0.1, len(points)), 't': np.arange(len(points)),
               'reflectivity': 7, 'ambient': 9, 'range': 1234}
    fields, row_step, data = pack_points(columns, layout, point_step, big_endian)
    decoded = assert_matches_reference(fields, 1, len(points), point_step, row_step, big_endian, data)
    np.testing.assert_array_equal(decoded.xyz, points[:, :3])


@pytest.mark.shared_data
def test_organized_cloud_with_nans_and_row_padding(nuscenes_points):
    height, width = 16, 2168  # the 34688-point sweep as 16 rings
    points = nuscenes_points[:, :4].copy()
    points[::7, 0] = np.nan
    points[3::11, 2] = np.inf
    points[5::13, 1] = -np.inf
    layout = [('x', 0, 'f4'), ('y', 4, 'f4'), ('z', 8, 'f4'), ('intensity', 16, 'f4')]
    columns = dict(zip(['x', 'y', 'z', 'intensity'], points.T))
    fields, row_step, data = pack_points(columns, layout, 32, height=height, row_padding=24)
    decoded = assert_matches_reference(fields, height, width, 32, row_step, False, data)
    finite = np.isfinite(points[:, :3]).all(axis=1)
    assert decoded.dropped == np.count_nonzero(~finite) > 0
    np.testing.assert_array_equal(decoded.xyz, points[finite, :3])
    np.testing.assert_array_equal(decoded.intensity, points[finite, 3])


def test_float64_coordinates_and_integer_intensity(rng):
    xyz = rng.normal(0, 10, (50, 3))
    xyz[4, 1] = 1e300  # finite in float64, inf in float32: dropped
    layout = [('x', 0, 'f8'), ('y', 8, 'f8'), ('z', 16, 'f8'), ('intensity', 24, 'u2')]
    columns = {'x': xyz[:, 0], 'y': xyz[:, 1], 'z': xyz[:, 2], 'intensity': np.arange(50)}
    fields, row_step, data = pack_points(columns, layout, 32)
    decoded = assert_matches_reference(fields, 1, 50, 32, row_step, False, data)
    assert decoded.dropped == 1 and decoded.intensity.dtype == np.float32


@pytest.mark.shared_data
def test_matches_sensor_msgs_py_when_available(nuscenes_points):
    point_cloud2 = pytest.importorskip('sensor_msgs_py.point_cloud2')
    pytest.importorskip('sensor_msgs.msg')
    from mm_llm_ros.ros.conversions import pointcloud_to_msg
    msg = pointcloud_to_msg(nuscenes_points[:, :4], 0, 'lidar')
    expected = point_cloud2.read_points_numpy(msg, field_names=('x', 'y', 'z'), skip_nans=True)
    fields = [(f.name, f.offset, f.datatype, f.count) for f in msg.fields]
    decoded = decode_pointcloud2(fields, msg.height, msg.width, msg.point_step, msg.row_step, msg.is_bigendian,
                                 msg.data)
    np.testing.assert_array_equal(decoded.xyz, expected)


@pytest.mark.shared_data
def test_encode_pointcloud2_round_trip(nuscenes_points):
    encoded = encode_pointcloud2(nuscenes_points[:, :4], is_bigendian=True)
    assert encoded.point_step == 16 and [f.name for f in encoded.fields] == ['x', 'y', 'z', 'intensity']
    width = len(encoded.data) // encoded.point_step
    decoded = decode_pointcloud2(encoded.fields, 1, width, encoded.point_step, len(encoded.data), True,
                                 encoded.data)
    np.testing.assert_array_equal(decoded.intensity, nuscenes_points[:, 3])
    assert encode_pointcloud2(nuscenes_points[:, :3]).fields == [PointField('x', 0, 7), PointField('y', 4, 7),
                                                                 PointField('z', 8, 7)]
    with pytest.raises(EncodeError):
        encode_pointcloud2(np.zeros((3, 2), np.float32))


XYZ = [('x', 0, 7, 1), ('y', 4, 7, 1), ('z', 8, 7, 1)]
GOOD_CLOUD = dict(fields=XYZ, height=1, width=2, point_step=12, row_step=24, is_bigendian=False,
                  data=struct.pack('<6f', 1, 2, 3, 4, 5, 6))


@pytest.mark.parametrize('change, reason', [
    (dict(fields=XYZ[:2]), 'missing_fields'),
    (dict(fields=[]), 'missing_fields'),
    (dict(fields=XYZ + [('x', 0, 7, 1)]), 'bad_fields'),
    (dict(fields=XYZ[:2] + [('z', 8, 5, 1)]), 'bad_fields'),  # INT32 z
    (dict(fields=XYZ[:2] + [('z', 8, 42, 1)]), 'bad_fields'),  # unknown datatype
    (dict(fields=XYZ[:2] + [('z', 10, 7, 1)]), 'bad_fields'),  # past the end of the point
    (dict(fields=XYZ[:2] + [('z', -4, 7, 1)]), 'bad_fields'),
    (dict(fields=XYZ[:2] + [('z', 8, 7, 3)]), 'bad_fields'),
    (dict(fields=XYZ[:2] + [('z', 8)]), 'bad_fields'),
    (dict(fields=XYZ[:2] + [('z', '8', 7, 1)]), 'bad_fields'),
    (dict(fields='xyz'), 'bad_fields'),
    (dict(fields=None), 'bad_fields'),
    (dict(width=0, row_step=0), 'no_points'),
    (dict(height=-1), 'bad_dimensions'),
    (dict(point_step=0), 'bad_step'),
    (dict(row_step=20), 'bad_step'),
    (dict(row_step=30), 'size_mismatch'),
    (dict(data=b'\x00' * 20), 'size_mismatch'),
    (dict(data=b''), 'empty'),
    (dict(data=struct.pack('<6f', math.nan, 0, 0, 0, math.inf, 0)), 'no_finite_points'),
    (dict(height=1 << 20, width=1 << 20), 'too_large'),
])
def test_bad_clouds_are_rejected_with_a_reason(change, reason):
    raises(reason, decode_pointcloud2, **{**GOOD_CLOUD, **change})


def test_unusable_optional_fields_are_ignored():
    fields = XYZ + [('rgb', 0, 0, 1), ('intensity', 10, 7, 1), ('', 99, 99, 99)]
    decoded = decode_pointcloud2(**{**GOOD_CLOUD, 'fields': fields})
    assert decoded.intensity is None
    np.testing.assert_array_equal(decoded.xyz, [[1, 2, 3], [4, 5, 6]])


def test_too_many_fields_are_rejected():
    fields = XYZ + [(f'f{i}', 0, 7, 1) for i in range(20)]
    raises('bad_fields', decode_pointcloud2, **GOOD_CLOUD | {'fields': fields}, limits=SMALL)


# --------------------------------------------------------------------------------------------------------------
# Audio


@pytest.mark.shared_data
def test_real_wav_s16le(shared_data):
    with wave.open(str(shared_data / 'audio/imagebind_dog.wav')) as wav:
        channels, rate, frames = wav.getnchannels(), wav.getframerate(), wav.readframes(wav.getnframes())
    assert (channels, rate) == (2, 44100)
    waveform, sample_rate = decode_audio('S16LE', channels, rate, frames)
    assert waveform.shape == (2, 115110) and waveform.dtype == np.float32 and sample_rate == 44100
    samples = struct.unpack(f'<{len(frames) // 2}h', frames)
    for channel in range(2):
        np.testing.assert_array_equal(waveform[channel], np.array(samples[channel::2]) / 32768.0)
    assert encode_audio(waveform, 'S16LE') == frames  # bit exact both ways


def test_f32le_round_trip_and_clipping(rng):
    waveform = rng.uniform(-1, 1, (3, 100)).astype(np.float32)
    decoded = decode_audio('F32LE', 3, 16000, encode_audio(waveform, 'F32LE'))
    np.testing.assert_array_equal(decoded.waveform, waveform)
    loud = decode_audio('f32le', 1, 16000, struct.pack('<3f', 2.0, -3.0, 0.5)).waveform
    np.testing.assert_array_equal(loud, [[1.0, -1.0, 0.5]])


def test_s16le_extremes_stay_in_range():
    waveform = decode_audio('S16LE', 1, 8000, struct.pack('<3h', -32768, 32767, 0)).waveform
    assert waveform.min() == -1.0 and waveform.max() < 1.0


GOOD_AUDIO = dict(encoding='S16LE', channels=2, sample_rate=16000, data=bytes(8))


@pytest.mark.parametrize('change, reason', [
    (dict(encoding='MP3'), 'unknown_encoding'),
    (dict(channels=0), 'bad_channels'),
    (dict(channels=500), 'bad_channels'),
    (dict(sample_rate=0), 'bad_sample_rate'),
    (dict(sample_rate=10**9), 'bad_sample_rate'),
    (dict(data=bytes(6)), 'partial_frame'),
    (dict(encoding='F32LE', data=bytes(12)), 'partial_frame'),
    (dict(data=b''), 'empty'),
    (dict(encoding='F32LE', channels=1, data=struct.pack('<2f', 0.1, math.nan)), 'non_finite'),
    (dict(data=bytes(1 << 16)), 'too_large'),
])
def test_bad_audio_is_rejected_with_a_reason(change, reason):
    raises(reason, decode_audio, **{**GOOD_AUDIO, **change}, limits=SMALL)


# --------------------------------------------------------------------------------------------------------------
# Fuzzing: any combination of fields gives valid arrays or a DecodeError, within a fixed memory budget.


def within_memory_budget(decoder, *args):
    """Call a decoder under tracemalloc (numpy allocations are traced) and check its peak allocation."""
    tracemalloc.start()
    try:
        return decoder(*args, limits=SMALL)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MEMORY_BUDGET, f'{decoder.__name__} allocated {peak} bytes'


def decode_or_reject(decoder, *args):
    """The decoder's result, or None when it raised a DecodeError with a known reason (anything else fails)."""
    try:
        return within_memory_budget(decoder, *args)
    except DecodeError as exc:
        assert exc.reason in set(DecodeReason) and str(exc)
        return None


def sizes():
    return st.one_of(st.integers(0, 12), st.integers(-3, 3), st.integers(-(1 << 40), 1 << 40))


def filled(pattern, size):
    size = max(0, min(size, SMALL.max_bytes + 8))  # past the limit is enough to test it
    return ((pattern or b'\x7f') * (size // max(len(pattern), 1) + 1))[:size]


def check_image(result, height, width):
    assert result.shape == (height, width)
    if result.rgb is not None:
        assert result.rgb.shape == (height, width, 3) and result.rgb.dtype == np.uint8
    else:
        depth = result.depth_m
        assert depth.shape == (height, width) and depth.dtype == np.float32
        assert not (depth[np.isfinite(depth)] <= 0).any() and not np.isinf(depth).any()


# Each example tries every variant below, so N examples cover several times N field combinations.
IMAGE_BPP = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1, 'mono16': 2, '16UC1': 2, '32FC1': 4,
             'yuv422': 2, '': 1}


@fuzz(500)
@given(height=sizes(), width=sizes(), padding=st.integers(-2, 5), extra=st.sampled_from([0, 0, 0, -1, 1, 7]),
       big_endian=st.booleans(), pattern=st.binary(max_size=64), wild_step=st.none() | sizes())
def test_fuzz_decode_image(height, width, padding, extra, big_endian, pattern, wild_step):
    for encoding, bpp in IMAGE_BPP.items():
        step = wild_step if wild_step is not None else max(width, 0) * bpp + padding
        data = filled(pattern, height * step + extra)
        result = decode_or_reject(decode_image, encoding, height, width, step, big_endian, data)
        if result is not None:
            check_image(result, height, width)


@fuzz(600)
@given(fields=st.lists(st.tuples(st.sampled_from(['x', 'y', 'z', 'intensity', 'ring', '']),
                                 st.integers(-2, 40), st.integers(0, 9), st.integers(0, 2)), max_size=8),
       height=sizes(), width=sizes(), point_step=st.integers(-1, 40), row_pad=st.integers(-2, 6),
       extra=st.sampled_from([0, 0, 0, 1, -3]), pattern=st.binary(max_size=64))
def test_fuzz_decode_pointcloud2(fields, height, width, point_step, row_pad, extra, pattern):
    row_step = max(width, 0) * point_step + row_pad
    data = filled(pattern, height * row_step + extra)
    # As drawn, and with well-formed x/y/z prepended (to reach the decoding paths), in both byte orders.
    for layout in (fields, XYZ + fields):
        for big_endian in (False, True):
            result = decode_or_reject(decode_pointcloud2, layout, height, width, point_step, row_step, big_endian,
                                      data)
            if result is not None:
                assert result.xyz.ndim == 2 and result.xyz.shape[1] == 3 and result.xyz.dtype == np.float32
                assert 0 < len(result.xyz) == height * width - result.dropped
                assert np.isfinite(result.xyz).all()
                assert result.intensity is None or result.intensity.shape == (len(result.xyz),)


@fuzz(150)
@given(data=st.data(), big_endian=st.booleans(), height=st.integers(1, 3), width=st.integers(1, 5),
       row_pad=st.integers(0, 5), float64=st.booleans())
def test_fuzz_random_layouts_match_reference(data, big_endian, height, width, row_pad, float64):
    """Random field orders, gaps and values (NaN/inf included) decode exactly like the reference."""
    size = 8 if float64 else 4
    names = data.draw(st.permutations(['x', 'y', 'z', 'intensity', 'pad']))
    gaps = data.draw(st.lists(st.integers(0, 3), min_size=5, max_size=5))
    types = {'x': 'f8' if float64 else 'f4', 'intensity': 'u2'}
    layout, offset = [], 0
    for name, gap in zip(names, gaps):
        offset += gap
        if name != 'pad':
            layout.append((name, offset, types.get(name, types['x'])))
        offset += size
    count = height * width
    values = st.lists(st.floats(width=32), min_size=count, max_size=count)
    columns = {name: np.array(data.draw(values), np.float64) for name in 'xyz'}
    columns['intensity'] = np.array(data.draw(st.lists(st.integers(0, 65535), min_size=count, max_size=count)))
    fields, row_step, payload = pack_points(columns, layout, offset, big_endian, height, row_pad)
    try:
        assert_matches_reference(fields, height, width, offset, row_step, big_endian, payload)
    except DecodeError as exc:
        assert exc.reason == 'no_finite_points'
        assert not np.isfinite(np.stack([columns[axis] for axis in 'xyz'])).all(axis=0).any()


@fuzz(500)
@given(channels=sizes(), sample_rate=st.integers(-5, 1 << 33), payload=st.binary(max_size=256))
def test_fuzz_decode_audio(channels, sample_rate, payload):
    for encoding in ('S16LE', 'F32LE', 's16le', 'U8', ''):
        result = decode_or_reject(decode_audio, encoding, channels, sample_rate, payload)
        if result is not None:
            waveform, rate = result
            assert rate == sample_rate and waveform.shape[0] == channels and waveform.dtype == np.float32
            assert waveform.shape[1] > 0 and np.abs(waveform).max() <= 1.0


@pytest.fixture(scope='module')
def small_codec_payloads():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (16, 24, 3), np.uint8)
    depth = rng.integers(0, 65535, (8, 8), np.uint16)
    return [cv2.imencode('.jpg', image)[1].tobytes(), cv2.imencode('.png', image)[1].tobytes(),
            bytes(12) + cv2.imencode('.png', depth)[1].tobytes()]


COMPRESSED_FORMATS = ('jpeg', 'png', '', 'rgb8; jpeg compressed bgr8', '16UC1; compressedDepth',
                      '32FC1; compressedDepth png', '16UC1; png compressed 16UC1', 'garbage;;')


@fuzz(400)
@given(choice=st.integers(0, 2), cut=st.integers(0, 2000),
       flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6))
def test_fuzz_decode_compressed_image(small_codec_payloads, choice, cut, flips):
    """Truncated and bit-flipped JPEG/PNG/compressedDepth payloads under every format string."""
    payload = bytearray(small_codec_payloads[choice][:cut or None])
    for position, value in flips:
        if position < len(payload):
            payload[position] = value
    for fmt in COMPRESSED_FORMATS:
        result = decode_or_reject(decode_compressed_image, fmt, bytes(payload))
        if result is not None:
            check_image(result, *result.shape)


# --------------------------------------------------------------------------------------------------------------
# Audio ring buffer


def ramp_chunk(start, frames, channels=1):
    return np.tile(np.arange(start, start + frames, dtype=np.float32), (channels, 1))


def test_ring_buffer_keeps_the_latest_window_in_order():
    buffer = AudioRingBuffer(window_s=1.0, max_sample_rate=100)
    assert buffer.snapshot() is None
    for index in range(5):  # 20 frames at 10 Hz into a 10-frame ring: wraps around
        buffer.append(ramp_chunk(4 * index, 4, channels=2), 10, stamp_ns=index * 400_000_000)
    waveform, rate, end_ns = buffer.snapshot()
    assert rate == 10 and waveform.shape == (2, 10)
    np.testing.assert_array_equal(waveform[1], np.arange(10, 20))
    assert end_ns == 4 * 400_000_000 + 300_000_000  # stamp of the last chunk + 3 frames at 10 Hz
    assert buffer.duration_s == 1.0 and buffer.resets == 0


def test_ring_buffer_oversized_chunk_keeps_its_newest_samples():
    buffer = AudioRingBuffer(window_s=0.5, max_sample_rate=100)
    buffer.append(ramp_chunk(0, 3), 10, stamp_ns=0)
    buffer.append(ramp_chunk(100, 12), 10, stamp_ns=10**9)
    np.testing.assert_array_equal(buffer.snapshot().waveform[0], np.arange(107, 112))


def test_ring_buffer_snapshot_is_a_copy():
    buffer = AudioRingBuffer(window_s=1.0, max_sample_rate=100)
    buffer.append(ramp_chunk(0, 3), 10, stamp_ns=0)
    buffer.snapshot().waveform[:] = -1
    np.testing.assert_array_equal(buffer.snapshot().waveform[0], [0, 1, 2])


@pytest.mark.parametrize('chunk, rate, stamp_ns', [
    (ramp_chunk(0, 4), 20, 10**9),  # sample rate change
    (ramp_chunk(0, 4, channels=2), 10, 10**9),  # channel count change
    (ramp_chunk(0, 4), 10, 0),  # stamped before the previous chunk (bag loop)
])
def test_ring_buffer_resets_on_discontinuities(chunk, rate, stamp_ns):
    buffer = AudioRingBuffer(window_s=1.0, max_sample_rate=100)
    buffer.append(ramp_chunk(50, 6), 10, stamp_ns=5 * 10**8)
    buffer.append(chunk, rate, stamp_ns)
    snapshot = buffer.snapshot()
    assert buffer.resets == 1 and snapshot.sample_rate == rate
    np.testing.assert_array_equal(snapshot.waveform, chunk)


def test_ring_buffer_clear_is_not_a_reset():
    buffer = AudioRingBuffer(window_s=1.0, max_sample_rate=100)
    buffer.append(ramp_chunk(0, 4), 10, stamp_ns=0)
    buffer.clear()
    assert buffer.snapshot() is None and buffer.resets == 0 and buffer.duration_s == 0.0


@pytest.mark.parametrize('chunk, rate', [
    (np.zeros(4), 10), (np.zeros((3, 4)), 10), (np.zeros((1, 4)), 0), (np.zeros((1, 4)), 101)])
def test_ring_buffer_rejects_chunks_beyond_its_bounds(chunk, rate):
    buffer = AudioRingBuffer(window_s=1.0, max_sample_rate=100, max_channels=2)
    with pytest.raises(AudioBufferError):
        buffer.append(chunk, rate, stamp_ns=0)


@pytest.mark.shared_data
def test_ring_buffer_holds_real_audio_at_the_source_rate(shared_data):
    with wave.open(str(shared_data / 'audio/imagebind_dog.wav')) as wav:
        frames = wav.readframes(wav.getnframes())
    waveform = decode_audio('S16LE', 2, 44100, frames).waveform
    buffer = AudioRingBuffer(window_s=2.0, max_sample_rate=48000)
    start_ns, chunk = 1_700_000_000 * 10**9, 1024
    for first in range(0, waveform.shape[1], chunk):
        buffer.append(waveform[:, first:first + chunk], 44100, start_ns + round(first * 1e9 / 44100))
    snapshot = buffer.snapshot()
    np.testing.assert_array_equal(snapshot.waveform, waveform[:, -88200:])
    assert abs(snapshot.end_stamp_ns - (start_ns + (waveform.shape[1] - 1) * 1e9 / 44100)) <= 1


def test_ring_buffer_appends_are_atomic_across_threads():
    """Concurrent writers and a reader: every snapshot is made of whole chunks (save the oldest, cut by the ring)."""
    buffer, chunk, writers, rounds = AudioRingBuffer(window_s=1.0, max_sample_rate=1000), 37, 4, 200
    start = threading.Barrier(writers + 1)
    errors = []

    def write(writer):
        start.wait()
        try:
            for index in range(rounds):
                buffer.append(np.full((1, chunk), writer * rounds + index, np.float32), 1000, stamp_ns=0)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread's assertion
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(writer,)) for writer in range(writers)]
    for thread in threads:
        thread.start()
    start.wait()
    snapshots = 0
    while any(thread.is_alive() for thread in threads) or snapshots == 0:
        snapshot = buffer.snapshot()
        if snapshot is None:
            continue
        snapshots += 1
        values = snapshot.waveform[0]
        run_starts = np.flatnonzero(np.diff(values)) + 1
        runs = np.diff(np.concatenate([[0], run_starts, [len(values)]]))
        if not (runs[1:] == chunk).all() or runs[0] > chunk:
            errors.append(runs)
    for thread in threads:
        thread.join()
    assert not errors and buffer.resets == 0
    assert buffer.snapshot().waveform.shape == (1, 1000)


def test_audio_window_is_ready_once_it_holds_the_minimum():
    """The one audio-window helper of the encoder and grounding nodes: nothing until min_window_s is buffered."""
    buffer = AudioRingBuffer(2.0, min_window_s=1.0)
    assert buffer.ready_window() is None
    buffer.append(np.zeros((1, 8000), np.float32), 16000, 0)
    assert buffer.ready_window() is None and buffer.snapshot() is not None
    buffer.append(np.zeros((1, 8000), np.float32), 16000, 500_000_000)
    assert buffer.ready_window().waveform.shape == (1, 16000)
