"""The thermal camera and the IMU as sensors of the spec tables: decoding, the encoder's inputs, replay and launch."""
from __future__ import annotations

import pathlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mm_llm_ros.core import params, specs
from mm_llm_ros.core.encoding_pipeline import InputRejected
from mm_llm_ros.core.imagebind.imu import IMU_SAMPLES, ImuWindowConfig, preprocess_imu
from mm_llm_ros.core.imagebind.model import ImageBindConfig, ImageBindEncoder
from mm_llm_ros.core.imagebind.thermal import ThermalPreprocessConfig, preprocess_thermal
from mm_llm_ros.core.replay import synthetic
from mm_llm_ros.core.replay.scene import StreamKind
from mm_llm_ros.core.replay.sensor_files import SensorFileError, read_imu_csv, read_thermal_image
from mm_llm_ros.core.replay.source import load_payload, scene_tracks
from mm_llm_ros.core.sensor_decoding import encode_image
from mm_llm_ros.core.sensor_inputs import InputContext, imu_window, imu_window_buffer, thermal_image
from mm_llm_ros.launch_plan import plan_nodes
from mm_llm_ros.ros.conversions import DECODERS

PACKAGE = pathlib.Path(__file__).resolve().parents[2]
ENCODER = params.defaults('encoder')


def _image_msg(array: np.ndarray, encoding: str):
    encoded = encode_image(array, encoding)
    return SimpleNamespace(encoding=encoding, height=encoded.height, width=encoded.width, step=encoded.step,
                           is_bigendian=0, data=encoded.data)


def _imu_msg(sample):
    vec = lambda v: SimpleNamespace(x=v[0], y=v[1], z=v[2])  # noqa: E731
    return SimpleNamespace(linear_acceleration=vec(sample[:3]), angular_velocity=vec(sample[3:]),
                           linear_acceleration_covariance=[0.0] * 9, angular_velocity_covariance=[0.0] * 9)


def test_the_two_sensors_are_spec_entries_read_by_params_and_launch():
    thermal, imu = specs.SENSORS['thermal_camera'], specs.SENSORS['imu']
    assert (thermal.modality, imu.modality) == ('thermal', 'imu') and {'thermal', 'imu'} <= set(specs.MODALITIES)
    assert ENCODER['use_thermal_camera'] is False and ENCODER['use_imu'] is False  # most robots have neither
    assert ENCODER['thermal.units'] == 'kelvin' and ENCODER['imu.window_s'] == 5.0
    assert 'mm_llm/embedding/thermal_camera' in {s.embedding_topic for s in specs.SENSOR_SPECS}


def test_a_mono16_thermal_image_reaches_the_encoder_input_with_its_radiometric_values():
    kelvin = synthetic.thermal_image(np.random.default_rng(0))
    msg = _image_msg(np.round(kelvin * 100).astype(np.uint16), 'mono16')  # centikelvin, as a radiometric camera
    decoded = DECODERS[specs.SENSORS['thermal_camera'].reader](msg)
    assert decoded.values.dtype == np.uint16  # not the colour decoder's 8-bit reduction
    tensor = thermal_image(decoded, InputContext(ENCODER))
    expected = preprocess_thermal(np.round(kelvin * 100).astype(np.uint16), ThermalPreprocessConfig())
    assert tensor.shape == (1, 224, 224) and torch.allclose(tensor, expected)


def test_fixed_thermal_window_is_used_only_when_asked_and_bad_settings_are_rejected_not_raised():
    values = np.full((64, 80), 29000, np.uint16)
    values[20:40, 30:50] = 30600
    fixed = thermal_image(SimpleNamespace(values=values), InputContext(
        ENCODER | {'thermal.window': 'fixed', 'thermal.fixed_range': [270.0, 310.0]}))
    assert fixed.max() < 1.0 and fixed.min() > 0.0  # 290 K and 306 K inside a 270-310 K window
    with pytest.raises(InputRejected) as rejected:
        thermal_image(SimpleNamespace(values=values), InputContext(ENCODER | {'thermal.units': 'furlongs'}))
    assert rejected.value.reason == 'bad_settings'


