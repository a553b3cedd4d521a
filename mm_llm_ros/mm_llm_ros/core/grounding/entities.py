"""Scene entities: what a scene description is based on, placed so that a headset can draw it.

grounding_node publishes each result as a PerceptionContext: a header (the sensor message's stamp and frame), the
input topic and the result's JSON. llm_node turns every context it receives into entities once, on arrival
(`context_entities`, with the builder its `ContextKindSpec.entities` names), and keeps them next to the context's
prompt text. A scene description then carries the entities of exactly the contexts its answer used:

    objects   lidar clusters: centroid, box centre and size in the lidar frame (metres, x forward, y left, z up),
              horizontal distance and bearing (degrees, positive to the left)
    texts     OCR lines: string, confidence, the box's four corners in pixels of the camera image, its size
    sounds    sound events: AudioSet label, mean score, and whether someone speaks in the analysed audio

each with its source (context kind, frame_id, stamp, input topic). `scene_json` gives the JSON mirror published on
`scene_description/json` (schema in docs/design.md, "Structured scene descriptions"); `core/grounding/markers.py`
turns placed entities into marker specs. Nothing here imports rclpy.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from mm_llm_ros.core.specs import CONTEXT_KINDS, resolve

from .audio_events import AudioEventsResult
from .geometry import GeometryResult, describe_bearing
from .ocr import OcrResult

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1                 # the `schema` key of the JSON mirror; bumped on incompatible changes
MAX_CONTEXT_JSON_CHARS = 262_144   # a context's JSON longer than this gives no entities (grounding's are ~2 KB)
MAX_ENTITIES_PER_CONTEXT = 64      # grounding reports at most max_clusters/max_items/top_k (10, 8, 3 by default)
MAX_ABS_VALUE = 1e9                # larger numbers are no position, size or score (and overflow float32 fields)
MAX_LABEL_CHARS = 500              # an entity's text or label
WARNING_INTERVAL_S = 10.0         # unusable context JSON is reported at most this often per kind
_NS_PER_S = 1_000_000_000

Vec3 = tuple[float, float, float]


class EntityError(ValueError):
    """A context's JSON that cannot be read as entities of its kind."""


def stamp_dict(stamp_ns: int) -> dict[str, int]:
    """A stamp as builtin_interfaces/Time's fields (what rosbridge uses; integer nanoseconds overflow JSON numbers
    in JavaScript)."""
    sec, nanosec = divmod(int(stamp_ns), _NS_PER_S)
    return {'sec': sec, 'nanosec': nanosec}


@dataclass(frozen=True)
class EntitySource:
    """Where an entity comes from: the context kind, and the sensor message's frame, stamp and topic."""
    kind: str
    frame_id: str
    stamp_ns: int
    source_topic: str

    def to_dict(self) -> dict[str, Any]:
        return {'context': self.kind, 'frame_id': self.frame_id, 'stamp': stamp_dict(self.stamp_ns),
                'source_topic': self.source_topic}


@dataclass(frozen=True)
class Placement:
    """Where an entity is in its source's frame: a position and, for a box, its size (metres)."""
    center: Vec3
    size: Optional[Vec3] = None


@dataclass(frozen=True)
class SceneObject:
    """An object the lidar sees: one cluster of obstacle points, in the lidar frame."""
    collection: ClassVar[str] = 'objects'
    source: EntitySource
    position: Vec3          # centroid of its points
    box_center: Vec3        # centre of its axis-aligned box
    size: Vec3              # the box's size along x, y, z
    distance_m: float       # horizontal range of the centroid
    bearing_deg: float      # of the centroid, positive to the left
    num_points: int

    @property
    def placement(self) -> Placement:
        return Placement(self.box_center, self.size)

    @property
    def label(self) -> str:
        return f'object {self.distance_m:.1f} m {describe_bearing(self.bearing_deg)}'

    def to_dict(self) -> dict[str, Any]:
        return {**self.source.to_dict(), 'position': list(self.position), 'box_center': list(self.box_center),
                'size': list(self.size), 'distance_m': self.distance_m, 'bearing_deg': self.bearing_deg,
                'num_points': self.num_points}


