"""Free space and obstacles for the prompt, from one lidar scan: ground plane, nearest obstacle per sector, clusters.

Points are in the sensor frame, x forward, y left, z up (REP 103). Bearings are measured counter-clockwise from
+x, in degrees in (-180, 180]: positive to the left. The four sectors are 90-degree quadrants centred on the axes:

    front  -45 <= bearing <= 45         left   45 < bearing <= 135
    back   |bearing| > 135              right  -135 <= bearing < -45

Steps: range filter -> voxel downsampling -> ground plane by RANSAC (open3d `segment_plane`, retried when the
plane found is too steep to be ground) -> every input point's height above that plane -> obstacle points in a
height band -> nearest horizontal range per sector -> DBSCAN clusters (open3d `cluster_dbscan`) of the
downsampled obstacle points.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from mm_llm_ros.core.errors import DependencyError

from .base import Lazy, check_config, join_within, setting

logger = logging.getLogger(__name__)

OPEN3D_PIN = 'open3d-cpu==0.20.0'
SECTORS = ('front', 'left', 'right', 'back')
_GROUND_ATTEMPTS = 3   # a wall can hold more points than the ground: drop steep planes and look again
_RANSAC_N = 3


@dataclass
class GeometryConfig:
    """Settings of `GeometryExtractor` (lengths in metres)."""

    # The range limits are the lidar's, shared with the encoder: parameters lidar.min_range_m / lidar.max_range_m.
    min_range_m: float = setting(0.5, 'Lidar returns closer than this (metres; usually the robot itself) are '
                                 'ignored.')
    max_range_m: float = setting(80.0, 'Lidar returns farther than this (metres) are ignored.')
    voxel_size_m: float = setting(0.1, 'Voxel size of the downsampling before ground fitting and clustering '
                                  '(0 disables it).')
    ground_distance_m: float = setting(0.2, 'Points this close to the RANSAC ground plane are ground.')
    ground_iterations: int = 200
    max_ground_tilt_deg: float = 20.0  # steeper planes are walls or ramps, not the ground
    min_height_m: float = setting(0.2, 'Obstacles are points at least this high above the ground...')
    max_height_m: float = setting(2.5, '...and at most this high (higher overhangs are ignored).')
    cluster_eps_m: float = setting(0.5, 'Neighbourhood radius of the DBSCAN object clustering.')
    cluster_min_points: int = setting(10, 'Neighbours a DBSCAN core point needs (downsampled points).')
    max_clusters: int = setting(10, 'Nearest object clusters reported.')
    seed: int = 0                     # open3d's RANSAC seed, for repeatable planes

    def __post_init__(self):
        check_config(0 <= self.min_range_m < self.max_range_m,
                     f'need 0 <= min_range_m < max_range_m, got {self.min_range_m}, {self.max_range_m}')
        check_config(self.voxel_size_m >= 0, f'voxel_size_m must be >= 0, got {self.voxel_size_m}')
        check_config(self.ground_distance_m > 0, f'ground_distance_m must be > 0, got {self.ground_distance_m}')
        check_config(self.ground_iterations >= 1, f'ground_iterations must be >= 1, got {self.ground_iterations}')
        check_config(0 < self.max_ground_tilt_deg < 90,
                     f'max_ground_tilt_deg must be in (0, 90), got {self.max_ground_tilt_deg}')
        check_config(self.min_height_m < self.max_height_m,
                     f'need min_height_m < max_height_m, got {self.min_height_m}, {self.max_height_m}')
        check_config(self.cluster_eps_m > 0, f'cluster_eps_m must be > 0, got {self.cluster_eps_m}')
        check_config(self.cluster_min_points >= 1, f'cluster_min_points must be >= 1, got {self.cluster_min_points}')
        check_config(self.max_clusters >= 0, f'max_clusters must be >= 0, got {self.max_clusters}')


@dataclass(frozen=True)
class Cluster:
    """One group of obstacle points, described in the sensor frame."""

    centroid: tuple[float, float, float]
    extent: tuple[float, float, float]   # axis-aligned size along x, y, z
    distance_m: float                    # horizontal range of the centroid
    bearing_deg: float                   # of the centroid, positive to the left
    num_points: int                      # downsampled points
    # Centre of the axis-aligned box of size `extent` (the centroid is where the points are dense, e.g. the side
    # of a car the lidar sees); None in results published before it was added.
    box_center: tuple[float, float, float] | None = None

    def to_text(self) -> str:
        size = 'x'.join(f'{value:.1f}' for value in self.extent)
        return f'{self.distance_m:.1f} m {describe_bearing(self.bearing_deg)} ({size} m)'


@dataclass
class GeometryResult:
    """Obstacles around the sensor. Point counts are of the (range-filtered) input cloud."""

    section: ClassVar[str] = 'geometry'
    nearest_m: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(SECTORS))
    clusters: list[Cluster] = field(default_factory=list)   # nearest first, at most max_clusters
    num_clusters: int = 0                                    # before the max_clusters cut
    ground_plane: tuple[float, float, float, float] | None = None  # a, b, c, d of ax+by+cz+d=0, normal up
    num_points: int = 0
    num_ground: int = 0
    num_obstacle: int = 0      # non-ground points inside the height band

    @property
    def is_empty(self) -> bool:
        return self.num_points == 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data['ground_plane'] = list(self.ground_plane) if self.ground_plane else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeometryResult:
        """The inverse of `to_dict` (e.g. of a received PerceptionContext's JSON)."""
        clusters = [Cluster(tuple(c['centroid']), tuple(c['extent']), float(c['distance_m']), float(c['bearing_deg']),
                            int(c['num_points']), tuple(c['box_center']) if c.get('box_center') else None)
                    for c in data.get('clusters', ())]
        nearest = {sector: data.get('nearest_m', {}).get(sector) for sector in SECTORS}
        plane = data.get('ground_plane')
        return cls(nearest, clusters, int(data.get('num_clusters', len(clusters))), tuple(plane) if plane else None,
                   int(data.get('num_points', 0)), int(data.get('num_ground', 0)), int(data.get('num_obstacle', 0)))

    def facts(self) -> list[str]:
        """Short prompt lines for small models: one per direction, the object count, the nearest object."""
        if self.is_empty:
            return ['Lidar: no points.']
        lines = [f"Nearest obstacle {_SECTOR_PHRASES[sector]}: "
                 f"{'none' if distance is None else f'{distance:.1f} m'}."
                 for sector, distance in self.nearest_m.items()]
        lines.append(f'Objects around the robot: {self.num_clusters}.')
        if self.clusters:
            nearest = self.clusters[0]
            lines.append(f'Nearest object: {nearest.distance_m:.1f} m away, {side_of(nearest.bearing_deg)}.')
        return lines

    def to_text(self, max_chars: int = 200) -> str:
        if self.is_empty:
            return 'no points'
        nearest = ', '.join(f"{sector} {'-' if distance is None else f'{distance:.1f} m'}"
                            for sector, distance in self.nearest_m.items())
        head = f'nearest {nearest}; {self.num_clusters} objects'
        return join_within([cluster.to_text() for cluster in self.clusters], max_chars,
                           prefix=head + (': ' if self.clusters else ''))


_SECTOR_PHRASES = {'front': 'in front', 'left': 'on the left', 'right': 'on the right', 'back': 'behind'}


def side_of(bearing_deg: float) -> str:
    """'ahead', 'behind', 'to the left' or 'to the right', with `describe_bearing`'s bounds."""
    words = describe_bearing(bearing_deg)
    return words if words in ('ahead', 'behind') else f"to the {words.split()[-1]}"


def describe_bearing(bearing_deg: float) -> str:
    """'ahead', 'behind' or '30° left' style words for a bearing (positive to the left)."""
    if abs(bearing_deg) < 10:
        return 'ahead'
    if abs(bearing_deg) > 170:
        return 'behind'
    return f"{abs(bearing_deg):.0f}° {'left' if bearing_deg > 0 else 'right'}"


def sector_of(bearing_deg: np.ndarray) -> np.ndarray:
    """Index into SECTORS of each bearing in degrees (see the module docstring for the bounds)."""
    sector = np.full(bearing_deg.shape, SECTORS.index('back'))
    sector[(bearing_deg >= -45) & (bearing_deg <= 45)] = SECTORS.index('front')
    sector[(bearing_deg > 45) & (bearing_deg <= 135)] = SECTORS.index('left')
    sector[(bearing_deg < -45) & (bearing_deg >= -135)] = SECTORS.index('right')
    return sector


def _import_open3d():
    try:
        import open3d
    except ImportError as error:   # also raised for a missing system library such as libusb-1.0.so.0
        raise DependencyError(f'geometry needs {OPEN3D_PIN} (or open3d): {error}') from error
    open3d.utility.set_verbosity_level(open3d.utility.VerbosityLevel.Error)   # DBSCAN prints progress otherwise
    return open3d


class GeometryExtractor:
    """Nearest obstacles per sector and coarse object clusters in a lidar scan (N, 3+) in the sensor frame.

    open3d is imported on first call (or on `load()`); unusable input gives an empty result and a warning.
    """

    def __init__(self, config: GeometryConfig | None = None):
        self.config = config or GeometryConfig()
        self._o3d = Lazy(_import_open3d)

    @property
    def loaded(self) -> bool:
        """Whether open3d is imported (for diagnostics)."""
        return self._o3d.loaded

    def load(self) -> None:
        """Import open3d now, so a missing package fails at start-up rather than on the first scan."""
        self._o3d.get()

    def __call__(self, points: np.ndarray) -> GeometryResult:
        """Analyse `points`, an (N, 3+) array of x, y, z (extra columns such as intensity are ignored)."""
        xyz = self._valid_points(points)
        if xyz is None or len(xyz) == 0:
            return GeometryResult()
        o3d = self._o3d.get()
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
        if self.config.voxel_size_m > 0:
            cloud = cloud.voxel_down_sample(self.config.voxel_size_m)
        plane, plane_found = self._ground_plane(cloud)

        height = xyz @ plane[:3] + plane[3]
        obstacle = self._in_height_band(height)
        result = GeometryResult(ground_plane=tuple(round(float(v), 4) for v in plane) if plane_found else None,
                                num_points=len(xyz),
                                num_ground=int(np.count_nonzero(np.abs(height) <= self.config.ground_distance_m)),
                                num_obstacle=int(np.count_nonzero(obstacle)))
        result.nearest_m = self._nearest_per_sector(xyz[obstacle])

        # Clusters come from the downsampled cloud: DBSCAN cost grows quickly with the point count.
        sparse = np.asarray(cloud.points)
        clusters = self._clusters(sparse[self._in_height_band(sparse @ plane[:3] + plane[3])])
        result.num_clusters = len(clusters)
        result.clusters = clusters[:self.config.max_clusters]
        return result

    def _in_height_band(self, height: np.ndarray) -> np.ndarray:
        return (height >= self.config.min_height_m) & (height <= self.config.max_height_m)

    def _valid_points(self, points: Any) -> np.ndarray | None:
        if not isinstance(points, np.ndarray) or points.ndim != 2 or points.shape[1] < 3 \
                or not np.issubdtype(points.dtype, np.number):
            logger.warning('geometry skipped: expected a numeric (N, 3+) array, got %s',
                           getattr(points, 'shape', type(points).__name__))
            return None
        xyz = points[:, :3].astype(np.float64)
        xyz = xyz[np.all(np.isfinite(xyz), axis=1)]
        horizontal = np.hypot(xyz[:, 0], xyz[:, 1])
        # A return beyond the range vertically is as bogus as one beyond it horizontally, and one at 1e38 m would
        # make open3d's voxel grid overflow ("voxel_size is too small").
        return xyz[(horizontal >= self.config.min_range_m) & (horizontal <= self.config.max_range_m)
                   & (np.abs(xyz[:, 2]) <= self.config.max_range_m)]

    def _ground_plane(self, cloud) -> tuple[np.ndarray, bool]:
        """([a, b, c, d], found) of the ground plane ax+by+cz+d=0, with (a, b, c) the unit normal pointing up.

        Without a plausible plane the ground is taken as horizontal through the 2nd-percentile height, so the
        height band still means "above the lowest returns"; `found` is then False.
        """
        o3d = self._o3d.get()
        o3d.utility.random.seed(self.config.seed)
        min_normal_z = math.cos(math.radians(self.config.max_ground_tilt_deg))
        candidates = cloud
        for _ in range(_GROUND_ATTEMPTS):
            if len(candidates.points) < _RANSAC_N:
                break
            model, inliers = candidates.segment_plane(self.config.ground_distance_m, _RANSAC_N,
                                                      self.config.ground_iterations)
            normal = np.asarray(model[:3], dtype=np.float64)
            scale = np.linalg.norm(normal)
            if scale > 0 and abs(normal[2]) / scale >= min_normal_z:
                sign = 1.0 if normal[2] > 0 else -1.0
                return np.array([*(normal * sign / scale), model[3] * sign / scale]), True
            candidates = candidates.select_by_index(inliers, invert=True)
        lowest = float(np.percentile(np.asarray(cloud.points)[:, 2], 2)) if len(cloud.points) else 0.0
        logger.debug('no ground plane found; using z = %.2f m', lowest)
        return np.array([0.0, 0.0, 1.0, -lowest]), False

    @staticmethod
    def _nearest_per_sector(xyz: np.ndarray) -> dict[str, float | None]:
        horizontal = np.hypot(xyz[:, 0], xyz[:, 1])
        sector = sector_of(np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])))
        nearest: dict[str, float | None] = {}
        for index, name in enumerate(SECTORS):
            in_sector = horizontal[sector == index]
            nearest[name] = round(float(in_sector.min()), 2) if in_sector.size else None
        return nearest

    def _clusters(self, xyz: np.ndarray) -> list[Cluster]:
        if len(xyz) < self.config.cluster_min_points:
            return []
        o3d = self._o3d.get()
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
        labels = np.asarray(cloud.cluster_dbscan(self.config.cluster_eps_m, self.config.cluster_min_points))
        clusters = []
        for label in range(int(labels.max(initial=-1)) + 1):   # -1 is DBSCAN noise
            members = xyz[labels == label]
            centroid = members.mean(axis=0)
            low, high = members.min(axis=0), members.max(axis=0)
            clusters.append(Cluster(
                centroid=tuple(round(float(v), 2) for v in centroid),
                extent=tuple(round(float(v), 2) for v in high - low),
                distance_m=round(float(np.hypot(centroid[0], centroid[1])), 2),
                bearing_deg=round(math.degrees(math.atan2(centroid[1], centroid[0])), 1),
                num_points=len(members),
                box_center=tuple(round(float(v), 2) for v in (low + high) / 2)))
        return sorted(clusters, key=lambda cluster: cluster.distance_m)
