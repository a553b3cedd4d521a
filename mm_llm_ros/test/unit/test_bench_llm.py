"""bench/llm.py keeps working: its table, its variants, and the exact shape of its LLaMA-7B stand-in."""
from __future__ import annotations

import re

import pytest
import torch
from bench_modules import bench_module


@pytest.fixture(scope='module')
def bench():
    with bench_module('llm') as module:
        yield module


def test_llama7b_shape_has_exactly_the_parameters_of_llama_7b(bench):
    # Built on the meta device: the shape without the 13 GB. 6,738,415,616 is LLaMA-7B's published count.
    backbone = bench.llama7b_shape_backbone(torch.device('meta'), torch.float16)
    assert sum(parameter.numel() for parameter in backbone.model.parameters()) == 6_738_415_616
    assert backbone.model.dtype == torch.float16


def test_tiny_run_writes_one_row_per_variant_with_overheads(bench, tmp_path):
    out = tmp_path / 'llm.md'
    markdown = bench.run(['tiny'], threads=1, repeats=1, new_tokens=3, cache_dir=None, out=out)
    assert out.read_text() == markdown
    rows = [line for line in markdown.splitlines() if line.startswith('| tiny |')]
    assert [row.split(' | ')[1] for row in rows] == list(bench.VARIANTS)
    baseline, *others = rows
    assert baseline.endswith('| - | - |')
    for row in others:
        assert re.search(r'\| [+-]\d+\.\d% \| [+-]\d+\.\d% \|$', row), row
    assert 'CPU time' in markdown and 'float32' in markdown
