"""Report outputs: markdown comparison table, JSON document, MME eval_tool files and the bar chart."""
import json
import sys

import pytest

from mm_llm_ros.core.evaluation import (BenchmarkScore, EvalItem, ReportError, markdown_table, mme_score,
                                        plot_categories, results_document, write_details, write_json,
                                        write_mme_eval_tool)


def _score(perception, ocr, other=0):
    return BenchmarkScore(benchmark='mme', headline='score', summary={'perception': perception, 'cognition': 10.0},
                          categories={'OCR': {'score': ocr, 'acc': 50.0}}, counts={'other': other})


def test_markdown_table_puts_configs_side_by_side_with_deltas():
    table = markdown_table({'base': _score(775.77, 100.0, other=3), 'ocr': _score(801.0, 140.5, other=1)})
    lines = table.splitlines()
    assert lines[0] == '### MME'
    assert lines[2] == '| metric | base | ocr | Δ ocr |'
    assert '| **perception** | 775.77 | 801.00 | +25.23 |' in lines
    assert '| OCR (score) | 100.00 | 140.50 | +40.50 |' in lines
    assert '| other | 3 | 1 | -2 |' in lines


def test_markdown_table_shows_missing_values_and_rejects_mixed_benchmarks():
    partial = _score(1.0, 1.0)
    partial.categories = {}
    assert '| OCR (score) | 100.00 | — | — |' in markdown_table({'a': _score(1.0, 100.0), 'b': partial})
    other = BenchmarkScore(benchmark='textvqa', headline='accuracy', summary={'accuracy': 1.0})
    with pytest.raises(ReportError, match='different benchmarks'):
        markdown_table({'a': _score(1.0, 1.0), 'b': other})
    with pytest.raises(ReportError, match='no results'):
        markdown_table({})


def _mme_items():
    return [EvalItem(id=f'OCR/{i}.jpg#{k}', question=f'Is it word {k}?', answers=(gt,), category='OCR',
                     group=f'OCR/{i}.jpg', metadata={'image_name': f'{i}.jpg'})
            for i in range(2) for k, gt in enumerate(('yes', 'no'))]


def test_json_and_details_round_trip(tmp_path):
    items = _mme_items()
    score = mme_score(items, {item.id: 'Yes' for item in items})
    path = write_json(tmp_path / 'results.json', {'base': score}, {'limit': 4})
    document = json.loads(path.read_text())
    assert document == results_document({'base': score}, {'limit': 4})
    assert document['configs']['base']['categories']['OCR']['score'] == pytest.approx(50.0)
    assert 'items' not in document['configs']['base']
    rows = [json.loads(line) for line in write_details(tmp_path / 'd.jsonl', {'base': score}).read_text().splitlines()]
    assert [(r['id'], r['parsed'], r['score']) for r in rows][:2] == [('OCR/0.jpg#0', 'yes', 1.0),
                                                                     ('OCR/0.jpg#1', 'yes', 0.0)]


def test_mme_eval_tool_files_follow_the_official_input_format(tmp_path):
    items = _mme_items()
    predictions = {item.id: 'Yes,\tit is\nthe word' for item in items}
    out = write_mme_eval_tool(items[2:] + items[:2], predictions, tmp_path / 'tool')
    lines = (out / 'OCR.txt').read_text().splitlines()
    fields = [line.split('\t') for line in lines]
    assert all(len(f) == 4 for f in fields)
    # Pairs adjacent (the official tool reads two lines per image), answers capitalised as in the release.
    assert [(f[0], f[2]) for f in fields] == [('0.jpg', 'Yes'), ('0.jpg', 'No'), ('1.jpg', 'Yes'), ('1.jpg', 'No')]
    assert fields[0][3] == 'Yes, it is the word'


def test_plot_categories_writes_a_png(tmp_path):
    path = plot_categories({'base': _score(1.0, 120.0), 'ocr': _score(1.0, 150.0)}, tmp_path / 'chart.png')
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    empty = BenchmarkScore(benchmark='textvqa', headline='accuracy', summary={'accuracy': 1.0})
    with pytest.raises(ReportError, match='no categories'):
        plot_categories({'a': empty}, tmp_path / 'none.png')


def test_plot_categories_explains_a_missing_matplotlib(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == 'matplotlib' or m.startswith('matplotlib.')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.raises(ReportError, match='pip install matplotlib'):
        plot_categories({'base': _score(1.0, 1.0)}, tmp_path / 'chart.png')
