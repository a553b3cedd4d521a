"""AskEngine: validation, defaults, bounded queue, order, cancellation, failures and provenance."""
import math
import threading

import numpy as np
import pytest

from mm_llm_ros.core.answering import BUSY, NOTHING_PERCEIVED, AskEngine, AskLimits, AskRequest, Generated
from mm_llm_ros.core.embedding_store import ModalityStore

MODALITIES = ('vision', 'audio', 'depth', 'point', 'ocr', 'geometry')


class ScriptedAnswerer:
    """Answers with the question reversed, one character per token; can block or raise on demand."""

    def __init__(self, sensors_inform_answers=True):
        self.sensors_inform_answers = sensors_inform_answers
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Semaphore(0)
        self.fail_next = None
        self.calls = []
        self.contexts = []

    def answer(self, question, embeddings, max_new_tokens, on_text, should_stop, context=None):
        self.calls.append((question, [e.modality for e in embeddings], max_new_tokens))
        self.contexts.append(context)
        self.started.release()
        assert self.gate.wait(10)
        if self.fail_next:
            exc, self.fail_next = self.fail_next, None
            raise exc
        text = ''
        for ch in question[::-1][:max_new_tokens]:
            if should_stop():
                return Generated(text, len(text), 0.01, 100.0, 'cancelled')
            text += ch
            on_text(ch)
        return Generated(text, len(text), 0.01, 100.0, 'eos')


@pytest.fixture
def clock():
    now = [1000.0]
    return now


@pytest.fixture
def engine(clock):
    store = ModalityStore(clock=lambda: clock[0])
    answerer = ScriptedAnswerer()
    eng = AskEngine(answerer, store, AskLimits(MODALITIES, max_queue=2, max_question_chars=50,
                                                default_max_age_s=5.0, default_max_new_tokens=8,
                                                max_new_tokens_cap=16))
    eng.start()
    yield eng
    answerer.gate.set()
    eng.stop()


@pytest.mark.parametrize('question, reason', [
    ('', 'question is empty'),
    ('   \n\t ', 'question is empty'),
    ('x' * 51, 'question too long'),
    ('what\x00is this', 'control or binary'),
    ('bad \udcff surrogate', 'control or binary'),
    (b'bytes', 'must be a string'),
])
def test_bad_questions_are_refused_with_a_reason(engine, question, reason):
    result = engine.submit(AskRequest(question)).wait(5)
    assert not result.success and reason in result.error
    assert engine.counts['invalid'] == 1 and engine.answerer.calls == []


@pytest.mark.parametrize('max_age', [-1.0, math.nan])
def test_bad_max_age_is_refused(engine, max_age):
    result = engine.submit(AskRequest('hi', max_age_s=max_age)).wait(5)
    assert not result.success and 'max_age_s' in result.error


def test_unknown_modality_is_refused(engine):
    result = engine.submit(AskRequest('hi', modalities=['vision', 'smell'])).wait(5)
    assert not result.success and "unknown modality 'smell'" in result.error


def test_token_counts_default_and_are_capped(engine):
    engine.submit(AskRequest('abcdefghijklmnopqrstuvwxyz')).wait(5)
    engine.submit(AskRequest('abcdefghijklmnopqrstuvwxyz', max_new_tokens=2**32 - 1)).wait(5)
    assert [c[2] for c in engine.answerer.calls] == [8, 16]


def test_text_only_answer_says_so(engine):
    result = engine.submit(AskRequest('hello')).wait(5)
    assert result.success and result.answer == 'olleh'
    assert result.modalities_used == [] and 'text alone' in result.note


