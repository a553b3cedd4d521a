"""Batch-1 products of one LLaMA-7B layer's shapes, per int4 kernel, against the dense bfloat16 product.

    python bench/int4_kernels.py                                   # on a GPU machine: about 30 s
    .venv/bin/python bench/int4_kernels.py --device cpu --smoke    # here: the code path, small shapes

Why: a decode step is batch-1 products over every weight, so a kernel's time per product, as bandwidth over the
weight bytes it must read, says how fast it can decode before any model is built. Each product goes through the
node's own quantisation (`_quantize_linear`, with the probe of `check_quantization` first), so a kernel that does
not import or run gets a row saying why. Each row replays a CUDA graph of the product over `COPIES` distinct
weights, so the GPU's L2 cache (50-60 MB) cannot hold them and launch gaps do not count. The ratio is the kernel's
time against the dense bfloat16 product of the same shape, measured in the same run.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / 'mm_llm_ros')]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mm_llm_ros.core.llm.quantization import INT4_KERNEL_NAMES, _quantize_linear, check_quantization  # noqa: E402

# (out, in) of LLaMA-7B's projections: q/k/v/o, gate/up, down; the smoke shapes keep the ratios.
SHAPES = {'llama7b': [(4096, 4096), (11008, 4096), (4096, 11008)], 'smoke': [(256, 256), (688, 256), (256, 688)]}
COPIES = 6
KERNELS = ('dense',) + INT4_KERNEL_NAMES


def _timed_ms(run: Callable[[], None], device: torch.device, iters: int) -> float:
    for _ in range(5):
        run()
    if device.type != 'cuda':
        started = time.perf_counter()
        for _ in range(iters):
            run()
        return (time.perf_counter() - started) * 1e3 / iters
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / iters


def _replay(layers: Sequence[nn.Module], x: torch.Tensor) -> Callable[[], None]:
    """One call that runs every layer on `x`: a CUDA graph replay on CUDA, a plain loop elsewhere."""
    def run() -> None:
        for layer in layers:
            layer(x)
    if x.device.type != 'cuda':
        return run
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


@torch.no_grad()
def measure(device: torch.device, kernels: Sequence[str], shapes: Sequence[tuple[int, int]], iters: int
            ) -> list[dict]:
    """One row per (kernel, shape): microseconds per batch-1 product and the weight bytes' bandwidth, or why not."""
    rows = []
    dtype = torch.bfloat16  # tinygemm's and fbgemm's activation dtype, and the dense reference's
    for kernel in kernels:
        for out_features, in_features in shapes:
            row = {'kernel': kernel, 'shape': f'{out_features}x{in_features}'}
            try:
                if kernel != 'dense':
                    check_quantization('int4', device, dtype, int4_kernel=kernel)
                layers = []
                for _ in range(COPIES):
                    layer = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
                    layer.weight.normal_(0, 0.02)
                    if kernel != 'dense':
                        _quantize_linear(layer, 'int4', int4_kernel=kernel)
                    layers.append(layer)
                x = torch.randn(1, in_features, device=device, dtype=dtype)
                seconds = _timed_ms(_replay(layers, x), device, iters) / COPIES / 1e3
                weight_bytes = out_features * in_features * (2 if kernel == 'dense' else 0.5)
                row.update(us=seconds * 1e6, gb_per_s=weight_bytes / seconds / 1e9)
            except Exception as exc:  # a kernel that does not import or run: its row says why
                traceback.print_exc()
                row['note'] = f'{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ""}'
            rows.append(row)
            print(row, flush=True)
    return rows


def markdown(rows: Sequence[dict], device: torch.device, argv: Sequence[str]) -> str:
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'CPU'
    dense = {row['shape']: row['us'] for row in rows if row['kernel'] == 'dense' and 'us' in row}
    lines = ['# Batch-1 int4 products per kernel (`bench/int4_kernels.py`)', '',
             f'{name}; torch {torch.__version__}. Command: `python bench/int4_kernels.py {" ".join(argv)}`. '
             f'bfloat16 activations, {COPIES} distinct weights per shape replayed as one graph, mean over the '
             'replays. "vs dense" = the kernel\'s time / the dense bfloat16 product\'s, same shape, same run.', '',
             '| kernel | shape (out x in) | µs per product | GB/s of weight bytes | vs dense | note |',
             '|---|---|--:|--:|--:|---|']
    for row in rows:
        us = row.get('us', math.nan)
        ratio = us / dense[row['shape']] if row['shape'] in dense else math.nan
        bandwidth = row.get('gb_per_s', math.nan)
        lines.append(f"| {row['kernel']} | {row['shape']} | {us:.1f} | {bandwidth:.0f} | {ratio:.2f} | "
                     f"{row.get('note', '')} |".replace('nan', '-'))
    return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', help='cuda, cuda:N or cpu (only dense and tinygemm run there)')
    parser.add_argument('--kernels', nargs='+', default=list(KERNELS), choices=KERNELS)
    parser.add_argument('--smoke', action='store_true', help='small shapes, few iterations')
    parser.add_argument('--out', type=pathlib.Path, default=REPO / 'bench' / 'results' / 'int4-kernels.md')
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    rows = measure(device, args.kernels, SHAPES['smoke' if args.smoke else 'llama7b'], 3 if args.smoke else 50)
    text = markdown(rows, device, argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return rows


if __name__ == '__main__':
    main()
