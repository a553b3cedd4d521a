"""Question answering as a service: validation, a bounded FIFO of requests and one generation worker.

The node (`ros/llm_node.py`) only translates ROS requests into `AskRequest`s and `AskResult`s back. Everything that
decides what happens to a request lives here and is unit-tested without ROS.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional, Protocol, Sequence, Union

import numpy as np

from mm_llm_ros.core.embedding_store import ModalityStore, StoredInput
from mm_llm_ros.core.scheduling import RollingStats
from mm_llm_ros.core.specs import CONTEXT_KINDS

if TYPE_CHECKING:
    from mm_llm_ros.core.fleet import Robot

logger = logging.getLogger(__name__)

BUSY = 'busy'
# What the model reads in place of sensor readings when nothing fresh has been perceived, so that it does not
# describe a scene it never saw (the answer's note says the same to the caller).
NOTHING_PERCEIVED = ('Nothing has been perceived: no camera, microphone or lidar data and no perception result '
                     'has arrived recently. Say that you cannot perceive anything yet.')


def context_line(template: str, kind: str, text: str) -> str:
    """One prompt line for a perception-context result, e.g. 'Text read by the camera: 'POKKA' (0.98, left)'."""
    spec = CONTEXT_KINDS.get(kind)
    return template.format(kind=kind, label=spec.label if spec else kind, text=text)


def context_block(template: str, texts: Iterable[tuple[str, str]]) -> Optional[str]:
    """The prompt's perception context: one `context_line` per (kind, text), in the given order; None if empty.

    This is the one formatter of perception context (llm_node, the evaluation and the grounding benchmark use it);
    the prompt builder bounds the block to `context.max_chars` (`core/llm/prompt.py: bound_context`).
    """
    return '\n'.join(context_line(template, kind, text) for kind, text in texts) or None


@dataclass
class AskRequest:
    question: str
    modalities: Sequence[str] = ()
    max_age_s: float = 0.0         # 0 = default
    max_new_tokens: int = 0        # 0 = default


@dataclass
class AskResult:
    success: bool
    answer: str = ''
    error: str = ''
    note: str = ''
    modalities_used: list[str] = field(default_factory=list)
    source_stamps_ns: list[int] = field(default_factory=list)
    latency_s: float = 0.0
    n_tokens: int = 0
    time_to_first_token_s: float = float('nan')
    tokens_per_s: float = float('nan')
    cancelled: bool = False
    # The store entries the answer was based on (embeddings and contexts, as selected for it): a scene
    # description's entities and markers are built from exactly these.
    inputs: list[StoredInput] = field(default_factory=list)


@dataclass
class Generated:
    """What an Answerer returns for one question."""
    text: str
    n_tokens: int
    time_to_first_token_s: float
    tokens_per_s: float
    stopped_reason: str


class Answerer(Protocol):
    """The model side: answers a question given the fresh embeddings (possibly none) and context text."""

    sensors_inform_answers: bool  # False while the bind network is untrained / zero-gated

    def answer(self, question: str, embeddings: Sequence[StoredInput], max_new_tokens: int,
               on_text: Callable[[str], None], should_stop: Callable[[], bool],
               context: Optional[str] = None) -> Generated: ...

    # An answerer may also have `answer_mode` ('free' or 'choose_from_context', core/llm/choice.py) and then
    # accept `choose=True` in `answer`: the answer is chosen among the context's lines instead of generated.


@dataclass(frozen=True)
class AskLimits:
    known_modalities: tuple[str, ...]  # store keys: embedding sources (sensors) and perception-context kinds
    # Further names a question may ask for, each standing for several keys (a modality: all of its sources).
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    max_queue: int = 4
    max_question_chars: int = 2000
    default_max_age_s: float = 5.0
    default_max_new_tokens: int = 256
    max_new_tokens_cap: int = 1024


class AskJob:
    """One accepted request; `wait()` returns its result. Stream callbacks run on the worker thread."""

    def __init__(self, request: AskRequest, on_text: Optional[Callable[[str], None]],
                 should_stop: Optional[Callable[[], bool]], background: bool = False,
                 stores: tuple[ModalityStore, ...] = ()):
        self.request = request
        self.stores = stores  # where its inputs are read (fleet mode: its robot's embedding and context stores)
        self.on_text = on_text or (lambda _text: None)
        self._external_stop = should_stop or (lambda: False)
        self.background = background
        self.received = time.monotonic()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._finish_lock = threading.Lock()
        self.result: Optional[AskResult] = None
        self.cancel_reason = 'cancelled'

    def cancel(self, reason: str = 'cancelled') -> None:
        self.cancel_reason = reason
        self._cancelled.set()

    def should_stop(self) -> bool:
        return self._cancelled.is_set() or self._external_stop()

    def finish(self, result: AskResult) -> bool:
        """Set the result; the first one wins (a job ended by `AskEngine.close` keeps that reason when its
        generation stops later). Returns whether this result was taken."""
        with self._finish_lock:
            if self._done.is_set():
                return False
            result.latency_s = time.monotonic() - self.received
            self.result = result
            self._done.set()
            return True

    def emit(self, text: str) -> None:
        """Stream a piece of the answer, unless the job already has its result."""
        if not self._done.is_set():
            self.on_text(text)

    def wait(self, timeout_s: Optional[float] = None) -> Optional[AskResult]:
        self._done.wait(timeout_s)
        return self.result

    @property
    def done(self) -> bool:
        return self._done.is_set()


def validate_question(text: object, max_chars: int) -> Optional[str]:
    """Reason the question is refused, or None."""
    if not isinstance(text, str):
        return 'question must be a string'
    if not text.strip():
        return 'question is empty'
    if len(text) > max_chars:
        return f'question too long ({len(text)} > {max_chars} characters)'
    if any(unicodedata.category(ch) in ('Cc', 'Cs', 'Co', 'Cn') and ch not in '\n\t\r' for ch in text):
        return 'question contains control or binary characters'
    return None


class AskEngine:
    """Serves AskRequests in order from a bounded queue with one worker thread."""

    def __init__(self, answerer: Answerer, store: ModalityStore, limits: AskLimits,
                 line_template: str = '{label}: {text}', contexts: Optional[ModalityStore] = None):
        """`store` holds the embeddings by source; `contexts` the perception context by kind (default: `store`)."""
        self.answerer = answerer
        self.store = store
        self.contexts = contexts if contexts is not None else store
        self.limits = limits
        try:  # fail at start-up, not at the first question
            context_line(line_template, 'kind', '')
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"context line template '{line_template}' must use only {{kind}}, {{label}} and {{text}}"
                             ) from exc
        self.line_template = line_template
        self._queue: queue.Queue[Optional[AskJob]] = queue.Queue()
        self._in_flight = 0
        self._background_in_flight = 0
        self._lock = threading.Lock()
        self._running: Optional[AskJob] = None
        self._closed: Optional[str] = None  # why requests are refused: set by close()/stop(), reset by start()
        self._worker = threading.Thread(target=self._work, name='ask-worker', daemon=True)
        self.time_to_first_token = RollingStats()
        self.tokens_per_s = RollingStats()
        self.counts = {'accepted': 0, 'busy': 0, 'invalid': 0, 'failed': 0, 'answered': 0, 'cancelled': 0}

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self, timeout_s: float = 5.0) -> None:
        """Start serving; after stop() this starts again (a lifecycle node's activate) with a new worker thread."""
        if self._worker.ident is not None:  # it ran before: wait for it to end (stop() cancelled its job)
            self._worker.join(timeout_s)
            if self._worker.is_alive():
                raise RuntimeError(f'the previous generation did not end within {timeout_s:g} s')
            self._worker = threading.Thread(target=self._work, name='ask-worker', daemon=True)
        with self._lock:
            self._closed = None
            while not self._queue.empty():  # end markers of earlier stop() calls; no job is queued while refusing
                self._queue.get_nowait()
        self._worker.start()

    def close(self, reason: str) -> None:
        """Stop serving at once: refuse new requests, and end the running and every queued request with `reason`
        (success false). The running generation is cancelled; its waiter does not wait for it to stop."""
        with self._lock:
            if self._closed is None:
                self._closed = reason
            reason = self._closed
            running = self._running
        if running is not None:
            running.cancel(reason)
            running.finish(AskResult(False, error=reason))
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop() already asked the worker to end: keep that request
                break
            with self._lock:
                self._release(job)
            job.finish(AskResult(False, error=reason))

    @property
    def closed(self) -> Optional[str]:
        """The reason given to close(), or None while serving."""
        return self._closed

    def stop(self, timeout_s: float = 5.0, reason: str = 'node shutting down') -> None:
        """close(reason) (unless closed already) and end the worker; no waiter is left hanging. Requests submitted
        from now on until start() are refused with the reason."""
        self.close(reason)
        with self._lock:  # submit() queues under the same lock: nothing can be queued behind the end marker
            self._queue.put(None)
        if self._worker.is_alive():
            self._worker.join(timeout_s)

    @property
    def queue_length(self) -> int:
        with self._lock:
            return self._in_flight

    # ---- requests ---------------------------------------------------------------------------
    def resolve(self, request: AskRequest) -> tuple[Optional[str], AskRequest]:
        """Validate and fill defaults; returns (error, normalised request)."""
        error = validate_question(request.question, self.limits.max_question_chars)
        if error:
            return error, request
        modalities = list(dict.fromkeys(m.strip().lower() for m in request.modalities))
        known = tuple(dict.fromkeys((*self.limits.known_modalities, *self.limits.groups)))
        unknown = [m for m in modalities if m not in known]
        if unknown:
            return f"unknown modality '{unknown[0]}' (known: {', '.join(known)})", request
        max_age = request.max_age_s
        if not isinstance(max_age, (int, float)) or math.isnan(max_age) or max_age < 0:
            return 'max_age_s must be a number >= 0 (0 means the node default)', request
        max_age = max_age or self.limits.default_max_age_s
        tokens = int(request.max_new_tokens) or self.limits.default_max_new_tokens
        tokens = max(1, min(tokens, self.limits.max_new_tokens_cap))
        return None, AskRequest(request.question.strip(), modalities, float(max_age), tokens)

    def submit(self, request: AskRequest, on_text: Optional[Callable[[str], None]] = None,
               should_stop: Optional[Callable[[], bool]] = None, background: bool = False,
               robot: Optional['Robot'] = None) -> AskJob:
        """Queue a request. Invalid or over-capacity requests come back already finished with a reason.

        A background job (scene description) is only queued when nothing else waits, so it never makes a
        user's question busy. `robot` (fleet mode, `core/fleet.py`): answer from that robot's embedding and context
        stores instead of the engine's own; every robot's jobs share the one queue (and batch).
        """
        error, resolved = self.resolve(request)
        stores = (robot.store, robot.contexts) if robot is not None else (self.store, self.contexts)
        job = AskJob(resolved, on_text, should_stop, background, tuple(dict.fromkeys(stores)))
        if self._closed is not None:
            job.finish(AskResult(False, error=self._closed))
            return job
        if error:
            self.counts['invalid'] += 1
            job.finish(AskResult(False, error=error))
            return job
        with self._lock:
            if self._closed is not None:  # closed since the check above
                job.finish(AskResult(False, error=self._closed))
                return job
            if not self._has_room(job):
                self.counts['busy'] += 1
                job.finish(AskResult(False, error=BUSY))
                return job
            self._in_flight += 1
            self._background_in_flight += background
            self._admitted(job)
            self.counts['accepted'] += 1
            self._queue.put(job)  # under the lock, so that close() cannot miss it
        return job

    def _has_room(self, job: AskJob) -> bool:
        """Whether a new request fits (called under the lock): the serial rule, one bounded queue of waiting +
        running requests; a background request only when nothing else is in flight."""
        return self._in_flight < (1 if job.background else self.limits.max_queue)

    def _admitted(self, job: AskJob) -> None:
        """A request was accepted (called under the lock; the batched engine counts descriptions per robot)."""

    def _release(self, job: AskJob) -> None:
        """A request leaves the engine (called under the lock)."""
        self._in_flight -= 1
        self._background_in_flight -= job.background

    # ---- worker -----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                closed = self._closed
                if closed is not None:  # taken from the queue just before close() looked at it
                    self._release(job)
                else:
                    self._running = job
            if closed is not None:
                job.finish(AskResult(False, error=closed))
                continue
            try:
                result = self._answer(job)
            except Exception as exc:  # the worker must survive anything a model does, e.g. CUDA OOM
                logger.exception('answering failed')
                self.counts['failed'] += 1
                result = AskResult(False, error=f'generation failed: {type(exc).__name__}: {exc}'[:500])
                _release_accelerator_memory()
            with self._lock:
                self._running = None
                self._release(job)
            job.finish(result)

    def _answer(self, job: AskJob) -> AskResult:
        inputs = self._inputs(job)
        if isinstance(inputs, AskResult):
            return inputs
        generated = self.answerer.answer(job.request.question, inputs.embeddings, job.request.max_new_tokens,
                                         job.emit, job.should_stop, context=inputs.context,
                                         **self._choice(job, inputs))
        return self._result(job, inputs, generated)

    def _choice(self, job: AskJob, inputs: 'JobInputs') -> dict[str, bool]:
        """`{'choose': True}` when the answerer chooses its answer among the context's lines and this job can: a
        user's question (scene descriptions stay free) with perception context in its prompt; else nothing."""
        if getattr(self.answerer, 'answer_mode', 'free') != 'choose_from_context' or job.background:
            return {}
        has_context = any(isinstance(entry.value, str) for entry in inputs.fresh)
        return {'choose': True} if has_context and inputs.context not in (None, NOTHING_PERCEIVED) else {}

    def _inputs(self, job: AskJob) -> Union['JobInputs', AskResult]:
        """What the model reads for this job (fresh embeddings and context text), or its result if cancelled."""
        request = job.request
        fresh, missing = self._select(request.modalities or self.limits.known_modalities, request.max_age_s,
                                      job.stores)
        if job.should_stop():
            self.counts['cancelled'] += 1
            return AskResult(False, error=job.cancel_reason, cancelled=True)
        embeddings = [e for e in fresh if isinstance(e.value, np.ndarray)]
        contexts = [c for c in fresh if isinstance(c.value, str)]
        context = context_block(self.line_template, ((c.modality, c.value) for c in contexts))
        if not fresh:
            context = NOTHING_PERCEIVED
        return JobInputs(fresh, missing, embeddings, context)

    def _result(self, job: AskJob, inputs: 'JobInputs', generated: Generated) -> AskResult:
        request, fresh, missing = job.request, inputs.fresh, inputs.missing
        cancelled = generated.stopped_reason == 'cancelled'
        self.counts['cancelled' if cancelled else 'answered'] += 1
        if generated.n_tokens:
            self.time_to_first_token.add(generated.time_to_first_token_s)
            self.tokens_per_s.add(generated.tokens_per_s)
        return AskResult(
            success=not cancelled, answer=generated.text.strip(), error=job.cancel_reason if cancelled else '',
            note=self._note(request, fresh, missing),
            modalities_used=[e.modality for e in fresh], source_stamps_ns=[e.stamp_ns for e in fresh],
            n_tokens=generated.n_tokens, time_to_first_token_s=generated.time_to_first_token_s,
            tokens_per_s=generated.tokens_per_s, cancelled=cancelled, inputs=list(fresh))

    @property
    def generation(self) -> int:
        """Bumps whenever an embedding or a context arrives ("anything new since the last description?")."""
        return self.store.generation + (self.contexts.generation if self.contexts is not self.store else 0)

    def _select(self, names: Sequence[str], max_age_s: float, stores: Sequence[ModalityStore]
                ) -> tuple[list[StoredInput], list[str]]:
        """Fresh entries for the asked names (a group name: any of its keys) in `stores` (the job's: its robot's
        embeddings and context), and the names with none fresh."""
        fresh: list[StoredInput] = []
        missing: list[str] = []
        seen: set[str] = set()
        for name in names:
            keys = [k for k in self.limits.groups.get(name, (name,)) if k not in seen]
            if not keys:
                continue   # every key already asked for under another name
            seen.update(keys)
            found = [entry for store in stores for entry in store.select(keys, max_age_s)[0]]
            fresh += found
            if not found:
                missing.append(name)
        return fresh, missing

    def _note(self, request: AskRequest, fresh: Sequence[StoredInput], missing: Sequence[str]) -> str:
        notes = []
        if not fresh:
            # Name what was asked for, so that a caller learns which sensor went stale.
            what = f"{', '.join(missing)} data" if request.modalities else 'sensor data or perception context'
            notes.append(f'nothing perceived: no {what} fresher than {request.max_age_s:g} s; answered from text '
                         'alone, and the model was told that it perceives nothing')
        elif request.modalities and missing:
            notes.append(f"no fresh data for {', '.join(missing)}; answered without it")
        if any(isinstance(e.value, np.ndarray) for e in fresh) and not self.answerer.sensors_inform_answers:
            contexts = [e.modality for e in fresh if isinstance(e.value, str)]
            informed = f" (only the {', '.join(contexts)} context does)" if contexts else ''
            notes.append('the bind network is untrained and zero-gated, so sensor embeddings do not inform '
                         f'this answer{informed}')
        return '; '.join(notes)


@dataclass
class JobInputs:
    """The store's answer for one job: what is fresh, what is missing, and what the model reads."""
    fresh: Sequence[StoredInput]
    missing: Sequence[str]
    embeddings: Sequence[StoredInput]
    context: Optional[str]


def _release_accelerator_memory() -> None:
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
