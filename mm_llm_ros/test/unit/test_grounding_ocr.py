"""Scene-text extractor: layout helpers, input handling, and real reading of a sign and a licence plate."""
import json

import numpy as np
import pytest

from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.grounding import OcrConfig, OcrExtractor, TextItem
from mm_llm_ros.core.grounding.ocr import grid_position, reading_order

NUSCENES_FRONT = 'images/nuscenes/n015-2018-07-24-11-22-45+0800__CAM_FRONT__1532402927612460.jpg'
KITTI_IMAGE = 'images/kitti/kitti_000008.png'


def item(text, x, y, height=20.0):
    box = ((x - 30, y - height / 2), (x + 30, y - height / 2), (x + 30, y + height / 2), (x - 30, y + height / 2))
    return TextItem(text, 0.9, box, grid_position(x, y, 1000, 600))


@pytest.mark.parametrize('x, y, expected', [
    (10, 10, 'top-left'), (500, 10, 'top-center'), (990, 10, 'top-right'),
    (10, 300, 'left'), (500, 300, 'center'), (990, 300, 'right'),
    (10, 590, 'bottom-left'), (500, 590, 'bottom-center'), (999.9, 599.9, 'bottom-right'),
    (-5, 700, 'bottom-left'),   # corners slightly outside the frame still get a cell
])
def test_grid_position(x, y, expected):
    assert grid_position(x, y, 1000, 600) == expected


def test_reading_order_is_lines_top_down_then_left_to_right():
    items = [item('world', 300, 104), item('below', 100, 200), item('hello', 100, 100), item('top', 800, 20)]
    assert [i.text for i in reading_order(items)] == ['top', 'hello', 'world', 'below']


@pytest.mark.parametrize('kwargs', [{'min_confidence': 1.5}, {'min_chars': 0}, {'max_items': 0},
                                    {'max_side_px': 10}, {'num_threads': -1}])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ConfigError):
        OcrConfig(**kwargs)


class FakeEngine:
    """Stands in for RapidOCR: returns fixed lines in its (box, text, score) format and records the input."""

    def __init__(self, lines=()):
        self.lines = [[[[x, y], [x + 60, y], [x + 60, y + 20], [x, y + 20]], text, score]
                      for text, x, y, score in lines]
        self.inputs = []

    def __call__(self, bgr):
        self.inputs.append(bgr)
        return (self.lines or None), None


@pytest.mark.parametrize('image', [None, np.zeros((0, 0, 3), np.uint8), np.zeros((4, 4, 3), np.uint8),
                                   np.zeros((64, 64, 4), np.uint8), np.zeros((64, 64, 3), np.float32), [[1, 2]]])
def test_unusable_input_gives_an_empty_result(image, caplog):
    engine = FakeEngine([('TEXT', 0, 0, 0.9)])
    result = OcrExtractor(engine=engine)(image)
    assert result.is_empty and result.image_size == (0, 0)
    assert not engine.inputs
    assert 'OCR skipped' in caplog.text


def test_rgb_is_handed_to_the_engine_as_bgr_and_grey_as_three_channels():
    engine = FakeEngine()
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 255
    assert OcrExtractor(engine=engine)(rgb).image_size == (30, 20)
    assert engine.inputs[0][0, 0].tolist() == [0, 0, 255]
    OcrExtractor(engine=engine)(np.full((20, 30), 7, np.uint8))
    assert engine.inputs[1].shape == (20, 30, 3)


def test_filters_caps_and_orders_lines():
    engine = FakeEngine([('LOW', 10, 10, 0.3), ('X', 10, 50, 0.99), ('EXIT', 900, 500, 0.8),
                         ('STOP', 100, 500, 0.95), ('  OPEN  ', 500, 20, 0.85), ('BUS', 300, 500, 0.75)])
    result = OcrExtractor(OcrConfig(min_confidence=0.5, min_chars=2, max_items=3), engine=engine)(
        np.zeros((600, 1000, 3), np.uint8))
    # LOW (score) and X (length) are dropped, BUS is the least confident of the rest; then reading order.
    assert result.texts == ['OPEN', 'STOP', 'EXIT']
    assert [i.position for i in result.items] == ['top-center', 'bottom-left', 'bottom-right']
    assert result.items[1].box == ((100.0, 500.0), (160.0, 500.0), (160.0, 520.0), (100.0, 520.0))


@pytest.fixture(scope='module')
def extractor():
    pytest.importorskip('rapidocr_onnxruntime')
    ocr = OcrExtractor(OcrConfig(num_threads=2))
    ocr.load()
    return ocr


def _read_rgb(path):
    import cv2
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_blank_frame_has_no_text(extractor):
    result = extractor(np.full((120, 160, 3), 127, np.uint8))
    assert result.is_empty and result.image_size == (160, 120)
    assert result.to_text() == 'no text'


def test_reads_the_truck_sign_in_a_nuscenes_frame(extractor, shared_data):
    result = extractor(_read_rgb(shared_data / NUSCENES_FRONT))
    pokka = [i for i in result.items if 'POKKA' in i.text.upper()]
    assert pokka, result.texts
    assert pokka[0].confidence >= 0.9
    # The truck stands on the left of the frame, about mid-height.
    assert pokka[0].position in ('left', 'top-left', 'bottom-left')
    assert result.texts.index(pokka[0].text) == 0   # the sign's first line comes first in reading order
    assert "'POKKA" in result.to_text()
    assert json.loads(json.dumps(result.to_dict()))['image_size'] == [1600, 900]


def test_reads_the_licence_plate_in_a_kitti_frame(extractor, shared_data):
    """The plate of the car parked on the right reads 'KA-L 2408' (Karlsruhe)."""
    result = extractor(_read_rgb(shared_data / KITTI_IMAGE))
    plate = [i for i in result.items if '2408' in i.text]
    assert plate, result.texts
    assert 'KA' in plate[0].text
    assert plate[0].position.endswith('right')
