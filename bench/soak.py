#!/usr/bin/env python3
"""Soak: the whole graph on a replayed scene for a long time, with periodic questions. Does anything grow?

    python bench/soak.py [--duration 600] [--params-file mm_llm_ros/config/demo.yaml] [--scene SOURCE]
                         [--question-period 5] [--sample-period 2] [--warmup 0.2] [--windows 5]
                         [--rss-tolerance-mb 24] [--out bench/results/soak.md] [--json bench/results/soak.json]

Starts the nodes robot.launch.py would (`launch_plan.plan_nodes`, as `make demo` does, with demo.yaml by default:
tiny ImageBind, SmolLM2, OCR/sound/geometry grounding) and `sensor_replay` looping a scene (default: the generated
street scene), then until --duration seconds have passed:

- every --question-period seconds it asks a question, taking turns between /ask and /ask_stream, and records the
  outcome and latency (no response within --answer-timeout counts as lost);
- every --sample-period seconds it samples each node process's RSS and thread count (psutil); the nodes' own
  counters (drops, rejections, failures, requests by outcome) come from /diagnostics.

The report (markdown --out and JSON --json) has, per time window, each node's RSS and thread count and the answers'
latency percentiles; over the run, drops and errors; and the verdict. A node passes when, after the warm-up
fraction of the run, the least-squares line through its RSS rises by less than max(3 x the residual standard
deviation, --rss-tolerance-mb) over the run (growth beyond noise), its thread count in the second half never
exceeds that of the first, and it is still running. The soak passes when every node does and no question was lost
or failed. Exit status 0 when it passes, 1 when not, 2 when the graph did not come up.

It re-executes itself inside a loopback-only network namespace (scripts/netns.sh) unless it already runs in one.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

import numpy as np
import psutil

REPO = pathlib.Path(__file__).resolve().parents[1]
NETNS = REPO / 'scripts' / 'netns.sh'
sys.path.insert(0, str(REPO / 'mm_llm_ros'))  # the shared helpers below, before netns.sh sources install/

from mm_llm_ros.node_processes import reexec_in_loopback_namespace, stop_processes  # noqa: E402
DEFAULT_PARAMS = REPO / 'mm_llm_ros' / 'config' / 'demo.yaml'
DEFAULT_OUT = REPO / 'bench' / 'results' / 'soak.md'
QUESTIONS = ('What text can you read?', 'What do you hear?', 'How far away is the nearest obstacle ahead?',
             'Describe what is in front of the robot.')
READY_LOG = {'encoder': 'encoding ', 'camera_encoder': 'encoding ', 'audio_encoder': 'encoding ',
             'lidar_encoder': 'encoding ', 'grounding_node': 'extracting ', 'llm_node': 'serving'}
START_TIMEOUT_S = 240.0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--duration', type=float, default=600.0, help='seconds of soak after start-up')
    parser.add_argument('--params-file', type=pathlib.Path, default=DEFAULT_PARAMS)
    parser.add_argument('--scene', default='', help="sensor_replay source ('' = the generated street scene)")
    parser.add_argument('--question-period', type=float, default=5.0, help='seconds between question starts')
    parser.add_argument('--answer-timeout', type=float, default=60.0)
    parser.add_argument('--sample-period', type=float, default=2.0, help='seconds between RSS/thread samples')
    parser.add_argument('--warmup', type=float, default=0.2, help='fraction of the run left out of the trend')
    parser.add_argument('--windows', type=int, default=5, help='time windows in the report')
    parser.add_argument('--rss-tolerance-mb', type=float, default=24.0,
                        help='RSS growth over the run accepted even when the samples are less noisy than this')
    parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT, help='markdown report')
    parser.add_argument('--json', type=pathlib.Path, default=None, help='JSON report (default: --out with .json)')
    parser.add_argument('--log-dir', type=pathlib.Path, default=None, help='node logs (default: a temporary folder)')
    args = parser.parse_args(argv)
    args.json = args.json or args.out.with_suffix('.json')
    return args


# ---- measurements ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    t_s: float
    rss_mb: float
    threads: int


@dataclasses.dataclass
class Answer:
    t_s: float          # when the question was asked, from the start of the soak
    kind: str           # ask or ask_stream
    success: bool
    error: str          # '' on success; 'lost' when nothing came back in time
    latency_s: float
    tokens: int


class Client:
    """The soak's rclpy node: asks questions and keeps the newest /diagnostics values per status."""

    def __init__(self, answer_timeout_s: float):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.action import ActionClient
        from rclpy.executors import MultiThreadedExecutor

        from mm_llm_ros.ros.qos import SERVICE_QOS
        from mm_llm_ros_interfaces.action import AskStream
        from mm_llm_ros_interfaces.srv import Ask

        self._rclpy, self._ask_type, self._goal_type = rclpy, Ask, AskStream
        self.answer_timeout_s = answer_timeout_s
        rclpy.init()
        self.node = rclpy.create_node('soak_client')
        self.executor = MultiThreadedExecutor(num_threads=3)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()
        self.ask_client = self.node.create_client(Ask, 'ask', qos_profile=SERVICE_QOS)
        self.stream_client = ActionClient(self.node, AskStream, 'ask_stream', goal_service_qos_profile=SERVICE_QOS,
                                          result_service_qos_profile=SERVICE_QOS,
                                          cancel_service_qos_profile=SERVICE_QOS)
        self._lock = threading.Lock()
        self.diagnostics: dict[str, dict[str, str]] = {}
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 50)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self._rclpy.try_shutdown()

    def _on_diagnostics(self, msg) -> None:
        with self._lock:
            for status in msg.status:
                self.diagnostics[status.name] = {kv.key: kv.value for kv in status.values}

    def latest_diagnostics(self) -> dict[str, dict[str, str]]:
        with self._lock:
            return {name: dict(values) for name, values in self.diagnostics.items()}

    def wait_for_servers(self, timeout_s: float) -> bool:
        return (self.ask_client.wait_for_service(timeout_sec=timeout_s)
                and self.stream_client.wait_for_server(timeout_sec=timeout_s))

    def _wait(self, future, deadline: float):
        done = threading.Event()
        future.add_done_callback(lambda _future: done.set())
        return future.result() if done.wait(max(0.0, deadline - time.monotonic())) else None

    def ask(self, question: str, stream: bool) -> tuple[bool, str, int]:
        """(success, error, tokens generated); error 'lost' when no response came back within the answer timeout."""
        deadline = time.monotonic() + self.answer_timeout_s
        if not stream:
            response = self._wait(self.ask_client.call_async(self._ask_type.Request(question=question)), deadline)
        else:
            goal = self._wait(self.stream_client.send_goal_async(self._goal_type.Goal(question=question)), deadline)
            if goal is not None and not goal.accepted:
                return False, 'goal rejected', 0
            result = None if goal is None else self._wait(goal.get_result_async(), deadline)
            response = None if result is None else result.result
        if response is None:
            return False, 'lost', 0
        return response.success, response.error, response.tokens_generated


