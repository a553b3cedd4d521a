"""preprocess_audio and its DSP parts: parity with the official ImageBind loader, clip placement, edge cases.

Golden tensors come from `scripts/make_golden_fixtures.py` (official `load_and_transform_audio_data`, which uses
torchaudio's resampler and Kaldi fbank); here only our torch implementation runs.
"""
import json
import math
import wave

import numpy as np
import pytest
import torch

from mm_llm_ros.core.imagebind.fbank import FbankConfig, kaldi_fbank
from mm_llm_ros.core.imagebind.preprocess import (AudioPreprocessConfig, PreprocessError, audio_clip_spans,
                                                  preprocess_audio)
from mm_llm_ros.core.imagebind.resample import resample

# Float32 rounding differs between CPUs (MKL picks FFT and convolution code paths by instruction set), and the log of
# a quiet frame's energy amplifies it: on an AMX machine the golden tensors (written on another) differ by up to
# 1.5e-3 in a synthetic clip's quiet frames, 2.6e-4 in the real clips, 1e-5 or less on average. A real preprocessing
# error (window, resampler, mel scale, normalisation) moves the mean by orders of magnitude more.
PARITY_MEAN_ATOL = 2e-5
PARITY_MAX_ATOL = 2e-3
SHAPE = (3, 1, 128, 204)


@pytest.fixture(scope='module')
def golden(fixtures_dir):
    with np.load(fixtures_dir / 'golden' / 'audio.npz') as data:
        return {key: data[key] for key in data.files}


def read_wav(path, frames=None):
    """(channels, n) float32 in [-1, 1] and the rate, decoded like torchaudio/FFmpeg (int16 / 32768)."""
    with wave.open(str(path), 'rb') as src:
        assert src.getsampwidth() == 2
        count = src.getnframes() if frames is None else frames
        pcm = np.frombuffer(src.readframes(count), dtype='<i2').reshape(-1, src.getnchannels())
        return pcm.T.astype(np.float32) / 32768.0, src.getframerate()


def assert_parity(waveform, rate, expected, key):
    ours = preprocess_audio(waveform, rate)
    assert ours.shape == SHAPE and ours.dtype == torch.float32
    difference = np.abs(ours.numpy() - expected)
    assert difference.mean() < PARITY_MEAN_ATOL and difference.max() < PARITY_MAX_ATOL, (
        f'{key}: mean |difference| {difference.mean():.2e}, max {difference.max():.2e}')


def test_matches_official_loader_on_synthetic_48khz_audio(golden):
    source = json.loads(str(golden['sources']))['synthetic_48k']
    waveform = golden[source['input']][None].astype(np.float32) / 32768.0
    assert_parity(waveform, source['sample_rate'], golden['synthetic_48k'], 'synthetic_48k')


@pytest.mark.shared_data
def test_matches_official_loader_on_every_sample_clip(shared_data, golden):
    sources = {key: s for key, s in json.loads(str(golden['sources'])).items() if 'path' in s}
    assert len(sources) == 7  # the six files plus the first 0.75 s of one (shorter than a clip)
    for key, source in sources.items():
        waveform, rate = read_wav(shared_data / source['path'], source.get('frames'))
        assert_parity(waveform, rate, golden[key], key)


def test_input_array_is_not_modified_when_no_resampling_is_needed():
    waveform = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 40000)).astype(np.float32) + 0.1
    before = waveform.copy()
    preprocess_audio(waveform, 16000)
    np.testing.assert_array_equal(waveform, before)


def test_mono_1d_equals_single_channel_2d():
    waveform = np.random.default_rng(1).uniform(-0.5, 0.5, 30000).astype(np.float32)
    assert torch.equal(preprocess_audio(waveform, 22050), preprocess_audio(waveform[None], 22050))


def test_silence_gives_the_log_floor_and_normalised_zero_padding():
    out = preprocess_audio(np.zeros((1, 32000), np.float32), 16000)
    frames = FbankConfig().num_frames(32000)  # 198 real frames, 6 padded
    floor = (math.log(torch.finfo(torch.float32).eps) + 4.268) / 9.138
    np.testing.assert_allclose(out[..., :frames].numpy(), floor, atol=1e-5)
    np.testing.assert_allclose(out[..., frames:].numpy(), 4.268 / 9.138, atol=1e-6)


