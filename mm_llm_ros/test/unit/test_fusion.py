"""Multi-modal fusion as published: normalise, weight by w_i / (sum w + 1e-6), sum, no re-normalisation."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mm_llm_ros.core.llm.fusion import FusionError, fuse_embeddings


def _reference(embeddings: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    total = sum(weights.values())
    return sum(e / np.linalg.norm(e) * weights[name] / (total + 1e-6) for name, e in embeddings.items())


@pytest.fixture
def embeddings() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    # ImageBind magnitudes differ a lot per modality (vision ~1, audio ~20).
    return {'vision': rng.normal(size=16), 'audio': 20 * rng.normal(size=16), 'depth': 5 * rng.normal(size=16)}


def test_weighted_sum_matches_the_published_formula(embeddings):
    weights = {'vision': 1.0, 'audio': 0.5, 'depth': 2.0}
    fused = fuse_embeddings(embeddings, weights)
    assert fused.dtype == torch.float32
    assert fused.shape == (16,)
    np.testing.assert_allclose(fused.numpy(), _reference(embeddings, weights), rtol=1e-5, atol=1e-6)


def test_result_is_not_renormalised(embeddings):
    fused = fuse_embeddings({'vision': embeddings['vision'], 'audio': embeddings['audio']})
    assert float(fused.norm()) < 0.99  # average of two different unit vectors


def test_single_modality_is_its_unit_vector_times_one_over_one_plus_eps(embeddings):
    fused = fuse_embeddings({'audio': torch.from_numpy(embeddings['audio'])})
    expected = embeddings['audio'] / np.linalg.norm(embeddings['audio']) / (1 + 1e-6)
    np.testing.assert_allclose(fused.numpy(), expected, rtol=1e-6)


def test_missing_weights_default_to_one_and_absent_modalities_are_ignored(embeddings):
    fused = fuse_embeddings(embeddings, {'audio': 3.0, 'thermal': 100.0})
    expected = _reference(embeddings, {'vision': 1.0, 'audio': 3.0, 'depth': 1.0})
    np.testing.assert_allclose(fused.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_accepts_tensors_and_row_vectors(embeddings):
    as_rows = {name: torch.from_numpy(e).float()[None] for name, e in embeddings.items()}
    np.testing.assert_allclose(fuse_embeddings(as_rows).numpy(), fuse_embeddings(embeddings).numpy(), rtol=1e-5)


def test_zero_embedding_contributes_nothing_but_counts_in_the_weights(embeddings, caplog):
    with caplog.at_level(logging.WARNING):
        fused = fuse_embeddings({'vision': embeddings['vision'], 'audio': np.zeros(16)})
    expected = embeddings['vision'] / np.linalg.norm(embeddings['vision']) * 1.0 / (2.0 + 1e-6)
    np.testing.assert_allclose(fused.numpy(), expected, rtol=1e-6)
    assert "'audio' is all zeros" in caplog.text


def test_dimension_mismatch_is_rejected(embeddings):
    with pytest.raises(FusionError, match='dimensions differ'):
        fuse_embeddings({'vision': embeddings['vision'], 'audio': np.ones(8)})


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings_are_rejected_naming_the_modality(embeddings, bad):
    broken = embeddings['audio'].copy()
    broken[3] = bad
    with pytest.raises(FusionError, match="'audio' contains NaN or Inf"):
        fuse_embeddings({'vision': embeddings['vision'], 'audio': broken})


@pytest.mark.parametrize(('inputs', 'weights', 'message'), [
    ({}, None, 'no embeddings'),
    ({'vision': np.ones(4)}, {'vision': -1.0}, '>= 0'),
    ({'vision': np.ones(4)}, {'vision': float('nan')}, 'finite'),
    ({'vision': np.ones(4)}, {'vision': 0.0}, 'zero'),
    ({'vision': np.ones((2, 4))}, None, 'shape'),
    ({'vision': np.arange(4)}, None, 'floats'),
    ({'vision': [1.0, 2.0]}, None, 'numpy array or torch tensor'),
])
def test_invalid_input_raises_a_clear_error(inputs, weights, message):
    with pytest.raises(FusionError, match=message):
        fuse_embeddings(inputs, weights)
