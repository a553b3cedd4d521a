"""Grounded perception context: short, structured sensor facts added to the LLM prompt.

Each extractor takes one sensor input and returns a typed result with `to_dict()` (JSON-able, for publishing)
and `to_text(max_chars)` (one short line); `ContextBuilder` merges results into a bounded block of text.
Models come from PyPI wheels and load lazily, once; nothing is downloaded.

    ocr = OcrExtractor()                       # RapidOCR (PP-OCRv4 ONNX)
    audio = AudioEventExtractor()              # YAMNet int8 ONNX + Silero VAD
    geometry = GeometryExtractor()             # open3d RANSAC ground plane + DBSCAN clusters
    context = ContextBuilder()(
        [ocr(rgb_image), audio(waveform, sample_rate), geometry(points)])
"""
from .audio_events import AudioEvent, AudioEventConfig, AudioEventExtractor, AudioEventsResult
from .base import GroundingConfigError, GroundingError, GroundingModelError, GroundingResult, config_from_params
from .context import ContextBuilder, ContextConfig, results_to_dict
from .geometry import SECTORS, Cluster, GeometryConfig, GeometryExtractor, GeometryResult
from .ocr import OcrConfig, OcrExtractor, OcrResult, TextItem

__all__ = [
    'config_from_params',
    'AudioEvent', 'AudioEventConfig', 'AudioEventExtractor', 'AudioEventsResult',
    'Cluster', 'ContextBuilder', 'ContextConfig', 'GeometryConfig', 'GeometryExtractor', 'GeometryResult',
    'GroundingConfigError', 'GroundingError', 'GroundingModelError', 'GroundingResult',
    'OcrConfig', 'OcrExtractor', 'OcrResult', 'SECTORS', 'TextItem', 'results_to_dict',
]
