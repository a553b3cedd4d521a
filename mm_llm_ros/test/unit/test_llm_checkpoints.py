"""Loading Meta LLaMA, Hugging Face LLaMA and ImageBind-LLM adapter files, and refusing bad ones."""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from llm_factories import (
    TinySpec,
    build_model,
    random_adapter_state_dict,
    random_meta_state_dict,
    write_adapter,
    write_hf_llama,
    write_meta_llama,
)
from mm_llm_ros.core.errors import CheckpointError
from mm_llm_ros.core.llm.assembly import ModelConfig, build_imagebind_llm
from mm_llm_ros.core.llm.checkpoints import find_meta_llama, load_adapter_checkpoint, load_meta_llama
from mm_llm_ros.core.params import defaults
from mm_llm_ros.core.weights import load_weights
from mm_llm_ros.core.llm.model import ImageBindLLM
from mm_llm_ros.core.llm.tokenizer import HFTokenizer, SentencePieceTokenizer, TextTokenizer, TokenizerError

SPEC = TinySpec(n_layers=2)
TOKENS = [1, 17, 42, 8, 99, 23]


@pytest.fixture(scope='module')
def states():
    return random_meta_state_dict(SPEC), random_adapter_state_dict(SPEC)


@pytest.fixture(scope='module')
def files(tmp_path_factory, states):
    """Official layout on disk: llama/7B/consolidated.00.pth + params.json, llama/tokenizer.model, adapter.pth."""
    root = tmp_path_factory.mktemp('weights')
    meta, adapter = states
    llama = write_meta_llama(root / 'llama', SPEC, meta)
    return llama, write_adapter(root / 'adapter.pth', adapter, SPEC)


@pytest.fixture(scope='module')
def direct_logits(states):
    """Logits of the same weights assembled in memory, without any file."""
    model = build_model(SPEC, *states)
    model.set_visual_features(_feature())
    return _logits(model)


def _feature() -> torch.Tensor:
    return torch.randn(SPEC.embed_dim, generator=torch.Generator().manual_seed(7))


def _logits(model: ImageBindLLM) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([TOKENS])).logits[0]


def load_imagebind_llm(llama, adapter, dtype: str = 'float32'):
    """The files assembled as llm_node assembles them, adapters left unmerged (what was loaded, as loaded)."""
    params = {**defaults('llm_node'), 'llm.backbone_path': str(llama), 'llm.adapter_checkpoint': str(adapter or ''),
              'device': 'cpu', 'dtype': dtype, 'embedding_dim': SPEC.embed_dim}
    assembled = build_imagebind_llm(ModelConfig.from_params(params), SPEC.adapter_config(), merge=False)
    return assembled.model, assembled.tokenizer


def _loaded_logits(llama, adapter) -> torch.Tensor:
    model, _ = load_imagebind_llm(llama, adapter)
    model.set_visual_features(_feature())
    return _logits(model)


def test_official_meta_layout_and_adapter_file_load_to_the_directly_assembled_model(files, direct_logits):
    llama, adapter = files
    model, tokenizer = load_imagebind_llm(llama, adapter)
    assert not model.training
    model.set_visual_features(_feature())
    assert torch.equal(_logits(model), direct_logits)
    assert isinstance(tokenizer, SentencePieceTokenizer) and isinstance(tokenizer, TextTokenizer)
    ids = tokenizer.encode('a red ball on the table', bos=True)
    assert ids[0] == tokenizer.bos_id == 1 and tokenizer.eos_id == 2
    assert tokenizer.decode(ids) == 'a red ball on the table'
    assert tokenizer.encode('a red ball', bos=False, eos=True)[-1] == 2


def test_meta_directory_can_be_given_directly_or_by_model_size(files):
    llama, _ = files
    assert find_meta_llama(llama / '7B') == find_meta_llama(llama, '7B') == find_meta_llama(llama)
    backbone, _ = load_meta_llama(llama / '7B')
    assert backbone.config.intermediate_size == SPEC.ffn_dim
    assert backbone.config.rms_norm_eps == SPEC.norm_eps


def test_model_parallel_shards_are_merged(tmp_path, states, files, direct_logits):
    llama = write_meta_llama(tmp_path / 'llama', SPEC, states[0], shards=2)
    assert len(find_meta_llama(llama).shards) == 2
    assert torch.equal(_loaded_logits(llama, files[1]), direct_logits)


def test_hugging_face_directory_round_trip(tmp_path, files, direct_logits):
    llama, adapter = files
    backbone, _ = load_meta_llama(llama)
    hf_dir = write_hf_llama(tmp_path / 'hf', backbone, llama / 'tokenizer.model')
    assert (hf_dir / 'model.safetensors').is_file()
    model, tokenizer = load_imagebind_llm(hf_dir, adapter)
    model.set_visual_features(_feature())
    assert torch.equal(_logits(model), direct_logits)
    assert isinstance(tokenizer, HFTokenizer)
    sentencepiece = SentencePieceTokenizer(llama / 'tokenizer.model')
    assert tokenizer.encode('the red fox', bos=True) == sentencepiece.encode('the red fox', bos=True)


def test_weights_load_in_the_requested_dtype(files, direct_logits):
    model, _ = load_imagebind_llm(*files, dtype='bfloat16')
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.set_visual_features(_feature())
    torch.testing.assert_close(_logits(model).float(), direct_logits, atol=0.15, rtol=0.05)


def test_bare_adapter_state_dict_is_accepted(tmp_path, states, files, direct_logits):
    path = tmp_path / 'bare.pth'
    torch.save(states[1], path)
    assert torch.equal(_loaded_logits(files[0], path), direct_logits)