@dataclass(frozen=True)
class SceneText:
    """A line of text read in a camera image; placed in pixels only (no 3D position)."""
    collection: ClassVar[str] = 'texts'
    source: EntitySource
    text: str
    confidence: float
    box: tuple[tuple[float, float], ...]   # 4 corners (x, y) in pixels, clockwise from top-left
    image_size: tuple[int, int]            # (width, height) of the image the box is in
    position: str                          # coarse place in a 3x3 grid: 'top-left', 'center', ...

    placement: ClassVar[None] = None

    @property
    def label(self) -> str:
        return self.text

    def to_dict(self) -> dict[str, Any]:
        return {**self.source.to_dict(), 'text': self.text, 'confidence': self.confidence,
                'box': [list(corner) for corner in self.box], 'image_size': list(self.image_size),
                'position': self.position}


@dataclass(frozen=True)
class SceneSound:
    """A sound event in the recent audio. `speech` is the verdict of the analysis it came from (None: no voice
    detection ran); an analysis that named no sound but ran the detector gives one entry with an empty label."""
    collection: ClassVar[str] = 'sounds'
    source: EntitySource
    label: str
    score: float
    speech: Optional[bool]

    placement: ClassVar[None] = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.source.to_dict(), 'label': self.label, 'score': self.score, 'speech': self.speech}


Entity = Union[SceneObject, SceneText, SceneSound]
ENTITY_TYPES = (SceneObject, SceneText, SceneSound)
COLLECTIONS = tuple(entity_type.collection for entity_type in ENTITY_TYPES)


@dataclass(frozen=True)
class SceneEntities:
    """The entities of one description, grouped by collection, each in the order its context gave them."""
    objects: tuple[SceneObject, ...] = ()
    texts: tuple[SceneText, ...] = ()
    sounds: tuple[SceneSound, ...] = ()

    @classmethod
    def gather(cls, entities: Iterable[Entity]) -> SceneEntities:
        groups: dict[str, list[Entity]] = {name: [] for name in COLLECTIONS}
        for entity in entities:
            groups[entity.collection].append(entity)
        return cls(**{name: tuple(items) for name, items in groups.items()})

    @classmethod
    def from_inputs(cls, inputs: Iterable[Any]) -> SceneEntities:
        """The entities stored with the given store entries (`StoredInput.payload` of the contexts)."""
        return cls.gather(entity for entity, _ in stored_entities(inputs))

    def __iter__(self):
        for name in COLLECTIONS:
            yield from getattr(self, name)

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {name: [entity.to_dict() for entity in getattr(self, name)] for name in COLLECTIONS}


def stored_entities(inputs: Iterable[Any]) -> Iterator[tuple[Entity, float]]:
    """(entity, arrival time of its data) for the entities stored with store entries (`StoredInput`s)."""
    for entry in inputs:
        if isinstance(entry.payload, tuple):
            for entity in entry.payload:
                yield entity, entry.received_monotonic


def scene_json(description: str, stamp_ns: int, modalities: Sequence[str], source_stamps_ns: Sequence[int],
               latency_s: float, entities: SceneEntities) -> dict[str, Any]:
    """The JSON mirror of a SceneDescription (schema version `SCHEMA_VERSION`; see docs/design.md)."""
    return {'schema': SCHEMA_VERSION, 'stamp': stamp_dict(stamp_ns), 'description': description,
            'modalities': list(modalities), 'source_stamps': [stamp_dict(ns) for ns in source_stamps_ns],
            'latency_s': round(float(latency_s), 3), **entities.to_dict()}


# ---- one context message -> its entities ---------------------------------------------------------------------
def context_entities(kind: str, json_text: str, frame_id: str, stamp_ns: int,
                     source_topic: str) -> tuple[Entity, ...]:
    """The entities in one received context (its kind's `ContextKindSpec.entities` builder on its JSON).

    A kind without a builder, or a context without JSON (a text-only publisher), gives none; JSON that is too
    long, malformed or holds non-finite or misshapen values gives none and a warning, at most one per kind every
    `WARNING_INTERVAL_S` (never an exception: the context's text is still used).
    """
    spec = CONTEXT_KINDS.get(kind)
    if spec is None or not spec.entities or not json_text.strip():
        return ()
    if len(json_text) > MAX_CONTEXT_JSON_CHARS:
        _warn(kind, source_topic, f'JSON of {len(json_text)} characters (limit {MAX_CONTEXT_JSON_CHARS})')
        return ()
    source = EntitySource(kind, frame_id, int(stamp_ns), source_topic)
    try:
        data = json.loads(json_text)
        if not isinstance(data, dict):
            raise EntityError(f'expected a JSON object, got {type(data).__name__}')
        entities = resolve(spec.entities)(data, source)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError, RecursionError) as exc:
        _warn(kind, source_topic, f'{type(exc).__name__}: {exc}'[:200])
        return ()
    return tuple(entities[:MAX_ENTITIES_PER_CONTEXT])


