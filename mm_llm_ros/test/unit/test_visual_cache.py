"""Visual cache: top-k retrieval, softmax(t*s) prototype average and mixing, against a numpy reference."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from mm_llm_ros.core.llm.visual_cache import VisualCache, VisualCacheError

DIM, STORED = 32, 200


def _reference(query: np.ndarray, stored: np.ndarray, k: int, t: float, a: float) -> np.ndarray:
    """The published formula, with brute-force inner-product search of the query as given."""
    sims = stored @ query
    top = np.argsort(-sims)[:k]
    weights = np.exp(t * sims[top] - np.max(t * sims[top]))
    weights /= weights.sum()
    cached = weights @ stored[top]
    cached /= np.linalg.norm(cached)
    mixed = (1 - a) * query + a * cached
    return mixed / np.linalg.norm(mixed)


@pytest.fixture(scope='module')
def stored() -> np.ndarray:
    vectors = np.random.default_rng(1).normal(size=(STORED, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope='module')
def index(stored):
    index = faiss.IndexFlatIP(DIM)
    index.add(stored)
    return index


@pytest.fixture
def query(stored) -> np.ndarray:
    # Near a stored vector and, like a fused feature, not exactly unit-norm.
    rng = np.random.default_rng(2)
    return (0.8 * (stored[5] + 0.3 * rng.normal(size=DIM))).astype(np.float32)


@pytest.mark.parametrize(('size', 'temperature', 'weight'), [(10, 20.0, 0.5), (3, 5.0, 0.2), (1, 20.0, 0.9)])
def test_matches_the_published_formula(index, stored, query, size, temperature, weight):
    cache = VisualCache(index, size=size, temperature=temperature, weight=weight)
    refined = cache(torch.from_numpy(query))
    np.testing.assert_allclose(refined.numpy(), _reference(query, stored, size, temperature, weight), atol=1e-5)
    assert abs(float(refined.norm()) - 1) < 1e-5


def test_defaults_are_the_published_ones(index):
    cache = VisualCache(index)
    assert (cache.size, cache.temperature, cache.weight) == (10, 20.0, 0.5)


def test_batches_are_refined_row_by_row(index, stored, query):
    batch = np.stack([query, stored[17] * 0.9])
    refined = VisualCache(index)(torch.from_numpy(batch))
    for row, expected in zip(refined.numpy(), batch, strict=True):
        np.testing.assert_allclose(row, _reference(expected, stored, 10, 20.0, 0.5), atol=1e-5)


def test_weight_zero_keeps_the_query_direction(index, query):
    refined = VisualCache(index, weight=0.0)(torch.from_numpy(query))
    np.testing.assert_allclose(refined.numpy(), query / np.linalg.norm(query), atol=1e-6)


def test_size_is_capped_at_the_number_of_stored_vectors(stored):
    small = faiss.IndexFlatIP(DIM)
    small.add(stored[:4])
    cache = VisualCache(small, size=10)
    assert cache.size == 4
    np.testing.assert_allclose(cache(torch.from_numpy(stored[0])).numpy(),
                               _reference(stored[0], stored[:4], 4, 20.0, 0.5), atol=1e-5)


@pytest.mark.parametrize('mmap', [False, True])
def test_from_index_file_reads_a_written_index(tmp_path, index, stored, query, mmap):
    path = tmp_path / 'knn.index'
    faiss.write_index(index, str(path))
    cache = VisualCache.from_index_file(path, size=5, temperature=10.0, weight=0.3, expected_dim=DIM, mmap=mmap)
    np.testing.assert_allclose(cache(torch.from_numpy(query)).numpy(), _reference(query, stored, 5, 10.0, 0.3),
                               atol=1e-5)


def test_an_ivf_index_gets_a_direct_map(stored, query):
    quantizer = faiss.IndexFlatIP(DIM)
    ivf = faiss.IndexIVFFlat(quantizer, DIM, 4, faiss.METRIC_INNER_PRODUCT)
    ivf.train(stored)
    ivf.add(stored)
    ivf.nprobe = 4  # all lists: exact search
    refined = VisualCache(ivf)(torch.from_numpy(query))
    np.testing.assert_allclose(refined.numpy(), _reference(query, stored, 10, 20.0, 0.5), atol=1e-5)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(VisualCacheError, match=r'knn\.index: FAISS index file not found'):
        VisualCache.from_index_file(tmp_path / 'knn.index')


def test_unreadable_file_is_reported(tmp_path):
    path = tmp_path / 'broken.index'
    path.write_bytes(b'not an index')
    with pytest.raises(VisualCacheError, match=r'broken\.index: not a readable FAISS index'):
        VisualCache.from_index_file(path)


def test_dimension_mismatch_is_reported(tmp_path, index):
    path = tmp_path / 'knn.index'
    faiss.write_index(index, str(path))
    with pytest.raises(VisualCacheError, match='32-d vectors, expected 1024-d'):
        VisualCache.from_index_file(path)
    with pytest.raises(VisualCacheError, match=r'shape \(32,\)'):
        VisualCache(index)(torch.ones(1024))


@pytest.mark.parametrize('settings', [{'size': 0}, {'temperature': -1.0}, {'weight': 1.5}])
def test_invalid_settings_are_rejected(index, settings):
    with pytest.raises(VisualCacheError):
        VisualCache(index, **settings)


def test_empty_index_is_rejected():
    with pytest.raises(VisualCacheError, match='empty'):
        VisualCache(faiss.IndexFlatIP(DIM))
