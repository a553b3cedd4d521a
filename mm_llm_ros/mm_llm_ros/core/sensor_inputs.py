"""From a decoded sensor message to one model input: the `preprocess` function of each `SensorSpec`.

Every function here has the same signature, `preprocess(decoded, context) -> torch.Tensor` (one unbatched input of
the sensor's modality), so that the encoder node treats all sensors alike: `decoded` is what the sensor's decoder
gives (`DecodedImage`, `DecodedThermal`, an `AudioSnapshot` of the audio window, an `ImuWindowInput` of the IMU
window, `DecodedPointCloud`), `context` what the node knows
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
from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.imagebind.imu import ImuBuffer, ImuWindowConfig, ImuWindowError, preprocess_imu
from mm_llm_ros.core.imagebind.lidar_projection import PinholeCamera, lidar_to_depth_input
from mm_llm_ros.core.imagebind.preprocess import preprocess_audio, preprocess_depth, preprocess_vision
from mm_llm_ros.core.imagebind.thermal import ThermalPreprocessConfig, preprocess_thermal
from mm_llm_ros.core.sensor_decoding import DecodedImage, DecodedPointCloud, DecodedThermal


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


def thermal_image(thermal: DecodedThermal, context: InputContext) -> torch.Tensor:
    """A thermal frame (raw values) -> ImageBind thermal input (1, 224, 224), windowed to the 8-bit intensity the
    model saw (the `thermal.*` parameters; core/imagebind/thermal.py)."""
    p = context.params
    try:
        config = ThermalPreprocessConfig.from_mapping({
            'units': p['thermal.units'], 'kelvin_per_count': p['thermal.kelvin_per_count'],
            'window': p['thermal.window'], 'percentiles': p['thermal.percentiles'], 'min_span': p['thermal.min_span'],
            'fixed_range': p['thermal.fixed_range'] if p['thermal.window'] == 'fixed' else None})
    except ConfigError as exc:  # a setting, not the message: every frame would fail alike
        raise InputRejected('bad_settings', str(exc)) from exc
    return preprocess_thermal(thermal.values, config)


@dataclass(frozen=True)
class ImuWindowInput:
    """The buffered IMU history handed to `imu_window` (what `ImuWindow.ready_window` returns)."""
    stamps_ns: np.ndarray
    samples: np.ndarray
    config: ImuWindowConfig

    @property
    def end_stamp_ns(self) -> int:
        return int(self.stamps_ns[-1])


class ImuWindow:
    """The encoder's IMU window: decoded samples gathered in an `ImuBuffer`, ready once `imu.*` asks are met."""

    def __init__(self, config: ImuWindowConfig) -> None:
        self.config = config
        self.buffer = ImuBuffer(window_s=config.window_s)

    def add(self, sample: np.ndarray, stamp_ns: int) -> None:
        self.buffer.append(stamp_ns, sample)

    def ready_window(self) -> Optional[ImuWindowInput]:
        snapshot = self.buffer.snapshot()
        if snapshot is None or self.buffer.duration_s < self.config.required_history_s:
            return None  # still filling: the first encode waits for the history one window needs
        return ImuWindowInput(snapshot.stamps_ns, snapshot.samples, self.config)

    def clear(self) -> None:
        self.buffer.clear()


def imu_window_buffer(params: Mapping[str, Any]) -> ImuWindow:
    return ImuWindow(ImuWindowConfig.from_mapping({
        'window_s': params['imu.window_s'], 'max_gap_s': params['imu.max_gap_s'],
        'min_history_s': params['imu.min_history_s'], 'antialias': params['imu.antialias']}))


def imu_window(window: ImuWindowInput, context: InputContext) -> torch.Tensor:
    """The buffered IMU history -> ImageBind IMU input (6, 2000): acc xyz (m/s^2) and gyro xyz (rad/s), resampled."""
    try:
        return preprocess_imu(window.stamps_ns, window.samples, window.config)
    except ImuWindowError as exc:  # e.g. a gap left too little contiguous history: counted, not an error
        raise InputRejected(exc.reason, str(exc)) from exc
