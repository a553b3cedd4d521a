"""generation.answer_mode choose_from_context: the model chooses its answer among its context's lines (core/llm/choice.py)."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from mm_llm_ros.core.answering import AskEngine, AskLimits, AskRequest, Generated
from mm_llm_ros.core.batch_engine import BatchedAskEngine
from mm_llm_ros.core.embedding_store import ModalityStore
from mm_llm_ros.core.llm.choice import CANNOT_TELL_ANSWER, answer_candidates, candidate_logprobs, choose_answer
from mm_llm_ros.core.llm.pipeline import LLMConfig, build_answerer

CONTEXT = 'Text read by the camera: \'POKKA\'.\nSomeone speaking: no.\nNearest obstacle in front: 3.7 m.'


def test_candidates_are_the_context_lines_once_each_then_cannot_tell():
    context = 'a: 1.\n\n  b: 2.  \na: 1.\n' + CANNOT_TELL_ANSWER
    assert answer_candidates(context) == ['a: 1.', 'b: 2.', CANNOT_TELL_ANSWER]


@pytest.fixture(scope='module')
def tiny():
    config = LLMConfig.from_params({'llm.preset': 'tiny', 'generation.temperature': 0.0, 'max_queue': 4,
                                    'generation.max_new_tokens': 8, 'generation.answer_mode': 'choose_from_context'})
    return build_answerer(config), config


def _reference_logprob(model, prompt_ids, row):
    """Sum of log-probabilities of `row` after the prompt, from one uncached forward over prompt + row."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([list(prompt_ids) + row]), use_cache=False).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[len(prompt_ids) + t - 1, token]) for t, token in enumerate(row))


def test_cached_batched_scores_equal_one_forward_per_candidate(tiny):
    answerer, _ = tiny
    prompt_ids = answerer.prompt.encode(answerer.tokenizer, 'How far is the obstacle in front?', CONTEXT)
    rows = [answerer.tokenizer.encode(text, bos=False, eos=True) for text in answer_candidates(CONTEXT)]
    assert len({len(row) for row in rows}) > 1   # right padding is exercised
    scores = candidate_logprobs(answerer.model.backbone, prompt_ids, rows)
    reference = [_reference_logprob(answerer.model.backbone, prompt_ids, row) for row in rows]
    assert scores == pytest.approx(reference, rel=1e-4, abs=1e-4)


def test_the_candidate_with_the_highest_score_is_chosen(tiny):
    answerer, _ = tiny
    model, tokenizer = answerer.model.backbone, answerer.tokenizer
    candidates = answer_candidates(CONTEXT)
    prompt = answerer.prompt.encode(tokenizer, 'Is someone speaking?', CONTEXT)
    neutral = answerer.prompt.encode(tokenizer, 'What do the sensor readings say?', CONTEXT)
    rows = [tokenizer.encode(text, bos=False, eos=True) for text in candidates]
    plain = choose_answer(model, tokenizer, prompt, candidates)
    assert plain.text == candidates[int(np.argmax(candidate_logprobs(model, prompt, rows)))]
    relative = choose_answer(model, tokenizer, prompt, candidates, neutral)
    expected = np.subtract(candidate_logprobs(model, prompt, rows), candidate_logprobs(model, neutral, rows))
    assert relative.scores == pytest.approx(tuple(expected), rel=1e-4, abs=1e-4)
    assert relative.text == candidates[int(np.argmax(expected))] and CANNOT_TELL_ANSWER in candidates


def test_choosing_is_cancellable_and_needs_candidates(tiny):
    answerer, _ = tiny
    prompt = answerer.prompt.encode(answerer.tokenizer, 'q', CONTEXT)
    assert choose_answer(answerer.model.backbone, answerer.tokenizer, prompt, ['a.'], should_stop=lambda: True) is None
    with pytest.raises(ValueError):
        choose_answer(answerer.model.backbone, answerer.tokenizer, prompt, [])


def test_a_chosen_answer_is_streamed_as_one_piece(tiny):
    answerer, _ = tiny
    pieces = []
    generated = answerer.answer('How far is the obstacle in front?', [], 8, pieces.append, lambda: False,
                                context=CONTEXT, choose=True)
    assert generated.stopped_reason == 'chosen' and generated.text in answer_candidates(CONTEXT)
    assert pieces == [generated.text] and generated.n_tokens > 0
    cancelled = answerer.answer('q', [], 8, pieces.append, lambda: True, context=CONTEXT, choose=True)
    assert cancelled.stopped_reason == 'cancelled' and cancelled.text == '' and len(pieces) == 1
    with pytest.raises(ValueError, match='needs a context'):
        answerer.answer('q', [], 8, pieces.append, lambda: False, context=None, choose=True)


def test_a_bad_answer_mode_is_refused(tiny):
    _, config = tiny
    with pytest.raises(Exception, match='answer_mode'):
        build_answerer(replace(config, answer_mode='guess'))


class RecordingAnswerer:
    """Records whether AskEngine asked for a chosen answer."""
    sensors_inform_answers = False
    answer_mode = 'choose_from_context'

    def __init__(self):
        self.chose = []

    def answer(self, question, embeddings, max_new_tokens, on_text, should_stop, context=None, choose=False):
        self.chose.append(choose)
        on_text('x')
        return Generated('x', 1, 0.01, 100.0, 'chosen' if choose else 'eos')


@pytest.mark.parametrize('mode, expected', [('choose_from_context', True), ('free', False)])
def test_only_a_users_question_with_context_is_answered_by_choice(mode, expected):
    answerer = RecordingAnswerer()
    answerer.answer_mode = mode
    store = ModalityStore()
    engine = AskEngine(answerer, store, AskLimits(('vision', 'ocr'), max_queue=2, default_max_new_tokens=8))
    engine.start()
    try:
        engine.submit(AskRequest('q')).wait(5)          # nothing perceived: the model is told so, and generates
        store.update('vision', np.ones(4), stamp_ns=1)
        engine.submit(AskRequest('q')).wait(5)          # embeddings only: no context lines to choose from
        store.update('ocr', "Text read by the camera: 'POKKA'.", stamp_ns=2)
        engine.submit(AskRequest('q'), background=True).wait(5)   # a scene description stays free
        assert engine.submit(AskRequest('q')).wait(5).success
    finally:
        engine.stop()
    assert answerer.chose == [False, False, False, expected]


def test_the_batched_engine_answers_by_choice_at_once(tiny):
    _, config = tiny
    answerer = build_answerer(replace(config, max_batch=2))
    store = ModalityStore()
    engine = BatchedAskEngine(answerer, store, AskLimits(('ocr', 'geometry'), max_queue=4, default_max_new_tokens=8),
                              line_template='{text}')
    store.update('ocr', "Text read by the camera: 'POKKA'.", stamp_ns=1)
    store.update('geometry', 'Nearest obstacle in front: 3.7 m.', stamp_ns=2)
    engine.start()
    try:
        pieces = []
        result = engine.submit(AskRequest('What text can you read?'), on_text=pieces.append).wait(10)
    finally:
        engine.stop()
    assert result.success and result.answer in ("Text read by the camera: 'POKKA'.",
                                                 'Nearest obstacle in front: 3.7 m.', CANNOT_TELL_ANSWER)
    assert pieces == [result.answer] and not math.isnan(result.time_to_first_token_s)
