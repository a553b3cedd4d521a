"""Serving throughput and latency of llm_node over DDS: the serial engine against continuous batching.

    .venv/bin/python bench/serving.py [--presets tiny embedded] [--callers 1 2 4 8 16] [--requests 2]
                                      [--new-tokens 48] [--max-batch 8] [--device cpu] [--dtype auto]
                                      [--quantization none|int8|int4] [--threads N] [--no-prefix-reuse]
                                      [--out bench/results/serving.md]
    # what bench/results/serving.md holds (a CPU with AMX: bfloat16 batches best, docs/design.md):
    .venv/bin/python bench/serving.py --dtype bfloat16 --quantization none --threads 1
    # on a GPU machine (the same script; the embedded SmolLM2 or your own checkpoints via --params-file):
    .venv/bin/python bench/serving.py --device cuda --presets embedded --out bench/results/serving-cuda.md

Per preset, two real `llm_node` processes run side by side in one loopback-only DDS graph: `/serial/llm_node`
(generation.max_batch 1, today's engine) and `/batched/llm_node` (generation.max_batch = --max-batch). Both have
max_queue = the largest caller count, so nobody is told busy and every request is measured. For each number of
concurrent callers N, N client threads each send `--requests` /ask requests one after the other (a caller waits for
its answer before asking again), first to one node and then to the other, the order alternating between N values so
that a changing load on a shared machine hits both alike; the idle node only spins its executor.

Reported per (preset, engine, N): aggregate answers/s and generated tokens/s (all answers' tokens over the wall time
from the first request to the last answer), and p50/p95 of the latency each caller sees per request (client-side,
request sent to response received). Goals (issue 13), checked on the embedded preset: at 8 callers the batched
aggregate tokens/s >= 4x the serial engine's, with the batched p50 latency <= 2x the single-caller latency: the p50
of the serial engine answering the same questions for one caller, each once (the `alone` run; the N=1 runs ask only
two of the questions, whose answers may be shorter or longer than the rest). Every answer is compared with the
same question's answer alone: greedy batched answers should be the same text.

Questions differ per caller (different prompt lengths), greedy decoding as in the configs; answers may end at EOS
before --new-tokens, so tokens/s counts the tokens actually generated. The script re-executes itself inside a
loopback-only network namespace (scripts/netns.sh) unless it already runs in one. The "Reading" section of
bench/results/serving.md is written by hand after a run; a new run rewrites the file without it.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
NETNS = REPO / 'scripts' / 'netns.sh'
sys.path.insert(0, str(REPO / 'mm_llm_ros'))  # the shared helpers below, before netns.sh sources install/

from mm_llm_ros.node_processes import reexec_in_loopback_namespace, stop_processes  # noqa: E402

CONFIGS = {'tiny': REPO / 'mm_llm_ros' / 'config' / 'tiny.yaml',
           'embedded': REPO / 'mm_llm_ros' / 'config' / 'demo.yaml'}
QUESTIONS = ('Describe what a mobile robot should do when it sees a closed door in a corridor.',
             'What could a robot hear in a busy kitchen?',
             'Explain how a robot can tell a person from a statue.',
             'List things a delivery robot must check before crossing a street, and why each matters.',
             'Why do robots use lidar?',
             'What should a robot say to a person who asks it for directions to the nearest exit?',
             'How can a robot find its charging station in a dark room?',
             'Describe a warehouse aisle.')
START_TIMEOUT_S = 600.0
ENGINES = ('serial', 'batched')
ALONE = 'alone'  # the serial node answering every question once, one caller: each question's latency alone


@dataclass
class Run:
    preset: str
    engine: str
    callers: int
    answers: int
    failed: int
    tokens: int
    wall_s: float
    latencies_s: list[float]
    answers_to: dict[str, list[str]] = field(default_factory=dict)  # question -> the answers it got

    def same_as(self, alone: 'Run') -> tuple[int, int]:
        """How many of this run's answers equal the answer the same question got alone, and how many were compared."""
        pairs = [(answer, alone.answers_to[question][0]) for question, answers in self.answers_to.items()
                 for answer in answers if alone.answers_to.get(question)]
        return sum(a == b for a, b in pairs), len(pairs)

    @property
    def answers_per_s(self) -> float:
        return self.answers / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def latency(self, q: float) -> float:
        return percentile(self.latencies_s, q)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float('nan')
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--presets', nargs='+', default=['tiny', 'embedded'], choices=sorted(CONFIGS))
    parser.add_argument('--params-file', type=pathlib.Path, default=None,
                        help='llm_node parameters for every preset instead of config/tiny.yaml / demo.yaml')
    parser.add_argument('--callers', nargs='+', type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument('--requests', type=int, default=2, help='requests per caller, one after the other')
    parser.add_argument('--new-tokens', type=int, default=48)
    parser.add_argument('--max-batch', type=int, default=8)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='auto')
    parser.add_argument('--quantization', default=None, choices=['none', 'int8', 'int4'],
                        help="llm.quantization of both nodes (default: the preset's own)")
    parser.add_argument('--no-prefix-reuse', action='store_true',
                        help='generation.prefix_reuse false: every prompt prefilled whole (answers independent of '
                             'what was asked before)')
    parser.add_argument('--threads', type=int, default=0,
                        help="torch threads of each node (its cpu_threads parameter); 0 = torch's default (one per core)")
    parser.add_argument('--answer-timeout', type=float, default=900.0)
    parser.add_argument('--out', type=pathlib.Path, default=REPO / 'bench' / 'results' / 'serving.md')
    parser.add_argument('--log-dir', type=pathlib.Path, default=None)
    return parser.parse_args(argv)