def test_without_adapter_the_model_is_the_plain_backbone(files):
    llama, _ = files
    model, _ = load_imagebind_llm(llama, None)
    backbone, _ = load_meta_llama(llama)
    model.set_visual_features(_feature())
    with torch.no_grad():
        assert torch.equal(_logits(model), backbone(input_ids=torch.tensor([TOKENS])).logits[0])


def _edited_adapter(tmp_path, states, edit) -> os.PathLike:
    state = dict(states[1])
    edit(state)
    return write_adapter(tmp_path / 'edited.pth', state, SPEC)


def _fresh_model(files) -> ImageBindLLM:
    backbone, _ = load_meta_llama(files[0])
    return ImageBindLLM(backbone, SPEC.adapter_config())


def test_adapter_with_missing_keys_is_rejected_with_the_keys(tmp_path, states, files):
    def drop(state):
        del state['llama.layers.1.attention.gate']
        del state['image_bind_f2_3.weight']
    path = _edited_adapter(tmp_path, states, drop)
    expected = r'missing image_bind_f2_3\.weight, llama\.layers\.1\.attention\.gate'
    with pytest.raises(CheckpointError, match=expected) as err:
        load_adapter_checkpoint(_fresh_model(files), path)
    assert str(path) in str(err.value)


def test_adapter_with_unexpected_keys_is_rejected(tmp_path, states, files):
    path = _edited_adapter(tmp_path, states, lambda s: s.update({'llama.layers.0.attention.wk.bias': torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r'unexpected llama\.layers\.0\.attention\.wk\.bias'):
        load_adapter_checkpoint(_fresh_model(files), path)


def test_adapter_for_a_wider_backbone_is_rejected_with_shapes(tmp_path, files):
    wide = TinySpec(n_layers=SPEC.n_layers, dim=96)
    path = write_adapter(tmp_path / 'wide.pth', random_adapter_state_dict(wide), wide)
    with pytest.raises(CheckpointError, match=r'image_bind_proj\.weight: expected \(64, 16\), got \(96, 16\)') as err:
        load_adapter_checkpoint(_fresh_model(files), path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize('content', [b'', random.Random(0).randbytes(256), b'PK\x03\x04 truncated zip'],
                         ids=['empty', 'random', 'zip'])
def test_corrupt_files_raise_checkpoint_error_naming_the_file(tmp_path, content):
    path = tmp_path / 'broken.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match='not a readable PyTorch checkpoint') as err:
        load_weights(path)
    assert str(path) in str(err.value)


def test_truncated_checkpoint_raises_checkpoint_error(tmp_path, files):
    data = (files[0] / '7B' / 'consolidated.00.pth').read_bytes()
    path = tmp_path / 'consolidated.00.pth'
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='not a readable PyTorch checkpoint'):
        load_weights(path)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), 'w')


def test_code_carrying_pickle_is_refused_without_running_it(tmp_path, states):
    marker = tmp_path / 'code-ran'
    path = tmp_path / 'evil.pth'
    torch.save({'model': {**states[1], 'payload': _RunsCode(marker)}}, path)
    with pytest.raises(CheckpointError, match='refused to load'):
        load_weights(path)
    assert not marker.exists()


def test_meta_directory_problems_are_reported(tmp_path, files, states):
    llama, _ = files
    with pytest.raises(CheckpointError, match='not found'):
        load_meta_llama(tmp_path / 'nowhere')
    other = tmp_path / 'llama'
    shutil.copytree(llama, other)
    shutil.copytree(other / '7B', other / '13B')
    with pytest.raises(CheckpointError, match=r'several models \(13B, 7B\)'):
        find_meta_llama(other)
    (other / 'tokenizer.model').unlink()
    with pytest.raises(CheckpointError, match=r'tokenizer\.model not found'):
        find_meta_llama(other, '7B')


def test_meta_checkpoint_must_match_params(tmp_path, states):
    meta = dict(states[0])
    del meta['layers.1.feed_forward.w2.weight']
    llama = write_meta_llama(tmp_path / 'llama', SPEC, meta)
    with pytest.raises(CheckpointError, match=r'missing layers\.1\.feed_forward\.w2\.weight') as err:
        load_meta_llama(llama)
    assert 'consolidated.00.pth' in str(err.value)

    params = json.loads((llama / '7B' / 'params.json').read_text())
    params['multiple_of'] = 128  # FFN width 256 instead of 192
    (llama / '7B' / 'params.json').write_text(json.dumps(params))
    torch.save(states[0], llama / '7B' / 'consolidated.00.pth')
    with pytest.raises(CheckpointError, match=r'layers\.0\.feed_forward\.w1\.weight: expected \(256, 64\), '
                                              r'got \(192, 64\)'):
        load_meta_llama(llama)


def test_meta_vocabulary_must_match_the_tokenizer(tmp_path, states):
    meta = dict(states[0])
    meta['tok_embeddings.weight'] = torch.zeros(SPEC.vocab_size + 5, SPEC.dim)
    with pytest.raises(CheckpointError, match=r'105 token embeddings but .*tokenizer\.model has 100 pieces'):
        load_meta_llama(write_meta_llama(tmp_path / 'llama', SPEC, meta))


def test_non_llama_hugging_face_directory_is_rejected(tmp_path):
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
    with pytest.raises(CheckpointError, match="model_type is 'gpt2'"):
        load_imagebind_llm(tmp_path, None)


def test_bad_tokenizer_files_raise_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match='not found'):
        SentencePieceTokenizer(tmp_path / 'missing.model')
    (tmp_path / 'bad.model').write_bytes(b'not a sentencepiece model')
    with pytest.raises(TokenizerError, match='not a readable SentencePiece model'):
        SentencePieceTokenizer(tmp_path / 'bad.model')
