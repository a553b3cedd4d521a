"""Scene entities and marker specs (core/grounding/entities.py, markers.py) as ROS messages.

`description_msg` fills a SceneDescription with the description's text and its entities, `marker_array` turns
marker specs into a visualization_msgs/MarkerArray for RViz, Foxglove and Unity/ROS# clients.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from builtin_interfaces.msg import Duration
from geometry_msgs.msg import Point, Vector3
from std_msgs.msg import ColorRGBA
from visualization_msgs.msg import Marker, MarkerArray

from mm_llm_ros.core.grounding.entities import EntitySource, SceneEntities, SceneObject, SceneSound, SceneText
from mm_llm_ros.core.grounding.markers import ADD, CUBE, MarkerSpec
from mm_llm_ros.ros.conversions import ns_to_stamp
from mm_llm_ros_interfaces.msg import SceneDescription
from mm_llm_ros_interfaces.msg import SceneObject as SceneObjectMsg
from mm_llm_ros_interfaces.msg import SceneSound as SceneSoundMsg
from mm_llm_ros_interfaces.msg import SceneText as SceneTextMsg

_NS_PER_S = 1_000_000_000
_SPEECH = {None: SceneSoundMsg.SPEECH_UNKNOWN, False: SceneSoundMsg.SPEECH_NO, True: SceneSoundMsg.SPEECH_YES}


def description_msg(description: str, stamp_ns: int, modalities: Sequence[str], source_stamps_ns: Sequence[int],
                    latency_s: float, entities: SceneEntities) -> SceneDescription:
    msg = SceneDescription(description=description, modalities=list(modalities),
                           source_stamps=[ns_to_stamp(ns) for ns in source_stamps_ns], latency_s=float(latency_s),
                           objects=[object_msg(o) for o in entities.objects],
                           texts=[text_msg(t) for t in entities.texts],
                           sounds=[sound_msg(s) for s in entities.sounds])
    msg.header.stamp = ns_to_stamp(stamp_ns)
    return msg


def _with_source(msg, source: EntitySource):
    msg.header.frame_id = source.frame_id
    msg.header.stamp = ns_to_stamp(source.stamp_ns)
    msg.source_topic = source.source_topic
    return msg


def object_msg(entity: SceneObject) -> SceneObjectMsg:
    return _with_source(SceneObjectMsg(
        position=Point(x=entity.position[0], y=entity.position[1], z=entity.position[2]),
        box_center=Point(x=entity.box_center[0], y=entity.box_center[1], z=entity.box_center[2]),
        size=Vector3(x=entity.size[0], y=entity.size[1], z=entity.size[2]),
        distance_m=entity.distance_m, bearing_deg=entity.bearing_deg,
        num_points=min(max(entity.num_points, 0), 2**32 - 1)), entity.source)


def text_msg(entity: SceneText) -> SceneTextMsg:
    width, height = (min(max(v, 0), 2**32 - 1) for v in entity.image_size)
    return _with_source(SceneTextMsg(text=entity.text, confidence=entity.confidence,
                                     box=[float(v) for corner in entity.box for v in corner],
                                     image_width=width, image_height=height, position=entity.position),
                        entity.source)


def sound_msg(entity: SceneSound) -> SceneSoundMsg:
    return _with_source(SceneSoundMsg(label=entity.label, score=entity.score, speech=_SPEECH[entity.speech]),
                        entity.source)


def marker_array(specs: Iterable[MarkerSpec]) -> MarkerArray:
    return MarkerArray(markers=[marker_msg(spec) for spec in specs])


def marker_msg(spec: MarkerSpec) -> Marker:
    marker = Marker(ns=spec.ns, id=spec.id)
    if spec.action != ADD:
        marker.action = Marker.DELETE
        return marker
    marker.action = Marker.ADD
    marker.type = Marker.CUBE if spec.shape == CUBE else Marker.TEXT_VIEW_FACING
    marker.header.frame_id = spec.frame_id
    marker.header.stamp = ns_to_stamp(spec.stamp_ns)
    marker.pose.position = Point(x=spec.position[0], y=spec.position[1], z=spec.position[2])
    marker.pose.orientation.w = 1.0
    marker.scale = Vector3(x=spec.scale[0], y=spec.scale[1], z=spec.scale[2])
    marker.color = ColorRGBA(r=spec.color[0], g=spec.color[1], b=spec.color[2], a=spec.color[3])
    marker.text = spec.text
    sec, nanosec = divmod(max(int(spec.lifetime_s * _NS_PER_S), 1), _NS_PER_S)
    marker.lifetime = Duration(sec=sec, nanosec=nanosec)
    return marker
