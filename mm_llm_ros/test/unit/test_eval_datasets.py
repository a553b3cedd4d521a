"""Benchmark loaders on small synthetic files in the official layouts, and on the shared MMBench sample."""
import base64
import csv
import io
import json

import pytest
from PIL import Image

from mm_llm_ros.core.evaluation import (DatasetError, EvalItem, expand_circular, load_benchmark, load_jsonl,
                                        load_mmbench_tsv, load_mme, load_textvqa, rotate_options)


def _png_bytes(color=(255, 0, 0)):
    buffer = io.BytesIO()
    Image.new('RGB', (4, 3), color).save(buffer, format='PNG')
    return buffer.getvalue()


def _write_mme_release(root):
    """Two subtasks in the two official release layouts (flat and images/ + questions_answers_YN/).

    The flat txt files start with a byte-order mark, which must not end up in the first question."""
    flat = root / 'existence'
    flat.mkdir(parents=True)
    for stem in ('000001', '000002'):
        (flat / f'{stem}.jpg').write_bytes(_png_bytes())
        (flat / f'{stem}.txt').write_text(f'\ufeffIs there a dog in {stem}? Please answer yes or no.\tYes\n'
                                          f'Is there a cat in {stem}? Please answer yes or no.\tNo\n\n')
    split = root / 'artwork'
    (split / 'images').mkdir(parents=True)
    (split / 'questions_answers_YN').mkdir()
    (split / 'images' / '10002.png').write_bytes(_png_bytes())
    (split / 'questions_answers_YN' / '10002.txt').write_text(
        'Is this a painting? Please answer yes or no.\tYes\nIs this glassware? Please answer yes or no.\tNo\n')
    return root


def test_load_mme_reads_both_release_layouts_in_official_order(tmp_path):
    items = load_mme(_write_mme_release(tmp_path / 'MME_Benchmark_release_version'))
    assert [i.category for i in items] == ['existence'] * 4 + ['artwork'] * 2
    first = items[0]
    assert first.id == 'existence/000001.jpg#0' and first.group == 'existence/000001.jpg'
    assert first.answers == ('yes',) and items[1].answers == ('no',)
    assert first.question == 'Is there a dog in 000001? Please answer yes or no.'
    assert items[4].image_path.name == '10002.png' and items[4].group == items[5].group
    assert first.load_image().size == (4, 3)


def test_load_mme_accepts_the_nested_release_folder_and_eval_tool_listing(tmp_path):
    nested = tmp_path / 'release'
    _write_mme_release(nested / 'MME_Benchmark')
    assert len(load_benchmark('mme', nested)) == 6

    listing_root = tmp_path / 'listing'
    (listing_root / 'OCR').mkdir(parents=True)
    (listing_root / 'OCR' / '0001.jpg').write_bytes(_png_bytes())
    (listing_root / 'OCR.txt').write_text('0001.jpg\tIs the word "angie\'s"?\tYes\n0001.jpg\tIs it "angle\'s"?\tNo\n')
    items = load_mme(listing_root)
    assert [(i.id, i.answers[0]) for i in items] == [('OCR/0001.jpg#0', 'yes'), ('OCR/0001.jpg#1', 'no')]


def test_load_mme_reports_bad_layouts(tmp_path):
    with pytest.raises(DatasetError, match='no MME subtask'):
        load_mme(tmp_path)
    root = _write_mme_release(tmp_path / 'bad')
    (root / 'existence' / '000001.txt').write_text('Is there a dog?\tMaybe\n')
    with pytest.raises(DatasetError, match='000001.txt:1: MME answers must be Yes or No'):
        load_mme(root)
    (root / 'existence' / '000001.txt').write_text('no tab here\n')
    with pytest.raises(DatasetError, match='question<TAB>answer'):
        load_mme(root)
    (root / 'existence' / '000001.jpg').unlink()
    with pytest.raises(DatasetError, match='no image named 000001'):
        load_mme(root)