_warned_at: dict[str, float] = {}
_suppressed: dict[str, int] = {}
_warn_lock = threading.Lock()


def _warn(kind: str, source_topic: str, reason: str) -> None:
    """Log why a context gave no entities, throttled per kind (a hostile publisher must not flood the log)."""
    now = time.monotonic()
    with _warn_lock:
        if now - _warned_at.get(kind, -math.inf) < WARNING_INTERVAL_S:
            _suppressed[kind] = _suppressed.get(kind, 0) + 1
            return
        _warned_at[kind] = now
        suppressed = _suppressed.pop(kind, 0)
    more = f' ({suppressed} more since the last warning)' if suppressed else ''
    logger.warning('no entities from %s context on %s: %s%s', kind, source_topic or '?', reason, more)


def objects_from_geometry(data: Mapping[str, Any], source: EntitySource) -> list[SceneObject]:
    result = GeometryResult.from_dict(data)
    return [SceneObject(source, _vec3(c.centroid, 'centroid'), _vec3(c.box_center or c.centroid, 'box_center'),
                        _vec3(c.extent, 'extent', non_negative=True), _finite(c.distance_m, 'distance_m'),
                        _finite(c.bearing_deg, 'bearing_deg'), _count(c.num_points, 'num_points'))
            for c in result.clusters[:MAX_ENTITIES_PER_CONTEXT]]


def texts_from_ocr(data: Mapping[str, Any], source: EntitySource) -> list[SceneText]:
    result = OcrResult.from_dict(data)
    if len(result.image_size) != 2:
        raise EntityError(f'image_size needs (width, height), got {result.image_size!r}')
    width, height = (_count(v, 'image_size') for v in result.image_size)
    texts = []
    for item in result.items[:MAX_ENTITIES_PER_CONTEXT]:
        if len(item.box) != 4 or any(len(corner) != 2 for corner in item.box):
            raise EntityError(f'a text box needs 4 (x, y) corners, got {item.box!r}')
        box = tuple((_finite(x, 'box'), _finite(y, 'box')) for x, y in item.box)
        texts.append(SceneText(source, _text(item.text), _finite(item.confidence, 'confidence'), box,
                               (width, height), _text(item.position)))
    return texts


def sounds_from_audio_events(data: Mapping[str, Any], source: EntitySource) -> list[SceneSound]:
    result = AudioEventsResult.from_dict(data)
    speech = None if result.speech is None else bool(result.speech)
    sounds = [SceneSound(source, _text(event.label), _finite(event.score, 'score'), speech)
              for event in result.events[:MAX_ENTITIES_PER_CONTEXT]]
    if not sounds and speech is not None:
        sounds.append(SceneSound(source, '', 0.0, speech))
    return sounds


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EntityError(f'{what} must be a number, got {value!r}'[:200])
    number = float(value)
    if not math.isfinite(number) or abs(number) > MAX_ABS_VALUE:
        raise EntityError(f'{what} is not finite or out of range: {value!r}')
    return number


def _count(value: Any, what: str) -> int:
    number = _finite(value, what)
    if number < 0 or number != int(number):
        raise EntityError(f'{what} must be a whole number >= 0, got {value!r}')
    return int(number)


def _text(value: Any) -> str:
    """A string that encodes as UTF-8 (JSON may hold lone surrogates, which no ROS string can carry), bounded."""
    return str(value).encode('utf-8', 'replace').decode('utf-8')[:MAX_LABEL_CHARS]


def _vec3(values: Sequence[Any], what: str, non_negative: bool = False) -> Vec3:
    if len(values) != 3:
        raise EntityError(f'{what} needs 3 values, got {len(values)}')
    vector = tuple(_finite(v, what) for v in values)
    if non_negative and min(vector) < 0:
        raise EntityError(f'{what} must not be negative: {vector}')
    return vector  # type: ignore[return-value]


__all__ = ['COLLECTIONS', 'ENTITY_TYPES', 'Entity', 'EntityError', 'EntitySource', 'MAX_CONTEXT_JSON_CHARS',
           'MAX_ENTITIES_PER_CONTEXT', 'Placement', 'SCHEMA_VERSION', 'SceneEntities', 'SceneObject', 'SceneSound',
           'SceneText', 'context_entities', 'objects_from_geometry', 'scene_json', 'sounds_from_audio_events',
           'stamp_dict', 'stored_entities', 'texts_from_ocr']
