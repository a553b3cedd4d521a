"""Fleet mode over DDS: one llm_node process (one model copy) serves /robot1 and /robot2, and each robot's answers,
streams and scene descriptions are built from that robot's embeddings and context only.

The proof of isolation has two halves:
- Context: the tiny model decodes greedily (config/tiny.yaml), so an answer is a function of the question and of
  the context text that reaches the prompt. A single-robot llm_node (namespace /solo) is given robot1's data alone,
  then robot2's data alone: what it answers each time is what robot1 and robot2 must answer in the fleet, where both
  robots' data sit in one process (and the two references differ, so the equality can fail). These questions ask
  for the OCR context only: with the tiny model's random bind network, any embedding drowns out the text (all
  embeddings give the same answer), so the embeddings' half is proven by provenance instead.
- Embeddings: every answer and description lists the inputs it was built from with their source stamps, and each
  stored embedding carries its message's stamp; each robot publishes its own stamp, so an answer whose stamps are
  all its robot's was built from that robot's embedding and context entries only.
"""
import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray

from mm_llm_ros import fleet_policy
from mm_llm_ros.ros.ask_client import ask_stream_client
from mm_llm_ros.ros.qos import EMBEDDING_QOS, LATCHED_QOS, SERVICE_QOS
from mm_llm_ros_interfaces.action import AskStream
from mm_llm_ros_interfaces.msg import Embedding, PerceptionContext, SceneDescription
from mm_llm_ros_interfaces.srv import Ask
from ros_harness import wait_until
from test_lifecycle import Lifecycle, services_of, status_values
from test_reliability import names_used_by, policy_rules

ROBOTS = ('robot1', 'robot2')
STAMPS = {'robot1': 1_700_000_001_000_000_000, 'robot2': 1_700_000_002_000_000_000}
TEXTS = {'robot1': "'PLATFORM 9' (0.97, left)", 'robot2': "'EXIT 4' (0.91, right)"}
SEEDS = {'robot1': 1, 'robot2': 2}
QUESTION = 'What is in front of the robot?'
ASK = {'question': QUESTION, 'max_new_tokens': 12, 'max_age_s': 600.0}
ASK_CONTEXT = ASK | {'modalities': ['ocr']}


def _stamp(ns):
    return divmod(ns, 10**9)


class RobotData:
    """Publishes one robot's camera embedding and OCR context into a namespace, as its encoder and grounding_node
    would, and asks that namespace's /ask."""

    def __init__(self, test_node, namespace: str):
        self.test_node, self.namespace = test_node, namespace
        node = test_node.node
        self.embedding_pub = node.create_publisher(Embedding, f'/{namespace}/mm_llm/embedding/camera', EMBEDDING_QOS)
        self.context_pub = node.create_publisher(PerceptionContext, f'/{namespace}/mm_llm/context/ocr', LATCHED_QOS)
        self.ask_client = node.create_client(Ask, f'/{namespace}/ask', qos_profile=SERVICE_QOS)

    def publish(self, robot: str) -> None:
        """Publish `robot`'s data (distinct vector, text and stamp per robot)."""
        msg = Embedding(modality='vision', model='tiny-random', source_topic=f'/{robot}/camera/image_raw',
                        embedding=np.random.default_rng(SEEDS[robot]).standard_normal(1024).astype(np.float32))
        msg.header.stamp.sec, msg.header.stamp.nanosec = _stamp(STAMPS[robot])
        context = PerceptionContext(kind='ocr', text=TEXTS[robot], source_topic=f'/{robot}/camera/image_raw')
        context.header.stamp = msg.header.stamp
        self.embedding_pub.publish(msg)
        self.context_pub.publish(context)

    def ask(self, fields=ASK, timeout_s: float = 120.0) -> Ask.Response:
        return self.test_node.call(self.ask_client, Ask.Request(**fields), timeout_s)

    def ask_once_arrived(self, robot: str) -> Ask.Response:
        """Publish `robot`'s data until an answer is built from both of its inputs (bounded in count: the node's
        subscriptions may match after the publisher sees them)."""
        for pub in (self.embedding_pub, self.context_pub):
            self.test_node.wait_for_subscribers(pub)
        response = None
        for _ in range(50):
            self.publish(robot)
            response = self.ask()
            if sorted(response.modalities_used) == ['camera', 'ocr'] and all(
                    (s.sec, s.nanosec) == _stamp(STAMPS[robot]) for s in response.source_stamps):
                return response
        raise AssertionError(f'/{self.namespace} never answered from {robot} data: {response}')

    def close(self) -> None:
        for pub in (self.embedding_pub, self.context_pub):
            self.test_node.node.destroy_publisher(pub)
        self.test_node.node.destroy_client(self.ask_client)


