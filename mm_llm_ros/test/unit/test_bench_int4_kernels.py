"""bench/int4_kernels.py on the CPU: the dense and tinygemm rows are measured, the CUDA-only kernels say why not."""
from __future__ import annotations

import pytest
from bench_modules import bench_module

torch = pytest.importorskip('torch')


def test_smoke_run_times_dense_and_tinygemm_and_explains_the_cuda_only_kernels(tmp_path):
    if not hasattr(torch.ops.aten, '_weight_int4pack_mm_for_cpu'):
        pytest.skip('this torch build lacks the CPU int4 kernel')
    out = tmp_path / 'int4.md'
    with bench_module('int4_kernels') as bench:
        rows = bench.main(['--device', 'cpu', '--smoke', '--kernels', 'dense', 'tinygemm', 'fbgemm', '--out', str(out)])
    by_kernel = {}
    for row in rows:
        by_kernel.setdefault(row['kernel'], []).append(row)
    assert [len(by_kernel[name]) for name in ('dense', 'tinygemm', 'fbgemm')] == [3, 3, 3]
    for row in by_kernel['dense'] + by_kernel['tinygemm']:
        assert row['us'] > 0 and row['gb_per_s'] > 0 and 'note' not in row
    assert all('needs a CUDA device' in row['note'] for row in by_kernel['fbgemm'])
    text = out.read_text()
    assert text.count('| dense |') == 3 and '| 1.00 |' in text  # the dense rows are their own baseline
    assert "int4 kernel 'fbgemm' needs a CUDA device" in text
