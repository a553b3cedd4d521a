"""Scene text for the prompt: RapidOCR (PP-OCRv4 ONNX models shipped in `rapidocr-onnxruntime`) on an RGB frame."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from mm_llm_ros.core.errors import DependencyError

from .base import Lazy, check_config, join_within, setting

logger = logging.getLogger(__name__)

OCR_PIN = 'rapidocr-onnxruntime==1.4.4'
_ROWS = ('top', 'middle', 'bottom')  # the middle row is left out of names: 'left', 'center', 'right'
_COLUMNS = ('left', 'center', 'right')
_MIN_SIDE_PX = 8  # smaller frames cannot hold readable text; the detector also misbehaves on them


@dataclass
class OcrConfig:
    """Settings of `OcrExtractor`."""

    min_confidence: float = setting(0.6, 'Text lines with a lower recogniser score are left out.')
    min_chars: int = setting(2, 'Shorter text lines are left out (single glyphs are mostly texture).')
    max_items: int = setting(8, 'Most confident text lines reported per frame (then shown in reading order).')
    max_side_px: int = setting(2000, 'Frames with a longer side are shrunk to it before text detection '
                               '(RapidOCR max_side_len).')
    num_threads: int = setting(2, 'onnxruntime threads of the OCR models (0: as many as cores).')

    def __post_init__(self):
        check_config(0.0 <= self.min_confidence <= 1.0, f'min_confidence must be in [0, 1], got {self.min_confidence}')
        check_config(self.min_chars >= 1, f'min_chars must be >= 1, got {self.min_chars}')
        check_config(self.max_items >= 1, f'max_items must be >= 1, got {self.max_items}')
        check_config(self.max_side_px >= 32, f'max_side_px must be >= 32, got {self.max_side_px}')
        check_config(self.num_threads >= 0, f'num_threads must be >= 0, got {self.num_threads}')


@dataclass(frozen=True)
class TextItem:
    """One line of text read in the image."""

    text: str
    confidence: float
    box: tuple[tuple[float, float], ...]   # 4 corners (x, y) in pixels, clockwise from top-left
    position: str                          # coarse place in a 3x3 grid: 'top-left', 'center', 'bottom-right'...

    @property
    def centre(self) -> tuple[float, float]:
        xs, ys = zip(*self.box, strict=True)
        return sum(xs) / len(xs), sum(ys) / len(ys)

    @property
    def height(self) -> float:
        ys = [y for _, y in self.box]
        return max(ys) - min(ys)

    def to_text(self) -> str:
        return f"'{self.text}' ({self.confidence:.2f}, {self.position})"


@dataclass
class OcrResult:
    """Text lines in reading order (top to bottom, then left to right)."""

    section: ClassVar[str] = 'ocr'
    items: list[TextItem] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)   # (width, height) in pixels; (0, 0) when the input was unusable

    @property
    def is_empty(self) -> bool:
        return not self.items

    @property
    def texts(self) -> list[str]:
        return [item.text for item in self.items]

    def to_dict(self) -> dict[str, Any]:
        return {'items': [asdict(item) for item in self.items], 'image_size': list(self.image_size)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OcrResult:
        """The inverse of `to_dict` (e.g. of a received PerceptionContext's JSON)."""
        items = [TextItem(str(i['text']), float(i['confidence']), tuple(tuple(map(float, corner)) for corner in i['box']),
                          str(i['position'])) for i in data.get('items', ())]
        return cls(items, tuple(data.get('image_size', (0, 0))))

    def facts(self) -> list[str]:
        """Short prompt lines for small models: every string read, in single quotes as in `to_text` (with double
        quotes SmolLM2 answered "What text can you read?" with an invented sentence), and nothing else."""
        if self.is_empty:
            return ['Text read by the camera: none.']
        return ['Text read by the camera: ' + ', '.join(f"'{item.text}'" for item in self.items) + '.']

    def to_text(self, max_chars: int = 200) -> str:
        if self.is_empty:
            return 'no text'
        return join_within((item.to_text() for item in self.items), max_chars)


def grid_position(x: float, y: float, width: int, height: int) -> str:
    """Name the cell of a 3x3 grid holding pixel (x, y): 'top-left' ... 'center' ... 'bottom-right'."""
    column = _COLUMNS[min(max(int(3 * x / width), 0), 2)]
    row_index = min(max(int(3 * y / height), 0), 2)
    return column if row_index == 1 else f'{_ROWS[row_index]}-{column}'


def reading_order(items: list[TextItem]) -> list[TextItem]:
    """Top to bottom, and left to right within a text line (items whose centres are within half a line height)."""
    lines: list[list[TextItem]] = []
    for item in sorted(items, key=lambda i: i.centre[1]):
        if lines and abs(item.centre[1] - lines[-1][0].centre[1]) < 0.5 * max(item.height, 1.0):
            lines[-1].append(item)
        else:
            lines.append([item])
    return [item for line in lines for item in sorted(line, key=lambda i: i.centre[0])]


class OcrExtractor:
    """Reads scene text (signs, plates, labels) in an RGB uint8 image.

    The models load on first call (or on `load()`); unusable input gives an empty result and a warning.
    """

    def __init__(self, config: OcrConfig | None = None, engine: Callable[[np.ndarray], tuple] | None = None):
        """`engine`: an already built RapidOCR-compatible callable (BGR image -> (lines, timings)) to share."""
        self.config = config or OcrConfig()
        self._engine = Lazy(lambda: engine) if engine is not None else Lazy(self._create_engine)

    @property
    def loaded(self) -> bool:
        """Whether the OCR models are loaded (for diagnostics)."""
        return self._engine.loaded

    def load(self) -> None:
        """Load the models now, so a missing package fails at start-up rather than on the first frame."""
        self._engine.get()

    def _create_engine(self):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as error:
            raise DependencyError(f'OCR needs {OCR_PIN} (its models are inside the wheel): {error}') from error
        options: dict[str, Any] = {'text_score': self.config.min_confidence, 'max_side_len': self.config.max_side_px}
        if self.config.num_threads:
            options['intra_op_num_threads'] = self.config.num_threads
        logger.info('loading RapidOCR (PP-OCRv4 det/cls/rec ONNX)')
        return RapidOCR(**options)

    def __call__(self, image: np.ndarray) -> OcrResult:
        """Text lines in `image`, an (H, W, 3) RGB or (H, W) grey uint8 array."""
        bgr = self._to_bgr(image)
        if bgr is None:
            return OcrResult()
        height, width = bgr.shape[:2]
        lines, _ = self._engine.get()(bgr)
        items = [self._to_item(line, width, height) for line in lines or ()]
        items = [item for item in items if item is not None]
        most_confident = sorted(items, key=lambda item: -item.confidence)[:self.config.max_items]
        return OcrResult(reading_order(most_confident), (width, height))

    @staticmethod
    def _to_bgr(image: Any) -> np.ndarray | None:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            logger.warning('OCR skipped: expected a uint8 numpy image, got %s',
                           getattr(image, 'dtype', type(image).__name__))
            return None
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < _MIN_SIDE_PX:
            logger.warning('OCR skipped: expected an (H, W, 3) image of at least %d px, got shape %s',
                           _MIN_SIDE_PX, image.shape)
            return None
        return np.ascontiguousarray(image[..., ::-1])  # RapidOCR treats arrays as OpenCV BGR

    def _to_item(self, line: list, width: int, height: int) -> TextItem | None:
        corners, text, confidence = line
        text = str(text).strip()
        if len(text) < self.config.min_chars or float(confidence) < self.config.min_confidence:
            return None
        box = tuple((round(float(x), 1), round(float(y), 1)) for x, y in corners)
        centre_x, centre_y = np.mean(box, axis=0)
        return TextItem(text, round(float(confidence), 3), box, grid_position(centre_x, centre_y, width, height))
