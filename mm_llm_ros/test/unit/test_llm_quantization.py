"""Weight-only quantisation of the backbone (llm.quantization): refusals, drift, shared weights, visual injection."""
from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from mm_llm_ros.core.errors import ConfigError, DependencyError
from mm_llm_ros.core.llm import quantization
from mm_llm_ros.core.llm.backbones import tiny_random_backbone
from mm_llm_ros.core.llm.model import ImageBindLLM
from mm_llm_ros.core.llm.quantization import check_quantization, is_plain, parameter_bytes, quantize_linear_weights

PROMPT = torch.tensor([[256, *b'Is the door ahead open?']])
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
# torch's CPU int4 kernel is fast only with bfloat16 activations, so check_quantization asks for a bfloat16 model.
DTYPES = {'int8': torch.float32, 'int4': torch.bfloat16}


def _merged_tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> ImageBindLLM:
    """The tiny preset's model as build_answerer serves it: open random gates, random adapters, merged."""
    backbone = tiny_random_backbone(seed=seed).model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the bind network and prefix queries initialise from the global RNG
        model = ImageBindLLM(backbone).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith('gate'):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
            elif name.endswith(('lora_b.weight', '.bias')):
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    model.to(dtype).merge_adapters()  # the order build_answerer uses
    return model


def _feature(seed: int = 3) -> torch.Tensor:
    return F.normalize(torch.randn(1024, generator=torch.Generator().manual_seed(seed)), dim=0)


@torch.no_grad()
def _logits(model, features: torch.Tensor | None) -> torch.Tensor:
    model.set_visual_features(features)
    return model(input_ids=PROMPT).logits[0].float()


@torch.no_grad()
def _greedy(model, count: int) -> list[int]:
    """Greedy tokens with the KV cache, as generation runs them."""
    out = model(input_ids=PROMPT, use_cache=True)
    tokens = []
    for _ in range(count):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(input_ids=torch.tensor([[token]]), cache=out.cache, use_cache=True)
    return tokens


def test_an_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="llm.quantization 'int3' is unknown: choose one of none, int8, int4"):
        check_quantization('int3', 'cpu', torch.float32)
    with pytest.raises(ConfigError, match="'fp8' is unknown"):
        quantize_linear_weights(_merged_tiny(), 'fp8')


def test_none_changes_nothing():
    check_quantization('none', 'meta', torch.float64)  # nothing to check
    model = _merged_tiny()
    before = parameter_bytes(model)
    assert quantize_linear_weights(model, 'none') == 0
    assert parameter_bytes(model) == before and all(is_plain(p) for p in model.parameters())


def test_int4_without_the_kernels_is_refused_naming_them(monkeypatch):
    monkeypatch.setitem(quantization.INT4_KERNELS, 'cpu', ('_no_such_pack_op', '_no_such_mm_op'))
    with pytest.raises(ConfigError, match=r"'int4' needs the cpu int4 kernels, which this torch .* lacks "
                                                r"\(_no_such_pack_op, _no_such_mm_op\); use int8"):
        check_quantization('int4', 'cpu', torch.bfloat16)


def test_build_answerer_refuses_int4_without_kernels_before_loading(monkeypatch):
    from mm_llm_ros.core.llm import pipeline

    monkeypatch.setitem(quantization.INT4_KERNELS, 'cpu', ('_no_such_pack_op', '_weight_int4pack_mm_for_cpu'))
    monkeypatch.setattr('mm_llm_ros.core.llm.backbones.tiny_random_backbone',
                        lambda **_: pytest.fail('the backbone was loaded before the refusal'))
    with pytest.raises(ConfigError, match="'int4' needs the cpu int4 kernels"):
        pipeline.build_answerer(pipeline.LLMConfig.from_params(
            {'llm.preset': 'tiny', 'device': 'cpu', 'dtype': 'bfloat16', 'llm.quantization': 'int4'}))


