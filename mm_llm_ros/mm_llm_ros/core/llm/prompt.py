"""Prompt construction: the published Alpaca template (default) or the backbone tokenizer's chat template.

ImageBind-LLM was instruction-tuned with the Alpaca template, so `alpaca` is the faithful choice for the released
weights; the prompt is encoded with a BOS token and no EOS, as the official code does. `chat` renders the
instruction with the backbone tokenizer's own chat template, for instruct backbones such as SmolLM2; that text
already carries the model's special tokens, so it is encoded without an extra BOS.

An optional *context* block (perception text from other modules, e.g. detected objects or heard sounds) is bounded
to `max_context_chars` and placed where the template expects extra input: Alpaca's published "### Input:" section,
or a `Context:` paragraph before the instruction in the chat user message.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from .tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

# The Alpaca prompts exactly as published (and used by ImageBind-LLM's format_prompt).
ALPACA_TEMPLATE = (
    'Below is an instruction that describes a task. '
    'Write a response that appropriately completes the request.\n\n'
    '### Instruction:\n{instruction}\n\n### Response:'
)
ALPACA_TEMPLATE_WITH_INPUT = (
    'Below is an instruction that describes a task, paired with an input that provides further context. '
    'Write a response that appropriately completes the request.\n\n'
    '### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:'
)
CHAT_USER_TEMPLATE_WITH_CONTEXT = 'Context:\n{context}\n\n{instruction}'
TRUNCATION_MARK = ' …'

PromptTemplate = Literal['alpaca', 'chat']


class PromptError(ValueError):
    """An invalid prompt configuration or a template the tokenizer cannot provide."""


class ChatTemplateTokenizer(Protocol):
    """A tokenizer that can render chat messages as text (e.g. `tokenizer.HFTokenizer`)."""

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str: ...


@dataclass(frozen=True)
class PromptConfig:
    """How instructions become prompt text.

    Attributes:
        template: 'alpaca' (published ImageBind-LLM template) or 'chat' (the backbone tokenizer's chat template).
        alpaca_template / alpaca_template_with_input: the Alpaca texts; `{instruction}` and `{input}` are filled in.
        chat_user_template_with_context: the chat user message when a context block is present.
        system_prompt: chat only; None keeps the chat template's own default system message (if any).
        max_context_chars: longer context text is cut to this many characters (0 disables context).
    """

    template: PromptTemplate = 'alpaca'
    alpaca_template: str = ALPACA_TEMPLATE
    alpaca_template_with_input: str = ALPACA_TEMPLATE_WITH_INPUT
    chat_user_template_with_context: str = CHAT_USER_TEMPLATE_WITH_CONTEXT
    system_prompt: str | None = None
    max_context_chars: int = 1000

    def __post_init__(self) -> None:
        if self.template not in ('alpaca', 'chat'):
            raise PromptError(f"template must be 'alpaca' or 'chat', got '{self.template}'")
        if self.max_context_chars < 0:
            raise PromptError(f'max_context_chars must be >= 0, got {self.max_context_chars}')
        for name, fields in (('alpaca_template', ('instruction',)),
                             ('alpaca_template_with_input', ('instruction', 'input')),
                             ('chat_user_template_with_context', ('instruction', 'context'))):
            _check_template(name, getattr(self, name), fields)


def _check_template(name: str, template: str, fields: tuple[str, ...]) -> None:
    """Fail at configuration time, not at the first question, on a template `str.format` cannot fill."""
    missing = [field for field in fields if '{' + field + '}' not in template]
    if missing:
        placeholders = ', '.join('{' + field + '}' for field in missing)
        raise PromptError(f'PromptConfig.{name} lacks the placeholder(s) {placeholders}')
    try:
        template.format(**dict.fromkeys(fields, ''))
    except (KeyError, IndexError, ValueError) as exc:
        raise PromptError(f'PromptConfig.{name} is not a valid format string with fields {fields}: {exc!r}') from exc


def bound_context(context: str | None, max_chars: int) -> str | None:
    """Strip `context` and cut it to at most `max_chars` characters, at a line break when one is close.

    The beginning is kept: producers are expected to put the most important facts first.
    """
    context = (context or '').strip()
    if not context or max_chars == 0:
        return None
    if len(context) <= max_chars:
        return context
    budget = max_chars - len(TRUNCATION_MARK)
    if budget <= 0:
        return context[:max_chars]
    cut = context[:budget]
    line_end = cut.rfind('\n')
    if line_end >= budget // 2:  # prefer whole lines unless that throws away more than half the budget
        cut = cut[:line_end]
    logger.debug('context cut from %d to %d characters', len(context), len(cut))
    return cut.rstrip() + TRUNCATION_MARK


class PromptBuilder:
    """Turns an instruction (and optional context) into prompt text and prompt token ids.

    Args:
        config: the template choice and texts.
        chat_tokenizer: required for `template='chat'`; provides the backbone's chat template.
    """

    def __init__(self, config: PromptConfig | None = None,
                 chat_tokenizer: ChatTemplateTokenizer | None = None) -> None:
        self.config = config or PromptConfig()
        # HFTokenizer reports has_chat_template; other implementations are trusted to have one.
        if self.config.template == 'chat' and (
                chat_tokenizer is None or not getattr(chat_tokenizer, 'has_chat_template', True)):
            raise PromptError("template 'chat' needs a tokenizer with a chat template; use 'alpaca' otherwise")
        self._chat_tokenizer = chat_tokenizer

    @property
    def add_bos(self) -> bool:
        """Whether `encode` prepends BOS: yes for Alpaca (official), no for chat text (it has its own tokens)."""
        return self.config.template == 'alpaca'

    def build(self, instruction: str, context: str | None = None) -> str:
        """The prompt text for one instruction; `context` is bounded to `config.max_context_chars`."""
        if not instruction.strip():
            raise PromptError('the instruction is empty')
        context = bound_context(context, self.config.max_context_chars)
        if self.config.template == 'alpaca':
            if context is None:
                return self.config.alpaca_template.format(instruction=instruction)
            return self.config.alpaca_template_with_input.format(instruction=instruction, input=context)
        return self._chat_text(instruction, context)

    def _chat_text(self, instruction: str, context: str | None) -> str:
        content = instruction if context is None else \
            self.config.chat_user_template_with_context.format(instruction=instruction, context=context)
        messages = [{'role': 'user', 'content': content}]
        if self.config.system_prompt is not None:
            messages.insert(0, {'role': 'system', 'content': self.config.system_prompt})
        assert self._chat_tokenizer is not None  # checked in __init__
        return self._chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def encode(self, tokenizer: TextTokenizer, instruction: str, context: str | None = None) -> list[int]:
        """Prompt token ids, with BOS exactly when the template calls for it (see `add_bos`)."""
        return tokenizer.encode(self.build(instruction, context), bos=self.add_bos)

