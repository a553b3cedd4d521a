"""ROS messages built from the real sample files in ../shared/data, with their real layouts."""
from __future__ import annotations

import pathlib
import wave

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage, PointCloud2, PointField

from mm_llm_ros.ros.conversions import audio_to_msg, image_to_msg

NUSCENES_FRONT = 'images/nuscenes/n015-2018-07-24-11-22-45+0800__CAM_FRONT__1532402927612460.jpg'
NUSCENES_LIDAR = 'pointclouds/nuscenes_n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin'
KITTI_LIDAR = 'pointclouds/kitti_000008.bin'


def read_rgb(path: pathlib.Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def read_wav(path: pathlib.Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), 'rb') as wav:
        assert wav.getsampwidth() == 2
        frames = np.frombuffer(wav.readframes(wav.getnframes()), '<i2').reshape(-1, wav.getnchannels())
        return (frames.T.astype(np.float32) / 32768.0), wav.getframerate()


def image_msg(rgb: np.ndarray, stamp_ns: int, frame_id: str = 'camera_optical'):
    return image_to_msg(rgb, 'rgb8', stamp_ns, frame_id)


def compressed_msg(path: pathlib.Path, stamp_ns: int, frame_id: str = 'camera_optical') -> CompressedImage:
    msg = CompressedImage(format='jpeg', data=path.read_bytes())
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    msg.header.frame_id = frame_id
    return msg


def raw_cloud_msg(path: pathlib.Path, field_names: list[str], stamp_ns: int, frame_id: str) -> PointCloud2:
    """A PointCloud2 whose data are the file's bytes: float32 fields in the file's own order."""
    data = path.read_bytes()
    point_step = 4 * len(field_names)
    count = len(data) // point_step
    msg = PointCloud2(height=1, width=count, point_step=point_step, row_step=point_step * count, is_dense=False,
                      is_bigendian=False, data=data[:point_step * count])
    msg.fields = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                  for i, name in enumerate(field_names)]
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    msg.header.frame_id = frame_id
    return msg


def kitti_cloud_msg(data_dir: pathlib.Path, stamp_ns: int) -> PointCloud2:
    return raw_cloud_msg(data_dir / KITTI_LIDAR, ['x', 'y', 'z', 'intensity'], stamp_ns, 'velo_link')


def nuscenes_cloud_msg(data_dir: pathlib.Path, stamp_ns: int) -> PointCloud2:
    return raw_cloud_msg(data_dir / NUSCENES_LIDAR, ['x', 'y', 'z', 'intensity', 'ring'], stamp_ns, 'LIDAR_TOP')


def audio_chunks(waveform: np.ndarray, sample_rate: int, chunk_s: float, start_ns: int, frame_id: str = 'mic'):
    """S16LE AudioChunk messages covering the waveform, stamped with their first sample's time."""
    step = int(sample_rate * chunk_s)
    for offset in range(0, waveform.shape[1], step):
        stamp = start_ns + int(offset * 1e9 / sample_rate)
        yield audio_to_msg(waveform[:, offset:offset + step], sample_rate, 'S16LE', stamp, frame_id)
