"""Lifecycle transitions driven over DDS (lifecycle_msgs ChangeState/GetState, as `ros2 lifecycle set` does):
llm_node and the encoders pause, resume, release and reload their models; autostart brings them up by itself."""
import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.lifecycle import TransitionCallbackReturn
from sensor_msgs.msg import Image

import sample_msgs
from mm_llm_ros.ros.ask_client import ask_stream_client
from mm_llm_ros.ros.qos import EMBEDDING_QOS, SENSOR_QOS, SERVICE_QOS
from mm_llm_ros_interfaces.action import AskStream
from mm_llm_ros_interfaces.msg import Embedding
from mm_llm_ros_interfaces.srv import Ask
from ros_harness import services_by_node, wait_until

STAMP_NS = 1_700_000_000_000_000_000
PAUSED_STAMP_NS = STAMP_NS + 1_000_000_000   # frames sent while the encoder is inactive
RESUMED_STAMP_NS = STAMP_NS + 2_000_000_000
RELOADED_STAMP_NS = STAMP_NS + 3_000_000_000


class Lifecycle:
    """`ros2 lifecycle get/set` for one node, through its lifecycle services."""

    def __init__(self, test_node, node: str):
        self.test_node = test_node
        self.node = node
        self.change = test_node.node.create_client(ChangeState, f'/{node}/change_state')
        self.get = test_node.node.create_client(GetState, f'/{node}/get_state')

    def state(self, tries: int = 10, timeout_s: float = 3.0) -> str:
        """The node's state. A request goes nowhere while the client still matches the endpoints of a node of the
        same name that a previous test stopped (discovery has not dropped them yet), so an unanswered GetState,
        which changes nothing, is sent again (bounded); once one is answered, the live node's services match."""
        self.test_node.wait_for_service(self.get)
        for attempt in range(tries):
            future = self.get.call_async(GetState.Request())
            try:
                return self.test_node.result(future, timeout_s).current_state.label
            except TimeoutError:
                self.get.remove_pending_request(future)
                if attempt == tries - 1:
                    raise
        raise AssertionError('unreachable')

    def set(self, label: str, timeout_s: float = 60.0) -> bool:
        self.state()  # the live node answers (ChangeState is not idempotent, so it is never sent twice)
        self.test_node.wait_for_service(self.change)
        request = ChangeState.Request(transition=Transition(label=label))
        return self.test_node.result(self.change.call_async(request), timeout_s).success

    def close(self) -> None:
        self.test_node.node.destroy_client(self.change)
        self.test_node.node.destroy_client(self.get)


def services_of(test_node, node: str) -> set:
    return {name for name, _ in services_by_node(test_node.node, node)}


def status_values(arrays, name: str) -> dict:
    """The newest /diagnostics values of the status called `name`."""
    for array in reversed(arrays):
        for status in array.status:
            if status.name == name:
                return {kv.key: kv.value for kv in status.values} | {'message': status.message}
    return {}


