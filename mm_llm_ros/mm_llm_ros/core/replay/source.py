"""From the replay node's parameters to what it plays: a :class:`Scene` (files) or an :class:`McapBag`."""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Union

import numpy as np

from mm_llm_ros.core.replay.mcap_bag import McapBag
from mm_llm_ros.core.replay.scene import (Scene, SceneError, StreamKind, StreamSpec, nuscenes_scene,
                                          scene_from_folder, scene_from_yaml)
from mm_llm_ros.core.replay.scheduler import AudioTrack, FrameTrack, TimelineConfig, Track
from mm_llm_ros.core.replay.sensor_files import (SensorFileError, imu_duration, read_depth_image, read_image,
                                                 read_imu_csv, read_points, read_thermal_image, read_wav,
                                                 wav_duration)
from mm_llm_ros.core.replay.synthetic import write_synthetic_scene
from mm_llm_ros.core.sensor_decoding import DecodedAudio, DecodedPointCloud

NUSCENES_PREFIX = 'nuscenes:'
IMAGE_TRANSPORTS = ('raw', 'compressed')

Source = Union[Scene, McapBag]
Payload = Union[np.ndarray, DecodedPointCloud, DecodedAudio]


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """The sensor_replay node's parameters (see ``core.params.REPLAY_PARAMS``)."""

    source: str = ''
    rate_hz: float = 2.0
    loop: bool = True
    duration_s: float = 0.0
    audio_chunk_s: float = 0.1
    image_transport: str = 'raw'
    wait_for_subscribers: int = 0
    wait_for_subscribers_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.rate_hz > 0:
            raise ValueError(f'rate_hz must be positive, got {self.rate_hz}')
        if self.image_transport not in IMAGE_TRANSPORTS:
            raise ValueError(f'image_transport must be one of {", ".join(IMAGE_TRANSPORTS)}, '
                             f'got {self.image_transport!r}')
        if self.wait_for_subscribers < 0 or self.wait_for_subscribers_timeout_s < 0:
            raise ValueError('wait_for_subscribers and wait_for_subscribers_timeout_s must be >= 0')
        TimelineConfig(self.loop, self.duration_s, self.audio_chunk_s)  # validates the timeline values

    @property
    def timeline(self) -> TimelineConfig:
        return TimelineConfig(self.loop, self.duration_s, self.audio_chunk_s)


def open_source(source: str, scratch_dir: str | pathlib.Path) -> Source:
    """Resolve the ``source`` parameter.

    ``''`` writes the synthetic scene into ``scratch_dir``; ``nuscenes:<data_dir>`` is the nuScenes sample of
    the shared data folder; a ``.yaml``/``.yml`` file is a scene file; an ``.mcap`` file, or a rosbag2 folder
    holding one, is a bag; any other folder is replayed file by file. Raises SceneError or BagError.
    """
    if not source:
        return write_synthetic_scene(scratch_dir)
    if source.startswith(NUSCENES_PREFIX):
        data_dir = source[len(NUSCENES_PREFIX):]
        if not data_dir:
            raise SceneError(f"give the data folder: '{NUSCENES_PREFIX}<data_dir>'")
        return nuscenes_scene(pathlib.Path(data_dir).expanduser())
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        bags = sorted(path.glob('*.mcap'))
        if (path / 'metadata.yaml').is_file() and bags:
            if len(bags) > 1:
                raise SceneError(f'{path}: split bags ({len(bags)} .mcap files) are not supported; give one file')
            return McapBag(bags[0])
        return scene_from_folder(path)
    if not path.is_file():
        raise SceneError(f'source {source!r} not found')
    suffix = path.suffix.lower()
    if suffix == '.mcap':
        return McapBag(path)
    if suffix in ('.yaml', '.yml'):
        return scene_from_yaml(path)
    raise SceneError(f'source {source!r}: expected a folder, a scene .yaml, an .mcap bag or '
                     f"'{NUSCENES_PREFIX}<data_dir>'")


def scene_tracks(scene: Scene, rate_hz: float) -> list[Track]:
    """The scheduler's view of a scene (reads the WAV headers for the audio durations)."""
    tracks: list[Track] = []
    for stream in scene.streams:
        try:
            if stream.kind is StreamKind.AUDIO:
                tracks.append(AudioTrack(tuple(wav_duration(path) for path in stream.files)))
            elif stream.kind is StreamKind.IMU:  # streamed like audio: chunks of samples at their own times
                tracks.append(AudioTrack(tuple(imu_duration(path) for path in stream.files)))
            else:
                tracks.append(FrameTrack(len(stream.files), stream.rate_hz or rate_hz))
        except SensorFileError:
            raise
        except ValueError as exc:
            raise SceneError(f'stream {stream.topic!r}: {exc}') from None
    return tracks


def load_payload(stream: StreamSpec, index: int) -> Payload:
    """Read file ``index`` of a stream: RGB image, depth in metres, point cloud or audio. Raises SensorFileError."""
    path = stream.files[index]
    if stream.kind is StreamKind.IMAGE:
        return read_image(path)
    if stream.kind is StreamKind.DEPTH:
        return read_depth_image(path, stream.depth_units_per_metre)
    if stream.kind is StreamKind.POINTS:
        return read_points(path, stream.bin_columns)
    if stream.kind is StreamKind.THERMAL:
        return read_thermal_image(path)
    if stream.kind is StreamKind.IMU:
        return read_imu_csv(path)
    return read_wav(path)
