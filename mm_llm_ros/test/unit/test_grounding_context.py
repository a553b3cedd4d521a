"""Text budgets and the merged prompt context (no models needed)."""
import json
import threading
from dataclasses import dataclass
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_llm_ros.core.grounding import (AudioEvent, AudioEventsResult, Cluster, ContextBuilder, ContextConfig,
                                       GeometryResult, GroundingConfigError, OcrResult, TextItem, results_to_dict)
from mm_llm_ros.core.grounding.base import GroundingModelError, Lazy, join_within, package_file, truncate

BOX = ((10.0, 10.0), (50.0, 10.0), (50.0, 30.0), (10.0, 30.0))


def ocr_result():
    return OcrResult([TextItem('POKKA LOGISTICS', 0.97, BOX, 'top-center'), TextItem('EXIT', 0.88, BOX, 'right')],
                     (640, 480))


def audio_result():
    return AudioEventsResult([AudioEvent('Dog', 0.81), AudioEvent('Bark', 0.7)], speech=False, speech_fraction=0.0,
                             level_dbfs=-21.0, duration_s=2.61)


def geometry_result():
    nearest = {'front': 6.2, 'left': 2.25, 'right': None, 'back': None}
    clusters = [Cluster((6.5, 1.0, -0.7), (4.1, 1.8, 1.5), 6.58, 8.7, 300)]
    return GeometryResult(nearest, clusters, num_clusters=1, ground_plane=(0.0, 0.0, 1.0, 1.7),
                          num_points=1000, num_ground=600, num_obstacle=300)


@dataclass
class Fake:
    section: ClassVar[str] = 'fake'
    body: str = ''
    is_empty: bool = False

    def to_dict(self):
        return {'body': self.body}

    def to_text(self, max_chars=200):
        return truncate(self.body, max_chars)


def test_truncate_marks_cuts_and_respects_the_bound():
    assert truncate('short', 10) == 'short'
    assert truncate('abcdefghij', 6) == 'abcde…'
    assert truncate('abcdefghij', 1) == '…'
    assert truncate('abcdefghij', 0) == ''


def test_join_within_cuts_between_items_and_counts_the_rest():
    items = ['alpha', 'beta', 'gamma', 'delta']
    assert join_within(items, 100) == 'alpha; beta; gamma; delta'
    assert join_within(items, 24) == 'alpha; beta (+2 more)'
    assert join_within(['a very long first item'], 10) == 'a very lo…'
    assert join_within([], 10, prefix='none') == 'none'


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=12), st.integers(-5, 120), st.text(max_size=40))
def test_join_within_never_exceeds_the_bound(items, max_chars, prefix):
    assert len(join_within(items, max_chars, prefix=prefix)) <= max(max_chars, 0)


def test_result_lines_are_short_and_structured():
    assert ocr_result().to_text() == "'POKKA LOGISTICS' (0.97, top-center); 'EXIT' (0.88, right)"
    assert audio_result().to_text() == 'dog 0.81; bark 0.70 | speech: no | level -21 dBFS'
    assert geometry_result().to_text() == ('nearest front 6.2 m, left 2.2 m, right -, back -; '
                                           '1 objects: 6.6 m ahead (4.1x1.8x1.5 m)')


def test_empty_results_say_so():
    assert OcrResult().to_text() == 'no text'
    assert AudioEventsResult().to_text() == 'no audio'
    assert GeometryResult().to_text() == 'no points'
    assert AudioEventsResult(duration_s=1.0, speech=True).to_text() == 'no clear sound event | speech: yes'


def test_results_are_json_serialisable():
    merged = results_to_dict([ocr_result(), None, audio_result(), geometry_result()])
    decoded = json.loads(json.dumps(merged))
    assert set(decoded) == {'ocr', 'audio', 'geometry'}
    assert decoded['ocr']['items'][0]['text'] == 'POKKA LOGISTICS'
    assert decoded['audio']['events'][0] == {'label': 'Dog', 'score': 0.81}
    assert decoded['geometry']['nearest_m']['right'] is None


