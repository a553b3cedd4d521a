"""Structured scene descriptions over DDS: entities that match the context messages llm_node received, the JSON
mirror on scene_description/json, and markers on scene_description/markers that follow and expire with the data."""
import json

import pytest
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import String
from visualization_msgs.msg import Marker, MarkerArray

import sample_msgs
from mm_llm_ros.core.grounding import AudioEvent, AudioEventsResult, Cluster, GeometryResult, OcrResult, TextItem
from mm_llm_ros.ros.qos import LATCHED_QOS, SENSOR_QOS
from mm_llm_ros_interfaces.msg import PerceptionContext, SceneDescription, SceneSound

STAMP_NS = 1_532_402_927_612_460_000
MAX_AGE_S = 3.0
CAR = Cluster((6.5, 1.0, -0.7), (4.1, 1.8, 1.5), 6.58, 8.7, 300, box_center=(6.0, 1.1, -0.6))
POST = Cluster((-2.0, -3.0, 0.2), (0.2, 0.2, 1.0), 3.61, -123.7, 12, box_center=(-2.0, -3.0, 0.4))
BOX = ((10.0, 10.0), (50.0, 10.0), (50.0, 30.0), (10.0, 30.0))
# Every marker array the node publishes, not only the latest (the node's history keeps one for late joiners).
ALL_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


def ns(stamp) -> int:
    return stamp.sec * 10**9 + stamp.nanosec


def context(kind, result, frame_id, stamp_ns, source_topic):
    msg = PerceptionContext(kind=kind, text=result.to_text(), json=json.dumps(result.to_dict()),
                            source_topic=source_topic)
    msg.header.frame_id = frame_id
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
    return msg


def geometry(*clusters):
    return GeometryResult(clusters=list(clusters), num_clusters=len(clusters), num_points=1000)


@pytest.fixture
def scene_node(llm_node):
    """llm_node describing the scene twice a second, its data fresh for MAX_AGE_S."""
    return lambda **params: llm_node(**({'max_age_s': MAX_AGE_S, 'description.rate_hz': 2.0,
                                          'description.max_new_tokens': 4} | params))


@pytest.fixture
def publishers(test_node):
    """Publishers on the session's test node, destroyed after the test: a latched context left behind would reach
    every llm_node that later tests start."""
    created = []

    def create(msg_type, topic, qos):
        created.append(test_node.node.create_publisher(msg_type, topic, qos))
        test_node.wait_for_subscribers(created[-1])
        return created[-1]
    yield create
    for pub in created:
        test_node.node.destroy_publisher(pub)


@pytest.fixture
def context_publishers(publishers):
    return lambda: {kind: publishers(PerceptionContext, f'/mm_llm/context/{kind}', LATCHED_QOS)
                    for kind in ('geometry', 'ocr', 'audio_events')}


def markers_by_key(array: MarkerArray, action=Marker.ADD):
    return {(m.ns, m.id): m for m in array.markers if m.action == action}