class Sampler:
    """RSS and thread count of every node process, every `period_s`, on a background thread."""

    def __init__(self, pids: dict[str, int], period_s: float, start: float):
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.samples: dict[str, list[Sample]] = {name: [] for name in pids}
        self.exited: set[str] = set()
        self._period_s, self._start = period_s, start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - self._start
            for name, proc in self._procs.items():
                try:
                    self.samples[name].append(Sample(now, proc.memory_info().rss / 2**20, proc.num_threads()))
                except psutil.NoSuchProcess:
                    self.exited.add(name)
            self._stop.wait(self._period_s)


# ---- analysis --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trend:
    rss_start_mb: float
    rss_end_mb: float
    growth_mb: float        # rise of the least-squares line over the analysed span
    noise_mb: float         # standard deviation of the residuals
    slope_mb_per_h: float
    threads_first_half_max: int
    threads_second_half_max: int
    passed: bool


def trend(samples: list[Sample], warmup: float, tolerance_mb: float) -> Trend:
    kept = samples[int(len(samples) * warmup):]
    t = np.array([s.t_s for s in kept])
    rss = np.array([s.rss_mb for s in kept])
    slope, intercept = np.polyfit(t, rss, 1) if len(kept) >= 3 else (0.0, float(rss.mean()))
    noise = float(np.std(rss - (slope * t + intercept)))
    growth = float(slope * (t[-1] - t[0])) if len(kept) >= 2 else 0.0
    half = len(kept) // 2
    threads_first, threads_second = (max(s.threads for s in part) for part in (kept[:half], kept[half:]))
    passed = growth <= max(3.0 * noise, tolerance_mb) and threads_second <= threads_first
    return Trend(float(rss[0]), float(rss[-1]), growth, noise, float(slope * 3600), threads_first, threads_second,
                 passed)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float('nan')
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def windows(samples: dict[str, list[Sample]], answers: list[Answer], duration_s: float, count: int) -> list[dict]:
    rows = []
    for index in range(count):
        lo, hi = duration_s * index / count, duration_s * (index + 1) / count
        inside = [a for a in answers if lo <= a.t_s < hi]
        latencies = [a.latency_s for a in inside if a.success]
        row = {'from_s': lo, 'to_s': hi, 'answers': len(latencies), 'errors': len(inside) - len(latencies),
               'tokens_mean': statistics.mean(a.tokens for a in inside) if inside else float('nan'),
               'latency_p50_s': percentile(latencies, 50), 'latency_p95_s': percentile(latencies, 95),
               'latency_max_s': max(latencies, default=float('nan')), 'rss_mb': {}, 'threads': {}}
        for name, node_samples in samples.items():
            part = [s for s in node_samples if lo <= s.t_s < hi]
            if part:
                row['rss_mb'][name] = statistics.median(s.rss_mb for s in part)
                row['threads'][name] = max(s.threads for s in part)
        rows.append(row)
    return rows


