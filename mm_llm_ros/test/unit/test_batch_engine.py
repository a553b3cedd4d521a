"""BatchedAskEngine: the batched worker's queue rule, slots, cancellation, failures, and the real tiny model's answers
equal to the serial engine's."""
from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from mm_llm_ros.core.answering import BUSY, AskEngine, AskLimits, AskRequest, Generated
from mm_llm_ros.core.batch_engine import BatchedAskEngine, make_engine
from mm_llm_ros.core.embedding_store import ModalityStore
from mm_llm_ros.core.llm.pipeline import LLMConfig, build_answerer

MODALITIES = ('vision', 'audio', 'ocr')
WAIT_S = 10


class ScriptedBatchAnswerer:
    """Rows answer with the question reversed, one character per step; `gate` holds each step."""

    sensors_inform_answers = True

    def __init__(self, max_batch):
        self.max_batch = max_batch
        self.rows = {}  # tag -> [remaining text, emitted, on_text, should_stop, on_done]
        self.gate = threading.Semaphore(0)
        self.steps = 0
        self.fail_next_step = None
        self.joined = []

    @property
    def free_rows(self):
        return self.max_batch - len(self.rows)

    @property
    def running(self):
        return len(self.rows)

    def begin(self, question, embeddings, max_new_tokens, on_text, should_stop, on_done, context=None, tag=None):
        assert self.free_rows > 0, 'the engine joined a job into a full batch'
        self.joined.append(question)
        self.rows[tag] = [question[::-1][:max_new_tokens], '', on_text, should_stop, on_done]

    def step(self):
        assert self.gate.acquire(timeout=WAIT_S)
        self.steps += 1
        if self.fail_next_step:
            exc, self.fail_next_step = self.fail_next_step, None
            raise exc
        for tag, row in list(self.rows.items()):
            remaining, emitted, on_text, should_stop, on_done = row
            if should_stop():
                del self.rows[tag]
                on_done(Generated(emitted, len(emitted), 0.01, 100.0, 'cancelled'))
                continue
            row[0], row[1] = remaining[1:], emitted + remaining[0]
            on_text(remaining[0])
            if not row[0]:
                del self.rows[tag]
                on_done(Generated(row[1], len(row[1]), 0.01, 100.0, 'eos'))

    def abort(self):
        tags = list(self.rows)
        self.rows.clear()
        return tags

    def release(self, steps):
        for _ in range(steps):
            self.gate.release()


@pytest.fixture
def scripted():
    answerer = ScriptedBatchAnswerer(max_batch=2)
    engine = BatchedAskEngine(answerer, ModalityStore(), AskLimits(MODALITIES, max_queue=3,
                                                                   default_max_new_tokens=8))
    engine.start()
    yield engine, answerer
    answerer.release(1000)
    engine.stop()


def _until(predicate, what):
    """Wait (bounded) for the worker thread to reach a state; the worker is blocked on the gate meanwhile."""
    event = threading.Event()
    for _ in range(1000):
        if predicate():
            return
        event.wait(0.01)
    raise AssertionError(f'timed out waiting for {what}')


def test_users_are_busy_only_when_waiting_plus_decoding_reach_max_queue(scripted):
    engine, answerer = scripted
    jobs = [engine.submit(AskRequest(f'question {i}')) for i in range(3)]
    refused = engine.submit(AskRequest('one too many')).wait(WAIT_S)
    assert refused.error == BUSY and engine.counts['busy'] == 1
    _until(lambda: engine.decoding == 2, 'two rows decoding')
    assert answerer.joined == ['question 0', 'question 1']  # the batch of 2 filled; the third waits
    answerer.release(200)
    results = [job.wait(WAIT_S) for job in jobs]
    assert [r.answer for r in results] == [f'question {i}'[::-1][:8] for i in range(3)]
    assert answerer.steps < sum(r.n_tokens for r in results)  # rows shared steps
    assert engine.submit(AskRequest('room again')).wait(WAIT_S) is not None  # room again
    assert engine.queue_length == 0


def test_a_cancelled_question_frees_its_row_for_the_next(scripted):
    engine, answerer = scripted
    first = engine.submit(AskRequest('first question'))
    second = engine.submit(AskRequest('second question'))
    third = engine.submit(AskRequest('third question'))
    _until(lambda: engine.decoding == 2, 'two rows decoding')
    first.cancel()
    answerer.release(1)  # the cancelled row leaves in this step; the third joins right after it
    _until(lambda: 'third question' in answerer.joined, 'the third question joining')
    assert first.wait(WAIT_S).cancelled and engine.counts['cancelled'] == 1
    answerer.release(200)
    assert second.wait(WAIT_S).answer == 'second question'[::-1][:8]
    assert third.wait(WAIT_S).answer == 'third question'[::-1][:8]


def test_a_description_never_takes_a_users_place(scripted):
    engine, answerer = scripted
    description = engine.submit(AskRequest('describe the scene'), background=True)
    _until(lambda: engine.decoding == 1, 'the description decoding')
    assert engine.submit(AskRequest('another description'), background=True).wait(WAIT_S).error == BUSY
    users = [engine.submit(AskRequest(f'user {i}')) for i in range(3)]  # max_queue 3: descriptions do not count
    assert all(not job.done for job in users)
    answerer.release(2)  # the step running now, then one in which the description leaves
    # User 0 takes the free row; the others wait for one: the description is cancelled and gives its row up.
    assert description.wait(WAIT_S).cancelled
    answerer.release(200)
    assert [job.wait(WAIT_S).answer for job in users] == [f'user {i}'[::-1] for i in range(3)]
    # While users wait, a description is refused rather than queued.
    assert engine.counts['busy'] == 1


