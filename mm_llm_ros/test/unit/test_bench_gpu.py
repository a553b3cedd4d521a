"""bench/gpu.py --smoke runs every code path of the GPU benchmark on the CPU, so a GPU session only has to run it."""
from __future__ import annotations

import pytest
import torch
from bench_modules import bench_module

from mm_llm_ros.core.errors import DependencyError


@pytest.fixture(scope='module')
def bench():
    with bench_module('gpu') as module:
        yield module


def _rows(markdown: str, section: str) -> list[list[str]]:
    body = markdown.split(section, 1)[1].split('\n## ', 1)[0]
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in body.splitlines()
            if line.startswith('| ') and not line.startswith('| model') and not line.startswith('| goal')]


def test_smoke_run_measures_every_decoder_and_weight_format(bench, tmp_path):
    out = tmp_path / 'gpu.md'
    bench.main(['--device', 'cpu', '--smoke', '--sections', 'ceilings', 'agreement', 'llm',
                '--quantization', 'none', 'int8', '--compile', '--out', str(out)])
    markdown = out.read_text()
    rows = _rows(markdown, '## ImageBind-LLM decoding')
    assert [row[:3] for row in rows] == [
        ['backbone', 'float32', 'eager'], ['backbone', 'float32', 'static'], ['backbone', 'float32', 'HF generate()'],
        ['imagebind-llm merged', 'float32', 'eager'], ['imagebind-llm merged', 'float32', 'static'],
        ['imagebind-llm merged', 'int8', 'eager'], ['imagebind-llm merged', 'int8', 'static']]
    for row in rows:
        assert row[-1] == '', row  # no failure note
        assert float(row[5]) > 0 and float(row[3]) > 0 and float(row[4]) > 0  # decode tok/s, both TTFTs
    fp32_bytes, int8_bytes = float(rows[3][6]), float(rows[5][6])
    assert int8_bytes < fp32_bytes  # int8 projections read fewer bytes per token
    assert 'copy bandwidth: **' in markdown and 'TFLOP/s' in markdown
    assert '`static` vs `eager`, 64 greedy tokens: **identical**' in markdown


def test_a_failing_row_is_reported_and_the_run_goes_on(bench):
    rows = []
    row = bench.LLMRow('backbone', 'fp16', 'eager')

    def fail(_row):
        raise RuntimeError('no kernel for this\nsecond line')

    bench._run_row(rows, row, bench.Budget(60), torch.device('cpu'), fail, lambda _: None)
    assert rows == [row] and row.note == 'failed: RuntimeError: no kernel for this'
    spent = bench.LLMRow('backbone', 'fp16', 'static')
    bench._run_row(rows, spent, bench.Budget(-1), torch.device('cpu'), fail, lambda _: None)
    assert spent.note == 'skipped: time budget spent'


