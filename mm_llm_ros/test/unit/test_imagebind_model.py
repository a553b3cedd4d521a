"""ImageBind encoder core: official-architecture import, config, checkpoint safety, equivalence and sharing."""
import ast
import importlib.util
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mm_llm_ros.core.errors import CheckpointError, ConfigError, DeviceError
from mm_llm_ros.core.imagebind import official
from mm_llm_ros.core.imagebind.model import (HUGE_KWARGS, EncodeError, ImageBindConfig, ImageBindEncoder,
                                             get_shared_encoder, parse_overrides, release_shared_encoders)

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ImageBindConfig(preset='tiny', allow_random_weights=True, device='cpu')


def make_inputs(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tensors shaped like preprocessed vision, audio (3 clips) and depth batches."""
    gen = torch.Generator().manual_seed(seed)
    return {
        'vision': torch.randn(batch, 3, 224, 224, generator=gen),
        'audio': torch.randn(batch, 3, 1, 128, 204, generator=gen),
        'depth': torch.randn(batch, 1, 224, 224, generator=gen),
    }


def official_model(seed: int, **overrides) -> torch.nn.Module:
    """The published ImageBindModel with the tiny preset's arguments, built directly from the official class."""
    torch.manual_seed(seed)
    return official.model_class()(**{**TINY.model_kwargs(), **overrides}).eval()


@pytest.fixture(scope='module')
def inputs():
    return make_inputs()


@pytest.fixture(scope='module')
def random_encoder():
    return ImageBindEncoder(TINY)


@pytest.fixture(scope='module')
def reference():
    """An official model with its own weights, saved in the official checkpoint format (a plain state_dict)."""
    return official_model(seed=123)


@pytest.fixture(scope='module')
def checkpoint(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp('ckpt') / 'imagebind_tiny.pth'
    torch.save(reference.state_dict(), path)
    return path


@pytest.fixture(scope='module')
def loaded_encoder(checkpoint):
    return ImageBindEncoder(ImageBindConfig(preset='tiny', checkpoint=str(checkpoint), device='cpu'))


@pytest.fixture
def shared_cache():
    release_shared_encoders()
    yield
    release_shared_encoders()


# --- importing the official code -----------------------------------------------------------------------------------


def test_import_is_light_and_random_init_is_reproducible_across_processes(random_encoder, inputs, tmp_path):
    torch.save(inputs['vision'], tmp_path / 'vision.pt')
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import torch
        from mm_llm_ros.core.imagebind.model import ImageBindConfig, ImageBindEncoder
        heavy = ('imagebind.data', 'torchvision', 'torchaudio', 'pytorchvideo', 'timm')
        loaded = lambda: sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy))
        after_import = loaded()
        encoder = ImageBindEncoder(ImageBindConfig(preset='tiny', allow_random_weights=True, device='cpu'))
        vision = torch.load({str(tmp_path / 'vision.pt')!r}, weights_only=True)
        np.save({str(tmp_path / 'vision.npy')!r}, encoder.encode({{'vision': vision}})['vision'])
        print(json.dumps({{'after_import': after_import, 'after_encode': loaded()}}))
    """)
    env = {**os.environ, 'PYTHONPATH': str(PACKAGE_ROOT)}
    result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {'after_import': [], 'after_encode': []}
    np.testing.assert_array_equal(np.load(tmp_path / 'vision.npy'), random_encoder.encode(inputs)['vision'])


def test_missing_official_code_is_explained(monkeypatch):
    monkeypatch.delitem(sys.modules, official.MODEL_MODULE, raising=False)
    monkeypatch.delitem(sys.modules, official.OFFICIAL_PACKAGE, raising=False)
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(official.DependencyError, match='pip install --no-deps imagebind-unofficial'):
        official.load_model_module()


def test_huge_preset_is_the_official_imagebind_huge():
    source = textwrap.dedent(inspect.getsource(official.load_model_module().imagebind_huge))
    call = next(node for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Call) and getattr(node.func, 'id', '') == 'ImageBindModel')
    assert {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords} == HUGE_KWARGS


def test_timm_stand_in_matches_timm_semantics():
    x = torch.ones(1000, 3)
    layer = official.DropPath(0.25)
    assert layer.eval()(x) is x
    out = layer.train()(x)
    assert torch.equal(out, out[:, :1].expand_as(out))  # whole samples are dropped or kept
    kept = out[:, 0]
    assert set(kept.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}  # survivors rescaled by 1/keep
    assert 0.15 < (kept == 0).float().mean() < 0.35
    assert set(official.DropPath(0.25, scale_by_keep=False).train()(x).unique().tolist()) <= {0.0, 1.0}
    values = official.trunc_normal_(torch.empty(10000), std=0.5, a=-1.0, b=1.0)
    assert values.min() >= -1.0 and values.max() <= 1.0 and 0.4 < values.std() < 0.5
    assert 'timm' not in sys.modules or not sys.modules['timm'].__doc__.startswith('mm_llm_ros stand-in')


# --- configuration -------------------------------------------------------------------------------------------------


def test_parse_overrides_accepts_model_kwargs():
    overrides = parse_overrides('{"vision_num_blocks": 4, "kernel_size": [2, 14, 14], "audio_drop_path": 0}')
    assert overrides == {'vision_num_blocks': 4, 'kernel_size': (2, 14, 14), 'audio_drop_path': 0.0}
    assert parse_overrides('') == {} and parse_overrides('  ') == {}


@pytest.mark.parametrize('text, message', [
    ('{"vision_num_blocks": 4', 'not valid JSON'),
    ('[1, 2]', 'must be a JSON object'),
    ('{"vision_layers": 4}', "unknown ImageBind override(s): vision_layers"),
    ('{"vision_num_blocks": "4"}', "'vision_num_blocks' must be an integer"),
    ('{"vision_num_blocks": true}', "'vision_num_blocks' must be an integer"),
    ('{"kernel_size": [2, 14]}', "'kernel_size' must be a list of 3 integers"),
])
def test_parse_overrides_rejects_bad_input_clearly(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_overrides(text)


def test_config_rejects_unknown_preset_and_unbuildable_overrides():
    with pytest.raises(ConfigError, match="preset must be one of huge, tiny, got 'giant'"):
        ImageBindConfig(preset='giant')
    config = ImageBindConfig(preset='tiny', overrides={'vision_num_heads': 5}, allow_random_weights=True)
    with pytest.raises(ConfigError, match='cannot build ImageBindModel'):
        ImageBindEncoder(config)


def test_overrides_change_the_architecture(inputs):
    encoder = ImageBindEncoder(ImageBindConfig(preset='tiny', overrides=parse_overrides('{"out_embed_dim": 64}'),
                                               allow_random_weights=True, device='cpu'))
    assert encoder.embedding_dim == 64
    assert encoder.model_name == 'imagebind_tiny (custom) (random weights)'
    assert encoder.encode({'depth': inputs['depth']})['depth'].shape == (2, 64)


def test_tiny_preset_is_small_and_keeps_official_outputs(random_encoder, inputs):
    params = sum(p.numel() for p in official_model(seed=0).parameters())
    assert 1e6 < params < 5e6
    assert random_encoder.embedding_dim == 1024
    out = random_encoder.encode(inputs)
    assert set(out) == {'vision', 'audio', 'depth'}
    assert all(v.shape == (2, 1024) and v.dtype == np.float32 for v in out.values())
    # Official postprocessing: vision is unit norm, depth is scaled by a fixed logit scale of 5.
    np.testing.assert_allclose(np.linalg.norm(out['vision'], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out['depth'], axis=1), 5.0, rtol=1e-5)


# --- checkpoints ---------------------------------------------------------------------------------------------------


def test_official_checkpoint_gives_the_official_models_embeddings(loaded_encoder, reference, random_encoder,
                                                                  inputs):
    assert (loaded_encoder.model_name, loaded_encoder.random_weights) == ('imagebind_tiny', False)
    ours = loaded_encoder.encode(inputs)
    with torch.inference_mode():
        expected = reference(dict(inputs))
    for modality, embedding in ours.items():
        np.testing.assert_allclose(embedding, expected[modality].numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(ours['vision'], random_encoder.encode(inputs)['vision'])


def test_official_checkpoint_on_golden_inputs(loaded_encoder, reference, fixtures_dir):
    """Officially preprocessed real images and sounds (from scripts/make_golden_fixtures.py) embed identically."""
    golden = fixtures_dir / 'golden'
    if not (golden / 'vision.npz').is_file() or not (golden / 'audio.npz').is_file():
        pytest.skip('golden fixtures not generated')
    batch = {}
    for modality, sample in (('vision', (3, 224, 224)), ('audio', (3, 1, 128, 204))):
        with np.load(golden / f'{modality}.npz') as arrays:
            batch[modality] = torch.from_numpy(np.stack([arrays[k] for k in arrays.files
                                                         if arrays[k].shape == sample]))
    ours = loaded_encoder.encode(batch)
    with torch.inference_mode():
        expected = reference(dict(batch))
    for modality, embedding in ours.items():
        assert embedding.shape == (len(batch[modality]), 1024)
        np.testing.assert_allclose(embedding, expected[modality].numpy(), rtol=1e-6, atol=1e-6)


def test_safetensors_checkpoint_loads(reference, inputs, tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / 'imagebind_tiny.safetensors'
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    encoder = ImageBindEncoder(ImageBindConfig(preset='tiny', checkpoint=str(path), device='cpu'))
    with torch.inference_mode():
        expected = reference({'depth': inputs['depth']})['depth'].numpy()
    np.testing.assert_allclose(encoder.encode({'depth': inputs['depth']})['depth'], expected, rtol=1e-6, atol=1e-6)


def test_missing_checkpoint_is_named(tmp_path):
    path = tmp_path / 'nope.pth'
    with pytest.raises(CheckpointError, match=re.escape(f"'{path}' does not exist")):
        ImageBindEncoder(ImageBindConfig(preset='tiny', checkpoint=str(path)))


def test_corrupt_checkpoint_is_named(checkpoint, tmp_path):
    path = tmp_path / 'truncated.pth'
    path.write_bytes(checkpoint.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read ImageBind checkpoint '{path}' (corrupt")):
        ImageBindEncoder(ImageBindConfig(preset='tiny', checkpoint=str(path)))


def test_wrapped_checkpoint_is_not_a_state_dict(reference, tmp_path):
    path = tmp_path / 'wrapped.pth'
    torch.save({'model': reference.state_dict(), 'epoch': 3}, path)
    expected = f"'{path}' is not a plain state_dict of tensors (found keys epoch, model)"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        ImageBindEncoder(ImageBindConfig(preset='tiny', checkpoint=str(path)))


def test_mismatched_checkpoint_lists_keys_and_shapes(tmp_path):
    state = official_model(seed=0, out_embed_dim=64).state_dict()
    del state['modality_preprocessors.vision.cls_token']
    state['extra.weight'] = torch.zeros(1)
    path = tmp_path / 'other.pth'
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        ImageBindEncoder(ImageBindConfig(preset='tiny', checkpoint=str(path)))
    message = str(info.value)
    assert f"'{path}' does not fit the imagebind_tiny architecture" in message
    assert '1 missing keys: modality_preprocessors.vision.cls_token' in message
    assert '1 unexpected keys: extra.weight' in message
    # Six heads project to 64 instead of 1024: five are listed, the sixth is counted.
    assert '6 shape mismatches (checkpoint != model): modality_heads.audio.2.weight (64, 64) != (1024, 64)' in message
    assert 'and 1 more' in message


class _Payload:
    """Unpickling this runs a shell command, as a malicious checkpoint would."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > '{self.marker}'",)


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'modality_heads.vision.2.weight': _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=re.escape(f"refused to load ImageBind checkpoint '{path}' for safety")):
        ImageBindEncoder(ImageBindConfig(preset='tiny', checkpoint=str(path)))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # proves the payload is live: an unsafe load does run it
    assert marker.exists()


