"""ImageBindLLM against a slow re-statement of the official formulation, on tiny random models."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from llm_factories import TinySpec, build_backbone, build_model, random_adapter_state_dict, random_meta_state_dict
from mm_llm_ros.core.llm.model import (
    BindNetwork,
    ImageBindLLM,
    ImageBindLLMConfig,
    LoRALinear,
    ModelError,
)

ATOL = 1e-4
MHA = TinySpec()
GQA = TinySpec(n_heads=8, n_kv_heads=2, n_layers=2, rope_theta=1e6)  # Llama-2-70B / CodeLlama-style params


class OfficialReference:
    """The official ImageBind-LLM forward (imagebind_LLM/llama), restated plainly in float64.

    Meta weight layout, complex RoPE on interleaved pairs, full recomputation without a KV cache, the adapter value
    wv(F(f) + p_l) per head times tanh(gate) added to every attention output before wo, LoRA and biases as in the
    official Attention/FeedForward. Key/value heads are repeated to the query heads for GQA (transformers'
    repeat_kv), which is the identity for the official multi-head 7B.
    """

    def __init__(self, spec: TinySpec, meta: dict, adapter: dict) -> None:
        self.spec = spec
        self.meta = {k: v.double() for k, v in meta.items()}
        self.adapter = {k: v.double() for k, v in adapter.items()}

    def _rms(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def _rope(self, x: torch.Tensor) -> torch.Tensor:  # (T, heads, hd), pairs (x0, x1), (x2, x3)...
        seq, heads, hd = x.shape
        freqs = 1.0 / (self.spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        angles = torch.outer(torch.arange(seq, dtype=torch.float64), freqs)
        cis = torch.polar(torch.ones_like(angles), angles)[:, None, :]
        rotated = torch.view_as_complex(x.reshape(seq, heads, hd // 2, 2).contiguous()) * cis
        return torch.view_as_real(rotated).reshape(seq, heads, hd)

    def _linear(self, x: torch.Tensor, layer: int, module: str, lora: str, bias: bool) -> torch.Tensor:
        """Official Linear (+ bias when tuned) + lora_l2(lora_l1(x))."""
        a = self.adapter
        p = f'llama.layers.{layer}.'
        y = x @ self.meta[f'layers.{layer}.{module}.weight'].T
        if bias:
            y = y + a[f'{p}{module}.bias']
        return y + x @ a[f'{p}{lora}_l1.weight'].T @ a[f'{p}{lora}_l2.weight'].T

    def bind(self, feature: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        x = feature.double() @ a['image_bind_proj.weight'].T + a['image_bind_proj.bias']
        for b in range(1, self.spec.bind_blocks + 1):
            n = self._rms(x, a[f'image_bind_norm_{b}.weight'], 1e-6)
            x = x + (F.silu(n @ a[f'image_bind_f1_{b}.weight'].T) * (n @ a[f'image_bind_f3_{b}.weight'].T)) \
                @ a[f'image_bind_f2_{b}.weight'].T
        return x

    def logits(self, tokens: list[int], feature: torch.Tensor | None) -> torch.Tensor:
        s, a = self.spec, self.adapter
        heads, kv_heads, hd = s.n_heads, s.n_kv_heads or s.n_heads, s.head_dim
        seq = len(tokens)
        mask = torch.full((seq, seq), float('-inf'), dtype=torch.float64).triu(1)
        visual = None if feature is None else self.bind(feature)
        first_injected = s.n_layers - s.n_queries
        x = self.meta['tok_embeddings.weight'][tokens]
        for i in range(s.n_layers):
            h = self._rms(x, a[f'llama.layers.{i}.attention_norm.weight'], s.norm_eps)
            q = self._rope(self._linear(h, i, 'attention.wq', 'attention.lora_wq', True).view(seq, heads, hd))
            k = self._rope(self._linear(h, i, 'attention.wk', 'attention.lora_wk', False).view(seq, kv_heads, hd))
            v = self._linear(h, i, 'attention.wv', 'attention.lora_wv', False).view(seq, kv_heads, hd)
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
            scores = torch.einsum('thd,shd->hts', q, k) / math.sqrt(hd) + mask
            out = torch.einsum('hts,shd->thd', scores.softmax(-1), v)  # (T, heads, hd)
            if visual is not None and i >= first_injected:
                u = visual + a['prefix_query.weight'][i - first_injected]
                value = (u @ self.meta[f'layers.{i}.attention.wv.weight'].T).view(kv_heads, hd)
                value = value.repeat_interleave(heads // kv_heads, dim=0)  # (heads, hd)
                out = out + torch.tanh(a[f'llama.layers.{i}.attention.gate']).view(heads, 1) * value
            x = x + self._linear(out.reshape(seq, -1), i, 'attention.wo', 'attention.lora_wo', True)
            h = self._rms(x, a[f'llama.layers.{i}.ffn_norm.weight'], s.norm_eps)
            gated = F.silu(self._linear(h, i, 'feed_forward.w1', 'feed_forward.lora_w1', True)) \
                * self._linear(h, i, 'feed_forward.w3', 'feed_forward.lora_w3', True)
            x = x + self._linear(gated, i, 'feed_forward.w2', 'feed_forward.lora_w2', True)
        return self._rms(x, a['llama.norm.weight'], s.norm_eps) @ self.meta['output.weight'].T


def _feature(spec: TinySpec, seed: int = 3) -> torch.Tensor:
    return F.normalize(torch.randn(spec.embed_dim, generator=torch.Generator().manual_seed(seed)), dim=0)


def _tokens(spec: TinySpec, count: int, seed: int = 4) -> list[int]:
    return torch.randint(3, spec.vocab_size, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prompt_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0]


@pytest.fixture(scope='module', params=[MHA, GQA], ids=['mha', 'gqa'])
def case(request):
    spec = request.param
    meta, adapter = random_meta_state_dict(spec), random_adapter_state_dict(spec)
    return spec, build_model(spec, meta, adapter), OfficialReference(spec, meta, adapter)


def test_prompt_logits_match_official_formulation(case):
    spec, model, reference = case
    tokens, feature = _tokens(spec, 7), _feature(spec)
    model.set_visual_features(feature)
    ours = _prompt_logits(model, tokens)
    expected = reference.logits(tokens, feature)
    torch.testing.assert_close(ours.double(), expected, atol=ATOL, rtol=0)
    # The visual path must matter, or the comparison above would not test it.
    assert (expected - reference.logits(tokens, None)).abs().max() > 0.1


def test_text_only_logits_match_official_formulation(case):
    spec, model, reference = case
    tokens = _tokens(spec, 5)
    model.set_visual_features(None)
    torch.testing.assert_close(_prompt_logits(model, tokens).double(), reference.logits(tokens, None),
                               atol=ATOL, rtol=0)


def test_incremental_decoding_with_kv_cache_matches_full_recomputation(case):
    spec, model, reference = case
    tokens, feature = _tokens(spec, 11), _feature(spec, seed=5)
    prompt_len = 6
    model.set_visual_features(feature.unsqueeze(0))  # (1, embed_dim) is accepted too
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens[:prompt_len]]), use_cache=True)
        torch.testing.assert_close(out.logits[0].double(), reference.logits(tokens[:prompt_len], feature),
                                   atol=ATOL, rtol=0)
        for end in range(prompt_len + 1, len(tokens) + 1):
            out = model(input_ids=torch.tensor([[tokens[end - 1]]]), cache=out.cache, use_cache=True)
            torch.testing.assert_close(out.logits[0, -1].double(), reference.logits(tokens[:end], feature)[-1],
                                       atol=ATOL, rtol=0)
    assert out.cache.get_seq_length() == len(tokens)


def test_injection_goes_to_the_last_query_layers_only():
    spec = TinySpec(query_layers=2)
    meta, adapter = random_meta_state_dict(spec), random_adapter_state_dict(spec)
    model = build_model(spec, meta, adapter)
    feature, tokens = _feature(spec), _tokens(spec, 5)
    model.set_visual_features(feature)
    assert [layer.self_attn.o_proj.visual_vector is not None for layer in model.layers] == [False, True, True]
    torch.testing.assert_close(_prompt_logits(model, tokens).double(),
                               OfficialReference(spec, meta, adapter).logits(tokens, feature), atol=ATOL, rtol=0)


def test_visual_vectors_are_computed_once_per_query_not_per_token():
    spec = MHA
    model = build_model(spec, random_meta_state_dict(spec), random_adapter_state_dict(spec))
    bind_calls = []
    model.bind_network.register_forward_hook(lambda *_: bind_calls.append(1))
    model.set_visual_features(_feature(spec))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([_tokens(spec, 4)]), use_cache=True)
        for _ in range(8):
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=next_token, cache=out.cache, use_cache=True)
    assert model.visual_vector_computations == 1
    assert len(bind_calls) == 1

    model.set_visual_features(_feature(spec, seed=9))  # a new query recomputes
    assert model.visual_vector_computations == 2
    model.set_visual_features(None)
    assert not model.has_visual_features
    assert model.visual_vector_computations == 2


def test_fresh_wrapper_is_exactly_the_backbone_even_with_features():
    # SmolLM2-like: grouped-query attention and tied input/output embeddings.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    backbone = LlamaForCausalLM(config).eval()
    plain = copy.deepcopy(backbone)
    model = ImageBindLLM(backbone, ImageBindLLMConfig(embed_dim=8, lora_rank=2)).eval()
    assert model.backbone.lm_head.weight is model.backbone.model.embed_tokens.weight
    tokens = [5, 9, 2, 33, 7]
    model.set_visual_features(torch.randn(8))
    assert torch.equal(_prompt_logits(model, tokens), _prompt_logits(plain, tokens))


def test_zero_gates_remove_the_visual_effect():
    spec = MHA
    model = build_model(spec, random_meta_state_dict(spec), random_adapter_state_dict(spec))
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.gate.zero_()
    tokens = _tokens(spec, 6)
    model.set_visual_features(None)
    text_only = _prompt_logits(model, tokens)
    model.set_visual_features(_feature(spec))
    assert torch.equal(_prompt_logits(model, tokens), text_only)


def test_lora_linear_is_base_plus_bias_plus_low_rank_update():
    base = torch.nn.Linear(6, 5, bias=False)
    layer = LoRALinear(base, rank=2, bias=True)
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), base(x))  # zero-initialised bias and second factor
    assert not base.weight.requires_grad
    with torch.no_grad():
        layer.bias.normal_()
        layer.lora_b.weight.normal_()
    expected = x @ base.weight.T + layer.bias + x @ layer.lora_a.weight.T @ layer.lora_b.weight.T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.linear_map(x), expected - layer.bias)


def test_bind_network_follows_the_backbone_width():
    network = BindNetwork(embed_dim=8, hidden_size=24, blocks=3, mult=4, eps=1e-6)
    assert network(torch.randn(8)).shape == (24,)
    assert network.blocks[0].w1.weight.shape == (96, 24)
    assert network.blocks[0].w2.weight.shape == (24, 96)


@pytest.mark.parametrize('features, message', [
    (torch.randn(2, MHA.embed_dim), 'shape'),
    (torch.randn(MHA.embed_dim + 1), 'shape'),
    (torch.full((MHA.embed_dim,), float('nan')), 'NaN'),
    ([0.0] * MHA.embed_dim, 'torch.Tensor'),
])
def test_invalid_visual_features_are_rejected(features, message):
    model = ImageBindLLM(build_backbone(MHA, random_meta_state_dict(MHA)), MHA.adapter_config())
    with pytest.raises(ModelError, match=message):
        model.set_visual_features(features)


def test_unsupported_backbones_and_configs_are_rejected():
    backbone = build_backbone(MHA, random_meta_state_dict(MHA))
    with pytest.raises(ModelError, match='query_layers'):
        ImageBindLLM(backbone, ImageBindLLMConfig(query_layers=MHA.n_layers + 1))
    ImageBindLLM(backbone, MHA.adapter_config())
    with pytest.raises(ModelError, match='already patched'):
        ImageBindLLM(backbone, MHA.adapter_config())
    with pytest.raises(ModelError, match='not a LLaMA-style'):
        ImageBindLLM(torch.nn.Linear(2, 2))
    with pytest.raises(ModelError, match='lora_rank'):
        ImageBindLLMConfig(lora_rank=0)
