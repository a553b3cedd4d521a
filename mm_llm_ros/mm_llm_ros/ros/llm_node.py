"""llm_node: the ImageBind-LLM node. Fuses the latest embeddings, answers /ask and /ask_stream, and publishes
scene descriptions: the text, the entities it is based on (objects, texts, sounds from the perception context it
used), their JSON mirror and markers of the objects (core/grounding/entities.py, markers.py).

Threads: embedding subscriptions and timers run on their own callback groups; /ask and /ask_stream callbacks run on
a reentrant group and only wait for their own job, which the single generation worker in `AskEngine` serves in
order (or, with generation.max_batch > 1, decodes together with others: `batch_engine.BatchedAskEngine`). The
executor has max_queue + 4 threads, so waiting callbacks can never starve subscriptions or timers.

A lifecycle node (ros/lifecycle.py): configure loads the LLM and creates the topics, /ask and /ask_stream; activate
starts the generation worker; while inactive, /ask and /ask_stream answer success=false, error "inactive" and no
description is generated; cleanup releases the model.
"""
from __future__ import annotations

import contextlib
import json
import math
import os

# No tqdm progress bars in the node's log (transformers' GGUF conversion uses plain tqdm, which reads TQDM_* once,
# when it is imported: so this comes before any import that may pull it in). A user's own setting wins.
os.environ.setdefault('TQDM_DISABLE', '1')
os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')

import numpy as np  # noqa: E402
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from std_msgs.msg import String

from mm_llm_ros.core.answering import AskLimits, AskRequest, AskResult
from mm_llm_ros.core.batch_engine import make_engine
from mm_llm_ros.core.embedding_store import ModalityStore
from mm_llm_ros.core.grounding.entities import (SceneEntities, context_entities, scene_json,
                                                  stored_entities)
from mm_llm_ros.core.grounding.facts import prompt_text
from mm_llm_ros.core.grounding.markers import SceneMarkers
from mm_llm_ros.core.llm.pipeline import LLMConfig, build_answerer
from mm_llm_ros.core.params import LLM_PARAMS
from mm_llm_ros.core.specs import CONTEXT_TOPIC, EMBEDDING_TOPIC, sources_of
from mm_llm_ros.ros.conversions import ns_to_stamp, stamp_to_ns
from mm_llm_ros.ros.diagnostics import make_array, make_status
from mm_llm_ros.ros.lifecycle import INACTIVE, ManagedNode, autostarted, inactive_note
from mm_llm_ros.ros.node_main import exit_now, run_node
from mm_llm_ros.ros.qos import EMBEDDING_QOS, FEEDBACK_QOS, LATCHED_QOS, SERVICE_QOS
from mm_llm_ros.ros.scene_messages import description_msg, marker_array
from mm_llm_ros_interfaces.action import AskStream
from mm_llm_ros_interfaces.msg import Embedding, PerceptionContext, SceneDescription
from mm_llm_ros_interfaces.srv import Ask
from diagnostic_msgs.msg import DiagnosticArray
from visualization_msgs.msg import MarkerArray


