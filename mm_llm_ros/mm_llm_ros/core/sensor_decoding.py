"""Decode ROS sensor payloads (Image, CompressedImage, PointCloud2, AudioChunk, thermal Image, Imu) into numpy
arrays, and back.

Every function takes the primitive fields of a message, so this module needs no ROS installation; the thin
adapters in ``mm_llm_ros.ros.conversions`` unpack real messages into these calls.

Robustness contract: a decoder either returns well-formed arrays or raises :class:`DecodeError`, whose
``reason`` is a short stable key (a :class:`DecodeReason`) meant for drop counters. Sizes are checked against
:class:`DecodeLimits` before anything proportional to the claimed dimensions is allocated, so a corrupt header
cannot make a node allocate gigabytes.

Conventions chosen here:

- Colour output is ``rgb``: (H, W, 3) uint8 in RGB order. For ``rgb8`` it is a read-only, zero-copy view over the
  message buffer (rows may be strided when ``step`` has padding); other encodings produce a fresh array.
- ``mono16`` is reduced to 8 bit with a fixed ``>> 8``. Per-frame range scaling would make brightness flicker
  between frames and amplify sensor noise on dark scenes; a fixed shift keeps frames comparable over time.
- Depth output is ``depth_m``: (H, W) float32 metres, NaN where invalid (``16UC1`` 0, and non-finite or
  non-positive ``32FC1`` values).
- Audio is (channels, n) float32 in [-1, 1]; ``S16LE`` is scaled by 1/32768 like torchaudio/soundfile.
- Thermal images keep the camera's raw values (uint8 intensity, uint16 counts or centikelvin, float32 kelvin);
  mapping them to what ImageBind saw is preprocessing (``core/imagebind/thermal.py``).
- Imu samples are (6,) float64: linear acceleration xyz in m/s^2, then angular velocity xyz in rad/s.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import operator
import struct
from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np

logger = logging.getLogger(__name__)


class DecodeReason(str, enum.Enum):
    """Why a payload was rejected; the value is a stable key for counters and diagnostics."""

    EMPTY = 'empty'
    BAD_DATA = 'bad_data'
    UNKNOWN_ENCODING = 'unknown_encoding'
    UNSUPPORTED = 'unsupported'
    BAD_DIMENSIONS = 'bad_dimensions'
    BAD_STEP = 'bad_step'
    SIZE_MISMATCH = 'size_mismatch'
    TOO_LARGE = 'too_large'
    DECODE_FAILED = 'decode_failed'
    BAD_FIELDS = 'bad_fields'
    MISSING_FIELDS = 'missing_fields'
    NO_POINTS = 'no_points'
    NO_FINITE_POINTS = 'no_finite_points'
    BAD_CHANNELS = 'bad_channels'
    BAD_SAMPLE_RATE = 'bad_sample_rate'
    PARTIAL_FRAME = 'partial_frame'
    NON_FINITE = 'non_finite'

    def __str__(self) -> str:  # the bare key in f-strings and logs on every Python version
        return self.value


class DecodeError(ValueError):
    """A sensor payload that cannot be decoded.

    ``reason`` is a :class:`DecodeReason` (a ``str``, so ``err.reason == 'size_mismatch'`` works);
    ``str(err)`` is a human-readable explanation with the offending values.
    """

    def __init__(self, reason: DecodeReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class EncodeError(ValueError):
    """An array that cannot be encoded into the requested sensor message layout."""


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds checked before allocation; anything larger is rejected with reason ``too_large``."""

    max_bytes: int = 64 * 1024 * 1024  # size of one message payload
    max_pixels: int = 8192 * 8192  # height * width, also of compressed images after decoding
    max_points: int = 4_000_000  # height * width of a PointCloud2
    max_fields: int = 1024  # entries in PointCloud2.fields
    max_audio_samples: int = 1 << 22  # frames * channels in one audio chunk
    max_audio_channels: int = 64
    max_sample_rate: int = 384_000

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f'DecodeLimits.{field.name} must be positive, got {getattr(self, field.name)}')


DEFAULT_LIMITS = DecodeLimits()


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """A decoded camera frame: exactly one of ``rgb`` (H, W, 3) uint8 or ``depth_m`` (H, W) float32 is set."""

    encoding: str  # canonical Image encoding, or the CompressedImage format string
    rgb: np.ndarray | None = None
    depth_m: np.ndarray | None = None

    @property
    def is_depth(self) -> bool:
        return self.depth_m is not None

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the frame."""
        array = self.depth_m if self.rgb is None else self.rgb
        return array.shape[0], array.shape[1]


@dataclasses.dataclass(frozen=True)
class DecodedPointCloud:
    """Finite points of a PointCloud2: ``xyz`` (N, 3) float32 and optional ``intensity`` (N,) float32."""

    xyz: np.ndarray
    intensity: np.ndarray | None
    dropped: int  # points removed because a coordinate was NaN/inf


class DecodedAudio(NamedTuple):
    """``waveform`` (channels, n) float32 in [-1, 1] at ``sample_rate`` Hz."""

    waveform: np.ndarray
    sample_rate: int


class PointFieldType(enum.IntEnum):
    """sensor_msgs/PointField datatype constants."""

    INT8 = 1
    UINT8 = 2
    INT16 = 3
    UINT16 = 4
    INT32 = 5
    UINT32 = 6
    FLOAT32 = 7
    FLOAT64 = 8


class PointField(NamedTuple):
    """One sensor_msgs/PointField, as plain values."""

    name: str
    offset: int
    datatype: int
    count: int = 1


class EncodedImage(NamedTuple):
    height: int
    width: int
    step: int
    data: bytes


class EncodedPointCloud(NamedTuple):
    """An unorganized cloud (height 1): width = len(data) // point_step, row_step = len(data)."""

    fields: list[PointField]
    point_step: int
    data: bytes


