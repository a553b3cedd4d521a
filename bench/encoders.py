#!/usr/bin/env python3
"""ImageBind encoder node: where the time goes per modality, our preprocessing against the official loaders, and
sustained sensor input through the real node over DDS. On the CPU by default; `--device cuda` runs the models (in
this process and in the node) on a GPU, in fp16 unless `--dtype` says otherwise.

    source install/setup.bash
    python bench/encoders.py [--quick] [--presets tiny huge] [--threads 1] [--repeats 20] [--huge-repeats 3]
                             [--duration 20] [--huge-duration 60] [--device cpu] [--dtype auto]
                             [--official-python PATH] [--out bench/results/encoders.md]

1. Per input, on the real sample data, as the node handles it: decode (deserialising the ROS message included),
   preprocessing, model and publish (building + serialising the Embedding message) time. Node overhead =
   (decode + preprocess + publish) / model, for the `tiny` preset and the `huge` architecture with random weights
   (built once; 10-30 s and ~5 GB).
2. Our in-memory preprocessing against the official file-based loaders of `imagebind.data`, which run in another
   interpreter (`--official-python`: a venv with torchvision, torchaudio and pytorchvideo, made as described in
   scripts/make_golden_fixtures.py) that times only the loader calls and reports JSON. Skipped when it is missing.
3. The installed `encoder` executable (all-in-one, config/tiny.yaml plus overrides) fed 30 Hz camera frames, 10 Hz
   lidar scans and live audio (100 ms chunks in real time): achieved encode rate per stream, drops (from its
   /diagnostics), latency from sensor stamp to arrival, and the node's memory over the run. The huge run is longer
   by default (`--huge-duration`): one of its forwards takes ~10 s on one core.

Timings are medians after one warm-up call (calls whose ratio is reported take turns, round by round), with one
torch thread by default in this process and in the node (`--threads`): per-core numbers that stay comparable on the
shared 2-core machines. The bench re-executes itself in
a loopback-only network namespace (scripts/netns.sh) so that no DDS packet leaves the machine.
`--quick`: tiny only, 5 s of sustained input, 5 repeats; it prints the tables and writes `--out` only when given.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gc
import importlib
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
import wave
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, TypeVar

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = pathlib.Path(os.environ.get('MM_LLM_SHARED_DATA', REPO.parent / 'shared' / 'data'))
DEFAULT_OFFICIAL_PYTHON = pathlib.Path('/tmp/official-venv/bin/python')
DEFAULT_OUT = REPO / 'bench' / 'results' / 'encoders.md'
TINY_YAML = REPO / 'mm_llm_ros' / 'config' / 'tiny.yaml'
FASTDDS_PROFILE = REPO / 'mm_llm_ros' / 'config' / 'fastdds_large_data.xml'
NETNS = REPO / 'scripts' / 'netns.sh'
sys.path.insert(0, str(REPO / 'mm_llm_ros'))  # the shared helpers below, before netns.sh sources install/

from mm_llm_ros.node_processes import reexec_in_loopback_namespace, stop_processes  # noqa: E402

NUSCENES_FRONT = 'images/nuscenes/n015-2018-07-24-11-22-45+0800__CAM_FRONT__1532402927612460.jpg'  # 1600x900
BIRD_WAV = 'audio/imagebind_bird.wav'             # 5 s, stereo, 44.1 kHz
KITTI_SCAN = 'pointclouds/kitti_000008.bin'       # 17238 points: x, y, z, reflectance (float32)
NYU_DEPTH = 'depth/nyu/sync_depth_00000.png'      # 640x480 uint16 millimetres
NYU_FOCAL_PX = 518.8579
COMPARED_FILES = {'vision': NUSCENES_FRONT, 'audio': BIRD_WAV}  # section 2: the official loaders exist for these

AUDIO_CHUNK_S = 0.1
OVERHEAD_TARGET = 0.10          # node overhead budget relative to the huge model's time
NODE_NAME = 'encoder'
DIAGNOSTICS_PERIOD_S = 0.5
STARTUP_TIMEOUT_S = {'tiny': 60.0, 'huge': 300.0}   # model build + discovery
WARMUP_TIMEOUT_S = {'tiny': 30.0, 'huge': 180.0}    # until every stream has produced an embedding
POLL_S = 0.02

K = TypeVar('K')


# --- timing ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Median wall-clock and process-CPU milliseconds of repeated calls."""
    wall_ms: float
    cpu_ms: float

    def __add__(self, other: 'Timing') -> 'Timing':
        return Timing(self.wall_ms + other.wall_ms, self.cpu_ms + other.cpu_ms)


