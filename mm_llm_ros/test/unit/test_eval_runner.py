"""Prediction runner: resumable cache, side-by-side configs, and group-preserving selection."""
import json

import pytest

from mm_llm_ros.core.evaluation import (BUILTIN_PREDICTORS, EvalItem, FirstOptionPredictor, PredictionCache,
                                        PredictionError, Predictor, SelectionError, expand_circular, run_configs,
                                        run_predictions, select_items)


class CountingPredictor:
    """Answers 'yes' and records which items it was asked about."""

    def __init__(self, answer='yes', fail_on=None):
        self.answer = answer
        self.fail_on = fail_on
        self.calls = []

    def predict(self, item):
        if item.id == self.fail_on:
            raise RuntimeError('model crashed')
        self.calls.append(item.id)
        return self.answer


def _items(n=4, category='c'):
    return [EvalItem(id=f'{category}{i}', question='q', answers=('yes',), category=category) for i in range(n)]


def test_rerun_resumes_from_cache_without_new_predictions(tmp_path):
    items = _items()
    path = tmp_path / 'predictions.jsonl'
    first = CountingPredictor()
    run = run_predictions(first, items, config='base', cache=PredictionCache(path, 'mme'), progress=False)
    assert run.new == 4 and run.cached == 0 and len(first.calls) == 4

    second = CountingPredictor(answer='no')
    rerun = run_predictions(second, items, config='base', cache=PredictionCache(path, 'mme'), progress=False)
    assert second.calls == [] and rerun.new == 0 and rerun.cached == 4
    assert rerun.predictions == {item.id: 'yes' for item in items}


def test_cache_is_keyed_by_benchmark_config_and_fingerprint(tmp_path):
    items = _items(2)
    path = tmp_path / 'predictions.jsonl'
    run_predictions(CountingPredictor(), items, config='base', cache=PredictionCache(path, 'mme'),
                    fingerprint='v1', progress=False)
    for benchmark, config, fingerprint in (('textvqa', 'base', 'v1'), ('mme', 'ocr', 'v1'), ('mme', 'base', 'v2')):
        predictor = CountingPredictor()
        run_predictions(predictor, items, config=config, cache=PredictionCache(path, benchmark),
                        fingerprint=fingerprint, progress=False)
        assert len(predictor.calls) == 2, (benchmark, config, fingerprint)


def test_failure_keeps_earlier_predictions_and_torn_lines_are_skipped(tmp_path):
    items = _items(3)
    path = tmp_path / 'predictions.jsonl'
    with pytest.raises(PredictionError, match="config 'base' failed on item c2: model crashed"):
        run_predictions(CountingPredictor(fail_on='c2'), items, config='base', cache=PredictionCache(path, 'mme'),
                        progress=False)
    with path.open('a') as handle:
        handle.write('{"benchmark": "mme", "config": "base", "id": "c2", "predic')  # interrupted write
    resumed = CountingPredictor()
    run = run_predictions(resumed, items, config='base', cache=PredictionCache(path, 'mme'), progress=False)
    assert resumed.calls == ['c2'] and run.cached == 2
    last = json.loads(path.read_text().splitlines()[-1])
    assert last['id'] == 'c2' and last['prediction'] == 'yes' and last['seconds'] >= 0
    # The torn line was terminated before appending, so a third run finds all three answers.
    third = CountingPredictor()
    assert run_predictions(third, items, config='base', cache=PredictionCache(path, 'mme'), progress=False).new == 0


def test_non_string_answers_are_rejected(tmp_path):
    class NumberPredictor:
        def predict(self, item):
            return 3

    with pytest.raises(PredictionError, match='returned int'):
        run_predictions(NumberPredictor(), _items(1), config='x', cache=PredictionCache(tmp_path / 'p.jsonl', 'mme'),
                        progress=False)


def test_run_configs_answers_the_same_items_per_config(tmp_path):
    items = _items(2)
    runs = run_configs({'yes': CountingPredictor('yes'), 'no': CountingPredictor('no')}, items,
                       cache=PredictionCache(tmp_path / 'p.jsonl', 'mme'), progress=False)
    assert {name: set(run.predictions.values()) for name, run in runs.items()} == {'yes': {'yes'}, 'no': {'no'}}


def test_builtin_predictors_are_deterministic():
    item = EvalItem(id='1', question='q', answers=('B',), options={'A': 'x', 'B': 'y'})
    assert FirstOptionPredictor().predict(item) == 'A'
    assert BUILTIN_PREDICTORS['always-yes']().predict(item) == 'Yes'
    assert all(isinstance(factory(), Predictor) for factory in BUILTIN_PREDICTORS.values())
    with pytest.raises(PredictionError, match='no options'):
        FirstOptionPredictor().predict(EvalItem(id='2', question='q', answers=('a',)))


def test_select_items_by_subset_and_limit_keeps_groups_whole():
    pairs = [EvalItem(id=f'{c}{i}#{k}', question='q', answers=('yes',), category=c, group=f'{c}{i}')
             for c in ('count', 'OCR') for i in range(3) for k in range(2)]
    assert [i.id for i in select_items(pairs, limit=3)] == ['count0#0', 'count0#1', 'count1#0', 'count1#1']
    ocr = select_items(pairs, subset=['OCR'], limit=2)
    assert [i.id for i in ocr] == ['OCR0#0', 'OCR0#1']
    assert len(select_items(pairs, subset=['count,OCR'])) == 12
    commas = [EvalItem(id='1', question='q', answers=('a',), category='Reasoning, logic')]
    assert select_items(commas, subset=['Reasoning, logic']) == commas
    rotated = expand_circular([EvalItem(id=str(i), question='q', answers=('A',), options={'A': 'a', 'B': 'b'})
                               for i in range(3)])
    assert [i.id for i in select_items(rotated, limit=1)] == ['0', '0@1']


def test_select_items_rejects_unknown_subsets_and_bad_limits():
    items = _items(2)
    with pytest.raises(SelectionError, match='unknown subset nope; categories are: c'):
        select_items(items, subset=['nope'])
    with pytest.raises(SelectionError, match='positive'):
        select_items(items, limit=0)
    with pytest.raises(SelectionError, match='no items'):
        select_items([], limit=None)
