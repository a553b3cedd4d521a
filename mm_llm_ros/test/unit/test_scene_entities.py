"""Scene entities from received perception contexts, their JSON mirror, and markers that expire with their data."""
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_llm_ros.core import specs
from mm_llm_ros.core.grounding import entities as entities_module
from mm_llm_ros.core.answering import AskEngine, AskLimits, AskRequest, Generated
from mm_llm_ros.core.embedding_store import ModalityStore
from mm_llm_ros.core.grounding import AudioEvent, AudioEventsResult, Cluster, GeometryResult, OcrResult, TextItem
from mm_llm_ros.core.grounding.entities import (MAX_CONTEXT_JSON_CHARS, MAX_ENTITIES_PER_CONTEXT, SCHEMA_VERSION,
                                                EntitySource, SceneEntities, SceneObject, SceneSound, SceneText,
                                                context_entities, scene_json, stored_entities)
from mm_llm_ros.core.grounding.markers import (ADD, CUBE, DELETE, LABEL_SUFFIX, MIN_SCALE_M, TEXT, SceneMarkers)

STAMP = 1_532_402_927_612_460_000
BOX = ((10.0, 10.0), (50.0, 10.0), (50.0, 30.0), (10.0, 30.0))


def geometry_json(*clusters):
    return json.dumps(GeometryResult(clusters=list(clusters), num_clusters=len(clusters), num_points=100).to_dict())


CAR = Cluster((6.5, 1.0, -0.7), (4.1, 1.8, 1.5), 6.58, 8.7, 300, box_center=(6.0, 1.1, -0.6))
POST = Cluster((-2.0, -3.0, 0.2), (0.2, 0.2, 0.0), 3.61, -123.7, 12, box_center=(-2.0, -3.0, 0.2))


def entities(kind, json_text, frame='lidar', stamp=STAMP, topic='/points'):
    return context_entities(kind, json_text, frame, stamp, topic)


# ---- entity builders -----------------------------------------------------------------------------------------
def test_every_context_kind_names_an_entity_builder():
    for kind in specs.CONTEXT_KIND_SPECS:
        assert kind.entities and callable(specs.resolve(kind.entities)), kind.name


def test_lidar_clusters_become_objects_in_the_lidar_frame_with_their_stamp_and_topic():
    car, post = entities('geometry', geometry_json(CAR, POST), frame='velodyne', stamp=STAMP, topic='/robot/points')
    assert isinstance(car, SceneObject)
    assert car.source == EntitySource('geometry', 'velodyne', STAMP, '/robot/points')
    assert (car.position, car.box_center, car.size) == (CAR.centroid, CAR.box_center, CAR.extent)
    assert (car.distance_m, car.bearing_deg, car.num_points) == (6.58, 8.7, 300)
    assert post.bearing_deg == -123.7 and post.placement.size == (0.2, 0.2, 0.0)


def test_a_cluster_published_without_a_box_centre_is_boxed_around_its_centroid():
    data = json.loads(geometry_json(CAR))
    del data['clusters'][0]['box_center']
    (car,) = entities('geometry', json.dumps(data))
    assert car.box_center == CAR.centroid


def test_ocr_lines_become_texts_with_their_image_box_and_camera_frame():
    ocr = OcrResult([TextItem('POKKA', 0.98, BOX, 'top-left'), TextItem('EXIT', 0.7, BOX, 'right')], (1600, 900))
    pokka, exit_ = entities('ocr', json.dumps(ocr.to_dict()), frame='cam_front', topic='/camera/image_raw')
    assert isinstance(pokka, SceneText) and pokka.source.frame_id == 'cam_front'
    assert (pokka.text, pokka.confidence, pokka.box, pokka.image_size, pokka.position) == \
        ('POKKA', 0.98, BOX, (1600, 900), 'top-left')
    assert exit_.text == 'EXIT' and pokka.placement is None   # pixels only: no 3D position