def time_calls(calls: Mapping[K, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[K, Timing]:
    """Time each call `repeats` times after `warmup` untimed rounds (first-call allocations and caches are not
    steady state). The calls take turns, round by round, so changes in the load of a shared machine hit them alike
    and ratios between them stay fair.

    With one torch thread everything runs on the calling thread, so process CPU time is close to the latency on an
    idle core even when other jobs share the machine.
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    wall: dict[K, list[float]] = collections.defaultdict(list)
    cpu: dict[K, list[float]] = collections.defaultdict(list)
    for _ in range(repeats):
        for key, fn in calls.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    return {key: Timing(1e3 * statistics.median(wall[key]), 1e3 * statistics.median(cpu[key])) for key in calls}


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    return time_calls({0: fn}, repeats, warmup)[0]


# --- sample data as the node receives it -----------------------------------------------------------------------------


def read_rgb(path: pathlib.Path):
    import numpy as np
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert('RGB'))


def read_wav(path: pathlib.Path):
    """(channels, n) float32 in [-1, 1] and the sample rate of a 16-bit PCM WAV file (stdlib `wave`)."""
    import numpy as np
    with wave.open(str(path), 'rb') as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f'{path}: expected 16-bit PCM, got {8 * wav.getsampwidth()}-bit samples')
        frames = np.frombuffer(wav.readframes(wav.getnframes()), '<i2').reshape(-1, wav.getnchannels())
        return frames.T.astype(np.float32) / 32768.0, wav.getframerate()


def read_scan(path: pathlib.Path):
    import numpy as np
    return np.fromfile(path, '<f4').reshape(-1, 4)


def set_stamp(msg, stamp_ns: int):
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return msg


def camera_msg(data: pathlib.Path):
    from mm_llm_ros.ros.conversions import image_to_msg
    return image_to_msg(read_rgb(data / NUSCENES_FRONT), 'rgb8', 0, 'CAM_FRONT')


def jpeg_msg(data: pathlib.Path):
    from sensor_msgs.msg import CompressedImage
    msg = CompressedImage(format='jpeg', data=(data / NUSCENES_FRONT).read_bytes())
    msg.header.frame_id = 'CAM_FRONT'
    return msg


def lidar_msg(data: pathlib.Path):
    from mm_llm_ros.ros.conversions import pointcloud_to_msg
    scan = read_scan(data / KITTI_SCAN)
    return pointcloud_to_msg(scan[:, :3], 0, 'velo_link', scan[:, 3])


def depth_msg(data: pathlib.Path):
    import cv2
    from mm_llm_ros.ros.conversions import image_to_msg
    return image_to_msg(cv2.imread(str(data / NYU_DEPTH), cv2.IMREAD_UNCHANGED), '16UC1', 0, 'nyu_depth')


def audio_chunk_msgs(data: pathlib.Path) -> list:
    """The bird clip as consecutive 100 ms S16LE AudioChunks (stamps set by the caller)."""
    from mm_llm_ros.ros.conversions import audio_to_msg
    waveform, rate = read_wav(data / BIRD_WAV)
    step = int(rate * AUDIO_CHUNK_S)
    return [audio_to_msg(waveform[:, offset:offset + step], rate, 'S16LE', 0, 'mic')
            for offset in range(0, waveform.shape[1], step)]


def encoder_defaults() -> dict[str, Any]:
    """The encoder node's parameter defaults, so the bench prepares inputs exactly as the node would."""
    from mm_llm_ros.core.params import NODE_PARAMS
    return {name: param.default for name, param in NODE_PARAMS[NODE_NAME].items()}


# --- 1. stages per modality ------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One input as the node gets it: `decode()` turns the serialised message(s) into sensor data (what the
    executor and the callback do), `preprocess(decoded)` makes the model input (what the worker does)."""
    label: str
    modality: str
    decode: Callable[[], Any]
    preprocess: Callable[[Any], Any]


@dataclass
class StageRow:
    case: Case
    decode: Timing
    preprocess: Timing
    publish: Timing

    @property
    def node_work(self) -> Timing:
        return self.decode + self.preprocess + self.publish


def node_cases(data: pathlib.Path) -> list[Case]:
    """The inputs of section 1, each decoded and preprocessed as the node does with its default parameters."""
    from rclpy.serialization import deserialize_message, serialize_message

    from mm_llm_ros.core.audio_buffer import AudioRingBuffer
    from mm_llm_ros.core.imagebind.lidar_projection import (T_OPTICAL_FROM_LIDAR, lidar_to_depth_input,
                                                            virtual_camera)
    from mm_llm_ros.core.imagebind.preprocess import preprocess_audio, preprocess_depth, preprocess_vision
    from mm_llm_ros.ros import conversions

    params = encoder_defaults()

    def decoder(msg, read: Callable[[Any], Any]) -> Callable[[], Any]:
        wire, msg_type = serialize_message(msg), type(msg)
        return lambda: read(deserialize_message(wire, msg_type))

    chunks = audio_chunk_msgs(data)
    chunk_type = type(chunks[0])
    wires = [serialize_message(set_stamp(chunk, i * int(AUDIO_CHUNK_S * 1e9))) for i, chunk in enumerate(chunks)]

    def decode_audio_window():
        """Every chunk of the encoded window through the callback's path (an upper bound per encode: in steady
        state each chunk is decoded once and an encode only consumes the chunks that arrived since the last)."""
        buffer = AudioRingBuffer(params['audio.window_s'])
        for wire in wires:
            msg = deserialize_message(wire, chunk_type)
            audio = conversions.audio_from_msg(msg)
            buffer.append(audio.waveform, audio.sample_rate, conversions.stamp_to_ns(msg.header.stamp))
        return buffer.snapshot()

    size = int(params['lidar.image_size'])
    lidar_camera = virtual_camera(params['lidar.fov_deg'], size, size)

    def project(cloud):
        return lidar_to_depth_input(cloud.xyz, lidar_camera, T_OPTICAL_FROM_LIDAR, params['lidar.min_range_m'],
                                    params['lidar.max_range_m'],
                                    fill_kernel_size=2 * int(params['lidar.hole_fill_px']) + 1)

    seconds = len(chunks) * AUDIO_CHUNK_S
    return [
        Case('nuScenes CAM_FRONT 1600x900, raw rgb8 Image', 'vision',
             decoder(camera_msg(data), conversions.image_from_msg), lambda image: preprocess_vision(image.rgb)),
        Case('nuScenes CAM_FRONT 1600x900, JPEG CompressedImage', 'vision',
             decoder(jpeg_msg(data), conversions.compressed_image_from_msg),
             lambda image: preprocess_vision(image.rgb)),
        Case(f'bird.wav, {seconds:.0f} s window of {len(chunks)} AudioChunks (44.1 kHz stereo)', 'audio',
             decode_audio_window, lambda window: preprocess_audio(window.waveform, window.sample_rate)),
        Case(f'KITTI 000008 lidar scan, 17k points -> virtual {size}x{size} camera', 'depth',
             decoder(lidar_msg(data), conversions.pointcloud_from_msg), project),
        Case('NYU depth 640x480, 16UC1 Image', 'depth',
             decoder(depth_msg(data), conversions.image_from_msg),
             lambda image: preprocess_depth(image.depth_m, NYU_FOCAL_PX)),
    ]


def publish_call(modality: str) -> Callable[[], bytes]:
    """Build an Embedding message the way the node does and serialise it (what `publish` costs before DDS)."""
    import numpy as np
    from rclpy.serialization import serialize_message

    from mm_llm_ros_interfaces.msg import Embedding

    vector = np.random.default_rng(0).standard_normal(1024).astype(np.float32)

    def build_and_serialise() -> bytes:
        msg = Embedding(modality=modality, model='imagebind_huge (random weights)', source_topic='/camera/image_raw')
        set_stamp(msg, 1_532_402_927_612_460_000).header.frame_id = 'CAM_FRONT'
        msg.embedding = np.asarray(vector, dtype=np.float32).ravel().tolist()
        return serialize_message(msg)
    return build_and_serialise


@dataclass
class ModelResult:
    preset: str
    name: str
    build_s: float
    repeats: int
    per_modality: dict[str, Timing]


def bench_section1(data: pathlib.Path, presets: Sequence[str], repeats: int, huge_repeats: int,
                   device: str = 'cpu', dtype: str = 'auto') -> tuple[list[StageRow], list[ModelResult]]:
    """Stage timings per input, and one forward per modality for each preset (batch of one, as the node encodes
    one stream). The forward's cost depends on the modality, not the input, so each runs on its first input.

    A cheap model is timed in the same rounds as the stages, so that its overhead ratios share their load
    conditions; huge forwards take seconds and get their own, fewer rounds. Each model is built once and freed
    before the next (huge holds ~5 GB).
    """
    from mm_llm_ros.core.imagebind.model import ImageBindConfig, ImageBindEncoder

    cases = node_cases(data)
    decoded = [case.decode() for case in cases]
    stage_calls: dict[tuple, Callable[[], object]] = {}
    inputs = {}
    for index, (case, item) in enumerate(zip(cases, decoded)):
        stage_calls[index, 'decode'] = case.decode
        stage_calls[index, 'preprocess'] = functools.partial(case.preprocess, item)
        stage_calls[index, 'publish'] = publish_call(case.modality)
        inputs.setdefault(case.modality, case.preprocess(item)[None])
    timings: dict[tuple, Timing] = {}
    models = []
    for preset in presets:
        start = time.perf_counter()
        encoder = ImageBindEncoder(ImageBindConfig(preset=preset, allow_random_weights=True, device=device,
                                                   dtype=dtype))
        build_s = time.perf_counter() - start
        forwards = {(preset, modality): functools.partial(encoder.encode, {modality: tensor})
                    for modality, tensor in inputs.items()}
        print(f'encoders: section 1, {encoder.model_name} built in {build_s:.1f} s', file=sys.stderr)
        if preset == 'huge':
            timings |= time_calls(forwards, huge_repeats)
        else:
            timings |= time_calls({**stage_calls, **forwards}, repeats)
        models.append(ModelResult(preset, encoder.model_name, build_s,
                                  huge_repeats if preset == 'huge' else repeats,
                                  {modality: timings[preset, modality] for modality in inputs}))
        del encoder, forwards
        gc.collect()
    if not all(key in timings for key in stage_calls):
        timings |= time_calls(stage_calls, repeats)
    rows = [StageRow(case, timings[index, 'decode'], timings[index, 'preprocess'], timings[index, 'publish'])
            for index, case in enumerate(cases)]
    return rows, models


# --- 2. ours vs the official loaders ---------------------------------------------------------------------------------


def official_worker(data: pathlib.Path, repeats: int, threads: int, out_dir: pathlib.Path) -> None:
    """Runs under --official-python: time only the official loader calls, write timings (JSON) and outputs (npz)."""
    import numpy as np
    import torch
    import torchvision.transforms.functional as tv_functional
    # pytorchvideo 0.1.5 imports a torchvision module removed in 0.17 (the shim of make_golden_fixtures.py).
    sys.modules.setdefault('torchvision.transforms.functional_tensor', tv_functional)
    import imagebind.data as official

    torch.set_num_threads(threads)
    loaders = {'vision': official.load_and_transform_vision_data, 'audio': official.load_and_transform_audio_data}
    timings, outputs = {}, {}
    for modality, rel in COMPARED_FILES.items():
        def call(load=loaders[modality], path=str(data / rel)):
            return load([path], 'cpu')
        outputs[modality] = call()[0].numpy()
        timings[modality] = asdict(time_call(call, repeats, warmup=0))  # the call above was the warm-up
    np.savez(out_dir / 'official.npz', **outputs)
    (out_dir / 'official.json').write_text(json.dumps({'timings': timings, 'torch': torch.__version__}))


@dataclass
class ComparisonRow:
    modality: str
    input: str
    official: Timing
    ours_file: Timing
    ours_memory: Timing
    max_abs_diff: float


def compare_official(data: pathlib.Path, repeats: int, threads: int, python: Optional[pathlib.Path]
                     ) -> tuple[list[ComparisonRow], str]:
    """(rows, note): the official loaders timed in their own interpreter, our path on the same files here."""
    import numpy as np

    from mm_llm_ros.core.imagebind.preprocess import preprocess_audio, preprocess_vision

    if python is None or not python.exists():
        return [], (f'Skipped: no interpreter with the official stack at {python or DEFAULT_OFFICIAL_PYTHON} '
                    '(make one as described in '
                    'scripts/make_golden_fixtures.py and pass --official-python).')
    with tempfile.TemporaryDirectory(prefix='encoders-official-') as tmp:
        command = [str(python), '-I', str(pathlib.Path(__file__).resolve()), '--official-worker', tmp,
                   '--data', str(data), '--repeats', str(repeats), '--threads', str(threads)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return [], 'Skipped: the official loaders did not finish within 600 s.'
        if done.returncode != 0:
            return [], f'Skipped: the official loaders failed (exit {done.returncode}): {done.stderr[-800:]}'
        report = json.loads((pathlib.Path(tmp) / 'official.json').read_text())
        with np.load(pathlib.Path(tmp) / 'official.npz') as official_outputs:
            references = {key: official_outputs[key] for key in official_outputs.files}

    readers = {'vision': read_rgb, 'audio': read_wav}
    preprocessors = {'vision': preprocess_vision, 'audio': lambda wav: preprocess_audio(*wav)}
    rows = []
    for modality, rel in COMPARED_FILES.items():
        path, read, prepare = data / rel, readers[modality], preprocessors[modality]
        array = read(path)
        rows.append(ComparisonRow(
            modality, rel, Timing(**report['timings'][modality]),
            time_call(lambda: prepare(read(path)), repeats), time_call(lambda: prepare(array), repeats),
            float(np.abs(prepare(array).numpy() - references[modality]).max())))
    return rows, f"official stack: torch {report['torch']} in {python}"


# --- 3. sustained input through the node -----------------------------------------------------------------------------


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f'timed out after {timeout_s:.0f} s waiting for {what}')
        time.sleep(POLL_S)
    return value


@dataclass
class StreamSpec:
    """One emulated sensor: the node's stream name (its /diagnostics entry and embedding topic, core/specs.py), the
    modality of its embeddings, its rate."""
    name: str
    modality: str
    topic: str
    rate_hz: float
    message: Callable[[int, int], Any]  # (publish index, wall ns when publishing began) -> stamped message


def sensor_streams(data: pathlib.Path) -> list[StreamSpec]:
    """30 Hz camera (the real 1600x900 frame), 10 Hz lidar (the real KITTI scan), live audio in 100 ms chunks.

    Camera and lidar are stamped when published. A microphone publishes a chunk once it is complete, so chunk i
    (stamped with its first sample) goes out 100 ms after its stamp, and audio stamps follow the sample clock.
    """
    camera, lidar, chunks = camera_msg(data), lidar_msg(data), audio_chunk_msgs(data)
    chunk_ns = int(AUDIO_CHUNK_S * 1e9)
    return [
        StreamSpec('camera', 'vision', '/camera/image_raw', 30.0, lambda i, t0: set_stamp(camera, time.time_ns())),
        StreamSpec('lidar', 'depth', '/points', 10.0, lambda i, t0: set_stamp(lidar, time.time_ns())),
        StreamSpec('audio', 'audio', '/audio', 1 / AUDIO_CHUNK_S,
                   lambda i, t0: set_stamp(chunks[i % len(chunks)], t0 + (i - 1) * chunk_ns)),
    ]


@dataclass
class Diagnostics:
    arrival: float                       # time.monotonic() when it arrived
    streams: dict[str, dict[str, str]]   # stream name -> key/values


class Probe:
    """The bench's rclpy node on a background executor: sensor publishers, embedding arrivals, /diagnostics."""

    def __init__(self, specs: Sequence[StreamSpec]):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.context import Context
        from rclpy.executors import MultiThreadedExecutor
        from sensor_msgs.msg import Image, PointCloud2

        from mm_llm_ros.ros.qos import EMBEDDING_QOS, SENSOR_QOS
        from mm_llm_ros_interfaces.msg import AudioChunk, Embedding

        self.context = Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('encoder_bench', context=self.context)
        types = {'camera': Image, 'lidar': PointCloud2, 'audio': AudioChunk}
        self.publishers = {s.name: self.node.create_publisher(types[s.name], s.topic, SENSOR_QOS) for s in specs}
        self._lock = threading.Lock()
        self.arrivals: dict[str, list[tuple[float, int, int]]] = collections.defaultdict(list)  # mono, stamp, wall
        self.model_name = ''
        self.diagnostics: list[Diagnostics] = []
        self.subscriptions = [
            self.node.create_subscription(Embedding, f'/mm_llm/embedding/{s.name}', self._on_embedding,
                                          EMBEDDING_QOS) for s in specs]
        self.subscriptions.append(self.node.create_subscription(DiagnosticArray, '/diagnostics',
                                                                self._on_diagnostics, 10))
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, name='probe-executor', daemon=True)
        self._thread.start()

    def _on_embedding(self, msg) -> None:
        arrival_ns, arrival = time.time_ns(), time.monotonic()
        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self._lock:
            self.arrivals[msg.modality].append((arrival, stamp_ns, arrival_ns))
            self.model_name = msg.model

    def _on_diagnostics(self, msg) -> None:
        prefix = f'{NODE_NAME}: '
        streams = {status.name[len(prefix):]: {kv.key: kv.value for kv in status.values}
                   for status in msg.status if status.name.startswith(prefix)}
        if streams:
            with self._lock:
                self.diagnostics.append(Diagnostics(time.monotonic(), streams))

    def matched(self) -> bool:
        return (all(pub.get_subscription_count() > 0 for pub in self.publishers.values())
                and all(sub.get_publisher_count() > 0 for sub in self.subscriptions))

    def embedded(self, modalities: Sequence[str]) -> bool:
        with self._lock:
            return all(self.arrivals[m] for m in modalities)

    def diagnostics_after(self, moment: float) -> Optional[Diagnostics]:
        with self._lock:
            return next((d for d in self.diagnostics if d.arrival > moment), None)

    def arrivals_between(self, modality: str, start: float, end: float) -> list[tuple[float, int, int]]:
        with self._lock:
            return [a for a in self.arrivals[modality] if start < a[0] <= end]

    def close(self) -> None:
        import rclpy
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(5.0)


