"""Benchmark metrics, reimplemented to match the official evaluation code rule for rule.

Sources (read, not copied):
* MME: `eval_tool/calculation.py` of the MME release (BradyFU/Awesome-Multimodal-Large-Language-Models, branch
  Evaluation, `tools/eval_tool.zip`).
* VQA accuracy: `PythonEvaluationTools/vqaEvaluation/vqaEval.py` of GT-Vision-Lab/VQA (protocol 'vqa'), and the
  EvalAI answer processor + `TextVQAAccuracyEvaluator` of the TextVQA authors' M4C code as shipped in
  `llava/eval/m4c_evaluator.py` (protocol 'evalai', used for the TextVQA numbers of LLaVA-style papers).
* MMBench: `can_infer_option` / `can_infer_text` (`vlmeval/utils/matching_util.py`) and the circular evaluation of
  `vlmeval/evaluate/multiple_choice.py` in open-compass/VLMEvalKit (rules as of 2023-12 .. 2025-07, commit
  c6bdffd3), in 'exact_matching' mode: no LLM judge, so an unmatched answer is wrong.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from .datasets import MME_COGNITION, MME_PERCEPTION, EvalItem

logger = logging.getLogger(__name__)

VqaProtocol = Literal['vqa', 'evalai']
VQA_PROTOCOLS: tuple[VqaProtocol, ...] = ('vqa', 'evalai')


class MetricError(ValueError):
    """Predictions or ground truth that a metric cannot score."""


@dataclass(frozen=True)
class ItemScore:
    """How one prediction was read (`parsed`: yes/no/other, normalised answer, option letter or None) and scored."""

    item_id: str
    category: str
    prediction: str
    parsed: str | None
    score: float


@dataclass
class BenchmarkScore:
    """Scores of one configuration on one benchmark.

    `summary` holds the headline numbers (MME: perception/cognition/total; others: accuracy in percent),
    `categories` the per-subtask metrics, whose `headline` key is what tables and charts show.
    """

    benchmark: str
    headline: str
    summary: dict[str, float]
    categories: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    items: list[ItemScore] = field(default_factory=list)

    def to_dict(self, *, with_items: bool = False) -> dict:
        data = asdict(self)
        if not with_items:
            data.pop('items')
        return data


def score_benchmark(benchmark: str, items: Sequence[EvalItem], predictions: Mapping[str, str], *,
                    vqa_protocol: VqaProtocol = 'evalai') -> BenchmarkScore:
    """Score `predictions` (item id -> raw model text) with the official metric of `benchmark`."""
    if benchmark == 'mme':
        return mme_score(items, predictions)
    if benchmark == 'textvqa':
        return textvqa_score(items, predictions, protocol=vqa_protocol)
    if benchmark == 'mmbench':
        return mmbench_score(items, predictions)
    if benchmark == 'grounded':
        from .grounded import grounded_score   # grounded.py builds on this module's score types
        return grounded_score(items, predictions)
    raise MetricError(f"unknown benchmark '{benchmark}'")


def _prediction(item: EvalItem, predictions: Mapping[str, str]) -> str:
    try:
        return predictions[item.id]
    except KeyError:
        raise MetricError(f'no prediction for item {item.id}') from None


# --------------------------------------------------------------------------------------------------- MME


def parse_yes_no(answer: str) -> Literal['yes', 'no', 'other']:
    """MME's answer parsing (calculation.py `parse_pred_ans`).

    Lowercase; an exact 'yes'/'no' wins, else look for 'yes' and then 'no' *anywhere in the first four characters*
    (so 'Yes, ...' is yes, 'not sure' is no, 'I think yes' and '  yes' are other). Text is not stripped: the
    official tool reads it from a tab-separated file, so tabs and newlines become spaces here.
    """
    text = answer.replace('\t', ' ').replace('\n', ' ').lower()
    if text in ('yes', 'no'):
        return text  # type: ignore[return-value]
    prefix = text[:4]
    if 'yes' in prefix:
        return 'yes'
    if 'no' in prefix:
        return 'no'
    return 'other'


def mme_score(items: Sequence[EvalItem], predictions: Mapping[str, str]) -> BenchmarkScore:
    """MME per subtask: acc (questions right), acc+ (images with both questions right), score = 100 * (acc + acc+).

    Perception is the sum of the 10 perception subtask scores (max 2000), cognition the sum of the 4 cognition
    ones (max 800); 'other' answers count as wrong. Each image must have exactly two questions, as in the
    official tool; the subtasks present are scored (totals only cover those).
    """
    by_subtask: dict[str, dict[str, list[tuple[EvalItem, str]]]] = defaultdict(lambda: defaultdict(list))
    scored = []
    for item in items:
        gt = item.answers[0].lower() if item.answers else ''
        if gt not in ('yes', 'no'):
            raise MetricError(f'MME item {item.id}: ground truth must be yes or no, got {item.answers!r}')
        parsed = parse_yes_no(_prediction(item, predictions))
        by_subtask[item.category][item.group].append((item, parsed))
        scored.append(ItemScore(item.id, item.category, predictions[item.id], parsed, float(parsed == gt)))

    categories = {}
    for subtask, images in by_subtask.items():
        n_right = n_images_right = n_other = 0
        for group, pairs in images.items():
            if len(pairs) != 2:
                raise MetricError(f'MME image {group} has {len(pairs)} question(s); MME pairs exactly 2 per image')
            right = sum(parsed == item.answers[0].lower() for item, parsed in pairs)
            n_right += right
            n_images_right += right == 2
            n_other += sum(parsed == 'other' for _, parsed in pairs)
        n_questions = 2 * len(images)
        acc, acc_plus = n_right / n_questions, n_images_right / len(images)
        categories[subtask] = {'score': 100 * (acc + acc_plus), 'acc': 100 * acc, 'acc_plus': 100 * acc_plus,
                               'questions': n_questions, 'other': n_other}

    unknown = sorted(set(categories) - set(MME_PERCEPTION) - set(MME_COGNITION))
    if unknown:
        logger.warning('MME subtasks outside the official 14 are not summed into perception/cognition: %s',
                       ', '.join(unknown))
    perception = sum(categories[s]['score'] for s in MME_PERCEPTION if s in categories)
    cognition = sum(categories[s]['score'] for s in MME_COGNITION if s in categories)
    order = [s for s in MME_PERCEPTION + MME_COGNITION if s in categories] + unknown
    return BenchmarkScore(
        benchmark='mme', headline='score',
        summary={'perception': perception, 'cognition': cognition, 'total': perception + cognition},
        categories={s: categories[s] for s in order},
        counts={'questions': len(scored), 'other': sum(s.parsed == 'other' for s in scored),
                'subtasks': len(categories)},
        items=scored)


# --------------------------------------------------------------------------------------------------- VQA

# vqaEval.py's punctuation list; note that ' : # $ % & * ^ | ~ are NOT in it and survive normalisation.
_VQA_PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
                    '?', '!')
# A comma between two digits anywhere in the text switches every punctuation mark to "delete" instead of "space".
_DIGIT_COMMA_DIGIT = re.compile(r'\d,\d')
# Official pattern is '(?!<=\d)(\.)(?!\d)': its first group is a lookahead for the literal '<=' + digit, which can
# never match at a '.', so in effect a period is removed unless a digit follows it ('3.5' keeps it, '5.' loses it).
_PERIOD = re.compile(r'\.(?!\d)')
# The official call passes re.UNICODE (== 32) as `count`, so at most 32 periods are removed.
_PERIOD_MAX_REMOVALS = 32
_VQA_ARTICLES = frozenset({'a', 'an', 'the'})
_VQA_NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                     'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
# vqaEval.py's contraction map, complete and unchanged. Its quirks are kept on purpose: keys starting with a
# capital 'I' never match (text is lowercased first), and "somebody'd" maps to "somebodyd".
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def vqa_process_punctuation(text: str) -> str:
    """vqaEval.py `processPunctuation`.

    Each listed mark is deleted if it touches a space anywhere in the *original* text (`'p '` or `' p'`), or if
    the text contains digit-comma-digit (then *every* mark is deleted: '1,000' -> '1000'); otherwise it becomes a
    space ('coca-cola' -> 'coca cola'). Then periods not followed by a digit are removed (at most 32).
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        touches_space = f'{mark} ' in text or f' {mark}' in text
        out = out.replace(mark, '' if delete_all or touches_space else ' ')
    return _PERIOD.sub('', out, count=_PERIOD_MAX_REMOVALS)


