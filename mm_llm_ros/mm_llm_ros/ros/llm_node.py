"""llm_node: the ImageBind-LLM node. Fuses the latest embeddings, answers /ask and /ask_stream, and publishes
scene descriptions: the text, the entities it is based on (objects, texts, sounds from the perception context it
used), their JSON mirror and markers of the objects (core/grounding/entities.py, markers.py).

Threads: embedding subscriptions and timers run on their own callback groups; /ask and /ask_stream callbacks run on
a reentrant group and only wait for their own job, which the single generation worker in `AskEngine` serves in
order (or, with generation.max_batch > 1, decodes together with others: `batch_engine.BatchedAskEngine`). The
executor has max_queue + 4 threads, so waiting callbacks can never starve subscriptions or timers.

Fleet mode (`robots: [robot1, robot2]`, core/fleet.py): the one model and engine serve every listed robot, each with
its own inputs and endpoints under its namespace (`RobotEndpoints`); an empty list is one robot, the node's own
namespace, with the same code.

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
from mm_llm_ros.core.fleet import Robot, robot_namespaces
from mm_llm_ros.core.grounding.entities import SceneEntities, context_entities, scene_json, stored_entities
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
        # The executor is built before configure runs: sized from the (read-only) declared queue bound, plus one
        # thread per robot for its description timer, which waits for its description.
        robots = len(self.get_parameter_or('robots').value or ()) or 1
        self.executor_threads = self.get_parameter('max_queue').value + 3 + robots
        self.engine = None
        self.robots: list[RobotEndpoints] = []

    # ---- lifecycle ------------------------------------------------------------------------------
    def configure(self, params) -> None:
        self.config = LLMConfig.from_params(params)
        namespaces = robot_namespaces(self.config.robots)  # refused before the model loads
        _no_progress_bars()
        self.answerer = build_answerer(self.config)  # its StartupErrors (checkpoint, config, device) refuse configure
        self.get_logger().info(f'LLM ready: {self.answerer.description}')
        if not self.answerer.sensors_inform_answers:
            self.get_logger().warning('bind network untrained/zero-gated: sensor embeddings do not inform answers')

        # One engine (one model copy, one queue and batch) for every robot; each robot's jobs carry its stores.
        robots = [Robot(namespace) for namespace in namespaces]
        self.engine = make_engine(self.answerer, robots[0].store, AskLimits(
            known_modalities=self.config.sources + tuple(self.config.context_kinds),
            groups={m: sources_of(m) for m in self.config.modalities},
            max_queue=self.config.max_queue,
            max_question_chars=self.config.max_question_chars, default_max_age_s=self.config.max_age_s,
            default_max_new_tokens=self.config.generation.max_new_tokens,
            max_new_tokens_cap=self.config.max_new_tokens_cap), line_template=self.config.context_template,
            contexts=robots[0].contexts)
        requests = ReentrantCallbackGroup()
        self.robots = [RobotEndpoints(self, robot, requests) for robot in robots]
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        if self.config.diagnostics_period_s > 0:
            self.create_timer(self.config.diagnostics_period_s, self.diagnostics_callback,
                              callback_group=MutuallyExclusiveCallbackGroup())

    @property
    def fleet(self) -> bool:
        """Serving robots listed in `robots` (rather than the node's own namespace)."""
        return bool(self.config.robots)

    def activate(self) -> None:
        self.engine.start()
        self.get_logger().info('serving ' + ', '.join(
            f"{self.resolve_service_name(r.robot.topic('ask'))} and "
            f"{self.resolve_service_name(r.robot.topic('ask_stream'))}" for r in self.robots))

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
        # Entities (every robot's too) are destroyed by the base.
        self.engine = self.answerer = None
        self.robots = []

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        for endpoints in self.robots:
            endpoints.action_server.destroy()

    def inactive_result(self) -> AskResult:
        return AskResult(False, error=INACTIVE, note=inactive_note(self))

    @contextlib.contextmanager
    def unless_shutting_down(self):
        """Publishing fails once Ctrl-C has invalidated the context, before close() ends the engine and wakes the
        waiting goals; that is no error then (a goal's new state is still set, only not announced)."""
        try:
            yield
        except Exception:
            if self.context.ok():
                raise

    # ---- diagnostics --------------------------------------------------------------------------
    def diagnostics_callback(self) -> None:
        values = {'queue_length': self.engine.queue_length,
                  'time_to_first_token_p50_s': self.engine.time_to_first_token.percentile(50),
                  'tokens_per_s_p50': self.engine.tokens_per_s.percentile(50),
                  'dropped_embeddings': sum(r.robot.dropped_embeddings for r in self.robots),
                  'device': self.answerer.device_description,
                  'active': self.active,
                  **{f'{k}_requests': v for k, v in self.engine.counts.items()}}
        if self.fleet:
            values['robots'] = ' '.join(r.robot.label for r in self.robots)
        else:
            values |= self.robots[0].input_ages()
        level = 'warn' if self.engine.queue_length >= self.config.max_queue else 'ok'
        status = make_status(f'{self.get_name()}: ImageBind-LLM', self.answerer.device_description, level,
                             f'{self.engine.queue_length} request(s) in flight' if self.active else INACTIVE, values)
        # Fleet mode: one status more per robot, with its inputs' ages and drops.
        robots = [make_status(f'{self.get_name()}: {r.robot.label}', self.answerer.device_description, 'ok',
                              f'inputs of {r.robot.label}',
                              {'dropped_embeddings': r.robot.dropped_embeddings, **r.input_ages()})
                  for r in self.robots] if self.fleet else []
        self.diagnostics_pub.publish(make_array(self.get_clock().now().to_msg(), [status, *robots]))


class RobotEndpoints:
    """One robot's side of llm_node: subscriptions to its embeddings and context (into its `Robot`'s stores), its
    ask service and ask_stream action, and its scene descriptions, all named under the robot's namespace (relative
    names: the node's own namespace for the single robot). Entities are created on the node in configure, so the
    lifecycle base destroys them in cleanup like any other."""

    def __init__(self, node: LLMNode, robot: Robot, requests: ReentrantCallbackGroup):
        self.node, self.robot, self.config = node, robot, node.config
        sensors = MutuallyExclusiveCallbackGroup()
        for source in self.config.sources:
            node.create_subscription(Embedding, robot.topic(EMBEDDING_TOPIC.format(source=source)),
                                     lambda msg, s=source: self.embedding_callback(s, msg), EMBEDDING_QOS,
                                     callback_group=sensors)
        for kind in self.config.context_kinds:
            node.create_subscription(PerceptionContext, robot.topic(CONTEXT_TOPIC.format(kind=kind)),
                                     lambda msg, k=kind: self.context_callback(k, msg), LATCHED_QOS,
                                     callback_group=sensors)
        node.create_service(Ask, robot.topic('ask'), self.ask_callback, qos_profile=SERVICE_QOS,
                            callback_group=requests)
        self.action_server = ActionServer(
            node, AskStream, robot.topic('ask_stream'), execute_callback=self.ask_stream_execute,
            goal_callback=lambda _goal: GoalResponse.ACCEPT, cancel_callback=lambda _goal: CancelResponse.ACCEPT,
            goal_service_qos_profile=SERVICE_QOS, result_service_qos_profile=SERVICE_QOS,
            cancel_service_qos_profile=SERVICE_QOS, feedback_pub_qos_profile=FEEDBACK_QOS, callback_group=requests)

        self.description_pub = node.create_publisher(SceneDescription, robot.topic('scene_description'), LATCHED_QOS)
        self.description_text_pub = node.create_publisher(String, robot.topic('scene_description/text'),
                                                          LATCHED_QOS)
        self.description_json_pub = node.create_publisher(String, robot.topic('scene_description/json'),
                                                          LATCHED_QOS)
        self.markers_pub = node.create_publisher(MarkerArray, robot.topic('scene_description/markers'), LATCHED_QOS)
        # Markers live as long as their data is fresh for answers (max_age_s on the context store's clock).
        self.markers = SceneMarkers(self.config.max_age_s, clock=robot.contexts.now)
        if self.config.description_rate_hz > 0:
            node.create_timer(1.0 / self.config.description_rate_hz, self.describe_callback,
                              callback_group=MutuallyExclusiveCallbackGroup())

    # ---- inputs -----------------------------------------------------------------------------
    def embedding_callback(self, source: str, msg: Embedding) -> None:
        vector = np.asarray(msg.embedding, dtype=np.float32)
        problem = None
        if vector.shape != (self.config.embedding_dim,):
            problem = f'dimension {vector.size} != {self.config.embedding_dim}'
        elif not np.all(np.isfinite(vector)):
            problem = 'non-finite values'
        if problem:
            self.robot.dropped_embeddings += 1
            self.node.get_logger().warning(f'dropped {source} embedding from {msg.source_topic or "?"}: {problem}',
                                           throttle_duration_sec=5.0)
            return
        self.robot.store.update(source, vector, stamp_to_ns(msg.header.stamp), msg.model, msg.source_topic)

    def context_callback(self, kind: str, msg: PerceptionContext) -> None:
        # Stored under the topic's kind, never the message's own `kind` field: a hostile publisher could otherwise
        # overwrite another input (an embedding with text) or grow the store with invented kinds. The text is
        # already short and structured; bound it once more. With context.format facts the model gets the result's
        # fact lines, rendered from its JSON (core/grounding/facts.py), as the grounded benchmark measures them.
        # Its scene entities are read once, here, and kept with the text: a description carries those of exactly
        # the contexts it used.
        stamp_ns = stamp_to_ns(msg.header.stamp)
        self.robot.contexts.update(kind, prompt_text(kind, msg.text, msg.json, self.config.context_format,
                                                     self.config.context_max_chars),
                                   stamp_ns, source_topic=msg.source_topic,
                                   payload=context_entities(kind, msg.json, msg.header.frame_id, stamp_ns,
                                                            msg.source_topic))

    def input_ages(self) -> dict[str, float]:
        ages = self.robot.ages()
        return {f'age_{m}_s': ages.get(m, float('inf')) for m in (*self.config.sources, *self.config.context_kinds)}

    # ---- ask and ask_stream --------------------------------------------------------------------
    def ask_callback(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        if not self.node.active:
            return _fill(response, self.node.inactive_result())
        job = self.node.engine.submit(_to_ask_request(request), robot=self.robot)
        return _fill(response, job.wait())

    def ask_stream_execute(self, goal_handle) -> AskStream.Result:
        if not self.node.active:
            goal_handle.abort()
            return _fill(AskStream.Result(), self.node.inactive_result())
        feedback = AskStream.Feedback()

        def on_text(piece: str) -> None:
            feedback.partial_answer += piece
            feedback.new_text = piece
            feedback.tokens_generated += 1
            with self.node.unless_shutting_down():
                goal_handle.publish_feedback(feedback)

        job = self.node.engine.submit(_to_ask_request(goal_handle.request), on_text=on_text,
                                      should_stop=lambda: goal_handle.is_cancel_requested, robot=self.robot)
        result = job.wait()
        with self.node.unless_shutting_down():
            if result.cancelled and goal_handle.is_cancel_requested:
                goal_handle.canceled()
            elif result.success:
                goal_handle.succeed()
            else:
                goal_handle.abort()
        return _fill(AskStream.Result(), result)

    # ---- scene descriptions -------------------------------------------------------------------
    def describe_callback(self) -> None:
        # Markers whose data went stale are deleted on every tick (no model work, also while inactive); with a new
        # description, in the same MarkerArray as its markers.
        markers = self.markers.expire()
        result = self._describe() if self.node.active else None
        if result is not None:
            # Entities and markers come from the store entries the answer used, not from the store now.
            stamp_ns = self.node.get_clock().now().nanoseconds
            try:
                messages = _description_messages(result, stamp_ns, SceneEntities.from_inputs(result.inputs))
                markers += self.markers.update(stored_entities(result.inputs))
            except Exception as exc:  # the core validates entities; should one slip through, keep describing
                self.node.get_logger().error(f'scene entities left out: {type(exc).__name__}: {exc}',
                                             throttle_duration_sec=10.0)
                messages = _description_messages(result, stamp_ns, SceneEntities())
            for publisher, msg in zip((self.description_pub, self.description_text_pub, self.description_json_pub),
                                      messages):
                publisher.publish(msg)
        if markers:
            self.markers_pub.publish(marker_array(markers))

    def _describe(self) -> AskResult | None:
        """A new scene description of this robot (a background job on the engine), or None when nothing is new or
        the engine is busy."""
        generation = self.robot.generation
        if generation == self.robot.described_generation:
            return None  # nothing new from this robot since its last description
        request = AskRequest(self.config.description_prompt, max_new_tokens=self.config.description_max_new_tokens)
        result = self.node.engine.submit(request, background=True, robot=self.robot).wait()
        if not result.success:
            return None  # busy with users' questions: try again on the next tick
        self.robot.described_generation = generation
        return result


def _description_messages(result: AskResult, stamp_ns: int, entities: SceneEntities) -> tuple:
    """SceneDescription, its text and its JSON mirror for one description."""
    description = (result.answer, stamp_ns, result.modalities_used, result.source_stamps_ns, result.latency_s,
                   entities)
    return (description_msg(*description), String(data=result.answer),
            String(data=json.dumps(scene_json(*description), ensure_ascii=False)))


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
