"""sensor_replay: publish recorded or generated sensor data at its real rate, as live sensors would.

Sources (parameter ``source``): a generated street scene (default), a folder of images/WAV/point clouds, a scene
.yaml file, the nuScenes sample (``nuscenes:<data_dir>``) or an MCAP bag; see ``mm_llm_ros.core.replay``.

Files are stamped with the clock at publish time (the replay is "live"); audio chunks with the replay start plus
their first sample's offset, so consecutive chunks tile time exactly. Bags keep their recorded bytes, stamps
included, and their relative timing. One thread walks the timeline and sleeps until each event is due (no timer
per file, no drift). A bounded replay (``duration_s`` > 0 or ``loop`` false) logs a summary and exits 0.
"""
from __future__ import annotations

import collections
import functools
import importlib
import tempfile
import threading
import time
from typing import Iterator, NamedTuple, Optional, Protocol

import rclpy.logging
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, Imu, PointCloud2

from mm_llm_ros.core.params import NODE_PARAMS
from mm_llm_ros.core.replay import (BagError, FrameTrack, McapBag, RecordedTopic, ReplayConfig, ReplayEvent, Scene,
                                    Scheduler, SensorFileError, StreamKind, StreamSpec, TimedItem, load_payload,
                                    open_source, recorded_timeline, scene_tracks)
from mm_llm_ros.ros.conversions import (audio_to_msg, compressed_image_to_msg, image_to_msg, imu_to_msg,
                                        ns_to_stamp, pointcloud_to_msg)
from mm_llm_ros.ros.node_main import StartupError, run_node
from mm_llm_ros.ros.parameters import declare_parameters
from mm_llm_ros.ros.qos import SENSOR_QOS
from mm_llm_ros_interfaces.msg import AudioChunk

_CACHED_MESSAGES = 16  # decoded files kept ready; a folder of thousands of images is read as it plays
_POLL_S = 0.05


class Player(Protocol):
    """Publishes one kind of source; ``events()`` yields objects with a ``due_s`` attribute."""

    publishers: list

    def describe(self) -> str: ...

    def events(self) -> Iterator: ...

    def publish(self, event, late_s: float, start_ns: int) -> None: ...

    def summary(self) -> str: ...