def test_a_missing_torchao_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torchao', None)  # import torchao now raises ImportError
    with pytest.raises(DependencyError, match=r'needs torchao.*pip install torchao==\d'):
        check_quantization('int8', 'cpu', torch.float32)


def test_int4_on_the_cpu_needs_bfloat16():
    with pytest.raises(ConfigError, match="'int4' on the CPU needs dtype bfloat16, got float32: .*use int8"):
        check_quantization('int4', 'cpu', torch.float32)
    check_quantization('int4', 'cpu', torch.bfloat16)


def test_other_devices_and_dtypes_are_refused():
    with pytest.raises(ConfigError, match="'int8' needs a CPU or CUDA device, got mps"):
        check_quantization('int8', 'mps', torch.float16)
    with pytest.raises(ConfigError, match="'int4' needs a float32, float16 or bfloat16 model"):
        check_quantization('int4', 'cpu', torch.float64)


def test_an_unmerged_model_is_refused():
    model = ImageBindLLM(tiny_random_backbone().model)
    with pytest.raises(ConfigError, match='merge the adapters first'):
        quantize_linear_weights(model, 'int8')


def test_import_is_quiet(capfd):
    quantization.import_torchao()
    captured = capfd.readouterr()
    assert captured.err == '' and captured.out == ''


@pytest.mark.parametrize('mode', ['int8', 'int4'])
def test_every_decoder_projection_is_quantised_once_and_wo_stays_shared(mode):
    check_quantization(mode, 'cpu', DTYPES[mode])  # this CPU build has both kernels
    model = _merged_tiny(dtype=DTYPES[mode])
    assert quantize_linear_weights(model, mode) == LINEARS_PER_LAYER * len(model.layers)
    for layer in model.layers:
        o_proj = layer.self_attn.o_proj
        assert o_proj.served.weight is o_proj.proj.base.weight  # one quantised tensor, not a second copy
        assert not is_plain(o_proj.served.weight)
        assert all(not is_plain(layer.mlp.__getattr__(name).base.weight) for name in ('gate_proj', 'down_proj'))
        assert is_plain(layer.self_attn.q_proj.lora_a.weight)  # the LoRA factors serve the visual path in float
    assert all(is_plain(p) for p in model.bind_network.parameters())
    assert is_plain(model.backbone.lm_head.weight) and is_plain(model.backbone.model.embed_tokens.weight)
    assert quantize_linear_weights(model, mode) == 0  # a second call finds nothing left to do


def test_int8_drift_is_bounded_and_greedy_tokens_match_fp32():
    reference, quantised = _merged_tiny(), _merged_tiny()
    quantize_linear_weights(quantised, 'int8')
    feature = _feature()
    expected, got = _logits(reference, feature), _logits(quantised, feature)
    spread = float(expected.max() - expected.min())
    # Measured: 0.3% of the logit range (per-channel int8 on the 64-wide model); 2% leaves margin, int4 is ~7%.
    assert float((got - expected).abs().max()) < 0.02 * spread
    assert not torch.equal(got, expected)  # something was quantised
    assert _greedy(quantised, 32) == _greedy(reference, 32)


def test_int4_runs_on_the_cpu_with_bounded_drift():
    reference, quantised = _merged_tiny(), _merged_tiny(dtype=torch.bfloat16)
    quantize_linear_weights(quantised, 'int4')
    assert type(quantised.layers[0].self_attn.q_proj.base.weight).__name__ == 'Int4OpaqueTensor'
    expected, got = _logits(reference, _feature()), _logits(quantised, _feature())
    error = float((got - expected).abs().max() / (expected.max() - expected.min()))
    assert 0 < error < 0.2  # measured about 0.05 with group size 64 on the 64-wide model, bfloat16 activations


