"""Hand-worked cases for the benchmark metrics; every expected value follows the official evaluation code."""
import pytest

from mm_llm_ros.core.evaluation import (EvalItem, MetricError, expand_circular, extract_choice, mmbench_score,
                                        mme_score, normalize_vqa_answer, parse_yes_no, score_benchmark,
                                        textvqa_score, vqa_accuracy)
from mm_llm_ros.core.evaluation.metrics import vqa_process_digit_article, vqa_process_punctuation

# --------------------------------------------------------------------------------------------------- MME


@pytest.mark.parametrize('answer, expected', [
    ('yes', 'yes'), ('no', 'no'), ('Yes', 'yes'), ('NO', 'no'),
    ('Yes, there is a dog.', 'yes'), ('No.', 'no'), ('yes\n', 'yes'),
    (' yes', 'yes'),            # ' yes' is still within the first four characters
    ('  yes', 'other'),         # ...but two leading spaces push it out: the official tool does not strip
    ('I think yes', 'other'),   # yes/no must appear in the first four characters
    ('not sure', 'no'),         # 'no' inside 'not ' counts as no
    ('nope', 'no'),
    ('yesno', 'yes'),           # yes is looked for before no
    ('noyes', 'no'),            # first four characters 'noye' hold no 'yes'
    ('', 'other'), ('maybe', 'other'),
    ('a\tyes', 'other'),        # a tab becomes a space, it does not split the answer
])
def test_parse_yes_no_follows_official_prefix_rule(answer, expected):
    assert parse_yes_no(answer) == expected


def _mme_items(subtask, truths):
    """Items of one subtask: `truths` lists (yes/no, yes/no) per image."""
    return [EvalItem(id=f'{subtask}/{i}#{k}', question=f'q{k}', answers=(gt,), category=subtask,
                     group=f'{subtask}/{i}')
            for i, pair in enumerate(truths) for k, gt in enumerate(pair)]


def test_mme_subtask_score_is_acc_plus_acc_plus_in_percent():
    items = _mme_items('existence', [('yes', 'no'), ('yes', 'no')])
    # Image 0 fully right; image 1 one right -> acc 3/4, acc+ 1/2 -> score 75 + 50.
    predictions = {items[0].id: 'Yes', items[1].id: 'No', items[2].id: 'Yes', items[3].id: 'Yes'}
    result = mme_score(items, predictions)
    row = result.categories['existence']
    assert row['acc'] == pytest.approx(75.0)
    assert row['acc_plus'] == pytest.approx(50.0)
    assert row['score'] == pytest.approx(125.0)
    assert result.summary == pytest.approx({'perception': 125.0, 'cognition': 0.0, 'total': 125.0})


def test_mme_perception_and_cognition_sum_their_own_subtasks_and_other_is_wrong():
    items = (_mme_items('OCR', [('yes', 'no')]) + _mme_items('count', [('no', 'yes')])
             + _mme_items('code_reasoning', [('yes', 'no')]))
    predictions = {item.id: 'Yes' for item in items}
    predictions[items[0].id] = 'The text says hello'  # 'other': wrong, counted
    result = mme_score(items, predictions)
    # OCR: 0/2 right -> 0; count: 1/2, no pair -> 50; code_reasoning: 1/2 -> 50.
    assert result.categories['OCR']['score'] == 0.0
    assert result.categories['OCR']['other'] == 1
    assert result.summary['perception'] == pytest.approx(50.0)
    assert result.summary['cognition'] == pytest.approx(50.0)
    assert result.counts['other'] == 1
    # Official order: perception subtasks first (count before OCR), then cognition.
    assert list(result.categories) == ['count', 'OCR', 'code_reasoning']


def test_mme_always_yes_scores_fifty_per_subtask():
    items = _mme_items('color', [('yes', 'no')] * 3)
    result = mme_score(items, {item.id: 'yes' for item in items})
    assert result.categories['color']['score'] == pytest.approx(50.0)


def test_mme_rejects_unpaired_images_bad_truth_and_missing_predictions():
    single = _mme_items('scene', [('yes', 'no')])[:1]
    with pytest.raises(MetricError, match='exactly 2'):
        mme_score(single, {single[0].id: 'yes'})
    bad = [EvalItem(id='x', question='q', answers=('maybe',), category='scene')]
    with pytest.raises(MetricError, match='yes or no'):
        mme_score(bad, {'x': 'yes'})
    items = _mme_items('scene', [('yes', 'no')])
    with pytest.raises(MetricError, match='no prediction'):
        mme_score(items, {items[0].id: 'yes'})


