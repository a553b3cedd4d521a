"""Perception context as short fact lines for small models, rendered from a PerceptionContext's JSON.

grounding_node publishes each result twice: `text`, one compact line (for people and bridges), and `json`, the
whole result. A 135M-parameter model misreads the compact line ("nearest front 8.7 m, left 5.5 m, ..." gave "the
nearest obstacle ahead is 5.5 m"), so llm_node can instead give its model one unambiguous line per fact, worded
as the questions are (`context.format: facts`):

    Text read by the camera: 'POKKA', 'LOGISTICS(S', 'TD'.
    Sound heard: vehicle horn, car horn, honking.
    Someone speaking: no.
    Nearest obstacle in front: 3.7 m.
    Nearest obstacle on the left: none.
    ...
    Objects around the robot: 36.
    Nearest object: 4.5 m away, to the left.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from .audio_events import AudioEventsResult
from .geometry import GeometryResult
from .ocr import OcrResult

logger = logging.getLogger(__name__)

CONTEXT_FORMATS = ('facts', 'text')
# Context kind (topic mm_llm/context/<kind>) -> the result type whose JSON it carries.
RESULT_TYPES: dict[str, Any] = {'ocr': OcrResult, 'audio_events': AudioEventsResult, 'geometry': GeometryResult}


def context_facts(kind: str, json_text: str) -> str | None:
    """The fact lines of one context message, or None when its JSON cannot be read as its kind's result."""
    result_type = RESULT_TYPES.get(kind)
    if result_type is None:
        return None
    try:
        return '\n'.join(result_type.from_dict(json.loads(json_text)).facts())
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        logger.debug('no facts for %s context: %s', kind, exc)
        return None


def prompt_text(kind: str, text: str, json_text: str, context_format: str, max_chars: int) -> str:
    """What llm_node stores for one PerceptionContext: its fact lines (`facts`, falling back to the text when the
    JSON is unusable) or its published text line (`text`), bounded to `max_chars`."""
    if context_format == 'facts':
        text = context_facts(kind, json_text) or text
    return text[:max_chars]