@pytest.mark.parametrize('mode', ['int8', 'int4'])
def test_visual_features_still_change_the_logits_as_in_fp32(mode):
    reference, quantised = _merged_tiny(), _merged_tiny(dtype=DTYPES[mode])
    quantize_linear_weights(quantised, mode)
    feature = _feature()
    effect = _logits(reference, feature) - _logits(reference, None)
    quantised_effect = _logits(quantised, feature) - _logits(quantised, None)
    assert float(quantised_effect.abs().max()) > 0.1 * float(effect.abs().max()) > 0
    assert F.cosine_similarity(quantised_effect.flatten(), effect.flatten(), dim=0) > 0.95
    # The per-query vectors come from the quantised wv and wo (base_output / linear_map): recomputing them for a
    # second feature changes the answer again.
    assert not torch.allclose(_logits(quantised, _feature(seed=5)), _logits(quantised, feature))


@pytest.mark.parametrize('mode, largest_ratio', [('int8', 0.30), ('int4', 0.40)])
def test_weight_memory_shrinks(mode, largest_ratio):
    # a bare LlamaForCausalLM, as the GPU benchmark quantises it; fp32 for int8, bf16 for int4
    model = tiny_random_backbone().model.to(DTYPES[mode])
    layers = model.model.layers
    before, total_before = parameter_bytes(layers), parameter_bytes(model)
    assert quantize_linear_weights(model, mode) == LINEARS_PER_LAYER * len(layers)
    after = parameter_bytes(layers)
    # int8: 1 byte per 4-byte weight plus a scale per row; int4: half a byte per 2-byte weight plus a scale and a
    # zero per group of 64.
    assert after < largest_ratio * before
    assert total_before - parameter_bytes(model) == before - after  # only the decoder layers changed
    assert model(input_ids=PROMPT).logits.isfinite().all()


def test_a_tied_lm_head_stays_tied_and_unquantised():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantize_linear_weights(model, 'int8')
    assert model.lm_head.weight is model.model.embed_tokens.weight and is_plain(model.lm_head.weight)


def test_build_answerer_serves_int8():
    from mm_llm_ros.core.llm.cpu_int8 import Int8Rows
    from mm_llm_ros.core.llm.pipeline import LLMConfig, build_answerer

    answerer = build_answerer(LLMConfig.from_params({'llm.preset': 'tiny', 'llm.quantization': 'int8',
                                                     'generation.max_new_tokens': 12, 'generation.temperature': 0.0}))
    # On the CPU int8 decodes through torch's int8 kernel (cpu_int8.py, test_llm_cpu_int8.py), not torchao's.
    assert isinstance(answerer.model.layers[0].mlp.down_proj.forward, Int8Rows)
    pieces: list[str] = []
    generated = answerer.answer('What is ahead?', [], 12, pieces.append, lambda: False)
    assert generated.n_tokens > 0 and ''.join(pieces) == generated.text


def test_int4_group_size_prefers_128_then_a_divisor():
    from mm_llm_ros.core.llm.quantization import int4_group_size

    assert int4_group_size(4096) == 128 and int4_group_size(11008) == 128
    assert int4_group_size(576) == 64 and int4_group_size(64) == 64  # SmolLM2's width, the tiny model's
    assert int4_group_size(576, preferred=32) == 32 and int4_group_size(96, preferred=64) == 32
    assert int4_group_size(100) is None
    model = tiny_random_backbone().model.to(torch.bfloat16)
    quantize_linear_weights(model, 'int4', int4_group_size=32)
    assert model.model.layers[0].mlp.down_proj.weight.block_size[-1] == 32