def test_random_weights_need_explicit_consent(caplog):
    with pytest.raises(CheckpointError, match=r'set model\.checkpoint .* or set model\.allow_random_weights'):
        ImageBindEncoder(ImageBindConfig(preset='tiny'))
    encoder = ImageBindEncoder(TINY)
    assert (encoder.model_name, encoder.random_weights) == ('imagebind_tiny (random weights)', True)
    assert any('RANDOM weights' in r.getMessage() and r.levelname == 'WARNING' for r in caplog.records)


def test_seed_controls_random_init_without_touching_global_rng(random_encoder, inputs):
    audio = {'audio': inputs['audio']}
    rng_state = torch.get_rng_state()
    same = ImageBindEncoder(TINY).encode(audio)['audio']
    other = ImageBindEncoder(ImageBindConfig(preset='tiny', allow_random_weights=True, seed=1)).encode(audio)['audio']
    assert torch.equal(torch.get_rng_state(), rng_state)
    reference = random_encoder.encode(audio)['audio']
    np.testing.assert_array_equal(same, reference)
    assert not np.allclose(other, reference)


# --- device, dtype and sharing -------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the error on a machine without CUDA')
def test_cuda_without_cuda_is_a_device_error():
    with pytest.raises(DeviceError, match="device 'cuda' requested but CUDA is not available"):
        ImageBindEncoder(ImageBindConfig(preset='tiny', allow_random_weights=True, device='cuda'))