class Pacer:
    """Publishes every stream on its own fixed schedule from the calling thread. Its sleeps are the sensors'
    pacing; waits for the graph are conditions checked between publications, always with a timeout."""

    def __init__(self, probe: Probe, specs: Sequence[StreamSpec], alive: Callable[[], bool]):
        self.probe, self.specs, self.alive = probe, list(specs), alive
        self.start_ns = time.time_ns()
        start = time.monotonic()
        self.next_due = {s.name: start for s in self.specs}
        self.sent: collections.Counter = collections.Counter()
        self.late = collections.Counter()   # publications more than one period behind schedule

    def _publish_due(self) -> float:
        now = time.monotonic()
        for spec in self.specs:
            if now >= self.next_due[spec.name]:
                self.probe.publishers[spec.name].publish(spec.message(self.sent[spec.name], self.start_ns))
                self.sent[spec.name] += 1
                period = 1.0 / spec.rate_hz
                self.next_due[spec.name] += period
                if self.next_due[spec.name] <= now:  # a whole period behind: keep the rate, do not burst
                    self.late[spec.name] += 1
                    self.next_due[spec.name] = now + period
        return max(0.0, min(self.next_due.values()) - time.monotonic())

    def run_until(self, condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            wait_s = self._publish_due()
            if value := condition():
                return value
            if not self.alive():
                raise RuntimeError(f'the encoder node exited while waiting for {what}')
            if time.monotonic() > deadline:
                raise TimeoutError(f'timed out after {timeout_s:.0f} s waiting for {what}')
            time.sleep(min(wait_s, POLL_S))


class MemorySampler:
    """Samples a process's RSS every `period_s` on a background thread."""

    def __init__(self, pid: int, period_s: float = 0.5):
        import psutil
        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), name='rss-sampler', daemon=True)
        self._thread.start()

    def _run(self, period_s: float) -> None:
        import psutil
        while not self._stop.wait(period_s):
            with contextlib.suppress(psutil.Error):
                self.samples.append((time.monotonic(), self.process.memory_info().rss))

    def between(self, start: float, end: float) -> list[int]:
        return [rss for moment, rss in self.samples if start <= moment <= end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


@contextlib.contextmanager
def encoder_node(preset: str, threads: int, max_rate_hz: float, log_path: pathlib.Path, device: str = 'cpu',
                 dtype: str = 'auto') -> Iterator[Any]:
    """The installed `encoder` executable with tiny.yaml + overrides, in its own process group; killed at exit."""
    from mm_llm_ros.node_processes import executable_path, ros_args, start_process

    overrides = {'model.preset': preset, 'model.allow_random_weights': True, 'device': device, 'dtype': dtype,
                 'max_rate_hz': max_rate_hz, 'diagnostics_period_s': DIAGNOSTICS_PERIOD_S,
                 'use_camera': True, 'use_audio': True, 'use_lidar': True, 'camera.transport': 'raw'}
    command = [str(executable_path(NODE_NAME)), *ros_args(parameters=[TINY_YAML, overrides], log_level='warn')]
    process = start_process(command, log_path, env={'OMP_NUM_THREADS': str(threads)})
    try:
        yield process
    finally:
        stop_processes([process])


@dataclass
class StreamResult:
    name: str
    topic: str
    offered_hz: float
    published: int
    received: int      # by the node (its diagnostics)
    dropped: int       # replaced in the node's one-item slot before the worker took them
    encoded: int       # embeddings that arrived here
    latencies_ms: list[float]

    def latency_ms(self, q: float) -> float:
        import numpy as np
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float('nan')


@dataclass
class SustainedResult:
    preset: str
    model_name: str = ''
    startup_s: float = 0.0
    window_s: float = 0.0
    streams: list[StreamResult] = field(default_factory=list)
    rss_ready_mb: float = 0.0
    rss_window_mb: list[float] = field(default_factory=list)
    node_cpu_cores: float = 0.0
    bench_cpu_cores: float = 0.0
    model_p50_ms: float = float('nan')
    late: dict[str, int] = field(default_factory=dict)
    log_problems: list[str] = field(default_factory=list)            # while measuring
    shutdown_problems: list[str] = field(default_factory=list)       # after SIGINT
    error: str = ''


def _counter(diagnostics: Diagnostics, stream: str, key: str) -> int:
    return int(float(diagnostics.streams.get(stream, {}).get(key, 0)))


def sustained_run(preset: str, data: pathlib.Path, duration_s: float, threads: int, max_rate_hz: float,
                  device: str = 'cpu', dtype: str = 'auto') -> SustainedResult:
    """Start the node, feed it at sensor rates until every stream has been encoded once (warm-up), then measure
    between two /diagnostics messages `duration_s` apart, so counters, arrivals and publications share a window."""
    import psutil

    result = SustainedResult(preset)
    specs = sensor_streams(data)
    with tempfile.TemporaryDirectory(prefix='encoders-node-') as tmp:
        log_path = pathlib.Path(tmp) / 'encoder.log'
        started = time.monotonic()
        measured_log = ''
        try:
            with encoder_node(preset, threads, max_rate_hz, log_path, device, dtype) as process:
                probe = Probe(specs)
                sampler = MemorySampler(process.pid)
                try:
                    _measure(result, probe, sampler, specs, process, started, duration_s)
                finally:
                    sampler.stop()
                    probe.close()
                    measured_log = _read(log_path)
        except (TimeoutError, RuntimeError, psutil.Error) as exc:
            result.error = f'{exc}; node log tail: {_read(log_path)[-600:]!r}'
        full_log = _read(log_path)
    result.log_problems = log_problems(measured_log)
    result.shutdown_problems = log_problems(full_log[len(measured_log):])
    return result


def _read(path: pathlib.Path) -> str:
    return path.read_text(errors='replace') if path.exists() else ''


def log_problems(log: str) -> list[str]:
    """Count each distinct exception in a node log (the line that ends a traceback) and failed encodes."""
    lines = log.splitlines()
    exceptions = collections.Counter()
    for index, line in enumerate(lines):
        if line.startswith('Traceback'):
            exceptions[next((f for f in lines[index + 1:] if f and not f.startswith(' ')), '?')] += 1
    failed = sum('encoding failed' in line for line in lines)
    return ([f'{count} x `{text}`' for text, count in exceptions.items()]
            + ([f'{failed} x encoding failed'] if failed else []))


def _measure(result: SustainedResult, probe: Probe, sampler: MemorySampler, specs: Sequence[StreamSpec],
             process: subprocess.Popen, started: float, duration_s: float) -> None:
    import psutil

    def alive() -> bool:
        return process.poll() is None

    node = psutil.Process(process.pid)
    wait_until(lambda: probe.matched() or not alive(), STARTUP_TIMEOUT_S[result.preset], 'the node to subscribe')
    if not alive():
        raise RuntimeError(f'the encoder node exited with {process.returncode} during start-up')
    result.startup_s = time.monotonic() - started
    result.rss_ready_mb = node.memory_info().rss / 2**20

    pacer = Pacer(probe, specs, alive)
    pacer.run_until(lambda: probe.embedded([s.modality for s in specs]), WARMUP_TIMEOUT_S[result.preset],
                    'a first embedding of every stream')
    mark = time.monotonic()
    first = pacer.run_until(lambda: probe.diagnostics_after(mark), 10.0, 'diagnostics')
    sent0, cpu0, bench0 = dict(pacer.sent), node.cpu_times(), time.process_time()
    pacer.run_until(lambda: time.monotonic() >= first.arrival + duration_s, duration_s + 10.0, 'the window')
    mark = time.monotonic()
    last = pacer.run_until(lambda: probe.diagnostics_after(mark), 10.0, 'diagnostics')
    sent1, cpu1, bench1 = dict(pacer.sent), node.cpu_times(), time.process_time()

    result.window_s = window = last.arrival - first.arrival
    result.model_name = probe.model_name
    result.node_cpu_cores = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / window
    result.bench_cpu_cores = (bench1 - bench0) / window
    result.rss_window_mb = [rss / 2**20 for rss in sampler.between(first.arrival, last.arrival)]
    result.late = {name: count for name, count in pacer.late.items() if count}
    result.model_p50_ms = 1e3 * float(last.streams.get(specs[0].name, {}).get('model_p50_s', 'nan'))
    for spec in specs:
        arrivals = probe.arrivals_between(spec.modality, first.arrival, last.arrival)
        result.streams.append(StreamResult(
            spec.name, spec.topic, spec.rate_hz, sent1[spec.name] - sent0[spec.name],
            _counter(last, spec.name, 'received') - _counter(first, spec.name, 'received'),
            _counter(last, spec.name, 'dropped') - _counter(first, spec.name, 'dropped'),
            len(arrivals), [(wall - stamp) / 1e6 for _, stamp, wall in arrivals]))


# --- report ----------------------------------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f'{value:.3f}' if value < 1 else f'{value:.1f}' if value < 100 else f'{value:.0f}'


def _git_state() -> str:
    try:
        return subprocess.run(['git', '-C', str(REPO), 'describe', '--always', '--dirty'], capture_output=True,
                              text=True, timeout=10).stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def render_header(args: argparse.Namespace) -> list[str]:
    import torch

    from mm_llm_ros.core.device import describe, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    where = describe(device, resolve_dtype(args.dtype, device))
    return [
        f'# ImageBind encoder node: cost per modality and sustained input ({where})',
        '',
        f'Generated by `{" ".join(["bench/encoders.py", *args.argv])}` at commit {_git_state()} on '
        f'{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs (shared with other jobs), '
        f'load average {os.getloadavg()[0]:.1f} at the end; Python {platform.python_version()}, torch '
        f'{torch.__version__}, {args.threads} torch thread(s) in the bench and in the node. Random weights '
        'throughout: speed does not depend on the weights\' values.',
        '',
    ]


def render_stages(rows: Sequence[StageRow], models: Sequence[ModelResult], repeats: int,
                  on_gpu: bool = False) -> list[str]:
    model_repeats = ', '.join(f'{m.preset}: {m.repeats}' for m in models)
    lines = [
        '## 1. Where the time goes, per input',
        '',
        f'Median wall time (ms) of {repeats} calls after one warm-up round ({model_repeats} model calls); the '
        'calls take turns round by round. *decode*: deserialising the ROS message (as the executor does) and '
        'decoding it (the callback\'s `*_from_msg`); for audio, every chunk of the encoded window, an upper '
        'bound. *preprocess*: the worker\'s step to the model input (lidar: projection, hole filling and depth '
        'preprocessing with the node\'s default parameters). *publish*: building the 1024-d Embedding message '
        'and serialising it. *overhead* = (decode + preprocess + publish) / model, from wall time and, in '
        f'brackets, from process CPU time (steadier on a shared machine; on a GPU the verdict uses wall time, since '
        f'the model\'s CPU time there is only launching kernels). Target on huge: <= {OVERHEAD_TARGET:.0%}.',
        '',
    ]
    header = '| input | modality | decode | preprocess | publish |'
    rule = '|---|---|---:|---:|---:|'
    for model in models:
        header += f' {model.preset} model | {model.preset} overhead |'
        rule += '---:|---:|'
    lines += [header, rule]
    for row in rows:
        line = (f'| {row.case.label} | {row.case.modality} | {_ms(row.decode.wall_ms)} | '
                f'{_ms(row.preprocess.wall_ms)} | {_ms(row.publish.wall_ms)} |')
        for model in models:
            forward = model.per_modality[row.case.modality]
            work = row.node_work
            line += (f' {_ms(forward.wall_ms)} | {work.wall_ms / forward.wall_ms:.1%} '
                     f'({work.cpu_ms / forward.cpu_ms:.1%}) |')
        lines.append(line)
    lines.append('')
    for model in models:
        lines.append(f'- {model.name} built in {model.build_s:.1f} s.')
    huge = next((m for m in models if m.preset == 'huge'), None)
    if huge is not None:
        basis = 'wall_ms' if on_gpu else 'cpu_ms'

        def overhead(row: StageRow) -> float:
            return getattr(row.node_work, basis) / getattr(huge.per_modality[row.case.modality], basis)

        worst = max(rows, key=overhead)
        verdict = 'met' if overhead(worst) <= OVERHEAD_TARGET else 'NOT met'
        lines.append(f'- Overhead target on huge {verdict}: the largest is {overhead(worst):.1%} '
                     f'({"wall" if on_gpu else "CPU"} time) for {worst.case.label}.')
    return lines + ['']


def render_comparison(rows: Sequence[ComparisonRow], note: str, repeats: int) -> list[str]:
    lines = ['## 2. Our in-memory preprocessing vs the official file-based loaders', '']
    if not rows:
        return lines + [note, '']
    lines += [
        f'Median wall time (ms) of {repeats} calls after one warm-up; the official `load_and_transform_*_data` '
        f'run in a separate interpreter ({note}) that times only the loader calls. *ours from file*: the same file '
        'decoded with PIL / stdlib `wave`, then our preprocessing; *ours in memory*: preprocessing of the decoded '
        'array, which is what the node does. *speed-up* = official / ours from file. *max |diff|*: largest '
        'element-wise difference between our tensor and the official one.',
        '',
        '| modality | input | official (ms) | ours from file (ms) | ours in memory (ms) | speed-up | max \\|diff\\| |',
        '|---|---|---:|---:|---:|---:|---:|',
    ]
    for row in rows:
        lines.append(f'| {row.modality} | `{row.input.rsplit("/", 1)[-1]}` | {_ms(row.official.wall_ms)} | '
                     f'{_ms(row.ours_file.wall_ms)} | {_ms(row.ours_memory.wall_ms)} | '
                     f'{row.official.wall_ms / row.ours_file.wall_ms:.2f}x | {row.max_abs_diff:.2g} |')
    return lines + ['', 'Depth has no official loader (see `preprocess_depth`), so it is not compared.', '']


def render_sustained(results: Sequence[SustainedResult], max_rate_hz: float) -> list[str]:
    lines = [
        '## 3. Sustained input through the real node over DDS',
        '',
        f'The installed `encoder` executable (camera + audio + lidar in one process, one shared model; '
        f'`config/tiny.yaml` with `model.preset` set per run, `max_rate_hz: {max_rate_hz:g}` so that only the '
        'worker\'s speed limits the rate, diagnostics every '
        f'{DIAGNOSTICS_PERIOD_S:g} s) in a loopback-only network namespace. Input from this process: the real '
        '1600x900 nuScenes frame as raw rgb8 at 30 Hz, the KITTI scan at 10 Hz, the bird clip looped as 100 ms '
        'S16LE chunks in real time. Measured after every stream had produced one embedding, between two '
        '/diagnostics messages (the window below each table). *received*/*dropped*: the node\'s counters over '
        'the window (dropped = replaced in its one-item slot before the worker took it: the worker was busy). '
        '*latency*: sensor stamp (audio: the newest sample) to arrival of the embedding here.',
        '',
    ]
    for result in results:
        lines.append(f'### {result.preset}' + (f': {result.model_name}' if result.model_name else ''))
        lines.append('')
        if result.error:
            lines += [f'Failed: {result.error}', '']
            continue
        lines += [
            '| stream | topic | offered (Hz) | published | received | dropped | encoded | encode rate (Hz) | '
            'latency p50 (ms) | latency p95 (ms) |',
            '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|',
        ]
        for s in result.streams:
            lines.append(f'| {s.name} | `{s.topic}` | {s.offered_hz:g} | {s.published} | {s.received} | '
                         f'{s.dropped} | {s.encoded} | {s.encoded / result.window_s:.2f} | '
                         f'{_ms(s.latency_ms(50))} | {_ms(s.latency_ms(95))} |')
        rss = result.rss_window_mb
        rss_text = (f'{rss[0]:.0f} MB at the start of the window, {rss[-1]:.0f} MB at its end (min '
                    f'{min(rss):.0f}, max {max(rss):.0f} MB over {len(rss)} samples)') if rss else 'not sampled'
        late = ', '.join(f'{name} {count}' for name, count in result.late.items()) or 'none'
        lines += [
            '',
            f'- Window {result.window_s:.1f} s; node ready (model built, subscribed) {result.startup_s:.1f} s '
            f'after start; model forward p50 {_ms(result.model_p50_ms)} ms (node diagnostics).',
            f'- Node RSS: {result.rss_ready_mb:.0f} MB when ready; {rss_text}.',
            f'- CPU over the window: node {result.node_cpu_cores:.2f} cores, this bench (publishers + '
            f'subscribers) {result.bench_cpu_cores:.2f} cores. Publications more than a period late: {late}.',
            f'- Node log while measuring: {", ".join(result.log_problems) or "no tracebacks, no failed encodes"}; '
            f'after SIGINT: {", ".join(result.shutdown_problems) or "clean"}.',
            '',
        ]
    return lines


# --- main ------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='tiny only, 5 s of sustained input, 5 repeats; writes --out only when given')
    parser.add_argument('--presets', nargs='+', choices=['tiny', 'huge'], default=None,
                        help='models for sections 1 and 3 (default: tiny huge; --quick: tiny)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads in the bench and in the node')
    parser.add_argument('--repeats', type=int, default=None, help='timed calls per stage (default 20; quick 5)')
    parser.add_argument('--huge-repeats', type=int, default=3, help='timed huge forwards per modality')
    parser.add_argument('--duration', type=float, default=None,
                        help='seconds of measured sustained input for tiny (default 20; quick 5)')
    parser.add_argument('--huge-duration', type=float, default=60.0,
                        help='seconds of measured sustained input for huge (a few of its ~10 s forwards)')
    parser.add_argument('--max-rate-hz', type=float, default=1000.0,
                        help="the node's max_rate_hz in section 3 (default: high enough not to limit)")
    parser.add_argument('--device', default='cpu', help='where the models run, in this process and in the node: '
                        'cpu, cuda or cuda:N')
    parser.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'float16', 'bfloat16'],
                        help='model dtype (auto: float16 on CUDA, float32 on the CPU)')
    parser.add_argument('--official-python', type=pathlib.Path,
                        default=DEFAULT_OFFICIAL_PYTHON if DEFAULT_OFFICIAL_PYTHON.exists() else None,
                        help=f'interpreter with the official ImageBind stack (default {DEFAULT_OFFICIAL_PYTHON} '
                             'if it exists; otherwise section 2 is skipped)')
    parser.add_argument('--data', type=pathlib.Path, default=DEFAULT_DATA, help='sample data folder (shared/data)')
    parser.add_argument('--out', type=pathlib.Path, default=None,
                        help=f'Markdown output (default {DEFAULT_OUT.relative_to(REPO)}; none with --quick)')
    parser.add_argument('--official-worker', type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(argv)
    args.presets = args.presets or (['tiny'] if args.quick else ['tiny', 'huge'])
    args.repeats = args.repeats or (5 if args.quick else 20)
    args.duration = args.duration or (5.0 if args.quick else 20.0)
    if args.out is None and not args.quick:
        args.out = DEFAULT_OUT
    return args


def run(args: argparse.Namespace) -> str:
    import torch
    torch.set_num_threads(args.threads)

    print(f'encoders: section 1, stages and models ({", ".join(args.presets)})', file=sys.stderr)
    stage_rows, models = bench_section1(args.data, args.presets, args.repeats, args.huge_repeats, args.device,
                                        args.dtype)
    print('encoders: section 2, official loaders', file=sys.stderr)
    comparison, note = compare_official(args.data, args.repeats, args.threads, args.official_python)
    sustained = []
    for preset in args.presets:
        duration = args.huge_duration if preset == 'huge' else args.duration
        print(f'encoders: section 3, {preset} node for {duration:g} s', file=sys.stderr)
        sustained.append(sustained_run(preset, args.data, duration, args.threads, args.max_rate_hz, args.device,
                                       args.dtype))
    return '\n'.join([*render_header(args), *render_stages(stage_rows, models, args.repeats, args.device != 'cpu'),
                      *render_comparison(comparison, note, args.repeats),
                      *render_sustained(sustained, args.max_rate_hz)])


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.official_worker is not None:  # inside --official-python: stdlib and the official stack only
        official_worker(args.data, args.repeats, args.threads, args.official_worker)
        return 0
    if not (args.data / 'MANIFEST.md').is_file():
        raise SystemExit(f'encoders: sample data not found at {args.data} (set --data or MM_LLM_SHARED_DATA)')
    reexec_in_loopback_namespace(NETNS, pathlib.Path(__file__).resolve(), argv)
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    os.environ.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', str(FASTDDS_PROFILE))  # camera-sized samples
    try:
        importlib.import_module('rclpy')
        importlib.import_module('mm_llm_ros.node_processes')
    except ImportError as exc:
        raise SystemExit(f'encoders: {exc}; run scripts/setup.sh and source install/setup.bash first') from exc
    markdown = run(args)
    print(markdown)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + '.tmp')
        tmp.write_text(markdown)
        tmp.replace(args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
