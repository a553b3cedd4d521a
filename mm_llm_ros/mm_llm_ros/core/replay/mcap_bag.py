"""Read ROS 2 messages from an MCAP bag (rosbag2's default storage) as raw CDR, without decoding them.

The player republishes the recorded bytes as they are, so every message type works as long as its Python
package is installed, and the recorded header stamps are kept. Channels that are not ROS 2 CDR (``ros2msg``
schema + ``cdr`` encoding) and ROS infrastructure topics (``/rosout``, ``/parameter_events``) are skipped.
"""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any


INFRASTRUCTURE_TOPICS = frozenset({'/rosout', '/parameter_events'})
_RELIABILITY = {1: True, 2: False, 'reliable': True, 'best_effort': False}
_DURABILITY = {1: True, 2: False, 'transient_local': True, 'volatile': False}


class BagError(ValueError):
    """A bag that cannot be replayed; the message names the file."""


@dataclasses.dataclass(frozen=True)
class RecordedTopic:
    topic: str
    type_name: str  # e.g. 'sensor_msgs/msg/Image'
    message_count: int
    reliable: bool = True  # the QoS the recorder saw offered; reliable volatile when unknown
    transient_local: bool = False

    @property
    def python_type(self) -> tuple[str, str]:
        """(module, class) of the message type: 'std_msgs/msg/String' -> ('std_msgs.msg', 'String')."""
        parts = self.type_name.split('/')
        if len(parts) == 2:  # 'pkg/Type' (older schema names)
            parts = [parts[0], 'msg', parts[1]]
        if len(parts) != 3 or not all(parts):
            raise BagError(f'topic {self.topic}: cannot resolve message type {self.type_name!r}')
        return f'{parts[0]}.{parts[1]}', parts[2]


@dataclasses.dataclass(frozen=True)
class RecordedMessage:
    topic: str
    log_time_ns: int
    data: bytes  # CDR, as published


class McapBag:
    """The replayable topics of an MCAP file and a streaming iterator over their messages."""

    def __init__(self, path: str | pathlib.Path, exclude_topics: frozenset[str] = INFRASTRUCTURE_TOPICS) -> None:
        self.path = pathlib.Path(path)
        self.skipped: list[str] = []  # 'topic (reason)' for each channel left out
        topics: dict[str, RecordedTopic] = {}
        for channel, schema, count in self._channels():
            reason = _skip_reason(channel, schema, exclude_topics)
            if reason:
                self.skipped.append(f'{channel.topic} ({reason})')
            elif channel.topic not in topics:
                reliable, transient_local = parse_offered_qos(channel.metadata.get('offered_qos_profiles', ''))
                topics[channel.topic] = RecordedTopic(channel.topic, schema.name, count, reliable, transient_local)
        if not topics:
            raise BagError(f'{self.path}: no replayable ROS 2 topics (skipped: {", ".join(self.skipped) or "none"})')
        self.topics = tuple(topics.values())

    def messages(self) -> Iterator[tuple[int, RecordedMessage]]:
        """``(log_time_ns, message)`` of the replayable topics in log-time order, read lazily."""
        wanted = [topic.topic for topic in self.topics]
        with self._open() as reader:
            for _, channel, message in reader.iter_messages(topics=wanted, log_time_order=True):
                yield message.log_time, RecordedMessage(channel.topic, message.log_time, bytes(message.data))

    # ---- file access ---------------------------------------------------------------------------------------
    def _open(self) -> _Reader:
        try:
            return _Reader(self.path)
        except OSError as exc:
            raise BagError(f'{self.path}: cannot read: {exc.strerror or exc}') from None

    def _channels(self) -> list[tuple[Any, Any, int]]:
        """(channel, schema, message count) per channel, from the summary or, for an unindexed file, a scan."""
        from mcap.exceptions import McapError
        try:
            with self._open() as reader:
                summary = reader.get_summary()
                if summary is not None and summary.channels:
                    counts = summary.statistics.channel_message_counts if summary.statistics else {}
                    return [(channel, summary.schemas.get(channel.schema_id), counts.get(channel_id, 0))
                            for channel_id, channel in summary.channels.items()]
                found: dict[int, list] = {}
                for schema, channel, _ in reader.iter_messages(log_time_order=False):
                    found.setdefault(channel.id, [channel, schema, 0])[2] += 1
                return [tuple(entry) for entry in found.values()]
        except (McapError, ValueError, EOFError) as exc:  # the mcap package raises all three on bad input
            raise BagError(f'{self.path}: not a readable MCAP file: {exc}') from None


class _Reader:
    """An open MCAP reader that closes its file (a context manager)."""

    def __init__(self, path: pathlib.Path) -> None:
        from mcap.reader import make_reader
        self._stream = open(path, 'rb')
        try:
            self._reader = make_reader(self._stream)
        except Exception:
            self._stream.close()
            raise

    def __enter__(self):
        return self._reader

    def __exit__(self, *exc_info) -> None:
        self._stream.close()


def _skip_reason(channel, schema, exclude_topics: frozenset[str]) -> str:
    if channel.topic in exclude_topics:
        return 'ROS infrastructure topic'
    if schema is None or schema.encoding != 'ros2msg' or channel.message_encoding != 'cdr':
        encoding = f'{getattr(schema, "encoding", "no schema")}/{channel.message_encoding}'
        return f'{encoding} is not ros2msg/cdr'
    return ''


def parse_offered_qos(text: str) -> tuple[bool, bool]:
    """(reliable, transient_local) of the first profile in rosbag2's ``offered_qos_profiles`` YAML.

    rosbag2 writes the policies as enum integers (1 = reliable / transient local, 2 = best effort / volatile)
    or, in newer versions, as names; anything unknown means reliable and volatile.
    """
    import yaml
    try:
        profiles = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        profiles = None
    profile = profiles[0] if isinstance(profiles, list) and profiles and isinstance(profiles[0], Mapping) else {}
    return (_RELIABILITY.get(_policy(profile.get('reliability')), True),
            _DURABILITY.get(_policy(profile.get('durability')), False))


def _policy(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value