class LLMNode(ManagedNode):

    def __init__(self):
        super().__init__('llm_node', LLM_PARAMS)
        # The executor is built before configure runs: sized from the (read-only) declared queue bound.
        self.executor_threads = self.get_parameter('max_queue').value + 4
        self.engine = self._action_server = None

    # ---- lifecycle ------------------------------------------------------------------------------
    def configure(self, params) -> None:
        self.config = LLMConfig.from_params(params)
        _no_progress_bars()
        self.answerer = build_answerer(self.config)  # its StartupErrors (checkpoint, config, device) refuse configure
        self.get_logger().info(f'LLM ready: {self.answerer.description}')
        if not self.answerer.sensors_inform_answers:
            self.get_logger().warning('bind network untrained/zero-gated: sensor embeddings do not inform answers')

        self.store = ModalityStore()      # embeddings, by source
        self.contexts = ModalityStore()   # perception context, by kind
        self.engine = make_engine(self.answerer, self.store, AskLimits(
            known_modalities=self.config.sources + tuple(self.config.context_kinds),
            groups={m: sources_of(m) for m in self.config.modalities},
            max_queue=self.config.max_queue,
            max_question_chars=self.config.max_question_chars, default_max_age_s=self.config.max_age_s,
            default_max_new_tokens=self.config.generation.max_new_tokens,
            max_new_tokens_cap=self.config.max_new_tokens_cap), line_template=self.config.context_template,
            contexts=self.contexts)
        self.dropped_embeddings = 0

        sensors = MutuallyExclusiveCallbackGroup()
        requests = ReentrantCallbackGroup()
        for source in self.config.sources:
            self.create_subscription(Embedding, EMBEDDING_TOPIC.format(source=source),
                                     lambda msg, s=source: self.embedding_callback(s, msg), EMBEDDING_QOS,
                                     callback_group=sensors)
        for kind in self.config.context_kinds:
            self.create_subscription(PerceptionContext, CONTEXT_TOPIC.format(kind=kind),
                                     lambda msg, k=kind: self.context_callback(k, msg), LATCHED_QOS,
                                     callback_group=sensors)
        self.create_service(Ask, 'ask', self.ask_callback, qos_profile=SERVICE_QOS, callback_group=requests)
        self._action_server = ActionServer(
            self, AskStream, 'ask_stream', execute_callback=self.ask_stream_execute,
            goal_callback=lambda _goal: GoalResponse.ACCEPT, cancel_callback=lambda _goal: CancelResponse.ACCEPT,
            goal_service_qos_profile=SERVICE_QOS, result_service_qos_profile=SERVICE_QOS,
            cancel_service_qos_profile=SERVICE_QOS, feedback_pub_qos_profile=FEEDBACK_QOS, callback_group=requests)

        self.description_pub = self.create_publisher(SceneDescription, 'scene_description', LATCHED_QOS)
        self.description_text_pub = self.create_publisher(String, 'scene_description/text', LATCHED_QOS)
        self.description_json_pub = self.create_publisher(String, 'scene_description/json', LATCHED_QOS)
        self.markers_pub = self.create_publisher(MarkerArray, 'scene_description/markers', LATCHED_QOS)
        # Markers live as long as their data is fresh for answers (max_age_s on the context store's clock).
        self.markers = SceneMarkers(self.config.max_age_s, clock=self.contexts.now)
        self._described_generation = 0
        if self.config.description_rate_hz > 0:
            self.create_timer(1.0 / self.config.description_rate_hz, self.describe_callback,
                              callback_group=MutuallyExclusiveCallbackGroup())
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        if self.config.diagnostics_period_s > 0:
            self.create_timer(self.config.diagnostics_period_s, self.diagnostics_callback,
                              callback_group=MutuallyExclusiveCallbackGroup())

    def activate(self) -> None:
        self.engine.start()
        self.get_logger().info(f"serving {self.resolve_service_name('ask')} and "
                               f"{self.resolve_service_name('ask_stream')}")

    def finish_requests(self, reason: str) -> None:
        """Called by run_node on the first SIGINT/SIGTERM: every in-flight and queued /ask call and /ask_stream goal
        ends now with `reason` (success false; goals are aborted), and new ones get the same answer. run_node then
        lets the executor send those replies before it shuts down."""
        if self.engine is None:  # not configured (or cleaned up): nothing to end
            return
        in_flight = self.engine.queue_length
        self.get_logger().info(f'{reason}: ending {in_flight} request(s) in flight' if in_flight else reason)
        self.engine.close(reason)

    def deactivate(self) -> None:
        self.engine.stop(reason=INACTIVE)  # cancels the running generation, refuses the queued requests

    def cleanup(self) -> None:
        if self.engine is not None:
            self.engine.stop(reason=INACTIVE)
        # Entities are destroyed by the base.
        self.engine = self.answerer = self.store = self.contexts = self._action_server = None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        if self._action_server is not None:
            self._action_server.destroy()

    # ---- inputs -----------------------------------------------------------------------------
    def embedding_callback(self, source: str, msg: Embedding) -> None:
        vector = np.asarray(msg.embedding, dtype=np.float32)
        problem = None
        if vector.shape != (self.config.embedding_dim,):
            problem = f'dimension {vector.size} != {self.config.embedding_dim}'
        elif not np.all(np.isfinite(vector)):
            problem = 'non-finite values'
        if problem:
            self.dropped_embeddings += 1
            self.get_logger().warning(f'dropped {source} embedding from {msg.source_topic or "?"}: {problem}',
                                      throttle_duration_sec=5.0)
            return
        self.store.update(source, vector, stamp_to_ns(msg.header.stamp), msg.model, msg.source_topic)

    def context_callback(self, kind: str, msg: PerceptionContext) -> None:
        # Stored under the topic's kind, never the message's own `kind` field: a hostile publisher could otherwise
        # overwrite another input (an embedding with text) or grow the store with invented kinds. The text is
        # already short and structured; bound it once more. With context.format facts the model gets the result's
        # fact lines, rendered from its JSON (core/grounding/facts.py), as the grounded benchmark measures them.
        # Its scene entities are read once, here, and kept with the text: a description carries those of exactly
        # the contexts it used.
        stamp_ns = stamp_to_ns(msg.header.stamp)
        self.contexts.update(kind, prompt_text(kind, msg.text, msg.json, self.config.context_format,
                                               self.config.context_max_chars),
                             stamp_ns, source_topic=msg.source_topic,
                             payload=context_entities(kind, msg.json, msg.header.frame_id, stamp_ns, msg.source_topic))

    # ---- /ask and /ask_stream ------------------------------------------------------------------
    def ask_callback(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        if not self.active:
            return _fill(response, self._inactive())
        job = self.engine.submit(_to_ask_request(request))
        return _fill(response, job.wait())

    def ask_stream_execute(self, goal_handle) -> AskStream.Result:
        if not self.active:
            goal_handle.abort()
            return _fill(AskStream.Result(), self._inactive())
        feedback = AskStream.Feedback()

        def on_text(piece: str) -> None:
            feedback.partial_answer += piece
            feedback.new_text = piece
            feedback.tokens_generated += 1
            with self._unless_shutting_down():
                goal_handle.publish_feedback(feedback)

        job = self.engine.submit(_to_ask_request(goal_handle.request), on_text=on_text,
                                 should_stop=lambda: goal_handle.is_cancel_requested)
        result = job.wait()
        with self._unless_shutting_down():
            if result.cancelled and goal_handle.is_cancel_requested:
                goal_handle.canceled()
            elif result.success:
                goal_handle.succeed()
            else:
                goal_handle.abort()
        return _fill(AskStream.Result(), result)

    def _inactive(self) -> AskResult:
        return AskResult(False, error=INACTIVE, note=inactive_note(self))

    @contextlib.contextmanager
    def _unless_shutting_down(self):
        """Publishing fails once Ctrl-C has invalidated the context, before close() ends the engine and wakes the
        waiting goals; that is no error then (a goal's new state is still set, only not announced)."""
        try:
            yield
        except Exception:
            if self.context.ok():
                raise

    # ---- scene descriptions -------------------------------------------------------------------
    def describe_callback(self) -> None:
        # Markers whose data went stale are deleted on every tick (no model work, also while inactive); with a new
        # description, in the same MarkerArray as its markers.
        markers = self.markers.expire()
        result = self._describe() if self.active else None
        if result is not None:
            # Entities and markers come from the store entries the answer used, not from the store now.
            stamp_ns = self.get_clock().now().nanoseconds
            try:
                messages = self._description_messages(result, stamp_ns, SceneEntities.from_inputs(result.inputs))
                markers += self.markers.update(stored_entities(result.inputs))
            except Exception as exc:  # the core validates entities; should one slip through, keep describing
                self.get_logger().error(f'scene entities left out: {type(exc).__name__}: {exc}',
                                        throttle_duration_sec=10.0)
                messages = self._description_messages(result, stamp_ns, SceneEntities())
            for publisher, msg in zip((self.description_pub, self.description_text_pub, self.description_json_pub),
                                      messages):
                publisher.publish(msg)
        if markers:
            self.markers_pub.publish(marker_array(markers))

    @staticmethod
    def _description_messages(result: AskResult, stamp_ns: int, entities: SceneEntities) -> tuple:
        """SceneDescription, its text and its JSON mirror for one description."""
        description = (result.answer, stamp_ns, result.modalities_used, result.source_stamps_ns, result.latency_s,
                       entities)
        return (description_msg(*description), String(data=result.answer),
                String(data=json.dumps(scene_json(*description), ensure_ascii=False)))

    def _describe(self) -> AskResult | None:
        """A new scene description (a background job on the engine), or None when nothing is new or it is busy."""
        generation = self.engine.generation
        if generation == self._described_generation:
            return None  # nothing new since the last description
        request = AskRequest(self.config.description_prompt, max_new_tokens=self.config.description_max_new_tokens)
        result = self.engine.submit(request, background=True).wait()
        if not result.success:
            return None  # busy with users' questions: try again on the next tick
        self._described_generation = generation
        return result

    def diagnostics_callback(self) -> None:
        ages = self.store.ages() | self.contexts.ages()
        values = {'queue_length': self.engine.queue_length,
                  'time_to_first_token_p50_s': self.engine.time_to_first_token.percentile(50),
                  'tokens_per_s_p50': self.engine.tokens_per_s.percentile(50),
                  'dropped_embeddings': self.dropped_embeddings, 'device': self.answerer.device_description,
                  'active': self.active,
                  **{f'{k}_requests': v for k, v in self.engine.counts.items()},
                  **{f'age_{m}_s': ages.get(m, float('inf'))
                     for m in (*self.config.sources, *self.config.context_kinds)}}
        level = 'warn' if self.engine.queue_length >= self.config.max_queue else 'ok'
        status = make_status(f'{self.get_name()}: ImageBind-LLM', self.answerer.device_description, level,
                             f'{self.engine.queue_length} request(s) in flight' if self.active else INACTIVE, values)
        self.diagnostics_pub.publish(make_array(self.get_clock().now().to_msg(), [status]))


def _no_progress_bars() -> None:
    """transformers draws its own progress bars while loading weights ('Loading weights: 100%|####| 272/272'); in a
    node's log they are noise. Logged lines say what was loaded."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def _to_ask_request(msg) -> AskRequest:
    return AskRequest(question=msg.question, modalities=list(msg.modalities), max_age_s=float(msg.max_age_s),
                      max_new_tokens=int(msg.max_new_tokens))


def _fill(response, result: AskResult):
    response.success = result.success
    response.answer = result.answer
    response.error = result.error
    response.note = result.note
    response.modalities_used = list(result.modalities_used)
    response.source_stamps = [ns_to_stamp(ns) for ns in result.source_stamps_ns]
    response.latency_s = float(result.latency_s)
    response.tokens_generated = int(result.n_tokens)
    response.tokens_per_s = float(result.tokens_per_s) if math.isfinite(result.tokens_per_s) else 0.0
    return response


def main(args=None) -> None:
    exit_now(run_node(autostarted(LLMNode), args))


if __name__ == '__main__':
    main()
