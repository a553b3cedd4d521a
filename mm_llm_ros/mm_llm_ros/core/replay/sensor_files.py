"""Read sensor recordings from plain files: images, WAV audio and lidar point clouds.

Every reader returns the arrays the encoders in ``core.sensor_decoding`` produce, so a replayed file and a live
message look the same downstream:

- :func:`read_image`: (H, W, 3) uint8 RGB from anything OpenCV decodes (JPEG, PNG, BMP, ...).
- :func:`read_depth_image`: a 16-bit depth PNG as (H, W) float32 metres, NaN where 0 (no measurement).
- :func:`read_wav`: :class:`DecodedAudio` ((channels, n) float32 in [-1, 1] and the sample rate) from RIFF/WAVE
  files holding 8/16/24/32-bit integer PCM or 32/64-bit IEEE float, also as WAVE_FORMAT_EXTENSIBLE.
- :func:`read_points`: :class:`DecodedPointCloud` (finite xyz (N, 3) float32 and intensity or None) from

  - KITTI ``.bin``: headerless float32 N x 4 (x, y, z, reflectance),
  - nuScenes ``.pcd.bin``: headerless float32 N x 5 (x, y, z, intensity, ring),
  - ``.npy``: an (N, 3+) numeric array; a 4th column is intensity when there are exactly four,
  - ``.pcd`` (PCD v0.7): DATA ascii, binary and binary_compressed (LZF).

Every failure raises :class:`SensorFileError` naming the file.
"""
from __future__ import annotations

import dataclasses
import pathlib
import struct
import cv2
import numpy as np

from mm_llm_ros.core.sensor_decoding import DecodedAudio, DecodedPointCloud

IMAGE_SUFFIXES = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm'})
AUDIO_SUFFIXES = frozenset({'.wav'})
IMU_SUFFIXES = frozenset({'.csv'})
POINT_SUFFIXES = frozenset({'.bin', '.npy', '.pcd'})

# Float32 values per point in headerless .bin scans.
KITTI_BIN_COLUMNS = 4
NUSCENES_BIN_COLUMNS = 5


class SensorFileError(ValueError):
    """A file that cannot be read as the sensor data it claims to be; the message names the file."""

    def __init__(self, path: str | pathlib.Path, problem: str) -> None:
        super().__init__(f'{path}: {problem}')
        self.path = pathlib.Path(path)


# ----------------------------------------------------------------------------------------------------------------
# Images


def read_image(path: str | pathlib.Path) -> np.ndarray:
    """Any OpenCV-readable image -> (H, W, 3) uint8 RGB (grey, 16-bit and alpha images are converted)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SensorFileError(path, 'not a readable image (missing, empty or an unsupported format)')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_depth_image(path: str | pathlib.Path, units_per_metre: float = 1000.0) -> np.ndarray:
    """A single-channel 16-bit depth PNG -> (H, W) float32 metres, NaN where the value is 0 (no measurement).

    ``units_per_metre`` is the file's scale: 1000 for millimetres (NYU, ROS 16UC1), 256 for KITTI depth.
    """
    if units_per_metre <= 0:
        raise SensorFileError(path, f'units_per_metre must be positive, got {units_per_metre}')
    raw = _read_uint16_image(path, 'depth')
    depth = raw.astype(np.float32) / np.float32(units_per_metre)
    depth[raw == 0] = np.nan
    return depth


# ----------------------------------------------------------------------------------------------------------------
# WAV

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_IEEE_FLOAT = 0x0003
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
_FMT = struct.Struct('<HHIIHH')  # format tag, channels, sample rate, byte rate, block align, bits per sample


def read_wav(path: str | pathlib.Path) -> DecodedAudio:
    """A RIFF/WAVE file -> (channels, n) float32 waveform in [-1, 1] and its sample rate.

    Integer PCM is scaled by 1 / 2**(bits - 1) (8-bit PCM is unsigned, centred on 128); float samples are
    clipped to [-1, 1]. The stdlib ``wave`` module is not used because it rejects float and extensible files.
    """
    info = _wav_layout(path)
    data = info.read_data()
    frame_bytes = info.channels * info.sample_width
    usable = len(data) - len(data) % frame_bytes  # a truncated recording may end in a partial frame
    samples = _wav_samples(np.frombuffer(data, np.uint8, count=usable), info)
    if not np.isfinite(samples).all():
        raise SensorFileError(path, 'float samples contain NaN or inf')
    return DecodedAudio(np.clip(samples.reshape(-1, info.channels).T, -1.0, 1.0).astype(np.float32, order='C'),
                        info.sample_rate)


def wav_duration(path: str | pathlib.Path) -> tuple[int, int]:
    """(frames, sample_rate) of a WAV file, read from its header only."""
    info = _wav_layout(path)
    return info.data_size // (info.channels * info.sample_width), info.sample_rate


@dataclasses.dataclass(frozen=True)
class _WavLayout:
    """Where a WAV file's samples are and how they are stored."""

    path: str | pathlib.Path
    fmt_tag: int
    channels: int
    sample_rate: int
    bits: int
    data_offset: int
    data_size: int

    @property
    def sample_width(self) -> int:
        return (self.bits + 7) // 8

    def read_data(self) -> bytes:
        with open(self.path, 'rb') as stream:
            stream.seek(self.data_offset)
            return stream.read(self.data_size)


