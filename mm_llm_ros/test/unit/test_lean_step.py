"""The lean CPU decode step (`core/llm/lean_step.py`) on float32 weights: the generic step's logits and KV cache bit
for bit, serial and batched, compiled and in Python, as loaded and stored column-major, and the generic step wherever
it could not be exact. The int8 products through the same step are tested in test_llm_cpu_int8.py."""
from __future__ import annotations

import copy
import gc
import mmap
from pathlib import Path

import pytest
import torch

from mm_llm_ros.core.llm import lean_step
from mm_llm_ros.core.llm.backbones import tiny_random_backbone
from mm_llm_ros.core.llm.batching import BatchDecoder
from mm_llm_ros.core.llm.decoding import StaticDecoder
from mm_llm_ros.core.llm.lean_step import LeanDecodeStep, store_column_major
from mm_llm_ros.core.llm.model import ImageBindLLM, ImageBindLLMConfig

from llm_factories import merged_tiny_imagebind_llm

PROMPTS = ['Describe the scene in front of the robot.', 'x', 'Is anyone speaking near the kitchen door right now?']


@pytest.fixture(scope='module')
def merged():
    """A merged float32 ImageBind-LLM with open gates and nonzero tuned biases, and its tokenizer."""
    return merged_tiny_imagebind_llm()


@pytest.fixture(scope='module')
def column_major(merged):
    """The same model with its weights stored column-major, as a float32 CPU node serves it."""
    model, tokenizer = merged
    model = copy.deepcopy(model)
    assert store_column_major(model.backbone) > 0
    return model, tokenizer


@pytest.fixture(params=['merged', 'column_major'])
def float32_model(request):
    return request.getfixturevalue(request.param)


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


def test_float32_steps_give_the_generic_steps_logits_bit_for_bit(float32_model):
    """Merged ImageBind-LLM, with and without visual features (o_proj's per-query bias), twice per decoder so that
    the second prefill reuses the first one's prefix."""
    model, tokenizer = float32_model
    for seed in (None, 4):
        model.set_visual_features(_features(seed))
        decoders = _serial_triple(model.backbone, capacity=128)
        for prompt in PROMPTS[:2] + PROMPTS[:1]:
            _greedy_in_step(decoders, tokenizer.encode(prompt, bos=True))
        _assert_same_caches(decoders[:2], decoders[2])


def test_all_zero_float32_biases_are_left_out_without_changing_a_logit(merged):
    """Bias tuning without an adapter checkpoint (the embedded default) merges zero biases: the lean step multiplies
    without them (`torch.mm`), the generic step adds them inside the product (`addmm`), to the same bits. o_proj's
    bias is per-query state (tuned bias + gated visual vector): left out while a query's is all zero, added again
    as soon as a query writes a nonzero one in place (in or out of inference mode)."""
    model, tokenizer = copy.deepcopy(merged)
    layers = model.backbone.model.layers
    with torch.no_grad():
        for layer in layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                               layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                if lean_step._float_linear(projection).bias is not None:
                    lean_step._float_linear(projection).bias.zero_()
            layer.self_attn.o_proj.proj.base.bias.zero_()  # o_proj's tuned bias; its gate stays open
    assert store_column_major(model.backbone) > 0
    decoders = _serial_triple(model.backbone, capacity=128)
    step = decoders[0]._lean_step
    assert step.python.qkv_biases == step.python.gate_up_biases == [[None]] * len(layers)
    assert step.python.down_biases == [None] * len(layers)
    for seed, inference_mode in ((None, False), (4, False), (None, True), (5, True)):
        with torch.inference_mode(inference_mode):
            model.set_visual_features(_features(seed))  # rewrites each o_proj bias in place
        o_biases = [bias() for bias in step.o_biases]
        if seed is None:
            assert o_biases == [None] * len(layers)
        else:  # the open gates put a nonzero visual vector into every layer's bias, which the step adds
            assert all(bias is layer.self_attn.o_proj.served.bias for bias, layer in zip(o_biases, layers))
        _greedy_in_step(decoders, tokenizer.encode(PROMPTS[0], bos=True))


@pytest.mark.parametrize('column_major', [False, True])
def test_a_plain_backbone_gets_the_float32_step_too(column_major):
    """transformers' LlamaForCausalLM as loaded (no ImageBind-LLM, no biases)."""
    backbone = tiny_random_backbone(seed=2)
    if column_major:  # tied, as SmolLM2 is: lm_head's and the embedding's one weight is stored column-major
        backbone.model.lm_head.weight = backbone.model.model.embed_tokens.weight
        assert store_column_major(backbone.model) > 0
        head = backbone.model.lm_head.weight
        assert head is backbone.model.model.embed_tokens.weight and head.stride() == (1, head.shape[0])  # still tied
    decoders = _serial_triple(backbone.model, capacity=128)
    _greedy_in_step(decoders, backbone.tokenizer.encode(PROMPTS[2], bos=True), steps=20)


@torch.inference_mode()
def test_batched_float32_rows_give_the_generic_batch_steps_logits(float32_model):
    """Rows of different lengths and visual features, stepped as non-contiguous and contiguous sets."""
    model, tokenizer = float32_model
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


