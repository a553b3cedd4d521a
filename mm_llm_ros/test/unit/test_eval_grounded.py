"""The grounded benchmark: scenes, questions with their truth from the context, automatic scoring, the CLI."""
import json
import re
from collections import Counter

import pytest

from mm_llm_ros import evaluate
from mm_llm_ros.core.evaluation import load_benchmark
from mm_llm_ros.core.evaluation.grounded import (CANNOT_TELL, CATEGORIES, COUNT, DIRECTION, LABEL, NONE, NUMBER,
                                                 YES_NO, grounded_score, load_grounded, score_answer)
from mm_llm_ros.core.grounding.facts import context_facts, prompt_text


@pytest.fixture(scope='module')
def items():
    return load_grounded(None)


def test_generated_benchmark_has_enough_paraphrased_questions_of_every_category(items):
    categories = Counter(item.category for item in items)
    assert len(items) >= 150 and set(categories) == set(CATEGORIES)
    assert categories['unanswerable'] >= 0.15 * len(items)
    for category in CATEGORIES:   # paraphrased forms, not one fixed question per category
        assert len({item.question for item in items if item.category == category}) >= 4, category
    assert len({item.id for item in items}) == len(items)
    assert [item.question for item in load_grounded(None)] == [item.question for item in items]   # seeded
    assert [item.question for item in load_grounded(None, seed=1)] != [item.question for item in items]


def test_truth_is_in_the_context_the_node_received(items):
    """Every factual truth can be read off the published text line of its scene (what llm_node receives)."""
    for item in items:
        context = {kind: text for kind, text, _json in item.metadata['context']}
        kind = item.metadata['answer_kind']
        if item.category == 'distance' and kind == NUMBER:
            assert f'{item.answers[0]} m' in context['geometry'], item
        elif item.category == 'distance':
            sector = re.sub(r'.*(ahead|front|left|right|behind|back).*', r'\1', item.question)
            sector = {'ahead': 'front', 'behind': 'back'}.get(sector, sector)
            assert f'{sector} -' in context['geometry'], item
        elif item.category == 'count':
            assert f'; {item.answers[0]} objects' in context['geometry'], item
        elif item.category == 'text' and kind == LABEL:
            assert all(f"'{text}'" in context['ocr'] for text in item.answers[:1]), item
        elif item.category == 'speech':
            assert f'speech: {item.answers[0]}' in context['audio_events'], item
        elif item.category == 'sound' and kind == LABEL:
            assert item.answers[0].lower() in context['audio_events'], item


def test_unanswerable_questions_include_ones_about_a_missing_sensor(items):
    missing = [item for item in items if item.category == 'unanswerable'
               and len(item.metadata['context']) < 3 and item.question.startswith(('How far', 'What text'))]
    assert missing


@pytest.mark.parametrize('answer, kind, truth, right', [
    ('The nearest obstacle ahead is 8.7 meters away.', NUMBER, ('8.7',), True),
    ('About 8.8 m.', NUMBER, ('8.7',), True),
    ('The nearest obstacle ahead is 5.5 meters.', NUMBER, ('8.7',), False),
    ('I cannot tell how far it is, maybe 8.7 m.', NUMBER, ('8.7',), False),
    ('There is no obstacle on the left.', NONE, ('no obstacle',), True),
    ('The left is clear.', NONE, ('no obstacle',), True),
    ('The nearest obstacle on the left is 3.2 m.', NONE, ('no obstacle',), False),
    ('No, nobody is talking.', YES_NO, ('no',), True),
    ('Yes, someone is speaking.', YES_NO, ('no',), False),
    ('The robot is not detecting someone speaking.', YES_NO, ('no',), True),
    ('There are twelve objects.', COUNT, ('12',), True),
    ('The lidar sees 11 objects.', COUNT, ('12',), False),
    ('The nearest object is to the right.', DIRECTION, ('right',), True),
    ('It is in front of the robot.', DIRECTION, ('ahead',), True),
    ('Left, then right.', DIRECTION, ('right',), False),
    ('I hear a car horn.', LABEL, ('Vehicle horn, car horn, honking',), True),
    ('The sign says "Main St".', LABEL, ('MAIN ST', 'EXIT'), True),
    ('The sign says "MAIN".', LABEL, ('MAIN ST',), False),
    ('I cannot tell.', CANNOT_TELL, ('cannot tell',), True),
    ("The readings don't say what colour it is.", CANNOT_TELL, ('cannot tell',), True),
    ('There is no information about the weather.', CANNOT_TELL, ('cannot tell',), True),
    ('The robot is moving at 3 metres per second.', CANNOT_TELL, ('cannot tell',), False),
])
def test_answers_are_scored_automatically(answer, kind, truth, right):
    assert score_answer(answer, kind, truth)[0] is right