def _wav_layout(path: str | pathlib.Path) -> _WavLayout:
    try:
        with open(path, 'rb') as stream:
            return _parse_riff(path, stream)
    except OSError as exc:
        raise SensorFileError(path, f'cannot read: {exc.strerror or exc}') from None
    except struct.error:
        raise SensorFileError(path, 'truncated WAV header') from None


def _parse_riff(path, stream) -> _WavLayout:
    riff, _, wave_id = struct.unpack('<4sI4s', stream.read(12))
    if riff != b'RIFF' or wave_id != b'WAVE':
        raise SensorFileError(path, 'not a RIFF/WAVE file')
    fmt = None
    while True:
        header = stream.read(8)
        if len(header) < 8:
            raise SensorFileError(path, 'no data chunk' if fmt else 'no fmt chunk')
        chunk_id, size = struct.unpack('<4sI', header)
        if chunk_id == b'fmt ':
            body = stream.read(size)
            fmt = list(_FMT.unpack_from(body))
            if fmt[0] == _WAVE_FORMAT_EXTENSIBLE and len(body) >= 26:
                fmt[0] = struct.unpack_from('<H', body, 24)[0]  # the sub-format GUID starts with the real tag
        elif chunk_id == b'data':
            if fmt is None:
                raise SensorFileError(path, 'data chunk before the fmt chunk')
            offset = stream.tell()
            available = stream.seek(0, 2) - offset
            return _checked_layout(path, fmt, offset, min(size, available))
        else:
            stream.seek(size, 1)
        if size % 2:
            stream.seek(1, 1)  # chunks are padded to an even size


def _checked_layout(path, fmt, offset: int, size: int) -> _WavLayout:
    tag, channels, sample_rate, _, _, bits = fmt
    supported = {_WAVE_FORMAT_PCM: (8, 16, 24, 32), _WAVE_FORMAT_IEEE_FLOAT: (32, 64)}
    if tag not in supported:
        raise SensorFileError(path, f'WAV format tag 0x{tag:04x} is not supported (integer PCM or IEEE float)')
    if bits not in supported[tag]:
        kind = 'PCM' if tag == _WAVE_FORMAT_PCM else 'float'
        raise SensorFileError(path, f'{bits}-bit {kind} WAV is not supported (bits: {supported[tag]})')
    if channels == 0 or sample_rate == 0:
        raise SensorFileError(path, f'invalid WAV header: {channels} channels at {sample_rate} Hz')
    return _WavLayout(path, tag, channels, sample_rate, bits, offset, size)


def _wav_samples(raw: np.ndarray, info: _WavLayout) -> np.ndarray:
    """Interleaved little-endian samples as a flat float32 (or float64) array."""
    if info.fmt_tag == _WAVE_FORMAT_IEEE_FLOAT:
        return raw.view('<f4' if info.bits == 32 else '<f8')
    if info.bits == 8:
        return (raw.astype(np.float32) - 128.0) / 128.0
    if info.bits == 24:
        triples = raw.reshape(-1, 3).astype(np.int32)
        values = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        values = (values << 8) >> 8  # sign-extend 24 -> 32 bit
        return values.astype(np.float32) / np.float32(2 ** 23)
    code = '<i2' if info.bits == 16 else '<i4'
    return raw.view(code).astype(np.float32) / np.float32(2 ** (info.bits - 1))


# ----------------------------------------------------------------------------------------------------------------
# Point clouds


