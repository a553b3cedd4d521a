"""One entry per concept: the ImageBind modalities, the sensors (sources) and the perception-context kinds.

Everything else reads these tables instead of keeping its own list: the parameter declarations (`core/params.py`:
`use_<sensor>`, `fusion.weights.<modality>`, `fusion.source_weights.<sensor>`, `use_<kind>`), the launch plan
(launch switches, topic arguments, remappings), the encoder, grounding and LLM nodes (subscriptions, publishers),
the answering engine (prompt labels, which names a question may ask for), the replay's default topics, the
evaluation and the generated docs. Adding a sensor, a modality or a context kind is one entry here plus its own
code (a preprocessing function, an extractor); `docs/design.md` walks through an example.

Names are plain strings on purpose: this module imports nothing heavy (no torch, no rclpy), so the parameter
table, the launch file and the docs generator can read it. `resolve(path)` turns a `module:function` reference
into the function where it is used.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

# ---- topics (relative, so a pushed namespace applies) -------------------------------------------------------
CAMERA_INFO_TOPIC = 'camera/camera_info'
EMBEDDING_TOPIC = 'mm_llm/embedding/{source}'   # one topic per sensor (source), not per modality
CONTEXT_TOPIC = 'mm_llm/context/{kind}'


@dataclass(frozen=True)
class ModalitySpec:
    """An ImageBind modality: the key of the model's input/output dicts."""
    name: str
    description: str
    fusion_weight: float = 1.0     # default of `fusion.weights.<name>`; a source's weight defaults to it
    implemented: bool = True       # False: declared for completeness (point), no encoder path


class _Switchable:
    """An entry a node switches on with the boolean parameter `use_<name>`."""
    name: str

    @property
    def enable_param(self) -> str:
        return f'use_{self.name}'


@dataclass(frozen=True)
class SensorSpec(_Switchable):
    """One input of the encoder: a source of embeddings, published on `mm_llm/embedding/<name>`.

    `name` is the source id: the encoder's stream name, the embedding topic's last part, the key of the LLM node's
    embedding store and of `fusion.source_weights.<name>`, and a name a question may ask for (as may its
    modality, which stands for all of its sources).
    """
    name: str
    modality: str                  # a `MODALITIES` key
    topic: str                     # default input topic (relative)
    msg_type: str                  # ROS message type, 'package/msg/Name'
    # How messages become model inputs: 'frame' (each decoded message is one input), 'window' (decoded messages are
    # gathered by `window`; its ready window is one input) or 'pointcloud' (projected through the node's camera).
    decoder: str
    preprocess: str                # 'module:function(decoded, InputContext) -> tensor' (see core/sensor_inputs.py)
    description: str
    launch_switch: str             # launch argument `use_<switch>` (and executable `<switch>_encoder`) enabling it
    topic_argument: str            # launch argument remapping `topic`
    replay_kind: str = ''          # sensor_replay stream kind publishing on `topic` by default
    default_frame: str = ''        # frame_id the replay stamps on it by default
    enabled_by_default: bool = True
    compressed_param: str = ''     # parameter choosing raw or compressed transport ('' = raw only)
    uses_camera_info: bool = False # needs camera/camera_info (focal length, projection)
    # decoder 'window': 'module:function(params) -> buffer' with add(decoded, stamp_ns), ready_window() (the window
    # once long enough, else None; it has `end_stamp_ns`, the time of its newest sample, and is what `preprocess` takes)
    # and clear() (a deactivated encoder resumes with a fresh window)
    window: str = ''
    # Key of `ros.conversions.DECODERS` reading the message ('' = its type's name): a thermal `Image` keeps its
    # radiometric values instead of being read as a colour or depth image.
    reader: str = ''

    @property
    def embedding_topic(self) -> str:
        return EMBEDDING_TOPIC.format(source=self.name)


