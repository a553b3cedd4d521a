"""In-memory preprocessing for ImageBind: numpy arrays (as decoded from ROS messages) -> model input tensors.

Vision and audio reproduce the official, file-based ``imagebind.data`` loaders numerically (checked against golden
tensors made by ``scripts/make_golden_fixtures.py``), without torchvision, torchaudio or pytorchvideo:

- vision, as ``load_and_transform_vision_data``: Pillow bicubic resize of the short side to 224 (torchvision's
  ``Resize`` on a PIL image is exactly this call), centre crop, ``[0, 1]`` scaling, CLIP mean/std normalisation.
- audio, as ``load_and_transform_audio_data``: resampling to 16 kHz (:mod:`.resample`), three 2 s clips placed like
  pytorchvideo's ``ConstantClipsPerVideoSampler`` (:func:`audio_clip_spans`), per clip the Kaldi fbank of the first
  channel (:mod:`.fbank`), zero-padded or cut to 204 frames, normalised with mean -4.268 and std 9.138.

Depth has no official loader. ImageBind trained its depth encoder on SUN RGB-D converted the way Omnivore (same
authors) did, so :func:`preprocess_depth` follows that recipe (constants in :class:`DepthPreprocessConfig`):

1. Disparity, not depth: ``disparity = baseline * focal / depth`` in pixels, with the Kinect baseline 0.075 m and
   depth clipped to [0.01, 50] m, the conversion an Omnivore/ImageBind author published (facebookresearch/
   omnivore#12). That code reads SUN RGB-D's PNGs as millimetres, but they store 1/8 mm (SUN RGB-D toolbox,
   ``read3dPoints.m``), so the training depths were most likely 8x the physical ones: depth is multiplied by
   ``depth_scale = 8`` before the conversion. This is an inference, not verified against real weights: the
   standardisation statistics of step 4 fit only that scale (their mean means a harmonic-mean depth of ~1.5 m
   with it, ~12 m without, for indoor scenes). ``depth_scale=1`` gives physical disparity. The focal length is
   first rescaled to a 480-pixel short side (the Kinect frames of SUN RGB-D), so the input does not change with
   the resolution of the depth image; without a focal length the Kinect's own (518.86 px at 640x480, i.e. its
   field of view) is assumed.
2. Omnivore's SUN RGB-D ``DepthNorm(max_depth=75, clamp_max_before_scale=True)``: clamp to [0.01, 75], divide by 75.
3. The evaluation geometry of every other modality: bicubic (antialiased) resize of the short side to 224 and a
   centre crop; the result is clamped to [0, 1] because bicubic overshoot at invalid-pixel edges is meaningless.
4. Standardisation with mean 0.0418 and std 0.0295, the SUN RGB-D statistics used for ImageBind's depth encoder
   by ViT-Lens (TencentARC) and LanguageBind.

Invalid pixels (NaN, inf, <= 0: no return) become disparity 0, i.e. infinitely far, which is what a missing lidar
or stereo return usually means outdoors. Depths beyond 50 / 8 = 6.25 m all map to the same value, as in training
(an indoor Kinect dataset): the depth encoder cannot tell 10 m from 60 m.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mm_llm_ros.core.imagebind.fbank import FbankConfig, kaldi_fbank
from mm_llm_ros.core.imagebind.resample import resample

logger = logging.getLogger(__name__)

IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Kinect v1 colour focal length at 640x480 (NYU Depth V2 / SUN RGB-D calibration).
KINECT_FOCAL_PX = 518.857901


class PreprocessError(ValueError):
    """An input that cannot become a model input: wrong shape, dtype, size or values."""


# --- shared geometry (torchvision's Resize(int) and CenterCrop rules) ----------------------------------------------


def _resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the short side scaled to `short_side` and the long side truncated, as torchvision."""
    if width <= height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


def _center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of a centred size x size crop; Python's round (half to even) like torchvision."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


# --- vision ----------------------------------------------------------------------------------------------------------


def _check_rgb(rgb: np.ndarray, what: str = 'image') -> np.ndarray:
    if not isinstance(rgb, np.ndarray):
        raise PreprocessError(f'{what} must be a numpy array, got {type(rgb).__name__}')
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise PreprocessError(f'{what} must be (H, W, 3) RGB (or a batch of them), got shape {rgb.shape}')
    if rgb.dtype != np.uint8:
        raise PreprocessError(f'{what} must be uint8, got {rgb.dtype}')
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise PreprocessError(f'{what} is empty: shape {rgb.shape}')
    return rgb


