"""What a replay publishes: a :class:`Scene` of :class:`StreamSpec` streams, built from a folder, a scene file or
the nuScenes sample frame.

A stream is one topic fed by a list of files: images and point clouds are published one file per period at the
stream's rate (looping over the files), audio files are played back to back in real time, chunked. An image
stream may carry :class:`CameraIntrinsics`; its CameraInfo is then published with every image, with the same
stamp and frame, on the sibling ``camera_info`` topic (``camera/image_raw`` -> ``camera/camera_info``), as camera
drivers do.

Scene file format (YAML; relative paths and glob patterns are resolved against the file's folder, and each
pattern's matches are sorted)::

    name: loading-dock            # optional, for logs
    streams:
      - kind: image               # image | depth | audio | points | thermal | imu
        topic: camera/image_raw   # relative names follow the node's namespace
        frame_id: camera_optical_frame
        files: [frames/*.jpg]     # one pattern or a list
        rate_hz: 10.0             # optional; default: the node's rate_hz (ignored for audio)
        camera_info:              # optional: pinhole intrinsics of the images
          k: [900.0, 0.0, 640.0, 0.0, 900.0, 360.0, 0.0, 0.0, 1.0]
          d: []                   # optional distortion coefficients
          distortion_model: plumb_bob
      - kind: depth               # 16-bit PNGs, published as 32FC1 metres
        topic: camera/depth/image_raw
        frame_id: camera_optical_frame
        files: [depth/*.png]
        depth_units_per_metre: 1000.0   # optional, 1000 = millimetres
      - kind: points              # .bin (KITTI), .pcd.bin (nuScenes), .npy, .pcd
        topic: points
        frame_id: lidar
        files: [lidar/*.bin]
        bin_columns: 4            # optional: float32 values per point in .bin files
      - kind: audio               # WAV files, played one after another
        topic: audio
        frame_id: microphone
        files: [sound.wav]
      - kind: thermal             # single-channel 16-bit PNGs (centikelvin), published as mono16
        topic: thermal/image_raw
        frame_id: thermal_optical_frame
        files: [thermal/*.png]
      - kind: imu                 # CSV t_s,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z (SI), streamed in real time
        topic: imu
        frame_id: imu_link
        files: [imu.csv]

Unknown keys, empty patterns and missing files raise :class:`SceneError` naming the scene file.
"""
from __future__ import annotations

import dataclasses
import enum
import glob
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mm_llm_ros.core.replay.sensor_files import AUDIO_SUFFIXES, IMAGE_SUFFIXES, POINT_SUFFIXES
from mm_llm_ros.core.specs import SENSOR_SPECS, sensor_for_replay_kind


# The encoders' input topics (relative, so a namespace applies) and frames, keyed by stream kind (core/specs.py).
DEFAULT_TOPICS = {s.replay_kind: s.topic for s in SENSOR_SPECS if s.replay_kind}
DEFAULT_FRAMES = {s.replay_kind: s.default_frame for s in SENSOR_SPECS if s.replay_kind}

NUSCENES_CAMERAS = ('CAM_FRONT', 'CAM_FRONT_LEFT', 'CAM_FRONT_RIGHT', 'CAM_BACK', 'CAM_BACK_LEFT', 'CAM_BACK_RIGHT')
NUSCENES_AUDIO = 'audio/imagebind_car.wav'  # street sound: nuScenes has no microphone


class SceneError(ValueError):
    """A scene that cannot be built: bad scene file, missing files, unknown stream kind."""


class _StreamKinds(str, enum.Enum):
    @property
    def is_frame(self) -> bool:
        """Published one file per period (as opposed to windowed sensors, audio and IMU, streamed in real time)."""
        return sensor_for_replay_kind(self.value).decoder != 'window'


# One kind per sensor that a replay can feed, named by its spec's replay_kind (IMAGE, DEPTH, AUDIO, ...).
StreamKind = _StreamKinds('StreamKind', {s.replay_kind.upper(): s.replay_kind for s in SENSOR_SPECS if s.replay_kind})


