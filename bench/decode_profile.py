"""Where a decode step's GPU time goes: kernel times of the static step, and the CUDA-graph step time beside them.

    python bench/decode_profile.py none int4      # on a GPU machine, about 30 s per weight format
    .venv/bin/python bench/decode_profile.py --device cpu --smoke none int8   # here: the same code on small shapes

For each weight format: a merged ImageBind-LLM in the LLaMA-7B shape (random weights, as `bench/gpu.py`), a
100-token prefill, then 10 decode steps under `torch.profiler` with the step's kernels launched one by one
(`static`), printed as a table sorted by device time; then the mean time of 50 replays of the captured step
(`cuda_graph`). The kernel sum per step against the graph step time says how much is left between kernels; the
table says which kernels the time is spent in. `bench/results/gpu-decode-profile.txt` is one such run on an H200.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / 'mm_llm_ros'), str(REPO / 'bench')]

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from gpu import SHAPES  # noqa: E402
from llm import _injected, llama7b_shape_backbone  # noqa: E402
from mm_llm_ros.core.llm.decoding import StaticDecoder  # noqa: E402
from mm_llm_ros.core.llm.quantization import quantize_linear_weights  # noqa: E402

PROMPT = list(range(1, 101))


def profile_format(mode: str, device: torch.device, dtype: torch.dtype, shape: dict) -> str:
    backbone = llama7b_shape_backbone(device, dtype, **shape)
    model, _ = _injected(backbone, merge=True)
    if mode != 'none':
        quantize_linear_weights(model.backbone, mode)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    sort = 'cuda_time_total' if device.type == 'cuda' else 'cpu_time_total'
    decoder = StaticDecoder(model.backbone, 512, 'static')
    decoder.prefill(PROMPT)
    for _ in range(5):
        decoder.step(5)
    with profile(activities=activities) as profiler:
        for _ in range(10):
            decoder.step(5)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    lines = [f'===== {mode}: 10 decode steps, kernels launched one by one',
             profiler.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60)]
    if device.type == 'cuda':
        graph = StaticDecoder(model.backbone, 512, 'cuda_graph')
        graph.prefill(PROMPT)
        graph.step(5)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(50):
            graph.step(5)
        torch.cuda.synchronize(device)
        lines.append(f'{mode}: CUDA-graph step {(time.perf_counter() - start) / 50 * 1000:.2f} ms')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('formats', nargs='+', choices=['none', 'int8', 'int4'], help='weight formats to profile')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--smoke', action='store_true', help='the small shape of bench/gpu.py --smoke')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == 'cuda' else torch.float32
    for mode in args.formats:
        print(profile_format(mode, device, dtype, SHAPES['smoke' if args.smoke else 'llama7b']), flush=True)
        if device.type == 'cuda':
            torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