class Callers:
    """The benchmark's rclpy node: one /ask client per engine, shared by the caller threads."""

    def __init__(self, answer_timeout_s: float):
        import rclpy
        from rclpy.executors import MultiThreadedExecutor

        from mm_llm_ros.ros.qos import SERVICE_QOS
        from mm_llm_ros_interfaces.srv import Ask

        self._rclpy, self._ask = rclpy, Ask
        self.answer_timeout_s = answer_timeout_s
        rclpy.init()
        self.node = rclpy.create_node('serving_bench')
        self.executor = MultiThreadedExecutor(num_threads=4)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()
        self.clients = {engine: self.node.create_client(Ask, f'/{engine}/ask', qos_profile=SERVICE_QOS)
                        for engine in ENGINES}

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self._rclpy.try_shutdown()

    def wait_for_services(self, timeout_s: float) -> bool:
        return all(client.wait_for_service(timeout_sec=timeout_s) for client in self.clients.values())

    def ask(self, engine: str, question: str, new_tokens: int):
        """The response, or None when none came back within the answer timeout."""
        future = self.clients[engine].call_async(self._ask.Request(question=question, max_new_tokens=new_tokens))
        done = threading.Event()
        future.add_done_callback(lambda _future: done.set())
        return future.result() if done.wait(self.answer_timeout_s) else None

    def run(self, preset: str, engine: str, callers: int, requests: int, new_tokens: int) -> Run:
        latencies: list[float] = []
        answers_to: dict[str, list[str]] = {}
        counts = {'answers': 0, 'failed': 0, 'tokens': 0}
        lock = threading.Lock()

        def caller(index: int) -> None:
            for r in range(requests):
                question = QUESTIONS[(index + r) % len(QUESTIONS)]
                sent = time.monotonic()
                response = self.ask(engine, question, new_tokens)
                elapsed = time.monotonic() - sent
                with lock:
                    if response is not None and response.success:
                        counts['answers'] += 1
                        counts['tokens'] += response.tokens_generated
                        latencies.append(elapsed)
                        answers_to.setdefault(question, []).append(response.answer)
                    else:
                        counts['failed'] += 1
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return Run(preset, engine, callers, counts['answers'], counts['failed'], counts['tokens'],
                   time.monotonic() - start, latencies, answers_to)


