"""Re-ID metrics: against an independent per-query computation, a hand-made example, and the
chunked feature path against the full-matrix path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from muva_core.eval import METRICS, ReIDMetrics, evaluate, evaluate_features, pairwise_distance


def reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, use_raw_scores=False):
    """Independent per-query metrics: stable argsort + direct loops, sklearn for AP.

    ``use_raw_scores``: give sklearn the negated distances themselves (valid only without ties),
    otherwise scores that follow the stable order (gallery index breaks ties).
    """
    aps, cmcs, inps, skipped = [], [], [], 0
    for i in range(distmat.shape[0]):
        removed = (g_pids == q_pids[i]) & (g_camids == q_camids[i])
        kept = np.flatnonzero(~removed)
        order = kept[np.argsort(distmat[i, kept], kind="stable")]
        match = (g_pids[order] == q_pids[i]).astype(int)
        if match.sum() == 0:
            skipped += 1
            continue
        first = next(k for k, m in enumerate(match) if m)
        cmcs.append([1.0 if k >= first else 0.0 for k in range(max_rank)])
        if use_raw_scores:
            aps.append(average_precision_score(g_pids[kept] == q_pids[i], -distmat[i, kept]))
        else:
            aps.append(average_precision_score(match, -np.arange(len(match), dtype=float)))
        last = max(k for k, m in enumerate(match) if m)
        inps.append(match.sum() / (last + 1))
    return np.mean(aps), np.mean(cmcs, axis=0), np.mean(inps), len(aps), skipped


def assert_matches_reference(m: ReIDMetrics, ref) -> None:
    mAP, cmc, mINP, n_valid, n_skipped = ref
    assert m.num_valid_queries == n_valid and m.num_skipped_queries == n_skipped
    np.testing.assert_allclose(m.mAP, mAP, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m.cmc, cmc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m.mINP, mINP, rtol=0, atol=1e-12)


def random_labels(rng, nq, ng, n_ids=8, n_cams=3):
    q_pids = rng.integers(0, n_ids + 2, nq)  # ids n_ids, n_ids+1 never appear in the gallery
    g_pids = rng.integers(0, n_ids, ng)
    return q_pids, g_pids, rng.integers(0, n_cams, nq), rng.integers(0, n_cams, ng)


def test_hand_example():
    # gallery:  idx   0  1  2  3  4  5
    g_pids = np.array([1, 1, 2, 2, 1, 3])
    g_cams = np.array([0, 1, 1, 0, 1, 0])
    distmat = np.array([
        # query A (pid 1, cam 0): idx 0 removed (same pid+cam). Kept order by distance:
        # 2 (.2), 3 (.3), 5 (.4), 1 (.5, pos), 4 (.9, pos) -> positives at ranks 4 and 5.
        # AP = (1/4 + 2/5) / 2 = 0.325; first match at rank 4; INP = 2/5 = 0.4
        [0.1, 0.5, 0.2, 0.3, 0.9, 0.4],
        # query B (pid 2, cam 0): idx 3 removed. Kept: 1 (.1), then the tie at .3 broken by
        # gallery index: 0, 2 (pos), 5; then 4 (.6) -> positive at rank 3.
        # AP = 1/3; first match at rank 3; INP = 1/3
        [0.3, 0.1, 0.3, 0.2, 0.6, 0.3],
        # query C (pid 3, cam 0): its only gallery image (idx 5) is same-camera -> skipped
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
    ])
    m = evaluate(distmat, [1, 2, 3], g_pids, [0, 0, 0], g_cams, max_rank=6)
    assert m.num_valid_queries == 2 and m.num_skipped_queries == 1 and m.num_queries == 3
    assert m.mAP == pytest.approx((0.325 + 1 / 3) / 2, abs=1e-15)  # 0.329166...
    assert m.mINP == pytest.approx((0.4 + 1 / 3) / 2, abs=1e-15)  # 0.366666...
    np.testing.assert_array_equal(m.cmc, [0, 0, 0.5, 1, 1, 1])
    d = m.as_dict()
    assert d["mAP"] == pytest.approx(32.9166666667) and d["Rank-1"] == 0.0 and d["Rank-5"] == 100.0
    assert "Rank-10" not in d and d["num_skipped_queries"] == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_rank", [5, 50])
def test_matches_reference_with_ties(seed, max_rank):
    rng = np.random.default_rng(seed)
    nq, ng = 30, 40  # max_rank=50 > ng: the CMC keeps length max_rank, flat at 1 at the end
    q_pids, g_pids, q_cams, g_cams = random_labels(rng, nq, ng)
    distmat = rng.integers(0, 6, (nq, ng)).astype(np.float32)  # heavy ties
    m = evaluate(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
    assert len(m.cmc) == max_rank
    ref = reference(distmat, q_pids, g_pids, q_cams, g_cams, max_rank)
    assert ref[4] > 0  # the data does exercise skipping
    assert_matches_reference(m, ref)


def test_matches_sklearn_on_raw_distances_without_ties():
    rng = np.random.default_rng(3)
    nq, ng = 25, 60
    q_pids, g_pids, q_cams, g_cams = random_labels(rng, nq, ng)
    distmat = rng.random((nq, ng))
    m = evaluate(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    assert_matches_reference(m, reference(distmat, q_pids, g_pids, q_cams, g_cams, 20, use_raw_scores=True))


def test_tie_rule_is_gallery_order():
    g_pids, g_cams = np.array([0, 1]), np.array([1, 1])
    # the negative (idx 0) ties with the positive (idx 1) and comes first -> positive at rank 2
    m = evaluate([[1.0, 1.0]], [1], g_pids, [0], g_cams, max_rank=2)
    assert m.mAP == 0.5 and m.mINP == 0.5 and list(m.cmc) == [0.0, 1.0]
    # swap the gallery order: the positive now wins the tie
    m = evaluate([[1.0, 1.0]], [1], g_pids[::-1].copy(), [0], g_cams, max_rank=2)
    assert m.mAP == 1.0 and list(m.cmc) == [1.0, 1.0]
    # a removed same-camera item tying before the positive does not count
    m = evaluate([[1.0, 1.0]], [1], [1, 1], [0], [0, 1], max_rank=1)
    assert m.mAP == 1.0 and m.rank1 == 1.0


def test_perfect_ranking():
    rng = np.random.default_rng(4)
    nq, ng = 20, 50
    q_pids, g_pids, q_cams, g_cams = random_labels(rng, nq, ng, n_ids=5)
    same = q_pids[:, None] == g_pids[None, :]
    # positives close, negatives far; same-camera same-id items at 0 would be first, but are removed
    distmat = np.where(same, rng.random((nq, ng)), 10 + rng.random((nq, ng)))
    distmat[same & (q_cams[:, None] == g_cams[None, :])] = 0.0
    m = evaluate(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    assert m.num_valid_queries > 0 and m.num_skipped_queries > 0
    assert m.mAP == 1.0 and m.mINP == 1.0 and np.all(m.cmc == 1.0)
    assert m.as_dict()["mAP"] == 100.0 and m.rank1 == m.rank5 == m.rank10 == 1.0


def test_skipped_queries_and_all_skipped():
    g_pids, g_cams = np.array([1, 1, 2]), np.array([0, 1, 0])
    # query 0: pid 1 cam 0 -> positive idx 1; query 1: pid 2 cam 0 -> only same-cam -> skipped;
    # query 2: pid 9 not in gallery -> skipped
    m = evaluate(np.zeros((3, 3)), [1, 2, 9], g_pids, [0, 0, 0], g_cams, max_rank=3)
    assert (m.num_valid_queries, m.num_skipped_queries) == (1, 2)
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate(np.zeros((2, 3)), [2, 9], g_pids, [0, 0], g_cams)


def integer_features(rng, n, dim, metric):
    """Features whose distances are exact in float32 whatever the accumulation order."""
    if metric == "euclidean":
        return rng.integers(-2, 3, (n, dim)).astype(np.float32)
    # 4 entries of +-1: norm exactly 2, so normalised entries are +-0.5 and dot products exact
    f = np.zeros((n, dim), dtype=np.float32)
    for row in f:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return f


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_evaluate_features_equals_evaluate(metric):
    rng = np.random.default_rng(5)
    nq, ng, dim = 23, 70, 6
    q_pids, g_pids, q_cams, g_cams = random_labels(rng, nq, ng)
    qf, gf = integer_features(rng, nq, dim, metric), integer_features(rng, ng, dim, metric)
    # independent float64 distances: exact, so identical to any float32 blockwise computation
    q64, g64 = torch.from_numpy(qf).double(), torch.from_numpy(gf).double()
    if metric == "euclidean":
        d64 = torch.cdist(q64, g64).pow(2)
    else:
        d64 = 1 - (q64 / q64.norm(dim=1, keepdim=True)) @ (g64 / g64.norm(dim=1, keepdim=True)).T
    full = pairwise_distance(qf, gf, metric, chunk_size=nq)
    np.testing.assert_array_equal(full.numpy(), d64.numpy().astype(np.float32))
    assert len(np.unique(full.numpy())) < full.numel() / 4  # plenty of ties
    expected = evaluate(full, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    assert expected.num_skipped_queries > 0
    assert_matches_reference(expected, reference(d64.numpy(), q_pids, g_pids, q_cams, g_cams, 10))
    for chunk in (1, 3, 7, nq, nq + 5):
        for as_torch in (False, True):
            feats = (torch.from_numpy(qf), torch.from_numpy(gf)) if as_torch else (qf, gf)
            got = evaluate_features(*feats, q_pids, g_pids, q_cams, g_cams, metric=metric,
                                    max_rank=10, chunk_size=chunk)
            assert got == expected, (chunk, as_torch)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_float_features_exact_at_equal_chunk_size(metric):
    rng = np.random.default_rng(6)
    nq, ng, dim = 19, 90, 32
    q_pids, g_pids, q_cams, g_cams = random_labels(rng, nq, ng)
    qf = torch.from_numpy(rng.standard_normal((nq, dim)).astype(np.float32))
    gf = torch.from_numpy(rng.standard_normal((ng, dim)).astype(np.float32))
    for chunk in (4, 19):
        dist = pairwise_distance(qf, gf, metric, chunk_size=chunk)
        expected = evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=15)
        assert evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric,
                                 max_rank=15, chunk_size=chunk) == expected
        assert evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric, max_rank=15,
                                 chunk_size=chunk, num_threads=1, progress=True) == expected
        assert_matches_reference(expected, reference(dist.numpy(), q_pids, g_pids, q_cams, g_cams, 15))


def test_pairwise_distance_values():
    rng = np.random.default_rng(7)
    q, g = rng.standard_normal((9, 16)), rng.standard_normal((13, 16))
    d = pairwise_distance(q, g, "euclidean", chunk_size=4)
    assert d.dtype == torch.float32 and d.shape == (9, 13)
    np.testing.assert_allclose(d.numpy(), ((q[:, None] - g[None]) ** 2).sum(-1), rtol=1e-5, atol=1e-4)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    np.testing.assert_allclose(pairwise_distance(q, g, "cosine").numpy(), 1 - cos, atol=1e-6)
    assert pairwise_distance(q, q, "euclidean").diagonal().min() >= 0  # clamped, never negative


def test_metrics_object():
    m = evaluate([[0.0, 1.0], [1.0, 0.0]], [1, 2], [1, 2], [0, 0], [1, 1], max_rank=3)
    assert m.mAP == 1.0 and m.rank1 == 1.0 and len(m.cmc) == 3
    with pytest.raises(ValueError, match="Rank-5"):
        _ = m.rank5
    with pytest.raises(ValueError):
        m.cmc[0] = 0.5  # read-only
    d = m.as_dict()
    assert set(d) == {"mAP", "Rank-1", "mINP", "num_valid_queries", "num_skipped_queries"}
    assert all(type(v) is float for k, v in d.items() if not k.startswith("num_"))
    assert "mAP 100.00" in str(m)


def test_errors():
    pids, cams = np.array([1, 2]), np.array([0, 1])
    with pytest.raises(ValueError, match="shape"):
        evaluate(np.zeros((2, 3)), pids, pids, cams, cams)
    with pytest.raises(ValueError, match="NaN"):
        evaluate([[np.nan, 0.0], [0.0, 1.0]], [1, 2], [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="metric"):
        pairwise_distance(np.ones((2, 3)), np.ones((2, 3)), "manhattan")
    with pytest.raises(ValueError, match="dims differ"):
        pairwise_distance(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_features(np.ones((2, 3)), np.ones((2, 3)), pids, pids, cams, cams, chunk_size=0)
    with pytest.raises(ValueError, match="max_rank"):
        evaluate(np.zeros((2, 2)), pids, pids, cams, cams, max_rank=0)
    with pytest.raises(ValueError, match="q_camids"):
        evaluate(np.zeros((2, 2)), pids, pids, cams[:1], cams)
    with pytest.raises(ValueError, match="len\\(qf\\)"):
        evaluate_features(np.ones((3, 3)), np.ones((2, 3)), pids, pids, cams, cams)
    for metric in METRICS:  # NaN or overflowing features: refused by the ranking of the NaN rows
        for bad in (np.array([[np.nan, 0.0, 0.0], [1.0, 0.0, 0.0]]), np.array([[3e38, 3e38, 0.0], [1.0, 0.0, 0.0]])):
            if metric == "cosine" and bad[0, 0] > 1:
                continue  # normalised first: large features are fine
            with pytest.raises(ValueError, match="NaN"):
                evaluate_features(bad, np.ones((2, 3)), [1, 2], [1, 1], [0, 0], [1, 1], metric=metric)
            with pytest.raises(ValueError, match="NaN"):
                evaluate_features(np.ones((2, 3)), bad, [1, 1], [1, 1], [0, 0], [1, 1], metric=metric)


def test_chance_level_of_random_features():
    from types import SimpleNamespace

    from muva_core.config import RunConfig
    from muva_core.eval.baselines import chance_level

    query = [SimpleNamespace(pid=p, camid=0) for p in range(10)]
    gallery = [SimpleNamespace(pid=p, camid=1) for p in range(10) for _ in range(5)]
    a = chance_level(query, gallery, RunConfig(), draws=20, seed=0)
    assert a == chance_level(query, gallery, RunConfig(), draws=20, seed=0)  # seeded
    # 5 of 50 gallery images match each query: Rank-1 of a random ranking is 10 % on average
    assert 3.0 < a["Rank-1"] < 20.0 and a["Rank-5"] > a["Rank-1"]
    assert 5.0 < a["mAP"] < 30.0


def test_float32_block_path_equals_row_path():
    """float32 blocks are ranked all at once (sort keys built from the float bits), other dtypes row
    by row: the same metrics on negative values, -0.0 vs 0.0, infinities and heavy ties."""
    rng = np.random.default_rng(8)
    nq, ng = 40, 70
    q_pids, g_pids, q_cams, g_cams = random_labels(rng, nq, ng)
    d = rng.integers(-3, 4, (nq, ng)).astype(np.float64)
    d[rng.random((nq, ng)) < 0.1] = -0.0
    d[rng.random((nq, ng)) < 0.03] = np.inf
    d[rng.random((nq, ng)) < 0.03] = -np.inf
    m64 = evaluate(d, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    m32 = evaluate(d.astype(np.float32), q_pids, g_pids, q_cams, g_cams, max_rank=10)
    assert m32 == m64
    assert_matches_reference(m32, reference(d, q_pids, g_pids, q_cams, g_cams, 10))
    has_pos = [np.any((g_pids == q_pids[i]) & (g_cams != q_cams[i])) for i in range(nq)]
    for dtype in (np.float32, np.float64):
        bad = d.astype(dtype)
        bad[has_pos.index(False), 5] = np.nan  # in the row of a skipped query: never looked at
        assert evaluate(bad, q_pids, g_pids, q_cams, g_cams, max_rank=10) == m64
        bad[has_pos.index(True), 5] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            evaluate(bad, q_pids, g_pids, q_cams, g_cams)
