"""Fleet mode's core: robot namespaces, per-robot stores, and one engine answering each robot from its own data."""
import numpy as np
import pytest

from mm_llm_ros.core.answering import BUSY, AskEngine, AskLimits, AskRequest
from mm_llm_ros.core.batch_engine import BatchedAskEngine
from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.fleet import OWN_NAMESPACE, Robot, robot_namespaces
from test_answering import ScriptedAnswerer
from test_batch_engine import WAIT_S, ScriptedBatchAnswerer, _until

MODALITIES = ('camera', 'audio', 'ocr', 'geometry')


def test_an_empty_list_is_the_nodes_own_namespace():
    assert robot_namespaces([]) == (OWN_NAMESPACE,)
    assert Robot().topic('ask') == 'ask' and Robot().topic('mm_llm/embedding/camera') == 'mm_llm/embedding/camera'


def test_robot_names_prefix_every_topic():
    assert robot_namespaces(['robot1', 'site_a/robot2', '/robot3']) == ('robot1', 'site_a/robot2', '/robot3')
    assert Robot('robot1').topic('scene_description/text') == 'robot1/scene_description/text'
    assert Robot('/robot3').topic('ask') == '/robot3/ask' and Robot('/robot3').label == 'robot3'


@pytest.mark.parametrize('names, reason', [
    ([''], "'' is not a robot namespace"),
    (['robot 1'], "'robot 1' is not"),
    (['1robot'], "'1robot' is not"),
    (['robot1/'], "'robot1/' is not"),
    (['~/robot1'], 'is not'),
    (['robot__1'], 'is not'),
    (['robot1', 'robot2', 'robot1'], "'robot1' is listed twice"),
    (['robot1', '/robot1'], "'robot1' is listed twice"),
])
def test_bad_robot_lists_are_refused_naming_the_entry(names, reason):
    with pytest.raises(ConfigError, match='robots: ') as error:
        robot_namespaces(names)
    assert reason in str(error.value)


def test_a_robots_generation_counts_its_embeddings_and_its_context():
    robot, other = Robot('robot1'), Robot('robot2')
    before = robot.generation
    robot.store.update('camera', np.ones(4), 1)
    robot.contexts.update('ocr', 'EXIT', 1)
    assert robot.generation == before + 2 and other.generation == 0
    assert set(robot.ages()) == {'camera', 'ocr'} and other.ages() == {}


def _fill(robot, vector, text, stamp):
    robot.store.update('camera', np.full(4, vector, np.float32), stamp)
    robot.contexts.update('ocr', text, stamp)


def test_one_engine_answers_each_robot_from_its_own_stores_only():
    robots = [Robot('robot1'), Robot('robot2'), Robot('robot3')]
    _fill(robots[0], 1.0, 'PLATFORM 9', 111)
    _fill(robots[1], 2.0, 'EXIT 4', 222)  # robot3 has perceived nothing
    answerer = ScriptedAnswerer()
    engine = AskEngine(answerer, robots[0].store, AskLimits(MODALITIES), contexts=robots[0].contexts)
    engine.start()
    try:
        results = [engine.submit(AskRequest('What is here?'), robot=r).wait(WAIT_S) for r in robots]
    finally:
        engine.stop()
    assert [r.source_stamps_ns for r in results] == [[111, 111], [222, 222], []]
    assert [r.modalities_used for r in results] == [['camera', 'ocr'], ['camera', 'ocr'], []]
    assert answerer.contexts[0] == 'Text read by the camera: PLATFORM 9'
    assert answerer.contexts[1] == 'Text read by the camera: EXIT 4'
    assert 'Nothing has been perceived' in answerer.contexts[2] and 'nothing perceived' in results[2].note


def test_batched_descriptions_are_one_background_sequence_per_robot():
    answerer = ScriptedBatchAnswerer(max_batch=3)
    robots = [Robot('robot1'), Robot('robot2')]
    engine = BatchedAskEngine(answerer, robots[0].store, AskLimits(MODALITIES, max_queue=3),
                              contexts=robots[0].contexts)
    engine.start()
    try:
        first = engine.submit(AskRequest('describe one'), background=True, robot=robots[0])
        _until(lambda: engine.decoding == 1, 'robot1 describing')
        # robot2's description joins the batch; a second one of robot1 is refused until its first is done.
        second = engine.submit(AskRequest('describe two'), background=True, robot=robots[1])
        answerer.release(1)  # it joins between steps
        _until(lambda: engine.decoding == 2, 'both robots describing')
        assert engine.submit(AskRequest('describe one again'), background=True,
                             robot=robots[0]).wait(WAIT_S).error == BUSY
        answerer.release(200)
        assert first.wait(WAIT_S).success and second.wait(WAIT_S).success
        # Once done, robot1 may describe again.
        again = engine.submit(AskRequest('describe one again'), background=True, robot=robots[0])
        answerer.release(200)
        assert again.wait(WAIT_S).success
    finally:
        answerer.release(1000)
        engine.stop()


def test_two_builds_of_the_tiny_model_answer_alike_from_an_embedding():
    """The DDS isolation test compares a fleet node's answers with another process's: the tiny model's bind network
    must come from llm.seed, not the global RNG, for the same inputs to give the same answer in both."""
    import torch

    from mm_llm_ros.core.embedding_store import StoredInput
    from mm_llm_ros.core.llm.pipeline import LLMConfig, build_answerer
    config = LLMConfig.from_params({'llm.preset': 'tiny', 'device': 'cpu', 'generation.temperature': 0.0,
                                    'generation.max_new_tokens': 8})
    vector = np.random.default_rng(1).standard_normal(1024).astype(np.float32)
    answers = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # whatever the global RNG holds
        answerer = build_answerer(config)
        answers += [answerer.answer('What is here?', [StoredInput('camera', vector, 1, 0.0, '', '')], 8,
                                    lambda _t: None, lambda: False, context=None).text,
                    answerer.answer('What is here?', [], 8, lambda _t: None, lambda: False, context=None).text]
    assert answers[0] == answers[2] and answers[1] == answers[3]
    assert answers[0] != answers[1]  # the embedding reaches the answer
