"""Text-only adapter tuning (core/llm/tuning.py) and saving adapters in the official layout."""
from __future__ import annotations

import pytest
import torch

from llm_factories import TinySpec, build_model, random_adapter_state_dict, random_meta_state_dict
from mm_llm_ros.core.errors import CheckpointError, ConfigError
from mm_llm_ros.core.llm.assembly import ModelConfig, build_imagebind_llm
from mm_llm_ros.core.llm.checkpoints import (adapter_state_dict, is_language_key, load_adapter_checkpoint,
                                             load_adapter_state_dict, permute_rotary_rows, unpermute_rotary_rows)
from mm_llm_ros.core.llm.tuning import Example, TuningConfig, parameter_kind, select_trainable, tune
from mm_llm_ros.core.params import defaults

SPEC = TinySpec(n_layers=2, n_kv_heads=2)


@pytest.fixture
def states():
    return random_meta_state_dict(SPEC), random_adapter_state_dict(SPEC)


def test_unpermute_inverts_the_rotary_permutation():
    weight = torch.randn(SPEC.dim, 5)
    assert not torch.equal(permute_rotary_rows(weight, SPEC.n_heads), weight)
    assert torch.equal(unpermute_rotary_rows(permute_rotary_rows(weight, SPEC.n_heads), SPEC.n_heads), weight)
    bias = torch.randn(SPEC.dim)
    assert torch.equal(permute_rotary_rows(unpermute_rotary_rows(bias, 2), 2), bias)


def test_saved_adapter_is_the_loaded_file(states):
    """Loading permutes q/k rows into transformers' layout; saving must give the official file back exactly."""
    meta, adapter = states
    saved = adapter_state_dict(build_model(SPEC, meta, adapter))
    assert set(saved) == set(adapter)
    assert all(torch.equal(saved[key], adapter[key]) for key in adapter)


def test_language_side_adapter_loads_alone_and_keeps_the_bind_network(states):
    meta, adapter = states
    tuned = build_model(SPEC, meta, adapter)
    language = adapter_state_dict(tuned, language_only=True)
    assert language and all(is_language_key(key) for key in language)
    assert 'image_bind_proj.weight' not in language and 'llama.layers.0.attention.lora_wq_l1.weight' in language

    fresh = build_model(SPEC, meta, None)
    bind_before = fresh.bind_network.proj.weight.clone()
    load_adapter_state_dict(fresh, language)
    assert torch.equal(fresh.bind_network.proj.weight, bind_before)
    reloaded = adapter_state_dict(fresh, language_only=True)
    assert all(torch.equal(reloaded[key], language[key]) for key in language)
    tokens = torch.tensor([[1, 17, 42, 8]])
    with torch.no_grad():   # no visual features: the language side alone decides the logits
        assert torch.allclose(fresh(input_ids=tokens).logits, tuned(input_ids=tokens).logits, atol=1e-5)


def test_language_side_adapter_missing_a_key_is_rejected(states):
    meta, adapter = states
    language = adapter_state_dict(build_model(SPEC, meta, adapter), language_only=True)
    del language['llama.layers.1.feed_forward.w2.bias']
    with pytest.raises(CheckpointError, match=r'missing llama\.layers\.1\.feed_forward\.w2\.bias'):
        load_adapter_state_dict(build_model(SPEC, meta, None), language)


def test_safetensors_adapter_file_loads_through_the_path(tmp_path, states):
    from safetensors.torch import save_file

    meta, adapter = states
    language = adapter_state_dict(build_model(SPEC, meta, adapter), language_only=True)
    path = tmp_path / 'tuned.safetensors'
    save_file({key: value.half().contiguous() for key, value in language.items()}, str(path))
    model = build_model(SPEC, meta, None)
    load_adapter_checkpoint(model, path)
    assert torch.equal(model.backbone.model.norm.weight, language['llama.norm.weight'].half().float())


def _examples() -> list[Example]:
    generator = torch.Generator().manual_seed(3)
    prompts = torch.randint(3, SPEC.vocab_size, (4, 9), generator=generator).tolist()
    return [Example(prompt, [answer, 2]) for prompt, answer in zip(prompts, (5, 6, 7, 8), strict=True)]


def _loss(model, examples) -> float:
    from mm_llm_ros.core.llm.tuning import answer_loss

    with torch.no_grad():
        return sum(answer_loss(model, example).item() for example in examples) / len(examples)


def test_tuning_learns_the_answers_and_changes_only_the_chosen_kinds(states):
    meta, _ = states
    model = build_model(SPEC, meta, None)
    frozen = {name: p.clone() for name, p in model.named_parameters() if parameter_kind(name) is None}
    untrained_lora = {name: p.clone() for name, p in model.named_parameters() if parameter_kind(name) == 'lora'}
    examples = _examples()
    before = _loss(model, examples)
    losses = tune(model, examples, TuningConfig(steps=30, accumulate=2, warmup_steps=3, learning_rate=1e-2,
                                                kinds=('bias', 'norm')))
    assert len(losses) == 30 and _loss(model, examples) < 0.5 * before
    parameters = dict(model.named_parameters())
    assert all(torch.equal(parameters[name], value) for name, value in frozen.items())      # backbone, bind network
    assert all(torch.equal(parameters[name], value) for name, value in untrained_lora.items())
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_trainable_parameters_are_exactly_the_saved_language_side(states):
    """Everything tuning changes is saved: no tuned parameter is lost when the adapter is written."""
    meta, adapter = states
    model = build_model(SPEC, meta, adapter)
    trainable = select_trainable(model)
    changed = {}
    with torch.no_grad():
        for parameter in trainable.values():
            parameter.add_(1.0)
    saved = adapter_state_dict(model, language_only=True)
    for key, value in saved.items():
        if not torch.equal(value, adapter[key]):
            changed[key] = value
    gates = [key for key in saved if key.endswith('attention.gate')]
    assert len(changed) == len(trainable) == len(saved) - len(gates)
    with pytest.raises(ValueError, match='unknown parameter kinds'):
        select_trainable(model, ('embeddings',))


def test_bundled_adapter_needs_the_embedded_preset():
    params = {**defaults('llm_node'), 'llm.preset': 'tiny', 'llm.adapter_checkpoint': 'grounded-smollm2',
              'device': 'cpu'}
    with pytest.raises(ConfigError, match="bundled adapter; it does not fit llm.preset 'tiny'"):
        build_imagebind_llm(ModelConfig.from_params(params))


def test_learning_rate_warms_up_then_decays_to_zero():
    from mm_llm_ros.core.llm.tuning import scheduled_learning_rate

    config = TuningConfig(steps=100, warmup_steps=10, learning_rate=1e-3)
    rates = [scheduled_learning_rate(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] < 1e-5
