"""Prompt texts: the published Alpaca template, the chat option and the bounded context block."""
from __future__ import annotations

import pytest

from mm_llm_ros.core.llm.backbones import byte_tokenizer
from mm_llm_ros.core.llm.prompt import PromptBuilder, PromptConfig, PromptError, bound_context
from mm_llm_ros.core.llm.tokenizer import HFTokenizer

# Written out independently of the module: the published Alpaca / ImageBind-LLM prompts.
PUBLISHED_NO_INPUT = (
    'Below is an instruction that describes a task. Write a response that appropriately completes the request.'
    '\n\n### Instruction:\nWhat is in front of the robot?\n\n### Response:'
)
PUBLISHED_WITH_INPUT = (
    'Below is an instruction that describes a task, paired with an input that provides further context. Write a '
    'response that appropriately completes the request.\n\n### Instruction:\nWhat is in front of the robot?\n\n'
    '### Input:\nobjects: chair, person\n\n### Response:'
)
QUESTION = 'What is in front of the robot?'


@pytest.fixture(scope='module')
def chat_tokenizer():
    return HFTokenizer(byte_tokenizer())  # ChatML template, like SmolLM2's


def test_alpaca_prompt_is_the_published_text():
    assert PromptBuilder().build(QUESTION) == PUBLISHED_NO_INPUT


def test_context_goes_into_the_published_input_section():
    assert PromptBuilder().build(QUESTION, context='  objects: chair, person\n') == PUBLISHED_WITH_INPUT


def test_blank_context_uses_the_template_without_input():
    assert PromptBuilder().build(QUESTION, context=' \n ') == PUBLISHED_NO_INPUT


def test_alpaca_prompt_is_encoded_with_bos(chat_tokenizer):
    ids = PromptBuilder().encode(chat_tokenizer, QUESTION)
    assert ids[0] == chat_tokenizer.bos_id
    assert ids[-1] != chat_tokenizer.eos_id
    assert chat_tokenizer.decode(ids) == PUBLISHED_NO_INPUT


def test_chat_template_renders_the_tokenizers_chat_format_without_extra_bos(chat_tokenizer):
    builder = PromptBuilder(PromptConfig(template='chat', system_prompt='You are a robot.'), chat_tokenizer)
    text = builder.build('Hi', context='battery: 80%')
    assert text == ('<|im_start|>system\nYou are a robot.<|im_end|>\n'
                    '<|im_start|>user\nContext:\nbattery: 80%\n\nHi<|im_end|>\n<|im_start|>assistant\n')
    ids = builder.encode(chat_tokenizer, 'Hi')
    assert ids.count(chat_tokenizer.bos_id) == 3  # system, user, assistant: the template's own, none added
    assert ids == chat_tokenizer.encode(builder.build('Hi'), bos=False)
    assert not builder.add_bos


def test_chat_template_needs_a_tokenizer_with_one():
    with pytest.raises(PromptError, match='chat template'):
        PromptBuilder(PromptConfig(template='chat'))
    plain = byte_tokenizer()
    plain.chat_template = None
    with pytest.raises(PromptError, match='chat template'):
        PromptBuilder(PromptConfig(template='chat'), HFTokenizer(plain))


def test_template_text_is_configurable():
    config = PromptConfig(alpaca_template='Q: {instruction}\nA:',
                          alpaca_template_with_input='{input}\nQ: {instruction}\nA:')
    builder = PromptBuilder(config)
    assert builder.build('why?') == 'Q: why?\nA:'
    assert builder.build('why?', context='dark') == 'dark\nQ: why?\nA:'
    assert PromptBuilder().config.alpaca_template.endswith('### Response:')  # the default stays visible


def test_long_context_is_bounded_keeping_its_beginning_at_a_line_break():
    context = '\n'.join(f'object {i}: a chair at {i} m' for i in range(100))
    bounded = bound_context(context, 200)
    assert len(bounded) <= 200
    assert bounded.endswith(' …')
    assert context.startswith(bounded.removesuffix(' …'))
    assert bounded.removesuffix(' …').endswith(' m')  # whole lines only
    prompt = PromptBuilder(PromptConfig(max_context_chars=200)).build(QUESTION, context)
    assert bounded in prompt
    assert 'object 99' not in prompt


def test_context_can_be_disabled():
    assert PromptBuilder(PromptConfig(max_context_chars=0)).build(QUESTION, 'x') == PUBLISHED_NO_INPUT
    assert bound_context('abcdef', 1) == 'a'


@pytest.mark.parametrize('settings', [
    {'template': 'llama2'},
    {'max_context_chars': -1},
    {'alpaca_template': 'no placeholder'},
    {'alpaca_template_with_input': '{instruction} only'},
    {'alpaca_template': '{instruction} {unknown}'},
    {'chat_user_template_with_context': '{context}'},
])
def test_invalid_configurations_are_rejected(settings):
    with pytest.raises(PromptError):
        PromptConfig(**settings)


def test_empty_instruction_is_rejected():
    with pytest.raises(PromptError, match='empty'):
        PromptBuilder().build('   ')