def vqa_process_digit_article(text: str) -> str:
    """vqaEval.py `processDigitArticle`: lowercase, split on whitespace, number words -> digits ('none' -> '0'),
    drop articles, then expand contractions word by word ('dont' -> "don't"), rejoin with single spaces."""
    words = [_VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return ' '.join(_VQA_CONTRACTIONS.get(word, word) for word in words if word not in _VQA_ARTICLES)


def _clean_whitespace(text: str) -> str:
    return text.replace('\n', ' ').replace('\t', ' ').strip()


def _evalai_tokenize(text: str) -> str:
    # EvalAIAnswerProcessor.word_tokenize: runs before the shared steps in the 'evalai' protocol.
    return text.lower().replace(',', '').replace('?', '').replace("'s", " 's").strip()


def normalize_vqa_answer(text: str, protocol: VqaProtocol = 'vqa') -> str:
    """Full answer normalisation of `protocol`: whitespace, punctuation, digits/articles/contractions.

    'evalai' first lowercases, deletes ',' and '?' and splits "'s" off ("man's" -> "man 's").
    """
    if protocol == 'evalai':
        text = _evalai_tokenize(text)
    elif protocol != 'vqa':
        raise MetricError(f"unknown VQA protocol '{protocol}', expected one of {', '.join(VQA_PROTOCOLS)}")
    return vqa_process_digit_article(vqa_process_punctuation(_clean_whitespace(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str], protocol: VqaProtocol = 'vqa') -> float:
    """VQA accuracy in [0, 1]: mean over the leave-one-out subsets of the human answers of min(#matches / 3, 1).

    With 10 answers an answer given by k humans scores 0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, >= 4. Leave-one-out
    is by position (two identical answers are two humans).
    Protocol 'vqa' (vqaEval.py) only strips tabs/newlines/outer spaces and normalises prediction and answers *only
    when the humans disagree*; with unanimous answers the comparison is exact and case-sensitive ('Yes' vs 'yes'
    scores 0). Protocol 'evalai' (TextVQA's M4C evaluator) always normalises both sides.
    """
    if not answers:
        raise MetricError('VQA accuracy needs at least one human answer')
    if protocol == 'evalai':
        truth = [normalize_vqa_answer(a, protocol) for a in answers]
        guess = normalize_vqa_answer(prediction, protocol)
    else:
        truth = [_clean_whitespace(a) for a in answers]
        guess = _clean_whitespace(prediction)
        if len(set(truth)) > 1:
            truth = [normalize_vqa_answer(a, protocol) for a in truth]
            guess = normalize_vqa_answer(guess, protocol)
    matches = sum(answer == guess for answer in truth)
    # Leaving out a matching answer leaves matches - 1 matches, any other leaves all of them.
    subset_scores = [min(1.0, (matches - (answer == guess)) / 3) for answer in truth]
    return sum(subset_scores) / len(subset_scores)


def textvqa_score(items: Sequence[EvalItem], predictions: Mapping[str, str], *,
                  protocol: VqaProtocol = 'evalai') -> BenchmarkScore:
    """TextVQA accuracy (percent) = mean VQA accuracy; per-category accuracy when the items carry categories.

    The default protocol is the TextVQA authors' evaluator ('evalai'), the one behind published TextVQA numbers
    (LLaVA's `m4c_evaluator.py`); 'vqa' (VQAv2's vqaEval.py rules) stays available for comparison."""
    scored = []
    for item in items:
        prediction = _prediction(item, predictions)
        scored.append(ItemScore(item.id, item.category, prediction, normalize_vqa_answer(prediction, protocol),
                                vqa_accuracy(prediction, item.answers, protocol)))
    if not scored:
        raise MetricError('no items to score')
    categories = {name: {'accuracy': 100 * _mean(s.score for s in group), 'questions': len(group)}
                  for name, group in _by_category(scored).items() if name}
    return BenchmarkScore(benchmark='textvqa', headline='accuracy',
                          summary={'accuracy': 100 * _mean(s.score for s in scored)}, categories=categories,
                          counts={'questions': len(scored)}, items=scored)


# --------------------------------------------------------------------------------------------------- MMBench

# Marks that can_infer_option turns into spaces before looking for a lone option letter.
_OPTION_SEPARATORS = '.()[],:;!*#{}'
# can_infer_option answers 'Z' (a refusal, never correct) for these canned phrases.
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", 'Cannot determine the answer')
REFUSED = 'Z'


def extract_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """MMBench/VLMEvalKit rule-based answer extraction (`can_infer` = option rule, then text rule).

    Option rule: refusal phrases give 'Z'. Replace each of `.()[],:;!*#{}` with a space and split on whitespace;
    if exactly one option letter (case-sensitive) is a whole token it is the answer ('B', '(B)', 'B.', 'Answer: B',
    '**B**'); with no letter but a lone 'Z' token the answer is 'Z'. Known quirk: the article 'A' counts as a letter
    ('A cat' -> 'A').
    Text rule: if exactly one option's text (lowercased) is a substring of the lowercased prediction, that option.
    Returns the letter, 'Z' for a refusal, or None when nothing matches (scored wrong; no LLM judge is used).
    """
    letter = _infer_option_letter(str(prediction), options)
    return letter if letter is not None else _infer_option_text(str(prediction), options)


def _infer_option_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    # VLMEvalKit's marker for a failed API call is never read as a letter.
    if 'Failed to obtain answer via API' in prediction:
        return None
    if any(phrase in prediction for phrase in _REFUSALS):
        return REFUSED
    tokens = set(prediction.translate(str.maketrans(_OPTION_SEPARATORS, ' ' * len(_OPTION_SEPARATORS))).split())
    letters = [letter for letter in options if letter in tokens]
    if len(letters) == 1:
        return letters[0]
    if not letters and REFUSED in tokens:
        return REFUSED
    return None


def _infer_option_text(prediction: str, options: Mapping[str, str]) -> str | None:
    text = prediction.lower()
    matches = [letter for letter, option in options.items() if str(option).lower() in text]
    return matches[0] if len(matches) == 1 else None


def mmbench_score(items: Sequence[EvalItem], predictions: Mapping[str, str]) -> BenchmarkScore:
    """MMBench accuracy (percent) with rule-based extraction; circular accuracy when rotations are present.

    `accuracy` is vanilla: over the unrotated questions only (VLMEvalKit's 'circ0'). With rotations, a question
    counts for `circular_accuracy` only if every rotation is answered correctly (CircularEval). Counts report
    predictions with no extractable option (`unmatched`) and refusals (`refused`).
    """
    pairs = []
    for item in items:
        prediction = _prediction(item, predictions)
        choice = extract_choice(prediction, item.options)
        pairs.append((item, ItemScore(item.id, item.category, prediction, choice, float(choice == item.answers[0]))))
    if not pairs:
        raise MetricError('no items to score')
    groups: dict[str, list[tuple[EvalItem, ItemScore]]] = defaultdict(list)
    for item, score in pairs:
        groups[item.group].append((item, score))
    vanilla = [score for item, score in pairs if item.rotation == 0]
    if len(vanilla) != len(groups):
        raise MetricError('every MMBench question (group) needs exactly one unrotated item (rotation 0)')
    circular = len(pairs) > len(groups)
    # question -> (category, every rotation right)
    hits = {group: (members[0][0].category, all(s.score == 1.0 for _, s in members))
            for group, members in groups.items()}

    summary = {'accuracy': 100 * _mean(s.score for s in vanilla)}
    if circular:
        summary['circular_accuracy'] = 100 * _mean(hit for _, hit in hits.values())
    categories = {}
    for name, members in _by_category(vanilla).items():
        if not name:
            continue
        row = {'accuracy': 100 * _mean(s.score for s in members), 'questions': len(members)}
        if circular:
            row['circular_accuracy'] = 100 * _mean(hit for category, hit in hits.values() if category == name)
        categories[name] = row
    scored = [score for _, score in pairs]
    return BenchmarkScore(
        benchmark='mmbench', headline='circular_accuracy' if circular else 'accuracy', summary=summary,
        categories=categories,
        counts={'questions': len(groups), 'passes': len(scored),
                'unmatched': sum(s.parsed is None for s in scored),
                'refused': sum(s.parsed == REFUSED for s in scored)},
        items=scored)


# --------------------------------------------------------------------------------------------------- helpers


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _by_category(scores: Iterable[ItemScore]) -> dict[str, list[ItemScore]]:
    grouped: dict[str, list[ItemScore]] = defaultdict(list)
    for score in scores:
        grouped[score.category].append(score)
    return dict(sorted(grouped.items()))

