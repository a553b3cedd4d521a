"""bench/cpu.py (issue 18): its variants run on a small model, its byte count and its table."""
from __future__ import annotations

import pytest
from bench_modules import bench_module

from llm_factories import merged_tiny_imagebind_llm


@pytest.fixture(scope='module')
def bench():
    with bench_module('cpu') as module:
        yield module


def test_the_variants_decode_and_the_fp32_ones_agree(bench):
    model, tokenizer = merged_tiny_imagebind_llm()
    decoders = bench._decoders(model, capacity=64)
    prompt = tokenizer.encode('Where is the door?', bos=True)
    tokens = {name: bench._run(decoder, prompt, 6)[2] for name, decoder in decoders.items()}
    fp32 = [tokens[name] for name in decoders if name.startswith('fp32')]
    # Whole-cache masked attention, written-slots attention op by op and in the lean step, row- and column-major:
    # the same tokens.
    assert len(fp32) == 4 and fp32[0] == fp32[1] == fp32[2] == fp32[3]
    assert decoders['fp32 (llm.quantization none)']._lean_step is not None
    served = decoders['fp32 (llm.quantization none)']._lean_step.python
    assert len(served.qkv_weights[0]) == 1 and served.qkv_weights[0][0].is_contiguous()  # W^T: stored as a node does
    assert len(decoders['fp32, lean step, row-major weights']._lean_step.python.qkv_weights[0]) == 3
    assert model.backbone.lm_head.weight.is_contiguous()  # the model passed in keeps its layout
    assert decoders['fp32, op-by-op step']._lean_step is None
    assert all(len(t) == 6 for t in tokens.values())


def test_step_bytes_count_projections_and_head(bench):
    model, _ = merged_tiny_imagebind_llm()
    counted = bench.step_bytes(model)
    config = model.backbone.config
    hidden, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    weights = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn) + config.vocab_size * hidden
    assert counted['fp32'] == 4 * weights
    assert weights < counted['int8'] < 1.2 * weights


def test_the_table_has_every_variant_and_thread_count(bench):
    names = ['fp32, whole-cache attention (before issue 18)', 'fp32 (llm.quantization none)',
             'int8 (llm.quantization int8)']
    result = {'names': names, 'bandwidth': {1: 10.0, 2: 12.0}, 'bytes': {'fp32': 400, 'int8': 100},
              'prompt_tokens': 220, 'first_divergent': [32, 5, 32], 'identical': 2, 'layout_identical': 3,
              'speed': {(t, n): [(0.5, 10.0 * (i + 1)), (0.7, 10.0 * (i + 1))] for t in (1, 2)
                        for i, n in enumerate(names)}}
    text = bench.markdown(result, [1, 2], 2, 64)
    rows = [line for line in text.splitlines() if line.startswith('| fp32') or line.startswith('| int8')]
    assert len(rows) == 6
    assert '| int8 (llm.quantization int8) | 2 | 30.0 | 3.00x | 600 | 1.00x | 120000000 |' in text
    assert 'quoted from issue 18' in text and '2 identical continuations' in text
    assert 'row-major weights** (the same maps summed in another order): 3 of 3 continuations identical' in text


def test_llama_cpp_rows_join_the_table_when_it_ran(bench):
    names = ['fp32, whole-cache attention (before issue 18)', 'fp32 (llm.quantization none)',
             'int8 (llm.quantization int8)']
    llama = ['llama.cpp Q8_0', 'llama.cpp F32']
    result = {'names': names, 'llama_cpp': llama, 'llama_f32_identical': 19, 'bandwidth': {1: 10.0},
              'bytes': {'fp32': 400, 'int8': 100, 'llama.cpp Q8_0': 125, 'llama.cpp F32': 500},
              'prompt_tokens': 220, 'first_divergent': [32] * 20, 'identical': 2, 'layout_identical': 20,
              'speed': {(1, n): [(0.5, 10.0 * (i + 1))] for i, n in enumerate(names + llama)}}
    text = bench.markdown(result, [1], 1, 64)
    assert '| llama.cpp Q8_0 | 1 | 40.0 | 4.00x | 500 | 1.00x | 80000000 |' in text  # limit from the file size
    assert 'its F32 gave our fp32 greedy tokens on 19 of 20' in text
    assert 'quoted from issue 18' not in text and 'no repacking' not in text
    result['llama_cpp_no_repack'] = ['llama.cpp Q8_0']  # its probe crashed: loaded without repacked buffers
    text = bench.markdown(result, [1], 1, 64)
    assert '| llama.cpp Q8_0, no repacking | 1 | 40.0 |' in text and '`use_extra_bufts` off' in text
    assert '| llama.cpp F32 | 1 |' in text


def test_head_to_head_pairs_each_round_with_llama_cpps(bench):
    """Ratios per round, not of medians: ours 10, 12, 9 against llama.cpp 11, 10, 10 is ahead in one round of
    three (medians alone, 10 against 10, would call it level)."""
    ours, theirs = 'fp32 (llm.quantization none)', 'llama.cpp F32'
    result = {'speed': {(2, ours): [(0.5, 10.0), (0.5, 12.0), (0.5, 9.0)],
                        (2, theirs): [(0.4, 11.0), (0.4, 10.0), (0.4, 10.0)]},
              'llama_cpp_no_repack': []}
    lines = bench.head_to_head(result, [2])
    assert f'| {ours} | {theirs} | 2 | 0.909x | 0.900x | 1.200x | 1 of 3 |' in lines
    assert not any('int8' in line for line in lines)  # no Q8_0 in this run: no row for it


def test_the_turn_order_reverses_every_other_round(bench):
    names = ['fp32', 'int8', 'llama.cpp F32']
    assert bench.turns(names, 0) == names and bench.turns(names, 2) == names
    assert bench.turns(names, 1) == ['llama.cpp F32', 'int8', 'fp32']