def test_goal_verdicts_compare_each_figure_with_its_target(bench):
    report = bench.Report(header=[], ceilings=bench.Ceilings(copy_gb_s=4000.0, matmul_tflops=700.0), device_type='cuda')
    per_token = 13_000_000_000  # limit: 4000e9 / 13e9 = 308 tok/s
    report.llm = [
        bench.LLMRow('backbone', 'fp16', 'cuda_graph', {100: 20.0}, 210.0, per_token),
        bench.LLMRow('backbone', 'fp16', 'HF generate()', {100: 60.0}, 40.0, per_token),
        bench.LLMRow('imagebind-llm merged', 'fp16', 'cuda_graph', {100: 21.0}, 205.0, per_token),
        bench.LLMRow('imagebind-llm merged', 'int4', 'cuda_graph', {100: 30.0}, 300.0, per_token // 4),
    ]
    verdicts = {line.split(' | ')[0].strip('| '): line for line in bench.goals(report)[2:]}
    assert 'met (1.11x' in verdicts['fp16 decode, batch 1 >= 60% of the bandwidth limit']  # 205/308 = 0.666
    assert '| met' in verdicts['TTFT for a 100-token prompt <= 50 ms']
    assert 'not met' in verdicts['int4 decode >= 1.8x fp16']  # 300/205 = 1.46
    assert '+2.4%' in verdicts['ImageBind-LLM injection overhead <= 5% per token']
    assert '5.12x' in verdicts['fast path >= 2x Hugging Face generate()']


def test_int4_kernels_flag_parses_a_comma_list_and_refuses_unknown_names(bench):
    assert bench.parse_int4_kernels('fbgemm, gemlite,tinygemm,fbgemm') == ['fbgemm', 'gemlite', 'tinygemm']
    with pytest.raises(SystemExit):
        bench.main(['--device', 'cpu', '--int4-kernels', 'tinygemm,marlin'])
    assert bench._formats(['none', 'int4'], ['fbgemm', 'tinygemm']) == [
        ('none', 'tinygemm'), ('int4', 'fbgemm'), ('int4', 'tinygemm')]


def test_a_failing_int4_kernel_gets_a_row_and_the_others_are_still_measured(bench, monkeypatch):
    from mm_llm_ros.core.llm import quantization

    check, quantize = quantization.check_quantization, quantization.quantize_linear_weights

    def fake_check(mode, device, dtype, int4_kernel='tinygemm'):
        if int4_kernel == 'gemlite':  # as if its package did not import
            raise DependencyError('gemlite does not import')
        if int4_kernel != 'fbgemm':
            check(mode, device, dtype, int4_kernel=int4_kernel)

    def fake_quantize(module, mode, int4_group_size=None, int4_kernel='tinygemm'):
        if int4_kernel == 'fbgemm':  # as if the probe passed but the model's shapes failed
            raise RuntimeError('no kernel for this shape')
        return quantize(module, mode, int4_group_size, int4_kernel)

    monkeypatch.setattr(quantization, 'check_quantization', fake_check)
    monkeypatch.setattr(quantization, 'quantize_linear_weights', fake_quantize)
    rows = bench.measure_llm(torch.device('cpu'), torch.float32, bench.SHAPES['smoke'], ['int4'], 1, 4, [],
                             bench.Budget(300), lambda _: None, [], int4_kernels=['fbgemm', 'gemlite', 'tinygemm'],
                             skip_eager=True)
    assert [(r.weights, r.decoder) for r in rows] == [('int4 bf16 fbgemm', '-'), ('int4 bf16 gemlite', '-'),
                                                      ('int4 bf16', 'static')]
    assert rows[0].note == 'failed to quantise: RuntimeError: no kernel for this shape'
    assert rows[1].note == 'refused: DependencyError: gemlite does not import'
    assert rows[2].note == '' and rows[2].tokens_per_s > 0


def test_each_int4_kernel_gets_its_goal_line_against_the_same_fp16_row(bench):
    report = bench.Report(header=[], ceilings=bench.Ceilings(copy_gb_s=4000.0, matmul_tflops=700.0), device_type='cuda')
    per_token = 13_000_000_000
    report.llm = [
        bench.LLMRow('imagebind-llm merged', 'fp16', 'compile', {100: 20.0}, 200.0, per_token, tokens=[1, 2, 3]),
        bench.LLMRow('imagebind-llm merged', 'int4 bf16 fbgemm', 'compile', {100: 30.0}, 380.0, per_token // 4,
                     tokens=[1, 2, 4]),
        bench.LLMRow('imagebind-llm merged', 'int4 bf16 gemlite', '-', note='refused: no gemlite'),
        bench.LLMRow('imagebind-llm merged', 'int4 bf16', 'compile', {100: 30.0}, 320.0, per_token // 4),
    ]
    verdicts = {line.split(' | ')[0].strip('| '): line for line in bench.goals(report)[2:]}
    assert '380 / 200 tok/s = 1.90x' in verdicts['int4 decode >= 1.8x fp16 (fbgemm)']
    assert '| met' in verdicts['int4 decode >= 1.8x fp16 (fbgemm)']
    assert 'not met' in verdicts['int4 decode >= 1.8x fp16'] and 'int4 decode >= 1.8x fp16 (gemlite)' not in verdicts
    assert ('- imagebind-llm merged int4 bf16 fbgemm: `compile` vs the unquantised `compile`: 2/3 greedy tokens equal, '
            'first difference at token 2') in bench.row_agreement(report.llm)


def test_ttft_rows_prefill_each_repeated_prompt_whole(bench):
    """The timed runs repeat one prompt: with the node's prefix reuse, TTFT would time a one-token prefill."""
    from mm_llm_ros.core.llm.backbones import tiny_random_backbone

    backbone = tiny_random_backbone(seed=0)
    model, tokenizer = backbone.model, backbone.tokenizer
    fresh = bench.fresh_prompt_decoder(model, 'static')
    bench.time_our_loop(model, tokenizer, fresh, torch.device('cpu'), 2, 4, bench.LLMRow('m', 'w', 'static'))
    assert fresh.reused == 0
    reusing = bench.StaticDecoder(model, bench.CONTEXT_LENGTH, 'static')  # what the rows used before
    row = bench.LLMRow('m', 'w', 'static')
    bench.time_our_loop(model, tokenizer, reusing, torch.device('cpu'), 2, 4, row)
    assert reusing.reused > 0
    assert set(row.ttft_ms) == set(bench.PROMPT_LENGTHS) and row.tokens_per_s > 0