# --------------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize('text, expected', [
    ('coca-cola', 'coca cola'),           # mark not touching a space -> space
    ('hello - world', 'hello  world'),    # ' -' / '- ' present -> deleted
    ('x-y -z', 'xy z'),                   # the space test is on the whole text: both '-' deleted
    ('1,000', '1000'),                    # digit,digit -> every mark deleted
    ('a-b 1,2', 'ab 12'),                 # ...including marks far from the number
    ('red, blue', 'red blue'),            # ', ' -> deleted
    ('yes!', 'yes '),
    ("it's 5:30 #1 & 50%", "it's 5:30 #1 & 50%"),  # ' : # & % are not in the official list
    ('end.', 'end'),                      # period not followed by a digit is removed
    ('3.14', '3.14'),                     # period before a digit is kept
    ('5.', '5'), ('u.s.a', 'usa'), ('.5', '.5'),
])
def test_vqa_punctuation_rules(text, expected):
    assert vqa_process_punctuation(text) == expected


def test_vqa_period_removal_stops_after_32_like_the_official_call():
    # The official code passes re.UNICODE (32) as `count`.
    assert vqa_process_punctuation('a.' * 33) == 'a' * 32 + 'a.'


@pytest.mark.parametrize('text, expected', [
    ('The Cat', 'cat'), ('a an the', ''), ('an apple', 'apple'),
    ('Two', '2'), ('none', '0'), ('zero', '0'), ('ten dogs', '10 dogs'), ('eleven', 'eleven'),
    ('dont', "don't"), ('isnt', "isn't"), ('the dont', "don't"),
    ('im', 'im'),                         # the map's key is 'Im', unreachable after lowercasing
    ("somebody'd", 'somebodyd'),          # official map entry kept as is
    ('  many   spaces ', 'many spaces'),
])
def test_vqa_digit_article_rules(text, expected):
    assert vqa_process_digit_article(text) == expected


def test_normalize_vqa_answer_chains_whitespace_punctuation_and_words():
    assert normalize_vqa_answer('\tThe  Coca-Cola.\n') == 'coca cola'
    assert normalize_vqa_answer("Man's hat, two", protocol='evalai') == "man 's hat 2"
    with pytest.raises(MetricError, match='protocol'):
        normalize_vqa_answer('x', protocol='other')