def test_sound_events_become_sounds_with_the_speech_verdict():
    audio = AudioEventsResult([AudioEvent('Speech', 0.8), AudioEvent('Dog', 0.3)], speech=True, duration_s=4.0)
    speech, dog = entities('audio_events', json.dumps(audio.to_dict()), frame='mic', topic='/audio')
    assert isinstance(dog, SceneSound) and (dog.label, dog.score, dog.speech) == ('Dog', 0.3, True)
    assert speech.source == EntitySource('audio_events', 'mic', STAMP, '/audio')
    quiet = AudioEventsResult([], speech=False, duration_s=4.0)
    assert [(s.label, s.speech) for s in entities('audio_events', json.dumps(quiet.to_dict()))] == [('', False)]
    no_vad = AudioEventsResult([], speech=None, duration_s=4.0)
    assert entities('audio_events', json.dumps(no_vad.to_dict())) == ()


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each test sees the first warning of every kind (they are throttled per kind)."""
    monkeypatch.setattr(entities_module, '_warned_at', {})
    monkeypatch.setattr(entities_module, '_suppressed', {})


@pytest.mark.parametrize('json_text', [
    'not json', '[]', '42', '{"clusters": [{"centroid": [1, 2]}]}',
    '{"clusters": [{"centroid": [NaN, 0, 0], "extent": [1, 1, 1], "distance_m": 1, "bearing_deg": 0, '
    '"num_points": 3}]}',
    '{"clusters": [{"centroid": [1, 0, 0], "extent": [-1, 1, 1], "distance_m": 1, "bearing_deg": 0, '
    '"num_points": 3}]}',
    '{"clusters": "many"}', '{"clusters": [null]}', '[' * 100_000,
    '{"clusters": [{"centroid": [1e300, 0, 0], "extent": [1, 1, 1], "distance_m": 1, "bearing_deg": 0, '
    '"num_points": 3}]}',   # would overflow float32 fields of the message
    '{"clusters": [{"centroid": ["1", 0, 0], "extent": [1, 1, 1], "distance_m": 1, "bearing_deg": 0, '
    '"num_points": 3}]}',
    '{"clusters": [{"centroid": [1, 0, 0], "extent": [1, 1, 1], "distance_m": 1, "bearing_deg": 0, '
    '"num_points": Infinity}]}',
    '{"clusters": [{"centroid": [1, 0, 0], "extent": [1, 1, 1], "distance_m": 1, "bearing_deg": 0, '
    '"num_points": -4}]}',
])
def test_malformed_context_json_gives_no_entities_and_no_exception(json_text, caplog, fresh_warnings):
    assert entities('geometry', json_text) == ()
    assert 'no entities from geometry context on /points' in caplog.text


def test_warnings_are_throttled_per_kind_and_a_context_without_json_is_no_fault(caplog, fresh_warnings):
    assert entities('geometry', '') == entities('ocr', '  ') == () and caplog.text == ''
    for _ in range(50):
        assert entities('geometry', 'not json') == ()
    assert entities('ocr', 'not json') == ()
    assert caplog.text.count('no entities from geometry') == 1 and caplog.text.count('no entities from ocr') == 1
    entities_module._warned_at['geometry'] -= entities_module.WARNING_INTERVAL_S
    entities('geometry', '[]')
    assert '(49 more since the last warning)' in caplog.text


def test_texts_that_no_ros_string_can_carry_are_repaired_and_bounded():
    data = {'items': [{'text': 'POK\ud800KA' + 'x' * 2000, 'confidence': 0.9, 'box': [list(c) for c in BOX],
                       'position': 'left'}], 'image_size': [64, 48]}
    (text,) = entities('ocr', json.dumps(data))
    assert text.text.startswith('POK?KA') and len(text.text) == entities_module.MAX_LABEL_CHARS
    text.text.encode('utf-8')
    bad_size = dict(data, image_size=[64])
    assert entities('ocr', json.dumps(bad_size)) == ()


def test_oversized_json_and_unknown_kinds_give_nothing_and_entity_counts_are_bounded():
    assert entities('geometry', ' ' * (MAX_CONTEXT_JSON_CHARS + 1)) == ()
    assert entities('sonar', geometry_json(CAR)) == ()
    many = entities('geometry', geometry_json(*[CAR] * (MAX_ENTITIES_PER_CONTEXT + 10)))
    assert len(many) == MAX_ENTITIES_PER_CONTEXT


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.sampled_from([k.name for k in specs.CONTEXT_KIND_SPECS]))
def test_any_text_under_any_kind_gives_a_tuple_never_an_exception(json_text, kind):
    assert isinstance(entities(kind, json_text), tuple)


# ---- the description's entities and its JSON mirror ----------------------------------------------------------
class Echo:
    sensors_inform_answers = True

    def answer(self, question, embeddings, max_new_tokens, on_text, should_stop, context=None):
        return Generated('a street', 2, 0.0, 0.0, 'eos')


def test_a_description_carries_the_entities_of_exactly_the_contexts_it_used():
    now = [100.0]
    contexts = ModalityStore(clock=lambda: now[0])
    engine = AskEngine(Echo(), ModalityStore(clock=lambda: now[0]), AskLimits(('geometry', 'ocr', 'audio_events')),
                       contexts=contexts)
    ocr = OcrResult([TextItem('POKKA', 0.98, BOX, 'left')], (640, 480))
    contexts.update('ocr', 'POKKA', STAMP - 10**9, source_topic='/camera/image_raw',
                    payload=entities('ocr', json.dumps(ocr.to_dict()), 'cam', STAMP - 10**9, '/camera/image_raw'))
    now[0] += 10.0   # the OCR result is stale now, the geometry below fresh
    contexts.update('geometry', 'car', STAMP, source_topic='/points', payload=entities('geometry', geometry_json(CAR)))
    engine.start()
    try:
        result = engine.submit(AskRequest('describe', max_age_s=5.0)).wait(10)
    finally:
        engine.stop()
    assert result.success and [i.modality for i in result.inputs] == ['geometry']
    scene = SceneEntities.from_inputs(result.inputs)
    assert [o.position for o in scene.objects] == [CAR.centroid] and scene.texts == () == scene.sounds
    assert [(entity.source.kind, received) for entity, received in stored_entities(result.inputs)] == \
        [('geometry', 110.0)]


def test_the_json_mirror_has_a_schema_version_and_every_entity_with_its_source():
    ocr = OcrResult([TextItem('POKKA', 0.98, BOX, 'left')], (640, 480))
    audio = AudioEventsResult([AudioEvent('Vehicle horn, car horn, honking', 0.5)], speech=False, duration_s=4.0)
    scene = SceneEntities.gather([*entities('audio_events', json.dumps(audio.to_dict()), 'mic', STAMP + 5, '/audio'),
                                  *entities('geometry', geometry_json(CAR, POST)),
                                  *entities('ocr', json.dumps(ocr.to_dict()), 'cam', STAMP + 7, '/camera/image_raw')])
    data = json.loads(json.dumps(scene_json('A car ahead.', STAMP + 9, ['geometry', 'ocr'], [STAMP, STAMP + 7],
                                            1.25, scene)))
    assert data['schema'] == SCHEMA_VERSION and data['description'] == 'A car ahead.'
    assert data['stamp'] == {'sec': STAMP // 10**9, 'nanosec': STAMP % 10**9 + 9}
    assert data['modalities'] == ['geometry', 'ocr'] and len(data['source_stamps']) == 2
    car = data['objects'][0]
    assert car == {'context': 'geometry', 'frame_id': 'lidar', 'stamp': {'sec': 1532402927, 'nanosec': 612460000},
                   'source_topic': '/points', 'position': [6.5, 1.0, -0.7], 'box_center': [6.0, 1.1, -0.6],
                   'size': [4.1, 1.8, 1.5], 'distance_m': 6.58, 'bearing_deg': 8.7, 'num_points': 300}
    assert data['texts'][0]['box'] == [list(corner) for corner in BOX] and data['texts'][0]['frame_id'] == 'cam'
    assert data['sounds'] == [{'context': 'audio_events', 'frame_id': 'mic',
                               'stamp': {'sec': 1532402927, 'nanosec': 612460005}, 'source_topic': '/audio',
                               'label': 'Vehicle horn, car horn, honking', 'score': 0.5, 'speech': False}]


# ---- markers ------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def adds(specs_):
    return {(s.ns, s.id): s for s in specs_ if s.action == ADD}


def deletes(specs_):
    return {(s.ns, s.id) for s in specs_ if s.action == DELETE}


def test_each_object_gets_a_box_and_a_label_in_its_frame_with_its_stamp_and_remaining_lifetime():
    clock = Clock()
    markers = SceneMarkers(5.0, clock)
    car, post = entities('geometry', geometry_json(CAR, POST), frame='velodyne')
    ocr = entities('ocr', json.dumps(OcrResult([TextItem('POKKA', 0.9, BOX, 'left')], (64, 48)).to_dict()))
    specs_ = markers.update([(car, 998.0), (post, 998.0), (ocr[0], 998.0)])
    shown = adds(specs_)
    assert set(shown) == {('objects', 0), ('objects', 1), ('objects' + LABEL_SUFFIX, 0), ('objects' + LABEL_SUFFIX, 1)}
    box, label = shown['objects', 0], shown['objects' + LABEL_SUFFIX, 0]
    assert box.shape == CUBE and box.frame_id == 'velodyne' and box.stamp_ns == STAMP
    assert box.position == CAR.box_center and box.scale == CAR.extent
    assert label.shape == TEXT and label.frame_id == 'velodyne' and 'object 6.6 m' in label.text
    assert label.position[2] > CAR.box_center[2] + CAR.extent[2] / 2
    assert math.isclose(box.lifetime_s, 3.0) and math.isclose(label.lifetime_s, 3.0)   # 5 s from arrival at 998
    assert shown['objects', 1].scale[2] == MIN_SCALE_M   # a flat cluster still gets a visible box
    assert not deletes(specs_)


def test_markers_of_objects_that_disappear_are_deleted_and_the_rest_kept():
    clock = Clock()
    markers = SceneMarkers(5.0, clock)
    car, post = entities('geometry', geometry_json(CAR, POST))
    markers.update([(car, 999.0), (post, 999.0)])
    clock.now += 1.0
    (car_only,) = entities('geometry', geometry_json(CAR))
    specs_ = markers.update([(car_only, 1000.5)])
    assert deletes(specs_) == {('objects', 1), ('objects' + LABEL_SUFFIX, 1)}
    assert set(adds(specs_)) == {('objects', 0), ('objects' + LABEL_SUFFIX, 0)}


def test_stale_markers_are_deleted_once_and_already_stale_data_is_never_shown():
    clock = Clock()
    markers = SceneMarkers(5.0, clock)
    (car,) = entities('geometry', geometry_json(CAR))
    markers.update([(car, 999.0)])
    clock.now = 1003.9
    assert markers.expire() == []            # still fresh: nothing to say
    clock.now = 1004.0
    gone = markers.expire()
    assert deletes(gone) == {('objects', 0), ('objects' + LABEL_SUFFIX, 0)} and not adds(gone)
    assert markers.expire() == [] and markers.live == []
    assert markers.update([(car, 990.0)]) == []   # stale on arrival: not placed, and nothing to delete


def test_expiry_re_sends_the_markers_still_fresh_so_each_array_is_the_whole_state():
    clock = Clock()
    markers = SceneMarkers(5.0, clock)
    (car,) = entities('geometry', geometry_json(CAR), frame='lidar_top')
    (post,) = entities('geometry', geometry_json(POST), frame='lidar_rear')
    markers.update([(car, 996.0), (post, 999.0)])
    clock.now = 1001.5
    specs_ = markers.expire()
    assert deletes(specs_) == {('objects', 0), ('objects' + LABEL_SUFFIX, 0)}
    kept = adds(specs_)
    assert {s.frame_id for s in kept.values()} == {'lidar_rear'}
    assert all(math.isclose(s.lifetime_s, 2.5) for s in kept.values())


def test_no_positive_max_age_places_nothing():
    (car,) = entities('geometry', geometry_json(CAR))
    for max_age in (0.0, -1.0, float('nan')):
        assert SceneMarkers(max_age, Clock()).update([(car, 1000.0)]) == []


# ---- ROS messages ----------------------------------------------------------------------------------------------
def test_entities_and_markers_become_ros_messages_field_for_field():
    pytest.importorskip('visualization_msgs.msg')
    pytest.importorskip('mm_llm_ros_interfaces.msg')
    from visualization_msgs.msg import Marker
    from mm_llm_ros.ros.scene_messages import description_msg, marker_array
    from mm_llm_ros_interfaces.msg import SceneSound as SceneSoundMsg
    ocr = OcrResult([TextItem('POKKA', 0.98, BOX, 'left')], (1600, 900))
    audio = AudioEventsResult([AudioEvent('Dog', 0.3)], speech=None, duration_s=4.0)
    scene = SceneEntities.gather([*entities('geometry', geometry_json(CAR), frame='velodyne'),
                                  *entities('ocr', json.dumps(ocr.to_dict()), 'cam', STAMP + 1, '/camera/image_raw'),
                                  *entities('audio_events', json.dumps(audio.to_dict()), 'mic', STAMP + 2, '/audio')])
    msg = description_msg('A car.', STAMP + 9, ['geometry'], [STAMP], 0.5, scene)
    assert (msg.description, msg.header.stamp.nanosec, msg.source_stamps[0].sec) == ('A car.', 612460009, 1532402927)
    (car,) = msg.objects
    assert (car.header.frame_id, car.header.stamp.sec, car.header.stamp.nanosec, car.source_topic) == \
        ('velodyne', 1532402927, 612460000, '/points')
    assert (car.box_center.x, car.size.z, car.num_points) == (6.0, 1.5, 300)
    assert list(msg.texts[0].box) == [10.0, 10.0, 50.0, 10.0, 50.0, 30.0, 10.0, 30.0]
    assert (msg.texts[0].image_width, msg.texts[0].header.frame_id) == (1600, 'cam')
    assert msg.sounds[0].speech == SceneSoundMsg.SPEECH_UNKNOWN and msg.sounds[0].label == 'Dog'

    clock = Clock()
    markers = SceneMarkers(5.0, clock)
    markers.update([(scene.objects[0], 999.5)])
    clock.now = 1010.0
    array = marker_array(markers.update([(entities('geometry', geometry_json(POST))[0], 1008.0)]) +
                         [s for s in markers.expire()])
    by_key = {(m.ns, m.id, m.action): m for m in array.markers}
    box = by_key['objects', 0, Marker.ADD]
    assert (box.type, box.header.frame_id, box.pose.orientation.w) == (Marker.CUBE, 'lidar', 1.0)
    assert (box.lifetime.sec, box.lifetime.nanosec) == (3, 0) and box.color.a > 0
    assert by_key['objects/labels', 0, Marker.ADD].type == Marker.TEXT_VIEW_FACING