# encoding -> (channels, little-endian numpy type); depth encodings are listed separately.
_COLOUR_ENCODINGS: dict[str, tuple[int, str]] = {
    'rgb8': (3, '<u1'), 'bgr8': (3, '<u1'), 'rgba8': (4, '<u1'), 'bgra8': (4, '<u1'),
    'mono8': (1, '<u1'), 'mono16': (1, '<u2'),
}
_DEPTH_ENCODINGS: dict[str, tuple[int, str]] = {'16uc1': (1, '<u2'), '32fc1': (1, '<f4')}
_CANONICAL_ENCODING = {name.lower(): name for name in
                       ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16', '16UC1', '32FC1')}
# cv2 conversions into RGB; rgb8 needs none (zero copy).
_TO_RGB = {'bgr8': cv2.COLOR_BGR2RGB, 'rgba8': cv2.COLOR_RGBA2RGB, 'bgra8': cv2.COLOR_BGRA2RGB,
           'mono8': cv2.COLOR_GRAY2RGB}

_POINT_NUMPY_TYPES = {
    PointFieldType.INT8: 'i1', PointFieldType.UINT8: 'u1', PointFieldType.INT16: 'i2',
    PointFieldType.UINT16: 'u2', PointFieldType.INT32: 'i4', PointFieldType.UINT32: 'u4',
    PointFieldType.FLOAT32: 'f4', PointFieldType.FLOAT64: 'f8',
}

_AUDIO_ENCODINGS = {'s16le': '<i2', 'f32le': '<f4'}
_S16_SCALE = 32768.0

# compressed_depth_image_transport prefixes its PNG with a 12-byte ConfigHeader: int32 format (0 = INV_DEPTH)
# and two float32 quantisation parameters, little endian as written by x86/ARM publishers.
_COMPRESSED_DEPTH_HEADER = struct.Struct('<iff')
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_JPEG_SOI = b'\xff\xd8'
# JPEG start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Segments before the frame header (EXIF, ICC profiles, thumbnails) rarely exceed a few 64 KiB segments.
_JPEG_HEADER_SCAN_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers


def _as_int(value: object, name: str, reason: DecodeReason = DecodeReason.BAD_DIMENSIONS) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise DecodeError(reason, f'{name} must be an integer, got {value!r}') from None


def _byte_view(data: object, limits: DecodeLimits) -> np.ndarray:
    """A zero-copy 1-D uint8 view of any buffer (bytes, bytearray, memoryview, array.array, ndarray)."""
    try:
        view = np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as exc:
        raise DecodeError(DecodeReason.BAD_DATA, f'data is not a contiguous byte buffer: {exc}') from None
    if view.size == 0:
        raise DecodeError(DecodeReason.EMPTY, 'data is empty')
    if view.size > limits.max_bytes:
        raise DecodeError(DecodeReason.TOO_LARGE, f'{view.size} bytes exceed the limit of {limits.max_bytes}')
    return view


def _check_pixels(height: int, width: int, limits: DecodeLimits) -> None:
    if height <= 0 or width <= 0:
        raise DecodeError(DecodeReason.BAD_DIMENSIONS, f'image size {width}x{height} must be positive')
    if height * width > limits.max_pixels:
        raise DecodeError(DecodeReason.TOO_LARGE,
                          f'image size {width}x{height} exceeds the limit of {limits.max_pixels} pixels')


def _dtype(code: str, big_endian: bool) -> np.dtype:
    return np.dtype(code).newbyteorder('>' if big_endian else '<')


# ----------------------------------------------------------------------------------------------------------------
# sensor_msgs/Image


def decode_image(encoding: str, height: int, width: int, step: int, is_bigendian: bool | int, data: object,
                 limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedImage:
    """Decode the fields of a sensor_msgs/Image.

    Colour encodings (rgb8, bgr8, rgba8, bgra8, mono8, mono16) give ``rgb``; depth encodings give ``depth_m``:
    16UC1 is millimetres (0 = invalid), 32FC1 is metres (non-finite or <= 0 = invalid). Row padding
    (``step`` > width * bytes per pixel) and big-endian 16/32-bit data are handled. Encoding names are matched
    case-insensitively. Raises :class:`DecodeError`.
    """
    key = encoding.strip().lower() if isinstance(encoding, str) else ''
    layout = _COLOUR_ENCODINGS.get(key) or _DEPTH_ENCODINGS.get(key)
    if layout is None:
        known = ', '.join(_CANONICAL_ENCODING.values())
        raise DecodeError(DecodeReason.UNKNOWN_ENCODING, f'unsupported image encoding {encoding!r} (known: {known})')
    channels, code = layout
    height, width, step, buffer, dtype = _image_buffer(encoding, height, width, step, is_bigendian, data, code,
                                                       channels, limits)
    # Zero-copy view that skips the padding at the end of each row.
    pixels = np.ndarray((height, width, channels), dtype=dtype, buffer=buffer,
                        strides=(step, channels * dtype.itemsize, dtype.itemsize))
    canonical = _CANONICAL_ENCODING[key]
    if key in _DEPTH_ENCODINGS:
        return DecodedImage(canonical, depth_m=_to_depth_m(pixels[..., 0], key))
    return DecodedImage(canonical, rgb=_to_rgb(pixels, key))


def _to_rgb(pixels: np.ndarray, key: str) -> np.ndarray:
    """(H, W, C) pixels of a colour encoding -> (H, W, 3) uint8 RGB."""
    if key == 'rgb8':
        pixels.flags.writeable = False  # the view aliases the message buffer
        return pixels
    if key == 'mono16':
        return cv2.cvtColor((pixels[..., 0] >> 8).astype(np.uint8), cv2.COLOR_GRAY2RGB)
    if key == 'mono8':
        pixels = pixels[..., 0]
    return cv2.cvtColor(pixels, _TO_RGB[key])


def _to_depth_m(values: np.ndarray, key: str) -> np.ndarray:
    """Raw depth values -> float32 metres with NaN for invalid pixels."""
    depth = values.astype(np.float32)  # native byte order, contiguous copy
    if key == '16uc1':
        depth *= np.float32(1e-3)
        depth[values == 0] = np.nan
    else:
        with np.errstate(invalid='ignore'):
            depth[~(depth > 0) | ~np.isfinite(depth)] = np.nan  # ~(x > 0) is also True for NaN
    return depth


def encode_image(image: np.ndarray, encoding: str, *, is_bigendian: bool = False,
                 row_padding: int = 0) -> EncodedImage:
    """Encode an array into sensor_msgs/Image fields (the inverse of :func:`decode_image`).

    Colour encodings take (H, W, 3) uint8 RGB; mono8/mono16 take (H, W) uint8/uint16 grey; 16UC1 takes (H, W)
    float metres (NaN, <= 0 or beyond 65.535 m become 0 = invalid) or uint16 millimetres; 32FC1 takes (H, W)
    float metres. ``row_padding`` extra zero bytes per row exercise decoders' step handling.
    """
    key = encoding.lower()
    image = np.asarray(image)
    if key in ('rgb8', 'bgr8', 'rgba8', 'bgra8'):
        _require_shape(image, 3, np.uint8, encoding)
        if key.startswith('bgr'):
            image = image[..., ::-1]
        if key.endswith('a8'):
            image = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif key in ('mono8', 'mono16'):
        _require_shape(image, 2, np.uint8 if key == 'mono8' else np.uint16, encoding)
    elif key == '16uc1':
        if image.ndim != 2:
            raise EncodeError(f'16UC1 needs an (H, W) array, got shape {image.shape}')
        if image.dtype != np.uint16:
            image = _metres_to_millimetres(image)
    elif key == '32fc1':
        if image.ndim != 2:
            raise EncodeError(f'32FC1 needs an (H, W) array, got shape {image.shape}')
        image = image.astype(np.float32)
    else:
        raise EncodeError(f'cannot encode to {encoding!r}')
    height, width = image.shape[:2]
    if is_bigendian:
        image = image.astype(image.dtype.newbyteorder('>'))
    rows = np.ascontiguousarray(image).view(np.uint8).reshape(height, -1)
    step = rows.shape[1] + row_padding
    padded = np.zeros((height, step), np.uint8)
    padded[:, :rows.shape[1]] = rows
    return EncodedImage(height, width, step, padded.tobytes())


def _require_shape(image: np.ndarray, ndim: int, dtype: type, encoding: str) -> None:
    expected = '(H, W, 3)' if ndim == 3 else '(H, W)'
    if image.ndim != ndim or (ndim == 3 and image.shape[2] != 3) or image.dtype != dtype:
        raise EncodeError(f'{encoding} needs a {expected} {np.dtype(dtype).name} array, '
                          f'got {image.shape} {image.dtype}')


def _metres_to_millimetres(depth_m: np.ndarray) -> np.ndarray:
    millimetres = np.round(np.asarray(depth_m, np.float64) * 1000.0)
    with np.errstate(invalid='ignore'):
        valid = (millimetres > 0) & (millimetres <= np.iinfo(np.uint16).max)  # False for NaN
    return np.where(valid, millimetres, 0).astype(np.uint16)


# ----------------------------------------------------------------------------------------------------------------
# sensor_msgs/CompressedImage


def decode_compressed_image(format: str, data: object,  # noqa: A002 - the message field's name
                            limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedImage:
    """Decode a sensor_msgs/CompressedImage (JPEG or PNG, and PNG ``compressedDepth``).

    ``format`` follows image_transport: ``"jpeg"``, ``"png"``, ``"rgb8; jpeg compressed bgr8"`` or
    ``"16UC1; compressedDepth png"``. The codec is identified from the data's magic bytes (format strings are
    often imprecise); the format only selects compressedDepth and whether 16-bit single-channel PNGs are depth.
    Image dimensions are read from the JPEG/PNG header and checked against ``limits`` before decoding.
    Raises :class:`DecodeError`.
    """
    if not isinstance(format, str):
        raise DecodeError(DecodeReason.UNKNOWN_ENCODING, f'format must be a string, got {format!r}')
    buffer = _byte_view(data, limits)
    source_encoding, _, codec = (part.strip() for part in format.partition(';'))
    if not codec:  # plain "jpeg"/"png": no source encoding given
        source_encoding, codec = '', source_encoding
    if 'compresseddepth' in codec.lower():
        return _decode_compressed_depth(source_encoding, codec, buffer, limits)
    decoded = _imdecode(buffer, limits)
    if decoded.ndim == 2 and decoded.dtype == np.uint16 and source_encoding.lower() in _DEPTH_ENCODINGS:
        return DecodedImage(_CANONICAL_ENCODING[source_encoding.lower()],
                            depth_m=_to_depth_m(decoded, source_encoding.lower()))
    if decoded.dtype == np.uint16:
        decoded = (decoded >> 8).astype(np.uint8)
    elif decoded.dtype != np.uint8:
        raise DecodeError(DecodeReason.UNSUPPORTED, f'compressed image with {decoded.dtype} pixels')
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    conversion = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}.get(channels)
    if conversion is None:
        raise DecodeError(DecodeReason.UNSUPPORTED, f'compressed image with {channels} channels')
    return DecodedImage(format, rgb=cv2.cvtColor(decoded, conversion))


def _decode_compressed_depth(source_encoding: str, codec: str, buffer: np.ndarray,
                             limits: DecodeLimits) -> DecodedImage:
    key = source_encoding.lower()
    if key not in _DEPTH_ENCODINGS:
        raise DecodeError(DecodeReason.UNSUPPORTED,
                          f'compressedDepth of {source_encoding!r}: only 16UC1 and 32FC1 are supported')
    if 'rvl' in codec.lower():
        raise DecodeError(DecodeReason.UNSUPPORTED, 'compressedDepth rvl is not supported (use png)')
    header_size = _COMPRESSED_DEPTH_HEADER.size
    if buffer.size <= header_size:
        raise DecodeError(DecodeReason.SIZE_MISMATCH,
                          f'compressedDepth needs a {header_size}-byte header and a PNG, got {buffer.size} bytes')
    _, quant_a, quant_b = _COMPRESSED_DEPTH_HEADER.unpack_from(buffer)
    stored = _imdecode(buffer[header_size:], limits)
    if stored.ndim != 2 or stored.dtype != np.uint16:
        raise DecodeError(DecodeReason.DECODE_FAILED,
                          f'compressedDepth PNG must be 16-bit single channel, got {stored.dtype} {stored.shape}')
    if key == '16uc1':
        return DecodedImage('16UC1', depth_m=_to_depth_m(stored, key))
    # 32FC1 is stored as quantised inverse depth: depth = A / (v - B), v == 0 meaning invalid.
    with np.errstate(divide='ignore', invalid='ignore', over='ignore'):
        depth = (np.float32(quant_a) / (stored.astype(np.float32) - np.float32(quant_b))).astype(np.float32)
    depth[stored == 0] = np.nan
    return DecodedImage('32FC1', depth_m=_to_depth_m(depth, key))


def _imdecode(buffer: np.ndarray, limits: DecodeLimits) -> np.ndarray:
    width, height = _peek_image_size(buffer)
    _check_pixels(height, width, limits)
    try:
        decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise DecodeError(DecodeReason.DECODE_FAILED, f'OpenCV could not decode the image: {exc}') from None
    if decoded is None or decoded.size == 0:
        raise DecodeError(DecodeReason.DECODE_FAILED, 'OpenCV could not decode the image (corrupt data?)')
    return decoded


def _peek_image_size(buffer: np.ndarray) -> tuple[int, int]:
    """(width, height) from a PNG IHDR or JPEG SOF header, without decoding pixels."""
    head = buffer[:32].tobytes()
    if head.startswith(_PNG_SIGNATURE):
        if len(head) < 24 or head[12:16] != b'IHDR':
            raise DecodeError(DecodeReason.DECODE_FAILED, 'PNG without an IHDR header')
        return struct.unpack_from('>II', head, 16)
    if head.startswith(_JPEG_SOI):
        return _jpeg_size(buffer)
    raise DecodeError(DecodeReason.UNSUPPORTED, f'data is neither JPEG nor PNG (starts with {head[:8].hex()})')


def _jpeg_size(buffer: np.ndarray) -> tuple[int, int]:
    data = memoryview(buffer[:_JPEG_HEADER_SCAN_BYTES])  # zero copy; indexing yields ints
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length field
            position += 2
            continue
        (length,) = struct.unpack_from('>H', data, position + 2)
        if marker in _JPEG_SOF_MARKERS and position + 9 <= len(data):
            height, width = struct.unpack_from('>HH', data, position + 5)
            return width, height
        if marker == 0xDA or length < 2:  # scan data started, or a malformed segment
            break
        position += 2 + length
    raise DecodeError(DecodeReason.DECODE_FAILED, 'JPEG without a readable start-of-frame header')


def encode_compressed_image(rgb: np.ndarray, fmt: str = 'jpeg', *, quality: int = 90) -> tuple[str, bytes]:
    """Compress an (H, W, 3) uint8 RGB image to JPEG or PNG; returns (CompressedImage.format, data)."""
    if fmt not in ('jpeg', 'png'):
        raise EncodeError(f"compressed format must be 'jpeg' or 'png', got {fmt!r}")
    _require_shape(np.asarray(rgb), 3, np.uint8, fmt)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == 'jpeg' else []
    ok, encoded = cv2.imencode('.jpg' if fmt == 'jpeg' else '.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise EncodeError(f'OpenCV failed to encode a {rgb.shape} image as {fmt}')
    return f'rgb8; {fmt} compressed bgr8', encoded.tobytes()


def encode_compressed_depth(depth_m: np.ndarray, encoding: str = '16UC1', *, depth_max: float = 10.0,
                            depth_quantization: float = 100.0) -> tuple[str, bytes]:
    """Compress (H, W) metres like compressed_depth_image_transport (PNG); returns (format, data).

    16UC1 stores millimetres; 32FC1 stores inverse depth quantised with the transport's ``depth_max`` and
    ``depth_quantization`` parameters (defaults are the transport's), so beyond ``depth_max`` becomes invalid.
    """
    depth_m = np.asarray(depth_m, np.float64)
    if depth_m.ndim != 2:
        raise EncodeError(f'depth must be (H, W), got shape {depth_m.shape}')
    quant_a = quant_b = 0.0
    if encoding == '16UC1':
        stored = _metres_to_millimetres(depth_m)
    elif encoding == '32FC1':
        quant_a = np.float32(depth_quantization * (depth_quantization + 1.0))
        quant_b = np.float32(1.0 - quant_a / depth_max)
        with np.errstate(divide='ignore', invalid='ignore'):
            inverse = np.round(quant_a / depth_m + quant_b)
            valid = (depth_m > 0) & (depth_m < depth_max) & (inverse >= 1) & (inverse <= 65535)
        stored = np.where(valid, inverse, 0).astype(np.uint16)
    else:
        raise EncodeError(f"compressedDepth encoding must be '16UC1' or '32FC1', got {encoding!r}")
    ok, encoded = cv2.imencode('.png', stored)
    if not ok:
        raise EncodeError(f'OpenCV failed to encode a {stored.shape} depth image as PNG')
    header = _COMPRESSED_DEPTH_HEADER.pack(0, quant_a, quant_b)
    return f'{encoding}; compressedDepth png', header + encoded.tobytes()


# ----------------------------------------------------------------------------------------------------------------
# sensor_msgs/PointCloud2


def decode_pointcloud2(fields: Sequence[Sequence], height: int, width: int, point_step: int, row_step: int,
                       is_bigendian: bool | int, data: object, is_dense: bool = False,
                       limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedPointCloud:
    """Decode the fields of a sensor_msgs/PointCloud2 into finite xyz points (and intensity if present).

    ``fields`` are (name, offset, datatype, count) tuples (or PointField-like objects converted by the caller).
    x/y/z must be float32 or float64; ``intensity`` may be any numeric type. Other fields are ignored, so any
    padding or vendor layout works. Organized clouds with row padding (``row_step`` > width * point_step) are
    supported. Points with a NaN/inf coordinate are dropped whatever ``is_dense`` claims.
    Raises :class:`DecodeError`.
    """
    height, width = _as_int(height, 'height'), _as_int(width, 'width')
    point_step, row_step = _as_int(point_step, 'point_step'), _as_int(row_step, 'row_step')
    if height < 0 or width < 0:
        raise DecodeError(DecodeReason.BAD_DIMENSIONS, f'cloud size {width}x{height} is negative')
    if height * width == 0:
        raise DecodeError(DecodeReason.NO_POINTS, f'cloud size {width}x{height} has no points')
    if height * width > limits.max_points:
        raise DecodeError(DecodeReason.TOO_LARGE,
                          f'{height * width} points exceed the limit of {limits.max_points}')
    if point_step <= 0 or row_step < width * point_step:
        raise DecodeError(DecodeReason.BAD_STEP,
                          f'point_step {point_step} / row_step {row_step} do not fit {width} points per row')
    buffer = _byte_view(data, limits)
    if buffer.size != height * row_step:
        raise DecodeError(DecodeReason.SIZE_MISMATCH,
                          f'{height} rows of {row_step} bytes need {height * row_step} bytes, got {buffer.size}')
    record = _point_record_dtype(fields, point_step, bool(is_bigendian), limits)
    records = np.ndarray((height, width), dtype=record, buffer=buffer, strides=(row_step, point_step))

    xyz = np.empty((height, width, 3), np.float32)
    intensity = None
    with np.errstate(over='ignore', invalid='ignore'):  # float64 beyond float32 range becomes inf, dropped below
        for axis, name in enumerate('xyz'):
            xyz[..., axis] = records[name]
        if 'intensity' in record.names:
            intensity = records['intensity'].astype(np.float32).reshape(-1)
    xyz = xyz.reshape(-1, 3)

    finite = np.isfinite(xyz).all(axis=1)
    dropped = int(finite.size - np.count_nonzero(finite))
    if dropped == finite.size:
        raise DecodeError(DecodeReason.NO_FINITE_POINTS, f'all {dropped} points have NaN/inf coordinates')
    if dropped:
        if is_dense:
            logger.debug('cloud claims is_dense but %d of %d points are not finite', dropped, finite.size)
        xyz = xyz[finite]
        intensity = None if intensity is None else intensity[finite]
    return DecodedPointCloud(xyz=xyz, intensity=intensity, dropped=dropped)


def _point_record_dtype(fields: Sequence[Sequence], point_step: int, big_endian: bool,
                        limits: DecodeLimits) -> np.dtype:
    """A structured dtype (itemsize = point_step) covering x, y, z and, when usable, intensity."""
    if not isinstance(fields, Sequence) or isinstance(fields, (str, bytes)) or len(fields) > limits.max_fields:
        raise DecodeError(DecodeReason.BAD_FIELDS, f'fields must be a list of at most {limits.max_fields} entries')
    wanted: dict[str, tuple[int, np.dtype]] = {}
    for entry in fields:
        try:
            name, offset, datatype, count = entry
        except (TypeError, ValueError):
            raise DecodeError(DecodeReason.BAD_FIELDS,
                              f'each field must be (name, offset, datatype, count), got {entry!r}') from None
        if name not in ('x', 'y', 'z', 'intensity'):
            continue
        if name in wanted:
            raise DecodeError(DecodeReason.BAD_FIELDS, f'field {name!r} appears twice')
        field = _point_field_dtype(name, offset, datatype, count, point_step, big_endian)
        if field is not None:
            wanted[name] = field
    missing = [axis for axis in 'xyz' if axis not in wanted]
    if missing:
        raise DecodeError(DecodeReason.MISSING_FIELDS, f'cloud has no {"/".join(missing)} field(s)')
    names = list(wanted)
    return np.dtype({'names': names, 'offsets': [wanted[name][0] for name in names],
                     'formats': [wanted[name][1] for name in names], 'itemsize': point_step})


def _point_field_dtype(name: str, offset: object, datatype: object, count: object, point_step: int,
                       big_endian: bool) -> tuple[int, np.dtype] | None:
    """(offset, dtype) of a used field; None for an unusable optional intensity; raises for bad x/y/z."""
    offset, datatype, count = (_as_int(value, f'field {name!r} {label}', DecodeReason.BAD_FIELDS)
                               for value, label in ((offset, 'offset'), (datatype, 'datatype'), (count, 'count')))
    is_axis = name != 'intensity'
    code = _POINT_NUMPY_TYPES.get(datatype)
    problem = None
    if code is None:
        problem = f'unknown datatype {datatype}'
    elif is_axis and code not in ('f4', 'f8'):
        problem = f'datatype {PointFieldType(datatype).name} (coordinates must be FLOAT32 or FLOAT64)'
    elif count != 1:
        problem = f'count {count} (must be 1)'
    elif offset < 0 or offset + np.dtype(code).itemsize > point_step:
        problem = f'offset {offset} does not fit in point_step {point_step}'
    if problem is None:
        return offset, _dtype(code, big_endian)
    if is_axis:
        raise DecodeError(DecodeReason.BAD_FIELDS, f'field {name!r}: {problem}')
    logger.debug('ignoring intensity field: %s', problem)
    return None


def encode_pointcloud2(points: np.ndarray, intensity: np.ndarray | None = None, *,
                       is_bigendian: bool = False) -> EncodedPointCloud:
    """Pack (N, 3) xyz (or (N, 4) xyz + intensity) into an unorganized float32 PointCloud2 layout."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] not in (3, 4) or points.shape[0] == 0:
        raise EncodeError(f'points must be (N, 3) or (N, 4) with N > 0, got {points.shape}')
    if points.shape[1] == 4:
        if intensity is not None:
            raise EncodeError('intensity given twice: as a 4th column and as an argument')
        points, intensity = points[:, :3], points[:, 3]
    names = ['x', 'y', 'z'] + ([] if intensity is None else ['intensity'])
    fields = [PointField(name, 4 * index, PointFieldType.FLOAT32, 1) for index, name in enumerate(names)]
    columns = points if intensity is None else np.column_stack([points, np.asarray(intensity).reshape(-1)])
    if columns.shape != (points.shape[0], len(names)):
        raise EncodeError(f'intensity must have {points.shape[0]} values')
    packed = np.ascontiguousarray(columns, dtype=_dtype('f4', is_bigendian))
    return EncodedPointCloud(fields, 4 * len(names), packed.tobytes())


# ----------------------------------------------------------------------------------------------------------------
# mm_llm_ros_interfaces/AudioChunk


def decode_audio(encoding: str, channels: int, sample_rate: int, data: object,
                 limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedAudio:
    """Decode interleaved S16LE or F32LE PCM into a (channels, n) float32 waveform in [-1, 1].

    F32LE samples outside [-1, 1] are clipped; NaN/inf samples are rejected. Raises :class:`DecodeError`.
    """
    key = encoding.strip().lower() if isinstance(encoding, str) else ''
    code = _AUDIO_ENCODINGS.get(key)
    if code is None:
        raise DecodeError(DecodeReason.UNKNOWN_ENCODING, f'unsupported audio encoding {encoding!r} '
                                                         f'(known: S16LE, F32LE)')
    channels, sample_rate = _as_int(channels, 'channels'), _as_int(sample_rate, 'sample_rate')
    if not 0 < channels <= limits.max_audio_channels:
        raise DecodeError(DecodeReason.BAD_CHANNELS,
                          f'channels must be in 1..{limits.max_audio_channels}, got {channels}')
    if not 0 < sample_rate <= limits.max_sample_rate:
        raise DecodeError(DecodeReason.BAD_SAMPLE_RATE,
                          f'sample_rate must be in 1..{limits.max_sample_rate} Hz, got {sample_rate}')
    buffer = _byte_view(data, limits)
    frame_bytes = channels * np.dtype(code).itemsize
    if buffer.size % frame_bytes:
        raise DecodeError(DecodeReason.PARTIAL_FRAME, f'{buffer.size} bytes is not a whole number of '
                                                      f'{frame_bytes}-byte frames ({channels} x {encoding})')
    if buffer.size // np.dtype(code).itemsize > limits.max_audio_samples:
        raise DecodeError(DecodeReason.TOO_LARGE, f'chunk exceeds {limits.max_audio_samples} samples')
    frames = np.frombuffer(buffer, dtype=code).reshape(-1, channels)
    waveform = frames.T.astype(np.float32, order='C')  # always a copy: scaled and clipped in place below
    if key == 's16le':
        waveform *= np.float32(1.0 / _S16_SCALE)
    else:
        if not np.isfinite(waveform).all():
            raise DecodeError(DecodeReason.NON_FINITE, 'F32LE audio contains NaN/inf samples')
        np.clip(waveform, -1.0, 1.0, out=waveform)
    return DecodedAudio(waveform, sample_rate)


def encode_audio(waveform: np.ndarray, encoding: str) -> bytes:
    """Interleave a (channels, n) float waveform as S16LE or F32LE bytes (values are clipped to [-1, 1])."""
    waveform = np.asarray(waveform)
    if waveform.ndim != 2 or waveform.shape[0] == 0:
        raise EncodeError(f'waveform must be (channels, n), got shape {waveform.shape}')
    key = encoding.lower()
    if key not in _AUDIO_ENCODINGS:
        raise EncodeError(f"audio encoding must be 'S16LE' or 'F32LE', got {encoding!r}")
    clipped = np.clip(waveform.T.astype(np.float64), -1.0, 1.0)
    if key == 's16le':
        clipped = np.clip(np.round(clipped * _S16_SCALE), -_S16_SCALE, _S16_SCALE - 1)
    return np.ascontiguousarray(clipped, dtype=_AUDIO_ENCODINGS[key]).tobytes()


# ----------------------------------------------------------------------------------------------------------------
# sensor_msgs/Image from a thermal camera

# encoding -> little-endian numpy type of the single channel.
_THERMAL_ENCODINGS: dict[str, str] = {'mono8': '<u1', '8uc1': '<u1', 'mono16': '<u2', '16uc1': '<u2', '32fc1': '<f4'}
_CANONICAL_THERMAL = {name.lower(): name for name in ('mono8', '8UC1', 'mono16', '16UC1', '32FC1')}


class DecodedThermal(NamedTuple):
    """A thermal frame with the camera's raw values, (H, W) in native byte order.

    ``values`` is uint8 (display intensity, as LLVIP's images), uint16 (radiometric counts or centikelvin) or
    float32 (kelvin or counts; non-finite pixels are NaN). Which physical unit 16-bit and float pixels carry is not
    in the message: :class:`mm_llm_ros.core.imagebind.thermal.ThermalPreprocessConfig` says it.
    """

    encoding: str
    values: np.ndarray


def _image_buffer(encoding, height, width, step, is_bigendian, data, code: str, channels: int,
                  limits: DecodeLimits) -> tuple[int, int, int, np.ndarray, np.dtype]:
    """The checked geometry of an Image message's pixels: (height, width, step, byte view, pixel dtype)."""
    height, width, step = _as_int(height, 'height'), _as_int(width, 'width'), _as_int(step, 'step')
    _check_pixels(height, width, limits)
    buffer = _byte_view(data, limits)
    dtype = _dtype(code, bool(is_bigendian))
    if step < width * channels * dtype.itemsize:
        raise DecodeError(DecodeReason.BAD_STEP,
                          f'step {step} < width {width} x {channels * dtype.itemsize} bytes per pixel for {encoding}')
    if buffer.size != height * step:
        raise DecodeError(DecodeReason.SIZE_MISMATCH,
                          f'{encoding} {width}x{height} with step {step} needs {height * step} bytes, '
                          f'got {buffer.size}')
    return height, width, step, buffer, dtype


def decode_thermal_image(encoding: str, height: int, width: int, step: int, is_bigendian: bool | int, data: object,
                         limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedThermal:
    """Decode the fields of a single-channel thermal sensor_msgs/Image (mono8, 8UC1, mono16, 16UC1 or 32FC1).

    Unlike :func:`decode_image`, nothing is converted: mono16 keeps all 16 bits (a fixed ``>> 8`` would throw away
    the radiometric resolution), 16UC1 is not read as depth. Row padding and big-endian data are handled; a fresh
    native-endian array is returned. Colour encodings are refused with reason ``unsupported``. Raises
    :class:`DecodeError`.
    """
    key = encoding.strip().lower() if isinstance(encoding, str) else ''
    code = _THERMAL_ENCODINGS.get(key)
    if code is None:
        known = ', '.join(_CANONICAL_THERMAL.values())
        reason = DecodeReason.UNSUPPORTED if key in _COLOUR_ENCODINGS else DecodeReason.UNKNOWN_ENCODING
        raise DecodeError(reason, f'unsupported thermal image encoding {encoding!r} (known: {known})')
    height, width, step, buffer, dtype = _image_buffer(encoding, height, width, step, is_bigendian, data, code, 1,
                                                       limits)
    pixels = np.ndarray((height, width), dtype=dtype, buffer=buffer, strides=(step, dtype.itemsize))
    values = pixels.astype(dtype.newbyteorder('='))  # contiguous native-endian copy
    if values.dtype.kind == 'f':
        values[~np.isfinite(values)] = np.nan
    return DecodedThermal(_CANONICAL_THERMAL[key], values)


# ----------------------------------------------------------------------------------------------------------------
# sensor_msgs/Imu


def _vector3(value: object, name: str) -> tuple[float, float, float]:
    """A geometry_msgs/Vector3-like object (x, y, z attributes) or a sequence of three numbers."""
    try:
        if hasattr(value, 'x'):
            return float(value.x), float(value.y), float(value.z)
        x, y, z = value
        return float(x), float(y), float(z)
    except (TypeError, ValueError, AttributeError):
        raise DecodeError(DecodeReason.BAD_FIELDS,
                          f'{name} must be a Vector3 (x, y, z) of numbers, got {value!r}') from None


def decode_imu(linear_acceleration: object, angular_velocity: object,
               linear_acceleration_covariance: Sequence[float] | None = None,
               angular_velocity_covariance: Sequence[float] | None = None) -> np.ndarray:
    """The accelerometer and gyroscope of a sensor_msgs/Imu as one (6,) float64 sample.

    Order and units are ImageBind's IMU channels: linear acceleration x, y, z in m/s^2 (including gravity, as
    REP 145 and every accelerometer report it), then angular velocity x, y, z in rad/s. The vectors may be
    Vector3-like objects or sequences. Per the message definition, element 0 of a covariance set to -1 means the
    driver does not provide that field: such a message is refused with reason ``missing_fields`` instead of
    feeding zeros to the encoder. Non-finite values are refused with reason ``non_finite``.
    """
    for covariance, name in ((linear_acceleration_covariance, 'linear_acceleration'),
                             (angular_velocity_covariance, 'angular_velocity')):
        if covariance is not None and len(covariance) and covariance[0] == -1:
            raise DecodeError(DecodeReason.MISSING_FIELDS,
                              f'the IMU does not provide {name} ({name}_covariance[0] is -1)')
    sample = np.array(_vector3(linear_acceleration, 'linear_acceleration')
                      + _vector3(angular_velocity, 'angular_velocity'), dtype=np.float64)
    if not np.isfinite(sample).all():
        raise DecodeError(DecodeReason.NON_FINITE, f'IMU sample has NaN/inf values: {sample.tolist()}')
    return sample