@pytest.mark.skipif(torch.cuda.is_available(), reason='auto picks CUDA there')
def test_auto_dtype_is_float32_on_cpu():
    encoder = ImageBindEncoder(ImageBindConfig(preset='tiny', allow_random_weights=True))
    assert (encoder.device, encoder.dtype) == (torch.device('cpu'), torch.float32)


def test_bfloat16_model_returns_float32_embeddings(random_encoder, inputs):
    encoder = ImageBindEncoder(ImageBindConfig(preset='tiny', allow_random_weights=True, dtype='bfloat16'))
    low, full = encoder.encode(inputs)['vision'], random_encoder.encode(inputs)['vision']
    assert low.dtype == np.float32
    cosine = (low * full).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(full, axis=1)
    assert np.all(cosine > 0.99)


def test_shared_encoder_is_one_per_resolved_config(shared_cache):
    first = get_shared_encoder(TINY)
    assert get_shared_encoder(ImageBindConfig(preset='tiny', allow_random_weights=True, device='cpu')) is first
    if not torch.cuda.is_available():
        assert get_shared_encoder(ImageBindConfig(preset='tiny', allow_random_weights=True)) is first
    assert get_shared_encoder(ImageBindConfig(preset='tiny', allow_random_weights=True, seed=7)) is not first
    release_shared_encoders()
    assert get_shared_encoder(TINY) is not first


