"""IMU modality: decoding sensor_msgs/Imu, the stream buffer, ImageBind's (6, 2000) window (checked against
numpy.interp and numerical integration), the synthetic drive, and ImageBind's IMU trunk accepting the result."""
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mm_llm_ros.core.imagebind.imu import (IMU_SAMPLES, ImuBuffer, ImuBufferError, ImuWindowConfig, ImuWindowError,
                                           box_average, grid_times_s, interpolate_linear, preprocess_imu)
from mm_llm_ros.core.imagebind.model import ImageBindConfig, ImageBindEncoder
from mm_llm_ros.core.imagebind.preprocess import PreprocessError
from mm_llm_ros.core.replay.synthetic import (GRAVITY, IMU_RATE_HZ, ROBOT_SPEED_MPS, TURN_END_S, TURN_RATE_RPS,
                                              TURN_START_S, imu_stream)
from mm_llm_ros.core.sensor_decoding import DecodeError, decode_imu

MS = 1_000_000
T0 = 1_700_000_000 * 1_000_000_000  # a wall-clock-like stamp: float seconds would lose precision here


def stream(rate_hz, seconds, seed=0, jitter=0.0):
    """(stamps_ns, samples) of random smooth-ish signals at rate_hz, optionally with stamp jitter."""
    rng = np.random.default_rng(seed)
    count = int(round(rate_hz * seconds))
    times = np.arange(count) / rate_hz + rng.uniform(-jitter, jitter, count) / rate_hz
    samples = np.cumsum(rng.normal(0.0, 0.1, (count, 6)), axis=0) + [0, 0, 9.81, 0, 0, 0]
    return T0 + np.round(times * 1e9).astype(np.int64), samples


def reference_interp(stamps_ns, samples, end_ns, config=ImuWindowConfig()):
    """numpy.interp per channel on the documented grid: 2000 steps of window_s / 2000 ending at end_ns."""
    times = (stamps_ns - end_ns) / 1e9
    grid = (np.arange(IMU_SAMPLES) - (IMU_SAMPLES - 1)) * config.window_s / IMU_SAMPLES
    return np.stack([np.interp(grid, times, samples[:, channel]) for channel in range(6)])


# --------------------------------------------------------------------------------------------------------------
# Decoding


def test_decode_imu_reads_vector3_messages_and_sequences():
    vector = lambda x, y, z: SimpleNamespace(x=x, y=y, z=z)  # noqa: E731 - geometry_msgs/Vector3 stand-in
    sample = decode_imu(vector(0.1, -0.2, 9.81), vector(0.01, 0.02, 0.5), [0.0] * 9, [0.0] * 9)
    assert sample.dtype == np.float64
    np.testing.assert_array_equal(sample, [0.1, -0.2, 9.81, 0.01, 0.02, 0.5])  # acc xyz, then gyro xyz
    np.testing.assert_array_equal(decode_imu((1, 2, 3), np.array([4.0, 5.0, 6.0])), [1, 2, 3, 4, 5, 6])


def test_decode_imu_refuses_missing_and_bad_fields():
    unknown = [-1.0] + [0.0] * 8  # sensor_msgs/Imu: covariance[0] == -1 means "not provided"
    with pytest.raises(DecodeError, match='does not provide angular_velocity') as info:
        decode_imu((0, 0, 9.8), (0, 0, 0), None, unknown)
    assert info.value.reason == 'missing_fields'
    with pytest.raises(DecodeError) as info:
        decode_imu((0, 0, 9.8), (0, 0, 0), unknown)
    assert info.value.reason == 'missing_fields'
    with pytest.raises(DecodeError) as info:
        decode_imu((0, np.nan, 9.8), (0, 0, 0))
    assert info.value.reason == 'non_finite'
    for bad in ((1, 2), 'abc', None):
        with pytest.raises(DecodeError) as info:
            decode_imu(bad, (0, 0, 0))
        assert info.value.reason == 'bad_fields'