def test_column_major_storage_joins_the_products_in_place(merged, column_major):
    """q, k and v (and gate and up) become views of one column-major tensor each, which the lean step multiplies in
    one call; the weights are moved, not copied, into one block of memory; storing again changes nothing."""
    backbone = column_major[0].backbone
    attn, mlp = backbone.model.layers[0].self_attn, backbone.model.layers[0].mlp
    q, k, v = (projection.base.weight for projection in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert q.stride() == (1, q.shape[0] + k.shape[0] + v.shape[0])
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    gate, up = mlp.gate_proj.base.weight, mlp.up_proj.base.weight
    assert up.storage_offset() - gate.storage_offset() == gate.shape[0]
    assert up.untyped_storage().data_ptr() == gate.untyped_storage().data_ptr()
    down = mlp.down_proj.base.weight
    assert down.stride() == (1, down.shape[0])
    assert backbone.lm_head.weight.stride() == (1, backbone.lm_head.weight.shape[0])
    for before, after in zip(merged[0].parameters(), column_major[0].parameters(), strict=True):
        assert torch.equal(before, after)
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in column_major[0].parameters()}
    weights = (q, gate, down, backbone.lm_head.weight)
    assert len({weight.untyped_storage().data_ptr() for weight in weights}) == 1  # one block for all weights
    padding = sum(storages.values()) - sum(p.numel() * p.element_size() for p in column_major[0].parameters())
    assert 0 <= padding < 64 * 4 * len(backbone.model.layers) + 64  # each group starts on a 64-byte line
    step = StaticDecoder(backbone, capacity=32)._lean_step
    assert len(step.python.qkv_weights[0]) == 1 and len(step.python.gate_up_weights[0]) == 1
    assert len(StaticDecoder(merged[0].backbone, capacity=32)._lean_step.python.qkv_weights[0]) == 3
    assert store_column_major(backbone) == 0


def test_stored_weights_are_in_memory_marked_for_huge_pages():
    """A decode step streams every weight: on 2 MB pages it walks the page tables 512 times less (madvise)."""
    if not hasattr(mmap, 'MADV_HUGEPAGE') or not Path('/sys/kernel/mm/transparent_hugepage').exists():
        pytest.skip('this kernel has no transparent huge pages')
    memory = lean_step._huge_page_floats(3 << 20)  # 12 MB
    memory.fill_(1.5)
    assert memory.shape == (3 << 20,) and memory.dtype == torch.float32 and float(memory.sum()) == 1.5 * (3 << 20)
    start = memory.data_ptr()
    flags = None
    for line in Path('/proc/self/smaps').read_text().splitlines():
        fields = line.split()
        if '-' in fields[0] and ':' not in fields[0]:
            low, high = (int(bound, 16) for bound in fields[0].split('-'))
            inside = low <= start < high
        elif line.startswith('VmFlags:') and inside:
            flags = fields[1:]
    assert flags is not None and 'hg' in flags  # VM_HUGEPAGE: what MADV_HUGEPAGE sets
    assert lean_step._huge_page_floats(0).numel() == 0


@torch.inference_mode()
def test_column_major_storage_changes_the_logits_by_rounding_only(merged, column_major):
    """The same maps summed in another order: logits within float32 rounding, the same greedy tokens."""
    tokenizer = merged[1]
    for seed in (None, 4):
        tokens = []
        for model, _ in (merged, column_major):
            model.set_visual_features(_features(seed))
            decoder = StaticDecoder(model.backbone, capacity=128)
            logits = [decoder.prefill(tokenizer.encode(PROMPTS[0], bos=True))]
            for _ in range(30):
                logits.append(decoder.step(int(logits[-1].argmax())))
            tokens.append(torch.stack(logits))
        torch.testing.assert_close(tokens[1], tokens[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(tokens[1].argmax(-1), tokens[0].argmax(-1))


@pytest.mark.parametrize('dtype, quantization, stored', [('float32', 'none', True), ('bfloat16', 'none', False),
                                                         ('float32', 'int8', False)])
def test_the_assembled_model_is_stored_column_major_where_the_float32_step_runs(dtype, quantization, stored):
    """`build_imagebind_llm` stores a float32 CPU model's weights for the lean step; others keep the loaded layout
    (int8 decodes through its own packed copies)."""
    from mm_llm_ros.core.llm.assembly import ModelConfig, build_imagebind_llm
    from mm_llm_ros.core.params import defaults

    params = {**defaults('llm_node'), 'llm.preset': 'tiny', 'device': 'cpu', 'dtype': dtype,
              'llm.quantization': quantization}
    model = build_imagebind_llm(ModelConfig.from_params(params)).model
    head = model.backbone.lm_head.weight
    assert (head.stride() == (1, head.shape[0])) == stored and head.is_contiguous() != stored
    if stored:
        assert len(StaticDecoder(model.backbone, capacity=32)._lean_step.python.qkv_weights[0]) == 1


def test_storing_column_major_releases_the_loaded_files_map(tmp_path):
    """transformers maps a safetensors file privately, and the map (every weight in it) stays while any tensor of it
    lives: after storing, none may (the norms are copied out too)."""
    from transformers import LlamaForCausalLM

    tiny_random_backbone(seed=3).model.save_pretrained(tmp_path)
    backbone = LlamaForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    weights = str(tmp_path / 'model.safetensors')

    def mapped():
        gc.collect()
        return weights in Path('/proc/self/maps').read_text()
    if not mapped():
        pytest.skip('this transformers copies the weights out of the file: no map to release')
    norm = backbone.model.norm.weight.detach().clone()
    assert store_column_major(backbone) > 0
    assert not mapped()
    assert torch.equal(backbone.model.norm.weight, norm)


def test_only_plain_float32_cpu_weights_are_stored_column_major():
    bfloat16, _ = merged_tiny_imagebind_llm(torch.bfloat16)
    assert store_column_major(bfloat16.backbone) == 0
    unmerged = ImageBindLLM(tiny_random_backbone(seed=0).model, ImageBindLLMConfig(embed_dim=16, lora_rank=2))
    assert store_column_major(unmerged.backbone) == 0
    assert unmerged.backbone.lm_head.weight.is_contiguous()


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