def test_a_replayed_scene_gives_entities_json_and_markers_that_follow_and_expire_with_the_data(
        scene_node, context_publishers, test_node, collect):
    scene_node()
    descriptions = collect(SceneDescription, '/scene_description', LATCHED_QOS)
    mirrors = collect(String, '/scene_description/json', LATCHED_QOS)
    markers = collect(MarkerArray, '/scene_description/markers', ALL_QOS)
    pubs = context_publishers()
    sent = {
        'geometry': context('geometry', geometry(CAR, POST), 'lidar_top', STAMP_NS, '/points'),
        'ocr': context('ocr', OcrResult([TextItem('POKKA', 0.98, BOX, 'left')], (1600, 900)), 'cam_front',
                       STAMP_NS + 1_000, '/camera/image_raw'),
        'audio_events': context('audio_events', AudioEventsResult(
            [AudioEvent('Vehicle horn, car horn, honking', 0.42), AudioEvent('Speech', 0.2)], speech=True,
            duration_s=4.0), 'mic', STAMP_NS + 2_000, '/audio'),
    }
    for kind, msg in sent.items():
        pubs[kind].publish(msg)

    # The first description may come before every context arrived: wait for one based on all three.
    full = descriptions.wait_for(
        lambda msgs: next((m for m in msgs if m.objects and m.texts and m.sounds), None), 30, 'a full description')
    car, post = full.objects
    for entity, cluster in ((car, CAR), (post, POST)):
        assert (entity.header.frame_id, ns(entity.header.stamp), entity.source_topic) == \
            ('lidar_top', STAMP_NS, '/points')
        assert (entity.position.x, entity.position.y, entity.position.z) == pytest.approx(cluster.centroid)
        assert (entity.box_center.x, entity.box_center.y, entity.box_center.z) == pytest.approx(cluster.box_center)
        assert (entity.size.x, entity.size.y, entity.size.z) == pytest.approx(cluster.extent)
        assert (entity.distance_m, entity.bearing_deg) == pytest.approx((cluster.distance_m, cluster.bearing_deg))
        assert entity.num_points == cluster.num_points
    (text,) = full.texts
    assert (text.header.frame_id, ns(text.header.stamp), text.source_topic) == \
        ('cam_front', STAMP_NS + 1_000, '/camera/image_raw')
    assert (text.text, text.position, text.image_width, text.image_height) == ('POKKA', 'left', 1600, 900)
    assert list(text.box) == pytest.approx([v for corner in BOX for v in corner])
    assert [(s.label, s.speech, s.header.frame_id, ns(s.header.stamp)) for s in full.sounds] == [
        ('Vehicle horn, car horn, honking', SceneSound.SPEECH_YES, 'mic', STAMP_NS + 2_000),
        ('Speech', SceneSound.SPEECH_YES, 'mic', STAMP_NS + 2_000)]
    assert full.sounds[0].score == pytest.approx(0.42)
    assert set(full.modalities) == {'geometry', 'ocr', 'audio_events'}

    # The JSON mirror of the same description parses and says the same.
    data = mirrors.wait_for(lambda msgs: next((json.loads(m.data) for m in msgs
                                               if json.loads(m.data)['description'] == full.description
                                               and json.loads(m.data)['objects']), None), 20, 'its JSON mirror')
    assert data['schema'] == 1 and data['stamp'] == {'sec': full.header.stamp.sec,
                                                     'nanosec': full.header.stamp.nanosec}
    assert [o['position'] for o in data['objects']] == [list(CAR.centroid), list(POST.centroid)]
    assert {o['frame_id'] for o in data['objects']} == {'lidar_top'}
    assert data['texts'][0]['stamp'] == {'sec': STAMP_NS // 10**9, 'nanosec': STAMP_NS % 10**9 + 1_000}
    assert [s['speech'] for s in data['sounds']] == [True, True]

    # A box and a label per object, in the lidar frame, stamped with the scan, living while the data is fresh.
    shown = markers.wait_for(lambda arrays: next((markers_by_key(a) for a in arrays
                                                  if len(markers_by_key(a)) == 4), None), 20, 'four markers')
    assert set(shown) == {('objects', 0), ('objects', 1), ('objects/labels', 0), ('objects/labels', 1)}
    assert {(m.type, m.header.frame_id, ns(m.header.stamp)) for m in shown.values()} == \
        {(Marker.CUBE, 'lidar_top', STAMP_NS), (Marker.TEXT_VIEW_FACING, 'lidar_top', STAMP_NS)}
    box = shown['objects', 0]
    assert (box.pose.position.x, box.pose.position.y, box.pose.position.z) == pytest.approx(CAR.box_center)
    assert (box.scale.x, box.scale.y, box.scale.z) == pytest.approx(CAR.extent)
    assert 0 < box.lifetime.sec + box.lifetime.nanosec / 1e9 <= MAX_AGE_S
    assert shown['objects/labels', 0].text.startswith('object 6.6 m')

    # The post leaves the scan: its markers are deleted, the car's stay.
    seen = len(markers.messages)
    pubs['geometry'].publish(context('geometry', geometry(CAR), 'lidar_top', STAMP_NS + 10**8, '/points'))
    moved = markers.wait_for(lambda arrays: next((a for a in arrays[seen:] if markers_by_key(a, Marker.DELETE)),
                                                 None), 20, 'deletion of the vanished object')
    assert set(markers_by_key(moved, Marker.DELETE)) == {('objects', 1), ('objects/labels', 1)}
    kept = markers_by_key(moved)
    assert set(kept) == {('objects', 0), ('objects/labels', 0)}
    assert {ns(m.header.stamp) for m in kept.values()} == {STAMP_NS + 10**8}

    # No more scans: once the data is MAX_AGE_S old, the car's markers are deleted too and nothing is left.
    seen = len(markers.messages)
    stale = markers.wait_for(lambda arrays: next((a for a in arrays[seen:]
                                                  if ('objects', 0) in markers_by_key(a, Marker.DELETE)), None),
                             MAX_AGE_S + 20, 'deletion of the stale object')
    assert set(markers_by_key(stale, Marker.DELETE)) == {('objects', 0), ('objects/labels', 0)}
    assert markers_by_key(stale) == {}


def test_a_context_with_malformed_json_keeps_its_text_and_gives_no_entities(scene_node, context_publishers, collect):
    process = scene_node()
    descriptions = collect(SceneDescription, '/scene_description', LATCHED_QOS)
    pubs = context_publishers()
    bad = PerceptionContext(kind='geometry', text='nearest front 3.0 m', json='{"clusters": [{"centroid": [NaN]}]}',
                            source_topic='/points')
    bad.header.frame_id = 'lidar_top'
    pubs['geometry'].publish(bad)
    described = descriptions.wait_for(lambda msgs: next((m for m in msgs if 'geometry' in m.modalities), None), 30,
                                      'a description using the geometry context')
    assert described.objects == [] and process.alive()
    assert 'no entities from geometry context on /points' in process.log()


@pytest.mark.shared_data
def test_grounding_node_clusters_reach_the_description_as_objects_in_the_scan_frame(
        node_graph, scene_node, publishers, test_node, collect, shared_data):
    """End to end: a real lidar scan through grounding_node; the objects are the clusters of the context it sent."""
    node_graph.start('grounding_node', params={'use_ocr': False, 'use_audio_events': False, 'use_geometry': True,
                                               'geometry.max_rate_hz': 0.001}).wait_for_log('extracting ', 60)
    scene_node(max_age_s=30.0)
    contexts = collect(PerceptionContext, '/mm_llm/context/geometry', LATCHED_QOS)
    descriptions = collect(SceneDescription, '/scene_description', LATCHED_QOS)
    markers = collect(MarkerArray, '/scene_description/markers', ALL_QOS)
    pub = publishers(PointCloud2, '/points', SENSOR_QOS)
    cloud = sample_msgs.kitti_cloud_msg(shared_data, STAMP_NS)
    described = test_node.publish_until(
        pub, lambda: cloud, lambda: next((m for m in list(descriptions.messages) if m.objects), None), period_s=0.5,
        timeout_s=60, what='a description with objects')
    (sent,) = [m for m in contexts.messages if ns(m.header.stamp) == STAMP_NS]   # one analysis (max_rate_hz)
    clusters = json.loads(sent.json)['clusters']
    assert len(described.objects) == len(clusters) == 10
    for entity, cluster in zip(described.objects, clusters):
        assert (entity.header.frame_id, ns(entity.header.stamp), entity.source_topic) == \
            (sent.header.frame_id, STAMP_NS, sent.source_topic) == ('velo_link', STAMP_NS, '/points')
        assert [entity.position.x, entity.position.y, entity.position.z] == pytest.approx(cluster['centroid'])
        assert [entity.box_center.x, entity.box_center.y, entity.box_center.z] == pytest.approx(cluster['box_center'])
        assert [entity.size.x, entity.size.y, entity.size.z] == pytest.approx(cluster['extent'])
        assert entity.distance_m == pytest.approx(cluster['distance_m'])
    shown = markers.wait_for(lambda arrays: next((markers_by_key(a) for a in arrays if markers_by_key(a)), None),
                             20, 'markers')
    assert len(shown) == 20 and {m.header.frame_id for m in shown.values()} == {'velo_link'}