def _resize_and_crop(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (224, 224, 3) uint8 through Pillow, bit-identical to the official PIL path."""
    height, width = rgb.shape[:2]
    new_height, new_width = _resized_size(height, width, IMAGE_SIZE)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    if (new_height, new_width) != (height, width):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    top, left = _center_crop_offsets(new_height, new_width, IMAGE_SIZE)
    return np.asarray(image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)))


def preprocess_vision(rgb: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """RGB uint8 image(s) -> CLIP-normalised float32 tensor(s) for ImageBind's vision encoder.

    Args:
        rgb: one (H, W, 3) image, or a batch: a (B, H, W, 3) array or a sequence of (H, W, 3) images of any sizes.

    Returns:
        (3, 224, 224) for one image, (B, 3, 224, 224) for a batch. The per-image work is a Pillow resize and crop;
        conversion and normalisation run once on the stacked batch.
    """
    if isinstance(rgb, np.ndarray) and rgb.ndim != 4:
        return _normalize_crops(np.stack([_resize_and_crop(_check_rgb(rgb))]))[0]
    images = list(rgb)
    if not images:
        raise PreprocessError('empty batch of images')
    crops = [_resize_and_crop(_check_rgb(image, f'image {i}')) for i, image in enumerate(images)]
    return _normalize_crops(np.stack(crops))


def _normalize_crops(crops: np.ndarray) -> torch.Tensor:
    """(B, 224, 224, 3) uint8 -> (B, 3, 224, 224) float32, with ToTensor's and Normalize's float32 arithmetic."""
    pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return pixels.sub_(mean).div_(std)


# --- audio -----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AudioPreprocessConfig:
    """Official ``load_and_transform_audio_data`` defaults; the filterbank (16 kHz, 128 mel bins) is Kaldi's."""

    fbank: FbankConfig = FbankConfig()
    target_length: int = 204
    clip_duration_s: float = 2.0
    clips_per_video: int = 3
    mean: float = -4.268
    std: float = 9.138


def audio_clip_spans(num_samples: int,
                     config: AudioPreprocessConfig = AudioPreprocessConfig()) -> list[tuple[int, int]]:
    """[start, end) sample ranges of the clips the official loader cuts from a `config.fbank.sample_rate` waveform.

    pytorchvideo's ``ConstantClipsPerVideoSampler`` spaces the starts by ``(duration - clip) / clips``, so the
    last clip ends one step before the end (for 5 s: 0-2, 1-3, 2-4 s). A waveform shorter than one clip yields
    ``clips_per_video`` copies of the whole waveform. Exact fractions reproduce its sample boundaries.
    """
    clip = Fraction(config.clip_duration_s)
    duration = num_samples / config.fbank.sample_rate  # a float, as the official code passes it
    step = Fraction(max(duration - clip, 0)) / config.clips_per_video
    spans = []
    for index in range(config.clips_per_video):
        start = step * index
        end = min(int((start + clip) * config.fbank.sample_rate), num_samples)
        spans.append((int(start * config.fbank.sample_rate), end))
    return spans


def _check_waveform(waveform: np.ndarray) -> torch.Tensor:
    """(channels, n) or (n,) float array -> a float32 torch copy (channels, n) that may be modified in place."""
    if not isinstance(waveform, np.ndarray):
        raise PreprocessError(f'waveform must be a numpy array, got {type(waveform).__name__}')
    if waveform.dtype.kind != 'f':
        raise PreprocessError(f'waveform must be float samples in [-1, 1], got {waveform.dtype} '
                              '(scale integer PCM first, e.g. int16 / 32768)')
    if waveform.ndim == 1:
        waveform = waveform[None]
    if waveform.ndim != 2:
        raise PreprocessError(f'waveform must be (channels, samples) or (samples,), got shape {waveform.shape}')
    channels, samples = waveform.shape
    if samples == 0 or channels == 0:
        raise PreprocessError(f'waveform is empty: shape {waveform.shape}')
    if channels > samples:
        raise PreprocessError(f'waveform shape {waveform.shape} looks like (samples, channels); '
                              'pass (channels, samples)')
    if not np.isfinite(waveform).all():
        raise PreprocessError('waveform contains NaN or infinite samples')
    return torch.tensor(waveform, dtype=torch.float32)


def preprocess_audio(waveform: np.ndarray, sample_rate: int,
                     config: AudioPreprocessConfig = AudioPreprocessConfig()) -> torch.Tensor:
    """Float waveform -> normalised log-mel clips (clips_per_video, 1, num_mel_bins, target_length) float32.

    Args:
        waveform: (channels, samples) or (samples,) float samples in [-1, 1].
        sample_rate: its rate in Hz; any positive integer rate is resampled to `config.fbank.sample_rate`.

    Raises:
        PreprocessError: bad shape/dtype/values, or shorter than one 25 ms fbank window after resampling.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise PreprocessError(f'sample_rate must be a positive integer in Hz, got {sample_rate!r}')
    audio = resample(_check_waveform(waveform), int(sample_rate), config.fbank.sample_rate)
    fbank_config = config.fbank
    num_samples = audio.shape[-1]
    if fbank_config.num_frames(num_samples) == 0:
        raise PreprocessError(
            f'audio is too short: {num_samples} samples at {config.fbank.sample_rate} Hz, the fbank needs at least '
            f'{fbank_config.window_size} ({fbank_config.frame_length_ms:g} ms)')

    clips = []
    for start, end in audio_clip_spans(num_samples, config):
        clip = audio[:, start:end]
        # As the official code: subtract the mean over all channels in place, so a clip overlapping an earlier
        # one sees that clip's shift too; then take the first channel.
        clip -= clip.mean()
        clips.append(clip[0].clone())
    # All clips have the same length: exact fractions keep every span `clip_duration` long (or the whole input).
    mel = kaldi_fbank(torch.stack(clips), fbank_config).transpose(1, 2)  # (clips, mel bins, frames)

    missing = config.target_length - mel.shape[-1]
    if abs(missing) > 0.2 * mel.shape[-1]:
        logger.debug('audio clip has %d fbank frames for a target of %d', mel.shape[-1], config.target_length)
    mel = F.pad(mel, (0, missing)) if missing > 0 else mel[..., :config.target_length]
    mean = torch.tensor(config.mean, dtype=torch.float32)
    std = torch.tensor(config.std, dtype=torch.float32)
    return mel.sub(mean).div_(std).unsqueeze(1)


# --- depth -----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DepthPreprocessConfig:
    """Depth -> ImageBind depth input (see the module docstring for where each number comes from)."""

    baseline_m: float = 0.075  # Kinect stereo baseline
    depth_scale: float = 8.0  # training depths were 8x the physical ones; 1.0 gives physical disparity
    reference_short_side_px: int = 480  # focal lengths are rescaled to this short side (SUN RGB-D frames)
    min_depth_m: float = 0.01  # clip range of the (scaled) depth before inversion
    max_depth_m: float = 50.0
    min_disparity: float = 0.01  # DepthNorm clamp range; the result is divided by max_disparity
    max_disparity: float = 75.0
    mean: float = 0.0418  # standardisation of the [0, 1] disparity
    std: float = 0.0295


def _check_depth(depth_m: np.ndarray) -> np.ndarray:
    if not isinstance(depth_m, np.ndarray):
        raise PreprocessError(f'depth must be a numpy array, got {type(depth_m).__name__}')
    if depth_m.ndim == 3 and depth_m.shape[2] == 1:
        depth_m = depth_m[..., 0]
    if depth_m.ndim != 2:
        raise PreprocessError(f'depth must be (H, W), got shape {depth_m.shape}')
    if depth_m.dtype.kind != 'f':
        raise PreprocessError(f'depth must be float metres, got {depth_m.dtype} (convert 16UC1 millimetres first)')
    if depth_m.size == 0:
        raise PreprocessError(f'depth image is empty: shape {depth_m.shape}')
    return depth_m


def depth_to_disparity(depth_m: np.ndarray, focal_px: float | None = None,
                       config: DepthPreprocessConfig = DepthPreprocessConfig()) -> np.ndarray:
    """Metric depth (H, W) -> Kinect-equivalent disparity in pixels (H, W) float32; 0 where depth is invalid.

    Args:
        depth_m: depth in metres; NaN, inf and values <= 0 mark pixels without a measurement.
        focal_px: focal length of this depth image in pixels; None assumes the Kinect field of view.
    """
    depth_m = _check_depth(depth_m)
    if focal_px is None:
        reference_focal = KINECT_FOCAL_PX
    elif isinstance(focal_px, (int, float, np.number)) and np.isfinite(focal_px) and focal_px > 0:
        reference_focal = focal_px * config.reference_short_side_px / min(depth_m.shape)
    else:
        raise PreprocessError(f'focal_px must be a positive number of pixels, got {focal_px!r}')
    with np.errstate(invalid='ignore'):
        valid = np.isfinite(depth_m) & (depth_m > 0)
    scaled = np.where(valid, depth_m, 1.0) * config.depth_scale
    clipped = np.clip(scaled, config.min_depth_m, config.max_depth_m)
    disparity = np.where(valid, config.baseline_m * reference_focal / clipped, 0.0)
    return disparity.astype(np.float32)


def preprocess_depth(depth_m: np.ndarray, focal_px: float | None = None,
                     config: DepthPreprocessConfig = DepthPreprocessConfig()) -> torch.Tensor:
    """Metric depth image (H, W) -> ImageBind depth input (1, 224, 224) float32.

    Args:
        depth_m: depth in metres (float); NaN, inf and values <= 0 are invalid.
        focal_px: the image's focal length in pixels (e.g. ``PinholeCamera.fx``); None assumes a Kinect-like FOV.
        config: disparity and normalisation constants.
    """
    disparity = torch.from_numpy(depth_to_disparity(depth_m, focal_px, config))
    scaled = disparity.clamp(config.min_disparity, config.max_disparity) / config.max_disparity
    height, width = scaled.shape
    new_height, new_width = _resized_size(height, width, IMAGE_SIZE)
    scaled = scaled[None, None]
    if (new_height, new_width) != (height, width):
        scaled = F.interpolate(scaled, size=(new_height, new_width), mode='bicubic', antialias=True,
                               align_corners=False)
    top, left = _center_crop_offsets(new_height, new_width, IMAGE_SIZE)
    crop = scaled[0, :, top:top + IMAGE_SIZE, left:left + IMAGE_SIZE].clamp(0.0, 1.0)
    return (crop - config.mean) / config.std
