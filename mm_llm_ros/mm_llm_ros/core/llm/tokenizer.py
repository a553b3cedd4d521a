"""Text tokenizers behind one small protocol, so generation code does not care where the vocabulary came from.

- `SentencePieceTokenizer`: Meta LLaMA's `tokenizer.model`, used as the official ImageBind-LLM code uses it
  (bos prepended on request, eos appended on request, `decode` drops control tokens).
- `HFTokenizer`: any Hugging Face tokenizer (e.g. of a SmolLM2 directory); `encode` adds no special tokens of its
  own, so `bos` means the same for both adapters.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read, or an operation the tokenizer does not support."""


@runtime_checkable
class TextTokenizer(Protocol):
    """What generation needs from a tokenizer. `bos_id`/`eos_id` are None when the vocabulary has no such token."""

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, bos: bool, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _with_specials(ids: list[int], bos_id: int | None, eos_id: int | None, bos: bool, eos: bool) -> list[int]:
    if bos and bos_id is not None:
        ids = [bos_id, *ids]
    if eos and eos_id is not None:
        ids = [*ids, eos_id]
    return ids


class SentencePieceTokenizer:
    """Meta LLaMA's SentencePiece `tokenizer.model`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import sentencepiece

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise TokenizerError(f'{self.path}: SentencePiece tokenizer file not found')
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f'{self.path}: not a readable SentencePiece model ({exc})') from exc
        # SentencePiece reports a missing special token as -1.
        self._bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self._eos = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        logger.debug('%s: %d pieces, bos %s, eos %s', self.path, self.vocab_size, self._bos, self._eos)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str, bos: bool, eos: bool = False) -> list[int]:
        return _with_specials(list(self._sp.encode(text)), self._bos, self._eos, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


class HFTokenizer:
    """A Hugging Face tokenizer behind `TextTokenizer`; also exposes its chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> HFTokenizer:
        """Load the tokenizer saved in a local directory (never downloads)."""
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True))
        except (OSError, ValueError) as exc:
            raise TokenizerError(f'{os.fspath(path)}: no usable Hugging Face tokenizer ({exc})') from exc

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str, bos: bool, eos: bool = False) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        return _with_specials(ids, self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, 'chat_template', None))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `[{'role': ..., 'content': ...}, ...]` with the tokenizer's own chat template, as text."""
        if not self.has_chat_template:
            raise TokenizerError('this tokenizer has no chat template')
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