def test_context_orders_sections_and_skips_missing_ones():
    text = ContextBuilder()([geometry_result(), None, ocr_result(), audio_result()])
    lines = text.split('\n')
    assert [line.split(']')[0] for line in lines] == ['[ocr', '[audio', '[geometry']
    assert lines[0] == "[ocr] 'POKKA LOGISTICS' (0.97, top-center); 'EXIT' (0.88, right)"
    assert ContextBuilder()([]) == ''


def test_context_template_header_and_unknown_sections_are_configurable():
    config = ContextConfig(line_template='{section}: {text}', header='Sensors:', sections=('audio', 'ocr'))
    text = ContextBuilder(config)([Fake('odd one'), ocr_result(), audio_result()])
    assert text.split('\n') == ['Sensors:', 'audio: dog 0.81; bark 0.70 | speech: no | level -21 dBFS',
                                "ocr: 'POKKA LOGISTICS' (0.97, top-center); 'EXIT' (0.88, right)", 'fake: odd one']


@pytest.mark.parametrize('max_chars', [40, 80, 120, 200, 600])
def test_context_stays_within_max_chars_and_marks_cuts(max_chars):
    results = [ocr_result(), audio_result(), geometry_result(), Fake('x' * 500)]
    text = ContextBuilder(ContextConfig(max_chars=max_chars, section_max_chars=min(240, max_chars)))(results)
    assert 0 < len(text) <= max_chars
    assert text.endswith('…') or '(+' in text


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=300), max_size=5), st.integers(12, 400), st.integers(12, 300), st.text(max_size=30))
def test_context_never_exceeds_max_chars(bodies, max_chars, section_max_chars, header):
    config = ContextConfig(max_chars=max_chars, section_max_chars=section_max_chars, header=header)
    assert len(ContextBuilder(config)([Fake(body) for body in bodies])) <= max_chars


def test_section_bound_shortens_items_before_cutting():
    many = OcrResult([TextItem(f'SIGN {i}', 0.9, BOX, 'center') for i in range(20)], (640, 480))
    line = ContextBuilder(ContextConfig(section_max_chars=80))([many])
    assert len(line) <= 80
    assert line.endswith('more)')
    assert "'SIGN 0' (0.90, center)" in line


def test_token_bound_uses_the_given_counter():
    count_words = lambda text: len(text.split())  # noqa: E731
    builder = ContextBuilder(ContextConfig(max_tokens=12), count_tokens=count_words)
    text = builder([ocr_result(), audio_result(), geometry_result()])
    assert count_words(text) <= 12
    assert text.endswith('…')
    assert text.startswith("[ocr] 'POKKA")


@pytest.mark.parametrize('kwargs', [{'max_chars': 5}, {'section_max_chars': 0}, {'max_tokens': -1},
                                    {'line_template': '[{section}]'}, {'line_template': '{name}: {text}'},
                                    {'line_template': '{text'}])
def test_bad_context_config_is_rejected(kwargs):
    with pytest.raises(GroundingConfigError):
        ContextConfig(**kwargs)


def test_token_bound_needs_a_counter():
    with pytest.raises(GroundingConfigError, match='count_tokens'):
        ContextBuilder(ContextConfig(max_tokens=10))


def test_lazy_builds_once_across_threads():
    calls = []
    lazy = Lazy(lambda: calls.append(1) or object())
    start = threading.Barrier(8)
    seen = []

    def worker():
        start.wait()
        seen.append(lazy.get())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len({id(value) for value in seen}) == 1 and lazy.loaded


def test_package_file_names_the_missing_requirement():
    with pytest.raises(GroundingModelError, match='pip install no-such-wheel==1.0'):
        package_file('no_such_package_for_grounding', 'data/model.onnx', 'no-such-wheel==1.0')
    with pytest.raises(GroundingModelError, match='missing from the installed'):
        package_file('json', 'data/model.onnx', 'stdlib')
