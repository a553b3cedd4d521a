"""A synthetic street scene generated from code, for demos and tests on machines without sample data.

One instant seen by three sensors that agree with each other: the camera and the lidar share an origin
``SENSOR_HEIGHT_M`` above a flat road (lidar frame x forward, y left, z up; the camera looks along +x), so every
box in :data:`OBSTACLES` and the sign appear where the cloud has them. The image carries a clearly readable sign
(:data:`SIGN_TEXT`); the sound is an idling engine with reversing beeps at :data:`BEEP_TIMES_S`. Everything is
deterministic for a given seed.
"""
from __future__ import annotations

import dataclasses
import pathlib
import wave

import cv2
import numpy as np

from mm_llm_ros.core.replay.scene import DEFAULT_FRAMES, DEFAULT_TOPICS, CameraIntrinsics, Scene, StreamKind, StreamSpec
from mm_llm_ros.core.sensor_decoding import encode_audio
from mm_llm_ros.core.replay.sensor_files import IMU_CSV_HEADER

IMAGE_WIDTH, IMAGE_HEIGHT = 1280, 720
FOCAL_PX = 900.0
INTRINSICS = CameraIntrinsics((FOCAL_PX, 0.0, IMAGE_WIDTH / 2, 0.0, FOCAL_PX, IMAGE_HEIGHT / 2, 0.0, 0.0, 1.0))
SENSOR_HEIGHT_M = 1.6  # camera and lidar above the road
SIGN_TEXT = 'LOADING DOCK B'
AUDIO_RATE = 16_000
AUDIO_SECONDS = 4.0
BEEP_TIMES_S = (1.0, 1.5, 3.0)
BEEP_HZ = 1000.0


@dataclasses.dataclass(frozen=True)
class Box:
    """An axis-aligned box standing on the road: centre (x forward, y left) and size (x, y, z) in metres."""

    name: str
    x: float
    y: float
    size: tuple[float, float, float]
    rgb: tuple[int, int, int]

    @property
    def bounds(self) -> np.ndarray:
        """[[x_min, y_min, z_min], [x_max, y_max, z_max]] in the lidar frame."""
        length, width, height = self.size
        ground = -SENSOR_HEIGHT_M
        return np.array([[self.x - length / 2, self.y - width / 2, ground],
                         [self.x + length / 2, self.y + width / 2, ground + height]])

    @property
    def distance_m(self) -> float:
        """Forward distance to the nearest face."""
        return self.x - self.size[0] / 2


# Far to near: the image is painted in this order.
OBSTACLES = (
    Box('box truck', 18.0, 0.5, (6.0, 2.5, 3.0), (205, 205, 200)),
    Box('blue crate', 10.0, -2.0, (1.0, 1.0, 1.0), (40, 90, 170)),
    Box('pallet stack', 6.0, 1.8, (1.2, 1.2, 1.4), (150, 110, 60)),
)
# The sign board faces the sensors: a vertical plane at x = SIGN_X.
SIGN_X, SIGN_Y, SIGN_WIDTH, SIGN_HEIGHT, SIGN_BOTTOM = 8.0, -3.2, 4.5, 1.5, 1.6  # metres; bottom above the road
ROAD_HALF_WIDTH = 4.0
WALL_Y = 14.0