class SensorReplayNode(Node):

    executor_threads = 2  # nothing to serve but parameter services: the replay runs on its own thread

    def __init__(self):
        super().__init__('sensor_replay')
        self.config = ReplayConfig(**declare_parameters(self, NODE_PARAMS['sensor_replay'].values()))
        self._scratch = tempfile.TemporaryDirectory(prefix='sensor_replay_')  # the generated scene's files
        try:
            source = open_source(self.config.source, self._scratch.name)
            self.player: Player = (ScenePlayer(self, source, self.config) if isinstance(source, Scene)
                                   else BagPlayer(self, source, self.config))
        except OSError as exc:
            raise StartupError(f'cannot read the source: {exc}') from exc
        self.exit_code = 0
        self._stop = threading.Event()
        bound = (f'for {self.config.duration_s:g} s' if self.config.duration_s
                 else 'looping' if self.config.loop else 'one pass')
        self.get_logger().info(f'replaying {self.player.describe()}; {bound}')
        self._thread = threading.Thread(target=self._run, name='sensor_replay', daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._scratch.cleanup()

    def _run(self) -> None:
        try:
            self._wait_for_subscribers()
            finished = self._replay()
        except Exception as exc:  # a crash in the thread must still end the process with a clear message
            if self._stop.is_set() or not self.context.ok():
                return  # shutting down: publishers may already be gone
            self.get_logger().error(f'replay failed: {exc!r}')
            self.exit_code, finished = 1, True
        if finished:
            self.context.try_shutdown()  # ends the executor's spin: the process exits with exit_code

    def _replay(self) -> bool:
        """Publish every event on time; True when the timeline ended, False when stopped."""
        start = time.monotonic()
        start_ns = self.get_clock().now().nanoseconds
        for event in self.player.events():
            delay = start + event.due_s - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            if self._stop.is_set():
                break
            self.player.publish(event, max(0.0, -delay), start_ns)
        stopped = self._stop.is_set()
        # After Ctrl-C the context is gone and the node's logger could not reach /rosout: log to the console.
        logger = self.get_logger() if self.context.ok() else rclpy.logging.get_logger(f'{self.get_name()}_exit')
        logger.info(f'replay {"stopped" if stopped else "finished"} after {time.monotonic() - start:.2f} s: '
                    f'{self.player.summary()}')
        return not stopped

    def _wait_for_subscribers(self) -> None:
        wanted = self.config.wait_for_subscribers
        if not wanted:
            return
        deadline = time.monotonic() + self.config.wait_for_subscribers_timeout_s

        def lacking():
            return [p.topic_name for p in self.player.publishers if p.get_subscription_count() < wanted]
        while lacking() and time.monotonic() < deadline and not self._stop.wait(_POLL_S):
            pass
        if lacking():
            self.get_logger().warning(f'replaying without {wanted} subscriber(s) on {", ".join(lacking())} '
                                      f'after {self.config.wait_for_subscribers_timeout_s:g} s')


class ScenePlayer:
    """Publishes the files of a :class:`Scene` on its streams' topics."""

    def __init__(self, node: Node, scene: Scene, config: ReplayConfig):
        self.node, self.scene, self.config = node, scene, config
        self.tracks = scene_tracks(scene, config.rate_hz)
        self.publishers = [self._create_publisher(stream) for stream in scene.streams]
        self.info_publishers = {index: node.create_publisher(CameraInfo, stream.camera_info_topic, SENSOR_QOS)
                                for index, stream in enumerate(scene.streams) if stream.camera_info}
        self.published: collections.Counter = collections.Counter()
        self.skipped: collections.Counter = collections.Counter()  # frames dropped because the player was late
        self.failed_files: set = set()
        self._payload = functools.lru_cache(maxsize=_CACHED_MESSAGES)(self._load)
        for index in range(len(scene.streams)):
            self._payload(index, 0)  # read each stream's first file now: a bad file fails at start-up

    def describe(self) -> str:
        rates = [f'{track.rate_hz:g} Hz' if isinstance(track, FrameTrack) else 'real time' for track in self.tracks]
        streams = ', '.join(f'{stream.describe()} at {rate}' for stream, rate in zip(self.scene.streams, rates))
        return f'{self.scene.name}: {streams}'

    def events(self) -> Iterator[ReplayEvent]:
        return Scheduler(self.tracks, self.config.timeline).events()

    def summary(self) -> str:
        parts = [f'{pub.topic_name} {self.published[i]}' + (f' ({self.skipped[i]} late, skipped)'
                                                            if self.skipped[i] else '')
                 for i, pub in enumerate(self.publishers)]
        failed = f'; unreadable: {", ".join(sorted(map(str, self.failed_files)))}' if self.failed_files else ''
        return 'published ' + ', '.join(parts) + failed

    def publish(self, event: ReplayEvent, late_s: float, start_ns: int) -> None:
        stream = self.scene.streams[event.stream]
        track = self.tracks[event.stream]
        if stream.kind.is_frame and late_s > 1.0 / track.rate_hz:
            self.skipped[event.stream] += 1  # a camera that falls behind drops frames, it does not queue them
            return
        try:
            payload = self._payload(event.stream, event.index)
        except SensorFileError as exc:
            if exc.path not in self.failed_files:
                self.failed_files.add(exc.path)
                self.node.get_logger().error(f'skipping unreadable file: {exc}')
            return
        if stream.kind is StreamKind.IMU:  # one message per sample, stamped with its own time
            start, stop = event.samples
            first_ns = start_ns + round(event.stamp_s * 1e9)
            for offset, sample in enumerate(payload.samples[start:stop]):
                self.publishers[event.stream].publish(imu_to_msg(
                    sample, first_ns + round(offset * 1e9 / payload.sample_rate), stream.frame_id))
            self.published[event.stream] += stop - start
            return
        if stream.kind is StreamKind.AUDIO:
            start, stop = event.samples
            stamp_ns = start_ns + round(event.stamp_s * 1e9)
            msg = audio_to_msg(payload.waveform[:, start:stop], payload.sample_rate, 'S16LE', stamp_ns,
                               stream.frame_id)
        else:
            msg = payload.message  # prepared once: only the stamp changes
            stamp_ns = self.node.get_clock().now().nanoseconds
            msg.header.stamp = ns_to_stamp(stamp_ns)
        self.publishers[event.stream].publish(msg)
        if event.stream in self.info_publishers:
            self.info_publishers[event.stream].publish(_camera_info(stream, payload.size, stamp_ns))
        self.published[event.stream] += 1

    def _create_publisher(self, stream: StreamSpec):
        if stream.kind is StreamKind.AUDIO:
            return self.node.create_publisher(AudioChunk, stream.topic, SENSOR_QOS)
        if stream.kind is StreamKind.POINTS:
            return self.node.create_publisher(PointCloud2, stream.topic, SENSOR_QOS)
        if stream.kind is StreamKind.IMU:
            return self.node.create_publisher(Imu, stream.topic, SENSOR_QOS)
        if stream.kind is StreamKind.IMAGE and self.config.image_transport == 'compressed':
            return self.node.create_publisher(CompressedImage, stream.topic + '/compressed', SENSOR_QOS)
        return self.node.create_publisher(Image, stream.topic, SENSOR_QOS)

    def _load(self, stream_index: int, file_index: int):
        """The decoded clip for audio; for frame streams a :class:`_Frame` whose message is stamped when sent."""
        stream = self.scene.streams[stream_index]
        payload = load_payload(stream, file_index)
        if stream.kind in (StreamKind.AUDIO, StreamKind.IMU):
            return payload
        if stream.kind is StreamKind.POINTS:
            return _Frame(pointcloud_to_msg(payload.xyz, 0, stream.frame_id, payload.intensity))
        size = payload.shape[:2]
        if stream.kind is StreamKind.DEPTH:
            return _Frame(image_to_msg(payload, '32FC1', 0, stream.frame_id), size)
        if stream.kind is StreamKind.THERMAL:
            return _Frame(image_to_msg(payload, 'mono16', 0, stream.frame_id), size)
        if self.config.image_transport == 'compressed':
            return _Frame(compressed_image_to_msg(payload, 'jpeg', 0, stream.frame_id), size)
        return _Frame(image_to_msg(payload, 'rgb8', 0, stream.frame_id), size)


class _Frame(NamedTuple):
    message: object
    size: tuple[int, int] = (0, 0)  # (height, width) of images


def _camera_info(stream: StreamSpec, size: tuple[int, int], stamp_ns: int) -> CameraInfo:
    """CameraInfo of an image stream: its intrinsics, the image size and, as for an unrectified monocular
    camera, R = I and P = [K | 0]."""
    k = stream.camera_info.k
    info = CameraInfo(height=size[0], width=size[1], k=list(k), d=list(stream.camera_info.d),
                      distortion_model=stream.camera_info.distortion_model,
                      r=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
                      p=[k[0], k[1], k[2], 0.0, k[3], k[4], k[5], 0.0, k[6], k[7], k[8], 0.0])
    info.header.frame_id = stream.frame_id
    info.header.stamp = ns_to_stamp(stamp_ns)
    return info


class BagPlayer:
    """Republishes an MCAP bag's raw messages with their recorded timing (and recorded QoS reliability)."""

    def __init__(self, node: Node, bag: McapBag, config: ReplayConfig):
        self.node, self.bag, self.config = node, bag, config
        self.skipped_topics = list(bag.skipped)
        self.by_topic = {}
        for topic in bag.topics:
            msg_type = _message_class(topic)
            if msg_type is None:
                self.skipped_topics.append(f'{topic.topic} ({topic.type_name} is not installed)')
                continue
            qos = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                             reliability=(ReliabilityPolicy.RELIABLE if topic.reliable
                                          else ReliabilityPolicy.BEST_EFFORT),
                             durability=(DurabilityPolicy.TRANSIENT_LOCAL if topic.transient_local
                                         else DurabilityPolicy.VOLATILE))
            self.by_topic[topic.topic] = node.create_publisher(msg_type, topic.topic, qos)
        if not self.by_topic:
            raise StartupError(f'{bag.path}: none of its topics can be published: {", ".join(self.skipped_topics)}')
        self.publishers = list(self.by_topic.values())
        self.published: collections.Counter = collections.Counter()

    def describe(self) -> str:
        topics = ', '.join(f'{t.topic} ({t.type_name}, {t.message_count} msgs)' for t in self.bag.topics
                           if t.topic in self.by_topic)
        skipped = f'; skipping {", ".join(self.skipped_topics)}' if self.skipped_topics else ''
        return f'bag {self.bag.path.name}: {topics}{skipped}'

    def events(self) -> Iterator[TimedItem]:
        return recorded_timeline(self.bag.messages, self.config.timeline)

    def summary(self) -> str:
        return 'published ' + ', '.join(f'{topic} {self.published[topic]}' for topic in self.by_topic)

    def publish(self, event: TimedItem, late_s: float, start_ns: int) -> None:
        message = event.item
        publisher = self.by_topic.get(message.topic)
        if publisher is not None:
            publisher.publish(message.data)  # serialized CDR as recorded
            self.published[message.topic] += 1


def _message_class(topic: RecordedTopic) -> Optional[type]:
    """The installed Python class of a recorded topic's type, or None."""
    try:
        module, name = topic.python_type
        return getattr(importlib.import_module(module), name)
    except (BagError, ImportError, AttributeError):
        return None


def main(args=None) -> None:
    nodes: list[SensorReplayNode] = []

    def create() -> SensorReplayNode:
        nodes.append(SensorReplayNode())
        return nodes[-1]
    code = run_node(create, args)
    raise SystemExit(code or (nodes[0].exit_code if nodes else 0))


if __name__ == '__main__':
    main()
