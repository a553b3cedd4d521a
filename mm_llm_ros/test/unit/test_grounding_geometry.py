"""Lidar geometry: sectors, ground plane, obstacles and clusters on synthetic scenes and a real KITTI scan."""
import json

import numpy as np
import pytest

from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.grounding import GeometryConfig, GeometryExtractor
from mm_llm_ros.core.grounding.geometry import SECTORS, describe_bearing, sector_of

SENSOR_HEIGHT = 1.7


def ground(half_size=15.0, step=0.2, tilt_deg=0.0):
    """Grid of ground points 1.7 m below the sensor, optionally rising with x by `tilt_deg`."""
    axis = np.arange(-half_size, half_size, step)
    x, y = np.meshgrid(axis, axis)
    z = -SENSOR_HEIGHT + np.tan(np.radians(tilt_deg)) * x
    return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)


def box(centre_xy, size=(1.0, 1.0, 1.5), step=0.1):
    """Solid block of points standing on the ground at `centre_xy`."""
    axes = [np.arange(-s / 2, s / 2 + 1e-9, step) for s in size]
    x, y, z = np.meshgrid(*axes, indexing='ij')
    points = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    return points + [centre_xy[0], centre_xy[1], -SENSOR_HEIGHT + size[2] / 2]


@pytest.fixture(scope='module')
def extractor():
    pytest.importorskip('open3d')
    geometry = GeometryExtractor()
    geometry.load()
    return geometry


@pytest.mark.parametrize('bearing, sector', [(0, 'front'), (45, 'front'), (45.1, 'left'), (135, 'left'),
                                             (135.1, 'back'), (180, 'back'), (-180, 'back'), (-135, 'right'),
                                             (-45, 'front'), (-45.1, 'right')])
def test_sector_bounds(bearing, sector):
    assert SECTORS[sector_of(np.array([bearing]))[0]] == sector


@pytest.mark.parametrize('bearing, words', [(3, 'ahead'), (-9, 'ahead'), (30, '30° left'), (-95, '95° right'),
                                            (175, 'behind')])
def test_describe_bearing(bearing, words):
    assert describe_bearing(bearing) == words


@pytest.mark.parametrize('kwargs', [{'min_range_m': 5, 'max_range_m': 1}, {'voxel_size_m': -1},
                                    {'ground_distance_m': 0}, {'max_ground_tilt_deg': 90},
                                    {'min_height_m': 2, 'max_height_m': 1}, {'cluster_eps_m': 0},
                                    {'cluster_min_points': 0}, {'max_clusters': -1}])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ConfigError):
        GeometryConfig(**kwargs)


@pytest.mark.parametrize('points', [None, np.zeros((10, 2)), np.zeros(30), np.array([['a', 'b', 'c']]),
                                    np.zeros((0, 3))])
def test_unusable_input_gives_an_empty_result(points, caplog):
    extractor = GeometryExtractor()
    result = extractor(points)
    assert result.is_empty and result.to_text() == 'no points'
    assert not extractor.loaded
    if points is not None and len(points):
        assert 'geometry skipped' in caplog.text


def test_obstacles_per_sector_and_clusters(extractor):
    scene = np.concatenate([ground(), box((5.0, 0.0)), box((0.0, 3.0)), box((-8.0, -1.0)),
                            np.full((5, 3), np.nan), box((200.0, 0.0))])   # NaNs and out-of-range are dropped
    result = extractor(np.hstack([scene, np.ones((len(scene), 1))]))   # an intensity column is ignored
    assert result.nearest_m['front'] == pytest.approx(4.5, abs=0.06)
    assert result.nearest_m['left'] == pytest.approx(2.5, abs=0.06)
    assert result.nearest_m['back'] == pytest.approx(7.5, abs=0.1)
    assert result.nearest_m['right'] is None
    a, b, c, d = result.ground_plane
    assert c > 0.99 and d == pytest.approx(SENSOR_HEIGHT, abs=0.05)
    assert result.num_clusters == 3
    centroids = np.array([cluster.centroid for cluster in result.clusters])
    np.testing.assert_allclose(centroids[:, :2], [[0.0, 3.0], [5.0, 0.0], [-8.0, -1.0]], atol=0.1)
    assert [round(cl.bearing_deg) for cl in result.clusters] == [90, 0, -173]
    np.testing.assert_allclose(result.clusters[1].extent, [1.0, 1.0, 1.3], atol=0.15)  # the ground band cuts 0.2 m
    assert result.num_obstacle > 0 and result.num_ground >= len(ground()) * 0.95
    text = result.to_text(300)
    assert text.startswith('nearest front 4.5 m, left 2.5 m, right -, back 7.5 m; 3 objects: 3.0 m 90° left')
    assert json.loads(json.dumps(result.to_dict()))['nearest_m']['right'] is None


