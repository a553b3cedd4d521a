"""Replay recorded or generated sensor data (ROS-free part of the ``sensor_replay`` node).

- ``sensor_files``: read images, WAV audio and lidar clouds (KITTI, nuScenes, .npy, .pcd) into arrays.
- ``scene``: a :class:`Scene` of streams (topic, frame, files), from a folder, a scene YAML file or nuScenes.
- ``synthetic``: a street scene generated from code (image with a sign, lidar cloud, engine sound).
- ``scheduler``: the drift-free timeline of what to publish when.
- ``mcap_bag``: raw CDR messages from an MCAP bag.
- ``source``: the node's parameters and the ``source`` string resolved to one of the above.
"""
from mm_llm_ros.core.replay.mcap_bag import BagError, McapBag, RecordedMessage, RecordedTopic
from mm_llm_ros.core.replay.scene import (CameraIntrinsics, Scene, SceneError, StreamKind, StreamSpec,
                                          nuscenes_scene, scene_from_folder, scene_from_yaml)
from mm_llm_ros.core.replay.scheduler import (AudioTrack, FrameTrack, ReplayEvent, Scheduler, TimedItem,
                                              TimelineConfig, recorded_timeline)
from mm_llm_ros.core.replay.sensor_files import SensorFileError, read_image, read_points, read_wav
from mm_llm_ros.core.replay.source import ReplayConfig, load_payload, open_source, scene_tracks
from mm_llm_ros.core.replay.synthetic import write_synthetic_scene

__all__ = [
    'AudioTrack', 'BagError', 'CameraIntrinsics', 'FrameTrack', 'McapBag', 'RecordedMessage', 'RecordedTopic',
    'ReplayConfig', 'ReplayEvent', 'Scene', 'SceneError', 'Scheduler', 'SensorFileError', 'StreamKind',
    'StreamSpec', 'TimedItem', 'TimelineConfig', 'load_payload', 'nuscenes_scene', 'open_source', 'read_image', 'read_points',
    'read_wav', 'recorded_timeline', 'scene_from_folder', 'scene_from_yaml', 'scene_tracks',
    'write_synthetic_scene',
]
