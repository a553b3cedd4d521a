"""Text-only tuning of ImageBind-LLM's language-side additions, e.g. the grounded adapter of the embedded default.

ImageBind-LLM fine-tunes a frozen LLaMA through zero-initialised additions: a LoRA pair and a bias on its
projections and its RMSNorm scales (the official `finetune` stage unfreezes exactly these, plus the bind network,
which only image data trains). Tuning them on question/answer pairs whose prompts are built as llm_node builds
them teaches a small backbone to answer from its own perception context; the result is an ordinary adapter
(`checkpoints.adapter_state_dict(language_only=True)`), loaded, merged and quantised like the official one.

Only the answer tokens are scored (teacher forcing, the prompt is context), one pair per forward: prompts differ
in length and the CPU gains little from padding them into a batch.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .model import ImageBindLLM

logger = logging.getLogger(__name__)

# Parameter kinds ImageBind-LLM's fine-tuning unfreezes on the LLaMA side (the gates only matter with images).
TRAINABLE_KINDS = ('lora', 'bias', 'norm')


@dataclass(frozen=True)
class TuningConfig:
    """Optimiser settings (AdamW, linear warm-up then cosine decay, as the official fine-tuning schedules)."""

    steps: int = 400
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    accumulate: int = 4          # pairs per optimiser step
    kinds: tuple[str, ...] = TRAINABLE_KINDS
    seed: int = 0


@dataclass(frozen=True)
class Example:
    """Token ids of one prompt (as llm_node builds it) and of the answer the model should give (with EOS)."""

    prompt_ids: list[int]
    answer_ids: list[int]


def parameter_kind(name: str) -> str | None:
    """'lora', 'bias' or 'norm' for a tunable adapter parameter of `ImageBindLLM`, else None."""
    if not name.startswith('backbone.'):
        return None
    if '.lora_a.' in name or '.lora_b.' in name:
        return 'lora'
    if name.endswith('.bias'):
        return 'bias'
    if name.endswith('norm.weight'):
        return 'norm'
    return None


def select_trainable(model: ImageBindLLM, kinds: Sequence[str] = TRAINABLE_KINDS) -> dict[str, torch.nn.Parameter]:
    """Freeze everything but the parameters of `kinds`; returns those, by name."""
    unknown = set(kinds) - set(TRAINABLE_KINDS)
    if unknown:
        raise ValueError(f'unknown parameter kinds {sorted(unknown)} (known: {", ".join(TRAINABLE_KINDS)})')
    trainable = {}
    for name, parameter in model.named_parameters():
        selected = parameter_kind(name) in kinds
        parameter.requires_grad_(selected)
        if selected:
            trainable[name] = parameter
    return trainable


def answer_loss(model: ImageBindLLM, example: Example) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given the prompt; logits are computed for those positions only
    (the vocabulary projection of every prompt position would be a fifth of the work for nothing)."""
    ids = torch.tensor([example.prompt_ids + example.answer_ids])
    hidden = model.backbone.model(input_ids=ids).last_hidden_state
    start = len(example.prompt_ids) - 1   # the position that predicts the first answer token
    logits = model.backbone.lm_head(hidden[0, start:start + len(example.answer_ids)])
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(example.answer_ids))


def scheduled_learning_rate(step: int, config: TuningConfig) -> float:
    """Linear warm-up to `config.learning_rate`, then cosine decay to zero at the last step."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def tune(model: ImageBindLLM, examples: Sequence[Example], config: TuningConfig,
         on_step: Callable[[int, float, float], None] | None = None) -> list[float]:
    """Train the selected additions of `model` (unmerged, float32) on `examples`, cycling through them in a
    seeded order; returns the mean loss of each optimiser step. `on_step(step, loss, seconds)` reports progress."""
    model.require_unmerged('tune the adapter')
    if not examples:
        raise ValueError('no training examples')
    trainable = select_trainable(model, config.kinds)
    optimiser = torch.optim.AdamW(trainable.values(), lr=config.learning_rate, weight_decay=config.weight_decay)
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    losses, cursor = [], 0
    model.train()
    try:
        for step in range(config.steps):
            started = time.perf_counter()
            for group in optimiser.param_groups:
                group['lr'] = scheduled_learning_rate(step, config)
            total = 0.0
            for _ in range(config.accumulate):
                loss = answer_loss(model, examples[order[cursor % len(order)]]) / config.accumulate
                loss.backward()
                total += loss.item()
                cursor += 1
            torch.nn.utils.clip_grad_norm_(trainable.values(), 1.0)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            losses.append(total)
            if on_step is not None:
                on_step(step, total, time.perf_counter() - started)
    finally:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    return losses