@dataclass(frozen=True)
class ContextKindSpec(_Switchable):
    """A perception-context extractor of grounding_node, published on `mm_llm/context/<name>`."""
    name: str
    label: str                     # readable name in the prompt line ('{label}: {text}')
    sensor: str                    # the `SENSORS` entry whose messages it reads
    extractor: str                 # 'module:Class' of the extractor
    config: str                    # 'module:Class' of its config dataclass, read from the `<name>.<field>` parameters
    description: str
    # Config fields taken from parameters shared with other nodes instead of `<name>.<field>`.
    shared_params: tuple[tuple[str, str], ...] = ()
    # 'module:function(data, source) -> entities': the scene entities (objects, texts, sounds) in one published
    # result's JSON, for structured scene descriptions and markers ('' = none); see core/grounding/entities.py.
    entities: str = ''

    @property
    def topic(self) -> str:
        return CONTEXT_TOPIC.format(kind=self.name)

    def config_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The node parameters as the config reader expects them: `<name>.<field>`, shared ones filled in."""
        return {**params, **{f'{self.name}.{field}': params[name] for field, name in self.shared_params}}


# ---- the tables ---------------------------------------------------------------------------------------------
_INPUTS = 'mm_llm_ros.core.sensor_inputs'
_GROUNDING = 'mm_llm_ros.core.grounding'
_ENTITIES = f'{_GROUNDING}.entities'

MODALITY_SPECS = (
    ModalitySpec('vision', 'camera images (3x224x224, official transforms)'),
    ModalitySpec('audio', 'microphone audio (3 clips of 2 s as 128-bin Kaldi fbanks, official sampling)'),
    ModalitySpec('depth', 'depth images in metres, as disparity (1x224x224); lidar clouds are projected to it'),
    ModalitySpec('thermal', 'thermal images (1x224x224; LLVIP-like 8-bit intensity, see docs/design.md)'),
    ModalitySpec('imu', 'IMU streams (6x2000: accelerometer and gyroscope, 5 s at 400 Hz, see docs/design.md)'),
    ModalitySpec('point', 'Point-Bind point clouds (not implemented: its encoder needs a CUDA-only extension)',
                 implemented=False),
)

SENSOR_SPECS = (
    SensorSpec('camera', 'vision', 'camera/image_raw', 'sensor_msgs/msg/Image', 'frame',
               f'{_INPUTS}:camera_image', 'Encode camera images (vision).', 'camera', 'image_topic',
               replay_kind='image', default_frame='camera_optical_frame', compressed_param='camera.transport'),
    SensorSpec('depth_camera', 'depth', 'camera/depth/image_raw', 'sensor_msgs/msg/Image', 'frame',
               f'{_INPUTS}:depth_image', 'Also encode a depth image stream (camera/depth/image_raw, 16UC1 mm '
               'or 32FC1 m) with the depth encoder.', 'camera', 'depth_topic', replay_kind='depth',
               default_frame='camera_optical_frame', enabled_by_default=False, uses_camera_info=True),
    SensorSpec('audio', 'audio', 'audio', 'mm_llm_ros_interfaces/msg/AudioChunk', 'window',
               f'{_INPUTS}:audio_window', 'Encode microphone audio.', 'audio', 'audio_topic',
               replay_kind='audio', default_frame='microphone', window=f'{_INPUTS}:audio_window_buffer'),
    SensorSpec('lidar', 'depth', 'points', 'sensor_msgs/msg/PointCloud2', 'pointcloud',
               f'{_INPUTS}:lidar_cloud',
               'Encode lidar point clouds via depth projection.', 'lidar', 'points_topic', replay_kind='points',
               default_frame='lidar', uses_camera_info=True),
    SensorSpec('thermal_camera', 'thermal', 'thermal/image_raw', 'sensor_msgs/msg/Image', 'frame',
               f'{_INPUTS}:thermal_image', 'Encode thermal camera images (mono8, mono16/16UC1 counts or 32FC1 '
               'kelvin) with the thermal encoder.', 'thermal', 'thermal_topic', replay_kind='thermal',
               default_frame='thermal_optical_frame', enabled_by_default=False, reader='ThermalImage'),
    SensorSpec('imu', 'imu', 'imu', 'sensor_msgs/msg/Imu', 'window', f'{_INPUTS}:imu_window',
               'Encode the IMU stream (accelerometer + gyroscope) with the IMU encoder.', 'imu', 'imu_topic',
               replay_kind='imu', default_frame='imu_link', enabled_by_default=False,
               window=f'{_INPUTS}:imu_window_buffer'),
)

CONTEXT_KIND_SPECS = (
    ContextKindSpec('ocr', 'Text read by the camera', 'camera', f'{_GROUNDING}.ocr:OcrExtractor',
                    f'{_GROUNDING}.ocr:OcrConfig',
                    'Read scene text in camera images (RapidOCR) and publish it on mm_llm/context/ocr.',
                    entities=f'{_ENTITIES}:texts_from_ocr'),
    ContextKindSpec('audio_events', 'Sounds heard', 'audio', f'{_GROUNDING}.audio_events:AudioEventExtractor',
                    f'{_GROUNDING}.audio_events:AudioEventConfig',
                    'Name the sounds in microphone audio and tell whether someone speaks (YAMNet + Silero VAD); '
                    'published on mm_llm/context/audio_events.',
                    entities=f'{_ENTITIES}:sounds_from_audio_events'),
    ContextKindSpec('geometry', 'Lidar obstacles', 'lidar', f'{_GROUNDING}.geometry:GeometryExtractor',
                    f'{_GROUNDING}.geometry:GeometryConfig',
                    'Find the ground, the nearest obstacle per sector and object clusters in lidar scans (open3d); '
                    'published on mm_llm/context/geometry.',
                    shared_params=(('min_range_m', 'lidar.min_range_m'), ('max_range_m', 'lidar.max_range_m')),
                    entities=f'{_ENTITIES}:objects_from_geometry'),
)

MODALITIES: dict[str, ModalitySpec] = {m.name: m for m in MODALITY_SPECS}
SENSORS: dict[str, SensorSpec] = {s.name: s for s in SENSOR_SPECS}
CONTEXT_KINDS: dict[str, ContextKindSpec] = {k.name: k for k in CONTEXT_KIND_SPECS}
# The encoder's launch switches (`use_camera`, ...) in table order; each names one process in multi-process mode.
LAUNCH_SWITCHES: tuple[str, ...] = tuple(dict.fromkeys(s.launch_switch for s in SENSOR_SPECS))


def sources_of(modality: str) -> tuple[str, ...]:
    """The sensors (sources) whose embeddings have this modality."""
    return tuple(s.name for s in SENSOR_SPECS if s.modality == modality)


def sensor_for_replay_kind(kind: str) -> SensorSpec:
    return next(s for s in SENSOR_SPECS if s.replay_kind == kind)


def resolve(path: str) -> Callable[..., Any]:
    """The object a 'module:attribute' reference names (imported now, so heavy modules load only where used)."""
    module, _, attribute = path.partition(':')
    return getattr(importlib.import_module(module), attribute)


def _check_tables() -> None:
    for sensor in SENSOR_SPECS:
        assert sensor.modality in MODALITIES, f'sensor {sensor.name}: unknown modality {sensor.modality}'
        assert sensor.name not in CONTEXT_KINDS, f'sensor {sensor.name} has the name of a context kind'
    for kind in CONTEXT_KIND_SPECS:
        assert kind.sensor in SENSORS, f'context kind {kind.name}: unknown sensor {kind.sensor}'
        assert kind.name not in MODALITIES, f'context kind {kind.name} has the name of a modality'


_check_tables()
