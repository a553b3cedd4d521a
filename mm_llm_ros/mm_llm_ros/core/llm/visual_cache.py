"""The optional visual cache of ImageBind-LLM: refine a query feature with its nearest stored image features.

As published (`forward_visual` with `knn=True`, a FAISS index of ~3M ImageBind image features), for a fused
query feature f_q:

    s, p = the top-k similarities and stored vectors (prototypes) of f_q in the index
    w    = softmax(t * s)
    f_c  = normalize(sum_k w_k p_k)
    f    = normalize((1 - a) f_q + a f_c)          defaults k=10, t=20, a=0.5

The official code searches with f_q exactly as fused (not re-normalised) in an inner-product index, so `s` are
cosine similarities only to the extent the stored vectors are unit-norm and f_q is (nearly) unit-norm; we do the
same. The index is any FAISS index that can reconstruct its vectors (flat indexes can; an IVF index gets a direct
map on load).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class VisualCacheError(ValueError):
    """A missing or unusable index file, invalid settings, or a query of the wrong size."""


class VisualCache:
    """Refines fused ImageBind features with a FAISS index of stored image features.

    Args:
        index: a FAISS index (inner product for the published behaviour) holding at least one vector.
        size: neighbours used (k); capped at the number of stored vectors.
        temperature: softmax temperature t applied to the similarities.
        weight: mixing weight a of the cached feature, in [0, 1].
    """

    def __init__(self, index: Any, size: int = 10, temperature: float = 20.0, weight: float = 0.5) -> None:
        if size < 1:
            raise VisualCacheError(f'size must be >= 1, got {size}')
        if not np.isfinite(temperature) or temperature < 0:
            raise VisualCacheError(f'temperature must be finite and >= 0, got {temperature}')
        if not 0 <= weight <= 1:
            raise VisualCacheError(f'weight must be in [0, 1], got {weight}')
        if index.ntotal == 0:
            raise VisualCacheError('the FAISS index is empty')
        self.index = index
        self.size = min(size, index.ntotal)
        self.temperature = temperature
        self.weight = weight
        _enable_reconstruction(index)

    @classmethod
    def from_index_file(cls, path: str | os.PathLike[str], size: int = 10, temperature: float = 20.0,
                        weight: float = 0.5, expected_dim: int | None = 1024, mmap: bool = False) -> VisualCache:
        """Read a FAISS index written by `faiss.write_index`.

        Args:
            expected_dim: the feature size the index must have (ImageBind: 1024); None skips the check.
            mmap: memory-map the stored vectors of a flat index instead of reading them into RAM (the published
                index is 13 GB).
        """
        import faiss

        path = Path(path)
        if not path.is_file():
            raise VisualCacheError(f'{path}: FAISS index file not found')
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
        except RuntimeError as exc:
            raise VisualCacheError(f'{path}: not a readable FAISS index ({exc})') from exc
        if expected_dim is not None and index.d != expected_dim:
            raise VisualCacheError(f'{path}: index holds {index.d}-d vectors, expected {expected_dim}-d features')
        logger.info('visual cache %s: %d vectors of dim %d', path, index.ntotal, index.d)
        return cls(index, size=size, temperature=temperature, weight=weight)

    @property
    def dim(self) -> int:
        return self.index.d

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Refine features of shape (D,) or (B, D); returns unit-norm float32 features of the same shape."""
        if features.dim() not in (1, 2) or features.shape[-1] != self.dim:
            raise VisualCacheError(f'features must have shape ({self.dim},) or (B, {self.dim}), '
                                   f'got {tuple(features.shape)}')
        query = features.detach().float().reshape(-1, self.dim)  # (B, D)
        sims, ids = self.index.search(np.ascontiguousarray(query.cpu().numpy()), self.size)  # (B, k) each
        # Approximate indexes may find fewer than k neighbours (id -1): give those zero weight.
        missing = ids < 0
        if missing.all(axis=1).any():
            raise VisualCacheError('the index returned no neighbour for a query')
        prototypes = self.index.reconstruct_batch(np.where(missing, 0, ids).reshape(-1))
        prototypes = torch.from_numpy(prototypes).to(query.device).reshape(*ids.shape, self.dim)  # (B, k, D)
        sims = torch.from_numpy(sims).to(query.device).masked_fill(torch.from_numpy(missing).to(query.device),
                                                                   float('-inf'))
        weights = torch.softmax(self.temperature * sims, dim=-1)  # (B, k)
        cached = F.normalize(torch.einsum('bk,bkd->bd', weights, prototypes), dim=-1)
        refined = F.normalize((1 - self.weight) * query + self.weight * cached, dim=-1)
        return refined.reshape(features.shape)


def _enable_reconstruction(index: Any) -> None:
    """Make sure `index.reconstruct_batch` works: IVF indexes need a direct map, other kinds must support it."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    try:
        index.reconstruct(0)
    except RuntimeError as exc:
        raise VisualCacheError(f'{type(index).__name__} cannot return its stored vectors, which the visual cache '
                               f'needs ({exc})') from exc