def _write_textvqa(tmp_path, answers=None):
    (tmp_path / 'train_images').mkdir()
    (tmp_path / 'train_images' / 'img1.jpg').write_bytes(_png_bytes())
    data = {'dataset_name': 'textvqa', 'data': [
        {'question_id': 34602, 'question': 'what is the brand?', 'image_id': 'img1',
         'answers': answers or ['nokia'] * 7 + ['NOKIA', 'nokia phone', 'toshiba']}]}
    path = tmp_path / 'TextVQA_0.5.1_val.json'
    path.write_text(json.dumps(data))
    return path


def test_load_textvqa_official_json_with_ocr_tokens(tmp_path):
    path = _write_textvqa(tmp_path)
    ocr = tmp_path / 'ocr.json'
    ocr.write_text(json.dumps({'data': [{'image_id': 'img1', 'ocr_tokens': ['NOKIA', '3310']}]}))
    [item] = load_textvqa(path, ocr_json=ocr)
    assert item.id == '34602' and len(item.answers) == 10 and item.answers[7] == 'NOKIA'
    assert item.image_path == tmp_path / 'train_images' / 'img1.jpg'
    assert item.metadata['ocr_tokens'] == ['NOKIA', '3310']


def test_load_textvqa_rejects_test_split_and_missing_images(tmp_path):
    path = _write_textvqa(tmp_path)
    data = json.loads(path.read_text())
    del data['data'][0]['answers']
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match='lacks answers'):
        load_textvqa(path)
    path.write_text(json.dumps({'data': [{'question': 'q', 'image_id': 'nope', 'answers': ['a'] * 10}]}))
    with pytest.raises(DatasetError, match='no image named nope'):
        load_textvqa(path)
    path.write_text('{"data": 3}')
    with pytest.raises(DatasetError, match='"data" list'):
        load_textvqa(path)


def _write_tsv(path, rows):
    columns = ['index', 'question', 'hint', 'A', 'B', 'C', 'D', 'answer', 'category', 'l2-category', 'image']
    with path.open('w', newline='') as handle:
        writer = csv.DictWriter(handle, columns, delimiter='\t')
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def _tsv_row(index, answer='B', image=None, **extra):
    row = {'index': index, 'question': 'Which animal?', 'hint': '', 'A': 'dog', 'B': 'cat', 'C': 'bird', 'D': '',
           'answer': answer, 'category': 'animals', 'l2-category': 'perception',
           'image': image if image is not None else base64.b64encode(_png_bytes()).decode()}
    row.update(extra)
    return row


def test_load_mmbench_tsv_decodes_images_and_skips_empty_options(tmp_path):
    big = base64.b64encode(_png_bytes() + b'\0' * 200_000).decode()  # beyond csv's default field limit
    path = _write_tsv(tmp_path / 'mmbench_dev.tsv', [
        _tsv_row(7, image=big, hint='A zoo photo.'), _tsv_row(8, answer='C', image='7')])
    first, second = load_mmbench_tsv(path)
    assert first.options == {'A': 'dog', 'B': 'cat', 'C': 'bird'}
    assert first.hint == 'A zoo photo.' and second.hint is None
    assert first.metadata == {'l2-category': 'perception'}
    assert second.image_bytes is first.image_bytes              # '7' refers to row 7's image, decoded once
    assert second.load_image().size == (4, 3)


def test_load_mmbench_tsv_circular_copies_become_rotations(tmp_path):
    rows = [_tsv_row(1), _tsv_row(2), _tsv_row(1_000_001, answer='A', C='cat', A='bird', B='dog')]
    path = _write_tsv(tmp_path / 'mmbench.tsv', rows)
    vanilla = load_benchmark('mmbench', path)
    assert [i.id for i in vanilla] == ['1', '2']
    circular = load_benchmark('mmbench', path, circular=True)
    assert [(i.id, i.group, i.rotation) for i in circular] == [('1', '1', 0), ('1000001', '1', 1), ('2', '2', 0)]