def test_concurrent_encodes_match_serial_ones(random_encoder):
    batches = [{'depth': make_inputs(batch=1, seed=s)['depth']} for s in range(6)]
    serial = [random_encoder.encode(b)['depth'] for b in batches]
    start = threading.Barrier(len(batches))

    def encode(batch):
        start.wait(timeout=60)  # release all threads together so their calls overlap
        return random_encoder.encode(batch)['depth']

    with ThreadPoolExecutor(max_workers=len(batches)) as pool:
        parallel = list(pool.map(encode, batches))
    for got, want in zip(parallel, serial, strict=True):
        np.testing.assert_array_equal(got, want)


# --- encode --------------------------------------------------------------------------------------------------------


def test_audio_clips_are_averaged(random_encoder, inputs):
    clips = inputs['audio'][:1]  # (1, 3, 1, 128, 204)
    together = random_encoder.encode({'audio': clips})['audio']
    separately = random_encoder.encode({'audio': clips[0]})['audio']  # the 3 clips as a batch of 3
    np.testing.assert_allclose(together[0], separately.mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('batch, message', [
    ({'lidar': torch.zeros(1, 3)}, "unknown modality 'lidar'"),
    ({'vision': np.zeros((1, 3, 224, 224), np.float32)}, 'vision input must be a torch.Tensor, got ndarray'),
    ({'vision': torch.zeros(3, 224, 224)}, r'vision input must have shape \(B, 3, 224, 224\) or \(B, S, 3, 224, 224\)'),
    ({'depth': torch.zeros(1, 1, 112, 112)}, r'depth input must have shape .* got \(1, 1, 112, 112\)'),
    ({'audio': torch.zeros(0, 1, 128, 204)}, 'audio input must have shape'),
    ({'depth': torch.zeros(1, 1, 224, 224, dtype=torch.uint8)}, 'depth input must be a floating point tensor'),
    ({'depth': torch.full((1, 1, 224, 224), float('nan'))}, 'depth input contains NaN'),
    ({'text': torch.zeros(1, 77)}, 'text input must be int64 token ids'),
])
def test_bad_batches_raise_encode_errors(random_encoder, batch, message):
    with pytest.raises(EncodeError, match=message):
        random_encoder.encode(batch)


def test_empty_batch_encodes_to_nothing(random_encoder):
    assert random_encoder.encode({}) == {}
