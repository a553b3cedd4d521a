"""Lidar -> depth image projection, hole filling and depth preprocessing, on synthetic scenes and real scans.

Real data: the KITTI 000008 scan with its camera calibration (mmdetection3d info), and the nuScenes LIDAR_TOP
sweep seen through a forward-looking virtual camera.
"""
import json

import numpy as np
import pytest
import torch

from mm_llm_ros.core.imagebind.lidar_projection import (T_OPTICAL_FROM_LIDAR, PinholeCamera, fill_small_holes,
                                                        lidar_to_depth_input, project_points, virtual_camera)
from mm_llm_ros.core.imagebind.preprocess import (KINECT_FOCAL_PX, DepthPreprocessConfig, PreprocessError,
                                                  depth_to_disparity, preprocess_depth)

NUSCENES = 'n015-2018-07-24-11-22-45+0800'


def plane_points(distance, half_extent=6.0, step=0.02):
    """A dense wall at lidar x = `distance`, spanning y and z in [-half_extent, half_extent]."""
    y, z = np.meshgrid(np.arange(-half_extent, half_extent, step), np.arange(-half_extent, half_extent, step))
    return np.stack([np.full(y.size, distance), y.ravel(), z.ravel()], axis=1).astype(np.float32)


# --- cameras -------------------------------------------------------------------------------------------------------


def test_camera_from_camera_info_k():
    camera = PinholeCamera.from_k([721.5, 0.0, 609.6, 0.0, 721.5, 172.9, 0.0, 0.0, 1.0], 1242, 375)
    assert (camera.fx, camera.fy, camera.cx, camera.cy) == (721.5, 721.5, 609.6, 172.9)
    np.testing.assert_array_equal(PinholeCamera.from_k(camera.k, 1242, 375).k, camera.k)


@pytest.mark.parametrize('k, message', [
    ([1.0] * 8, '9 values'),
    ([500.0, 3.0, 320.0, 0.0, 500.0, 240.0, 0.0, 0.0, 1.0], 'skew'),
    ([0.0, 0.0, 320.0, 0.0, 500.0, 240.0, 0.0, 0.0, 1.0], 'focal'),
])
def test_bad_intrinsics_raise(k, message):
    with pytest.raises(PreprocessError, match=message):
        PinholeCamera.from_k(k, 640, 480)


def test_virtual_camera_field_of_view_and_forward_rotation():
    camera = virtual_camera(90.0, 224, 224)
    assert camera.fx == pytest.approx(112.0)
    # Ahead on the axis, to the left (+y) and above (+z) in the lidar frame.
    points = np.array([[10.0, 0.0, 0.0], [10.0, 4.0, 0.0], [10.0, 0.0, 4.0], [-10.0, 0.0, 0.0]], np.float32)
    # Centre 111.5; 4 m off-axis at 10 m is 0.4 * 112 = 44.8 pixels away.
    for point, expected_pixel in zip(points[:3], [(112, 112), (112, 67), (67, 112)]):  # (row, col)
        depth = project_points(point[None], camera)
        assert list(zip(*np.nonzero(depth))) == [expected_pixel]
        assert depth[expected_pixel] == pytest.approx(10.0)
    assert not project_points(points[3:], camera).any()  # behind the camera
    with pytest.raises(PreprocessError, match='fov_deg'):
        virtual_camera(180.0, 224, 224)


# --- projection ----------------------------------------------------------------------------------------------------


def test_plane_at_known_distance_gives_that_depth_everywhere_it_covers():
    camera = virtual_camera(60.0, 160, 120)
    depth = project_points(plane_points(7.0), camera, max_range=20.0)
    hit = depth > 0
    assert hit.mean() > 0.95  # the wall (+-6 m at 7 m) covers the whole 60 degree view
    np.testing.assert_allclose(depth[hit], 7.0, rtol=1e-6)


def test_z_buffer_keeps_the_nearest_point_whatever_the_order():
    camera = virtual_camera(90.0, 64, 64)
    ray = np.array([[5.0, 1.0, 0.5], [12.0, 2.4, 1.2], [8.0, 1.6, 0.8]], np.float32)  # one ray, three ranges
    for order in ([0, 1, 2], [1, 2, 0], [2, 0, 1]):
        depth = project_points(ray[order], camera)
        assert np.count_nonzero(depth) == 1 and depth.max() == pytest.approx(5.0)
    walls = np.concatenate([plane_points(20.0, step=0.1), plane_points(9.0, step=0.1)])
    near_wall = project_points(walls, camera, max_range=40.0)
    np.testing.assert_allclose(near_wall[near_wall > 0], 9.0, rtol=1e-6)


def test_range_limits_and_invalid_points_are_skipped():
    camera = virtual_camera(90.0, 64, 64)
    points = np.array([[0.3, 0.0, 0.0], [150.0, 0.0, 0.0], [np.nan, 0.0, 0.0], [np.inf, 1.0, 0.0]], np.float32)
    assert not project_points(points, camera, min_range=0.5, max_range=100.0).any()
    assert project_points(points[:2], camera, min_range=0.1, max_range=200.0).max() == pytest.approx(0.3)


