"""Hypothesis strategies for hostile or broken ROS messages and requests: what any process on a shared DDS network
could send to the stack's topics, services and actions.

Each strategy mixes plausible messages with lies in every header field (huge or zero dimensions, steps and counts
that disagree with the data, unknown encodings, NaN/inf payloads, truncated or forged compressed images), so that a
node sees both what it must accept and what it must refuse. Payloads stay small (at most a few kB) except where a
size is the point; claimed dimensions are what gets huge.
"""
from __future__ import annotations

import array
import struct
import zlib

import cv2
import numpy as np
from hypothesis import strategies as st
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField

from mm_llm_ros_interfaces.msg import AudioChunk, Embedding, PerceptionContext

UINT32_MAX = 2**32 - 1
# Dimensions: small real ones, and the lies that make a naive decoder allocate gigabytes.
DIMENSIONS = st.one_of(st.integers(0, 48), st.sampled_from([65_535, 100_000, 2**31 - 1, UINT32_MAX]))
IMAGE_ENCODINGS = ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16', '16UC1', '32FC1', 'yuv422', 'bayer_rggb8',
                   '8UC3', '64FC1', 'RGB8', '', 'rgb8\x00junk')
BYTES_PER_PIXEL = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1, 'mono16': 2, '16UC1': 2, '32FC1': 4}
SPECIAL_FLOATS = (np.nan, np.inf, -np.inf, 0.0, -0.0, 1e38, -1e38, 1e-45)
KNOWN_QUESTIONS = ('What is in front of the robot?', 'Describe the scene.', 'What do you hear?')


def ros_string(text: str) -> str:
    """What a ROS string field carries: the rosidl C strings end at the first NUL."""
    return text.split('\x00', 1)[0]


def _stamp(msg, sec: int, nanosec: int):
    msg.header.stamp.sec, msg.header.stamp.nanosec = sec, nanosec
    return msg


STAMPS = st.tuples(st.integers(-2**31, 2**31 - 1), st.integers(0, UINT32_MAX))
FRAME_IDS = st.text(max_size=20)