@pytest.mark.parametrize('height', [1e38, -1e38, 1e6])
def test_returns_far_above_or_below_are_dropped_not_a_crash(extractor, height):
    """A point 2 m away horizontally but 1e38 m up (a hostile or corrupt cloud) once overflowed open3d's voxel grid."""
    scene = np.concatenate([ground(), box((5.0, 0.0))])
    result = extractor(np.concatenate([scene, [[2.0, 0.0, height]]]))
    assert result.num_points == extractor(scene).num_points
    assert result.nearest_m['front'] == pytest.approx(4.5, abs=0.06)


def test_height_band_ignores_overhangs_and_low_bumps(extractor):
    overhead = box((3.0, 0.0), size=(1.0, 1.0, 0.2)) + [0, 0, 3.0]    # e.g. a sign 3 m above the ground
    kerb = box((0.0, -2.0), size=(1.0, 1.0, 0.1))                    # lower than min_height_m
    result = extractor(np.concatenate([ground(), overhead, kerb]))
    assert result.nearest_m == dict.fromkeys(SECTORS)
    assert result.num_clusters == 0 and result.to_text().endswith('0 objects')


def test_a_wall_with_more_points_than_the_ground_is_not_taken_as_ground(extractor):
    y, z = np.meshgrid(np.arange(-15, 15, 0.05), np.arange(-1.7, 6.0, 0.05))
    wall = np.stack([np.full(y.size, 12.0), y.ravel(), z.ravel()], axis=1)
    scene = np.concatenate([ground(step=0.3), wall, box((4.0, 0.0))])
    result = extractor(scene)
    assert result.ground_plane is not None and result.ground_plane[2] > 0.99
    assert result.nearest_m['front'] == pytest.approx(3.5, abs=0.06)


def test_sloped_ground_is_followed(extractor):
    result = extractor(np.concatenate([ground(tilt_deg=8.0), box((6.0, 0.0))]))
    assert result.ground_plane[2] == pytest.approx(np.cos(np.radians(8.0)), abs=0.01)
    assert result.num_clusters == 1   # the rising ground far ahead is not an obstacle


def test_without_ground_points_height_is_taken_from_the_lowest_returns(extractor):
    result = extractor(box((5.0, 0.0), size=(1.0, 1.0, 1.5)))
    assert result.ground_plane is None
    assert result.num_clusters == 1 and result.nearest_m['front'] == pytest.approx(4.5, abs=0.06)


def test_max_clusters_keeps_the_nearest():
    pytest.importorskip('open3d')
    scene = np.concatenate([ground()] + [box((4.0 + 3 * i, 0.0)) for i in range(4)])
    result = GeometryExtractor(GeometryConfig(max_clusters=2))(scene)
    assert result.num_clusters == 4
    assert [round(cl.distance_m) for cl in result.clusters] == [4, 7]
    assert '4 objects' in result.to_text() and '(+' not in result.to_text(400)


def kitti_cars_in_lidar_frame(info):
    """Centres of the annotated cars, moved from rectified camera coordinates into the lidar frame."""
    sample = info['data_list'][0]
    rect = np.array(sample['images']['R0_rect'])
    velo_to_cam = np.array(sample['lidar_points']['Tr_velo_to_cam'])
    cam_to_velo = np.linalg.inv(rect @ velo_to_cam)
    centres = []
    for instance in sample['instances']:
        if instance['bbox_label_3d'] != 2:   # 2 = Car
            continue
        x, y, z, _, height, _, _ = instance['bbox_3d']   # bottom centre in camera coords, y down
        centres.append((cam_to_velo @ [x, y - height / 2, z, 1.0])[:3])
    return np.array(centres)


def test_finds_the_parked_cars_in_a_kitti_scan(extractor, shared_data):
    points = np.fromfile(shared_data / 'pointclouds/kitti_000008.bin', '<f4').reshape(-1, 4)
    cars = kitti_cars_in_lidar_frame(json.loads((shared_data / 'pointclouds/kitti_000008_info.json').read_text()))
    assert len(cars) == 6
    result = GeometryExtractor(GeometryConfig(max_clusters=100))(points)
    centroids = np.array([cluster.centroid for cluster in result.clusters])
    nearest = np.linalg.norm(cars[:, None] - centroids[None], axis=2).min(axis=1)
    assert np.count_nonzero(nearest < 1.5) >= 4, np.round(nearest, 2)
    # The road ahead is about 1.7 m below the roof-mounted scanner.
    assert result.ground_plane[3] == pytest.approx(1.73, abs=0.15)
    # The closest car (front-left, about 4 m away) is the first object named.
    assert result.clusters[0].bearing_deg > 0 and result.clusters[0].distance_m < 6