def read_points(path: str | pathlib.Path, bin_columns: int | None = None) -> DecodedPointCloud:
    """A lidar/depth point cloud file -> its finite points (``dropped`` counts the NaN/inf ones).

    ``bin_columns`` overrides the float32 values per point of a headerless ``.bin`` (default 4 for KITTI,
    5 for ``*.pcd.bin``); column 3 is intensity when there are 4 or 5 columns (KITTI reflectance, nuScenes
    intensity) and ignored otherwise (e.g. 6 columns x, y, z, r, g, b).
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix == '.bin':
        columns = bin_columns or (NUSCENES_BIN_COLUMNS if path.name.lower().endswith('.pcd.bin')
                                  else KITTI_BIN_COLUMNS)
        table, intensity_column = _read_bin(path, columns), (3 if columns in (4, 5) else None)
    elif suffix == '.npy':
        table = _read_npy(path)
        intensity_column = 3 if table.shape[1] == 4 else None
    elif suffix == '.pcd':
        table, names = _read_pcd(path)
        intensity_column = names.index('intensity') if 'intensity' in names else None
        if names[:3] != ['x', 'y', 'z']:
            raise SensorFileError(path, f'PCD fields must start with x y z, got {" ".join(names)}')
    else:
        raise SensorFileError(path, f'unknown point cloud format {suffix!r} (known: .bin, .pcd.bin, .npy, .pcd)')
    return _finite_points(path, table, intensity_column)


def _finite_points(path: pathlib.Path, table: np.ndarray, intensity_column: int | None) -> DecodedPointCloud:
    xyz = np.ascontiguousarray(table[:, :3], dtype=np.float32)
    finite = np.isfinite(xyz).all(axis=1)
    if not finite.any():
        raise SensorFileError(path, f'none of its {len(xyz)} points has finite coordinates')
    intensity = None
    if intensity_column is not None:
        intensity = np.ascontiguousarray(table[finite, intensity_column], dtype=np.float32)
    return DecodedPointCloud(xyz=xyz[finite], intensity=intensity, dropped=int(len(xyz) - finite.sum()))


def _read_bin(path: pathlib.Path, columns: int) -> np.ndarray:
    if columns < 3:
        raise SensorFileError(path, f'a point needs at least 3 float32 values (x, y, z), got bin_columns={columns}')
    raw = _read_bytes(path)
    point_bytes = 4 * columns
    if not raw or len(raw) % point_bytes:
        raise SensorFileError(path, f'{len(raw)} bytes is not a whole number of {columns}-float32 points '
                                    f'(wrong bin_columns?)')
    return np.frombuffer(raw, '<f4').reshape(-1, columns)


def _read_npy(path: pathlib.Path) -> np.ndarray:
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SensorFileError(path, f'not a readable .npy array: {exc}') from None
    if table.ndim != 2 or table.shape[1] < 3 or table.shape[0] == 0 or not np.issubdtype(table.dtype, np.number):
        raise SensorFileError(path, f'expected a numeric (N, 3+) array, got {table.dtype} {table.shape}')
    return table


def _read_bytes(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SensorFileError(path, f'cannot read: {exc.strerror or exc}') from None


# ---- PCD -------------------------------------------------------------------------------------------------------

_PCD_TYPES = {('F', 4): '<f4', ('F', 8): '<f8', ('I', 1): 'i1', ('I', 2): '<i2', ('I', 4): '<i4', ('I', 8): '<i8',
              ('U', 1): 'u1', ('U', 2): '<u2', ('U', 4): '<u4', ('U', 8): '<u8'}
_PCD_MAX_HEADER_LINES = 64


def _read_pcd(path: pathlib.Path) -> tuple[np.ndarray, list[str]]:
    """(N, fields) float64 table and the field names; multi-count fields keep their first value."""
    raw = _read_bytes(path)
    header, body = _pcd_header(path, raw)
    names, dtype, points = _pcd_layout(path, header)
    data = header['DATA'][0].lower()
    if data == 'ascii':
        records = _pcd_ascii(path, body, dtype, points)
    elif data == 'binary':
        if len(body) < points * dtype.itemsize:
            raise SensorFileError(path, f'binary PCD body has {len(body)} bytes, {points} points need '
                                        f'{points * dtype.itemsize}')
        records = np.frombuffer(body, dtype, count=points)
    elif data == 'binary_compressed':
        records = _pcd_compressed(path, body, dtype, points)
    else:
        raise SensorFileError(path, f'unknown PCD DATA type {data!r}')
    table = np.column_stack([records[name].reshape(points, -1)[:, 0].astype(np.float64) for name in names])
    return table, names


def _pcd_header(path: pathlib.Path, raw: bytes) -> tuple[dict[str, list[str]], bytes]:
    header: dict[str, list[str]] = {}
    position = 0
    for _ in range(_PCD_MAX_HEADER_LINES):
        end = raw.find(b'\n', position)
        if end < 0:
            break
        line = raw[position:end].decode('ascii', 'replace').strip()
        position = end + 1
        if not line or line.startswith('#'):
            continue
        key, *values = line.split()
        header[key.upper()] = values
        if key.upper() == 'DATA':
            if not values:
                raise SensorFileError(path, 'PCD DATA line has no type')
            return header, raw[position:]
    raise SensorFileError(path, 'not a PCD file (no DATA line in its header)')


def _pcd_layout(path: pathlib.Path, header: dict[str, list[str]]) -> tuple[list[str], np.dtype, int]:
    try:
        names = header['FIELDS']
        sizes = [int(v) for v in header['SIZE']]
        types = [v.upper() for v in header['TYPE']]
        counts = [int(v) for v in header.get('COUNT', ['1'] * len(names))]
        points = int(header['POINTS'][0]) if 'POINTS' in header else (
            int(header['WIDTH'][0]) * int(header.get('HEIGHT', ['1'])[0]))
    except KeyError as exc:
        raise SensorFileError(path, f'PCD header lacks {exc.args[0]}') from None
    except (ValueError, IndexError):
        raise SensorFileError(path, 'PCD header has a malformed SIZE, COUNT, WIDTH, HEIGHT or POINTS') from None
    if not len(names) == len(sizes) == len(types) == len(counts):
        raise SensorFileError(path, 'PCD FIELDS, SIZE, TYPE and COUNT have different lengths')
    formats = []
    for name, kind, size, count in zip(names, types, sizes, counts):
        code = _PCD_TYPES.get((kind, size))
        if code is None or count < 1:
            raise SensorFileError(path, f'PCD field {name!r} has unsupported TYPE {kind} SIZE {size} COUNT {count}')
        formats.append((code, (count,)) if count > 1 else code)
    if points <= 0:
        raise SensorFileError(path, f'PCD has {points} points')
    # '_' padding fields may repeat; give them unique names so numpy accepts the record type.
    unique = [f'_{i}' if name == '_' else name for i, name in enumerate(names)]
    return [n for n in unique if not n.startswith('_')], np.dtype({'names': unique, 'formats': formats}), points


def _pcd_ascii(path: pathlib.Path, body: bytes, dtype: np.dtype, points: int) -> np.ndarray:
    values = body.split()
    width = sum(int(np.prod(dtype[name].shape or (1,))) for name in dtype.names)
    if len(values) < points * width:
        raise SensorFileError(path, f'ASCII PCD has {len(values)} values, {points} points need {points * width}')
    try:
        table = np.array(values[:points * width], dtype=np.float64).reshape(points, width)
    except ValueError:
        raise SensorFileError(path, 'ASCII PCD contains a non-numeric value') from None
    records = np.zeros(points, dtype)
    column = 0
    for name in dtype.names:
        count = int(np.prod(dtype[name].shape or (1,)))
        records[name] = table[:, column:column + count].reshape(records[name].shape)
        column += count
    return records


def _pcd_compressed(path: pathlib.Path, body: bytes, dtype: np.dtype, points: int) -> np.ndarray:
    """binary_compressed: uint32 compressed and raw sizes, then LZF data laid out field by field."""
    if len(body) < 8:
        raise SensorFileError(path, 'binary_compressed PCD body is truncated')
    compressed_size, raw_size = struct.unpack_from('<II', body)
    if raw_size != points * dtype.itemsize or compressed_size > len(body) - 8:
        raise SensorFileError(path, f'binary_compressed sizes do not match: {compressed_size} compressed '
                                    f'(of {len(body) - 8}), {raw_size} raw for {points} x {dtype.itemsize} bytes')
    try:
        raw = lzf_decompress(body[8:8 + compressed_size], raw_size)
    except ValueError as exc:
        raise SensorFileError(path, f'corrupt LZF data: {exc}') from None
    records = np.empty(points, dtype)
    offset = 0
    for name in dtype.names:  # structure of arrays: all x, then all y, ...
        field = dtype.fields[name][0]
        size = points * field.itemsize
        records[name] = np.frombuffer(raw, field.base, count=points * int(np.prod(field.shape or (1,))),
                                      offset=offset).reshape(records[name].shape)
        offset += size
    return records


def lzf_decompress(data: bytes | memoryview, size: int) -> bytes:
    """Decompress an LZF block (liblzf format, as PCL writes it) of known decompressed ``size``.

    Each control byte is either a literal run (< 32: copy ctrl + 1 bytes) or a back reference (length in the
    top 3 bits, 7 = extended by the next byte; 13-bit distance). Raises ValueError on corrupt input.
    """
    out = bytearray(size)
    source = memoryview(data)
    ip = op = 0
    end = len(source)
    while ip < end:
        ctrl = source[ip]
        ip += 1
        if ctrl < 32:
            length = ctrl + 1
            if ip + length > end or op + length > size:
                raise ValueError(f'literal run of {length} bytes overruns the data at input offset {ip}')
            out[op:op + length] = source[ip:ip + length]
            ip += length
            op += length
            continue
        length = ctrl >> 5
        if ip + (length == 7) >= end:
            raise ValueError(f'back reference truncated at input offset {ip}')
        if length == 7:
            length += source[ip]
            ip += 1
        ref = op - ((ctrl & 0x1F) << 8) - source[ip] - 1
        ip += 1
        length += 2
        if ref < 0 or op + length > size:
            raise ValueError(f'back reference out of range at output offset {op}')
        while length:  # the reference may overlap the bytes being written: copy in non-overlapping pieces
            piece = min(length, op - ref)
            out[op:op + piece] = out[ref:ref + piece]
            op += piece
            ref += piece
            length -= piece
    if op != size:
        raise ValueError(f'decompressed {op} bytes, expected {size}')
    return bytes(out)



# ----------------------------------------------------------------------------------------------------------------
# Thermal images and IMU streams


def read_thermal_image(path: str | pathlib.Path) -> np.ndarray:
    """A single-channel 16-bit PNG/TIFF of radiometric counts (e.g. centikelvin) -> (H, W) uint16, as the camera
    sends it (published as mono16)."""
    return _read_uint16_image(path, 'thermal')


def _read_uint16_image(path: str | pathlib.Path, what: str) -> np.ndarray:
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise SensorFileError(path, 'not a readable image (missing, empty or an unsupported format)')
    if raw.ndim != 2 or raw.dtype != np.uint16:
        raise SensorFileError(path, f'a {what} image must be single-channel 16-bit, got {raw.dtype} with shape '
                                    f'{raw.shape}')
    return raw


@dataclasses.dataclass(frozen=True)
class ImuClip:
    """An IMU recording on a uniform clock: ``samples`` (N, 6) acc xyz (m/s^2), gyro xyz (rad/s)."""
    samples: np.ndarray
    sample_rate: int


IMU_CSV_HEADER = 't_s,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z'


def read_imu_csv(path: str | pathlib.Path) -> ImuClip:
    """A CSV with the header ``t_s,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z`` and uniformly spaced rows (Ego4D's
    layout, in SI units) -> :class:`ImuClip`."""
    try:
        with open(path, encoding='utf-8') as file:
            header = file.readline().strip().replace(' ', '')
            table = np.loadtxt(file, delimiter=',', ndmin=2)
    except (OSError, ValueError) as exc:
        raise SensorFileError(path, f'not a readable IMU CSV ({exc})') from None
    if header != IMU_CSV_HEADER:
        raise SensorFileError(path, f'expected the header {IMU_CSV_HEADER!r}, got {header!r}')
    if table.shape[0] < 2 or table.shape[1] != 7 or not np.isfinite(table).all():
        raise SensorFileError(path, f'expected at least 2 finite rows of 7 values, got shape {table.shape}')
    steps = np.diff(table[:, 0])
    rate = 1.0 / float(np.median(steps)) if np.all(steps > 0) else 0.0
    if not rate > 0 or np.abs(steps * rate - 1.0).max() > 0.01:
        raise SensorFileError(path, 'rows must be uniformly spaced in time (t_s strictly increasing)')
    return ImuClip(table[:, 1:].astype(np.float64), int(round(rate)))


def imu_duration(path: str | pathlib.Path) -> tuple[int, int]:
    """(samples, sample_rate) of an IMU CSV, for the replay's timeline."""
    clip = read_imu_csv(path)
    return len(clip.samples), clip.sample_rate
