"""core/specs.py is the one table of sensors, modalities and context kinds, and everything reads it."""
import pathlib
import re

import numpy as np

from mm_llm_ros.core import specs
from mm_llm_ros.core.answering import AskEngine, AskLimits, AskRequest, Generated, context_line
from mm_llm_ros.core.embedding_store import ModalityStore
from mm_llm_ros.core.llm.pipeline import LLMConfig, source_weights
from mm_llm_ros.core.params import NODE_PARAMS, defaults
from mm_llm_ros.launch_plan import LAUNCH_ARGUMENTS

CORE = pathlib.Path(specs.__file__).parent


def test_the_tables_are_consistent():
    for sensor in specs.SENSOR_SPECS:
        assert sensor.modality in specs.MODALITIES
        assert specs.resolve(sensor.preprocess)  # the named function exists
    for kind in specs.CONTEXT_KIND_SPECS:
        assert kind.sensor in specs.SENSORS
        assert specs.resolve(kind.extractor) and specs.resolve(kind.config)
    assert specs.sources_of('depth') == ('depth_camera', 'lidar')


def test_parameters_and_launch_arguments_come_from_the_tables():
    encoder, llm, grounding = NODE_PARAMS['encoder'], NODE_PARAMS['llm_node'], NODE_PARAMS['grounding_node']
    assert {s.enable_param for s in specs.SENSOR_SPECS} <= set(encoder)
    assert {f'fusion.weights.{m}' for m in specs.MODALITIES} <= set(llm)
    assert {f'fusion.source_weights.{s}' for s in specs.SENSORS} <= set(llm)
    assert {k.enable_param for k in specs.CONTEXT_KIND_SPECS} <= set(grounding)
    names = {a.name for a in LAUNCH_ARGUMENTS}
    assert {s.topic_argument for s in specs.SENSOR_SPECS} | {f'use_{w}' for w in specs.LAUNCH_SWITCHES} <= names


def test_a_source_weighs_what_its_modality_weighs_unless_given_its_own():
    params = defaults('llm_node') | {'fusion.weights.depth': 0.5, 'fusion.source_weights.lidar': 2.0}
    weights = source_weights(params)
    assert weights['depth_camera'] == 0.5 and weights['lidar'] == 2.0 and weights['camera'] == 1.0
    assert LLMConfig.from_params(params).fusion_weights == weights
    assert LLMConfig.from_params().sources == tuple(s for m in specs.MODALITIES for s in specs.sources_of(m))


class Recorder:
    sensors_inform_answers = True

    def __init__(self):
        self.embeddings = []

    def answer(self, question, embeddings, max_new_tokens, on_text, should_stop, context=None):
        self.embeddings.append(sorted(e.modality for e in embeddings))
        return Generated('ok', 1, 0.01, 100.0, 'eos')


def test_two_sources_of_one_modality_are_both_used_and_context_has_its_own_store():
    store, contexts, answerer = ModalityStore(), ModalityStore(), Recorder()
    limits = AskLimits(('camera', 'depth_camera', 'lidar', 'ocr'),
                       groups={m: specs.sources_of(m) for m in specs.MODALITIES})
    engine = AskEngine(answerer, store, limits, contexts=contexts)
    engine.start()
    try:
        store.update('depth_camera', np.ones(4), 1)
        store.update('lidar', np.ones(4), 2)
        contexts.update('ocr', 'EXIT', 3)
        both = engine.submit(AskRequest('q', modalities=['depth'])).wait(5)
        assert sorted(both.modalities_used) == ['depth_camera', 'lidar'] and answerer.embeddings[-1] == sorted(
            both.modalities_used)
        everything = engine.submit(AskRequest('q')).wait(5)
        assert sorted(everything.modalities_used) == ['depth_camera', 'lidar', 'ocr']
        missing = engine.submit(AskRequest('q', modalities=['vision', 'lidar'])).wait(5)
        assert missing.modalities_used == ['lidar'] and 'no fresh data for vision' in missing.note
        assert engine.generation == 3
    finally:
        engine.stop()


def test_prompt_labels_come_from_the_context_kinds():
    for kind in specs.CONTEXT_KIND_SPECS:
        assert context_line('{label}: {text}', kind.name, 'x') == f'{kind.label}: x'


def test_no_core_module_reaches_up_into_launch_code_or_nodes():
    pattern = re.compile(r'^\s*(from|import)\s+mm_llm_ros\.(launch_plan|ros|demo|evaluate|node_processes)\b', re.M)
    offenders = [str(p.relative_to(CORE)) for p in CORE.rglob('*.py') if pattern.search(p.read_text())]
    assert not offenders


def test_the_sros2_policy_lets_every_spec_entry_through():
    """config/sros2/mm_llm_ros.policy.xml is data next to the tables: a new sensor or kind needs its topic there."""
    import xml.etree.ElementTree as ET
    root = ET.parse(CORE.parents[1] / 'config' / 'sros2' / 'mm_llm_ros.policy.xml').getroot()

    def topics(node, permission):
        profile = next(p for p in root.iter('profile') if p.get('node') == node)
        return {t.text for group in profile.findall('topics') if group.get(permission) == 'ALLOW' for t in group}
    embeddings = {s.embedding_topic for s in specs.SENSOR_SPECS}
    contexts = {k.topic for k in specs.CONTEXT_KIND_SPECS}
    assert embeddings <= topics('encoder', 'publish') and embeddings <= topics('llm_node', 'subscribe')
    for switch in specs.LAUNCH_SWITCHES:
        assert {s.embedding_topic for s in specs.SENSOR_SPECS if s.launch_switch == switch} <= topics(
            f'{switch}_encoder', 'publish')
    assert contexts <= topics('grounding_node', 'publish') and contexts <= topics('llm_node', 'subscribe')