def counter_totals(diagnostics: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
    """The integer counters each node reports, per status (sensor stream, extractor, LLM)."""
    keep = ('received', 'dropped', 'encoded', 'rejected', 'published', 'failures', 'dropped_embeddings',
            'answered_requests', 'busy_requests', 'failed_requests', 'invalid_requests', 'cancelled_requests')
    return {name: {k: int(v) for k, v in values.items() if k in keep and v.lstrip('-').isdigit()}
            for name, values in sorted(diagnostics.items())}


# ---- the run ---------------------------------------------------------------------------------------------------------


def start_graph(params_file: pathlib.Path, scene: str, log_dir: pathlib.Path) -> dict[str, subprocess.Popen]:
    from mm_llm_ros.launch_plan import plan_nodes
    from mm_llm_ros.node_processes import command_for, executable_path, ros_args, start_process

    processes = {}
    for spec in plan_nodes({'params_file': str(params_file)}):
        processes[spec.name] = start_process(command_for(spec), log_dir / f'{spec.name}.log')
    replay = [str(executable_path('sensor_replay')),
              *ros_args(parameters=[{'source': scene, 'loop': True, 'wait_for_subscribers': 1}])]
    processes['sensor_replay'] = start_process(replay, log_dir / 'sensor_replay.log')
    return processes


def wait_until_ready(processes: dict[str, subprocess.Popen], log_dir: pathlib.Path, timeout_s: float) -> list[str]:
    """Names of the nodes that did not log readiness in time (or exited)."""
    deadline = time.monotonic() + timeout_s
    pending = {name for name in processes if name in READY_LOG}
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            if processes[name].poll() is not None:
                return [name]
            if READY_LOG[name] in (log_dir / f'{name}.log').read_text(errors='replace'):
                pending.discard(name)
        time.sleep(0.2)
    return sorted(pending)


def stop_graph(processes: dict[str, subprocess.Popen]) -> None:
    stop_processes(processes.values(), timeout_s=15.0)


def soak(args: argparse.Namespace, log_dir: pathlib.Path) -> dict:
    processes = start_graph(args.params_file, args.scene, log_dir)
    client = None
    try:
        started = time.monotonic()
        not_ready = wait_until_ready(processes, log_dir, START_TIMEOUT_S)
        client = Client(args.answer_timeout)
        if not_ready or not client.wait_for_servers(START_TIMEOUT_S):
            raise RuntimeError(f"graph not ready after {START_TIMEOUT_S:.0f} s: {', '.join(not_ready) or '/ask'}; "
                               f'logs in {log_dir}')
        startup_s = time.monotonic() - started
        print(f'soak: graph up in {startup_s:.0f} s; soaking for {args.duration:g} s', flush=True)
        start = time.monotonic()
        sampler = Sampler({name: proc.pid for name, proc in processes.items()}, args.sample_period, start)
        sampler.start()
        answers: list[Answer] = []
        for index in range(1_000_000):
            due = start + index * args.question_period
            if due > start + args.duration:
                break
            time.sleep(max(0.0, due - time.monotonic()))  # pacing: one question per period
            stream = index % 2 == 1
            asked = time.monotonic()
            success, error, tokens = client.ask(QUESTIONS[index % len(QUESTIONS)], stream)
            answers.append(Answer(asked - start, 'ask_stream' if stream else 'ask', success, error,
                                  time.monotonic() - asked, tokens))
        time.sleep(max(0.0, start + args.duration - time.monotonic()))
        sampler.stop()
        diagnostics = client.latest_diagnostics()
        exited = sorted(sampler.exited | {name for name, proc in processes.items() if proc.poll() is not None})
    finally:
        if client is not None:
            client.close()
        stopping = time.monotonic()
        stop_graph(processes)
        print(f'soak: graph stopped in {time.monotonic() - stopping:.1f} s', flush=True)
    return summarise(args, startup_s, sampler.samples, answers, diagnostics, exited)


def summarise(args, startup_s: float, samples: dict[str, list[Sample]], answers: list[Answer],
              diagnostics: dict[str, dict[str, str]], exited: list[str]) -> dict:
    trends = {name: trend(node_samples, args.warmup, args.rss_tolerance_mb) for name, node_samples in samples.items()}
    latencies = [a.latency_s for a in answers if a.success]
    errors = collections.Counter(a.error for a in answers if not a.success)
    counters = counter_totals(diagnostics)
    reasons = [f'{name} exited' for name in exited]
    reasons += [f'{name}: RSS +{t.growth_mb:.1f} MB over the run (noise {t.noise_mb:.1f} MB), threads '
                f'{t.threads_first_half_max} -> {t.threads_second_half_max}' for name, t in trends.items()
                if not t.passed]
    reasons += [f'{count} question(s): {error}' for error, count in errors.items()]
    passed = not reasons
    growth = ', '.join(f'{name} {t.growth_mb:+.1f} MB' for name, t in trends.items())
    threads_steady = all(t.threads_second_half_max <= t.threads_first_half_max for t in trends.values())
    summary = (f"{'passed' if passed else 'FAILED'}: {len(answers)} questions over {args.duration:g} s, "
               f'{len(latencies)} answered (p50 {percentile(latencies, 50):.2f} s, p95 {percentile(latencies, 95):.2f} '
               f"s), {sum(errors.values())} errors, {errors.get('lost', 0)} lost; RSS trend after warm-up: {growth}; "
               f"thread counts {'steady' if threads_steady else 'grew'}")
    return {
        'config': {'duration_s': args.duration, 'params_file': str(args.params_file), 'scene': args.scene or
                   'generated street scene', 'question_period_s': args.question_period,
                   'sample_period_s': args.sample_period, 'warmup_fraction': args.warmup,
                   'rss_tolerance_mb': args.rss_tolerance_mb, 'startup_s': startup_s,
                   'machine': f'{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}'},
        'verdict': {'passed': passed, 'summary': summary, 'reasons': reasons},
        'questions': {'asked': len(answers), 'answered': len(latencies), 'errors': dict(errors),
                      'lost': errors.get('lost', 0), 'latency_p50_s': percentile(latencies, 50),
                      'latency_p95_s': percentile(latencies, 95),
                      'latency_max_s': max(latencies, default=float('nan'))},
        'nodes': {name: dataclasses.asdict(t) for name, t in trends.items()},
        'windows': windows(samples, answers, args.duration, args.windows),
        'counters': counters,
        'samples': {name: [dataclasses.astuple(s) for s in node_samples] for name, node_samples in samples.items()},
        'answers': [dataclasses.asdict(a) for a in answers],
    }


# ---- report ----------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    config, nodes = report['config'], report['nodes']
    names = list(nodes)
    lines = ['# Soak', '', f"`python bench/soak.py --duration {config['duration_s']:g}`: the whole graph "
             f"(`{pathlib.Path(config['params_file']).name}`, {config['scene']}) with a question every "
             f"{config['question_period_s']:g} s, taking turns between /ask and /ask_stream; {config['machine']}; "
             f"start-up took {config['startup_s']:.0f} s.", '', f"**{report['verdict']['summary']}**", '']
    lines += ['## Over time', '', '| window (s) | answers | errors | tokens/answer | latency p50 / p95 / max (s) | '
              + ' | '.join(f'{n} RSS MB (threads)' for n in names) + ' |',
              '|---|---|---|---|---|' + '---|' * len(names)]
    for row in report['windows']:
        cells = [f"{row['rss_mb'][n]:.0f} ({row['threads'][n]})" if n in row['rss_mb'] else '-' for n in names]
        lines.append(f"| {row['from_s']:.0f}-{row['to_s']:.0f} | {row['answers']} | {row['errors']} | "
                     f"{row['tokens_mean']:.0f} | "
                     f"{row['latency_p50_s']:.2f} / {row['latency_p95_s']:.2f} / {row['latency_max_s']:.2f} | "
                     + ' | '.join(cells) + ' |')
    lines += ['', f"## Trend after the first {100 * config['warmup_fraction']:.0f} % of the run", '',
              '| node | RSS start → end (MB) | fitted growth (MB) | noise σ (MB) | slope (MB/h) '
              '| threads 1st → 2nd half | passed |', '|---|---|---|---|---|---|---|']
    for name, t in nodes.items():
        lines.append(f"| {name} | {t['rss_start_mb']:.0f} → {t['rss_end_mb']:.0f} | {t['growth_mb']:+.1f} | "
                     f"{t['noise_mb']:.1f} | {t['slope_mb_per_h']:+.0f} | {t['threads_first_half_max']} → "
                     f"{t['threads_second_half_max']} | {'yes' if t['passed'] else 'NO'} |")
    lines += ['', f"A node passes when its fitted growth is below max(3σ, {config['rss_tolerance_mb']:g} MB) and its "
              'thread count does not grow.', '', '## Counters at the end (from /diagnostics)', '',
              '| status | counters |', '|---|---|']
    for name, values in report['counters'].items():
        lines.append(f"| {name} | {', '.join(f'{k} {v}' for k, v in values.items())} |")
    lines += ['', "`dropped` counts sensor messages replaced by a newer one before a worker took them (each stream "
              "keeps one); llm_node's `busy_requests` are scene descriptions skipped while a question was answered."]
    return '\n'.join(lines) + '\n'


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    reexec_in_loopback_namespace(NETNS, pathlib.Path(__file__).resolve(), argv)
    log_dir = args.log_dir or pathlib.Path(tempfile.mkdtemp(prefix='mm_llm_soak_'))
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        report = soak(args, log_dir)
    except RuntimeError as exc:
        print(f'soak: {exc}', file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(report))
    args.json.write_text(json.dumps(report, indent=1) + '\n')
    print(report['verdict']['summary'])
    print(f'soak: wrote {args.out} and {args.json}; node logs in {log_dir}')
    return 0 if report['verdict']['passed'] else 1


if __name__ == '__main__':
    raise SystemExit(main(sys.argv[1:]))
