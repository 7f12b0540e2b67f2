"""k-reciprocal re-ranking: against an independent dense implementation of the standard algorithm,
the bounded-memory evaluation against the dense result, chunk-size invariance and bounded memory."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from muva_core.eval import evaluate, evaluate_features, k_reciprocal_distances


def dense_reference(qf, gf, k1=20, k2=6, lambda_value=0.3, metric="euclidean"):
    """The standard algorithm written out directly on dense matrices, one item at a time.

    Original distance in float32 (as the standard: squared euclidean or 1 - cos, divided by each
    column's maximum over all Q + G rows, then transposed), a stable argsort (ties: lower index),
    everything after that in float64.
    """
    x = np.concatenate([qf, gf]).astype(np.float64)
    n, nq = len(x), len(qf)
    if metric == "euclidean":
        d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    else:
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = 1.0 - u @ u.T
    d = d.astype(np.float32)
    col_max = d.max(axis=0)
    col_max[col_max == 0] = 1
    dist = (d / col_max).T  # float32, as the standard
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = rank[i, :k + 1]
        return [int(c) for c in forward if i in rank[c, :k + 1]]

    V = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            h = reciprocal(c, int(np.around(k1 / 2)))
            if len(set(h) & set(r)) > 2 / 3 * len(h):
                expanded |= set(h)
        e = sorted(expanded)
        w = np.exp(-dist[i, e].astype(np.float64))
        V[i, e] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)])
    s = np.array([[np.minimum(V[i], V[j]).sum() for j in range(nq, n)] for i in range(nq)])
    jaccard = 1.0 - s / (2.0 - s)
    return (1 - lambda_value) * jaccard + lambda_value * dist[:nq, nq:].astype(np.float64)


def clustered(rng, nq, ng, dim, n_ids=12, integer=False):
    """Features around identity centroids, with labels; ``integer``: small integers (exact
    distances, many ties, a few duplicated items)."""
    pids = rng.integers(0, n_ids, nq + ng)
    if integer:
        cent = rng.integers(-3, 4, (n_ids, dim))
        x = (cent[pids] + rng.integers(-1, 2, (nq + ng, dim))).astype(np.float32)
        x[nq + 1] = x[0]  # a query duplicated in the gallery, and two identical gallery items
        x[nq + 3] = x[nq + 2]
    else:
        cent = rng.standard_normal((n_ids, dim))
        x = (cent[pids] + 0.6 * rng.standard_normal((nq + ng, dim))).astype(np.float32)
    cams = rng.integers(0, 3, nq + ng)
    return x[:nq], x[nq:], pids[:nq], pids[nq:], cams[:nq], cams[nq:]


@pytest.mark.parametrize("integer", [False, True], ids=["float", "ties"])
@pytest.mark.parametrize("params", [(20, 6, 0.3), (5, 1, 0.0), (3, 3, 1.0), (7, 2, 0.5)])
def test_equals_independent_dense_implementation(integer, params):
    k1, k2, lam = params
    rng = np.random.default_rng(10 + k1)
    qf, gf, *_ = clustered(rng, 14, 50, 6, integer=integer)
    got = k_reciprocal_distances(qf, gf, k1, k2, lam)
    assert got.dtype == torch.float32 and got.shape == (14, 50)
    ref = dense_reference(qf, gf, k1, k2, lam)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=2e-6)
    if integer:  # the ties are real: many equal original distances
        d = ((qf[:, None] - gf[None]) ** 2).sum(-1)
        assert len(np.unique(d)) < d.size / 3


def test_cosine_and_tiny_problems():
    rng = np.random.default_rng(3)
    qf, gf, *_ = clustered(rng, 9, 30, 5)
    ref = dense_reference(qf, gf, metric="cosine")
    np.testing.assert_allclose(k_reciprocal_distances(qf, gf, metric="cosine").numpy(), ref, atol=2e-6)
    # fewer items than k1 + 1: every list is truncated to the N items, as the standard's slices
    np.testing.assert_allclose(k_reciprocal_distances(qf[:2], gf[:3]).numpy(),
                               dense_reference(qf[:2], gf[:3]), atol=2e-6)
    # all items identical: no division by zero, every distance the same
    same = k_reciprocal_distances(np.ones((3, 4)), np.ones((5, 4))).numpy()
    assert np.isfinite(same).all() and np.all(same == same[0, 0])


@pytest.mark.parametrize("integer", [False, True], ids=["float", "ties"])
def test_evaluate_features_equals_evaluate_of_dense(integer):
    rng = np.random.default_rng(4)
    nq, ng = 23, 60
    qf, gf, q_pids, g_pids, q_cams, g_cams = clustered(rng, nq, ng, 6, integer=integer)
    q_pids[:2] = 99  # identities absent from the gallery: skipped queries
    labels = (q_pids, g_pids, q_cams, g_cams)
    chunks = (1, 7, ng + 5)
    for chunk in chunks:
        dense = k_reciprocal_distances(qf, gf, chunk_size=chunk)
        expected = evaluate(dense, *labels, max_rank=10)
        assert expected.num_skipped_queries >= 2
        got = evaluate_features(qf, gf, *labels, max_rank=10, chunk_size=chunk, rerank="k-reciprocal")
        assert got == expected, chunk
        if integer:  # exact distances: the same answer for every chunk size
            assert torch.equal(dense, k_reciprocal_distances(qf, gf, chunk_size=chunks[0]))
            assert got == evaluate_features(torch.from_numpy(qf), torch.from_numpy(gf), *labels, max_rank=10,
                                            chunk_size=chunks[-1], rerank="k-reciprocal", num_threads=1)
    # re-ranking changes the distances but not the protocol
    plain = evaluate_features(qf, gf, *labels, max_rank=10)
    assert plain.num_skipped_queries == expected.num_skipped_queries
    other = evaluate_features(qf, gf, *labels, max_rank=10, rerank="k-reciprocal", k1=5, k2=2, lambda_value=0.5)
    assert other == evaluate(k_reciprocal_distances(qf, gf, 5, 2, 0.5), *labels, max_rank=10)


def test_reranking_helps_on_clustered_features():
    rng = np.random.default_rng(5)
    qf, gf, *labels = clustered(rng, 60, 300, 16, n_ids=20)
    plain = evaluate_features(qf, gf, *labels)
    rr = evaluate_features(qf, gf, *labels, rerank="k-reciprocal")
    assert rr.mAP > plain.mAP


def test_errors_and_degenerate_inputs():
    rng = np.random.default_rng(6)
    qf, gf, *labels = clustered(rng, 6, 40, 4, n_ids=3)
    bad = qf.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_features(bad, gf, *labels, rerank="k-reciprocal")
    with pytest.raises(ValueError, match="NaN"):
        k_reciprocal_distances(qf, np.where(np.arange(40)[:, None] == 3, np.inf, gf))
    with pytest.raises(ValueError, match="rerank"):
        evaluate_features(qf, gf, *labels, rerank="kreciprocal")
    for kwargs, match in (({"k1": 0}, "k1"), ({"k2": 0}, "k2"), ({"lambda_value": 1.5}, "lambda"),
                          ({"chunk_size": 0}, "chunk_size"), ({"metric": "l1"}, "metric")):
        with pytest.raises(ValueError, match=match):
            evaluate_features(qf, gf, *labels, rerank="k-reciprocal", **kwargs)
    with pytest.raises(ValueError, match="len\\(qf\\)"):
        evaluate_features(qf[:3], gf, *labels, rerank="k-reciprocal")
    q_pids, g_pids, q_cams, g_cams = labels
    # a query whose only same-identity gallery items share its camera: skipped and counted
    g_pids, g_cams = g_pids.copy(), g_cams.copy()
    g_pids[g_pids == q_pids[0]] = 1000
    g_pids[:2], g_cams[:2] = q_pids[0], q_cams[0]
    m = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, rerank="k-reciprocal", max_rank=5)
    assert m.num_skipped_queries >= 1 and m.num_valid_queries >= 1 and m.num_queries == 6
    assert m == evaluate(k_reciprocal_distances(qf, gf), q_pids, g_pids, q_cams, g_cams, max_rank=5)


def test_memory_stays_bounded(monkeypatch):
    """With small chunks, no allocation on the re-ranked path comes near a Q x G array: numpy's
    (and Python's) peak traced memory, and the largest single torch allocation."""
    from muva_core.eval import rerank

    monkeypatch.setattr(rerank, "ITEM_BLOCK", 256)  # the vectorised per-item steps, too
    kwargs = dict(rerank="k-reciprocal", k1=6, k2=3, num_threads=1)
    rng = np.random.default_rng(7)
    nq, ng = 2000, 3000
    qf, gf, *labels = clustered(rng, nq, ng, 8, n_ids=200)
    tracemalloc.start()
    try:
        m = evaluate_features(qf, gf, *labels, chunk_size=32, **kwargs)
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert m.num_valid_queries > 0
    # even a Q x G array of bools would be nq * ng bytes (float32: 4x); the peak is mostly the sparse V
    assert 0 < numpy_peak < nq * ng, (numpy_peak, nq * ng)

    # torch allocations, on a smaller problem (the profiler is slow; its records would count in tracemalloc)
    nq, ng = 400, 600
    qf, gf, *labels = clustered(rng, nq, ng, 4, n_ids=40)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        m = evaluate_features(qf, gf, *labels, chunk_size=16, **kwargs)
    assert m == evaluate(k_reciprocal_distances(qf, gf, 6, 3, chunk_size=16), *labels)
    torch_largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < torch_largest < nq * ng / 2, (torch_largest, nq * ng)  # blocks: 16 x (Q+G) floats