@st.composite
def payloads(draw, size: int) -> bytes:
    """Exactly `size` bytes: random, zeros, or float32 values that are NaN, inf or extreme."""
    kind = draw(st.sampled_from(['random', 'zeros', 'special_floats']))
    if kind == 'random':
        return draw(st.binary(min_size=size, max_size=size))
    if kind == 'zeros':
        return bytes(size)
    value = draw(st.sampled_from(SPECIAL_FLOATS))
    return (np.full(size // 4 + 1, value, np.float32).tobytes())[:size]


@st.composite
def images(draw) -> Image:
    """sensor_msgs/Image: consistent small frames with hostile pixels, or headers that lie about the data."""
    encoding = draw(st.one_of(st.sampled_from(IMAGE_ENCODINGS), st.text(max_size=10)))
    height, width = draw(DIMENSIONS), draw(DIMENSIONS)
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=draw(st.sampled_from([0, 1, 255])))
    pixel_bytes = BYTES_PER_PIXEL.get(encoding)
    if pixel_bytes and height * width <= 48 * 48 and draw(st.booleans()):
        msg.step = width * pixel_bytes
        msg.data = draw(payloads(height * msg.step))
    else:
        msg.step = draw(st.one_of(st.integers(0, 256), st.integers(0, UINT32_MAX)))
        msg.data = draw(st.binary(max_size=4096))
    return _stamp(msg, *draw(STAMPS))


def _small_png(height: int = 8, width: int = 8) -> bytes:
    return cv2.imencode('.png', np.full((height, width, 3), 127, np.uint8))[1].tobytes()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose (valid, checksummed) header claims `width` x `height` pixels: a decompression bomb's header."""
    body = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    ihdr = struct.pack('>I', len(body)) + b'IHDR' + body + struct.pack('>I', zlib.crc32(b'IHDR' + body))
    return b'\x89PNG\r\n\x1a\n' + ihdr + _small_png()[33:]


_REAL_JPEG = cv2.imencode('.jpg', np.full((16, 16, 3), 80, np.uint8))[1].tobytes()
_REAL_PNG = _small_png()


@st.composite
def compressed_images(draw) -> CompressedImage:
    """sensor_msgs/CompressedImage: real, truncated, bit-flipped and forged JPEG/PNG data and odd formats."""
    fmt = draw(st.one_of(st.sampled_from(['jpeg', 'png', 'rgb8; jpeg compressed bgr8', '16UC1; compressedDepth png',
                                          '32FC1; compressedDepth', 'compressedDepth rvl', 'tiff', '']),
                         st.text(max_size=12)))
    kind = draw(st.sampled_from(['real', 'truncated', 'flipped', 'bomb', 'random']))
    real = draw(st.sampled_from([_REAL_JPEG, _REAL_PNG]))
    if kind == 'real':
        data = real
    elif kind == 'truncated':
        data = real[:draw(st.integers(0, len(real) - 1))]
    elif kind == 'flipped':
        corrupt = bytearray(real)
        for index in draw(st.lists(st.integers(0, len(real) - 1), min_size=1, max_size=8)):
            corrupt[index] ^= 0xFF
        data = bytes(corrupt)
    elif kind == 'bomb':
        data = _png_claiming(draw(st.sampled_from([60_000, 2**31 - 1])), draw(st.sampled_from([60_000, 1])))
    else:
        data = draw(st.binary(max_size=2048))
    return _stamp(CompressedImage(format=fmt, data=data), *draw(STAMPS))


FIELD_NAMES = ('x', 'y', 'z', 'intensity', 'rgb', 'ring', '', 'x\x00')


@st.composite
def point_clouds(draw) -> PointCloud2:
    """sensor_msgs/PointCloud2: odd field layouts, steps and counts that disagree, and NaN/inf coordinates."""
    fields = draw(st.lists(st.builds(lambda name, offset, datatype, count: PointField(
        name=name, offset=offset, datatype=datatype, count=count),
        st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=6)), st.integers(0, 64),
        st.integers(0, 12), st.integers(0, 4)), max_size=6))
    if draw(st.booleans()):  # a well-formed float32 xyz layout
        fields = [PointField(name=axis, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                  for i, axis in enumerate('xyz')] + fields[:1]
    height, width = draw(DIMENSIONS), draw(DIMENSIONS)
    point_step = draw(st.one_of(st.just(12), st.integers(0, 64), st.just(UINT32_MAX)))
    msg = PointCloud2(height=height, width=width, fields=fields, point_step=point_step,
                      is_bigendian=draw(st.booleans()), is_dense=draw(st.booleans()))
    if height * width * point_step <= 48 * 48 * 16 and draw(st.booleans()):
        msg.row_step = width * point_step
        msg.data = draw(payloads(height * width * point_step))
    else:
        msg.row_step = draw(st.integers(0, UINT32_MAX))
        msg.data = draw(st.binary(max_size=4096))
    return _stamp(msg, *draw(STAMPS))


@st.composite
def audio_chunks(draw) -> AudioChunk:
    """AudioChunk: absurd rates and channel counts, unknown encodings, partial frames and NaN/inf samples."""
    encoding = draw(st.one_of(st.sampled_from(['S16LE', 'F32LE', 'MP3', 's16le', '']), st.text(max_size=8)))
    channels = draw(st.one_of(st.integers(0, 3), st.integers(0, 255)))
    rate = draw(st.sampled_from([0, 1, 8_000, 16_000, 44_100, 192_000, 384_000, 1_000_000, UINT32_MAX]))
    msg = AudioChunk(sample_rate=rate, channels=channels, encoding=encoding)
    width = {'S16LE': 2, 'F32LE': 4}.get(encoding)
    if width and channels and draw(st.booleans()):
        msg.data = draw(payloads(width * channels * draw(st.integers(0, 400))))
    else:
        msg.data = draw(st.binary(max_size=4096))
    return _stamp(msg, *draw(STAMPS))


FLOAT64 = st.one_of(st.floats(), st.sampled_from([0.0, -1.0, 1e308]))


@st.composite
def camera_infos(draw) -> CameraInfo:
    """CameraInfo: hostile image sizes and intrinsics (zero, negative, NaN, inf, skewed)."""
    msg = CameraInfo(height=draw(DIMENSIONS), width=draw(DIMENSIONS))
    msg.k = draw(st.one_of(st.lists(FLOAT64, min_size=9, max_size=9),
                           st.just([500.0, 0.0, 320.0, 0.0, 500.0, 240.0, 0.0, 0.0, 1.0])))
    return _stamp(msg, *draw(STAMPS))


@st.composite
def embeddings(draw, dim: int) -> tuple[Embedding, bool]:
    """(Embedding, is_valid): wrong widths (up to 64 k floats), NaN/inf values, any modality and stamp."""
    size = draw(st.one_of(st.just(dim), st.integers(0, 2 * dim), st.sampled_from([dim - 1, dim + 1, 65_536])))
    if size <= 2 * dim:
        pattern = np.asarray(draw(st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=8)), np.float32)
        values = np.resize(pattern, size)
    else:
        values = np.zeros(size, np.float32)
    special = draw(st.one_of(st.none(), st.sampled_from(SPECIAL_FLOATS[:3])))
    if special is not None and size:
        values[draw(st.integers(0, size - 1))] = special
    msg = Embedding(modality=draw(st.text(max_size=10)), model=draw(st.text(max_size=10)),
                    source_topic=draw(st.text(max_size=10)))
    msg.embedding = array.array('f', values.tobytes())
    _stamp(msg, *draw(STAMPS)).header.frame_id = draw(FRAME_IDS)
    return msg, size == dim and bool(np.all(np.isfinite(values)))