def test_imu_window_waits_for_its_history_then_matches_the_core_preprocessing():
    stamps, samples = synthetic.imu_stream(np.random.default_rng(1), duration_s=6.0)
    window = imu_window_buffer(ENCODER)
    read = DECODERS['Imu']
    for stamp, sample in zip(stamps[:500], samples[:500]):  # 2.5 s of 200 Hz: short of the 5 s window
        window.add(read(_imu_msg(sample)), int(stamp))
    assert window.ready_window() is None
    for stamp, sample in zip(stamps[500:], samples[500:]):
        window.add(read(_imu_msg(sample)), int(stamp))
    ready = window.ready_window()
    assert ready is not None and ready.end_stamp_ns == int(stamps[-1])
    tensor = imu_window(ready, InputContext(ENCODER))
    assert tensor.shape == (6, IMU_SAMPLES)
    assert torch.equal(tensor, preprocess_imu(stamps, samples, ImuWindowConfig()))
    window.clear()
    assert window.ready_window() is None


def test_imu_gap_is_a_counted_rejection():
    stamps, samples = synthetic.imu_stream(np.random.default_rng(2), duration_s=6.0)
    window = imu_window_buffer(ENCODER)
    for stamp, sample in zip(stamps, samples):
        if not 200 <= len(stamps) - 1 - np.searchsorted(stamps, stamp) <= 300:  # a 0.5 s hole 1 s before the end
            window.add(sample, int(stamp))
    with pytest.raises(InputRejected) as rejected:
        imu_window(window.ready_window(), InputContext(ENCODER))
    assert rejected.value.reason == 'short_history'


def test_the_tiny_model_embeds_both(tmp_path):
    encoder = ImageBindEncoder(ImageBindConfig(preset='tiny', allow_random_weights=True, device='cpu'))
    stamps, samples = synthetic.imu_stream(np.random.default_rng(3), duration_s=5.5)
    thermal = thermal_image(SimpleNamespace(values=synthetic.thermal_image(np.random.default_rng(3))),
                            InputContext(ENCODER))
    out = encoder.encode({'thermal': thermal[None], 'imu': preprocess_imu(stamps, samples)[None]})
    assert out['thermal'].shape == (1, encoder.embedding_dim) and np.isfinite(out['imu']).all()


def test_the_synthetic_scene_replays_a_thermal_image_and_an_imu_stream(tmp_path):
    scene = synthetic.write_synthetic_scene(tmp_path)
    by_kind = {s.kind: s for s in scene.streams}
    thermal, imu = by_kind[StreamKind.THERMAL], by_kind[StreamKind.IMU]
    assert (thermal.topic, imu.topic) == (specs.SENSORS['thermal_camera'].topic, specs.SENSORS['imu'].topic)
    kelvin = read_thermal_image(thermal.files[0]) / 100.0
    assert 250 < np.median(kelvin) < 300 and kelvin.max() > 300  # a cool street with a warm person
    clip = load_payload(imu, 0)
    assert clip.sample_rate == 200 and clip.samples.shape[1] == 6
    assert np.median(clip.samples[:, 2]) == pytest.approx(9.81, abs=0.3)  # gravity on z
    tracks = scene_tracks(scene, rate_hz=1.0)
    assert not StreamKind.IMU.is_frame and tracks[scene.streams.index(imu)].clips == ((len(clip.samples), 200),)


def test_unreadable_replay_files_name_themselves(tmp_path):
    bad = tmp_path / 'imu.csv'
    bad.write_text('time,ax\n0,1\n')
    with pytest.raises(SensorFileError, match='imu.csv: expected the header'):
        read_imu_csv(bad)
    colour = tmp_path / 'thermal.png'
    import cv2
    cv2.imwrite(str(colour), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(SensorFileError, match='single-channel 16-bit'):
        read_thermal_image(colour)


@pytest.mark.parametrize('config, expected', [('robot.yaml', False), ('demo.yaml', True)])
def test_the_launch_takes_thermal_and_imu_from_the_parameter_file_unless_told(config, expected):
    path = str(PACKAGE / 'config' / config)
    encoder = next(n for n in plan_nodes({'params_file': path}) if n.executable == 'encoder')
    flags = encoder.parameters[-1]
    assert flags['use_thermal_camera'] is expected and flags['use_imu'] is expected
    told = next(n for n in plan_nodes({'params_file': path, 'use_thermal': 'true', 'use_imu': 'false'})
                if n.executable == 'encoder').parameters[-1]
    assert told['use_thermal_camera'] is True and told['use_imu'] is False
    split = [n.name for n in plan_nodes({'params_file': path, 'single_process': 'false'})]
    assert ('thermal_encoder' in split) is expected and ('imu_encoder' in split) is expected