@dataclasses.dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics for CameraInfo; width and height are taken from each published image."""

    k: tuple[float, ...]  # row-major 3x3
    d: tuple[float, ...] = ()
    distortion_model: str = 'plumb_bob'

    def __post_init__(self) -> None:
        if len(self.k) != 9:
            raise SceneError(f'camera_info k must have 9 values (row-major 3x3), got {len(self.k)}')
        if not (self.k[0] > 0 and self.k[4] > 0):
            raise SceneError(f'camera_info k must have positive focal lengths, got fx={self.k[0]} fy={self.k[4]}')

    @classmethod
    def from_matrix(cls, matrix: Sequence[Sequence[float]], **kwargs: Any) -> CameraIntrinsics:
        return cls(tuple(float(v) for row in matrix for v in row), **kwargs)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """One published topic and the files it replays."""

    kind: StreamKind
    topic: str
    frame_id: str
    files: tuple[pathlib.Path, ...]
    rate_hz: float | None = None  # frames per second; None = the replay's rate_hz
    camera_info: CameraIntrinsics | None = None  # image streams only
    bin_columns: int | None = None  # points streams: float32 values per point of .bin files
    depth_units_per_metre: float = 1000.0  # depth streams: raw value of one metre

    def __post_init__(self) -> None:
        if not self.files:
            raise SceneError(f'stream {self.topic!r} has no files')
        if not self.topic:
            raise SceneError(f'a {self.kind.value} stream has an empty topic')
        if self.rate_hz is not None and not self.rate_hz > 0:
            raise SceneError(f'stream {self.topic!r}: rate_hz must be positive, got {self.rate_hz}')
        if self.camera_info is not None and self.kind is not StreamKind.IMAGE:
            raise SceneError(f'stream {self.topic!r}: only image streams carry camera_info')
        if self.bin_columns is not None and (not isinstance(self.bin_columns, int) or self.bin_columns < 3):
            raise SceneError(f'stream {self.topic!r}: bin_columns must be an integer >= 3, got {self.bin_columns!r}')
        if not self.depth_units_per_metre > 0:
            raise SceneError(f'stream {self.topic!r}: depth_units_per_metre must be positive, '
                             f'got {self.depth_units_per_metre}')

    @property
    def camera_info_topic(self) -> str:
        """The CameraInfo topic beside an image topic (image_transport's convention)."""
        head, _, _ = self.topic.rpartition('/')
        return f'{head}/camera_info' if head else 'camera_info'

    def describe(self) -> str:
        count = f'{len(self.files)} file' + ('s' if len(self.files) != 1 else '')
        info = ' + camera_info' if self.camera_info else ''
        return f'{self.topic} ({self.kind.value}{info}, {count}, frame {self.frame_id})'


@dataclasses.dataclass(frozen=True)
class Scene:
    """Streams replayed together on one timeline."""

    streams: tuple[StreamSpec, ...]
    name: str = 'scene'

    def __post_init__(self) -> None:
        if not self.streams:
            raise SceneError(f'scene {self.name!r} has no streams')
        topics = [stream.topic for stream in self.streams]
        duplicates = sorted({topic for topic in topics if topics.count(topic) > 1})
        if duplicates:
            raise SceneError(f'scene {self.name!r} publishes several streams on {", ".join(duplicates)}')


# ----------------------------------------------------------------------------------------------------------------
# Builders


def scene_from_folder(folder: str | pathlib.Path) -> Scene:
    """Every image, WAV and point cloud file directly in ``folder``, on the default topics (sorted by name)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise SceneError(f'{folder} is not a folder')
    by_kind: dict[StreamKind, list[pathlib.Path]] = {kind: [] for kind in StreamKind}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        kind = _kind_of(path)
        if kind is not None:
            by_kind[kind].append(path)
    streams = tuple(StreamSpec(kind, DEFAULT_TOPICS[kind.value], DEFAULT_FRAMES[kind.value], tuple(files))
                    for kind, files in by_kind.items() if files)
    if not streams:
        known = ', '.join(sorted(IMAGE_SUFFIXES | AUDIO_SUFFIXES | POINT_SUFFIXES))
        raise SceneError(f'{folder} holds no image, audio or point cloud files ({known})')
    return Scene(streams, name=folder.name)


def _kind_of(path: pathlib.Path) -> StreamKind | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return StreamKind.IMAGE
    if suffix in AUDIO_SUFFIXES:
        return StreamKind.AUDIO
    if suffix in POINT_SUFFIXES:
        return StreamKind.POINTS
    return None


_STREAM_KEYS = {'kind', 'topic', 'frame_id', 'files', 'rate_hz', 'camera_info', 'bin_columns',
                'depth_units_per_metre'}
_CAMERA_INFO_KEYS = {'k', 'd', 'distortion_model'}


def scene_from_yaml(path: str | pathlib.Path) -> Scene:
    """A scene file in the format of this module's docstring."""
    import yaml  # imported here: only scene files need it

    path = pathlib.Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SceneError(f'{path}: cannot read: {exc.strerror or exc}') from None
    except yaml.YAMLError as exc:
        raise SceneError(f'{path}: invalid YAML: {exc}') from None
    if not isinstance(document, Mapping) or not isinstance(document.get('streams'), list):
        raise SceneError(f'{path}: expected a mapping with a "streams" list')
    _reject_unknown(path, 'scene', document, {'name', 'streams'})
    streams = tuple(_stream_from_yaml(path, index, entry) for index, entry in enumerate(document['streams']))
    return Scene(streams, name=str(document.get('name', path.stem)))


def _stream_from_yaml(path: pathlib.Path, index: int, entry: Any) -> StreamSpec:
    where = f'streams[{index}]'
    if not isinstance(entry, Mapping):
        raise SceneError(f'{path}: {where} must be a mapping')
    _reject_unknown(path, where, entry, _STREAM_KEYS)
    try:
        kind = StreamKind(entry.get('kind'))
    except ValueError:
        raise SceneError(f'{path}: {where}.kind must be one of {", ".join(k.value for k in StreamKind)}, '
                         f'got {entry.get("kind")!r}') from None
    patterns = entry.get('files')
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise SceneError(f'{path}: {where}.files must be a path or a list of paths')
    files = _expand(path, where, patterns)
    camera_info = entry.get('camera_info')
    if camera_info is not None:
        _reject_unknown(path, f'{where}.camera_info', camera_info, _CAMERA_INFO_KEYS)
    try:
        if camera_info is not None:
            camera_info = CameraIntrinsics(tuple(float(v) for v in camera_info.get('k', ())),
                                           tuple(float(v) for v in camera_info.get('d', ())),
                                           str(camera_info.get('distortion_model', 'plumb_bob')))
        return StreamSpec(kind, str(entry.get('topic', DEFAULT_TOPICS[kind.value])),
                          str(entry.get('frame_id', DEFAULT_FRAMES[kind.value])), files,
                          _optional_float(entry.get('rate_hz')), camera_info, entry.get('bin_columns'),
                          float(entry.get('depth_units_per_metre', 1000.0)))
    except (TypeError, ValueError) as exc:  # SceneError included
        raise SceneError(f'{path}: {where}: {exc}') from None


def _reject_unknown(path: pathlib.Path, where: str, mapping: Any, known: set[str]) -> None:
    if not isinstance(mapping, Mapping):
        raise SceneError(f'{path}: {where} must be a mapping')
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise SceneError(f'{path}: {where} has unknown key(s) {", ".join(map(str, unknown))} '
                         f'(known: {", ".join(sorted(known))})')


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _expand(scene_file: pathlib.Path, where: str, patterns: Iterable[str]) -> tuple[pathlib.Path, ...]:
    files = []
    for pattern in patterns:
        full = pathlib.Path(pattern).expanduser()
        full = full if full.is_absolute() else scene_file.parent / full
        matches = sorted(pathlib.Path(p) for p in glob.glob(str(full)) if pathlib.Path(p).is_file())
        if not matches:
            raise SceneError(f'{scene_file}: {where}.files: nothing matches {pattern!r}')
        files.extend(matches)
    return tuple(files)


def nuscenes_scene(data_dir: str | pathlib.Path) -> Scene:
    """The nuScenes sample frame of the shared data folder: six cameras, the LIDAR_TOP sweep and a street sound.

    CAM_FRONT is the main camera (camera/image_raw), the other five are on ``cameras/<name>/image_raw``; every
    camera carries its intrinsics (``cam2img`` of ``pointclouds/nuscenes_*_info.json``). Frames are named as in
    nuScenes (CAM_FRONT, LIDAR_TOP, ...).
    """
    data_dir = pathlib.Path(data_dir)
    infos = sorted((data_dir / 'pointclouds').glob('nuscenes_*_info.json'))
    if not infos:
        raise SceneError(f'{data_dir}: no pointclouds/nuscenes_*_info.json (is this the shared data folder?)')
    try:
        sample = json.loads(infos[0].read_text())['data_list'][0]
        cameras = sample['images']
        lidar_file = sample['lidar_points']['lidar_path']
    except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
        raise SceneError(f'{infos[0]}: not an mmdetection3d nuScenes info file ({exc!r})') from None
    streams = []
    for name in NUSCENES_CAMERAS:
        if name not in cameras:
            raise SceneError(f'{infos[0]}: images.{name} is missing')
        topic = DEFAULT_TOPICS['image'] if name == 'CAM_FRONT' else f'cameras/{name.lower()}/image_raw'
        streams.append(StreamSpec(StreamKind.IMAGE, topic, name,
                                  (_existing(data_dir / 'images' / 'nuscenes' / cameras[name]['img_path']),),
                                  camera_info=CameraIntrinsics.from_matrix(cameras[name]['cam2img'])))
    streams.append(StreamSpec(StreamKind.POINTS, DEFAULT_TOPICS['points'], 'LIDAR_TOP',
                              (_existing(data_dir / 'pointclouds' / f'nuscenes_{lidar_file}'),)))
    streams.append(StreamSpec(StreamKind.AUDIO, DEFAULT_TOPICS['audio'], DEFAULT_FRAMES['audio'],
                              (_existing(data_dir / NUSCENES_AUDIO),)))
    return Scene(tuple(streams), name=f'nuscenes {sample.get("token", "")}'.strip())


def _existing(path: pathlib.Path) -> pathlib.Path:
    if not path.is_file():
        raise SceneError(f'{path} not found')
    return path
