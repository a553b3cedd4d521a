"""Markers for the entities of the latest scene description, that expire with their data (ROS-free specs).

Every entity with a 3D placement gets, in its source's frame and stamped with its data's stamp, a box (when it has
a size) in namespace `<collection>` and a camera-facing text label in `<collection>/labels` (today: lidar objects;
OCR text and sounds have no 3D position and stay in the structured message). Ids count up per namespace in the
description's order (objects nearest first).

Each marker's lifetime is what is left of its data's freshness (`max_age_s` from the data's arrival, on the context
store's clock), so a viewer drops it when the data goes stale even if llm_node stops. `SceneMarkers` also says so
explicitly: `update` (a new description) returns DELETEs for markers no longer present, and `expire` (every
description tick) DELETEs those whose data went stale. Every array it returns is the whole current state (live
markers re-sent with their remaining lifetime, plus the deletions), so the latched topic's one kept message is
enough for a late-joining viewer. `ros/scene_messages.py` turns the specs into a visualization_msgs/MarkerArray.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from .entities import Vec3

ADD = 'add'
DELETE = 'delete'
CUBE = 'cube'
TEXT = 'text'
LABEL_SUFFIX = '/labels'
MIN_SCALE_M = 0.05        # viewers refuse a zero-size box (a flat cluster has a zero extent)
LABEL_HEIGHT_M = 0.4      # height of a text label's capital letters
LABEL_GAP_M = 0.3         # label above the box's top
# Box colours (RGBA) per collection; a collection without an entry gets DEFAULT_COLOR.
BOX_COLORS: dict[str, tuple[float, float, float, float]] = {'objects': (1.0, 0.55, 0.1, 0.5)}
DEFAULT_COLOR = (0.2, 0.8, 1.0, 0.5)
LABEL_COLOR = (1.0, 1.0, 1.0, 1.0)
RGBA = tuple[float, float, float, float]


@dataclass(frozen=True)
class MarkerSpec:
    """One visualization_msgs/Marker, without ROS: `action` ADD or DELETE, `shape` CUBE or TEXT."""
    ns: str
    id: int
    action: str
    shape: str = CUBE
    frame_id: str = ''
    stamp_ns: int = 0
    position: Vec3 = (0.0, 0.0, 0.0)
    scale: Vec3 = (0.0, 0.0, 0.0)
    color: RGBA = (0.0, 0.0, 0.0, 0.0)
    text: str = ''
    lifetime_s: float = 0.0

    @property
    def key(self) -> tuple[str, int]:
        return self.ns, self.id


def entity_markers(entity: Any, index: int, lifetime_s: float) -> list[MarkerSpec]:
    """The markers of one entity with a placement (a box if it has a size, and a label); [] without one."""
    placement = entity.placement
    if placement is None:
        return []
    source = entity.source
    common = {'id': index, 'action': ADD, 'frame_id': source.frame_id, 'stamp_ns': source.stamp_ns,
              'lifetime_s': lifetime_s}
    markers = []
    top = placement.center[2]
    if placement.size is not None:
        scale = tuple(max(v, MIN_SCALE_M) for v in placement.size)
        markers.append(MarkerSpec(ns=entity.collection, shape=CUBE, position=placement.center, scale=scale,
                                  color=BOX_COLORS.get(entity.collection, DEFAULT_COLOR), **common))
        top += scale[2] / 2
    x, y, _ = placement.center
    markers.append(MarkerSpec(ns=entity.collection + LABEL_SUFFIX, shape=TEXT, position=(x, y, top + LABEL_GAP_M),
                              scale=(0.0, 0.0, LABEL_HEIGHT_M), color=LABEL_COLOR, text=entity.label, **common))
    return markers


class SceneMarkers:
    """The markers shown for the latest description, and when each one's data goes stale.

    `clock` must be the clock the arrival times come from (the context store's, monotonic seconds). With a
    `max_age_s` of 0 or less (or NaN) all data is stale, as it is for answers: nothing is placed.
    """

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_age_s = max_age_s if max_age_s > 0 else 0.0
        self._clock = clock
        self._live: dict[tuple[str, int], tuple[MarkerSpec, float]] = {}   # key -> (ADD spec, expires at)

    @property
    def live(self) -> list[MarkerSpec]:
        return [spec for spec, _ in self._live.values()]

    def update(self, placed: Iterable[tuple[Any, float]]) -> list[MarkerSpec]:
        """A new description's markers: (entity, its data's arrival time) pairs -> the whole new state.

        Entities whose data is already stale are left out; markers of the previous description that are not in
        the new one are deleted.
        """
        now = self._clock()
        counts: dict[str, int] = {}
        live: dict[tuple[str, int], tuple[MarkerSpec, float]] = {}
        for entity, received in placed:
            if entity.placement is None:
                continue
            expires = received + self.max_age_s
            if expires <= now:
                continue
            index = counts.get(entity.collection, 0)
            counts[entity.collection] = index + 1
            for spec in entity_markers(entity, index, expires - now):
                live[spec.key] = (spec, expires)
        deleted = [key for key in self._live if key not in live]
        self._live = live
        return self._state(now, deleted)

    def expire(self) -> list[MarkerSpec]:
        """DELETEs for markers whose data went stale, with the rest re-sent; [] when none went stale."""
        now = self._clock()
        stale = [key for key, (_, expires) in self._live.items() if expires <= now]
        if not stale:
            return []
        for key in stale:
            del self._live[key]
        return self._state(now, stale)

    def _state(self, now: float, deleted: Iterable[tuple[str, int]]) -> list[MarkerSpec]:
        adds = [replace(spec, lifetime_s=expires - now) for spec, expires in self._live.values()]
        return [MarkerSpec(ns, index, DELETE) for ns, index in deleted] + adds
