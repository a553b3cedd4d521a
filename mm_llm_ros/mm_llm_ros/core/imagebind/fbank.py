"""Kaldi-compatible log mel filterbank features in plain torch (the subset ImageBind's audio encoder uses).

Reproduces ``torchaudio.compliance.kaldi.fbank`` with the options of ImageBind's ``waveform2melspec``: Hann
("hanning") window, no dither, ``snip_edges``, per-frame DC removal, pre-emphasis 0.97, power spectrum on a
power-of-two FFT, triangular mel filters on Kaldi's mel scale ``1127 ln(1 + f / 700)`` between ``low_freq`` and
Nyquist + ``high_freq``, and ``log(max(energy, float32 eps))``. ``htk_compat`` only changes where the energy
column goes, and ImageBind disables energy, so it needs no code here.

Unlike torchaudio, :func:`kaldi_fbank` takes any number of leading batch dimensions, so several clips share one
FFT call.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

FLOAT32_EPS = torch.finfo(torch.float32).eps


@dataclasses.dataclass(frozen=True)
class FbankConfig:
    """Kaldi fbank options; defaults are ImageBind's (16 kHz, 128 bins, 25 ms frames every 10 ms)."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0 means an offset from Nyquist, as in Kaldi
    preemphasis: float = 0.97

    @property
    def window_size(self) -> int:
        """Samples per frame (Kaldi truncates: 400 at 16 kHz / 25 ms)."""
        return int(self.sample_rate * self.frame_length_ms * 0.001)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms * 0.001)

    @property
    def fft_size(self) -> int:
        """The frame is zero-padded to the next power of two before the FFT."""
        return 1 << (self.window_size - 1).bit_length()

    def num_frames(self, num_samples: int) -> int:
        """Frames Kaldi produces with `snip_edges` (0 when the signal is shorter than one window)."""
        if num_samples < self.window_size:
            return 0
        return 1 + (num_samples - self.window_size) // self.window_shift


def _mel(freq: torch.Tensor | float) -> torch.Tensor | float:
    # Written as log(1 + x), not log1p, to round exactly like torchaudio.
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


@functools.lru_cache(maxsize=8)
def _mel_filterbank(config: FbankConfig) -> torch.Tensor:
    """Triangular filters (num_mel_bins, fft_size // 2 + 1); the Nyquist column is zero as in Kaldi.

    Evaluated in float32 like torchaudio: the trained model saw those weights, which differ from exact ones by up
    to 1e-5 near the triangle edges.
    """
    nyquist = 0.5 * config.sample_rate
    high_freq = config.high_freq if config.high_freq > 0 else nyquist + config.high_freq
    if not 0.0 <= config.low_freq < high_freq <= nyquist:
        raise ValueError(f'need 0 <= low_freq < high_freq <= {nyquist}, got {config.low_freq}, {high_freq}')
    mel_low, mel_high = _mel(config.low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (config.num_mel_bins + 1)
    edges = mel_low + torch.arange(config.num_mel_bins + 2, dtype=torch.float32) * delta
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bin_width = config.sample_rate / config.fft_size
    mel = _mel(bin_width * torch.arange(config.fft_size // 2, dtype=torch.float32))[None, :]
    weights = torch.minimum((mel - left) / (center - left), (right - mel) / (right - center)).clamp(min=0.0)
    return F.pad(weights, (0, 1))


@functools.lru_cache(maxsize=8)
def _window(window_size: int) -> torch.Tensor:
    return torch.hann_window(window_size, periodic=False, dtype=torch.float32)


def kaldi_fbank(waveform: torch.Tensor, config: FbankConfig = FbankConfig()) -> torch.Tensor:
    """Log mel energies (..., frames, num_mel_bins) of a float32 waveform (..., samples) at `config.sample_rate`.

    Raises ValueError when the waveform is shorter than one analysis window.
    """
    if waveform.dtype != torch.float32:
        raise TypeError(f'waveform must be float32, got {waveform.dtype}')
    num_samples = waveform.shape[-1]
    if config.num_frames(num_samples) == 0:
        raise ValueError(f'waveform has {num_samples} samples, fewer than one {config.window_size}-sample window')

    frames = waveform.unfold(-1, config.window_size, config.window_shift)  # (..., frames, window)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    # Pre-emphasis; the first sample of each frame is its own predecessor (Kaldi's replicate padding).
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = (frames - config.preemphasis * previous) * _window(config.window_size).to(frames.device)
    power = torch.fft.rfft(frames, n=config.fft_size).abs().pow(2.0)  # (..., frames, fft_size // 2 + 1)
    energies = power @ _mel_filterbank(config).to(power.device).T
    return energies.clamp(min=FLOAT32_EPS).log()
