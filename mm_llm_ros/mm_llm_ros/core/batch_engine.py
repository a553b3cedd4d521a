"""`AskEngine` with continuous batching: one worker decodes up to `generation.max_batch` questions together.

The answerer (`pipeline.LLMAnswerer` with a `BatchScheduler`) keeps one batch row per running question. The worker
loop, per iteration: take newly queued jobs; give free rows to waiting jobs (users first, in arrival order), each
prefilled alone and streaming its first token at once; then one decode step for every running row. A question that
stops (EOS, budget, context, cancellation) leaves its row in the same step, and its caller gets the answer then.

Queue rule (what "busy" means, documented in the README): a user's question is accepted while users' questions
waiting + decoding are fewer than `max_queue` (>= `max_batch`, so the batch can fill). Scene descriptions are
background jobs: accepted only when no question waits, a row is free and no other description of the same robot is
in flight (fleet mode, `core/fleet.py`: each robot's descriptions are its own background sequence; one robot: one
description at a time); they never count against `max_queue`, and a running description gives its row up (it is
cancelled, and the node tries again on its next tick) as soon as a user's question waits for a row.
"""
from __future__ import annotations

import logging
import queue
from collections import Counter, deque
from typing import Optional

from mm_llm_ros.core.answering import (AskEngine, AskJob, AskLimits, AskResult, Generated, JobInputs,
                                       _release_accelerator_memory)
from mm_llm_ros.core.embedding_store import ModalityStore

logger = logging.getLogger(__name__)

_EMPTY = object()
_MAX_SHUTDOWN_STEPS = 3  # cancelled rows leave before any forward: one step ends them all


