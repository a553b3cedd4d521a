"""`llm.quantization: int8` on the CPU (`core/llm/cpu_int8.py`): the int8 decode kernel, its drift against fp32,
the parts that keep fp32 arithmetic exactly (prefill, KV cache, visual injection), batch invariance and threads."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mm_llm_ros.core.llm import cpu_int8
from mm_llm_ros.core.llm.batching import BatchDecoder, BatchRequest, BatchScheduler
from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.llm.cpu_int8 import FusedInt8Rows, Int8Rows, apply_cpu_int8, check_cpu_int8, int8_bytes
from mm_llm_ros.core.llm.decoding import StaticDecoder
from mm_llm_ros.core.llm.lean_step import LeanDecodeStep
from mm_llm_ros.core.llm.generation import GenerationConfig, generate

from llm_factories import merged_tiny_imagebind_llm

PROMPTS = ['Describe the scene in front of the robot.', 'x', 'Is anyone speaking near the kitchen door right now?',
           'What is ahead?', 'Where is the red ball?', 'Read the sign.']
GREEDY = GenerationConfig(max_new_tokens=24, temperature=0.0, stop_on_eos=False, context_length=96)


@pytest.fixture(scope='module')
def pair():
    """(fp32 model, the same model with int8 decode kernels, tokenizer): merged, open gates, trained-like adapters."""
    model, tokenizer = merged_tiny_imagebind_llm()
    fast = copy.deepcopy(model)
    apply_cpu_int8(fast)
    return model, fast, tokenizer


def _features(seed):
    return None if seed is None else torch.randn(16, generator=torch.Generator().manual_seed(seed))


def _tokens(model, tokenizer, prompt, seed=None, config=GREEDY):
    model.set_visual_features(_features(seed))
    decoder = StaticDecoder(model.backbone, capacity=config.context_length)
    return generate(model.backbone, tokenizer, tokenizer.encode(prompt, bos=True), config, None, decoder).token_ids


def test_the_kernel_probe_passes_here_and_a_broken_kernel_is_refused(monkeypatch):
    check_cpu_int8()

    def broken(*_args, **_kwargs):
        raise RuntimeError('no engine')
    monkeypatch.setattr(cpu_int8, '_pack', broken)
    cpu_int8.check_cpu_int8.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"'int8' on the CPU needs torch's quantized::linear_dynamic"):
            check_cpu_int8()
    finally:
        cpu_int8.check_cpu_int8.cache_clear()


def test_a_single_row_is_int8_and_other_shapes_keep_the_float_weights():
    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(48, 64, generator=generator), torch.randn(48, generator=generator)
    rows = Int8Rows(weight, lambda: bias)
    x = torch.randn(1, 1, 64, generator=generator)
    reference = F.linear(x, weight, bias)
    y = rows(x)
    assert y.shape == reference.shape and not torch.equal(y, reference)  # quantised ...
    assert float((y - reference).norm() / reference.norm()) < 0.02      # ... with a small error
    prompt = torch.randn(1, 5, 64, generator=generator)
    assert torch.equal(rows(prompt), F.linear(prompt, weight, bias))    # prefill: exactly fp32
    flat = torch.randn(64, generator=generator)
    assert torch.equal(rows(flat), F.linear(flat, weight, bias))


def test_each_row_of_a_batch_gets_what_it_gets_alone():
    """Activation scales are per row: a row's result does not depend on the other rows (an outlier row here)."""
    generator = torch.Generator().manual_seed(2)
    rows = Int8Rows(torch.randn(32, 64, generator=generator), lambda: None)
    batch = torch.randn(3, 1, 64, generator=generator)
    batch[1] *= 100
    together = rows(batch)
    for index in range(3):
        assert torch.equal(together[index], rows(batch[index:index + 1])[0])


def test_a_fused_product_gives_each_maps_own_int8_result_bit_for_bit():
    """q, k and v in one kernel call: each output row keeps its scale and the input row is quantised once either
    way, so the fused product equals the three separate ones exactly (rows of a batch too)."""
    generator = torch.Generator().manual_seed(3)
    linears = [torch.nn.Linear(64, out, bias=out != 16) for out in (48, 16, 16)]
    for linear in linears:
        torch.nn.init.normal_(linear.weight, generator=generator)
    fused = FusedInt8Rows(linears)
    x = torch.randn(3, 1, 64, generator=generator)
    for part, linear in zip(fused(x), linears, strict=True):
        assert torch.equal(part, Int8Rows(linear.weight, lambda linear=linear: linear.bias)(x))


