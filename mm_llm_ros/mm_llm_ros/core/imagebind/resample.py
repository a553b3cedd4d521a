"""Band-limited polyphase resampling, numerically equivalent to ``torchaudio.functional.resample``'s default.

The default there is a windowed-sinc FIR (``sinc_interp_hann``: 6 zero crossings, roll-off 0.99). For a rate change
``orig -> new`` reduced by their gcd, output sample ``j`` interpolates the input at time ``j / new`` with a Hann
windowed sinc whose cutoff is ``rolloff * min(orig, new) / 2``. Because the filter phases repeat every ``new``
outputs, all of them are one ``conv1d`` with ``new`` output channels and stride ``orig``.

ImageBind's audio encoder was trained on 16 kHz input produced this way, so its exact numbers matter; torchaudio
itself is not a runtime dependency.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Filter bank (new, 1, 2 * width + orig) for gcd-reduced rates, and its half-width in input samples.

    Evaluated in float32 with torchaudio's order of operations, so the taps are bit-identical to the ones the
    model's training data went through.
    """
    cutoff = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / cutoff)
    # Time from every output phase to every tap, in units of the cutoff period.
    taps = torch.arange(-width, width + orig, dtype=torch.float32) / orig
    phases = torch.arange(0, -new, -1, dtype=torch.float32)[:, None] / new
    t = ((phases + taps) * cutoff).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), t.sin() / t)
    kernel = sinc * (window * (cutoff / orig))
    return kernel[:, None, :], width


def resample(waveform: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """Resample a float32 waveform (..., time) from `orig_freq` to `new_freq` Hz (positive integers).

    Returns a new tensor of length ``ceil(time * new_freq / orig_freq)`` (rounded in float32, as torchaudio does).
    When the rates are equal the input itself is returned: callers that modify the result in place copy first.
    """
    if orig_freq <= 0 or new_freq <= 0 or int(orig_freq) != orig_freq or int(new_freq) != new_freq:
        raise ValueError(f'sample rates must be positive integers, got {orig_freq} -> {new_freq}')
    if waveform.dtype != torch.float32:
        raise TypeError(f'waveform must be float32, got {waveform.dtype}')
    if orig_freq == new_freq:
        return waveform
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    kernel, width = _sinc_kernel(orig, new, LOWPASS_FILTER_WIDTH, ROLLOFF)

    leading, length = waveform.shape[:-1], waveform.shape[-1]
    flat = waveform.reshape(-1, 1, length)
    padded = F.pad(flat, (width, width + orig))
    # (N, new, blocks): phase p of block b is output sample b * new + p.
    phased = F.conv1d(padded, kernel.to(waveform.device), stride=orig)
    out = phased.transpose(1, 2).reshape(flat.shape[0], -1)
    # Rounded in float32 like torchaudio, so clip boundaries downstream fall on the same samples.
    target_length = int(torch.tensor(new * length / orig, dtype=torch.float32).ceil())
    return out[:, :target_length].reshape(*leading, -1)
