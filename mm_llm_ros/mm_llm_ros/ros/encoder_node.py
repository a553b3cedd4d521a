"""The shared ImageBind encoder node: camera, depth camera, microphone and lidar inputs to Embedding messages.

`camera_encoder`, `audio_encoder` and `lidar_encoder` are this node with one sensor; `encoder` hosts any subset
(use_camera/use_audio/use_lidar) with ONE shared model. Callbacks only hand messages to the `EncoderWorker`
(core/encoding_pipeline.py); decoding, preprocessing and encoding happen on its thread.

A lifecycle node (ros/lifecycle.py): configure loads the model and subscribes, activate starts the worker,
deactivate stops it (sensor messages are then dropped and counted as `dropped_inactive`), cleanup releases the model.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from mm_llm_ros.core.audio_buffer import AudioRingBuffer
from mm_llm_ros.core.device import DeviceError, describe
from mm_llm_ros.core.encoding_pipeline import EncoderWorker, InputRejected, Prepared, Stream
from mm_llm_ros.core.imagebind.lidar_projection import (T_OPTICAL_FROM_LIDAR, PinholeCamera, lidar_to_depth_input,
                                                        virtual_camera, yaw_to_forward)
from mm_llm_ros.core.imagebind.model import (CheckpointError, ImageBindConfig, ImageBindConfigError,
                                             get_shared_encoder, release_shared_encoders)
from mm_llm_ros.core.imagebind.official import ImageBindUnavailableError
from mm_llm_ros.core.imagebind.preprocess import preprocess_audio, preprocess_depth, preprocess_vision
from mm_llm_ros.core.params import NODE_PARAMS
from mm_llm_ros.core.sensor_decoding import DecodeError, DecodeLimits
from mm_llm_ros.launch_plan import EMBEDDING_TOPIC, TOPICS
from mm_llm_ros.ros.conversions import (audio_from_msg, compressed_image_from_msg, image_from_msg,
                                        pointcloud_from_msg, stamp_to_ns)
from mm_llm_ros.ros.diagnostics import make_array, make_status
from mm_llm_ros.ros.lifecycle import ManagedNode
from mm_llm_ros.ros.node_main import StartupError
from mm_llm_ros.ros.qos import EMBEDDING_QOS, SENSOR_QOS
from mm_llm_ros_interfaces.msg import AudioChunk, Embedding

SENSORS = ('camera', 'audio', 'lidar')


class EncoderNode(ManagedNode):

    executor_threads = 1  # callbacks only hand messages to the worker thread

    def __init__(self, node_name: str, sensors: Optional[Sequence[str]] = None):
        super().__init__(node_name, NODE_PARAMS[node_name].values())
        self.sensors = sensors
        self.encoder = self.audio_buffer = None
        self.worker: Optional[EncoderWorker] = None

    # ---- lifecycle ------------------------------------------------------------------------------
    def configure(self, p) -> None:
        self.params = p
        sensors = self.sensors
        if sensors is None:
            sensors = [s for s in SENSORS if p[f'use_{s}']]
        if not sensors:
            raise StartupError('no sensor enabled: set use_camera, use_audio or use_lidar')
        if p.get('point.checkpoint'):
            raise StartupError('point.checkpoint is set, but the Point-Bind point modality is not implemented in this '
                               'version (its encoder needs a CUDA-only extension); unset it to encode lidar as depth')
        self.limits = DecodeLimits(max_bytes=max(1, int(p['max_message_mb'] * 2**20)))
        self.encoder = self._load_model(p)
        self.camera_info: Optional[CameraInfo] = None
        self.embedding_pubs: dict[str, object] = {}
        self.streams: list[Stream] = []
        inputs = MutuallyExclusiveCallbackGroup()
        if 'camera' in sensors:
            self._add_camera(p, inputs)
        if 'audio' in sensors:
            self._add_audio(p, inputs)
        if 'lidar' in sensors:
            self._add_lidar(p, inputs)
        if 'camera' in sensors or (p.get('lidar.projection') == 'camera' and 'lidar' in sensors):
            self.create_subscription(CameraInfo, TOPICS['camera_info'], self._camera_info_callback, SENSOR_QOS,
                                     callback_group=inputs)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        if p['diagnostics_period_s'] > 0:
            self.create_timer(p['diagnostics_period_s'], self._diagnostics_callback,
                              callback_group=MutuallyExclusiveCallbackGroup())

    def activate(self) -> None:
        self.worker = EncoderWorker(self.encoder, self.streams, self._publish,  # a thread runs once: new per activate
                                    now_ns=lambda: self.get_clock().now().nanoseconds,
                                    on_rejected=self._log_rejected)
        self.worker.start()
        self.get_logger().info(f"encoding {', '.join(s.name + ' <- ' + s.source_topic for s in self.streams)} with "
                               f"{self.encoder.model_name} on {describe(self.encoder.device, self.encoder.dtype)}")

    def deactivate(self) -> None:
        self.worker.stop()
        for stream in self.streams:
            stream.discard_pending()
        if self.audio_buffer is not None:
            self.audio_buffer.clear()  # resume with fresh audio, not a window spanning the pause

    def cleanup(self) -> None:
        self.encoder = self.worker = self.camera_info = self.tf_buffer = self._tf_listener = self.audio_buffer = None
        self.streams, self.embedding_pubs = [], {}
        release_shared_encoders()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    # ---- set-up ---------------------------------------------------------------------------------
    def _load_model(self, p):
        try:
            encoder = get_shared_encoder(ImageBindConfig.from_params(p))
        except (ImageBindConfigError, CheckpointError, DeviceError, ImageBindUnavailableError) as exc:
            raise StartupError(str(exc)) from exc
        return encoder

    def _publisher(self, modality: str):
        if modality not in self.embedding_pubs:
            self.embedding_pubs[modality] = self.create_publisher(
                Embedding, EMBEDDING_TOPIC.format(modality=modality), EMBEDDING_QOS)
        return self.embedding_pubs[modality]

    def _add_stream(self, name: str, msg_type, topic: str, prepare, group, offer=None) -> Stream:
        stream = Stream(name, '', prepare, self.params['max_rate_hz'])
        subscription = self.create_subscription(msg_type, topic, self._when_active(stream, offer or stream.offer),
                                                SENSOR_QOS, callback_group=group)
        stream.source_topic = subscription.topic_name
        self.streams.append(stream)
        return stream

    def _add_camera(self, p, group) -> None:
        if p['camera.transport'] == 'compressed':
            self._add_stream('camera', CompressedImage, TOPICS['image'] + '/compressed',
                             lambda msg: self._prepare_image(msg, compressed_image_from_msg(msg, self.limits)), group)
        else:
            self._add_stream('camera', Image, TOPICS['image'],
                             lambda msg: self._prepare_image(msg, image_from_msg(msg, self.limits)), group)
        self._publisher('vision')
        if p['use_depth_camera']:
            self._add_stream('depth_camera', Image, TOPICS['depth'],
                             lambda msg: self._prepare_image(msg, image_from_msg(msg, self.limits)), group)
            self._publisher('depth')

    def _add_audio(self, p, group) -> None:
        self.audio_buffer = AudioRingBuffer(p['audio.window_s'])
        self.audio_min_s = p['audio.min_window_s']
        stream = self._add_stream('audio', AudioChunk, TOPICS['audio'], self._prepare_audio, group,
                                  offer=lambda msg: self._audio_callback(stream, msg))
        self._publisher('audio')

    def _add_lidar(self, p, group) -> None:
        self.lidar_camera = None
        self.lidar_extrinsic = np.asarray(p['lidar.extrinsic'], dtype=np.float64)
        if self.lidar_extrinsic.size != 16:
            raise StartupError(f'lidar.extrinsic must have 16 values (row-major 4x4), got {self.lidar_extrinsic.size}')
        self.lidar_extrinsic = self.lidar_extrinsic.reshape(4, 4)
        if p['lidar.projection'] == 'virtual':
            size = int(p['lidar.image_size'])
            self.lidar_camera = virtual_camera(p['lidar.fov_deg'], size, size)
            self.virtual_transform = T_OPTICAL_FROM_LIDAR @ yaw_to_forward(p['lidar.forward_yaw_deg'])
        self.tf_buffer = None
        if p['lidar.use_tf']:
            try:
                from tf2_ros import Buffer, TransformListener
            except ImportError as exc:
                raise StartupError('lidar.use_tf needs tf2_ros (apt: ros-<distro>-tf2-ros-py)') from exc
            self.tf_buffer = Buffer()
            self._tf_listener = TransformListener(self.tf_buffer, self)
        self._add_stream('lidar', PointCloud2, TOPICS['points'], self._prepare_points, group)
        self._publisher('depth')

    # ---- callbacks (never block) ---------------------------------------------------------------
    def _when_active(self, stream: Stream, callback):
        def gated(msg) -> None:
            if self.active:
                callback(msg)
            else:
                stream.drop_inactive()
        return gated

    def _camera_info_callback(self, msg: CameraInfo) -> None:
        self.camera_info = msg

    def _audio_callback(self, stream: Stream, msg: AudioChunk) -> None:
        # Every chunk matters for audio, so decoding (a cheap reinterpretation of bytes) happens here.
        try:
            audio = audio_from_msg(msg, self.limits)
            self.audio_buffer.append(audio.waveform, audio.sample_rate, stamp_to_ns(msg.header.stamp))
        except (DecodeError, ValueError) as exc:
            reason = getattr(exc, 'reason', 'invalid')
            self.worker.reject(stream, getattr(reason, 'value', reason), str(exc))
            return
        stream.offer(msg.header.frame_id)

    # ---- worker-side preparation -----------------------------------------------------------------
    def _prepare_image(self, msg, image) -> Prepared:
        stamp, frame = stamp_to_ns(msg.header.stamp), msg.header.frame_id
        if image.is_depth:
            info = self.camera_info
            focal = float(info.k[0]) if info is not None and info.k[0] > 0 else None
            return Prepared('depth', preprocess_depth(image.depth_m, focal), stamp, frame)
        return Prepared('vision', preprocess_vision(image.rgb), stamp, frame)

    def _prepare_audio(self, frame_id: str) -> Optional[Prepared]:
        snapshot = self.audio_buffer.snapshot()
        if snapshot is None or snapshot.waveform.shape[-1] < self.audio_min_s * snapshot.sample_rate:
            return None  # keep listening until the first window is long enough
        return Prepared('audio', preprocess_audio(snapshot.waveform, snapshot.sample_rate),
                        snapshot.end_stamp_ns, frame_id)

    def _prepare_points(self, msg: PointCloud2) -> Prepared:
        cloud = pointcloud_from_msg(msg, self.limits)
        camera, transform = self._projection_for(msg)
        tensor = lidar_to_depth_input(cloud.xyz, camera, transform, self.params['lidar.min_range_m'],
                                      self.params['lidar.max_range_m'],
                                      fill_kernel_size=2 * int(self.params['lidar.hole_fill_px']) + 1)
        return Prepared('depth', tensor, stamp_to_ns(msg.header.stamp), msg.header.frame_id)

    def _projection_for(self, msg: PointCloud2):
        if self.lidar_camera is not None:  # virtual forward-looking camera
            return self.lidar_camera, self.virtual_transform
        info = self.camera_info
        if info is None:
            raise InputRejected('no_camera_info', 'lidar.projection is camera but no CameraInfo has arrived')
        if info.width * info.height > self.limits.max_pixels:  # the projection allocates width x height floats
            raise InputRejected('too_large', f'CameraInfo size {info.width}x{info.height} exceeds '
                                f'{self.limits.max_pixels} pixels')
        camera = PinholeCamera.from_k(info.k, info.width, info.height)
        if self.tf_buffer is None:
            return camera, self.lidar_extrinsic
        from rclpy.time import Time
        try:
            tf = self.tf_buffer.lookup_transform(info.header.frame_id, msg.header.frame_id, Time())
        except Exception as exc:  # tf2 raises several unrelated exception types
            raise InputRejected('no_transform', f'{msg.header.frame_id} -> {info.header.frame_id}: {exc}') from exc
        return camera, _transform_matrix(tf.transform)

    # ---- output ---------------------------------------------------------------------------------
    def _publish(self, stream: Stream, item: Prepared, vector: np.ndarray) -> None:
        msg = Embedding(modality=item.modality, model=self.encoder.model_name, source_topic=stream.source_topic)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(item.stamp_ns, 1_000_000_000)
        msg.header.frame_id = item.frame_id
        msg.embedding = np.asarray(vector, dtype=np.float32).ravel().tolist()
        try:
            self._publisher(item.modality).publish(msg)
        except Exception:
            if self.context.ok():
                raise
            # Shutting down: the context went away between encoding and publishing; nothing is lost.

    def _log_rejected(self, stream: Stream, message: str) -> None:
        self.get_logger().warning(f'dropped a message on {stream.source_topic}: {message}', throttle_duration_sec=5.0)

    def _diagnostics_callback(self) -> None:
        device = describe(self.encoder.device, self.encoder.dtype)
        model_p50 = self.worker.model_s.percentile(50) if self.worker is not None else float('nan')
        statuses = []
        for stream in self.streams:
            values = stream.snapshot() | {'model_p50_s': model_p50, 'device': device,
                                          'model': self.encoder.model_name, 'active': self.active}
            level = 'warn' if values['rejected'] else 'ok'
            statuses.append(make_status(f'{self.get_name()}: {stream.name}', stream.source_topic, level,
                                        ('' if self.active else 'inactive: ') +
                                        f"{values['encoded']} encoded, {values['dropped']} dropped, "
                                        f"{values['rejected']} rejected", values))
        self.diagnostics_pub.publish(make_array(self.get_clock().now().to_msg(), statuses))


def _transform_matrix(transform) -> np.ndarray:
    x, y, z, w = (transform.rotation.x, transform.rotation.y, transform.rotation.z, transform.rotation.w)
    matrix = np.eye(4)
    matrix[:3, :3] = [[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]]
    matrix[:3, 3] = (transform.translation.x, transform.translation.y, transform.translation.z)
    return matrix