class BatchedAskEngine(AskEngine):
    """Serves AskRequests from a bounded queue, decoding up to `answerer.max_batch` of them together."""

    def __init__(self, answerer, store: ModalityStore, limits: AskLimits, line_template: str = '{label}: {text}',
                 contexts: Optional[ModalityStore] = None):
        if answerer.max_batch > limits.max_queue:
            raise ValueError(f'max_queue ({limits.max_queue}) must be >= the batch size ({answerer.max_batch}): '
                             'it counts waiting + decoding questions')
        super().__init__(answerer, store, limits, line_template, contexts=contexts)
        self._decoding: set[AskJob] = set()  # joined the batch (guarded by the lock)
        self._waiting: deque[AskJob] = deque()  # taken from the queue, not yet joined (worker thread only)
        self._describing: Counter = Counter()  # descriptions in flight per robot (its stores), guarded by the lock

    # ---- admission ----------------------------------------------------------------------------------------------
    def _has_room(self, job: AskJob) -> bool:
        if job.background:
            waiting = self._in_flight - len(self._decoding)
            return (waiting == 0 and not self._describing[job.stores]
                    and len(self._decoding) < self.answerer.max_batch)
        return self._in_flight - self._background_in_flight < self.limits.max_queue

    def _admitted(self, job: AskJob) -> None:
        if job.background:
            self._describing[job.stores] += 1

    def _release(self, job: AskJob) -> None:
        super()._release(job)
        if job.background:
            self._describing[job.stores] -= 1
            if not self._describing[job.stores]:
                del self._describing[job.stores]

    @property
    def decoding(self) -> int:
        """Questions in the batch now."""
        with self._lock:
            return len(self._decoding)

    def close(self, reason: str) -> None:
        """Stop serving at once: every decoding question ends now with `reason` (its row is cancelled and leaves at
        the next step), queued ones too (`AskEngine.close`), and those the worker holds at its next iteration."""
        with self._lock:
            decoding = list(self._decoding)
        super().close(reason)
        reason = self._closed or reason
        for job in decoding:
            job.cancel(reason)
            job.finish(AskResult(False, error=reason))

    # ---- worker -------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            idle = not self._waiting and self.answerer.running == 0
            try:
                item = self._queue.get() if idle else self._queue.get_nowait()
            except queue.Empty:
                item = _EMPTY
            while item is not _EMPTY:
                if item is None:  # stop()
                    self._shut_down()
                    return
                self._waiting.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = _EMPTY
            if self._closed is not None:  # close(): nothing new joins; waiting jobs end with the reason
                while self._waiting:
                    self._done(self._waiting.popleft(), AskResult(False, error=self._closed))
            self._admit()
            if self.answerer.running:
                try:
                    self.answerer.step()
                except Exception as exc:  # the worker must survive anything a model does, e.g. CUDA OOM
                    self._fail_running(exc)

    def _admit(self) -> None:
        """Give free rows to waiting jobs, users first; a description yields its row to a waiting user."""
        while self._waiting and self.answerer.free_rows > 0:
            job = next((j for j in self._waiting if not j.background), self._waiting[0])
            self._waiting.remove(job)
            self._begin(job)
        if any(not job.background for job in self._waiting):
            with self._lock:
                descriptions = [job for job in self._decoding if job.background]
            for job in descriptions:
                job.cancel()  # leaves at the next step, before its forward

    def _begin(self, job: AskJob) -> None:
        try:
            inputs = self._inputs(job)
            if isinstance(inputs, AskResult):
                self._done(job, inputs)
                return
            if self._choice(job, inputs):  # one scoring forward, no token loop: answered at once
                self._finished(job, inputs, self.answerer.answer(
                    job.request.question, inputs.embeddings, job.request.max_new_tokens, job.emit, job.should_stop,
                    context=inputs.context, choose=True))
                return
            with self._lock:
                self._decoding.add(job)
            self.answerer.begin(job.request.question, inputs.embeddings, job.request.max_new_tokens, job.on_text,
                                job.should_stop, on_done=lambda generated: self._finished(job, inputs, generated),
                                context=inputs.context, tag=job)
        except Exception as exc:  # an unusable prompt, or the prefill failed (e.g. CUDA OOM)
            logger.exception('starting an answer failed')
            self.counts['failed'] += 1
            self._done(job, _failure(exc))
            _release_accelerator_memory()

    def _finished(self, job: AskJob, inputs: JobInputs, generated: Generated) -> None:
        self._done(job, self._result(job, inputs, generated))

    def _done(self, job: AskJob, result: AskResult) -> None:
        with self._lock:
            self._decoding.discard(job)
            self._release(job)
        job.finish(result)

    def _fail_running(self, exc: Exception) -> None:
        """A decode step failed: every question in the batch fails with the reason; the worker goes on."""
        logger.exception('batched decoding failed')
        for job in self.answerer.abort():
            self.counts['failed'] += 1
            self._done(job, _failure(exc))
        _release_accelerator_memory()

    def _shut_down(self) -> None:
        for job in self._waiting:
            self._done(job, AskResult(False, error='node shutting down'))
        self._waiting.clear()
        with self._lock:
            decoding = list(self._decoding)
        for job in decoding:
            job.cancel()
        for _ in range(_MAX_SHUTDOWN_STEPS):
            if not self.answerer.running:
                break
            try:
                self.answerer.step()
            except Exception as exc:
                self._fail_running(exc)
        for job in self.answerer.abort() if self.answerer.running else ():
            self._done(job, AskResult(False, error='node shutting down'))


def _failure(exc: Exception) -> AskResult:
    return AskResult(False, error=f'generation failed: {type(exc).__name__}: {exc}'[:500])


def make_engine(answerer, store: ModalityStore, limits: AskLimits, line_template: str = '{label}: {text}',
                contexts: Optional[ModalityStore] = None) -> AskEngine:
    """The batched engine when the answerer decodes batches (`max_batch` > 1), else the serial one. `store` holds
    the embeddings by source, `contexts` the perception context by kind (default: `store`), as for `AskEngine`."""
    if getattr(answerer, 'max_batch', 1) > 1:
        return BatchedAskEngine(answerer, store, limits, line_template, contexts=contexts)
    return AskEngine(answerer, store, limits, line_template, contexts=contexts)