def start_nodes(preset: str, args: argparse.Namespace, log_dir: pathlib.Path) -> dict:
    from mm_llm_ros.node_processes import executable_path, ros_args, start_process

    params_file = args.params_file or CONFIGS[preset]
    processes = {}
    for engine in ENGINES:
        overrides = {'generation.max_batch': 1 if engine == 'serial' else args.max_batch,
                     'max_queue': max(max(args.callers), args.max_batch), 'description.rate_hz': 0.0,
                     'device': args.device, 'dtype': args.dtype, 'generation.temperature': 0.0,
                     'generation.max_new_tokens_cap': max(1024, args.new_tokens), 'cpu_threads': args.threads}
        if args.quantization is not None:
            overrides['llm.quantization'] = args.quantization
        if args.no_prefix_reuse:
            overrides['generation.prefix_reuse'] = False
        if preset == 'embedded':  # longer answers than the demo's one-sentence system prompt asks for
            overrides['prompt.system'] = 'You are a helpful assistant. Answer in detail.'
            # The demo's grounded adapter answers these general questions in a few words (it answers from the
            # perception context): the serving workload is the backbone's long answers, as before it landed.
            overrides['llm.adapter_checkpoint'] = ''
        command = [str(executable_path('llm_node')),
                   *ros_args(parameters=[params_file, overrides], remappings=[('__ns', f'/{engine}')])]
        processes[engine] = start_process(command, log_dir / f'{preset}-{engine}.log')
    deadline = time.monotonic() + START_TIMEOUT_S
    for engine, process in processes.items():
        log = log_dir / f'{preset}-{engine}.log'
        while 'serving' not in log.read_text(errors='replace'):
            if process.poll() is not None or time.monotonic() > deadline:
                stop_processes(processes.values())
                raise RuntimeError(f'{preset} {engine} llm_node did not start; see {log}')
            time.sleep(0.5)
    return processes


def bench(args: argparse.Namespace, log_dir: pathlib.Path) -> list[Run]:
    callers = Callers(args.answer_timeout)
    runs: list[Run] = []
    try:
        for preset in args.presets:
            processes = start_nodes(preset, args, log_dir)
            try:
                if not callers.wait_for_services(60):
                    raise RuntimeError(f'{preset}: /serial/ask or /batched/ask not available')
                for engine in ENGINES:  # warm-up: first-call costs (allocation, DDS) out of the numbers
                    callers.run(preset, engine, 2, 1, 8)
                alone = callers.run(preset, 'serial', 1, len(QUESTIONS), args.new_tokens)
                alone.engine = ALONE
                runs.append(alone)
                print(f'{preset:9s} {ALONE}: p50 {alone.latency(50):.2f} s over {alone.answers} questions', flush=True)
                for turn, n in enumerate(args.callers):
                    order = ENGINES if turn % 2 == 0 else ENGINES[::-1]
                    for engine in order:
                        run = callers.run(preset, engine, n, args.requests, args.new_tokens)
                        runs.append(run)
                        print(f'{preset:9s} {engine:8s} callers {n:2d}: {run.answers_per_s:6.2f} answers/s '
                              f'{run.tokens_per_s:8.1f} tokens/s  p50 {run.latency(50):7.2f} s  '
                              f'p95 {run.latency(95):7.2f} s  failed {run.failed}', flush=True)
            finally:
                stop_processes(processes.values(), timeout_s=15.0)
    finally:
        callers.close()
    return runs


