"""Fusion of several ImageBind modality embeddings into the one feature ImageBind-LLM conditions on.

As published (`forward_visual` of the official code): every embedding is L2-normalised, the weights are rescaled
to w_i / (sum_j w_j + 1e-6) over the modalities present, and the weighted sum is returned as is, NOT normalised
again (two different unit vectors with equal weights give a vector shorter than 1, and the bind network sees that).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DEFAULT_WEIGHT = 1.0
_WEIGHT_EPS = 1e-6  # the official denominator guard


class FusionError(ValueError):
    """Embeddings or weights that cannot be fused."""


def _as_vector(name: str, embedding: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float32 (D,) tensor from a (D,) or (1, D) array or tensor, after checking it is finite."""
    if isinstance(embedding, np.ndarray):
        embedding = torch.from_numpy(embedding)
    if not isinstance(embedding, torch.Tensor):
        raise FusionError(f"embedding '{name}' must be a numpy array or torch tensor, got {type(embedding).__name__}")
    if embedding.dim() == 2 and embedding.shape[0] == 1:
        embedding = embedding[0]
    if embedding.dim() != 1 or embedding.numel() == 0:
        raise FusionError(f"embedding '{name}' must have shape (D,) or (1, D), got {tuple(embedding.shape)}")
    if not embedding.is_floating_point():
        raise FusionError(f"embedding '{name}' must hold floats, got {embedding.dtype}")
    embedding = embedding.float()
    if not torch.isfinite(embedding).all():
        raise FusionError(f"embedding '{name}' contains NaN or Inf values")
    return embedding


def fuse_embeddings(embeddings: Mapping[str, np.ndarray | torch.Tensor],
                    weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """Weighted sum of the L2-normalised embeddings, weights normalised as published; returns float32 (D,).

    Args:
        embeddings: modality name -> embedding of shape (D,) or (1, D); all D equal. The result is on the device
            of the first embedding (CPU for a numpy array).
        weights: modality name -> weight >= 0; modalities not listed weigh `DEFAULT_WEIGHT` (1.0), names of absent
            modalities are ignored.

    A zero embedding contributes nothing (as in the official code, normalising it yields zeros) but still counts in
    the weight sum; a warning is logged because it usually means a failed encoder.
    """
    if not embeddings:
        raise FusionError('no embeddings to fuse')
    weights = weights or {}
    vectors = {name: _as_vector(name, embedding) for name, embedding in embeddings.items()}
    dims = {name: vector.shape[0] for name, vector in vectors.items()}
    if len(set(dims.values())) > 1:
        raise FusionError(f'embedding dimensions differ: {dims}')
    raw = {name: float(weights.get(name, DEFAULT_WEIGHT)) for name in vectors}
    bad = {name: weight for name, weight in raw.items() if not np.isfinite(weight) or weight < 0}
    if bad:
        raise FusionError(f'fusion weights must be finite and >= 0, got {bad}')
    total = sum(raw.values())
    if total == 0:
        raise FusionError(f'all fusion weights of the present modalities are zero: {raw}')

    device = next(vector.device for vector in vectors.values())
    fused = torch.zeros(next(iter(dims.values())), dtype=torch.float32, device=device)
    for name, vector in vectors.items():
        if not vector.any():
            logger.warning("embedding '%s' is all zeros; it adds nothing to the fused feature", name)
        fused += F.normalize(vector.to(device), dim=-1) * (raw[name] / (total + _WEIGHT_EPS))
    return fused