@pytest.fixture
def robot_data(test_node):
    made = []

    def make(namespace):
        made.append(RobotData(test_node, namespace))
        return made[-1]
    yield make
    for data in made:
        data.close()


def _start_fleet(node_graph, config_dir, **params):
    process = node_graph.start('llm_node', params_files=[config_dir / 'tiny.yaml'],
                               params={'robots': list(ROBOTS), **params})
    return process


@pytest.mark.parametrize('max_batch', [1, 4])  # the serial engine, and both robots' questions in one batch
def test_each_robot_is_answered_from_its_own_data_only(node_graph, test_node, config_dir, robot_data, collect,
                                                       max_batch, tmp_path):
    fleet = _start_fleet(node_graph, config_dir, **{'description.rate_hz': 2.0, 'generation.max_batch': max_batch,
                                                    'max_queue': 8})
    solo = node_graph.start('llm_node', params_files=[config_dir / 'tiny.yaml'],
                            params={'description.rate_hz': 0.0}, remap={'__ns': '/solo'})
    descriptions = {r: collect(SceneDescription, f'/{r}/scene_description', LATCHED_QOS) for r in ROBOTS}
    diagnostics = collect(DiagnosticArray, '/diagnostics', 10)
    fleet.wait_for_log('serving', timeout_s=60)
    solo.wait_for_log('serving', timeout_s=60)
    assert 'serving /robot1/ask and /robot1/ask_stream, /robot2/ask and /robot2/ask_stream' in fleet.log()

    # The references: a single-robot node given one robot's data, then the other's.
    reference_node = robot_data('solo')
    reference = {}
    for robot in ROBOTS:
        reference_node.ask_once_arrived(robot)
        reference[robot] = reference_node.ask(ASK_CONTEXT)
    assert reference['robot1'].answer != reference['robot2'].answer  # the context decides the answer

    # The fleet node holds both robots' data at once.
    robots = {r: robot_data(r) for r in ROBOTS}
    answers = {r: robots[r].ask_once_arrived(r) for r in ROBOTS}
    for robot in ROBOTS:
        robots[robot].publish(robot)  # the latest of each robot arrives again: nothing of the other's leaks in
    answers = {r: robots[r].ask() for r in ROBOTS} | {f'{r} first': answers[r] for r in ROBOTS}
    for name, answer in answers.items():
        robot = name.split()[0]
        assert answer.success, answer.error
        assert sorted(answer.modalities_used) == ['camera', 'ocr']
        assert [(s.sec, s.nanosec) for s in answer.source_stamps] == [_stamp(STAMPS[robot])] * 2, name
    for robot in ROBOTS:
        answer = robots[robot].ask(ASK_CONTEXT)
        assert answer.success and answer.modalities_used == ['ocr']
        assert answer.answer == reference[robot].answer, f'{robot} answered from another context than its own'
    # Both robots ask at once (with max_batch 4 their questions decode in one batch): each still gets its own.
    futures = [(r, robots[r].ask_client.call_async(Ask.Request(**ASK_CONTEXT))) for r in ROBOTS * 3]
    for robot, future in futures:
        answer = test_node.result(future, 120)
        assert answer.success and answer.answer == reference[robot].answer, f'{robot} in company got another answer'

    # /robot2/ask_stream streams robot2's answer.
    stream = ask_stream_client(test_node.node, '/robot2/ask_stream')
    try:
        test_node.wait_for_action_server(stream)
        goal = test_node.result(stream.send_goal_async(AskStream.Goal(**ASK)))
        result = test_node.result(goal.get_result_async(), 120)
    finally:
        stream.destroy()
    assert result.status == GoalStatus.STATUS_SUCCEEDED and result.result.answer == answers['robot2'].answer
    assert [(s.sec, s.nanosec) for s in result.result.source_stamps] == [_stamp(STAMPS['robot2'])] * 2

    # Each robot's scene descriptions: its own timer, its own inputs.
    for robot in ROBOTS:
        descriptions[robot].wait_for(
            lambda msgs, r=robot: any(sorted(m.modalities) == ['camera', 'ocr'] for m in msgs), timeout_s=60,
            what=f'a description of {robot} from its camera and OCR')
        stamps = {(s.sec, s.nanosec) for m in descriptions[robot].messages for s in m.source_stamps}
        assert stamps == {_stamp(STAMPS[robot])}, f"{robot}'s descriptions used another robot's data"

    # The fleet node serves the robots' namespaces, not its own; diagnostics have one status per robot.
    # (The graph cache fills in as discovery announces each endpoint: wait for it, bounded.)
    served = wait_until(lambda: (lambda names: names if {'/robot1/ask', '/robot2/ask'} <= names else None)(
        services_of(test_node, 'llm_node')), what="the fleet node's /robot1/ask and /robot2/ask in the graph")
    assert '/ask' not in served and '/llm_node/ask' not in served
    # The fleet's SROS2 policy (fleet_policy) allows everything the fleet node uses, per robot.
    policy = tmp_path / 'fleet.policy.xml'
    assert fleet_policy.main(['--robots', *ROBOTS, '--out', str(policy)]) == 0
    rules = policy_rules('llm_node', policy)
    for permission, names in names_used_by(test_node.node, 'llm_node').items():
        assert names and names <= rules[permission], (permission, sorted(names - rules[permission]))
    assert {f'/{r}/ask' for r in ROBOTS} <= rules['reply'] and '/ask' not in rules['reply']
    for robot in ROBOTS:
        values = diagnostics.wait_for(lambda msgs, r=robot: status_values(msgs, f'llm_node: {r}').get('age_ocr_s'),
                                      what=f'diagnostics of {robot}')
        assert values and float(status_values(diagnostics.messages, f'llm_node: {robot}')['age_camera_s']) < 600
    # The node's own status names its robots (/solo/llm_node publishes a status of the same name, without them).
    diagnostics.wait_for(lambda msgs: any(
        kv.key == 'robots' and kv.value == 'robot1 robot2' for array in msgs for status in array.status
        if status.name == 'llm_node: ImageBind-LLM' for kv in status.values), what="the fleet node's status")
    assert 'Traceback' not in fleet.log()


