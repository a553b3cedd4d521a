"""Grounded perception context: short, structured sensor facts added to the LLM prompt.

Each extractor takes one sensor input and returns a typed result with `to_dict()` (JSON-able, for publishing)
and `to_text(max_chars)` (one short line, published in PerceptionContext.text; `core/answering.py`'s `context_block`
words the lines of all kinds for the prompt).
Models come from PyPI wheels and load lazily, once; nothing is downloaded.

    ocr = OcrExtractor()                       # RapidOCR (PP-OCRv4 ONNX)
    audio = AudioEventExtractor()              # YAMNet int8 ONNX + Silero VAD
    geometry = GeometryExtractor()             # open3d RANSAC ground plane + DBSCAN clusters
    lines = [ocr(rgb_image).to_text(200), audio(waveform, sample_rate).to_text(200), geometry(points).to_text(200)]
"""
from .audio_events import AudioEvent, AudioEventConfig, AudioEventExtractor, AudioEventsResult
from .base import GroundingResult, config_from_params
from .geometry import SECTORS, Cluster, GeometryConfig, GeometryExtractor, GeometryResult
from .ocr import OcrConfig, OcrExtractor, OcrResult, TextItem

__all__ = [
    'config_from_params',
    'AudioEvent', 'AudioEventConfig', 'AudioEventExtractor', 'AudioEventsResult',
    'Cluster', 'GeometryConfig', 'GeometryExtractor', 'GeometryResult',
    'GroundingResult',
    'OcrConfig', 'OcrExtractor', 'OcrResult', 'SECTORS', 'TextItem',
]