def write_synthetic_scene(folder: str | pathlib.Path, seed: int = 0) -> Scene:
    """Write street.png, lidar.bin (KITTI layout), street_sound.wav, thermal.png (centikelvin) and imu.csv into
    ``folder``; return their scene."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image_path, cloud_path, audio_path = folder / 'street.png', folder / 'lidar.bin', folder / 'street_sound.wav'
    if not cv2.imwrite(str(image_path), cv2.cvtColor(street_image(), cv2.COLOR_RGB2BGR)):
        raise OSError(f'could not write {image_path}')
    street_cloud(rng).astype('<f4').tofile(cloud_path)
    write_wav(audio_path, street_sound(rng)[None, :], AUDIO_RATE)
    thermal_path, imu_path = folder / 'thermal.png', folder / 'imu.csv'
    # A radiometric camera's mono16 output: centikelvin.
    if not cv2.imwrite(str(thermal_path), np.round(thermal_image(rng) * 100).astype(np.uint16)):
        raise OSError(f'could not write {thermal_path}')
    write_imu_csv(imu_path, *imu_stream(rng))
    return Scene((
        StreamSpec(StreamKind.IMAGE, DEFAULT_TOPICS['image'], DEFAULT_FRAMES['image'], (image_path,),
                   camera_info=INTRINSICS),
        StreamSpec(StreamKind.POINTS, DEFAULT_TOPICS['points'], DEFAULT_FRAMES['points'], (cloud_path,)),
        StreamSpec(StreamKind.AUDIO, DEFAULT_TOPICS['audio'], DEFAULT_FRAMES['audio'], (audio_path,)),
        StreamSpec(StreamKind.THERMAL, DEFAULT_TOPICS['thermal'], DEFAULT_FRAMES['thermal'], (thermal_path,)),
        StreamSpec(StreamKind.IMU, DEFAULT_TOPICS['imu'], DEFAULT_FRAMES['imu'], (imu_path,)),
    ), name='synthetic street')


def write_imu_csv(path: pathlib.Path, stamps_ns: np.ndarray, samples: np.ndarray) -> None:
    """An IMU stream -> the replay's CSV (`sensor_files.read_imu_csv`), times relative to its first sample."""
    table = np.column_stack([(stamps_ns - stamps_ns[0]) / 1e9, samples])
    np.savetxt(path, table, delimiter=',', header=IMU_CSV_HEADER, comments='', fmt='%.9g')


def write_wav(path: pathlib.Path, waveform: np.ndarray, sample_rate: int) -> None:
    """(channels, n) float waveform -> 16-bit PCM WAV."""
    with wave.open(str(path), 'wb') as out:
        out.setnchannels(waveform.shape[0])
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(encode_audio(waveform, 'S16LE'))


# ----------------------------------------------------------------------------------------------------------------
# Camera


def project(points: np.ndarray) -> np.ndarray:
    """(N, 3) lidar-frame points in front of the camera -> (N, 2) pixel coordinates."""
    points = np.asarray(points, np.float64)
    u = IMAGE_WIDTH / 2 - FOCAL_PX * points[:, 1] / points[:, 0]
    v = IMAGE_HEIGHT / 2 - FOCAL_PX * points[:, 2] / points[:, 0]
    return np.stack([u, v], axis=1)


def _polygon(image: np.ndarray, corners: np.ndarray, rgb) -> None:
    cv2.fillPoly(image, [np.round(project(corners)).astype(np.int32)], rgb, lineType=cv2.LINE_AA)


def street_image() -> np.ndarray:
    """(720, 1280, 3) uint8 RGB view along the road."""
    image = np.zeros((IMAGE_HEIGHT, IMAGE_WIDTH, 3), np.uint8)
    horizon = IMAGE_HEIGHT // 2
    sky = np.linspace(0, 1, horizon)[:, None, None]
    image[:horizon] = ((1 - sky) * np.array([110, 160, 220]) + sky * np.array([200, 220, 240])).astype(np.uint8)
    image[horizon:] = (120, 125, 115)  # verge and pavement
    ground = -SENSOR_HEIGHT_M
    _draw_buildings(image, ground)
    _polygon(image, np.array([[200.0, ROAD_HALF_WIDTH, ground], [200.0, -ROAD_HALF_WIDTH, ground],
                              [3.0, -ROAD_HALF_WIDTH, ground], [3.0, ROAD_HALF_WIDTH, ground]]), (70, 72, 75))
    for start in np.arange(4.0, 60.0, 4.0):  # dashed centre line, 2 m dashes
        _polygon(image, np.array([[start, 0.08, ground], [start, -0.08, ground],
                                  [start + 2, -0.08, ground], [start + 2, 0.08, ground]]), (235, 235, 225))
    for box in OBSTACLES[:2]:
        _draw_box(image, box)
    _draw_sign(image, ground)
    for box in OBSTACLES[2:]:
        _draw_box(image, box)
    return image


def _draw_buildings(image: np.ndarray, ground: float) -> None:
    for index, x in enumerate(np.arange(25.0, 85.0, 12.0)):
        for side in (1.0, -1.0):
            shade = 150 + 12 * (index % 3)
            height = 9.0 + 3.0 * ((index + (side > 0)) % 3)
            near, far = x, x + 10.0
            _polygon(image, np.array([[near, side * WALL_Y, ground], [far, side * WALL_Y, ground],
                                      [far, side * WALL_Y, ground + height],
                                      [near, side * WALL_Y, ground + height]]), (shade, shade - 15, shade - 30))
            for floor in np.arange(1.5, height - 1.0, 3.0):  # windows
                for along in np.arange(near + 1.0, far - 1.0, 2.5):
                    _polygon(image, np.array([[along, side * WALL_Y, ground + floor],
                                              [along + 1.2, side * WALL_Y, ground + floor],
                                              [along + 1.2, side * WALL_Y, ground + floor + 1.4],
                                              [along, side * WALL_Y, ground + floor + 1.4]]), (60, 80, 100))


