"""The nodes' model stack as a benchmark predictor: configuration from parameter files, prompts, predictions."""
import pathlib

import numpy as np
import pytest
import yaml

from mm_llm_ros.core.evaluation import EvalItem, load_benchmark
from mm_llm_ros.core.evaluation import model_predictor
from mm_llm_ros.core.evaluation.model_predictor import (MULTIPLE_CHOICE_SUFFIX, SHORT_ANSWER_SUFFIX,
                                                        ModelPredictor, ModelPredictorConfig, instruction,
                                                        release_shared_models)
from mm_llm_ros.core.grounding import OcrExtractor
from mm_llm_ros.core.imagebind.model import release_shared_encoders
from mm_llm_ros.core.params import ParamsFileError
from mm_llm_ros.evaluate import ConfigError, make_predictor

CONFIG = pathlib.Path(__file__).resolve().parents[2] / 'config'


@pytest.fixture(scope='module', autouse=True)
def _fresh_shared_models():
    release_shared_models()
    yield
    release_shared_models()
    release_shared_encoders()


@pytest.fixture(scope='module')
def smoke_items(shared_data):
    return load_benchmark('mmbench', shared_data / 'vqa' / 'questions.jsonl')[:2]


def test_instruction_lists_options_after_hint_and_question():
    item = EvalItem(id='1', question='Which one?', answers=('B',), hint='Look left.', options={'A': 'x', 'B': 'y'})
    assert instruction(item) == f'Look left.\nWhich one?\nA. x\nB. y\n{MULTIPLE_CHOICE_SUFFIX}'
    mme = EvalItem(id='2', question='Is there a dog? Please answer yes or no.', answers=('yes',))
    assert instruction(mme) == f'Is there a dog? Please answer yes or no.\n{SHORT_ANSWER_SUFFIX}'


def test_demo_config_reads_the_nodes_sections():
    config = ModelPredictorConfig.from_params_file(CONFIG / 'demo.yaml', context=['ocr'])
    assert (config.imagebind.preset, config.imagebind.allow_random_weights) == ('tiny', True)
    assert (config.llm.model.preset, config.llm.prompt_template, config.llm.generation.context_length) == (
        'embedded', 'chat', 1024)
    assert config.llm.generation.temperature == 0.0  # always greedy, whatever the node samples with
    assert config.context == ('ocr',) and config.ocr.num_threads == 2 and config.context_text_max_chars == 200
    assert 'context: ocr' in config.description and 'random weights' in config.description


def _params_file(tmp_path, **sections):
    path = tmp_path / 'params.yaml'
    path.write_text(yaml.safe_dump({f'/**/{node}': {'ros__parameters': values} for node, values in sections.items()}))
    return path


TINY_ENCODER = {'model.preset': 'tiny', 'model.allow_random_weights': True, 'device': 'cpu'}
TINY_LLM = {'llm.preset': 'tiny', 'device': 'cpu'}


@pytest.mark.parametrize('sections, context, message', [
    ({'llm_node': TINY_LLM}, (), 'no encoder or camera_encoder section'),
    ({'encoder': TINY_ENCODER}, (), 'no llm_node section'),
    ({'encoder': TINY_ENCODER, 'llm_node': TINY_LLM}, ('geometry',), 'cannot be computed from benchmark images'),
    ({'encoder': TINY_ENCODER, 'llm_node': {**TINY_LLM, 'context.kinds': ['geometry']}}, ('ocr',),
     'context.kinds lack ocr'),
    ({'encoder': TINY_ENCODER, 'llm_node': {**TINY_LLM, 'modalities': ['audio']}}, (), "lack 'vision'"),
    ({'encoder': TINY_ENCODER, 'llm_node': {**TINY_LLM, 'embedding_dim': 512}}, (), 'embedding_dim is 512'),
    ({'encoder': {'model.preset': 'tiny'}, 'llm_node': TINY_LLM}, (), 'no ImageBind checkpoint'),
    ({'encoder': {'model.checkpoint': '/nope/imagebind_huge.pth'}, 'llm_node': TINY_LLM}, (),
     'model.checkpoint not found: /nope/imagebind_huge.pth'),
    ({'encoder': TINY_ENCODER, 'llm_node': {'llm.preset': ''}}, (), 'no LLM configured'),
])
def test_unusable_configurations_fail_before_loading_anything(tmp_path, sections, context, message):
    with pytest.raises(ConfigError, match=message):
        ModelPredictorConfig.from_params_file(_params_file(tmp_path, **sections), context)


