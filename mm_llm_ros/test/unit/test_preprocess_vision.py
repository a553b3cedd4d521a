"""preprocess_vision: parity with the official file-based ImageBind loader, batching and input validation.

Golden tensors come from `scripts/make_golden_fixtures.py` (official `load_and_transform_vision_data`).
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mm_llm_ros.core.imagebind.preprocess import PreprocessError, preprocess_vision

PARITY_ATOL = 1e-5


@pytest.fixture(scope='module')
def golden(fixtures_dir):
    with np.load(fixtures_dir / 'golden' / 'vision.npz') as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope='module')
def sources(golden):
    return json.loads(str(golden['sources']))


def decode(shared_data, source, golden):
    if 'input' in source:
        return golden[source['input']]
    with Image.open(shared_data / source['path']) as image:
        return np.asarray(image.convert('RGB'))


def assert_parity(image, expected, key):
    ours = preprocess_vision(image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=PARITY_ATOL, err_msg=key)


def test_matches_official_loader_on_a_small_synthetic_image(golden):
    assert_parity(golden['synthetic_small_input'], golden['synthetic_small'], 'synthetic_small')  # upscaling path


@pytest.mark.shared_data
def test_matches_official_loader_on_real_images(shared_data, golden, sources):
    real = {key: source for key, source in sources.items() if 'path' in source}
    assert set(real) >= {'imagebind_dog', 'nuscenes_cam_front', 'kitti_000008'}
    for key, source in real.items():
        assert_parity(decode(shared_data, source, golden), golden[key], key)


@pytest.mark.shared_data
def test_batch_of_mixed_sizes_equals_single_calls(shared_data, golden, sources):
    images = [decode(shared_data, sources[key], golden) for key in ('kitti_000008', 'synthetic_small')]
    batch = preprocess_vision(images)
    assert batch.shape == (2, 3, 224, 224)
    for image, row in zip(images, batch):
        assert torch.equal(row, preprocess_vision(image))


def test_4d_array_is_a_batch_and_input_is_not_modified():
    images = np.random.default_rng(0).integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)
    before = images.copy()
    batch = preprocess_vision(images)
    assert batch.shape == (3, 3, 224, 224)
    assert torch.equal(batch[1], preprocess_vision(images[1]))
    np.testing.assert_array_equal(images, before)


def test_strided_read_only_view_is_accepted():
    base = np.random.default_rng(1).integers(0, 256, (40, 60, 4), dtype=np.uint8)
    view = base[:, :, :3]  # e.g. rgba8 with the alpha channel sliced off, as a ROS decoder may hand over
    view.flags.writeable = False
    assert torch.equal(preprocess_vision(view), preprocess_vision(np.ascontiguousarray(view)))


def test_uniform_image_normalises_to_clip_statistics():
    grey = np.full((300, 500, 3), 128, np.uint8)
    out = preprocess_vision(grey)
    expected = (128 / 255 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array(
        [0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize('bad, message', [
    (np.zeros((32, 32), np.uint8), r'\(H, W, 3\)'),
    (np.zeros((32, 32, 4), np.uint8), r'\(H, W, 3\)'),
    (np.zeros((32, 32, 3), np.float32), 'uint8'),
    (np.zeros((0, 32, 3), np.uint8), 'empty'),
    ([[1, 2, 3]], 'numpy array'),
    ([], 'empty batch'),
])
def test_bad_inputs_raise_preprocess_error(bad, message):
    with pytest.raises(PreprocessError, match=message):
        preprocess_vision(bad)


def test_bad_image_in_batch_is_named():
    with pytest.raises(PreprocessError, match='image 1'):
        preprocess_vision([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.int16)])