def test_a_question_before_anything_was_perceived_says_so_and_the_model_is_told(engine, clock):
    result = engine.submit(AskRequest('What text can you read?')).wait(5)
    assert 'nothing perceived' in result.note and 'perception context' in result.note
    assert engine.answerer.contexts[-1] == NOTHING_PERCEIVED
    engine.store.update('ocr', "'POKKA' (0.98, left)", stamp_ns=1)
    result = engine.submit(AskRequest('What text can you read?')).wait(5)
    assert result.note == '' and 'POKKA' in engine.answerer.contexts[-1]
    clock[0] += 60.0  # the context goes stale: nothing is perceived again
    result = engine.submit(AskRequest('What text can you read?')).wait(5)
    assert 'nothing perceived' in result.note and engine.answerer.contexts[-1] == NOTHING_PERCEIVED


def test_fresh_modalities_are_used_with_their_stamps(engine, clock):
    engine.store.update('vision', np.ones(4), stamp_ns=111)
    engine.store.update('audio', np.ones(4), stamp_ns=222)
    clock[0] += 3.0
    engine.store.update('depth', np.ones(4), stamp_ns=333)
    result = engine.submit(AskRequest('q', max_age_s=2.0)).wait(5)
    assert result.modalities_used == ['depth'] and result.source_stamps_ns == [333]
    result = engine.submit(AskRequest('q')).wait(5)  # default 5 s
    assert sorted(zip(result.modalities_used, result.source_stamps_ns)) == [('audio', 222), ('depth', 333),
                                                                            ('vision', 111)]


def test_requested_but_stale_modality_is_reported(engine, clock):
    engine.store.update('vision', np.ones(4), stamp_ns=1)
    result = engine.submit(AskRequest('q', modalities=['vision', 'audio'])).wait(5)
    assert result.modalities_used == ['vision'] and 'audio' in result.note


def test_untrained_bind_network_is_disclosed(engine):
    engine.answerer.sensors_inform_answers = False
    engine.store.update('vision', np.ones(4), stamp_ns=1)
    result = engine.submit(AskRequest('q')).wait(5)
    assert 'zero-gated' in result.note


def test_queue_is_bounded_and_served_in_order(engine):
    engine.answerer.gate.clear()
    jobs = [engine.submit(AskRequest(f'q{i}')) for i in range(5)]
    busy = [job for job in jobs if job.done]
    assert len(busy) == 3 and all(job.result.error == BUSY for job in busy)
    engine.answerer.gate.set()
    results = [job.wait(5) for job in jobs[:2]]
    assert [r.answer for r in results] == ['0q', '1q']
    assert [c[0] for c in engine.answerer.calls] == ['q0', 'q1']


def test_background_job_never_takes_a_users_place(engine):
    engine.answerer.gate.clear()
    user = engine.submit(AskRequest('user'))
    assert engine.answerer.started.acquire(timeout=5)
    background = engine.submit(AskRequest('describe'), background=True)
    assert background.done and background.result.error == BUSY
    engine.answerer.gate.set()
    assert user.wait(5).success


def test_cancel_stops_generation(engine):
    pieces = []
    job = engine.submit(AskRequest('abcdef', max_new_tokens=6),
                        on_text=lambda t: (pieces.append(t), job.cancel() if len(pieces) == 2 else None))
    result = job.wait(5)
    assert result.cancelled and not result.success and len(pieces) == 2


def test_close_ends_the_running_and_queued_requests_with_the_reason_and_refuses_new_ones(engine):
    engine.answerer.gate.clear()
    pieces = []
    running = engine.submit(AskRequest('running', max_new_tokens=8), on_text=pieces.append)
    assert engine.answerer.started.acquire(timeout=5)
    queued = engine.submit(AskRequest('queued'))
    engine.close('llm_node is shutting down (SIGINT)')
    # Both waiters have their result at once, before the model has produced anything more.
    for job in (running, queued):
        assert job.done
        assert not job.result.success and job.result.error == 'llm_node is shutting down (SIGINT)'
        assert not job.result.cancelled  # not cancelled by its caller
    late = engine.submit(AskRequest('late'))
    assert late.done and late.result.error == 'llm_node is shutting down (SIGINT)'
    engine.answerer.gate.set()  # the model now notices the cancellation; nothing of it reaches the caller
    engine.stop()
    assert pieces == [] and running.result.error == 'llm_node is shutting down (SIGINT)'
    assert engine.queue_length == 0
    assert [c[0] for c in engine.answerer.calls] == ['running']


