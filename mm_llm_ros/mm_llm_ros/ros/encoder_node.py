"""The shared ImageBind encoder node: the sensors of `core/specs.py` (camera, depth camera, microphone, lidar) to
Embedding messages on `mm_llm/embedding/<sensor>`.

`encoder` hosts any subset (`use_<sensor>`) with ONE shared model; `camera_encoder`, `audio_encoder` and
`lidar_encoder` are this node with the sensors of one launch switch. Callbacks only hand messages to the
`EncoderWorker` (core/encoding_pipeline.py); decoding, preprocessing and encoding happen on its thread.

A lifecycle node (ros/lifecycle.py): configure loads the model and subscribes, activate starts the worker,
deactivate stops it (sensor messages are then dropped and counted as `dropped_inactive`), cleanup releases the model.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from sensor_msgs.msg import CameraInfo, CompressedImage, PointCloud2

from mm_llm_ros.core.device import describe
from mm_llm_ros.core.encoding_pipeline import EncoderWorker, InputRejected, Prepared, Stream
from mm_llm_ros.core.imagebind.lidar_projection import (T_OPTICAL_FROM_LIDAR, PinholeCamera, virtual_camera,
                                                        yaw_to_forward)
from mm_llm_ros.core.imagebind.model import ImageBindConfig, get_shared_encoder, release_shared_encoders
from mm_llm_ros.core.params import NODE_PARAMS
from mm_llm_ros.core.sensor_decoding import DecodeError, DecodeLimits
from mm_llm_ros.core.sensor_inputs import InputContext
from mm_llm_ros.core.specs import CAMERA_INFO_TOPIC, SENSOR_SPECS, SensorSpec, resolve
from mm_llm_ros.ros.conversions import DECODERS, message_class, pointcloud_from_msg, stamp_to_ns
from mm_llm_ros.ros.diagnostics import make_array, make_status
from mm_llm_ros.ros.lifecycle import ManagedNode
from mm_llm_ros.ros.node_main import StartupError
from mm_llm_ros.ros.qos import EMBEDDING_QOS, SENSOR_QOS
from mm_llm_ros_interfaces.msg import Embedding


class EncoderNode(ManagedNode):

    executor_threads = 1  # callbacks only hand messages to the worker thread

    def __init__(self, node_name: str):
        super().__init__(node_name, NODE_PARAMS[node_name].values())
        self.encoder = None
        self.worker: Optional[EncoderWorker] = None
        self.windows: list = []   # the windowed sensors' buffers (audio): emptied on deactivate

    # ---- lifecycle ------------------------------------------------------------------------------
    def configure(self, p) -> None:
        self.params = p
        sensors = [spec for spec in SENSOR_SPECS if p.get(spec.enable_param)]
        if not sensors:
            raise StartupError('no sensor enabled: set ' + ' or '.join(
                spec.enable_param for spec in SENSOR_SPECS if spec.enable_param in p))
        if p.get('point.checkpoint'):
            raise StartupError('point.checkpoint is set, but the Point-Bind point modality is not implemented in this '
                               'version (its encoder needs a CUDA-only extension); unset it to encode lidar as depth')
        self.limits = DecodeLimits(max_bytes=max(1, int(p['max_message_mb'] * 2**20)))
        self.encoder = self._load_model(p)
        self.camera_info: Optional[CameraInfo] = None
        self.embedding_pubs: dict[str, object] = {}
        self.streams: list[Stream] = []
        self.windows = []
        inputs = MutuallyExclusiveCallbackGroup()
        for spec in sensors:
            self._add_sensor(spec, p, inputs)
        if any(spec.uses_camera_info for spec in sensors):
            self.create_subscription(CameraInfo, CAMERA_INFO_TOPIC, self._camera_info_callback, SENSOR_QOS,
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
        for window in self.windows:
            window.clear()  # resume with fresh audio, not a window spanning the pause

    def cleanup(self) -> None:
        self.encoder = self.worker = self.camera_info = self.tf_buffer = self._tf_listener = None
        self.streams, self.embedding_pubs, self.windows = [], {}, []
        release_shared_encoders()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    # ---- set-up ---------------------------------------------------------------------------------
    def _load_model(self, p):
        return get_shared_encoder(ImageBindConfig.from_params(p))  # its StartupErrors stop the configure

    def _add_sensor(self, spec: SensorSpec, p, group) -> None:
        """Subscribe to the sensor's topic; its messages are decoded and preprocessed on the worker thread."""
        msg_type, topic = message_class(spec.msg_type), spec.topic
        if spec.compressed_param and p[spec.compressed_param] == 'compressed':
            msg_type, topic = CompressedImage, topic + '/compressed'
        decode = DECODERS[msg_type.__name__ if msg_type is CompressedImage else spec.reader or msg_type.__name__]
        preprocess = resolve(spec.preprocess)
        if spec.decoder == 'window':
            self._add_window(spec, p, msg_type, topic, decode, preprocess, group)
        elif spec.decoder == 'pointcloud':
            self._add_lidar(spec, p, group, preprocess)
        else:   # frames: decoded and preprocessed with nothing else than the latest focal length
            self._add_stream(spec, msg_type, topic, lambda msg: Prepared(
                spec.modality, preprocess(decode(msg, self.limits), self._input_context()),
                stamp_to_ns(msg.header.stamp), msg.header.frame_id), group)
        self.embedding_pubs[spec.name] = self.create_publisher(Embedding, spec.embedding_topic, EMBEDDING_QOS)

    def _add_stream(self, spec: SensorSpec, msg_type, topic: str, prepare, group, offer=None) -> Stream:
        stream = Stream(spec.name, '', prepare, self.params['max_rate_hz'])
        subscription = self.create_subscription(msg_type, topic, self._when_active(stream, offer or stream.offer),
                                                SENSOR_QOS, callback_group=group)
        stream.source_topic = subscription.topic_name
        self.streams.append(stream)
        return stream

    def _add_window(self, spec: SensorSpec, p, msg_type, topic: str, decode, preprocess, group) -> None:
        window = resolve(spec.window)(p)
        self.windows.append(window)
        stream = self._add_stream(spec, msg_type, topic, lambda frame_id: self._prepare_window(
            spec, window, preprocess, frame_id), group,
            offer=lambda msg: self._window_callback(stream, window, decode, msg))

    def _add_lidar(self, spec: SensorSpec, p, group, preprocess) -> None:
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
        self._add_stream(spec, PointCloud2, spec.topic, lambda msg: self._prepare_points(spec, preprocess, msg), group)

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

    def _window_callback(self, stream: Stream, window, decode, msg) -> None:
        # Every message of a window matters (audio chunks), so decoding (a cheap reinterpretation of bytes) happens
        # here; the worker preprocesses the window.
        try:
            window.add(decode(msg, self.limits), stamp_to_ns(msg.header.stamp))
        except (DecodeError, ValueError) as exc:
            reason = getattr(exc, 'reason', 'invalid')
            self.worker.reject(stream, getattr(reason, 'value', reason), str(exc))
            return
        stream.offer(msg.header.frame_id)

    # ---- worker-side preparation -----------------------------------------------------------------
    def _input_context(self, projection=None) -> InputContext:
        info = self.camera_info
        focal = float(info.k[0]) if info is not None and info.k[0] > 0 else None
        return InputContext(self.params, focal, projection)

    def _prepare_window(self, spec: SensorSpec, window, preprocess, frame_id: str) -> Optional[Prepared]:
        snapshot = window.ready_window()
        if snapshot is None:
            return None  # keep listening until the first window is long enough
        return Prepared(spec.modality, preprocess(snapshot, self._input_context()), snapshot.end_stamp_ns, frame_id)

    def _prepare_points(self, spec: SensorSpec, preprocess, msg: PointCloud2) -> Prepared:
        cloud = pointcloud_from_msg(msg, self.limits)
        tensor = preprocess(cloud, self._input_context(self._projection_for(msg)))
        return Prepared(spec.modality, tensor, stamp_to_ns(msg.header.stamp), msg.header.frame_id)

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
            self.embedding_pubs[stream.name].publish(msg)
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