def test_scores_per_category_factual_and_cannot_tell(items):
    abstain = grounded_score(items, {item.id: 'I cannot tell.' for item in items})
    assert abstain.summary['cannot_tell_rate'] == 100.0 and abstain.summary['factual_accuracy'] == 0.0
    assert abstain.counts['factual_answered_cannot_tell'] == abstain.counts['factual']
    assert abstain.categories['unanswerable'] == {'accuracy': 100.0, 'questions': abstain.counts['unanswerable']}


def test_facts_render_every_fact_of_the_json_on_its_own_line(items):
    scene = next(item for item in items if len(item.metadata['context']) == 3 and item.category == 'distance')
    by_kind = {kind: (text, js) for kind, text, js in scene.metadata['context']}
    facts = context_facts('geometry', by_kind['geometry'][1]).splitlines()
    geometry = json.loads(by_kind['geometry'][1])
    def shown(distance):
        return 'none' if distance is None else f'{distance:.1f} m'
    assert facts[:4] == [f"Nearest obstacle {where}: {shown(geometry['nearest_m'][sector])}."
                         for sector, where in (('front', 'in front'), ('left', 'on the left'),
                                               ('right', 'on the right'), ('back', 'behind'))]
    assert facts[4] == f"Objects around the robot: {geometry['num_clusters']}."
    assert context_facts('ocr', by_kind['ocr'][1]).startswith('Text read by the camera: ')
    assert 'Someone speaking: ' in context_facts('audio_events', by_kind['audio_events'][1])
    # An unreadable JSON falls back to the published text; 'text' keeps that text, both bounded.
    assert prompt_text('geometry', 'nearest front 1.0 m', '{not json', 'facts', 100) == 'nearest front 1.0 m'
    assert prompt_text('geometry', 'x' * 50, by_kind['geometry'][1], 'text', 10) == 'x' * 10


def test_evaluate_runs_the_grounded_benchmark(tmp_path):
    out = tmp_path / 'out'
    assert evaluate.main(['--benchmark', 'grounded', '--data', 'generated', '--out', str(out), '--no-progress',
                          '--no-plot', '--config', 'no=builtin:always-no', '--subset', 'speech']) == 0
    document = json.loads((out / 'results.json').read_text())
    summary = document['configs']['no']['summary']
    speech = [item for item in load_benchmark('grounded', 'generated') if item.category == 'speech']
    assert summary['accuracy'] == pytest.approx(100 * sum(i.answers == ('no',) for i in speech) / len(speech))


@pytest.mark.shared_data
def test_real_scenes_come_from_the_extractors(shared_data):
    items = load_grounded(shared_data, scenes=0)
    scenes = {item.metadata['scene'] for item in items}
    assert {'nuscenes-car', 'kitti-bird', 'kitti-airplane-nocamera'} <= scenes
    text = next(item for item in items if item.metadata['scene'] == 'nuscenes-car' and item.category == 'text')
    assert 'POKKA' in text.answers
    no_camera = [item for item in items if item.metadata['scene'] == 'kitti-airplane-nocamera']
    assert all(kind != 'ocr' for kind, _text, _json in no_camera[0].metadata['context'])