def test_close_is_idempotent_and_keeps_the_first_reason(engine):
    engine.close('first')
    engine.close('second')
    assert engine.closed == 'first'
    assert engine.submit(AskRequest('q')).result.error == 'first'


def test_stop_refuses_with_its_reason_and_start_serves_again(engine):
    """A lifecycle node's deactivate/activate: the running job is cancelled, the queued one and every later one
    answered with the reason, nothing hangs, and after start() the same engine (and its counters) serves again."""
    engine.answerer.gate.clear()
    running = engine.submit(AskRequest('running'))
    assert engine.answerer.started.acquire(timeout=5)
    queued = engine.submit(AskRequest('queued'))
    engine.stop(timeout_s=0.1, reason='inactive')
    assert queued.done and queued.result.error == 'inactive'
    later = engine.submit(AskRequest('later'))
    assert later.done and later.result.error == 'inactive' and not later.result.success
    engine.answerer.gate.set()
    result = running.wait(5)
    assert not result.success and result.error == 'inactive'  # answered at once by stop(), not cancelled
    engine.stop(reason='inactive')  # a second stop (cleanup after deactivate) leaves no stale end marker behind
    engine.start()
    ok = engine.submit(AskRequest('again')).wait(5)
    assert ok.success and ok.answer == 'niaga'
    assert engine.queue_length == 0 and engine.counts['accepted'] == 3
    assert [c[0] for c in engine.answerer.calls] == ['running', 'again']


def test_a_failing_model_fails_one_request_and_the_next_works(engine):
    engine.answerer.fail_next = RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')
    failed = engine.submit(AskRequest('first')).wait(5)
    assert not failed.success and 'out of memory' in failed.error
    ok = engine.submit(AskRequest('second')).wait(5)
    assert ok.success and ok.answer == 'dnoces'
    assert engine.queue_length == 0 and engine.counts['failed'] == 1


def test_streamed_pieces_concatenate_to_the_answer(engine):
    pieces = []
    result = engine.submit(AskRequest('stream me', max_new_tokens=16), on_text=pieces.append).wait(5)
    assert ''.join(pieces) == result.answer == 'em maerts'


def test_context_text_reaches_the_prompt_under_the_same_freshness_rule(engine, clock):
    engine.store.update('ocr', "'POKKA' (0.98, top-center)", stamp_ns=5)
    engine.store.update('vision', np.ones(4), stamp_ns=6)
    clock[0] += 3.0
    engine.store.update('geometry', 'nearest front 6.2 m', stamp_ns=7)
    result = engine.submit(AskRequest('What text can you read?')).wait(5)
    assert sorted(result.modalities_used) == ['geometry', 'ocr', 'vision']
    assert engine.answerer.calls[-1][1] == ['vision']  # only vectors are fused
    assert engine.answerer.contexts[-1].splitlines() == ["Text read by the camera: 'POKKA' (0.98, top-center)",
                                                         'Lidar obstacles: nearest front 6.2 m']
    engine.submit(AskRequest('q', max_age_s=1.0)).wait(5)
    assert engine.answerer.contexts[-1] == 'Lidar obstacles: nearest front 6.2 m'
    engine.submit(AskRequest('q', modalities=['vision'])).wait(5)
    assert engine.answerer.contexts[-1] is None  # excluded when not asked for


def test_untrained_note_names_the_context_that_does_inform(engine):
    engine.answerer.sensors_inform_answers = False
    engine.store.update('vision', np.ones(4), stamp_ns=1)
    engine.store.update('ocr', 'EXIT 12', stamp_ns=1)
    result = engine.submit(AskRequest('q')).wait(5)
    assert 'zero-gated' in result.note and 'only the ocr context does' in result.note