def test_load_mmbench_tsv_rejects_bad_rows(tmp_path):
    with pytest.raises(DatasetError, match="answer 'E' is not one of the options"):
        load_mmbench_tsv(_write_tsv(tmp_path / 'a.tsv', [_tsv_row(1, answer='E')]))
    with pytest.raises(DatasetError, match='not valid base64'):
        load_mmbench_tsv(_write_tsv(tmp_path / 'b.tsv', [_tsv_row(1, image='@@@not base64')]))
    with pytest.raises(DatasetError, match='duplicate question id'):
        load_mmbench_tsv(_write_tsv(tmp_path / 'c.tsv', [_tsv_row(1), _tsv_row(1)]))
    with pytest.raises(DatasetError, match='missing row 99'):
        load_mmbench_tsv(_write_tsv(tmp_path / 'd.tsv', [_tsv_row(1, image='99')]))


def test_rotate_options_moves_the_answer_with_its_text():
    item = EvalItem(id='5', question='q', answers=('C',), options={'A': 'a', 'B': 'b', 'C': 'c', 'D': 'd'})
    shifted = rotate_options(item, 1)
    assert shifted.options == {'A': 'b', 'B': 'c', 'C': 'd', 'D': 'a'}
    assert shifted.answers == ('B',) and shifted.id == '5@1' and shifted.group == '5' and shifted.rotation == 1
    assert rotate_options(item, 4) == item
    rotations = expand_circular([item])
    assert [r.options[r.answers[0]] for r in rotations] == ['c'] * 4
    assert [r.answers[0] for r in rotations] == ['C', 'B', 'A', 'D']
    with pytest.raises(DatasetError, match='cannot be rotated'):
        rotate_options(EvalItem(id='x', question='q', answers=('yes',)), 1)


def test_load_jsonl_layout_with_groups(tmp_path):
    (tmp_path / 'img.png').write_bytes(_png_bytes())
    lines = [{'image': 'img.png', 'question': 'Is it red?', 'answers': ['yes'], 'category': 'color', 'group': 'g1'},
             {'id': 'q2', 'image': 'img.png', 'question': 'Is it blue?', 'answer': 'no', 'category': 'color',
              'group': 'g1'}]
    path = tmp_path / 'q.jsonl'
    path.write_text('\n'.join(json.dumps(line) for line in lines) + '\n\n')
    first, second = load_jsonl(path)
    assert (first.id, second.id) == ('1', 'q2')
    assert first.group == second.group == 'g1' and second.answers == ('no',)
    path.write_text('{"question": "x", "answers": "yes"}\n')
    with pytest.raises(DatasetError, match='non-empty list'):
        load_jsonl(path)
    path.write_text('{"question": "x", "answers": ["a"], "image": "missing.png"}\n')
    with pytest.raises(DatasetError, match='image not found'):
        load_jsonl(path)
    path.write_text('{not json\n')
    with pytest.raises(DatasetError, match='q.jsonl:1: not valid JSON'):
        load_jsonl(path)


def test_load_benchmark_checks_arguments(tmp_path):
    with pytest.raises(DatasetError, match='unknown benchmark'):
        load_benchmark('gqa', tmp_path)
    with pytest.raises(DatasetError, match='circular'):
        load_benchmark('mme', tmp_path, circular=True)
    with pytest.raises(DatasetError, match='not found'):
        load_benchmark('mme', tmp_path / 'nothing')


@pytest.mark.shared_data
def test_shared_mmbench_sample_jsonl(shared_data):
    items = load_benchmark('mmbench', shared_data / 'vqa' / 'questions.jsonl', circular=True)
    originals = [i for i in items if i.rotation == 0]
    assert len(originals) == 20
    first = originals[0]
    assert first.answers == ('D',) and list(first.options) == ['A', 'B', 'C', 'D']
    assert first.category == 'Logic Reasoning: Structuralized Imagetext Understanding'
    assert first.image_path.is_file() and first.load_image().size == (286, 237)
    # Every question yields one pass per option, each keeping the right answer text.
    assert len(items) == sum(len(i.options) for i in originals)
    texts = {i.id: i.options[i.answers[0]] for i in originals}
    assert all(i.options[i.answers[0]] == texts[i.group] for i in items)
