"""Inference-time folding of the ImageBind-LLM adapters (`ImageBindLLM.merge_adapters`) keeps the model's results."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llm_factories import TinySpec, build_backbone, build_model, random_adapter_state_dict, random_meta_state_dict
from mm_llm_ros.core.llm.checkpoints import load_adapter_state_dict
from mm_llm_ros.core.llm.model import AdaptersMergedError, ImageBindLLM, LoRALinear, ModelError

ATOL = 1e-5
MHA = TinySpec()
GQA = TinySpec(n_heads=8, n_kv_heads=2, n_layers=2, query_layers=1)


def _feature(spec: TinySpec, seed: int = 3) -> torch.Tensor:
    return F.normalize(torch.randn(spec.embed_dim, generator=torch.Generator().manual_seed(seed)), dim=0)


def _tokens(spec: TinySpec, count: int, seed: int = 4) -> list[int]:
    return torch.randint(3, spec.vocab_size, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def _visual_vectors(model: ImageBindLLM) -> list[torch.Tensor | None]:
    return [layer.self_attn.o_proj.visual_vector for layer in model.layers]


@torch.no_grad()
def _prompt_then_decode(model: ImageBindLLM, tokens: list[int], prompt_len: int) -> list[torch.Tensor]:
    """Prompt logits, then the last-position logits of each KV-cached single-token step."""
    out = model(input_ids=torch.tensor([tokens[:prompt_len]]), use_cache=True)
    logits = [out.logits[0]]
    for token in tokens[prompt_len:]:
        out = model(input_ids=torch.tensor([[token]]), cache=out.cache, use_cache=True)
        logits.append(out.logits[0, -1])
    return logits


@pytest.fixture(scope='module', params=[MHA, GQA], ids=['mha', 'gqa'])
def pair(request):
    """(spec, unmerged model, merged copy): non-zero gates, LoRA factors and biases from the random adapter."""
    spec = request.param
    model = build_model(spec, random_meta_state_dict(spec), random_adapter_state_dict(spec))
    merged = copy.deepcopy(model)
    merged.merge_adapters()
    return spec, model, merged


def test_merged_logits_equal_unmerged_for_prompt_and_cached_decoding(pair):
    spec, model, merged = pair
    tokens, feature = _tokens(spec, 10), _feature(spec)
    model.set_visual_features(feature)
    merged.set_visual_features(feature)
    expected = _prompt_then_decode(model, tokens, prompt_len=6)
    for ours, reference in zip(_prompt_then_decode(merged, tokens, prompt_len=6), expected, strict=True):
        torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)
    # The adapters changed the weights, and the visual features the logits: the comparison tests both paths.
    q_proj = merged.layers[0].self_attn.q_proj
    assert (q_proj.base.weight - model.layers[0].self_attn.q_proj.base.weight).abs().max() > 1e-2
    merged.set_visual_features(None)
    assert (_prompt_then_decode(merged, tokens, prompt_len=6)[0] - expected[0]).abs().max() > 0.1


def test_visual_vectors_are_the_same_before_and_after_merging(pair):
    spec, model, merged = pair
    feature = _feature(spec, seed=7)
    model.set_visual_features(feature)
    merged.set_visual_features(feature)
    before, after = _visual_vectors(model), _visual_vectors(merged)
    assert [v is None for v in after] == [v is None for v in before]
    assert sum(v is not None for v in after) == spec.n_queries
    for ours, reference in zip(after, before, strict=True):
        if reference is not None:
            torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_features_set_before_merging_stay_valid():
    spec = MHA
    model = build_model(spec, random_meta_state_dict(spec), random_adapter_state_dict(spec))
    tokens = _tokens(spec, 5)
    model.set_visual_features(_feature(spec))
    vectors = _visual_vectors(model)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([tokens])).logits
        model.merge_adapters()
        logits = model(input_ids=torch.tensor([tokens])).logits
    assert all(ours is reference for ours, reference in zip(_visual_vectors(model), vectors, strict=True))
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_merged_token_forward_runs_no_lora_matmul():
    spec = MHA
    model = build_model(spec, random_meta_state_dict(spec), random_adapter_state_dict(spec))
    model.merge_adapters()
    calls: list[str] = []
    for name, module in model.named_modules():
        if name.endswith(('lora_a', 'lora_b')):
            module.register_forward_hook(lambda *_, name=name: calls.append(name))
    with torch.no_grad():
        model(input_ids=torch.tensor([_tokens(spec, 4)]))
    assert calls == []
    # Only the visual path (base wv = merged wv - B A) still uses the factors, once per query and injected layer.
    model.set_visual_features(_feature(spec))
    assert len(calls) == 2 * spec.n_queries
    assert all('.v_proj.' in name for name in calls)
    q_proj = model.layers[0].self_attn.q_proj
    assert q_proj.base.bias is q_proj.bias  # the tuned bias is the base layer's bias, not a copy


def _module_calls_per_forward(model: torch.nn.Module, tokens: list[int]) -> int:
    calls = 0

    def count(*_) -> None:
        nonlocal calls
        calls += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([tokens]))
    finally:
        handle.remove()
    return calls


def test_merged_token_forward_makes_the_plain_backbones_module_calls():
    # On small models the per-token cost is mostly Python: a merged, injected model must not add module calls.
    spec = MHA
    meta = random_meta_state_dict(spec)
    plain = build_backbone(spec, meta).eval()
    model = build_model(spec, meta, random_adapter_state_dict(spec))
    model.set_visual_features(_feature(spec))
    tokens = _tokens(spec, 3)
    unmerged_calls = _module_calls_per_forward(model.backbone, tokens)
    model.merge_adapters()
    assert _module_calls_per_forward(model.backbone, tokens) == _module_calls_per_forward(plain, tokens)
    assert unmerged_calls > _module_calls_per_forward(plain, tokens)


def test_merged_visual_vector_lives_in_the_output_bias_and_follows_each_query(pair):
    spec, model, merged = pair
    tokens = _tokens(spec, 6)
    outputs = {}
    for seed in (11, 12):  # a second query after a forward: the folded bias must not be stale
        model.set_visual_features(_feature(spec, seed))
        merged.set_visual_features(_feature(spec, seed))
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([tokens])).logits
            outputs[seed] = merged(input_ids=torch.tensor([tokens])).logits
        torch.testing.assert_close(outputs[seed], expected, atol=ATOL, rtol=0)
        o_proj = merged.injected_layers[0].self_attn.o_proj
        torch.testing.assert_close(o_proj.served.bias, o_proj.proj.bias + o_proj.visual_vector)
        assert o_proj.served.weight is o_proj.proj.base.weight
    assert (outputs[11] - outputs[12]).abs().max() > 1e-3


def test_merge_adapters_is_idempotent():
    spec = MHA
    model = build_model(spec, random_meta_state_dict(spec), random_adapter_state_dict(spec))
    assert not model.merged
    model.merge_adapters()
    weights = {name: tensor.clone() for name, tensor in model.named_parameters()}
    model.merge_adapters()
    assert model.merged
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.named_parameters())


def test_lora_linear_merge_folds_weight_and_both_biases():
    # A base layer with its own bias (not LLaMA, but LoRALinear allows it): both biases end up in base.bias.
    base = torch.nn.Linear(6, 5, bias=True)
    layer = LoRALinear(base, rank=2, bias=True)
    with torch.no_grad():
        layer.bias.normal_()
        layer.lora_b.weight.normal_()
    x = torch.randn(3, 6)
    expected = layer(x), layer.linear_map(x), layer.base_output(x)
    layer.merge()
    for ours, reference in zip((layer(x), layer.linear_map(x), layer.base_output(x)), expected, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_merge_rounds_once_from_float32_in_low_precision():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(64, 32, bias=False), rank=4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.lora_b.weight.normal_()
    a, b, w = (t.detach().clone() for t in (layer.lora_a.weight, layer.lora_b.weight, layer.base.weight))
    layer.merge()
    assert layer.base.weight.dtype == torch.bfloat16
    assert torch.equal(layer.base.weight, (w.float() + b.float() @ a.float()).bfloat16())


def test_merged_model_refuses_adapter_loading_and_saving():
    spec = MHA
    adapter = random_adapter_state_dict(spec)
    model = build_model(spec, random_meta_state_dict(spec), adapter)
    model.merge_adapters()
    weights = {name: tensor.clone() for name, tensor in model.named_parameters()}
    with pytest.raises(AdaptersMergedError, match='cannot load the adapter <state dict>.*merged'):
        load_adapter_state_dict(model, adapter)
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.named_parameters())
    with pytest.raises(AdaptersMergedError, match='save or load weights'):
        model.state_dict()
    with pytest.raises(AdaptersMergedError, match='save or load weights'):
        model.backbone.load_state_dict({}, strict=False)
    assert issubclass(AdaptersMergedError, ModelError)
    # Parts that hold no merged projection can still be saved.
    assert set(model.bind_network.state_dict()) >= {'proj.weight', 'proj.bias'}


def test_build_answerer_merges_the_adapters():
    from mm_llm_ros.core.llm.pipeline import LLMConfig, build_answerer

    answerer = build_answerer(LLMConfig.from_params({'llm.preset': 'tiny', 'device': 'cpu', 'dtype': 'float32'}))
    assert answerer.model.merged
    assert answerer.sensors_inform_answers  # the tiny preset's gates are open: the visual path is still live