def _draw_box(image: np.ndarray, box: Box) -> None:
    (x0, y0, z0), (x1, y1, z1) = box.bounds
    colour = np.array(box.rgb, np.float64)
    side_y = y1 if y1 < 0 else y0  # the side face turned towards the road centre
    faces = [(np.array([[x0, side_y, z0], [x1, side_y, z0], [x1, side_y, z1], [x0, side_y, z1]]), 0.75),
             (np.array([[x0, y0, z1], [x1, y0, z1], [x1, y1, z1], [x0, y1, z1]]), 1.15),
             (np.array([[x0, y0, z0], [x0, y1, z0], [x0, y1, z1], [x0, y0, z1]]), 1.0)]  # front last
    for corners, light in faces:
        _polygon(image, corners, tuple(int(c) for c in np.clip(colour * light, 0, 255)))
    front = np.round(project(faces[-1][0])).astype(np.int32)
    cv2.polylines(image, [front], True, (30, 30, 30), 1, cv2.LINE_AA)


def sign_corners_px() -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixel rectangle of the sign board."""
    bottom = -SENSOR_HEIGHT_M + SIGN_BOTTOM
    (left, top), (right, low) = project(np.array([[SIGN_X, SIGN_Y + SIGN_WIDTH / 2, bottom + SIGN_HEIGHT],
                                                  [SIGN_X, SIGN_Y - SIGN_WIDTH / 2, bottom]]))
    return int(round(left)), int(round(top)), int(round(right)), int(round(low))


def _draw_sign(image: np.ndarray, ground: float) -> None:
    left, top, right, bottom = sign_corners_px()
    pole_u = int(round(project(np.array([[SIGN_X, SIGN_Y, ground]]))[0, 0]))
    pole_foot = int(round(project(np.array([[SIGN_X, SIGN_Y, ground]]))[0, 1]))
    cv2.rectangle(image, (pole_u - 4, bottom), (pole_u + 4, pole_foot), (90, 90, 95), cv2.FILLED)
    cv2.rectangle(image, (left, top), (right, bottom), (250, 250, 250), cv2.FILLED)
    cv2.rectangle(image, (left, top), (right, bottom), (20, 20, 20), 4)
    font, thickness = cv2.FONT_HERSHEY_DUPLEX, 3
    (width, height), _ = cv2.getTextSize(SIGN_TEXT, font, 1.0, thickness)
    scale = 0.85 * (right - left) / width  # fill most of the board
    (width, height), _ = cv2.getTextSize(SIGN_TEXT, font, scale, thickness)
    origin = (left + (right - left - width) // 2, (top + bottom + height) // 2)
    cv2.putText(image, SIGN_TEXT, origin, font, scale, (0, 0, 0), thickness, cv2.LINE_AA)


# ----------------------------------------------------------------------------------------------------------------
# Lidar


def street_cloud(rng: np.random.Generator) -> np.ndarray:
    """(N, 4) float32 x, y, z, reflectance (~30k points): road, building walls, the boxes and the sign."""
    ground = -SENSOR_HEIGHT_M
    parts = [_road_points(rng, ground, 28_000)]
    for side in (1.0, -1.0):
        parts.append(_plane_points(rng, 3_500, x=(-10.0, 60.0), y=(side * WALL_Y, side * WALL_Y),
                                   z=(ground, ground + 9.0), reflectance=0.3))
    for box in OBSTACLES:
        parts.extend(_box_points(rng, box))
    sign_bottom = ground + SIGN_BOTTOM
    parts.append(_plane_points(rng, 2_000, x=(SIGN_X, SIGN_X),
                               y=(SIGN_Y - SIGN_WIDTH / 2, SIGN_Y + SIGN_WIDTH / 2),
                               z=(sign_bottom, sign_bottom + SIGN_HEIGHT), reflectance=0.95))  # retroreflective
    parts.append(_plane_points(rng, 150, x=(SIGN_X, SIGN_X), y=(SIGN_Y - 0.05, SIGN_Y + 0.05),
                               z=(ground, sign_bottom), reflectance=0.5))
    cloud = np.concatenate(parts)
    cloud[:, :3] += rng.normal(0.0, 0.01, (len(cloud), 3))  # 1 cm range noise
    return cloud.astype(np.float32)


def _road_points(rng: np.random.Generator, ground: float, count: int) -> np.ndarray:
    # Uniform range and azimuth: density falls with distance as for a spinning lidar.
    radius = rng.uniform(2.5, 40.0, count)
    azimuth = rng.uniform(-np.pi, np.pi, count)
    points = np.stack([radius * np.cos(azimuth), radius * np.sin(azimuth), np.full(count, ground)], axis=1)
    keep = np.abs(points[:, 1]) < WALL_Y
    for box in OBSTACLES:  # the boxes hide the road under them
        (x0, y0, _), (x1, y1, _) = box.bounds
        keep &= ~((points[:, 0] > x0) & (points[:, 0] < x1) & (points[:, 1] > y0) & (points[:, 1] < y1))
    on_road = np.abs(points[:, 1]) < ROAD_HALF_WIDTH
    reflectance = np.where(on_road, 0.12, 0.25) + rng.uniform(-0.03, 0.03, count)
    return np.column_stack([points, reflectance])[keep]


def _plane_points(rng: np.random.Generator, count: int, x, y, z, reflectance: float) -> np.ndarray:
    columns = [rng.uniform(low, high, count) for low, high in (x, y, z)]
    return np.column_stack(columns + [np.full(count, reflectance)])


def _box_points(rng: np.random.Generator, box: Box, per_square_metre_at_5m: float = 600.0) -> list[np.ndarray]:
    """Points on the faces the sensor sees (those facing the origin), thinning with distance."""
    low, high = box.bounds
    faces = []
    for axis in range(3):
        if low[axis] > 0 or high[axis] < 0:
            plane = low[axis] if low[axis] > 0 else high[axis]
            extent = [(low[a], high[a]) if a != axis else (plane, plane) for a in range(3)]
            area = np.prod([high[a] - low[a] for a in range(3) if a != axis])
            count = int(per_square_metre_at_5m * area * (5.0 / box.x) ** 2)
            faces.append(_plane_points(rng, count, *extent, reflectance=0.45))
    return faces


# ----------------------------------------------------------------------------------------------------------------
# Microphone


def street_sound(rng: np.random.Generator) -> np.ndarray:
    """(n,) float32 mono at AUDIO_RATE: an idling diesel hum with road noise and reversing beeps."""
    t = np.arange(int(AUDIO_SECONDS * AUDIO_RATE)) / AUDIO_RATE
    firing = 2 * np.pi * 48.0 * t
    hum = sum(np.sin(k * firing + k) / k for k in range(1, 6)) * (1.0 + 0.3 * np.sin(2 * np.pi * 6.0 * t))
    noise = np.convolve(rng.normal(0.0, 1.0, t.size), np.ones(16) / 16, mode='same')  # low-passed rumble
    signal = 0.25 * hum + 0.15 * noise
    beep_length = int(0.12 * AUDIO_RATE)
    envelope = np.sin(np.linspace(0.0, np.pi, beep_length)) ** 0.2  # soft edges, no clicks
    for start_s in BEEP_TIMES_S:
        start = int(start_s * AUDIO_RATE)
        signal[start:start + beep_length] += 0.6 * envelope * np.sin(2 * np.pi * BEEP_HZ * t[:beep_length])
    return (0.8 * signal / np.abs(signal).max()).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Thermal camera (not part of the written scene: arrays for the thermal and IMU modalities)

THERMAL_WIDTH, THERMAL_HEIGHT = 640, 512  # a common LWIR core; LLVIP's frames are 1280x1024, the same 5:4
THERMAL_PERSON_BOX = (250, 190, 330, 420)  # (left, top, right, bottom) pixels of the pedestrian
THERMAL_ENGINE_BOX = (430, 300, 560, 360)  # the idling van's warm bonnet
GRAVITY = 9.80665


def thermal_image(rng: np.random.Generator) -> np.ndarray:
    """(512, 640) float32 kelvin, white-hot scene at night: a pedestrian and an idling van on a cool street.

    Cold sky (~255 K) over a ground that kept some warmth (~280-286 K), a person (skin ~306 K, clothes ~300 K), a
    van (~281 K) with a hot bonnet (~325 K) and exhaust (~340 K); blurred like lens optics, with 50 mK noise (a
    typical microbolometer NETD).
    """
    height, width = THERMAL_HEIGHT, THERMAL_WIDTH
    rows = np.linspace(0.0, 1.0, height)[:, None]
    scene = np.where(rows < 0.45, 255.0 + 10.0 * rows, 280.0 + 6.0 * (rows - 0.45)) * np.ones((1, width))
    road = np.zeros((height, width), np.uint8)
    cv2.fillPoly(road, [np.array([[280, 231], [360, 231], [640, 470], [640, 512], [0, 512], [0, 470]])], 1)
    scene[road.astype(bool)] = 286.0  # asphalt releases the day's heat
    left, top, right, bottom = THERMAL_PERSON_BOX
    centre_x = (left + right) // 2
    cv2.ellipse(scene, (centre_x, top + 22), (18, 22), 0, 0, 360, 306.0, cv2.FILLED)  # head
    cv2.rectangle(scene, (left + 8, top + 44), (right - 8, top + 140), 300.0, cv2.FILLED)  # torso
    cv2.rectangle(scene, (left + 14, top + 140), (centre_x - 3, bottom), 299.0, cv2.FILLED)  # legs
    cv2.rectangle(scene, (centre_x + 3, top + 140), (right - 14, bottom), 299.0, cv2.FILLED)
    cv2.rectangle(scene, (410, 250), (640, 380), 281.0, cv2.FILLED)  # van body
    engine_left, engine_top, engine_right, engine_bottom = THERMAL_ENGINE_BOX
    cv2.rectangle(scene, (engine_left, engine_top), (engine_right, engine_bottom), 325.0, cv2.FILLED)
    cv2.circle(scene, (620, 372), 8, 340.0, cv2.FILLED)  # exhaust pipe
    scene = cv2.GaussianBlur(scene, (0, 0), 1.5)
    return (scene + rng.normal(0.0, 0.05, scene.shape)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# IMU

IMU_RATE_HZ = 200.0
IMU_SECONDS = 8.0
ROBOT_SPEED_MPS = 1.5
TURN_START_S, TURN_END_S, TURN_RATE_RPS = 4.0, 6.0, 0.6  # a left turn of 1.2 rad (~69 degrees)


def imu_stream(rng: np.random.Generator, duration_s: float = IMU_SECONDS, rate_hz: float = IMU_RATE_HZ,
               start_ns: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A ground robot driving off, cruising and turning left, as a base_link IMU sees it (x fwd, y left, z up).

    Returns (stamps_ns (N,) int64, samples (N, 6) float64): acc x, y, z in m/s^2 including gravity (+9.81 on z,
    REP 145), then gyro x, y, z in rad/s. It accelerates at 0.75 m/s^2 to ``ROBOT_SPEED_MPS`` over 2 s, and turns
    at ``TURN_RATE_RPS`` between ``TURN_START_S`` and ``TURN_END_S`` (ramping in and out over 0.25 s), so the
    centripetal acceleration v * omega appears on y. Wheel vibration, sensor noise and small biases
    are added.
    """
    count = int(round(duration_s * rate_hz))
    t = np.arange(count) / rate_hz
    speed = np.clip(0.75 * t, 0.0, ROBOT_SPEED_MPS)
    accel_x = np.where(speed < ROBOT_SPEED_MPS, 0.75, 0.0)
    ramp = 0.25
    yaw_rate = TURN_RATE_RPS * np.clip(np.minimum(t - TURN_START_S, TURN_END_S - t) / ramp + 0.5, 0.0, 1.0)
    vibration = 0.15 * np.sin(2 * np.pi * 12.0 * t) * (speed / ROBOT_SPEED_MPS)  # wheel/ground excitation
    samples = np.column_stack([
        accel_x + 0.02,
        speed * yaw_rate - 0.01,
        np.full(count, GRAVITY) + vibration,
        0.02 * vibration,
        0.02 * vibration,
        yaw_rate + 0.002,
    ])
    samples[:, :3] += rng.normal(0.0, 0.03, (count, 3))
    samples[:, 3:] += rng.normal(0.0, 0.003, (count, 3))
    stamps = start_ns + np.round(t * 1e9).astype(np.int64)
    return stamps, samples
