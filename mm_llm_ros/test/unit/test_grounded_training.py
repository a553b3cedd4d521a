"""Training pairs of the grounded adapter: held apart from the benchmark, right by its scorer, prompted as served."""
from __future__ import annotations

import pathlib
import re

import pytest

from mm_llm_ros.core.answering import AskEngine, AskLimits, AskRequest, Generated
from mm_llm_ros.core.embedding_store import ModalityStore
from mm_llm_ros.core.evaluation import grounded
from mm_llm_ros.core.evaluation.grounded import (BENCHMARK_VOCABULARY, CANNOT_TELL, COUNT, DIRECTION, LABEL, NONE,
                                                 NUMBER, YES_NO, direction_of, load_grounded, score_answer)
from mm_llm_ros.core.evaluation.grounded_training import (TRAINING_VOCABULARY, scene_context, training_pairs)
from mm_llm_ros.core.evaluation.model_predictor import ModelPredictorConfig
from mm_llm_ros.core.grounding.facts import prompt_text

CONFIG = pathlib.Path(__file__).resolve().parents[2] / 'config' / 'demo.yaml'


@pytest.fixture(scope='module')
def pairs():
    return training_pairs(60, seed=5)


def _lower(labels) -> set[str]:
    return {label.lower() for label in labels}


def test_training_shares_no_text_sound_or_question_with_the_benchmark(pairs):
    assert not _lower(TRAINING_VOCABULARY.signs) & _lower(BENCHMARK_VOCABULARY.signs)
    assert not _lower(TRAINING_VOCABULARY.sounds) & _lower(BENCHMARK_VOCABULARY.sounds)
    benchmark_questions = {item.question.lower() for seed in (0, 1, 2) for item in load_grounded(None, seed=seed)}
    assert not {pair.question.lower() for pair in pairs} & benchmark_questions
    assert {pair.category for pair in pairs} == {*grounded.CATEGORIES, 'describe'}


def _truth(pair) -> tuple[str, tuple[str, ...]]:
    """The benchmark's answer kind and accepted answers for a training pair, read off the scene's results."""
    ocr, audio, geometry = (pair.scene.results.get(kind) for kind in ('ocr', 'audio_events', 'geometry'))
    if pair.category == 'unanswerable':
        return CANNOT_TELL, ('cannot tell',)
    if pair.category == 'text':
        return (LABEL, tuple(ocr.texts)) if ocr.texts else (NONE, ('no text',))
    if pair.category == 'sound':
        labels = [e.label for e in audio.events if e.label != 'Speech']
        return (LABEL, (labels[0],)) if labels else (NONE, ('no clear sound',))
    if pair.category == 'speech':
        return YES_NO, ('yes' if audio.speech else 'no',)
    if pair.category == 'count':
        return COUNT, (str(geometry.num_clusters),)
    if pair.category == 'direction':
        return DIRECTION, (direction_of(geometry.clusters[0].bearing_deg),)
    sector = {'in front': 'front', 'on the left': 'left', 'on the right': 'right', 'behind': 'back'}[
        re.search(r'(in front|on the left|on the right|behind)', pair.answer).group(1)]
    distance = geometry.nearest_m[sector]
    return (NONE, ('no obstacle',)) if distance is None else (NUMBER, (f'{distance:.1f}',))


def test_every_training_answer_is_right_by_the_benchmark_scorer(pairs):
    assert len(pairs) > 300
    for pair in (pair for pair in pairs if pair.category != 'describe'):
        kind, answers = _truth(pair)
        right, how = score_answer(pair.answer, kind, answers)
        assert right, (pair.category, pair.question, pair.answer, answers, how)


class _RecordingAnswerer:
    """Stands in for the model and records the context block AskEngine gives it."""

    def __init__(self) -> None:
        self.contexts: list[str | None] = []

    def answer(self, question, embeddings, max_new_tokens, on_text, should_stop, context=None):
        self.contexts.append(context)
        return Generated('ok', 1, 0.0, 0.0, 'eos')


def test_training_prompts_carry_the_context_block_llm_node_builds(pairs):
    llm = ModelPredictorConfig.from_params_file(CONFIG).llm
    scenes = {pair.scene.id: pair.scene for pair in pairs}
    answerer = _RecordingAnswerer()
    for scene in list(scenes.values())[:15]:
        contexts = ModalityStore()
        for kind, text, json_text in scene.messages():
            if kind in llm.context_kinds:
                contexts.update(kind, prompt_text(kind, text, json_text, llm.context_format,
                                                  llm.context_max_chars), stamp_ns=0)
        engine = AskEngine(answerer, ModalityStore(), AskLimits(
            known_modalities=llm.sources + tuple(llm.context_kinds), groups={}, max_queue=1,
            max_question_chars=llm.max_question_chars, default_max_age_s=llm.max_age_s,
            default_max_new_tokens=8, max_new_tokens_cap=8), line_template=llm.context_template, contexts=contexts)
        engine.start()
        try:
            assert engine.submit(AskRequest('What is written in view?')).wait().success
        finally:
            engine.stop()
        assert answerer.contexts[-1] == scene_context(scene, llm)


def test_training_pairs_are_seeded():
    first, again = training_pairs(5, seed=9), training_pairs(5, seed=9)
    assert [(p.question, p.answer) for p in first] == [(p.question, p.answer) for p in again]
    assert [(p.question, p.answer) for p in training_pairs(5, seed=10)] != [(p.question, p.answer) for p in first]


def test_training_counts_reach_the_real_scans_while_the_benchmark_keeps_its_own():
    """Real scans hold 20-40 clusters; training on at most 12 taught the adapter to copy one digit of them."""
    import random
    training = [p for p in training_pairs(60, seed=5) if p.category == 'count']
    counts = {p.scene.results['geometry'].num_clusters for p in training}
    assert max(counts) >= 20 and min(counts) <= 3
    assert any(f'are {n} objects' in p.answer for p in training for n in counts if n >= 20)
    rng = random.Random(0)
    benchmark = [grounded.generated_scene(rng, str(i)) for i in range(200)]
    assert max(s.results['geometry'].num_clusters for s in benchmark if 'geometry' in s.results) <= 12


def test_descriptions_state_each_sensors_facts(pairs):
    descriptions = [pair for pair in pairs if pair.category == 'describe']
    assert len(descriptions) > 40
    for pair in descriptions:
        ocr, geometry = pair.scene.results.get('ocr'), pair.scene.results.get('geometry')
        if ocr is not None:
            assert all(f"'{text}'" in pair.answer for text in ocr.texts) and (ocr.texts or 'no text' in pair.answer)
        if geometry is not None and not geometry.is_empty:
            assert f' {geometry.num_clusters} object' in pair.answer
            if geometry.clusters:
                assert f'{geometry.clusters[0].distance_m:.1f} m away' in pair.answer
        assert 'cannot tell' not in pair.answer