def test_the_bench_writes_its_tables(tmp_path):
    """bench/quantization.py: one row per variant, and the memory table from the model code (meta device)."""
    from bench_modules import bench_module

    with bench_module('quantization') as bench:
        markdown = bench.run(['tiny'], ['int8'], prompt_count=2, new_tokens=3, threads=[1], cache_dir=None,
                             out=tmp_path / 'q.md')
    assert (tmp_path / 'q.md').read_text() == markdown
    assert [line.split(' | ')[1] for line in markdown.splitlines() if line.startswith('| tiny |')] == ['none', 'int8']
    # ImageBind-huge and ImageBind-LLM-7B parameter counts, and LLaMA-7B's published 6,738,415,616 inside the latter.
    assert 'ImageBind-huge 1,200,781,057 parameters' in markdown and 'LLaMA-7B 6,738,415,616' in markdown
    int8_row = next(line for line in markdown.splitlines() if line.startswith('| int8 | 2.24 |'))
    assert float(int8_row.split(' | ')[-1].rstrip(' |')) < 0.7 * 16.25  # int8 total vs fp16's 16.25 GiB
    # The int8 formula is torchao's real layout (the int4 one is CUDA's, checked on a GPU: docs/quantization.md).
    linear = torch.nn.Linear(96, 40, bias=False).half()
    torchao = quantization.import_torchao()
    torchao.quantize_(linear, torchao.Int8WeightOnlyConfig(set_inductor_config=False))
    assert quantization.tensor_bytes(linear.weight) == bench._projection_bytes(40, 96, 'int8')


def test_int4_with_dtype_auto_loads_the_model_in_bfloat16(caplog):
    from mm_llm_ros.core.llm.quantization import model_dtype

    assert model_dtype('int4', 'auto', torch.float16) == torch.bfloat16  # tinygemm's only activation dtype
    assert model_dtype('int4', '', torch.float32) == torch.bfloat16
    assert model_dtype('int8', 'auto', torch.float16) == torch.float16
    assert model_dtype('none', 'auto', torch.float32) == torch.float32
    with caplog.at_level(logging.WARNING, logger='mm_llm_ros.core.llm.quantization'):
        assert model_dtype('int4', 'float16', torch.float16) == torch.float16  # an explicit choice is kept...
    assert 'casts to bfloat16 and back' in caplog.text  # ...with its cost said


def test_build_answerer_with_int4_and_dtype_auto_runs_on_the_cpu():
    from mm_llm_ros.core.llm import pipeline

    answerer = pipeline.build_answerer(pipeline.LLMConfig.from_params(
        {'llm.preset': 'tiny', 'device': 'cpu', 'llm.quantization': 'int4'}))
    assert next(answerer.model.parameters()).dtype == torch.bfloat16


def test_an_unknown_int4_kernel_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="int4 kernel 'marlin' is unknown: choose one of tinygemm, fbgemm, "
                                                "gemlite"):
        quantize_linear_weights(_merged_tiny(), 'int4', int4_kernel='marlin')
    with pytest.raises(ConfigError, match="int4 kernel 'marlin' is unknown"):
        check_quantization('int4', 'cpu', torch.bfloat16, int4_kernel='marlin')


@pytest.mark.parametrize('kernel', ['fbgemm', 'gemlite'])
def test_the_other_int4_kernels_are_cuda_only(kernel):
    with pytest.raises(ConfigError, match=f"'int4' with int4 kernel '{kernel}' needs a CUDA device, got cpu"):
        check_quantization('int4', 'cpu', torch.bfloat16, int4_kernel=kernel)
    model = _merged_tiny(dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match=f"int4 kernel '{kernel}' needs a CUDA device"):
        quantize_linear_weights(model, 'int4', int4_kernel=kernel)


@pytest.mark.parametrize('kernel, module, package', [('fbgemm', 'fbgemm_gpu.experimental.gen_ai', 'fbgemm-gpu-genai'),
                                                     ('gemlite', 'gemlite', 'gemlite')])
def test_a_missing_int4_kernel_package_is_refused_naming_it(monkeypatch, kernel, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, whatever is installed here
    quantization._fbgemm_preshuffled.cache_clear()
    load = quantization._fbgemm_preshuffled if kernel == 'fbgemm' else lambda: quantization._gemlite_config(128)
    with pytest.raises(DependencyError, match=f"int4 kernel '{kernel}' needs {package}, .*pip install {package}"):
        load()


def test_the_default_int4_kernel_is_tinygemm():
    model = _merged_tiny(dtype=torch.bfloat16)
    assert quantize_linear_weights(model, 'int4', int4_kernel='tinygemm') > 0