def test_the_gpu_settings_reach_evaluate_from_the_params_file(tmp_path):
    llm = {**TINY_LLM, 'llm.quantization': 'int8', 'generation.decoder': 'static'}
    config = ModelPredictorConfig.from_params_file(_params_file(tmp_path, encoder=TINY_ENCODER, llm_node=llm))
    assert (config.llm.model.quantization, config.llm.decoder) == ('int8', 'static')
    with pytest.raises(ParamsFileError, match="'generation.decoder' must be one of auto, eager"):
        ModelPredictorConfig.from_params_file(_params_file(
            tmp_path, encoder=TINY_ENCODER, llm_node={**TINY_LLM, 'generation.decoder': 'fast'}))


def test_make_predictor_reports_the_config_and_file(tmp_path):
    path = _params_file(tmp_path, encoder=TINY_ENCODER, llm_node={**TINY_LLM, 'max_age_s': 'soon'})
    with pytest.raises(ConfigError, match=r"config 'x' \(.*params.yaml\): llm_node parameter 'max_age_s' must be a "
                                          'float') as exc:
        make_predictor('x', path)
    assert isinstance(exc.value.__cause__, ParamsFileError)


def test_tiny_config_predicts_smoke_items(smoke_items):
    predictor = make_predictor('tiny', CONFIG / 'tiny.yaml')
    answers = [predictor.predict(item) for item in smoke_items]
    assert all(isinstance(answer, str) and answer for answer in answers)
    # Greedy decoding: asking again gives the same answer; a second config of the same file reuses the models.
    again = make_predictor('again', CONFIG / 'tiny.yaml')
    assert again.predict(smoke_items[0]) == answers[0]
    assert again._answerer() is predictor._answerer()


class FakeOcrEngine:
    """RapidOCR's call signature: BGR image -> ([[corners, text, score], ...], timings)."""

    def __call__(self, bgr):
        height, width = bgr.shape[:2]
        corners = [[0.4 * width, 0.4 * height], [0.6 * width, 0.4 * height], [0.6 * width, 0.6 * height],
                   [0.4 * width, 0.6 * height]]
        return [[corners, 'STOP', 0.98]], None


def test_ocr_context_reaches_the_llm_as_the_node_formats_it(smoke_items, monkeypatch):
    monkeypatch.setattr(model_predictor, 'OcrExtractor', lambda config: OcrExtractor(config, engine=FakeOcrEngine()))
    predictor = make_predictor('ocr', CONFIG / 'tiny.yaml', ['ocr'])
    answerer = predictor._answerer()
    calls = []

    def spy(question, embeddings, max_new_tokens, on_text, should_stop, context=None):
        calls.append((question, embeddings, max_new_tokens, context))
        return type(answerer).answer(answerer, question, embeddings, max_new_tokens, on_text, should_stop, context)

    monkeypatch.setattr(answerer, 'answer', spy)
    assert isinstance(predictor.predict(smoke_items[0]), str)
    question, embeddings, max_new_tokens, context = calls[0]
    assert context == "Text read by the camera: 'STOP' (0.98, center)"
    assert question == instruction(smoke_items[0]) and max_new_tokens == model_predictor.MAX_NEW_TOKENS_MULTIPLE_CHOICE
    assert [e.modality for e in embeddings] == ['camera'] and embeddings[0].value.shape == (1024,)
    assert np.isfinite(embeddings[0].value).all()


def test_refused_questions_raise_a_prediction_error(tmp_path):
    predictor = ModelPredictor(ModelPredictorConfig.from_params_file(
        _params_file(tmp_path, encoder=TINY_ENCODER, llm_node={**TINY_LLM, 'max_question_chars': 10})))
    with pytest.raises(model_predictor.PredictionError, match='question too long'):
        predictor.predict(EvalItem(id='q', question='What is shown in this picture?', answers=('x',)))
