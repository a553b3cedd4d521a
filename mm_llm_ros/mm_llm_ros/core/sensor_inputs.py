"""From a decoded sensor message to one model input: the `preprocess` function of each `SensorSpec`.

Every function here has the same signature, `preprocess(decoded, context) -> torch.Tensor` (one unbatched input of
the sensor's modality), so that the encoder node treats all sensors alike: `decoded` is what the sensor's decoder
gives (`DecodedImage`, an `AudioSnapshot` of the audio window, `DecodedPointCloud`), `context` what the node knows
besides the message (its parameters, the latest camera focal length, a lidar's resolved projection). Input a sensor
cannot use raises `InputRejected` (counted per reason, never an error).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch

from mm_llm_ros.core.audio_buffer import AudioRingBuffer, AudioSnapshot
from mm_llm_ros.core.encoding_pipeline import InputRejected
from mm_llm_ros.core.imagebind.lidar_projection import PinholeCamera, lidar_to_depth_input
from mm_llm_ros.core.imagebind.preprocess import preprocess_audio, preprocess_depth, preprocess_vision
from mm_llm_ros.core.sensor_decoding import DecodedImage, DecodedPointCloud


@dataclass(frozen=True)
class InputContext:
    """What the node knows besides the message."""
    params: Mapping[str, Any]
    focal_px: Optional[float] = None                                   # latest CameraInfo's fx, when one arrived
    projection: Optional[tuple[PinholeCamera, np.ndarray]] = None     # lidar: camera and 4x4 lidar-to-camera


def _require(image: DecodedImage, depth: bool, sensor: str) -> None:
    if image.is_depth != depth:
        raise InputRejected('unsupported', f"{'a depth' if image.is_depth else 'a colour'} image ({image.encoding}) "
                            f"cannot feed the {sensor}, which takes {'depth' if depth else 'colour'} images")


def camera_image(image: DecodedImage, context: InputContext) -> torch.Tensor:
    """A colour (or mono) camera frame -> ImageBind vision input (3, 224, 224)."""
    _require(image, False, 'camera')
    return preprocess_vision(image.rgb)


def depth_image(image: DecodedImage, context: InputContext) -> torch.Tensor:
    """A depth frame in metres -> ImageBind depth input (1, 224, 224), as disparity with the camera's focal length."""
    _require(image, True, 'depth camera')
    return preprocess_depth(image.depth_m, context.focal_px)


def audio_window_buffer(params: Mapping[str, Any]) -> AudioRingBuffer:
    """The encoder's audio window: `audio.window_s` of the newest audio, ready from `audio.min_window_s`."""
    return AudioRingBuffer(params['audio.window_s'], min_window_s=params['audio.min_window_s'])


def audio_window(snapshot: AudioSnapshot, context: InputContext) -> torch.Tensor:
    """The buffered audio window -> ImageBind audio input (3 clips of 128-bin fbanks)."""
    return preprocess_audio(snapshot.waveform, snapshot.sample_rate)


def lidar_cloud(cloud: DecodedPointCloud, context: InputContext) -> torch.Tensor:
    """A point cloud -> ImageBind depth input, projected into the camera the node resolved (`context.projection`)."""
    camera, transform = context.projection
    p = context.params
    return lidar_to_depth_input(cloud.xyz, camera, transform, p['lidar.min_range_m'], p['lidar.max_range_m'],
                                fill_kernel_size=2 * int(p['lidar.hole_fill_px']) + 1)