def test_every_decode_product_and_the_head_are_rerouted_once(pair):
    _, fast, _ = pair
    layers = fast.backbone.model.layers
    for layer in layers:
        assert layer.self_attn.decode_qkv.sizes == [layer.self_attn.q_proj.out_features,
                                                    layer.self_attn.k_proj.out_features,
                                                    layer.self_attn.v_proj.out_features]
        assert len(layer.mlp.decode_gate_up.sizes) == 2
        for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
            assert isinstance(module.forward, Int8Rows)
        for module in (layer.self_attn.q_proj, layer.mlp.up_proj):  # their own forwards (prefill) stay float
            assert not isinstance(module.__dict__.get('forward'), Int8Rows)
    assert isinstance(fast.backbone.lm_head.forward, Int8Rows)
    # The head's float weight (SmolLM2: the tied embedding, which the token lookup reads) stays as it was.
    assert fast.backbone.lm_head.forward.weight is fast.backbone.lm_head.weight
    assert type(fast.backbone.lm_head.weight) is torch.nn.Parameter
    # One int8 copy per weight (o_proj's forward and its batch product share theirs): 1 byte per weight + scales.
    weights = sum(p.numel() for layer in layers for name, p in layer.named_parameters()
                  if name.endswith('weight') and p.dim() == 2 and 'lora' not in name)
    weights += fast.backbone.lm_head.weight.numel()
    assert weights <= int8_bytes(fast) < 1.2 * weights
    assert apply_cpu_int8(fast) == 0  # idempotent


@torch.inference_mode()
def test_the_lean_decode_step_gives_the_generic_steps_logits_bit_for_bit(pair):
    """`LeanDecodeStep` (the static decoder's int8 step on the CPU), compiled by TorchScript and in Python, against
    the op-by-op layers it replaces: with adapter biases, with and without visual features, over 30 greedy tokens
    after a prompt."""
    _, fast, tokenizer = pair
    ids = tokenizer.encode(PROMPTS[0], bos=True)
    for seed in (None, 4):
        fast.set_visual_features(_features(seed))
        scripted, python, generic = (StaticDecoder(fast.backbone, capacity=128) for _ in range(3))
        assert isinstance(scripted._lean_step, LeanDecodeStep)
        assert isinstance(scripted._lean_step.scripted, torch.jit.ScriptModule)
        python._lean_step.scripted = None
        generic._lean_step = None
        decoders = (scripted, python, generic)
        logits = [decoder.prefill(ids) for decoder in decoders]
        for _ in range(30):
            assert torch.equal(logits[0], logits[2]) and torch.equal(logits[1], logits[2])
            token = int(logits[2].argmax())
            logits = [decoder.step(token) for decoder in decoders]
        for cache in ('_keys', '_values'):
            for decoder in (scripted, python):
                assert all(torch.equal(a, b) for a, b in zip(getattr(decoder, cache), getattr(generic, cache),
                                                             strict=True))


@torch.inference_mode()
def test_all_zero_biases_are_skipped_without_changing_a_logit(pair):
    """Bias tuning without a checkpoint merges zero biases: the lean step skips them, the generic step adds them."""
    _, fast, tokenizer = pair
    zeroed = copy.deepcopy(fast)
    for layer in zeroed.layers:
        for fused in (layer.self_attn.decode_qkv, layer.mlp.decode_gate_up):
            fused.bias.zero_()
        layer.mlp.down_proj.forward.bias().zero_()
    lean, generic = (StaticDecoder(zeroed.backbone, capacity=64) for _ in range(2))
    step = lean._lean_step.python
    assert step.qkv_bias == step.gate_up_bias == step.down_bias == [None] * len(zeroed.layers)
    generic._lean_step = None
    ids = tokenizer.encode(PROMPTS[3], bos=True)
    logits = [lean.prefill(ids), generic.prefill(ids)]
    for _ in range(10):
        assert torch.equal(logits[0], logits[1])
        token = int(logits[1].argmax())
        logits = [lean.step(token), generic.step(token)]


def test_the_python_step_runs_where_torchscript_fails(pair, monkeypatch, caplog):
    _, fast, tokenizer = pair

    def fail(module):
        raise RuntimeError('no TorchScript here')

    monkeypatch.setattr(torch.jit, 'script', fail)
    decoder = StaticDecoder(fast.backbone, capacity=64)
    assert decoder._lean_step.scripted is None
    assert 'TorchScript failed (RuntimeError: no TorchScript here)' in caplog.text
    monkeypatch.undo()
    reference = StaticDecoder(fast.backbone, capacity=64)
    ids = tokenizer.encode(PROMPTS[2], bos=True)
    with torch.inference_mode():
        assert torch.equal(decoder.prefill(ids), reference.prefill(ids))
        assert torch.equal(decoder.step(7), reference.step(7))