def test_fleet_endpoints_follow_the_lifecycle(node_graph, test_node, config_dir, robot_data):
    process = _start_fleet(node_graph, config_dir, autostart=False, **{'description.rate_hz': 0.0})
    life = Lifecycle(test_node, 'llm_node')
    robots = {r: robot_data(r) for r in ROBOTS}
    try:
        assert life.state() == 'unconfigured'
        assert not {'/robot1/ask', '/robot2/ask'} & services_of(test_node, 'llm_node')
        assert life.set('configure')
        assert all(not robots[r].ask().success and robots[r].ask().error == 'inactive' for r in ROBOTS)
        assert life.set('activate')
        assert all(robots[r].ask().success for r in ROBOTS)
        assert life.set('deactivate') and life.set('cleanup') and life.state() == 'unconfigured'
        wait_until(lambda: not {'/robot1/ask', '/robot2/ask'} & services_of(test_node, 'llm_node'),
                   what="the robots' /ask to disappear")
        assert life.set('configure') and life.set('activate')
        assert all(robots[r].ask().success for r in ROBOTS)
        assert process.alive() and 'Traceback' not in process.log()
    finally:
        life.close()


@pytest.mark.parametrize('robots, reason', [
    (['robot1', 'robot1'], "robots: 'robot1' is listed twice"),
    (['robot 1'], "robots: 'robot 1' is not a robot namespace"),
])
def test_a_bad_robot_list_refuses_to_start_naming_it(node_graph, config_dir, robots, reason):
    process = node_graph.start('llm_node', params_files=[config_dir / 'tiny.yaml'], params={'robots': robots})
    wait_until(lambda: not process.alive(), timeout_s=60, what='llm_node to exit')
    assert process.popen.returncode == 1 and reason in process.log()
    assert 'LLM ready' not in process.log()  # refused before the model loads