@pytest.mark.parametrize('max_batch', [1, 4])  # the serial engine and continuous batching
def test_llm_node_pauses_resumes_releases_and_reloads(node_graph, test_node, config_dir, max_batch):
    process = node_graph.start('llm_node', params_files=[config_dir / 'tiny.yaml'],
                               params={'autostart': False, 'generation.context_length': 4096,
                                       'generation.max_new_tokens_cap': 4000, 'generation.max_batch': max_batch})
    life = Lifecycle(test_node, 'llm_node')
    ask_client = test_node.node.create_client(Ask, '/ask', qos_profile=SERVICE_QOS)
    stream_client = ask_stream_client(test_node.node, '/ask_stream')
    diagnostics = test_node.collect(DiagnosticArray, '/diagnostics')

    def ask():
        test_node.wait_for_service(ask_client)
        return test_node.result(ask_client.call_async(Ask.Request(question='What is there?', max_new_tokens=4)), 60)

    try:
        assert life.state() == 'unconfigured'
        wait_until(lambda: '/llm_node/get_state' in services_of(test_node, 'llm_node'), what="llm_node's services")
        assert '/ask' not in services_of(test_node, 'llm_node')  # nothing is served before the model is loaded
        assert 'LLM ready' not in process.log()

        assert life.set('configure') and life.state() == 'inactive'
        refused = ask()  # configured (model loaded) but not active yet
        assert not refused.success and refused.error == 'inactive'
        assert 'ros2 lifecycle set /llm_node activate' in refused.note

        assert life.set('activate') and life.state() == 'active'
        answered = ask()
        assert answered.success and answered.answer and answered.tokens_generated > 0

        # Deactivating stops a generation in flight: its goal ends "inactive", and so do new questions and goals.
        test_node.wait_for_action_server(stream_client)
        streamed = []
        goal = test_node.result(stream_client.send_goal_async(
            AskStream.Goal(question='Tell me a long story.', max_new_tokens=4000),
            feedback_callback=lambda msg: streamed.append(msg.feedback.new_text)))
        assert goal.accepted
        wait_until(lambda: streamed, 30, 'the first streamed tokens')
        assert life.set('deactivate') and life.state() == 'inactive'
        interrupted = test_node.result(goal.get_result_async(), 30)
        assert interrupted.status == GoalStatus.STATUS_ABORTED
        assert not interrupted.result.success and interrupted.result.error == 'inactive'
        assert interrupted.result.tokens_generated < 4000
        refused = ask()
        assert not refused.success and refused.error == 'inactive' and refused.answer == ''
        goal = test_node.result(stream_client.send_goal_async(AskStream.Goal(question='Still there?')))
        result = test_node.result(goal.get_result_async(), 30)
        assert result.status == GoalStatus.STATUS_ABORTED and result.result.error == 'inactive'
        diagnostics.wait_for(lambda msgs: status_values(msgs, 'llm_node: ImageBind-LLM').get('active') == 'False',
                             what='llm_node diagnostics saying inactive')

        assert life.set('activate') and ask().success

        # cleanup releases the model and takes /ask away; configure loads it again.
        assert life.set('deactivate') and life.set('cleanup') and life.state() == 'unconfigured'
        assert 'models released' in process.log()
        wait_until(lambda: '/ask' not in services_of(test_node, 'llm_node'), what='/ask to disappear')
        assert life.set('configure') and life.set('activate') and life.state() == 'active'
        assert process.log().count('LLM ready') == 2  # built anew, not kept
        assert ask().success
        assert process.alive() and 'Traceback' not in process.log()
    finally:
        stream_client.destroy()
        test_node.node.destroy_client(ask_client)
        diagnostics.close()
        life.close()
    assert process.stop() == 0


def test_a_failed_configure_says_why_in_one_line_and_the_node_stays_up(node_graph, test_node, config_dir):
    process = node_graph.start('llm_node', params_files=[config_dir / 'tiny.yaml'],
                               params={'autostart': False, 'llm.preset': ''})
    life = Lifecycle(test_node, 'llm_node')
    try:
        assert not life.set('configure')
        assert life.state() == 'unconfigured' and process.alive()
        log = process.log()
        assert 'cannot configure: no LLM configured' in log and 'Traceback' not in log
    finally:
        life.close()
    assert process.stop() == 0  # shut down from unconfigured: clean


