"""Merge extractor results into one short, bounded block of text for the LLM prompt.

Default output on the sample data (nuScenes front camera, a dog clip, a KITTI scan), one line per section in
`sections` order::

    [ocr] 'POKKA' (0.98, left); 'LOGISTICS(S' (0.94, left); 'TD' (0.97, left)
    [audio] dog 0.74; domestic animals, pets 0.74; animal 0.73 | speech: no | level -21 dBFS
    [geometry] nearest front 3.7 m, left -, right -, back -; 36 objects: 4.5 m 26° left (2.4x1.4x1.2 m); 6.5 m 31°
    right (3.1x1.2x1.3 m); 7.3 m 35° right (0.2x0.4x0.2 m); 7.8 m ahead (3.6x2.4x1.2 m); ... (+5 more)

The geometry line is a single line, wrapped here. Each section is shortened at item boundaries ('(+N more)');
whatever still overflows `max_chars` (or `max_tokens`) is cut and ends with the truncation marker. Result lines
have their own '…' for cuts inside an item; `truncation_marker` applies to the whole block.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .base import TRUNCATION_MARKER, GroundingConfigError, GroundingResult, check_config, truncate

_MIN_SECTION_CHARS = 12   # below this a section would say nothing useful


@dataclass
class ContextConfig:
    """Settings of `ContextBuilder`."""

    max_chars: int = 600                 # hard bound of the whole block
    section_max_chars: int = 240         # bound of one section line, template included
    line_template: str = '[{section}] {text}'
    header: str = ''                     # optional first line, e.g. 'Sensor readings:'
    sections: tuple[str, ...] = ('ocr', 'audio', 'geometry')   # order of the lines; other sections go last
    truncation_marker: str = TRUNCATION_MARKER
    max_tokens: int = 0                  # 0: no token bound; else needs a token counter

    def __post_init__(self):
        check_config(self.max_chars >= _MIN_SECTION_CHARS, f'max_chars must be >= {_MIN_SECTION_CHARS}, '
                     f'got {self.max_chars}')
        check_config(self.section_max_chars >= _MIN_SECTION_CHARS, f'section_max_chars must be >= '
                     f'{_MIN_SECTION_CHARS}, got {self.section_max_chars}')
        check_config(self.max_tokens >= 0, f'max_tokens must be >= 0, got {self.max_tokens}')
        try:
            rendered = self.line_template.format(section='s', text='\0')
        except (KeyError, IndexError, ValueError) as error:
            raise GroundingConfigError(f"line_template may only use '{{section}}' and '{{text}}', "
                                       f'got {self.line_template!r}') from error
        check_config('\0' in rendered, f"line_template must contain '{{text}}', got {self.line_template!r}")


class ContextBuilder:
    """Renders extractor results (`OcrResult`, `AudioEventsResult`, `GeometryResult`, ...) as prompt text.

    `count_tokens` (e.g. `lambda s: len(tokenizer.encode(s))`) enables the `max_tokens` bound.
    """

    def __init__(self, config: ContextConfig | None = None,
                 count_tokens: Callable[[str], int] | None = None):
        self.config = config or ContextConfig()
        check_config(not self.config.max_tokens or count_tokens is not None,
                     'max_tokens is set but no count_tokens function was given')
        self._count_tokens = count_tokens

    def __call__(self, results: Iterable[GroundingResult | None]) -> str:
        """The context block; None results (sensor not configured or no data yet) are left out."""
        config = self.config
        order = {name: index for index, name in enumerate(config.sections)}
        present = sorted((r for r in results if r is not None), key=lambda r: order.get(r.section, len(order)))
        lines = [config.header] if config.header else []
        used = len(config.header)
        for position, result in enumerate(present):
            # Keep room for a '\n…' line that says later sections were dropped.
            reserve = 0 if position == len(present) - 1 else 1 + len(config.truncation_marker)
            budget = min(config.section_max_chars, config.max_chars - used - (1 if lines else 0) - reserve)
            overhead = len(config.line_template.format(section=result.section, text=''))
            if budget - overhead < _MIN_SECTION_CHARS:
                lines.append(config.truncation_marker)   # no room left: say that sections were dropped
                break
            lines.append(config.line_template.format(section=result.section,
                                                     text=result.to_text(budget - overhead)))
            used += len(lines[-1]) + (1 if len(lines) > 1 else 0)
        text = truncate('\n'.join(lines), config.max_chars, config.truncation_marker)
        return self._fit_tokens(text)

    def _fit_tokens(self, text: str) -> str:
        """Longest prefix (cut with the marker) within max_tokens, by bisection on its length in characters."""
        if not self.config.max_tokens or self._count_tokens(text) <= self.config.max_tokens:
            return text
        low, high = 0, len(text)   # invariant: a cut at `low` characters fits
        while low < high:
            middle = (low + high + 1) // 2
            if self._count_tokens(truncate(text, middle, self.config.truncation_marker)) <= self.config.max_tokens:
                low = middle
            else:
                high = middle - 1
        return truncate(text, low, self.config.truncation_marker)


def results_to_dict(results: Iterable[GroundingResult | None]) -> dict[str, dict]:
    """{section: result.to_dict()} of the given results, for one JSON message (a later one wins a section)."""
    return {result.section: result.to_dict() for result in results if result is not None}