@st.composite
def perception_contexts(draw) -> PerceptionContext:
    """PerceptionContext: huge, binary, empty or whitespace text under any kind and JSON."""
    text = draw(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode('latin-1')),
                          st.builds(lambda ch, n: ch * n, st.sampled_from('x \x07\u202e'),
                                    st.integers(1_000, 1_000_000))))
    msg = PerceptionContext(kind=draw(st.text(max_size=12)), text=text, json=draw(st.text(max_size=50)),
                            source_topic=draw(st.text(max_size=10)), latency_s=draw(st.floats(width=32)))
    return _stamp(msg, *draw(STAMPS))


def questions(max_chars: int):
    """Questions: normal, any Unicode (control characters and NUL included), binary bytes as text, whitespace only,
    around the length limit, and megabytes long."""
    return st.one_of(
        st.sampled_from(KNOWN_QUESTIONS),
        st.text(st.characters(codec='utf-8'), max_size=80),
        st.binary(max_size=120).map(lambda b: b.decode('latin-1')),
        st.text(st.sampled_from(' \t\n\r\x0b\x0c\u00a0\u2003\u3000'), max_size=30),
        st.builds(lambda ch, n: ch * n, st.sampled_from('aé字 '), st.integers(max_chars - 2, max_chars + 2)),
        st.builds(lambda ch, n: ch * n, st.sampled_from('x \x01'), st.integers(10_000, 2_000_000)),
    )


def modality_lists(known: tuple[str, ...]):
    """Modality lists: known names (in any case and padding), unknown names and arbitrary text."""
    name = st.one_of(st.sampled_from(known), st.sampled_from(('VISION', ' audio ', 'sonar', '', 'vision\x00x')),
                     st.text(max_size=12))
    return st.lists(name, max_size=5)


def ask_fields(known: tuple[str, ...], max_chars: int):
    """Fields of an Ask request / AskStream goal, hostile in every one of them."""
    return st.fixed_dictionaries({
        'question': questions(max_chars),
        'modalities': st.one_of(st.just([]), modality_lists(known)),
        'max_age_s': st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, float('nan'), float('inf'), -1.0])),
        'max_new_tokens': st.one_of(st.integers(0, UINT32_MAX), st.sampled_from([0, 1, UINT32_MAX])),
    })
