"""Thermal modality: decoding thermal sensor_msgs/Image payloads, the LLVIP-style preprocessing, the synthetic
thermal frame, and ImageBind's thermal trunk accepting the result."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.imagebind.model import ImageBindConfig, ImageBindEncoder
from mm_llm_ros.core.imagebind.preprocess import PreprocessError
from mm_llm_ros.core.imagebind.thermal import ThermalPreprocessConfig, preprocess_thermal, thermal_to_intensity
from mm_llm_ros.core.replay.synthetic import (THERMAL_ENGINE_BOX, THERMAL_HEIGHT, THERMAL_PERSON_BOX,
                                              THERMAL_WIDTH, thermal_image)
from mm_llm_ros.core.sensor_decoding import (DecodeError, DecodeLimits, DecodeReason, decode_thermal_image,
                                             encode_image)


@pytest.fixture(scope='module')
def rng():
    return np.random.default_rng(7)


@pytest.fixture(scope='module')
def scene():
    return thermal_image(np.random.default_rng(0))


def raises(reason, *args, **kwargs):
    with pytest.raises(DecodeError) as info:
        decode_thermal_image(*args, **kwargs)
    assert info.value.reason == reason, str(info.value)
    return info.value


# --------------------------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize('encoding, dtype', [('mono8', np.uint8), ('mono16', np.uint16), ('16UC1', np.uint16)])
@pytest.mark.parametrize('big_endian', [False, True])
@pytest.mark.parametrize('padding', [0, 6])
def test_integer_encodings_keep_every_bit(encoding, dtype, big_endian, padding, rng):
    raw = rng.integers(0, np.iinfo(dtype).max, (5, 7), endpoint=True).astype(dtype)
    message = encode_image(raw, encoding, is_bigendian=big_endian, row_padding=padding)
    decoded = decode_thermal_image(encoding, message.height, message.width, message.step, big_endian, message.data)
    assert decoded.encoding == encoding
    assert decoded.values.dtype == dtype and decoded.values.dtype.isnative and decoded.values.flags.c_contiguous
    np.testing.assert_array_equal(decoded.values, raw)  # mono16 is NOT reduced to its high byte here


@pytest.mark.parametrize('big_endian', [False, True])
def test_32fc1_keeps_kelvin_and_marks_non_finite_nan(big_endian, rng):
    kelvin = rng.uniform(250.0, 350.0, (4, 6)).astype(np.float32)
    kelvin[0, 0], kelvin[1, 1] = np.inf, np.nan
    message = encode_image(kelvin, '32FC1', is_bigendian=big_endian, row_padding=4)
    decoded = decode_thermal_image('32fc1', message.height, message.width, message.step, big_endian, message.data)
    assert decoded.encoding == '32FC1' and decoded.values.dtype == np.float32
    assert np.isnan(decoded.values[0, 0]) and np.isnan(decoded.values[1, 1])
    finite = np.isfinite(kelvin)
    np.testing.assert_array_equal(decoded.values[finite], kelvin[finite])


def test_8uc1_is_read_like_mono8():
    raw = np.arange(12, dtype=np.uint8).reshape(3, 4)
    decoded = decode_thermal_image('8UC1', 3, 4, 4, 0, raw.tobytes())
    assert decoded.encoding == '8UC1'
    np.testing.assert_array_equal(decoded.values, raw)


def test_decoded_values_do_not_alias_the_message_buffer():
    data = bytearray(np.arange(6, dtype=np.uint16).tobytes())
    decoded = decode_thermal_image('mono16', 2, 3, 6, False, data)
    data[:] = bytes(len(data))
    np.testing.assert_array_equal(decoded.values, np.arange(6).reshape(2, 3))


def test_bad_thermal_images_are_rejected_with_a_reason():
    good = np.zeros((2, 3), np.uint16).tobytes()
    assert 'mono16' in str(raises('unsupported', 'rgb8', 2, 3, 9, False, bytes(18)))  # lists known encodings
    raises('unknown_encoding', 'bayer_rggb8', 2, 3, 3, False, bytes(6))
    raises('unknown_encoding', None, 2, 3, 6, False, good)
    raises('size_mismatch', 'mono16', 2, 3, 6, False, good[:-1])
    raises('bad_step', 'mono16', 2, 3, 5, False, bytes(10))
    raises('bad_dimensions', 'mono16', 0, 3, 6, False, good)
    raises('bad_dimensions', 'mono16', 2.5, 3, 6, False, good)
    raises('empty', 'mono16', 2, 3, 6, False, b'')
    raises('too_large', 'mono16', 2, 3, 6, False, good, DecodeLimits(max_pixels=5))


SMALL = DecodeLimits(max_bytes=1 << 12, max_pixels=1 << 10)
THERMAL_BPP = {'mono8': 1, '8UC1': 1, 'mono16': 2, '16UC1': 2, '32FC1': 4, 'rgb8': 3, 'yuv422': 2}


@settings(deadline=None, database=None, max_examples=300, suppress_health_check=list(HealthCheck))
@given(height=st.integers(-3, 40), width=st.integers(-3, 40), padding=st.integers(-2, 5),
       extra=st.sampled_from([0, 0, -1, 3]), big_endian=st.booleans(), pattern=st.binary(min_size=1, max_size=16))
def test_fuzz_decode_thermal_image(height, width, padding, extra, big_endian, pattern):
    """Any header and payload either decodes to an (H, W) array of the encoding's type or raises a DecodeError."""
    for encoding, bpp in THERMAL_BPP.items():
        step = max(width, 0) * bpp + padding
        size = max(0, min(height * step + extra, SMALL.max_bytes + 8))
        data = (pattern * (size // len(pattern) + 1))[:size]
        try:
            decoded = decode_thermal_image(encoding, height, width, step, big_endian, data, SMALL)
        except DecodeError as exc:
            assert exc.reason in set(DecodeReason) and str(exc)
            continue
        assert decoded.values.shape == (height, width)
        assert decoded.values.dtype.kind == ('f' if encoding == '32FC1' else 'u')
        assert not np.isinf(decoded.values).any()


# --------------------------------------------------------------------------------------------------------------
# Radiometric values -> 8-bit intensity


def reference_intensity(physical, low, high):
    """The documented linear white-hot map, computed independently in float64."""
    return np.rint(np.clip((np.asarray(physical, np.float64) - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def test_mono8_is_already_intensity():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert thermal_to_intensity(image) is image
    np.testing.assert_array_equal(thermal_to_intensity(image[..., None]), image)


def test_percentile_window_of_a_kelvin_frame(scene):
    low, high = np.percentile(scene.astype(np.float64), (1.0, 99.0))
    assert high - low > 5.0  # the minimum span does not apply to this scene
    np.testing.assert_array_equal(thermal_to_intensity(scene), reference_intensity(scene, low, high))
    config = ThermalPreprocessConfig(percentiles=(5.0, 95.0))
    low, high = np.percentile(scene.astype(np.float64), (5.0, 95.0))
    np.testing.assert_array_equal(thermal_to_intensity(scene, config), reference_intensity(scene, low, high))


def test_centikelvin_mono16_equals_the_kelvin_float_frame(scene):
    centikelvin = np.round(scene.astype(np.float64) * 100).astype(np.uint16)
    kelvin = (centikelvin * 0.01).astype(np.float64)
    np.testing.assert_array_equal(thermal_to_intensity(centikelvin), thermal_to_intensity(kelvin))
    # Other radiometric scales: FLIR's 0.04 K/count "low gain" mode.
    coarse = np.round(scene.astype(np.float64) / 0.04).astype(np.uint16)
    config = ThermalPreprocessConfig(kelvin_per_count=0.04)
    np.testing.assert_array_equal(thermal_to_intensity(coarse, config), thermal_to_intensity(coarse * 0.04))


def test_raw_counts_use_their_own_percentile_window(rng):
    counts = rng.integers(8000, 8300, (40, 50)).astype(np.uint16)
    config = ThermalPreprocessConfig(units='counts')
    low, high = np.percentile(counts.astype(np.float64), (1.0, 99.0))
    np.testing.assert_array_equal(thermal_to_intensity(counts, config), reference_intensity(counts, low, high))
    # Read as centikelvin, the same frame spans 3 K, less than the 5 K minimum span: a lower-contrast image.
    assert not np.array_equal(thermal_to_intensity(counts), thermal_to_intensity(counts, config))


def test_counts_read_as_kelvin_are_reported_once(caplog, monkeypatch):
    monkeypatch.setattr('mm_llm_ros.core.imagebind.thermal._warned', set())
    counts = np.full((8, 8), 30000, np.uint16)  # a 14/16-bit camera's raw counts: "300 K" only by accident
    counts[0] = 31000
    with caplog.at_level('WARNING', logger='mm_llm_ros.core.imagebind.thermal'):
        thermal_to_intensity(counts, ThermalPreprocessConfig(kelvin_per_count=1.0))  # 30000 "K"
        thermal_to_intensity(counts, ThermalPreprocessConfig(kelvin_per_count=1.0))
        thermal_to_intensity(counts)  # 300 K centikelvin: plausible, silent
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and 'median of 30000.0 K: are these raw counts' in warnings[0]
    assert 'kelvin_per_count 1' in warnings[0]


def test_fixed_window_keeps_frames_comparable():
    config = ThermalPreprocessConfig(window='fixed', fixed_range=(270.0, 321.0))
    kelvin = np.array([[250.0, 270.0, 295.5, 321.0, 400.0]])
    np.testing.assert_array_equal(thermal_to_intensity(kelvin, config), [[0, 0, 128, 255, 255]])
    warmer = kelvin + 10.0  # the same scene 10 K warmer is brighter, not re-stretched
    np.testing.assert_array_equal(thermal_to_intensity(warmer, config), [[0, 50, 178, 255, 255]])


def test_minimum_span_stops_noise_being_stretched(rng):
    uniform = 293.0 + rng.normal(0.0, 0.05, (64, 64))  # a wall at 20 degC seen through 50 mK of sensor noise
    shown = thermal_to_intensity(uniform)
    assert abs(float(shown.mean()) - 127.5) < 2 and int(shown.max()) - int(shown.min()) < 30
    stretched = thermal_to_intensity(uniform, ThermalPreprocessConfig(min_span=0.0))
    assert int(stretched.max()) - int(stretched.min()) == 255
    constant = np.full((4, 4), 500, np.uint16)  # counts, no minimum span: one grey level, no division by zero
    assert np.unique(thermal_to_intensity(constant, ThermalPreprocessConfig(units='counts'))).size == 1


def test_invalid_pixels_are_black_and_ignored_by_the_window(scene):
    holes = scene.astype(np.float64)
    holes[:10] = np.nan
    holes[10:20] = 0.0  # not a temperature
    valid = holes[20:]
    low, high = np.percentile(valid, (1.0, 99.0))
    shown = thermal_to_intensity(holes)
    assert (shown[:20] == 0).all()
    np.testing.assert_array_equal(shown[20:], reference_intensity(valid, low, high))
    with pytest.raises(PreprocessError, match='no valid pixel'):
        thermal_to_intensity(np.full((3, 3), np.nan, np.float32))
    with pytest.raises(PreprocessError, match='no valid pixel'):
        thermal_to_intensity(np.zeros((3, 3), np.uint16))  # 0 centikelvin


@pytest.mark.parametrize('values, message', [
    ([[1.0]], 'numpy array'),
    (np.zeros((2, 2, 3), np.uint8), r'\(H, W\)'),
    (np.zeros((0, 4), np.float32), 'non-empty'),
    (np.zeros((2, 2), np.int32), 'uint8, uint16 or float'),
])
def test_bad_arrays_are_refused(values, message):
    with pytest.raises(PreprocessError, match=message):
        thermal_to_intensity(values)


@pytest.mark.parametrize('kwargs, message', [
    ({'units': 'celsius'}, 'units must be one of kelvin, counts'),
    ({'window': 'auto'}, 'window must be one of percentile, fixed'),
    ({'window': 'fixed'}, 'needs fixed_range'),
    ({'fixed_range': (300.0, 280.0)}, 'low < high'),
    ({'percentiles': (99.0, 1.0)}, '0 <= low < high <= 100'),
    ({'percentiles': (1.0,)}, r'\(low, high\) pair'),
    ({'kelvin_per_count': 0}, 'positive'),
    ({'min_span': -1.0}, '>= 0'),
    ({'std': 0.0}, 'std a positive number'),
])
def test_config_is_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ThermalPreprocessConfig(**kwargs)


def test_config_from_parameter_like_values():
    config = ThermalPreprocessConfig.from_mapping(
        {'units': 'counts', 'window': 'percentile', 'percentiles': [2.0, 98.0], 'fixed_range': [], 'min_span': -1.0})
    assert config == ThermalPreprocessConfig(units='counts', percentiles=(2.0, 98.0))
    assert config.effective_min_span == 0.0 and ThermalPreprocessConfig().effective_min_span == 5.0
    fixed = ThermalPreprocessConfig.from_mapping({'window': 'fixed', 'fixed_range': [253.15, 323.15]})
    assert fixed.fixed_range == (253.15, 323.15)
    with pytest.raises(ConfigError, match='unknown thermal setting.*gain'):
        ThermalPreprocessConfig.from_mapping({'gain': 2})


# --------------------------------------------------------------------------------------------------------------
# The model input


def reference_tensor(intensity, size, left_top):
    """torchvision's Resize(224, BICUBIC) on a PIL 'L' image, CenterCrop(224) and ToTensor, restated with Pillow."""
    resized = Image.fromarray(intensity, 'L').resize(size, Image.Resampling.BICUBIC)
    left, top = left_top
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32) / np.float32(255)
    return torch.from_numpy(crop)[None]


def test_llvip_sized_frame_gets_the_community_loader_tensor(rng):
    llvip = rng.integers(0, 256, (1024, 1280), dtype=np.uint8)  # LLVIP's 1280x1024 grey frames
    ours = preprocess_thermal(llvip)
    assert ours.shape == (1, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference_tensor(llvip, (280, 224), (28, 0)), rtol=0, atol=0)
    normalised = preprocess_thermal(llvip, ThermalPreprocessConfig(mean=0.5, std=0.5))
    torch.testing.assert_close(normalised, (ours - 0.5) / 0.5, rtol=0, atol=1e-6)


def test_kelvin_frame_goes_through_intensity_then_geometry(scene):
    ours = preprocess_thermal(scene)
    torch.testing.assert_close(ours, reference_tensor(thermal_to_intensity(scene), (280, 224), (28, 0)),
                               rtol=0, atol=0)
    assert 0.0 <= float(ours.min()) and float(ours.max()) <= 1.0


def test_synthetic_scene_is_a_plausible_white_hot_night_street(scene):
    assert scene.shape == (THERMAL_HEIGHT, THERMAL_WIDTH) and scene.dtype == np.float32
    left, top, right, bottom = THERMAL_PERSON_BOX
    person = scene[top + 50:top + 130, left + 15:right - 15]  # the torso
    sky = scene[:100]
    assert 295.0 < float(person.mean()) < 310.0 and float(sky.mean()) < 270.0
    left, top, right, bottom = THERMAL_ENGINE_BOX
    assert float(scene[top + 5:bottom - 5, left + 5:right - 5].mean()) > 320.0
    np.testing.assert_array_equal(scene, thermal_image(np.random.default_rng(0)))  # deterministic per seed
    shown = thermal_to_intensity(scene)
    assert shown[top + 20, left + 20] > shown[THERMAL_PERSON_BOX[1] + 80, 290] > shown[50, 50]  # white-hot order


def test_thermal_trunk_embeds_the_preprocessed_frames(scene, rng):
    encoder = ImageBindEncoder(ImageBindConfig(preset='tiny', allow_random_weights=True, device='cpu'))
    llvip = rng.integers(0, 256, (1024, 1280), dtype=np.uint8)
    batch = torch.stack([preprocess_thermal(scene), preprocess_thermal(llvip)])
    embeddings = encoder.encode({'thermal': batch})['thermal']
    assert embeddings.shape == (2, encoder.embedding_dim) == (2, 1024)
    assert np.isfinite(embeddings).all()
    # The official thermal postprocessor: unit norm times its fixed logit scale of 10.
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 10.0, rtol=1e-4)
    assert not np.allclose(embeddings[0], embeddings[1])