@pytest.mark.parametrize('points, transform, message', [
    (np.zeros((5, 2), np.float32), T_OPTICAL_FROM_LIDAR, r'\(N, 3\)'),
    (np.zeros((5, 3), np.int32), T_OPTICAL_FROM_LIDAR, 'float'),
    (np.zeros((5, 3), np.float32), np.eye(3), '4x4'),
    (np.zeros((5, 3), np.float32), np.full((4, 4), np.nan), '4x4'),
    (np.zeros((5, 3), np.float32), np.ones((4, 4)), 'rigid'),
])
def test_bad_projection_inputs_raise(points, transform, message):
    with pytest.raises(PreprocessError, match=message):
        project_points(points, virtual_camera(90.0, 32, 32), transform)


def kitti_camera_and_transform(info):
    """CAM2 intrinsics and lidar -> CAM2 transform; P2's fourth column is the offset from the rectified CAM0."""
    cam2 = info['images']['CAM2']
    projection = np.array(cam2['cam2img'])
    k = projection[:3, :3]
    offset = np.eye(4)
    offset[:3, 3] = np.linalg.solve(k, projection[:3, 3])
    return PinholeCamera.from_k(k, cam2['width'], cam2['height']), offset @ np.array(cam2['lidar2cam'])


@pytest.fixture(scope='module')
def kitti(shared_data):
    base = shared_data / 'pointclouds'
    info = json.loads((base / 'kitti_000008_info.json').read_text())['data_list'][0]
    points = np.fromfile(base / 'kitti_000008.bin', dtype='<f4').reshape(-1, 4)
    p2 = np.loadtxt(base / 'kitti_000008_cam2_P.txt').reshape(4, 4)
    return info, points, p2


@pytest.mark.shared_data
def test_kitti_scan_matches_the_calibrated_projection(kitti):
    info, points, p2 = kitti
    np.testing.assert_allclose(np.array(info['images']['CAM2']['cam2img']), p2, atol=1e-5)
    camera, transform = kitti_camera_and_transform(info)
    depth = project_points(points, camera, transform, min_range=0.0, max_range=200.0)

    # Reference: mmdetection3d's lidar2img (= P2 @ lidar2cam) and a sort-based z-buffer.
    homogeneous = np.c_[points[:, :3], np.ones(len(points))] @ np.array(info['images']['CAM2']['lidar2img']).T
    z = homogeneous[:, 2]
    u = np.floor(homogeneous[:, 0] / z + 0.5).astype(int)
    v = np.floor(homogeneous[:, 1] / z + 0.5).astype(int)
    inside = (z > 0) & (u >= 0) & (u < camera.width) & (v >= 0) & (v < camera.height)
    assert inside.mean() > 0.995  # the scan was cropped to this camera's view upstream
    flat = v[inside] * camera.width + u[inside]
    order = np.lexsort((z[inside], flat))
    first = np.r_[True, np.diff(flat[order]) != 0]
    reference = np.zeros(camera.height * camera.width)
    reference[flat[order][first]] = z[inside][order][first]
    np.testing.assert_allclose(depth.ravel(), reference, atol=1e-4)


@pytest.mark.shared_data
def test_kitti_cars_appear_at_their_annotated_depth(kitti):
    info, points, _ = kitti
    camera, transform = kitti_camera_and_transform(info)
    depth = project_points(points, camera, transform)
    visible_cars = [i for i in info['instances'] if i['bbox_label'] == 2 and i['occluded'] == 0]
    assert len(visible_cars) >= 2
    for car in visible_cars:
        x0, y0, x1, y1 = (int(round(c)) for c in car['bbox'])
        inside_box = depth[y0:y1, x0:x1]
        length, _, width = car['bbox_3d'][3:6]
        assert abs(np.median(inside_box[inside_box > 0]) - car['depth']) < max(length, width) / 2 + 0.5


