"""grounding_node: grounded perception context (scene text, sound events, obstacle geometry) from the sensors.

Each enabled extractor (use_ocr, use_audio_events, use_geometry) runs on its own `LatestWorker` thread on the
freshest input, at most `<ocr|audio|geometry>.max_rate_hz` times a second, and publishes a PerceptionContext on
`mm_llm/context/<kind>`, stamped like its source and latched (transient local): AR/VR bridges and the LLM node
subscribe to it like to any sensor, and a late joiner gets the latest at once. Callbacks only hand messages over;
audio chunks are decoded in the callback (cheap) into a ring buffer whose newest window is analysed.

A camera frame or scan that cannot be decoded gives an empty context (and a counted rejection), never an error.
An unusable audio chunk is counted and left out of the window, which stays what it was: a lost chunk is no
evidence of silence. Models load at start-up, so a missing package or model file stops the node with one message.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image, PointCloud2

from mm_llm_ros.core.audio_buffer import AudioBufferError, AudioRingBuffer
from mm_llm_ros.core.grounding import (AudioEventsResult, GeometryResult, GroundingResult, OcrResult,
                                       config_from_params)
from mm_llm_ros.core.imagebind.lidar_projection import yaw_to_forward
from mm_llm_ros.core.latest_worker import LatestWorker
from mm_llm_ros.core.params import NODE_PARAMS
from mm_llm_ros.core.sensor_decoding import DecodeError, DecodeLimits, DecodeReason
from mm_llm_ros.core.specs import CONTEXT_KIND_SPECS, SENSORS, ContextKindSpec, resolve
from mm_llm_ros.ros.conversions import (append_audio, compressed_image_from_msg, image_from_msg, ns_to_stamp,
                                        pointcloud_from_msg, stamp_to_ns)
from mm_llm_ros.ros.diagnostics import make_array, make_status
from mm_llm_ros.ros.node_main import StartupError, exit_now, run_node
from mm_llm_ros.ros.parameters import declare_parameters
from mm_llm_ros.ros.qos import LATCHED_QOS, SENSOR_QOS
from mm_llm_ros_interfaces.msg import AudioChunk, PerceptionContext


class ExtractorInput(NamedTuple):
    """Positional arguments of an extractor call and the stamp its result is published with."""
    args: tuple
    stamp_ns: int


@dataclasses.dataclass
class Channel:
    """One extractor with its input preparation, worker thread and output topic."""
    kind: str
    # Decodes a message into the extractor's input; None: nothing to analyse yet. Raises DecodeError.
    prepare: Callable[[Any], Optional[ExtractorInput]]
    extract: Callable[..., GroundingResult]
    empty_result: Callable[[], GroundingResult]   # what an undecodable message gives
    publisher: Any
    logger: Any                                   # its own, so that each channel's warnings are throttled apart
    worker: Optional[LatestWorker] = None
    source_topic: str = ''


class GroundingNode(Node):
    """Publishes the enabled extractors' results on mm_llm/context/<kind> and their counters on /diagnostics."""

    executor_threads = 1   # callbacks only hand messages over; each extractor has its own thread

    def __init__(self):
        super().__init__('grounding_node')
        self.params = p = declare_parameters(self, NODE_PARAMS['grounding_node'].values())
        kinds = [kind for kind in CONTEXT_KIND_SPECS if p[kind.enable_param]]
        if not kinds:
            raise StartupError('no extractor enabled: set ' + ' or '.join(k.enable_param for k in CONTEXT_KIND_SPECS))
        self.limits = DecodeLimits(max_bytes=max(1, int(p['max_message_mb'] * 2**20)))
        self.channels: list[Channel] = []
        inputs = MutuallyExclusiveCallbackGroup()
        for kind in kinds:   # _add_<kind>: the extractor's input preparation
            getattr(self, f'_add_{kind.name}')(kind, p, inputs)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        if p['diagnostics_period_s'] > 0:
            self.create_timer(p['diagnostics_period_s'], self._diagnostics_callback,
                              callback_group=MutuallyExclusiveCallbackGroup())
        for channel in self.channels:
            channel.worker.start()
        self.get_logger().info('extracting ' + ', '.join(f'{c.kind} <- {c.source_topic} -> '
                                                         f'{c.publisher.topic_name}' for c in self.channels))

    def close(self) -> None:
        for channel in self.channels:
            channel.worker.stop()

    # ---- set-up ---------------------------------------------------------------------------------
    def _add_ocr(self, kind: ContextKindSpec, p, group) -> None:
        sensor = SENSORS[kind.sensor]
        if p[sensor.compressed_param] == 'compressed':
            msg_type, topic, decode = CompressedImage, sensor.topic + '/compressed', compressed_image_from_msg
        else:
            msg_type, topic, decode = Image, sensor.topic, image_from_msg
        self._add_channel(kind, p, msg_type, topic, lambda msg: self._prepare_image(msg, decode), OcrResult, group)

    def _add_audio_events(self, kind: ContextKindSpec, p, group) -> None:
        self.audio_buffer = AudioRingBuffer(p['audio_events.window_s'], min_window_s=p['audio_events.min_window_s'])
        channel = self._add_channel(kind, p, AudioChunk, SENSORS[kind.sensor].topic, self._prepare_audio,
                                    AudioEventsResult, group, callback=lambda msg: self._audio_callback(channel, msg))

    def _add_geometry(self, kind: ContextKindSpec, p, group) -> None:
        yaw = p['lidar.forward_yaw_deg']
        self.forward_rotation = yaw_to_forward(yaw)[:3, :3].astype(np.float32) if yaw else None
        self._add_channel(kind, p, PointCloud2, SENSORS[kind.sensor].topic, self._prepare_points, GeometryResult,
                          group)

    def _add_channel(self, kind: ContextKindSpec, p, msg_type, topic: str, prepare, empty_result, group,
                     callback=None) -> Channel:
        """The kind's extractor (its config read from `<kind>.*`, its models loaded now) on its own worker."""
        config = _config(resolve(kind.config), kind.config_params(p), kind.name)
        extractor = _loaded(kind.name, resolve(kind.extractor)(config))
        channel = Channel(kind.name, prepare, extractor, empty_result,
                          self.create_publisher(PerceptionContext, kind.topic, LATCHED_QOS),
                          self.get_logger().get_child(kind.name))
        channel.worker = LatestWorker(f'grounding-{kind.name}', lambda msg: self._process(channel, msg),
                                      p[f'{kind.name}.max_rate_hz'])
        subscription = self.create_subscription(msg_type, topic, callback or channel.worker.offer, SENSOR_QOS,
                                                callback_group=group)
        channel.source_topic = subscription.topic_name
        self.channels.append(channel)
        return channel

    # ---- callbacks (never block) ---------------------------------------------------------------
    def _audio_callback(self, channel: Channel, msg: AudioChunk) -> None:
        try:
            append_audio(self.audio_buffer, msg, self.limits)
        except (DecodeError, AudioBufferError) as exc:
            self._reject(channel, exc)
            return
        channel.worker.offer(msg)

    # ---- worker threads ----------------------------------------------------------------------------
    def _prepare_image(self, msg, decode) -> ExtractorInput:
        image = decode(msg, self.limits)
        if image.is_depth:
            raise DecodeError(DecodeReason.UNSUPPORTED, f'OCR needs a colour image, got {image.encoding}')
        return ExtractorInput((image.rgb,), stamp_to_ns(msg.header.stamp))

    def _prepare_audio(self, msg: AudioChunk) -> Optional[ExtractorInput]:
        snapshot = self.audio_buffer.ready_window()
        if snapshot is None:
            return None   # keep listening until the first window is long enough
        # The result describes the buffered window, so it carries the time of its newest sample.
        return ExtractorInput((snapshot.waveform.mean(axis=0), snapshot.sample_rate), snapshot.end_stamp_ns)

    def _prepare_points(self, msg: PointCloud2) -> ExtractorInput:
        xyz = pointcloud_from_msg(msg, self.limits).xyz
        if self.forward_rotation is not None:  # sectors are defined around the robot's forward direction
            xyz = xyz @ self.forward_rotation.T
        return ExtractorInput((xyz,), stamp_to_ns(msg.header.stamp))

    def _process(self, channel: Channel, msg) -> None:
        started = time.perf_counter()
        try:
            item = channel.prepare(msg)
        except DecodeError as exc:
            self._reject(channel, exc)
            result, stamp_ns = channel.empty_result(), stamp_to_ns(msg.header.stamp)
        else:
            if item is None:
                return
            result, stamp_ns = channel.extract(*item.args), item.stamp_ns
        self._publish(channel, result, stamp_ns, msg.header.frame_id, time.perf_counter() - started)

    def _publish(self, channel: Channel, result: GroundingResult, stamp_ns: int, frame_id: str,
                 latency_s: float) -> None:
        if not self.context.ok():
            return   # shutting down (Ctrl-C invalidates the context before close() stops the workers)
        msg = PerceptionContext(kind=channel.kind, text=result.to_text(self.params['text_max_chars']),
                                json=json.dumps(result.to_dict()), source_topic=channel.source_topic,
                                latency_s=latency_s)
        msg.header.stamp, msg.header.frame_id = ns_to_stamp(stamp_ns), frame_id
        channel.publisher.publish(msg)
        channel.worker.count('published')
        if result.is_empty:
            channel.worker.count('empty')

    def _reject(self, channel: Channel, exc: Exception) -> None:
        reason = str(getattr(exc, 'reason', DecodeReason.UNSUPPORTED))   # AudioBufferError: a format beyond bounds
        channel.worker.count(f'rejected_{reason}')
        channel.logger.warning(f'unusable message on {channel.source_topic} ({reason}): {exc}',
                               throttle_duration_sec=5.0)

    # ---- diagnostics ---------------------------------------------------------------------------
    def _diagnostics_callback(self) -> None:
        statuses = []
        for channel in self.channels:
            values = {'published': 0, 'empty': 0} | channel.worker.snapshot()
            values['rejected'] = sum(v for k, v in values.items() if k.startswith('rejected_'))
            level = 'warn' if values['rejected'] or values['failures'] else 'ok'
            statuses.append(make_status(
                f'{self.get_name()}: {channel.kind}', channel.source_topic, level,
                f"{values['published']} published ({values['empty']} empty), {values['dropped']} dropped, "
                f"{values['rejected']} rejected, {values['failures']} failed", values))
        self.diagnostics_pub.publish(make_array(self.get_clock().now().to_msg(), statuses))


def _config(cls, params: dict[str, Any], prefix: str):
    """The extractor config `cls` from the `<prefix>.<field>` parameters (fields without one keep their default)."""
    try:
        return config_from_params(cls, params, prefix)
    except StartupError as exc:
        raise StartupError(f'invalid {prefix}.* parameter: {exc}') from exc


def _loaded(name: str, extractor):
    """Load the extractor's models now, so that a missing package or model file stops start-up."""
    try:
        extractor.load()
    except StartupError as exc:
        raise StartupError(f'{name}: {exc}') from exc
    return extractor


def main(args=None) -> None:
    exit_now(run_node(GroundingNode, args))


if __name__ == '__main__':
    main()