# --------------------------------------------------------------------------------------------------------------
# Buffer


def test_buffer_keeps_samples_in_order_and_prunes_old_ones():
    buffer = ImuBuffer(window_s=1.0, margin_s=0.5)
    assert buffer.snapshot() is None and buffer.duration_s == 0.0
    for index in range(300):  # 3 s at 100 Hz
        buffer.append(T0 + index * 10 * MS, np.full(6, float(index)))
    snapshot = buffer.snapshot()
    assert snapshot.stamps_ns.dtype == np.int64 and snapshot.samples.shape == (151, 6)
    assert snapshot.stamps_ns[0] == T0 + 149 * 10 * MS and snapshot.stamps_ns[-1] == T0 + 299 * 10 * MS
    np.testing.assert_array_equal(snapshot.samples[:, 0], np.arange(149, 300))
    assert buffer.duration_s == pytest.approx(1.5) and len(buffer) == 151
    snapshot.samples[:] = 0  # a copy
    assert buffer.snapshot().samples[-1, 0] == 299


def test_buffer_sorts_late_samples_and_drops_duplicates():
    buffer = ImuBuffer(reorder_tolerance_s=0.05)
    for offset in (0, 20, 10, 30, 5, 30, 10):  # milliseconds: two late ones, two repeats
        buffer.append(T0 + offset * MS, np.full(6, float(offset)))
    snapshot = buffer.snapshot()
    np.testing.assert_array_equal((snapshot.stamps_ns - T0) // MS, [0, 5, 10, 20, 30])
    np.testing.assert_array_equal(snapshot.samples[:, 0], [0, 5, 10, 20, 30])  # each stamp kept its own sample
    assert (buffer.duplicates, buffer.resets) == (2, 0)


def test_buffer_starts_over_when_time_jumps_back():
    buffer = ImuBuffer(reorder_tolerance_s=0.05)
    for index in range(100):
        buffer.append(T0 + index * 5 * MS, np.zeros(6))
    buffer.append(T0 - 3 * 10**9, np.ones(6))  # a bag replay loop
    snapshot = buffer.snapshot()
    assert buffer.resets == 1 and snapshot.stamps_ns.tolist() == [T0 - 3 * 10**9]
    buffer.append(T0 - 3 * 10**9 + 5 * MS, np.ones(6))
    assert len(buffer) == 2
    buffer.clear()
    assert buffer.snapshot() is None and buffer.resets == 1


def test_buffer_memory_is_bounded_for_a_too_fast_stream():
    buffer = ImuBuffer(window_s=1.0, margin_s=0.0, max_rate_hz=100.0)
    for index in range(1000):  # 1 kHz for 1 s
        buffer.append(T0 + index * MS, np.zeros(6))
    assert len(buffer) == buffer.capacity == 100
    assert buffer.snapshot().stamps_ns[-1] == T0 + 999 * MS  # the newest ones survive


@pytest.mark.parametrize('stamp, sample, message', [
    (1.5, np.zeros(6), 'integer number of nanoseconds'),
    (True, np.zeros(6), 'integer number of nanoseconds'),
    (T0, np.zeros(5), 'must have 6 values'),
    (T0, [0, 0, np.inf, 0, 0, 0], 'NaN/inf'),
])
def test_buffer_refuses_bad_samples(stamp, sample, message):
    with pytest.raises(ImuBufferError, match=message):
        ImuBuffer().append(stamp, sample)


def test_buffer_arguments_are_validated():
    for kwargs in ({'window_s': 0}, {'max_rate_hz': -1.0}, {'margin_s': -0.1}, {'reorder_tolerance_s': np.nan}):
        with pytest.raises(ValueError):
            ImuBuffer(**kwargs)


def test_buffer_is_safe_to_fill_from_several_threads():
    buffer = ImuBuffer(window_s=10.0, reorder_tolerance_s=100.0)
    workers = 4

    def fill(first):
        for index in range(first, 4000, workers):
            buffer.append(T0 + index * MS, np.full(6, float(index)))

    threads = [threading.Thread(target=fill, args=(first,)) for first in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = buffer.snapshot()
    np.testing.assert_array_equal(snapshot.stamps_ns, T0 + np.arange(4000) * MS)
    np.testing.assert_array_equal(snapshot.samples[:, 0], np.arange(4000))
    assert (buffer.resets, buffer.duplicates) == (0, 0)


# --------------------------------------------------------------------------------------------------------------
# Window


def test_grid_is_2000_samples_over_the_window():
    grid = grid_times_s()
    assert grid.shape == (2000,) and grid[-1] == 0.0
    np.testing.assert_allclose(np.diff(grid), 1 / 400)  # the paper's 5 s / 2000 steps
    assert ImuWindowConfig(window_s=10.0).rate_hz == 200.0  # IMU2CLIP's 200 Hz reading


@pytest.mark.parametrize('rate_hz, jitter', [(200.0, 0.0), (100.0, 0.0), (250.0, 0.3), (400.0, 0.0)])
def test_window_matches_numpy_interp(rate_hz, jitter):
    stamps, samples = stream(rate_hz, 7.0, jitter=jitter)
    window = preprocess_imu(stamps, samples)
    assert window.shape == (6, 2000) and window.dtype == torch.float32 and window.is_contiguous()
    np.testing.assert_allclose(window.numpy(), reference_interp(stamps, samples, stamps[-1]), rtol=0, atol=2e-5)


def test_interpolation_matches_numpy_interp_at_and_beyond_the_edges():
    rng = np.random.default_rng(3)
    times = np.sort(rng.uniform(0, 10, 50))
    values = rng.normal(size=(50, 6))
    query = np.concatenate([[-1.0, times[0]], rng.uniform(-2, 12, 500), [times[-1], 11.0], times])
    ours = interpolate_linear(times, values, query)
    expected = np.stack([np.interp(query, times, values[:, channel]) for channel in range(6)], axis=1)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    single = interpolate_linear(times[:1], values[:1], query)
    np.testing.assert_array_equal(single, np.repeat(values[:1], query.size, 0))


def test_box_average_matches_numerical_integration():
    rng = np.random.default_rng(4)
    times = np.sort(rng.uniform(0, 1, 40))
    values = rng.normal(size=(40, 6))
    query = np.array([-0.2, 0.0, 0.013, 0.5, 0.77, 1.0, 1.3])
    width = 0.05
    expected = []
    for centre in query:  # trapezoid rule on numpy.interp; exact enough at 200k points
        dense = np.linspace(centre - width / 2, centre + width / 2, 200_001)
        curve = np.stack([np.interp(dense, times, values[:, channel]) for channel in range(6)], axis=1)
        expected.append(np.trapezoid(curve, dense, axis=0) / width)
    np.testing.assert_allclose(box_average(times, values, query, width), expected, rtol=0, atol=1e-7)


def test_fast_sensors_are_box_averaged_so_vibration_does_not_alias():
    # A 1 kHz IMU with 390 Hz motor vibration on top of gravity: on the 400 Hz grid plain interpolation aliases
    # it to 10 Hz at full amplitude. Averaging over each 2.5 ms step is a box filter, not a brick wall: it cuts
    # the 390 Hz tone to 2.6% and the 610 Hz image of the 1 kHz linear interpolant to 21%, ~8x less in all.
    rate = 1000.0
    times = np.arange(int(7 * rate)) / rate
    samples = np.zeros((times.size, 6))
    samples[:, 2] = 9.81 + 2.0 * np.sin(2 * np.pi * 390.0 * times)
    stamps = T0 + np.round(times * 1e9).astype(np.int64)
    aliased = preprocess_imu(stamps, samples, ImuWindowConfig(antialias=False)).numpy()[2]
    averaged = preprocess_imu(stamps, samples).numpy()[2]
    np.testing.assert_allclose(aliased, reference_interp(stamps, samples, stamps[-1])[2], atol=2e-5)
    assert np.ptp(aliased) > 3.5 and np.ptp(averaged) < np.ptp(aliased) / 6
    assert abs(float(averaged.mean()) - 9.81) < 0.01


def test_grid_ends_on_the_newest_sample_so_a_matching_rate_is_taken_as_is():
    stamps, samples = stream(200.0, 12.0)
    window = preprocess_imu(stamps, samples, ImuWindowConfig(window_s=10.0))  # 2000 steps of 5 ms
    np.testing.assert_array_equal(window.numpy(), samples[-2000:].T.astype(np.float32))


def test_short_history_is_refused_with_its_length():
    stamps, samples = stream(200.0, 3.0)
    with pytest.raises(ImuWindowError, match=r'only 2\.995 s of contiguous IMU history .*5 s are needed') as info:
        preprocess_imu(stamps, samples)
    assert info.value.reason == 'short_history' and isinstance(info.value, PreprocessError)
    just_enough = stream(200.0, 5.0)  # 1000 samples span 4.995 s, the grid 4.9975 s: within one step
    assert preprocess_imu(*just_enough).shape == (6, 2000)


def test_min_history_pads_by_holding_the_oldest_sample():
    stamps, samples = stream(200.0, 3.0)
    window = preprocess_imu(stamps, samples, ImuWindowConfig(min_history_s=2.5)).numpy()
    times = (stamps - stamps[-1]) / 1e9
    grid = grid_times_s()
    before = grid < times[0]
    assert before.sum() == 801  # 2 s of the 5 s grid lie before the first sample
    np.testing.assert_array_equal(window[:, before], np.repeat(samples[0, :, None].astype(np.float32), 801, 1))
    np.testing.assert_allclose(window, reference_interp(stamps, samples, stamps[-1]), atol=2e-5)


def test_a_long_gap_ends_the_usable_history_and_a_short_one_is_bridged():
    stamps, samples = stream(200.0, 8.0)
    keep = np.ones(stamps.size, bool)
    keep[800:840] = False  # 0.2 s without samples, 4 s before the end
    with pytest.raises(ImuWindowError, match='a gap of 0.205 s ends it') as info:
        preprocess_imu(stamps[keep], samples[keep])
    assert info.value.reason == 'short_history'
    keep[800:840], keep[800:810] = True, False  # 55 ms: bridged by interpolation
    np.testing.assert_allclose(preprocess_imu(stamps[keep], samples[keep]).numpy(),
                               reference_interp(stamps[keep], samples[keep], stamps[-1]), atol=2e-5)
    keep[:] = True
    keep[100:200] = False  # a long gap before the window does not matter
    np.testing.assert_allclose(preprocess_imu(stamps[keep], samples[keep]).numpy(),
                               reference_interp(stamps, samples, stamps[-1]), atol=2e-5)


def test_window_can_end_at_a_chosen_stamp():
    stamps, samples = stream(200.0, 9.0)
    end = int(stamps[1500]) + 2 * MS  # between two samples; later samples are ignored
    window = preprocess_imu(stamps, samples, end_ns=end)
    np.testing.assert_allclose(window.numpy(), reference_interp(stamps[:1501], samples[:1501], end), atol=2e-5)
    with pytest.raises(ImuWindowError) as info:
        preprocess_imu(stamps, samples, end_ns=int(stamps[-1]) + 500 * MS)
    assert info.value.reason == 'stale'
    with pytest.raises(ImuWindowError) as info:
        preprocess_imu(stamps, samples, end_ns=int(stamps[0]) - 1)
    assert info.value.reason == 'empty'


@pytest.mark.parametrize('stamps, samples, message', [
    (np.array([0, 2, 1]), np.zeros((3, 6)), 'strictly increasing'),
    (np.array([0, 1, 1]), np.zeros((3, 6)), 'strictly increasing'),
    (np.array([0.0, 1.0]), np.zeros((2, 6)), 'integer array of nanoseconds'),
    (np.array([0, 1]), np.zeros((2, 3)), r'must be \(2, 6\)'),
    (np.array([0, 1]), np.full((2, 6), np.nan), 'finite floats'),
])
def test_malformed_streams_are_refused(stamps, samples, message):
    with pytest.raises(PreprocessError, match=message):
        preprocess_imu(stamps, samples)


def test_window_config_is_validated():
    for kwargs in ({'window_s': 0.0}, {'max_gap_s': -1.0}, {'min_history_s': 6.0}, {'min_history_s': 0.0}):
        with pytest.raises(ValueError):
            ImuWindowConfig(**kwargs)


def test_window_config_from_parameter_like_values():
    config = ImuWindowConfig.from_mapping({'window_s': 10.0, 'min_history_s': 0.0, 'antialias': False})
    assert config == ImuWindowConfig(window_s=10.0, antialias=False)
    assert config.required_history_s == 10.0 and config.rate_hz == 200.0
    assert ImuWindowConfig.from_mapping({'min_history_s': 2.0}).required_history_s == 2.0
    with pytest.raises(ValueError, match='unknown IMU window setting.*rate'):
        ImuWindowConfig.from_mapping({'rate': 400})


# --------------------------------------------------------------------------------------------------------------
# The synthetic drive and the model


@pytest.fixture(scope='module')
def drive():
    return imu_stream(np.random.default_rng(0), start_ns=T0)


def test_synthetic_drive_is_a_plausible_ground_robot(drive):
    stamps, samples = drive
    assert stamps.dtype == np.int64 and samples.shape == (stamps.size, 6)
    np.testing.assert_array_equal(np.diff(stamps), round(1e9 / IMU_RATE_HZ))
    times = (stamps - T0) / 1e9
    assert abs(float(samples[:, 2].mean()) - GRAVITY) < 0.01  # gravity on z, REP 145
    turned = np.trapezoid(samples[:, 5], times)
    assert turned == pytest.approx(TURN_RATE_RPS * (TURN_END_S - TURN_START_S), abs=0.05)  # ~1.2 rad left
    turning = (times > TURN_START_S + 0.3) & (times < TURN_END_S - 0.3)
    assert float(samples[turning, 1].mean()) == pytest.approx(ROBOT_SPEED_MPS * TURN_RATE_RPS, abs=0.05)
    starting = times < 1.9
    assert float(samples[starting, 0].mean()) == pytest.approx(0.75, abs=0.05)  # driving off


def test_synthetic_drive_through_buffer_window_and_imu_trunk(drive):
    buffer = ImuBuffer()
    for stamp, sample in zip(*drive):
        buffer.append(int(stamp), sample)
    snapshot = buffer.snapshot()
    window = preprocess_imu(snapshot.stamps_ns, snapshot.samples)  # the last 5 s: the turn and after
    assert abs(float(window[2].mean()) - GRAVITY) < 0.01
    assert float(window[5].max()) == pytest.approx(TURN_RATE_RPS, abs=0.02)
    encoder = ImageBindEncoder(ImageBindConfig(preset='tiny', allow_random_weights=True, device='cpu'))
    still = torch.zeros(6, 2000)
    still[2] = GRAVITY
    embeddings = encoder.encode({'imu': torch.stack([window, still])})['imu']
    assert embeddings.shape == (2, encoder.embedding_dim) == (2, 1024)
    assert np.isfinite(embeddings).all()
    # The official IMU postprocessor: unit norm times its fixed logit scale of 5.
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 5.0, rtol=1e-4)
    assert not np.allclose(embeddings[0], embeddings[1])