@pytest.mark.shared_data
def test_nuscenes_sweep_through_a_forward_virtual_camera(shared_data):
    base = shared_data / 'pointclouds'
    info = json.loads((base / f'nuscenes_{NUSCENES}_info.json').read_text())['data_list'][0]
    points = np.fromfile(base / f'nuscenes_{NUSCENES}__LIDAR_TOP__1532402927647951.pcd.bin', dtype='<f4').reshape(-1, 5)
    # nuScenes' LIDAR_TOP frame has x to the right; lidar2ego turns it into the REP 103 body frame (x forward).
    lidar2ego = np.array(info['lidar_points']['lidar2ego'])
    camera = virtual_camera(90.0, 224, 224)
    transform = T_OPTICAL_FROM_LIDAR @ lidar2ego
    depth = project_points(points, camera, transform, min_range=1.0, max_range=80.0)
    assert np.count_nonzero(depth) > 1000
    assert depth[depth > 0].min() >= 1.0 - 1e-6 and depth.max() <= 80.0

    checked = 0
    for box in info['instances']:
        if box['num_lidar_pts'] < 30:
            continue
        center = transform @ np.r_[box['bbox_3d'][:3], 1.0]
        if center[2] <= 0 or abs(center[0] / center[2]) > 0.8:  # not well inside the 90 degree view
            continue
        col = int(round(camera.fx * center[0] / center[2] + camera.cx))
        row = int(round(camera.fy * center[1] / center[2] + camera.cy))
        window = depth[max(row - 3, 0):row + 4, max(col - 3, 0):col + 4]
        length, width = box['bbox_3d'][3:5]
        assert abs(np.median(window[window > 0]) - center[2]) < max(length, width) / 2 + 1.0
        checked += 1
    assert checked >= 2

    model_input = lidar_to_depth_input(points, camera, transform, min_range=1.0, max_range=80.0)
    assert model_input.shape == (1, 224, 224) and torch.isfinite(model_input).all()


# --- hole filling --------------------------------------------------------------------------------------------------


def test_fill_closes_gaps_between_scan_lines_without_touching_measurements():
    depth = np.zeros((41, 40), np.float32)
    depth[::4] = 10.0  # scan lines every 4 rows: 3-row gaps
    depth[::4, 20:] = 4.0
    filled = fill_small_holes(depth, kernel_size=5)
    assert (filled > 0).all()
    np.testing.assert_array_equal(filled[::4], depth[::4])
    assert filled[2, 19] == pytest.approx(4.0)  # next to both surfaces: the nearer one wins
    assert filled[2, 10] == pytest.approx(10.0)


def test_fill_leaves_large_holes_empty_and_grows_with_iterations():
    depth = np.zeros((41, 41), np.float32)
    depth[20, 20] = 3.0
    once = fill_small_holes(depth, kernel_size=3, iterations=1)
    assert np.count_nonzero(once) == 9 and np.all(once[once > 0] == 3.0)
    assert np.count_nonzero(fill_small_holes(depth, kernel_size=3, iterations=3)) == 49
    with pytest.raises(PreprocessError, match='odd'):
        fill_small_holes(depth, kernel_size=4)


# --- depth preprocessing -------------------------------------------------------------------------------------------


def test_preprocess_depth_shape_and_invalid_pixels_read_as_far():
    depth = np.full((120, 160), 2.0, np.float32)
    depth[:10] = np.nan
    depth[10:20] = 0.0
    depth[20:30] = -1.0
    depth[30:40] = np.inf
    out = preprocess_depth(depth, focal_px=130.0)
    assert out.shape == (1, 224, 224) and out.dtype == torch.float32
    config = DepthPreprocessConfig()
    far = (config.min_disparity / config.max_disparity - config.mean) / config.std
    np.testing.assert_allclose(out[0, :5].numpy(), far, atol=1e-5)  # NaN rows, resized and cropped
    assert out[0, -5:].min() > far + 0.5  # the 2 m region


def test_nearer_is_larger_and_far_saturates():
    depths = np.array([[0.5, 1.0, 2.0, 5.0, 7.0, 50.0]], np.float32)
    disparity = depth_to_disparity(depths)
    assert np.all(np.diff(disparity[0, :5]) < 0)
    assert disparity[0, 4] == disparity[0, 5]  # both beyond max_depth_m / depth_scale = 6.25 m
    expected = 0.075 * KINECT_FOCAL_PX / (2.0 * 8.0)
    assert disparity[0, 2] == pytest.approx(expected, rel=1e-6)
    physical = depth_to_disparity(depths, config=DepthPreprocessConfig(depth_scale=1.0))
    assert physical[0, 2] == pytest.approx(8 * expected, rel=1e-6)


def test_output_does_not_depend_on_depth_image_resolution():
    scene = np.full((480, 640), 3.0, np.float32)
    scene[:, 320:] = 1.5
    full = preprocess_depth(scene, focal_px=520.0)
    half = preprocess_depth(scene[::2, ::2].copy(), focal_px=260.0)
    assert (full - half).abs().median() < 1e-4  # only the resampled step edge differs
    assert preprocess_depth(scene).mean() == pytest.approx(
        preprocess_depth(scene, focal_px=KINECT_FOCAL_PX).mean().item(), rel=1e-6)


@pytest.mark.parametrize('depth, focal, message', [
    (np.zeros((10, 10), np.uint16), None, 'float metres'),
    (np.zeros((10, 10, 3), np.float32), None, r'\(H, W\)'),
    (np.zeros((0, 10), np.float32), None, 'empty'),
    (np.ones((10, 10), np.float32), 0.0, 'focal_px'),
    (np.ones((10, 10), np.float32), float('nan'), 'focal_px'),
    ([[1.0]], None, 'numpy array'),
])
def test_bad_depth_inputs_raise(depth, focal, message):
    with pytest.raises(PreprocessError, match=message):
        preprocess_depth(depth, focal)
