"""The `evaluate` CLI end to end with the deterministic builtin predictors."""
import json
import logging
import sys

import pytest

from mm_llm_ros import evaluate
from test_eval_datasets import _write_mme_release, _write_textvqa


def _run(*argv):
    return evaluate.main([*argv, '--no-progress'])


def test_mme_two_configs_side_by_side(tmp_path, capsys):
    data = _write_mme_release(tmp_path / 'MME')
    out = tmp_path / 'out'
    argv = ['--benchmark', 'mme', '--data', str(data), '--out', str(out),
            '--config', 'yes=builtin:always-yes', '--config', 'no=builtin:always-no']
    assert _run(*argv) == 0
    document = json.loads((out / 'results.json').read_text())
    for name in ('yes', 'no'):
        config = document['configs'][name]
        # Each image has one yes and one no question: acc 50 %, acc+ 0 -> 50 per subtask.
        assert config['categories']['existence']['score'] == pytest.approx(50.0)
        assert config['summary'] == pytest.approx({'perception': 100.0, 'cognition': 0.0, 'total': 100.0})
    assert document['meta']['runs']['yes'] == {'new': 6, 'cached': 0, 'seconds': pytest.approx(0, abs=1),
                                               'seconds_per_item': pytest.approx(0, abs=1)}
    table = (out / 'results.md').read_text()
    assert '| metric | yes | no | Δ no |' in table and '| **perception** | 100.00 | 100.00 | +0.00 |' in table
    assert table in capsys.readouterr().out
    assert (out / 'mme_categories.png').read_bytes()[:4] == b'\x89PNG'
    assert len((out / 'mme_eval_tool' / 'no' / 'artwork.txt').read_text().splitlines()) == 2
    assert len((out / 'details.jsonl').read_text().splitlines()) == 12

    # A second run answers everything from the prediction cache.
    assert _run(*argv) == 0
    assert json.loads((out / 'results.json').read_text())['meta']['runs']['no']['new'] == 0


def test_smoke_run_on_the_shared_mmbench_sample(shared_data, tmp_path):
    out = tmp_path / 'smoke'
    assert _run('--smoke', '--data', str(shared_data / 'vqa' / 'questions.jsonl'), '--out', str(out)) == 0
    document = json.loads((out / 'results.json').read_text())
    # First four answers are D, B, A, A: the first-option baseline gets two of four.
    assert document['benchmark'] == 'mmbench' and document['meta']['items'] == 4
    assert document['configs']['first-option']['summary'] == {'accuracy': 50.0}
    assert (out / 'mmbench_categories.png').is_file()


@pytest.mark.parametrize('protocol_args, protocol, accuracy', [((), 'evalai', 100.0),  # the published scoring
                                                               (('--vqa-protocol', 'vqa'), 'vqa', 0.0)])
def test_textvqa_scores_with_the_authors_evaluator_by_default(tmp_path, protocol_args, protocol, accuracy):
    data = _write_textvqa(tmp_path, answers=['yes'] * 10)  # always-yes says 'Yes': only the evalai rules lowercase it
    out = tmp_path / 'out'
    assert _run('--benchmark', 'textvqa', '--data', str(data), '--out', str(out), '--config', 'y=builtin:always-yes',
                *protocol_args) == 0
    results = json.loads((out / 'results.json').read_text())
    assert results['configs']['y']['summary'] == {'accuracy': accuracy}
    assert protocol in json.dumps(results)
    assert not (out / 'textvqa_categories.png').exists()  # no categories to chart


def test_chart_is_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == 'matplotlib' or m.startswith('matplotlib.')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    out = tmp_path / 'out'
    with caplog.at_level(logging.WARNING):
        assert _run('--benchmark', 'mme', '--data', str(_write_mme_release(tmp_path / 'MME')), '--out', str(out),
                    '--config', 'y=builtin:always-yes') == 0
    assert 'no chart' in caplog.text and (out / 'results.json').is_file()
    assert not (out / 'mme_categories.png').exists()