def test_the_lean_step_runs_the_int8_products_of_an_int8_model_only(pair):
    model, fast, _ = pair
    assert LeanDecodeStep.for_model(fast.backbone, 64).int8
    assert not StaticDecoder(model.backbone, capacity=64)._lean_step.int8  # float weights: float products


def test_an_unmerged_model_is_refused():
    from mm_llm_ros.core.llm.backbones import tiny_random_backbone
    from mm_llm_ros.core.llm.model import ImageBindLLM, ImageBindLLMConfig

    model = ImageBindLLM(tiny_random_backbone(seed=0).model, ImageBindLLMConfig(embed_dim=16, lora_rank=2))
    with pytest.raises(ConfigError, match='merged ImageBind-LLM'):
        apply_cpu_int8(model)


@torch.inference_mode()
def test_the_prefill_and_its_kv_cache_are_exactly_fp32s(pair):
    model, fast, tokenizer = pair
    ids = tokenizer.encode(PROMPTS[2], bos=True)
    decoders = []
    for m in (model, fast):
        m.set_visual_features(_features(1))
        decoder = StaticDecoder(m.backbone, capacity=64)
        decoder.prefill(ids)
        decoders.append(decoder)
    for reference, quantised in zip(decoders[0]._keys + decoders[0]._values, decoders[1]._keys + decoders[1]._values,
                                    strict=True):
        assert torch.equal(reference, quantised)