def test_an_inactive_encoder_drops_and_counts_input_and_resumes_with_fresh_frames(node_graph, test_node, config_dir):
    process = node_graph.start('camera_encoder', params_files=[config_dir / 'tiny.yaml'], params={'autostart': False})
    life = Lifecycle(test_node, 'camera_encoder')
    out = test_node.collect(Embedding, '/mm_llm/embedding/camera', EMBEDDING_QOS)
    diagnostics = test_node.collect(DiagnosticArray, '/diagnostics')
    pub = test_node.node.create_publisher(Image, '/camera/image_raw', SENSOR_QOS)
    rgb = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)

    def frame(stamp_ns):
        return lambda: sample_msgs.image_msg(rgb, stamp_ns)

    def embedded(stamp_ns):
        return lambda: [m for m in list(out.messages)
                        if m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == stamp_ns]

    def dropped_inactive():
        return int(status_values(diagnostics.messages, 'camera_encoder: camera').get('dropped_inactive', 0))

    try:
        assert life.state() == 'unconfigured'
        assert life.set('configure') and life.set('activate') and life.state() == 'active'
        test_node.wait_for_subscribers(pub)
        test_node.publish_until(pub, frame(STAMP_NS), embedded(STAMP_NS), what='an embedding while active')

        assert life.set('deactivate') and life.state() == 'inactive'
        before = dropped_inactive()
        test_node.publish_until(pub, frame(PAUSED_STAMP_NS), lambda: dropped_inactive() >= before + 5,
                                what='inactive drops counted in /diagnostics')
        assert status_values(diagnostics.messages, 'camera_encoder: camera')['message'].startswith('inactive')

        assert life.set('activate')
        test_node.publish_until(pub, frame(RESUMED_STAMP_NS), embedded(RESUMED_STAMP_NS),
                                what='an embedding after activate')
        assert not embedded(PAUSED_STAMP_NS)()  # nothing received while inactive was encoded, then or later

        assert life.set('deactivate') and life.set('cleanup') and life.state() == 'unconfigured'
        assert 'models released' in process.log()
        assert life.set('configure') and life.set('activate')
        assert process.log().count('runs with RANDOM weights') == 2  # the shared model was built again
        test_node.publish_until(pub, frame(RELOADED_STAMP_NS), embedded(RELOADED_STAMP_NS),
                                what='an embedding after cleanup + configure')
        assert life.set('deactivate')
        assert process.alive() and 'Traceback' not in process.log()
    finally:
        test_node.node.destroy_publisher(pub)
        out.close()
        diagnostics.close()
        life.close()
    assert process.stop() == 0  # shut down from inactive: clean


def test_autostart_brings_llm_node_and_the_encoder_process_to_active(node_graph, test_node, config_dir):
    """...and the shutdown transition from active releases everything; the process then still exits cleanly."""
    llm = node_graph.start('llm_node', params_files=[config_dir / 'tiny.yaml'])
    encoder = node_graph.start('encoder', params_files=[config_dir / 'tiny.yaml'])
    llm.wait_for_log('serving', timeout_s=60)
    encoder.wait_for_log('encoding ', timeout_s=60)
    for node, process in (('llm_node', llm), ('encoder', encoder)):
        life = Lifecycle(test_node, node)
        try:
            assert life.state() == 'active'
            assert life.set('shutdown') and life.state() == 'finalized'
            assert 'models released' in process.log()
        finally:
            life.close()
    wait_until(lambda: '/ask' not in services_of(test_node, 'llm_node'), what='/ask to disappear')
    for process in (llm, encoder):
        assert process.stop() == 0 and 'Traceback' not in process.log()


def test_cleanup_leaves_no_reference_to_the_models(config_dir):
    """In this process, through the same transitions: after cleanup nothing holds the LLM or ImageBind any more,
    so their memory (and CUDA's, emptied by cleanup) is free. A weak reference to each model must die."""
    import gc
    import weakref

    import rclpy
    from lifecycle_msgs.msg import State
    from mm_llm_ros.ros.encoder_node import EncoderNode
    from mm_llm_ros.ros.llm_node import LLMNode

    rclpy.init(args=['--ros-args', '--params-file', str(config_dir / 'tiny.yaml'), '-p', 'autostart:=false'])
    try:
        for node in (LLMNode(), EncoderNode('camera_encoder')):
            try:
                assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
                model = weakref.ref(node.answerer.model if isinstance(node, LLMNode) else node.encoder._model)
                assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
                assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
                assert model() is not None  # deactivate keeps the model loaded
                assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
                assert node._state_machine.current_state[0] == State.PRIMARY_STATE_UNCONFIGURED
                gc.collect()
                assert model() is None, f'{node.get_name()} still holds its model after cleanup'
            finally:
                node.destroy_node()
    finally:
        rclpy.try_shutdown()