@pytest.mark.parametrize('matches, expected', [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_is_leave_one_out_min_count_over_three(matches, expected):
    answers = ['sign'] * matches + [f'other{i}' for i in range(10 - matches)]
    assert vqa_accuracy('sign', answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_only_when_humans_disagree():
    unanimous = ['yes'] * 10
    assert vqa_accuracy('yes', unanimous) == 1.0
    assert vqa_accuracy(' yes\n', unanimous) == 1.0          # whitespace is always cleaned
    assert vqa_accuracy('Yes', unanimous) == 0.0             # case-sensitive exact match (official quirk)
    assert vqa_accuracy('Yes', unanimous, protocol='evalai') == 1.0
    mixed = ['yes'] * 9 + ['no']
    assert vqa_accuracy('Yes.', mixed) == 1.0                # normalised both sides


def test_vqa_accuracy_matches_normalised_forms():
    answers = ['Coca-Cola'] * 2 + ['coca cola'] * 2 + ['pepsi'] * 6
    assert vqa_accuracy('coca-cola', answers) == 1.0         # 4 humans after normalisation
    assert vqa_accuracy('two', ['2', '2', 'two', '3'] + ['x'] * 6) == pytest.approx(0.9)  # 3 humans
    assert vqa_accuracy('the stop sign', ['stop sign', 'stop'] * 5) == 1.0


def test_textvqa_score_is_mean_accuracy_in_percent():
    items = [EvalItem(id='1', question='q', answers=('a1',) * 10), EvalItem(id='2', question='q',
                                                                             answers=('b',) * 3 + ('c',) * 7)]
    result = textvqa_score(items, {'1': 'a1', '2': 'b'})
    assert result.summary['accuracy'] == pytest.approx(100 * (1.0 + 0.9) / 2)
    assert result.categories == {}
    with pytest.raises(MetricError, match='at least one'):
        vqa_accuracy('x', [])


def test_textvqa_scores_as_published_by_default_and_keeps_the_vqa_rules_behind_the_flag():
    # Ten unanimous humans: the TextVQA authors' evaluator normalises 'Yes.' to 'yes', vqaEval.py compares exactly.
    items = [EvalItem(id='1', question='q', answers=('yes',) * 10)]
    assert textvqa_score(items, {'1': 'Yes.'}).summary['accuracy'] == 100.0
    assert score_benchmark('textvqa', items, {'1': 'Yes.'}).summary['accuracy'] == 100.0
    assert textvqa_score(items, {'1': 'Yes.'}, protocol='vqa').summary['accuracy'] == 0.0


# --------------------------------------------------------------------------------------------------- MMBench

OPTIONS = {'A': 'dog', 'B': 'cat', 'C': 'bird', 'D': 'fish'}


@pytest.mark.parametrize('prediction, expected', [
    ('B', 'B'), ('(B)', 'B'), ('B.', 'B'), ('B. cat', 'B'), ('B) cat', 'B'), ('[C]', 'C'), ('**D**', 'D'),
    ('The answer is B.', 'B'), ('Answer: (C) bird', 'C'), ('B:', 'B'),
    ('b', None),                        # letters are case-sensitive...
    ('I see a cat', 'B'),               # ...but the option text rule finds 'cat'
    ('A cat sits there', 'A'),          # official quirk: the article 'A' is read as option A
    ('B or C', None),                   # two letters: ambiguous
    ('a cat and a dog', None),          # two option texts: ambiguous
    ('CAT', 'B'),                       # text rule is case-insensitive
    ('Z', 'Z'),                         # lone Z means "none of them"
    ('Cannot determine the answer', 'Z'),
    ('It is a horse', None),
    ('', None),
])
def test_extract_choice_follows_vlmevalkit_rules(prediction, expected):
    assert extract_choice(prediction, OPTIONS) == expected


def test_extract_choice_only_considers_existing_options():
    assert extract_choice('E', {'A': 'x', 'B': 'y'}) is None
    assert extract_choice('The answer is E, not A', OPTIONS | {'E': 'cow'}) is None


def _mc(item_id, answer, category='cat1', options=None):
    return EvalItem(id=item_id, question='q', answers=(answer,), category=category, options=options or OPTIONS)


def test_mmbench_vanilla_accuracy_and_unmatched_count():
    items = [_mc('1', 'A'), _mc('2', 'B'), _mc('3', 'C', category='cat2')]
    result = mmbench_score(items, {'1': 'A', '2': 'I do not know', '3': 'C) bird'})
    assert result.summary == pytest.approx({'accuracy': 200 / 3})
    assert result.headline == 'accuracy'
    assert result.counts == {'questions': 3, 'passes': 3, 'unmatched': 1, 'refused': 0}
    assert result.categories['cat1']['accuracy'] == pytest.approx(50.0)
    assert result.categories['cat2']['accuracy'] == pytest.approx(100.0)


def test_mmbench_circular_needs_every_rotation_right():
    items = expand_circular([_mc('1', 'C'), _mc('2', 'A')])
    # Question 1: the answer text 'bird' is named in every rotation -> right; question 2: always 'A' -> right only
    # in rotation 0 (its answer moves to D, C, B).
    predictions = {item.id: ('bird' if item.group == '1' else 'A') for item in items}
    result = mmbench_score(items, predictions)
    assert result.summary['accuracy'] == pytest.approx(100.0)
    assert result.summary['circular_accuracy'] == pytest.approx(50.0)
    assert result.headline == 'circular_accuracy'
    assert result.counts['passes'] == 8 and result.counts['questions'] == 2


def test_mmbench_requires_one_unrotated_item_per_question():
    items = expand_circular([_mc('1', 'C')])[1:]
    with pytest.raises(MetricError, match='unrotated'):
        mmbench_score(items, {item.id: 'C' for item in items})


def test_score_benchmark_dispatches_and_rejects_unknown_names():
    items = [_mc('1', 'A')]
    assert score_benchmark('mmbench', items, {'1': 'A'}).summary['accuracy'] == 100.0
    with pytest.raises(MetricError, match='unknown benchmark'):
        score_benchmark('gqa', items, {'1': 'A'})