def verdicts(runs: list[Run], preset: str, n: int = 8) -> list[str]:
    table = {(r.engine, r.callers): r for r in runs if r.preset == preset}
    serial, batched, alone = table.get(('serial', n)), table.get(('batched', n)), table.get((ALONE, 1))
    if not (serial and batched and alone):
        return [f'- {preset}: no verdict (needs the serial and batched runs at {n} callers)']
    speedup = batched.tokens_per_s / serial.tokens_per_s if serial.tokens_per_s else float('nan')
    ratio = batched.latency(50) / alone.latency(50) if alone.latency(50) else float('nan')
    same, compared = batched.same_as(alone)
    return [f'- {preset}: aggregate tokens/s at {n} callers, batched / serial = {batched.tokens_per_s:.1f} / '
            f'{serial.tokens_per_s:.1f} = **{speedup:.2f}x** (goal >= 4x: {"met" if speedup >= 4 else "NOT met"})',
            f'- {preset}: p50 latency at {n} callers batched / the same questions asked alone = '
            f'{batched.latency(50):.2f} s / {alone.latency(50):.2f} s = **{ratio:.2f}x** '
            f'(goal <= 2x: {"met" if ratio <= 2 else "NOT met"})',
            f'- {preset}: batched answers at {n} callers identical to the same question answered alone: '
            f'{same} of {compared}']


def markdown(runs: list[Run], args: argparse.Namespace, elapsed_s: float) -> str:
    import torch

    lines = ['# Serving: serial engine vs continuous batching, over DDS with the real llm_node', '',
             f'Generated by `bench/serving.py` ({time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, '
             f'{elapsed_s / 60:.1f} min). Machine: {platform.machine()}, {os.cpu_count()} logical CPUs '
             f'(shared with other jobs: numbers are noisy; serial and batched are measured in the same run, '
             f'alternating per caller count), torch {torch.__version__}, device `{args.device}`, dtype '
             f'`{args.dtype}`, llm.quantization: {args.quantization or "as the preset"}, torch threads per node: '
             f'{args.threads or "default (one per core)"}, generation.prefix_reuse: {not args.no_prefix_reuse}.', '',
             f'Settings: {args.requests} requests per caller (sequential per caller), up to {args.new_tokens} new '
             f'tokens per answer (greedy; EOS may end an answer earlier), batched engine `generation.max_batch` = '
             f'{args.max_batch}, both engines with max_queue = {max(max(args.callers), args.max_batch)} (no busy '
             'answers). Latency is per request as its caller sees it (request sent to response received).', '',
             f'The `{ALONE}` row is the serial node answering each of the {len(QUESTIONS)} questions once for one '
             'caller: the latency a caller sees alone, for the same questions the concurrent callers ask (the '
             '1-caller rows ask only the first two). "Same as alone" counts answers identical to the answer the '
             'same question got there.', '',
             '| preset | engine | callers | answers/s | tokens/s | p50 latency s | p95 latency s | answers | failed '
             '| same as alone |',
             '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    alone = {r.preset: r for r in runs if r.engine == ALONE}
    for r in sorted(runs, key=lambda r: (r.preset, r.callers, r.engine)):
        same = '%d / %d' % r.same_as(alone[r.preset]) if r.preset in alone and r.engine != ALONE else ''
        lines.append(f'| {r.preset} | {r.engine} | {r.callers} | {r.answers_per_s:.2f} | {r.tokens_per_s:.1f} | '
                     f'{r.latency(50):.2f} | {r.latency(95):.2f} | {r.answers} | {r.failed} | {same} |')
    lines += ['', '## Goals (issue 13)', '']
    for preset in args.presets:
        lines += verdicts(runs, preset)
    return '\n'.join(lines) + '\n'


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    reexec_in_loopback_namespace(NETNS, pathlib.Path(__file__).resolve(), argv)
    log_dir = args.log_dir or pathlib.Path(tempfile.mkdtemp(prefix='mm_llm_serving_'))
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        runs = bench(args, log_dir)
    except RuntimeError as exc:
        print(f'serving: {exc}', file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(runs, args, time.monotonic() - started))
    print(f'serving: wrote {args.out}; node logs in {log_dir}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main(sys.argv[1:]))