def test_configuration_errors_exit_with_a_message(tmp_path, caplog):
    data = _write_mme_release(tmp_path / 'MME')
    params = tmp_path / 'base.yaml'
    params.write_text('model: imagebind_llm\n')
    common = ['--benchmark', 'mme', '--data', str(data), '--out', str(tmp_path / 'out')]
    assert _run(*common, '--config', 'x=builtin:always-maybe') == 1
    assert "unknown builtin 'always-maybe'" in caplog.text
    assert _run(*common, '--config', f'base={params}') == 1
    assert "section 'model' has no ros__parameters mapping" in caplog.text
    assert _run(*common, '--config', 'x=builtin:always-yes+ocr') == 1
    assert 'builtin baselines take no context' in caplog.text
    assert _run(*common, '--config', 'base=missing.yaml') == 1
    assert 'params file not found' in caplog.text
    assert _run(*common, '--config', 'y=builtin:always-yes', '--subset', 'nope') == 1
    assert 'unknown subset nope' in caplog.text


@pytest.mark.parametrize('argv', [
    ['--data', 'x', '--out', 'o', '--config', 'a=builtin:always-yes'],               # no --benchmark
    ['--benchmark', 'mme', '--data', 'x', '--out', 'o'],                              # no --config
    ['--benchmark', 'mme', '--data', 'x', '--out', 'o', '--config', 'novalue'],       # not NAME=PARAMS
    ['--benchmark', 'mme', '--data', 'x', '--out', 'o', '--config', 'a b=builtin:always-yes'],
    ['--benchmark', 'mme', '--data', 'x', '--out', 'o', '--config', 'a=builtin:always-yes',
     '--config', 'a=builtin:always-no'],                                              # duplicate name
    ['--smoke', '--data', 'questions.tsv', '--out', 'o'],                             # smoke needs jsonl
])
def test_usage_errors_exit_with_status_2(argv):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv)
    assert exc.value.code == 2


def test_context_suffixes_are_split_from_the_params_file():
    assert evaluate.parse_config('ocr=config/demo.yaml+ocr') == evaluate.ConfigSpec('ocr', 'config/demo.yaml', ('ocr',))
    # A '+' that names no context kind is part of the file name.
    spec = evaluate.parse_config('a=my+params.yaml')
    assert (spec.params, spec.context, spec.label) == ('my+params.yaml', (), 'my+params.yaml')
    assert evaluate.parse_config('b=p.yaml+ocr+geometry').context == ('ocr', 'geometry')


def test_config_fingerprint_tracks_the_params_file(tmp_path):
    params = tmp_path / 'p.yaml'
    params.write_text('a: 1\n')
    spec = evaluate.parse_config(f'base={params}')
    before = spec.fingerprint()
    params.write_text('a: 2\n')
    assert spec.fingerprint() != before and before.startswith('sha256:')
    assert evaluate.parse_config(f'ocr={params}+ocr').fingerprint() == spec.fingerprint() + '+ocr'
    assert evaluate.parse_config('b=builtin:always-yes').fingerprint() == 'builtin:always-yes'


def test_config_fingerprint_tracks_a_bundled_adapter_it_names(tmp_path, monkeypatch):
    adapter = tmp_path / 'grounded.safetensors'
    adapter.write_bytes(b'first')
    monkeypatch.setitem(evaluate.BUNDLED_ADAPTERS, 'grounded-smollm2', adapter)
    params = tmp_path / 'p.yaml'
    params.write_text('llm.adapter_checkpoint: "grounded-smollm2"\n')
    other = tmp_path / 'q.yaml'
    other.write_text('llm.adapter_checkpoint: ""\n')
    spec, unrelated = evaluate.parse_config(f'a={params}'), evaluate.parse_config(f'b={other}')
    before, unrelated_before = spec.fingerprint(), unrelated.fingerprint()
    adapter.write_bytes(b'retrained')
    assert spec.fingerprint() != before and unrelated.fingerprint() == unrelated_before
