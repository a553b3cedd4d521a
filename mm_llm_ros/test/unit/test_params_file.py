"""Reading ROS 2 parameter files without ROS, with the checks a node applies when it declares its parameters."""
import pytest

from mm_llm_ros.core.params import ParamsFileError, defaults, node_params, read_params_file


def _write(tmp_path, text):
    path = tmp_path / 'params.yaml'
    path.write_text(text)
    return path


def test_sections_are_keyed_by_node_name_and_the_wildcard_applies_below_them(tmp_path):
    sections = read_params_file(_write(tmp_path, '''
/**:
  ros__parameters:
    device: cuda
    use_sim_time: true
/robot/llm_node:
  ros__parameters:
    llm.preset: tiny
/**/encoder:
  ros__parameters:
    device: cpu
'''))
    assert set(sections) == {'**', 'llm_node', 'encoder'}
    llm = node_params(sections, 'llm_node')
    assert (llm['device'], llm['llm.preset'], llm['max_age_s']) == ('cuda', 'tiny', defaults('llm_node')['max_age_s'])
    assert node_params(sections, 'encoder')['device'] == 'cpu'  # its own section wins over the wildcard
    assert node_params(sections, 'grounding_node') == defaults('grounding_node')  # use_sim_time is not declared


@pytest.mark.parametrize('values, message', [
    ('lmm.preset: tiny', "llm_node has no parameter 'lmm.preset'"),
    ('max_age_s: 5', "parameter 'max_age_s' must be a float, got 5"),
    ('modalities: vision', "parameter 'modalities' must be a list"),
    ('prompt.template: llama', "parameter 'prompt.template' must be one of alpaca, chat, got 'llama'"),
])
def test_values_a_node_would_refuse_raise(tmp_path, values, message):
    sections = read_params_file(_write(tmp_path, f'llm_node:\n  ros__parameters:\n    {values}\n'))
    with pytest.raises(ParamsFileError, match=message):
        node_params(sections, 'llm_node')


@pytest.mark.parametrize('text, message', [
    ('- a\n- b\n', 'expected a mapping of node names'),
    ('llm_node:\n  device: cpu\n', "section 'llm_node' has no ros__parameters mapping"),
    ('llm_node: [unclosed\n', 'cannot read parameter file'),
])
def test_malformed_files_raise(tmp_path, text, message):
    with pytest.raises(ParamsFileError, match=message):
        read_params_file(_write(tmp_path, text))


def test_missing_file_raises(tmp_path):
    with pytest.raises(ParamsFileError, match='cannot read parameter file .*nope.yaml'):
        read_params_file(tmp_path / 'nope.yaml')