def test_a_failing_step_fails_the_batch_and_the_next_questions_work(scripted):
    engine, answerer = scripted
    answerer.fail_next_step = RuntimeError('CUDA out of memory')
    jobs = [engine.submit(AskRequest(f'q{i}')) for i in range(2)]
    _until(lambda: engine.decoding == 2, 'two rows decoding')
    answerer.release(1)
    for job in jobs:
        result = job.wait(WAIT_S)
        assert not result.success and 'RuntimeError: CUDA out of memory' in result.error
    answerer.release(100)
    assert engine.submit(AskRequest('after')).wait(WAIT_S).answer == 'retfa'
    assert engine.counts['failed'] == 2 and engine.queue_length == 0


def test_stop_leaves_no_waiter_hanging(scripted):
    engine, answerer = scripted
    jobs = [engine.submit(AskRequest(f'question {i}')) for i in range(3)]
    _until(lambda: engine.decoding == 2, 'two rows decoding')
    answerer.release(1000)
    engine.stop()
    results = [job.wait(WAIT_S) for job in jobs]
    assert all(r is not None for r in results)


def test_make_engine_picks_the_batched_worker_only_for_batches():
    limits = AskLimits(MODALITIES, max_queue=2)
    assert type(make_engine(ScriptedBatchAnswerer(2), ModalityStore(), limits)) is BatchedAskEngine
    assert type(make_engine(ScriptedBatchAnswerer(1), ModalityStore(), limits)) is AskEngine
    with pytest.raises(ValueError, match='max_queue'):
        BatchedAskEngine(ScriptedBatchAnswerer(4), ModalityStore(), limits)


@pytest.fixture(scope='module')
def tiny_answerers():
    base = LLMConfig.from_params({'llm.preset': 'tiny', 'generation.decoder': 'static', 'max_queue': 8,
                                  'generation.temperature': 0.0, 'generation.max_new_tokens': 24})
    return build_answerer(base), build_answerer(replace(base, max_batch=4))


def test_the_tiny_models_batched_answers_equal_its_serial_answers(tiny_answerers):
    serial_answerer, batched_answerer = tiny_answerers
    assert batched_answerer.max_batch == 4 and serial_answerer.max_batch == 1
    questions = ['What do you see?', 'x', 'Is anyone speaking near the door on the left?', 'Where is the ball?',
                 'Read the sign.', 'How far is the wall?']
    budgets = [24, 3, 17, 1, 24, 9]
    answers = {}
    for name, answerer in (('serial', serial_answerer), ('batched', batched_answerer)):
        engine = make_engine(answerer, ModalityStore(), AskLimits(MODALITIES, max_queue=8))
        engine.start()
        try:
            streams = {i: [] for i in range(len(questions))}
            jobs = [engine.submit(AskRequest(q, max_new_tokens=n), on_text=streams[i].append)
                    for i, (q, n) in enumerate(zip(questions, budgets, strict=True))]
            results = [job.wait(60) for job in jobs]
        finally:
            engine.stop()
        assert all(r.success for r in results), [r.error for r in results]
        assert [''.join(streams[i]).strip() for i in range(len(questions))] == [r.answer for r in results]
        answers[name] = [(r.answer, r.n_tokens) for r in results]
    assert answers['batched'] == answers['serial']
    assert len({a for a, _ in answers['serial']}) > 3  # the answers differ, so the equality means something
    assert batched_answerer.batch.steps < sum(n for _, n in answers['batched'])


def test_close_ends_decoding_and_queued_questions_with_the_reason(scripted):
    engine, answerer = scripted
    jobs = [engine.submit(AskRequest(f'question {i}')) for i in range(3)]
    _until(lambda: engine.decoding == 2, 'two rows decoding')
    engine.close('node stopped by SIGTERM')
    results = [job.wait(WAIT_S) for job in jobs]  # at once: the worker is still held by the gate
    assert [r.error for r in results] == ['node stopped by SIGTERM'] * 3 and not any(r.success for r in results)
    assert engine.submit(AskRequest('late')).wait(WAIT_S).error == 'node stopped by SIGTERM'
    answerer.release(10)
    _until(lambda: engine.queue_length == 0 and answerer.running == 0, 'the cancelled rows leaving')


def test_build_answerer_refuses_a_batch_larger_than_the_queue():
    with pytest.raises(ValueError, match='max_batch'):
        build_answerer(LLMConfig.from_params({'llm.preset': 'tiny', 'max_queue': 4, 'generation.max_batch': 8}))
    with pytest.raises(ValueError, match='max_batch'):
        build_answerer(LLMConfig.from_params({'llm.preset': 'tiny', 'generation.max_batch': 0}))


def test_stop_then_start_serves_again_as_a_lifecycle_reactivation_does(scripted):
    engine, answerer = scripted
    decoding = engine.submit(AskRequest('question before'))
    _until(lambda: engine.decoding == 1, 'one row decoding')
    answerer.release(1000)
    engine.stop(reason='inactive')
    assert decoding.wait(WAIT_S).error == 'inactive'
    assert engine.submit(AskRequest('while inactive')).wait(WAIT_S).error == 'inactive'
    assert answerer.running == 0 and engine.queue_length == 0
    engine.start()
    assert engine.submit(AskRequest('after')).wait(WAIT_S).answer == 'retfa'