@torch.inference_mode()
def test_decode_drift_is_bounded_and_greedy_tokens_mostly_agree(pair):
    """Teacher-forced logits (fp32's own tokens fed to both) and free-running greedy tokens, over the prompts and
    visual inputs; measured: max |dlogit| 0.7% of the logit range, 6 of 6 continuations identical."""
    model, fast, tokenizer = pair
    worst, identical, first_divergent = 0.0, 0, []
    for index, prompt in enumerate(PROMPTS):
        seed = None if index % 2 else index
        reference = _tokens(model, tokenizer, prompt, seed)
        quantised = _tokens(fast, tokenizer, prompt, seed)
        identical += reference == quantised
        first_divergent.append(next((i for i, (a, b) in enumerate(zip(reference, quantised)) if a != b),
                                    len(reference)))
        decoders = []
        for m in (model, fast):
            m.set_visual_features(_features(seed))
            decoders.append(StaticDecoder(m.backbone, capacity=GREEDY.context_length))
        ids = tokenizer.encode(prompt, bos=True)
        logits = [decoder.prefill(ids) for decoder in decoders]
        for token in reference[:16]:
            span = float(logits[0].max() - logits[0].min())
            worst = max(worst, float((logits[0] - logits[1]).abs().max()) / span)
            logits = [decoder.step(token) for decoder in decoders]
    print(f'int8 drift: max |dlogit| {worst:.4f} of the range, {identical}/{len(PROMPTS)} identical, '
          f'first divergent {first_divergent}')
    assert worst < 0.03  # a share of the logit range; measured 0.0068
    assert identical >= len(PROMPTS) // 2, first_divergent
    assert sorted(first_divergent)[len(PROMPTS) // 2] >= GREEDY.max_new_tokens // 2, first_divergent


@torch.inference_mode()
def test_visual_features_change_the_answer_as_in_fp32(pair):
    """The injection is untouched: the visual path runs the float weights, the vector goes into o_proj's bias."""
    model, fast, _ = pair
    ids = torch.tensor([[1, *range(60, 80)]])
    changes = []
    for m in (model, fast):
        decoder = StaticDecoder(m.backbone, capacity=64)
        step = []
        for seed in (None, 3):
            m.set_visual_features(_features(seed))
            decoder.prefill(ids[0].tolist())
            step.append(decoder.step(70).float())
        changes.append(step[1] - step[0])
    assert changes[0].norm() > 0.01
    assert F.cosine_similarity(changes[0], changes[1], dim=0) > 0.95


def test_batched_int8_tokens_equal_the_serial_int8_tokens(pair):
    _, fast, tokenizer = pair
    serial = [_tokens(fast, tokenizer, prompt, index) for index, prompt in enumerate(PROMPTS[:4])]
    scheduler = BatchScheduler(BatchDecoder(fast.backbone, 3, GREEDY.context_length), tokenizer)
    results = {}
    waiting = list(range(4))
    for _ in range(200):  # bounded: every step emits a token per running row
        while waiting and scheduler.free:
            index = waiting.pop(0)
            scheduler.join(BatchRequest(tokenizer.encode(PROMPTS[index], bos=True), GREEDY,
                                        on_done=lambda r, index=index: results.__setitem__(index, r),
                                        prepare=lambda index=index: fast.set_visual_features(_features(index))))
        if not waiting and not scheduler.running:
            break
        scheduler.step()
    assert [results[index].token_ids for index in range(4)] == serial


@torch.inference_mode()
def test_a_batch_rows_logits_are_the_serial_steps_bit_for_bit(pair):
    """Each int8 row's kernel calls are its own, and it attends over its own span as the serial step does: rows of
    different lengths and visual features, stepped together, give exactly the serial decoder's logits (a masked
    attention over the longest row's span did not)."""
    _, fast, tokenizer = pair
    batch = BatchDecoder(fast.backbone, 3, 96)
    serial, logits = {}, {}
    for row, prompt in enumerate(PROMPTS[:3]):
        fast.set_visual_features(_features(row))
        ids = tokenizer.encode(prompt, bos=True)
        serial[row] = StaticDecoder(fast.backbone, capacity=96)
        logits[row] = serial[row].prefill(ids)
        assert torch.equal(batch.admit(row, ids), logits[row])
    for _ in range(12):
        tokens = {row: int(logits[row].argmax()) for row in serial}
        stepped = batch.step(list(serial), [tokens[row] for row in serial])
        for row in serial:
            fast.set_visual_features(_features(row))  # the serial step reads the model's current query
            logits[row] = serial[row].step(tokens[row])
            assert torch.equal(stepped[row], logits[row]), f'row {row}'


@torch.inference_mode()
def test_the_batch_decoders_lean_step_gives_its_generic_steps_logits_bit_for_bit(pair):
    """The batch decoder's int8 decode step (the lean module over n rows, compiled and in Python) against its
    op-by-op layers: rows of different prompt lengths and visual features, stepped as a non-contiguous set and as a
    contiguous one."""
    _, fast, tokenizer = pair
    lean, python, generic = (BatchDecoder(fast.backbone, 4, 96) for _ in range(3))
    assert isinstance(lean._lean_step.scripted, torch.jit.ScriptModule)
    python._lean_step.scripted = None
    generic._lean_step = None
    decoders = (lean, python, generic)
    tokens = {}
    for row, prompt in zip((0, 2, 3), PROMPTS[:3], strict=True):
        fast.set_visual_features(_features(row))
        ids = tokenizer.encode(prompt, bos=True)
        logits = [decoder.admit(row, ids) for decoder in decoders]
        assert torch.equal(logits[0], logits[2]) and torch.equal(logits[1], logits[2])
        tokens[row] = int(logits[2].argmax())
    for rows in ([0, 2, 3], [0, 2, 3], [2, 3], [0, 3]):
        logits = [decoder.step(rows, [tokens[row] for row in rows]) for decoder in decoders]
        assert torch.equal(logits[0], logits[2]) and torch.equal(logits[1], logits[2])
        tokens.update({row: int(logits[2][i].argmax()) for i, row in enumerate(rows)})
    for cache in ('_keys', '_values'):
        for decoder in (lean, python):
            assert all(torch.equal(a, b) for a, b in zip(getattr(decoder, cache), getattr(generic, cache),
                                                         strict=True))


def test_two_threads_give_the_same_tokens_as_one(pair):
    """The kernel splits a single row's output columns over threads (bench/cpu.py measures the speed-up): the sums
    per column are the same, so the tokens are."""
    _, fast, tokenizer = pair
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _tokens(fast, tokenizer, PROMPTS[0], 0)
        torch.set_num_threads(2)
        two = _tokens(fast, tokenizer, PROMPTS[0], 0)
    finally:
        torch.set_num_threads(previous)
    assert one == two


def test_build_answerer_serves_int8_through_the_cpu_kernel():
    from dataclasses import replace

    from mm_llm_ros.core.llm.pipeline import LLMConfig, build_answerer

    config = LLMConfig.from_params({'llm.preset': 'tiny', 'llm.quantization': 'int8', 'generation.max_new_tokens': 4,
                                    'generation.temperature': 0.0, 'generation.context_length': 64})
    answerer = build_answerer(replace(config, generation=replace(config.generation, stop_on_eos=False)))
    assert isinstance(answerer.model.backbone.lm_head.forward, Int8Rows)
    assert answerer.decoder is not None and answerer.decoder.mode == 'static'
    assert isinstance(answerer.decoder._lean_step, LeanDecodeStep)  # the served step is the lean one
    pieces: list[str] = []
    generated = answerer.answer('What is ahead?', [], 4, pieces.append, lambda: False)
    assert generated.n_tokens == 4 and ''.join(pieces) == generated.text
