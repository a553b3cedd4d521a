"""The lean CPU decode step (`core/llm/lean_step.py`) on float32 weights: the generic step's logits and KV cache bit
for bit, serial and batched, compiled and in Python, and the generic step wherever it could not be exact. The int8
products through the same step are tested in test_llm_cpu_int8.py."""
from __future__ import annotations

import pytest
import torch

from mm_llm_ros.core.llm.backbones import tiny_random_backbone
from mm_llm_ros.core.llm.batching import BatchDecoder
from mm_llm_ros.core.llm.decoding import StaticDecoder
from mm_llm_ros.core.llm.lean_step import LeanDecodeStep
from mm_llm_ros.core.llm.model import ImageBindLLM, ImageBindLLMConfig

from llm_factories import merged_tiny_imagebind_llm

PROMPTS = ['Describe the scene in front of the robot.', 'x', 'Is anyone speaking near the kitchen door right now?']


@pytest.fixture(scope='module')
def merged():
    """A merged float32 ImageBind-LLM with open gates and nonzero tuned biases, and its tokenizer."""
    return merged_tiny_imagebind_llm()


def _features(seed):
    return None if seed is None else torch.randn(16, generator=torch.Generator().manual_seed(seed))


def _assert_same_caches(decoders, reference):
    for cache in ('_keys', '_values'):
        for decoder in decoders:
            assert all(torch.equal(a, b) for a, b in zip(getattr(decoder, cache), getattr(reference, cache),
                                                         strict=True))


def _serial_triple(backbone, capacity):
    """(compiled lean, Python lean, generic) static decoders over `backbone`."""
    scripted, python, generic = (StaticDecoder(backbone, capacity=capacity) for _ in range(3))
    assert not scripted._lean_step.int8
    assert isinstance(scripted._lean_step.scripted, torch.jit.ScriptModule)
    python._lean_step.scripted = None
    generic._lean_step = None
    return scripted, python, generic


@torch.inference_mode()
def _greedy_in_step(decoders, ids, steps=30):
    """Prefill and greedy-step every decoder on the last one's tokens, asserting equal logits at every position."""
    logits = [decoder.prefill(ids) for decoder in decoders]
    for _ in range(steps):
        assert all(torch.equal(other, logits[-1]) for other in logits[:-1])
        token = int(logits[-1].argmax())
        logits = [decoder.step(token) for decoder in decoders]
    assert all(torch.equal(other, logits[-1]) for other in logits[:-1])


def test_float32_steps_give_the_generic_steps_logits_bit_for_bit(merged):
    """Merged ImageBind-LLM, with and without visual features (o_proj's per-query bias), twice per decoder so that
    the second prefill reuses the first one's prefix."""
    model, tokenizer = merged
    for seed in (None, 4):
        model.set_visual_features(_features(seed))
        decoders = _serial_triple(model.backbone, capacity=128)
        for prompt in PROMPTS[:2] + PROMPTS[:1]:
            _greedy_in_step(decoders, tokenizer.encode(prompt, bos=True))
        _assert_same_caches(decoders[:2], decoders[2])


def test_a_plain_backbone_gets_the_float32_step_too():
    """transformers' LlamaForCausalLM as loaded (no ImageBind-LLM, no biases, tied head)."""
    backbone = tiny_random_backbone(seed=2)
    decoders = _serial_triple(backbone.model, capacity=128)
    _greedy_in_step(decoders, backbone.tokenizer.encode(PROMPTS[2], bos=True), steps=20)


@torch.inference_mode()
def test_batched_float32_rows_give_the_generic_batch_steps_logits(merged):
    """Rows of different lengths and visual features, stepped as non-contiguous and contiguous sets."""
    model, tokenizer = merged
    lean, python, generic = (BatchDecoder(model.backbone, 4, 96) for _ in range(3))
    assert not lean._lean_step.int8 and isinstance(lean._lean_step.scripted, torch.jit.ScriptModule)
    python._lean_step.scripted = None
    generic._lean_step = None
    decoders = (lean, python, generic)
    tokens = {}
    for row, prompt in zip((0, 2, 3), PROMPTS, strict=True):
        model.set_visual_features(_features(row))
        logits = [decoder.admit(row, tokenizer.encode(prompt, bos=True)) for decoder in decoders]
        assert torch.equal(logits[0], logits[2]) and torch.equal(logits[1], logits[2])
        tokens[row] = int(logits[2].argmax())
    for rows in ([0, 2, 3], [0, 2, 3], [2, 3], [0, 3], [3]):
        logits = [decoder.step(rows, [tokens[row] for row in rows]) for decoder in decoders]
        # One row per SDPA call either way; the products are the same (n, C) rows through the same weights.
        assert torch.equal(logits[0], logits[2]) and torch.equal(logits[1], logits[2])
        tokens.update({row: int(logits[2][i].argmax()) for i, row in enumerate(rows)})
    _assert_same_caches((lean, python), generic)


def test_the_generic_step_runs_where_the_lean_one_would_not_be_exact():
    bfloat16, _ = merged_tiny_imagebind_llm(torch.bfloat16)
    assert LeanDecodeStep.for_model(bfloat16.backbone, 64) is None  # its RMSNorm rounds through float32
    unmerged = ImageBindLLM(tiny_random_backbone(seed=0).model, ImageBindLLMConfig(embed_dim=16, lora_rank=2))
    assert LeanDecodeStep.for_model(unmerged.backbone, 64) is None  # LoRA and the visual value outside o_proj
    gelu = tiny_random_backbone(seed=0).model
    for layer in gelu.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    assert LeanDecodeStep.for_model(gelu, 64) is None
    assert StaticDecoder(gelu, capacity=64, mode='static')._lean_step is None


def test_torchao_quantised_weights_keep_the_generic_step():
    """A float32 model whose projections torchao quantised (tensor subclasses) is not the lean step's to run."""
    from mm_llm_ros.core.llm.quantization import quantize_linear_weights

    backbone = tiny_random_backbone(seed=1)
    quantize_linear_weights(backbone.model, 'int8')
    decoder = StaticDecoder(backbone.model, capacity=64)
    assert decoder._lean_step is None
    with torch.inference_mode():
        decoder.prefill(backbone.tokenizer.encode('Hi', bos=True))
        assert torch.isfinite(decoder.step(5)).all()
