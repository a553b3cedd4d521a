"""Build diagnostic_msgs/DiagnosticArray messages from plain dicts."""
from __future__ import annotations

from typing import Mapping

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

LEVELS = {'ok': DiagnosticStatus.OK, 'warn': DiagnosticStatus.WARN, 'error': DiagnosticStatus.ERROR}


def make_status(name: str, hardware_id: str, level: str, message: str,
                values: Mapping[str, object]) -> DiagnosticStatus:
    status = DiagnosticStatus(name=name, hardware_id=hardware_id, message=message)
    status.level = LEVELS[level]
    status.values = [KeyValue(key=str(k), value=_fmt(v)) for k, v in values.items()]
    return status


def make_array(stamp, statuses) -> DiagnosticArray:
    array = DiagnosticArray()
    array.header.stamp = stamp
    array.status = list(statuses)
    return array


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f'{value:.4g}'
    return str(value)
