"""Answers chosen by the model among candidates taken from its context (`generation.answer_mode:
choose_from_context`).

A 135M-parameter model reads the right fact line but, generating freely, copies the wrong number or invents a
colour instead of admitting it cannot tell (docs/evaluation.md, "Grounded answers"). Constrained decoding keeps the
model the answerer but leaves it no way out of its context: the candidates are the context's lines (one fact each
with `context.format: facts`) plus a fixed "cannot tell" sentence, and the answer is the candidate whose likelihood
the question raises most (compared with a neutral question, see `choose_answer`). Measured: docs/evaluation.md,
"Choosing the answer from the context".

Cost: two prefills (the question, the neutral question) and two batched forwards over the candidates' tokens
(the prompt's KV cache repeated per candidate), instead of one prefill and a forward per generated token.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .decoding import cache_keyword, model_device, output_cache

if TYPE_CHECKING:
    from .tokenizer import TextTokenizer

ANSWER_MODES = ('free', 'choose_from_context')
CANNOT_TELL_ANSWER = 'I cannot tell from my sensors.'
# The question a candidate's likelihood is compared against (see `choose_answer`): asks for nothing in particular.
NEUTRAL_QUESTION = 'What do the sensor readings say?'


def answer_candidates(context: str, cannot_tell: str = CANNOT_TELL_ANSWER) -> list[str]:
    """The context's non-empty lines, each once and in order, then `cannot_tell`."""
    lines = dict.fromkeys(line.strip() for line in context.splitlines() if line.strip())
    lines.pop(cannot_tell, None)
    return [*lines, cannot_tell]


@dataclass(frozen=True)
class Choice:
    text: str
    index: int
    scores: tuple[float, ...]     # each candidate's log-probability after the question minus after NEUTRAL_QUESTION
    elapsed_s: float


@torch.inference_mode()
def candidate_logprobs(model: Any, prompt_ids: Sequence[int], rows: Sequence[Sequence[int]]) -> list[float]:
    """The summed log-probability of each token row right after `prompt_ids`: the prompt is run once, its KV cache
    repeated for every row and all rows scored in one forward, right-padded (causal attention: a row's tokens never
    see the padding after them)."""
    device = model_device(model)
    prefill = model(input_ids=torch.tensor([list(prompt_ids)], dtype=torch.long, device=device), use_cache=True,
                    logits_to_keep=1)
    first = torch.log_softmax(prefill.logits[0, -1].float(), dim=-1)   # predicts every row's first token
    cache = output_cache(prefill)
    width = max(len(row) for row in rows)
    ids = torch.tensor([[*row, *([row[-1]] * (width - len(row)))] for row in rows], dtype=torch.long, device=device)
    cache.batch_repeat_interleave(len(rows))
    logits = model(input_ids=ids, use_cache=True, **{cache_keyword(): cache}).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)   # (N, width, vocab): position t predicts t + 1
    targets = ids[:, 1:].unsqueeze(-1)
    following = logprobs[:, :-1].gather(-1, targets).squeeze(-1)   # (N, width - 1)
    return [float(first[row[0]]) + float(following[index, :len(row) - 1].sum()) for index, row in enumerate(rows)]


def choose_answer(model: Any, tokenizer: TextTokenizer, prompt_ids: Sequence[int], candidates: Sequence[str],
                  neutral_prompt_ids: Sequence[int] | None = None,
                  should_stop: Callable[[], bool] = lambda: False) -> Choice | None:
    """The candidate the model finds most likely after `prompt_ids`, or None when cancelled.

    Each candidate is scored with its end-of-sequence token (when the vocabulary has one), so that a line the model
    would continue beyond its end counts less than one it would stop after. With `neutral_prompt_ids` (the same
    prompt asking NEUTRAL_QUESTION) a candidate's score is how much more likely the question makes it: a small model
    reading its context is most likely to copy the first line whatever was asked (raw likelihood chose the first
    line for nearly every question on the grounded benchmark); the difference keeps what the question adds.
    Ties go to the earlier candidate."""
    if not candidates:
        raise ValueError('choose_answer needs at least one candidate')
    start = time.perf_counter()
    rows = [tokenizer.encode(text, bos=False, eos=tokenizer.eos_id is not None) for text in candidates]
    if any(not row for row in rows):
        raise ValueError('a candidate answer has no tokens')
    if should_stop():
        return None
    scores = candidate_logprobs(model, prompt_ids, rows)
    if neutral_prompt_ids is not None:
        if should_stop():
            return None
        scores = [a - b for a, b in zip(scores, candidate_logprobs(model, neutral_prompt_ids, rows))]
    best = max(range(len(rows)), key=lambda i: (scores[i], -i))
    return Choice(candidates[best], best, tuple(scores), time.perf_counter() - start)