def test_clip_spans_follow_pytorchvideo_constant_sampler():
    # 5 s: starts every (5 - 2) / 3 = 1 s, so the last second is never used.
    assert audio_clip_spans(80000) == [(0, 32000), (16000, 48000), (32000, 64000)]
    # Shorter than a clip: the whole waveform, three times.
    assert audio_clip_spans(12000) == [(0, 12000)] * 3
    # Exactly one clip long.
    assert audio_clip_spans(32000) == [(0, 32000)] * 3
    for start, end in audio_clip_spans(41759):  # odd length: every clip is still exactly 2 s
        assert end - start == 32000


def test_too_short_audio_raises_a_clear_error():
    with pytest.raises(PreprocessError, match='too short'):
        preprocess_audio(np.zeros((1, 399), np.float32), 16000)
    # 25 ms at 44.1 kHz resamples to exactly one 400-sample window: accepted.
    assert preprocess_audio(np.zeros((1, 1103), np.float32), 44100).shape == SHAPE


@pytest.mark.parametrize('waveform, rate, message', [
    (np.zeros((1, 0), np.float32), 16000, 'empty'),
    (np.zeros((0,), np.float32), 16000, 'empty'),
    (np.zeros((1, 1, 100), np.float32), 16000, 'shape'),
    (np.zeros((32000, 2), np.float32), 16000, r'\(samples, channels\)'),
    (np.zeros((1, 32000), np.int16), 16000, 'int16 / 32768'),
    (np.full((1, 32000), np.nan, np.float32), 16000, 'NaN'),
    ([0.0] * 32000, 16000, 'numpy array'),
    (np.zeros((1, 32000), np.float32), 0, 'sample_rate'),
    (np.zeros((1, 32000), np.float32), 44100.5, 'sample_rate'),
])
def test_bad_inputs_raise_preprocess_error(waveform, rate, message):
    with pytest.raises(PreprocessError, match=message):
        preprocess_audio(waveform, rate)


def test_custom_config_changes_clip_count_and_length():
    config = AudioPreprocessConfig(clips_per_video=2, target_length=100)
    out = preprocess_audio(np.random.default_rng(2).uniform(-1, 1, (1, 48000)).astype(np.float32), 16000, config)
    assert out.shape == (2, 1, 128, 100)


def test_resample_keeps_a_tone_at_its_frequency_and_level():
    rate, tone = 44100, 1000.0
    t = np.arange(rate) / rate
    out = resample(torch.tensor(0.5 * np.sin(2 * np.pi * tone * t), dtype=torch.float32), rate, 16000)
    assert out.shape == (16000,)
    core = out[2000:-2000].numpy()  # away from the zero-padded edges
    spectrum = np.abs(np.fft.rfft(core * np.hanning(core.size)))
    assert np.fft.rfftfreq(core.size, 1 / 16000)[spectrum.argmax()] == pytest.approx(tone, abs=2.0)
    assert np.sqrt(np.mean(core ** 2)) == pytest.approx(0.5 / math.sqrt(2), rel=1e-3)


def test_resample_to_same_rate_is_identity_and_rejects_bad_rates():
    x = torch.zeros(2, 100)
    assert resample(x, 16000, 16000) is x
    with pytest.raises(ValueError, match='positive integers'):
        resample(x, 0, 16000)
    with pytest.raises(TypeError, match='float32'):
        resample(x.double(), 44100, 16000)


def test_fbank_peaks_in_the_mel_bin_of_a_tone_and_batches():
    config = FbankConfig()
    t = torch.arange(16000) / 16000
    tones = torch.stack([torch.sin(2 * math.pi * f * t) for f in (500.0, 3000.0)])
    features = kaldi_fbank(tones, config)
    assert features.shape == (2, config.num_frames(16000), 128)
    peaks = features.mean(dim=1).argmax(dim=1)
    assert peaks[0] < peaks[1]
    assert torch.equal(features[1], kaldi_fbank(tones[1], config))
    with pytest.raises(ValueError, match='fewer than one'):
        kaldi_fbank(torch.zeros(100), config)
