"""Lidar point cloud -> depth image, so ImageBind's depth encoder can embed it (ImageBind has no point modality).

Pipeline: :func:`project_points` renders the cloud through a pinhole camera, :func:`fill_small_holes` closes the
gaps between scan lines, and :func:`preprocess_depth` turns the metric depth image into the encoder's input;
:func:`lidar_to_depth_input` chains the three.

Choices:

- Depth is the camera-frame z coordinate (what depth cameras and KITTI's depth maps store), not the range.
- Pixel (u, v) is the one whose centre is nearest to the projection: ROS ``CameraInfo`` / OpenCV put integer
  coordinates at pixel centres, so the index is ``floor(u + 0.5)``.
- Z-buffering keeps the nearest point per pixel (``np.minimum.at`` on flat indices, vectorised, O(N)).
- The range limits apply to the Euclidean distance from the lidar, which is what a lidar's own min/max range means.
- Empty pixels are 0 (ROS ``16UC1`` convention), which :func:`preprocess_depth` treats as "no return".
- Hole filling is a grey dilation of inverse depth, written only into empty pixels: each hole takes the nearest
  depth among its neighbours (foreground wins, as in a z-buffer), measured pixels never change, and holes wider
  than the kernel stay empty (no invention of surfaces across large gaps). This is the core idea of Ku et al.,
  "In Defense of Classical Image Processing: Fast Depth Completion on the CPU" (2018), without its larger
  kernels, so far-away sky or open space stays empty.
- No voxel downsampling: the z-buffer already reduces the cloud to one point per pixel at O(N) cost, so
  downsampling first would only drop points (Open3D is not a dependency).
- A virtual camera (:func:`virtual_camera`) with :data:`T_OPTICAL_FROM_LIDAR` looks along the lidar's +x axis.
  ROS lidar frames (REP 103) are x forward, y left, z up; camera optical frames are z forward, x right, y down.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from mm_llm_ros.core.imagebind.preprocess import DepthPreprocessConfig, PreprocessError, preprocess_depth

# Rotation (as a 4x4 transform) from a REP 103 body frame to a camera optical frame at the same origin:
# optical x (right) = -y (left), optical y (down) = -z (up), optical z (forward) = x (forward).
T_OPTICAL_FROM_LIDAR = np.array([[0.0, -1.0, 0.0, 0.0],
                                 [0.0, 0.0, -1.0, 0.0],
                                 [1.0, 0.0, 0.0, 0.0],
                                 [0.0, 0.0, 0.0, 1.0]])
T_OPTICAL_FROM_LIDAR.setflags(write=False)


def yaw_to_forward(forward_yaw_deg: float) -> np.ndarray:
    """4x4 rotation about z that turns a lidar frame whose forward direction lies at `forward_yaw_deg`
    (counter-clockwise from +x) into one where x points forward (REP-103). 0 for most lidars; 90 for nuScenes'
    LIDAR_TOP, whose y axis points forward."""
    angle = math.radians(forward_yaw_deg)
    c, s = math.cos(angle), math.sin(angle)
    transform = np.eye(4)
    transform[:2, :2] = [[c, s], [-s, c]]
    return transform


@dataclasses.dataclass(frozen=True)
class PinholeCamera:
    """An undistorted pinhole camera: intrinsics in pixels (integer coordinates at pixel centres) and image size."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        if not (self.fx > 0 and self.fy > 0 and math.isfinite(self.fx) and math.isfinite(self.fy)):
            raise PreprocessError(f'focal lengths must be positive and finite, got fx={self.fx}, fy={self.fy}')
        if not (math.isfinite(self.cx) and math.isfinite(self.cy)):
            raise PreprocessError(f'principal point must be finite, got cx={self.cx}, cy={self.cy}')
        if self.width <= 0 or self.height <= 0:
            raise PreprocessError(f'image size must be positive, got {self.width}x{self.height}')

    @classmethod
    def from_k(cls, k: Sequence[float], width: int, height: int) -> PinholeCamera:
        """From a row-major 3x3 intrinsic matrix, e.g. ``sensor_msgs/CameraInfo.k`` (9 values) or a 3x3 array."""
        matrix = np.asarray(k, dtype=np.float64).reshape(-1)
        if matrix.size != 9:
            raise PreprocessError(f'K must have 9 values (row-major 3x3), got {matrix.size}')
        if matrix[1] != 0.0:
            raise PreprocessError(f'skewed cameras are not supported (K[0][1] = {matrix[1]})')
        return cls(fx=float(matrix[0]), fy=float(matrix[4]), cx=float(matrix[2]), cy=float(matrix[5]),
                   width=int(width), height=int(height))

    @property
    def k(self) -> np.ndarray:
        """The 3x3 intrinsic matrix."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])


def virtual_camera(fov_deg: float, width: int, height: int) -> PinholeCamera:
    """A centred pinhole camera with horizontal field of view `fov_deg` and square pixels.

    Use it with :data:`T_OPTICAL_FROM_LIDAR` (or that rotation composed with a mounting offset) to look forward.
    """
    if not 0.0 < fov_deg < 180.0:
        raise PreprocessError(f'fov_deg must be in (0, 180), got {fov_deg}')
    focal = 0.5 * width / math.tan(math.radians(fov_deg) / 2.0)
    return PinholeCamera(fx=focal, fy=focal, cx=(width - 1) / 2.0, cy=(height - 1) / 2.0, width=width, height=height)


def _check_points(points_xyz: np.ndarray) -> np.ndarray:
    if not isinstance(points_xyz, np.ndarray):
        raise PreprocessError(f'points must be a numpy array, got {type(points_xyz).__name__}')
    if points_xyz.ndim != 2 or points_xyz.shape[1] < 3:
        raise PreprocessError(f'points must be (N, 3) (extra columns are ignored), got shape {points_xyz.shape}')
    if points_xyz.dtype.kind != 'f':
        raise PreprocessError(f'points must be float coordinates in metres, got {points_xyz.dtype}')
    return points_xyz[:, :3]


def _check_transform(transform: np.ndarray) -> np.ndarray:
    transform = np.asarray(transform, dtype=np.float64)
    if transform.shape != (4, 4) or not np.isfinite(transform).all():
        raise PreprocessError(f'T_cam_from_lidar must be a finite 4x4 matrix, got shape {transform.shape}')
    if not np.allclose(transform[3], (0.0, 0.0, 0.0, 1.0)):
        raise PreprocessError(f'T_cam_from_lidar must be rigid (last row 0 0 0 1), got {transform[3]}')
    return transform


def project_points(points_xyz: np.ndarray, camera: PinholeCamera,
                   T_cam_from_lidar: np.ndarray = T_OPTICAL_FROM_LIDAR,
                   min_range: float = 0.5, max_range: float = 100.0) -> np.ndarray:
    """Render points into a (height, width) float32 depth image in metres; 0 where no point lands.

    Args:
        points_xyz: (N, >=3) float points in the lidar frame (extra columns such as intensity are ignored);
            non-finite points are skipped.
        camera: the image to render.
        T_cam_from_lidar: 4x4 transform taking lidar coordinates to the camera optical frame.
        min_range, max_range: points whose distance from the lidar lies outside [min_range, max_range] are skipped.
    """
    points = _check_points(points_xyz).astype(np.float64, copy=False)
    transform = _check_transform(T_cam_from_lidar)
    if not 0.0 <= min_range < max_range:
        raise PreprocessError(f'need 0 <= min_range < max_range, got {min_range}, {max_range}')

    distance = np.linalg.norm(points, axis=1)
    keep = np.isfinite(distance) & (distance >= min_range) & (distance <= max_range)
    cam = points[keep] @ transform[:3, :3].T + transform[:3, 3]
    cam = cam[cam[:, 2] > 1e-6]  # in front of the camera
    z = cam[:, 2]
    u = np.floor(camera.fx * cam[:, 0] / z + camera.cx + 0.5)
    v = np.floor(camera.fy * cam[:, 1] / z + camera.cy + 0.5)
    inside = (u >= 0) & (u < camera.width) & (v >= 0) & (v < camera.height)

    flat = np.full(camera.height * camera.width, np.inf)
    np.minimum.at(flat, v[inside].astype(np.int64) * camera.width + u[inside].astype(np.int64), z[inside])
    flat[np.isinf(flat)] = 0.0
    return flat.reshape(camera.height, camera.width).astype(np.float32)


def fill_small_holes(depth: np.ndarray, kernel_size: int = 5, iterations: int = 1) -> np.ndarray:
    """Fill empty (0) pixels with the nearest depth found within `kernel_size` // 2 pixels; others are unchanged.

    Each iteration grows the filled area by another kernel radius, so holes up to about
    ``iterations * (kernel_size - 1)`` pixels wide close.
    """
    if depth.ndim != 2 or depth.dtype != np.float32:
        raise PreprocessError(f'depth must be (H, W) float32, got {depth.dtype} {depth.shape}')
    if kernel_size < 1 or kernel_size % 2 == 0 or iterations < 0:
        raise PreprocessError(f'kernel_size must be odd and positive and iterations >= 0, got '
                              f'{kernel_size}, {iterations}')
    kernel = np.ones((kernel_size, kernel_size), np.uint8)
    filled = depth.copy()
    for _ in range(iterations):
        empty = filled <= 0
        if not empty.any():
            break
        inverse = np.divide(1.0, filled, out=np.zeros_like(filled), where=~empty)
        nearest = cv2.dilate(inverse, kernel)  # max inverse depth = nearest neighbour
        reachable = empty & (nearest > 0)
        filled[reachable] = 1.0 / nearest[reachable]
    return filled


def lidar_to_depth_input(points_xyz: np.ndarray, camera: PinholeCamera,
                         T_cam_from_lidar: np.ndarray = T_OPTICAL_FROM_LIDAR,
                         min_range: float = 0.5, max_range: float = 100.0,
                         fill_kernel_size: int = 5, fill_iterations: int = 1,
                         depth_config: DepthPreprocessConfig = DepthPreprocessConfig()) -> torch.Tensor:
    """Points (N, >=3) in the lidar frame -> ImageBind depth input (1, 224, 224): project, fill holes, preprocess."""
    depth = project_points(points_xyz, camera, T_cam_from_lidar, min_range, max_range)
    depth = fill_small_holes(depth, fill_kernel_size, fill_iterations)
    return preprocess_depth(depth, camera.fx, depth_config)
