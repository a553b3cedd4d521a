"""Adapters that ship with the package, named in `llm.adapter_checkpoint` instead of a path.

`grounded-smollm2` is the embedded default's grounded adapter: the LLaMA side of an ImageBind-LLM adapter
(LoRA, biases, norms) tuned on generated perception-context questions (scripts/tune_grounded_adapter.py), so that
SmolLM2-135M answers from its own perception and says when it cannot tell. It carries no bind network: sensor
embeddings stay zero-gated, as without an adapter.
"""
from __future__ import annotations

from pathlib import Path

GROUNDED_ADAPTER = 'grounded-smollm2'
ASSETS = Path(__file__).resolve().parents[1] / 'assets'
# Name -> file (safetensors, official keys, language side only).
BUNDLED_ADAPTERS = {GROUNDED_ADAPTER: ASSETS / 'grounded_smollm2.safetensors'}


def adapter_path(value: str) -> str:
    """`llm.adapter_checkpoint` as a file path: a bundled adapter's name resolved, any other value unchanged."""
    return str(BUNDLED_ADAPTERS.get(value, value))
