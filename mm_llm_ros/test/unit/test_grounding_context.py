"""Text budgets of the extractor results and the prompt's context block (no models needed)."""
import json
import threading
from dataclasses import dataclass
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_llm_ros.core.answering import AskEngine, AskLimits, context_block, context_line
from mm_llm_ros.core.embedding_store import ModalityStore
from mm_llm_ros.core.grounding import AudioEvent, AudioEventsResult, Cluster, GeometryResult, OcrResult, TextItem
from mm_llm_ros.core.llm.prompt import bound_context
from mm_llm_ros.core.errors import CheckpointError, DependencyError
from mm_llm_ros.core.grounding.base import Lazy, join_within, package_file, truncate

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
    # grounding_node publishes each result as PerceptionContext.json
    decoded = {r.section: json.loads(json.dumps(r.to_dict())) for r in (ocr_result(), audio_result(), geometry_result())}
    assert decoded['ocr']['items'][0]['text'] == 'POKKA LOGISTICS'
    assert decoded['audio_events']['events'][0] == {'label': 'Dog', 'score': 0.81}
    assert decoded['geometry']['nearest_m']['right'] is None


# ---- the prompt's context block: llm_node's one formatter (core/answering.py), bounded by the prompt builder ----
def published():
    """(kind, PerceptionContext.text) as grounding_node publishes them, in context.kinds order."""
    return [('ocr', ocr_result().to_text()), ('audio_events', audio_result().to_text()),
            ('geometry', geometry_result().to_text())]


def test_context_block_labels_each_kind_in_order_and_is_none_when_empty():
    lines = context_block('{label}: {text}', published()).split('\n')
    assert lines == ["Text read by the camera: 'POKKA LOGISTICS' (0.97, top-center); 'EXIT' (0.88, right)",
                     'Sounds heard: dog 0.81; bark 0.70 | speech: no | level -21 dBFS',
                     'Lidar obstacles: nearest front 6.2 m, left 2.2 m, right -, back -; 1 objects: 6.6 m ahead '
                     '(4.1x1.8x1.5 m)']
    assert context_block('{label}: {text}', []) is None


def test_context_template_may_name_the_kind():
    assert context_block('[{kind}] {text}', published()[:1]) == "[ocr] 'POKKA LOGISTICS' (0.97, top-center); " \
                                                                 "'EXIT' (0.88, right)"
    assert context_line('{label}: {text}', 'sonar', 'x') == 'sonar: x'  # an unknown kind is labelled by its name


@pytest.mark.parametrize('max_chars', [40, 80, 120, 200, 600])
def test_context_stays_within_max_chars(max_chars):
    texts = published() + [('geometry', 'x' * 500)]
    assert 0 < len(bound_context(context_block('{label}: {text}', texts), max_chars)) <= max_chars


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(['ocr', 'audio_events', 'geometry']), st.text(max_size=300)), max_size=5),
       st.integers(0, 400))
def test_context_never_exceeds_max_chars(texts, max_chars):
    assert len(bound_context(context_block('{label}: {text}', texts), max_chars) or '') <= max_chars


def test_a_result_line_shortens_items_before_cutting():
    many = OcrResult([TextItem(f'SIGN {i}', 0.9, BOX, 'center') for i in range(20)], (640, 480))
    line = many.to_text(80)   # text_max_chars bounds the published line
    assert len(line) <= 80
    assert line.endswith('more)')
    assert "'SIGN 0' (0.90, center)" in line


@pytest.mark.parametrize('template', ['{name}: {text}', '{text', '{0}'])
def test_bad_context_template_is_rejected_at_start(template):
    with pytest.raises(ValueError, match='context line template'):
        AskEngine(answerer=None, store=ModalityStore(), limits=AskLimits(()), line_template=template)


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
    with pytest.raises(DependencyError, match='pip install no-such-wheel==1.0'):
        package_file('no_such_package_for_grounding', 'data/model.onnx', 'no-such-wheel==1.0')
    with pytest.raises(CheckpointError, match='missing from the installed'):
        package_file('json', 'data/model.onnx', 'stdlib')
