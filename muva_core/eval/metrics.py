"""Re-ID retrieval metrics under the Market-1501 protocol: CMC, mAP and mINP.

Protocol (as torchreid's ``eval_market1501``, section 4.1 of the paper): for each query, the gallery
items with the same identity AND the same camera are removed; the remaining gallery items with the
same identity are the positives. Queries with no positive left are skipped (and counted).

- CMC: ``cmc[k]`` is the fraction of valid queries whose first positive is within the top ``k + 1``
  (always ``max_rank`` long; torchreid instead truncates it when the gallery is smaller).
- AP: the mean, over a query's positives, of the precision at the rank of that positive.
- mINP (AGW, Ye et al. 2021): the mean over valid queries of ``num_positives / rank_of_last_positive``.

Tie rule: the gallery is ranked by ascending distance and equal distances are ordered by gallery
index (lower index first), i.e. exactly the order ``np.argsort(row, kind="stable")`` gives.

Both entry points share one ranking routine, so ``evaluate(pairwise_distance(qf, gf, metric,
chunk_size=c), ...)`` equals ``evaluate_features(qf, gf, ..., metric, chunk_size=c)`` exactly. With
another chunk size the distances themselves may differ in the last bit (BLAS accumulation order
depends on the matrix shape), which can swap near-tied gallery items; with exactly representable
distances (e.g. small integer features) the results are identical for every chunk size.

Instead of a full argsort per query, the ranking keeps only the distance *values* of a row that are
not larger than the query's farthest positive (one vectorised pass), sorts those (usually few) and
finds the rank of each positive by binary search, then corrects for the removed same-camera items
and for exact ties. A float32 block is ranked all at once: the kept values of all its rows are
sorted together as int64 keys (row, order-preserving float bits); other dtypes row by row, with the
same rule. The NaN check (one more pass) is skipped by ``evaluate_features`` when the features'
norms show that no distance can be NaN. The distance blocks (:mod:`muva_core.eval.distance`) are
one ``addmm`` each into a reused buffer (precomputed norms), so features-to-metrics costs about one
GEMM of the same features (``benchmarks/eval_scale.py`` measures the ratio).

k-reciprocal re-ranking (``evaluate_features(..., rerank="k-reciprocal")``) is in
:mod:`muva_core.eval.rerank`; its blocks are ranked by the same routine.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from muva_core.eval.distance import (
    DEFAULT_CHUNK_SIZE,
    as_features,
    available_cores,
    check_chunk_size,
    distance_blocks,
    distances_finite,
    prepare_features,
    ragged_arange,
    torch_threads,
)
from muva_core.eval.rerank import KReciprocal

RERANK_METHODS: tuple[str, ...] = ("none", "k-reciprocal")
"""``evaluate_features(rerank=...)``: plain distances, or k-reciprocal re-ranking (Zhong et al. 2017)."""


@dataclass(frozen=True, eq=False)
class ReIDMetrics:
    """Retrieval metrics; every rate is a fraction in [0, 1] (``as_dict`` gives percentages).

    mAP:  mean average precision over the valid queries
    cmc:  CMC curve, ``cmc[k]`` = Rank-(k+1) rate, length ``max_rank`` (read-only)
    mINP: mean inverse negative penalty over the valid queries
    num_valid_queries / num_skipped_queries: queries with / without a positive in the gallery
    """

    mAP: float
    cmc: np.ndarray = field(repr=False)
    mINP: float
    num_valid_queries: int
    num_skipped_queries: int

    def rank(self, k: int) -> float:
        """Rank-k rate (fraction); needs ``1 <= k <= max_rank``."""
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f"Rank-{k} needs 1 <= k <= max_rank={len(self.cmc)}")
        return float(self.cmc[k - 1])

    @property
    def rank1(self) -> float:
        return self.rank(1)

    @property
    def rank5(self) -> float:
        return self.rank(5)

    @property
    def rank10(self) -> float:
        return self.rank(10)

    @property
    def num_queries(self) -> int:
        return self.num_valid_queries + self.num_skipped_queries

    def as_dict(self) -> dict[str, float | int]:
        """Plain Python numbers: ``mAP``, ``Rank-1``, ``Rank-5``, ``Rank-10``, ``mINP`` in PERCENT
        (Rank-k only where ``k <= max_rank``), plus the two query counts as ints."""
        out: dict[str, float | int] = {"mAP": 100.0 * float(self.mAP)}
        for k in (1, 5, 10):
            if k <= len(self.cmc):
                out[f"Rank-{k}"] = 100.0 * self.rank(k)
        out["mINP"] = 100.0 * float(self.mINP)
        out["num_valid_queries"] = int(self.num_valid_queries)
        out["num_skipped_queries"] = int(self.num_skipped_queries)
        return out

    def __eq__(self, other: object) -> bool:
        """Exact equality of every field (no tolerance)."""
        if not isinstance(other, ReIDMetrics):
            return NotImplemented
        return (
            self.mAP == other.mAP
            and self.mINP == other.mINP
            and self.num_valid_queries == other.num_valid_queries
            and self.num_skipped_queries == other.num_skipped_queries
            and np.array_equal(self.cmc, other.cmc)
        )

    __hash__ = None  # type: ignore[assignment]

    def __str__(self) -> str:
        d = self.as_dict()
        ranks = " ".join(f"{k} {v:.2f}" for k, v in d.items() if k.startswith("Rank-"))
        return (
            f"mAP {d['mAP']:.2f} | {ranks} | mINP {d['mINP']:.2f} (%; "
            f"{self.num_valid_queries} valid, {self.num_skipped_queries} skipped queries)"
        )


# --------------------------------------------------------------------------------------------
# ranking


def _to_numpy_1d(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _float32_keys(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """int64 keys ordered as ``(row, value)`` for float32 values (no NaN): the row in the high 32
    bits, the value's bits made order-preserving in the low 32 (-0.0 counts as 0.0)."""
    bits = (values + np.float32(0.0)).view(np.int32).astype(np.int64)  # -0.0 + 0.0 = +0.0
    bits = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)     # negatives: reverse order
    return (rows.astype(np.int64) << 32) | bits


def _positive_ranks(row: np.ndarray, pos: np.ndarray, rem: np.ndarray, check_nan: bool = True) -> np.ndarray:
    """0-based ranks, ascending, of the gallery items ``pos`` among all items except ``rem``.

    The rank of p counts the kept items j with ``row[j] < row[p]``, or ``row[j] == row[p]`` and
    ``j < p`` (the stable tie rule). Only the values up to the farthest positive matter, so only
    those are sorted (the values only: a SIMD sort, much cheaper than an argsort).
    """
    dp = row[pos]
    if check_nan and np.isnan(row.max()):  # max propagates NaN
        raise ValueError("the distance matrix contains NaN")
    near = row[row <= dp.max()]  # every item closer than some positive, and the positives
    near.sort()
    before = np.searchsorted(near, dp, side="left")  # items strictly closer, removed ones included
    n_equal = np.searchsorted(near, dp, side="right") - before
    for k in np.flatnonzero(n_equal > 1):  # exact ties (rare for real features): break by index
        before[k] += np.count_nonzero(row[: pos[k]] == dp[k])
    if rem.size:  # the removed same-camera items never count
        dr = row[rem]
        ahead = (dr[None, :] < dp[:, None]) | ((dr[None, :] == dp[:, None]) & (rem[None, :] < pos[:, None]))
        before -= ahead.sum(axis=1)
    before.sort()
    return before


class _Ranker:
    """Per-query CMC/AP/INP of distance rows, collected by query index, then aggregated."""

    def __init__(self, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any, max_rank: int) -> None:
        self.q_pids = _to_numpy_1d(q_pids, "q_pids")
        self.g_pids = _to_numpy_1d(g_pids, "g_pids")
        self.q_camids = _to_numpy_1d(q_camids, "q_camids")
        self.g_camids = _to_numpy_1d(g_camids, "g_camids")
        if len(self.q_pids) != len(self.q_camids):
            raise ValueError(f"q_pids has {len(self.q_pids)} entries but q_camids has {len(self.q_camids)}")
        if len(self.g_pids) != len(self.g_camids):
            raise ValueError(f"g_pids has {len(self.g_pids)} entries but g_camids has {len(self.g_camids)}")
        if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
            raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
        self.max_rank = int(max_rank)
        self.num_q, self.num_g = len(self.q_pids), len(self.g_pids)
        # gallery grouped by identity: the same-identity items of a query are one slice
        self._order = np.argsort(self.g_pids, kind="stable")
        sorted_pids = self.g_pids[self._order]
        self._lo = np.searchsorted(sorted_pids, self.q_pids, side="left")
        self._hi = np.searchsorted(sorted_pids, self.q_pids, side="right")
        # per query, ascending gallery index: positives (same id, other camera) and removed items
        # (same id, same camera), as CSR arrays
        counts = self._hi - self._lo
        same = self._order[ragged_arange(self._lo, counts)]
        owner = np.repeat(np.arange(self.num_q), counts)
        removed = self.g_camids[same] == self.q_camids[owner]
        self._pos = same[~removed]
        self._pos_ptr = np.concatenate([[0], np.cumsum(np.bincount(owner[~removed], minlength=self.num_q))])
        self._rem = same[removed]
        self._rem_ptr = np.concatenate([[0], np.cumsum(np.bincount(owner[removed], minlength=self.num_q))])
        self.ap = np.zeros(self.num_q, dtype=np.float64)
        self.inp = np.zeros(self.num_q, dtype=np.float64)
        self.first = np.full(self.num_q, -1, dtype=np.int64)  # -1: skipped (no positive)

    def check_shape(self, shape: tuple[int, ...], name: str) -> None:
        if tuple(shape) != (self.num_q, self.num_g):
            raise ValueError(f"{name} has shape {tuple(shape)}, expected (num_query, num_gallery) = "
                             f"({self.num_q}, {self.num_g}) from the pid/camid arrays")

    def rank_rows(self, rows: np.ndarray, start: int, check_nan: bool = True) -> None:
        """Score queries ``start .. start + len(rows) - 1`` from their distance rows (``check_nan``
        False: the caller knows the rows hold no NaN, one pass fewer)."""
        if rows.dtype == np.float32 and rows.ndim == 2:
            self._rank_float32(rows, start, check_nan)
            return
        queries, ranks = [], []
        for i, row in enumerate(rows):
            q = start + i
            pos = self._pos[self._pos_ptr[q]:self._pos_ptr[q + 1]]
            if pos.size:
                queries.append(q)
                ranks.append(_positive_ranks(row, pos, self._rem[self._rem_ptr[q]:self._rem_ptr[q + 1]],
                                             check_nan))
        if queries:
            self._score(np.asarray(queries), np.concatenate(ranks), np.array([len(r) for r in ranks]))

    def _rank_float32(self, rows: np.ndarray, start: int, check_nan: bool = True) -> None:
        """The rule of :func:`_positive_ranks` for a whole float32 block at once: the values up to
        each query's farthest positive are sorted together, keyed by (row, value)."""
        b = len(rows)
        qs = np.arange(start, start + b)
        n_pos = self._pos_ptr[qs + 1] - self._pos_ptr[qs]
        valid = np.flatnonzero(n_pos)
        if valid.size == 0:
            return
        if check_nan and np.isnan(rows.max()) and np.isnan(rows[valid]).any():  # max propagates NaN
            raise ValueError("the distance matrix contains NaN")
        n_pos = n_pos[valid]
        p_row = np.repeat(valid, n_pos)                                  # block row of each positive
        p_col = self._pos[ragged_arange(self._pos_ptr[start + valid], n_pos)]
        dp = rows[p_row, p_col]
        seg = np.concatenate([[0], np.cumsum(n_pos)])                    # positives of each valid row
        limit = np.full(b, -np.inf, dtype=np.float32)
        limit[valid] = np.maximum.reduceat(dp, seg[:-1])
        near = rows <= limit[:, None]  # every item closer than some positive, and the positives
        n_near = np.count_nonzero(near, axis=1)
        keys = _float32_keys(rows[near], np.repeat(np.arange(b), n_near))
        keys.sort()
        p_key = _float32_keys(dp, p_row)
        left = np.searchsorted(keys, p_key, side="left")
        before = left - np.concatenate([[0], np.cumsum(n_near)])[p_row]  # strictly closer items
        n_equal = np.searchsorted(keys, p_key, side="right") - left
        for k in np.flatnonzero(n_equal > 1):  # exact ties (rare for real features): break by index
            before[k] += np.count_nonzero(rows[p_row[k], : p_col[k]] == dp[k])
        n_rem = (self._rem_ptr[qs + 1] - self._rem_ptr[qs])[p_row]
        if n_rem.any():  # the removed same-camera items never count
            pair = np.repeat(np.arange(len(dp)), n_rem)
            r_col = self._rem[ragged_arange(self._rem_ptr[start + p_row], n_rem)]
            dr = rows[p_row[pair], r_col]
            ahead = (dr < dp[pair]) | ((dr == dp[pair]) & (r_col < p_col[pair]))
            before -= np.bincount(pair, weights=ahead, minlength=len(dp)).astype(np.int64)
        stride = self.num_g + 1  # sort the ranks within each query
        ranks = np.sort(p_row * stride + before) - p_row * stride
        self._score(start + valid, ranks, n_pos)

    def _score(self, queries: np.ndarray, ranks: np.ndarray, n_pos: np.ndarray) -> None:
        """First-match rank, AP and INP of ``queries`` from their positives' 0-based ranks
        (concatenated, ascending within each query; ``n_pos`` per query)."""
        seg = np.concatenate([[0], np.cumsum(n_pos)])
        hit = np.arange(len(ranks)) - np.repeat(seg[:-1], n_pos) + 1.0  # j-th positive: j / rank
        self.first[queries] = ranks[seg[:-1]]
        self.ap[queries] = np.add.reduceat(hit / (ranks + 1.0), seg[:-1]) / n_pos
        self.inp[queries] = n_pos / (ranks[seg[1:] - 1] + 1.0)

    def rank_block(self, rows: np.ndarray, start: int, pool: ThreadPoolExecutor, n_workers: int,
                   check_nan: bool = True) -> None:
        """``rank_rows`` with the rows split across ``n_workers`` pool threads (sorting releases the GIL)."""
        if n_workers <= 1 or len(rows) < 2:
            self.rank_rows(rows, start, check_nan)
            return
        bounds = np.linspace(0, len(rows), min(n_workers, len(rows)) + 1).astype(int)
        futures = [pool.submit(self.rank_rows, rows[a:b], start + a, check_nan)
                   for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for f in futures:
            f.result()

    def result(self) -> ReIDMetrics:
        valid = self.first >= 0
        num_valid = int(valid.sum())
        if num_valid == 0:
            raise ValueError("no query has a valid match (a same-identity gallery item from another "
                             "camera): the metrics are undefined")
        first = self.first[valid]
        hits = np.bincount(first[first < self.max_rank], minlength=self.max_rank)
        cmc = np.cumsum(hits) / num_valid
        cmc.setflags(write=False)
        return ReIDMetrics(
            mAP=float(np.mean(self.ap[valid])),
            cmc=cmc,
            mINP=float(np.mean(self.inp[valid])),
            num_valid_queries=num_valid,
            num_skipped_queries=self.num_q - num_valid,
        )


def evaluate(distmat: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
             max_rank: int = 50, num_threads: int | None = None, progress: bool = False) -> ReIDMetrics:
    """Market-1501 protocol metrics of a full distance matrix [num_query, num_gallery].

    ``distmat`` may be a numpy array or a torch tensor (smaller = more similar). See the module
    docstring for the protocol and the tie rule. Raises ``ValueError`` if no query has a valid
    match, on shape mismatches, or on NaN in the row of a valid query. ``num_threads`` defaults to
    the available cores.
    """
    if isinstance(distmat, torch.Tensor):
        distmat = distmat.detach().cpu().numpy()
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D [num_query, num_gallery], got shape {distmat.shape}")
    ranker = _Ranker(q_pids, g_pids, q_camids, g_camids, max_rank)
    ranker.check_shape(distmat.shape, "distmat")
    n_threads = num_threads or available_cores()
    step = DEFAULT_CHUNK_SIZE
    with ThreadPoolExecutor(n_threads) as pool:
        for start in tqdm(range(0, ranker.num_q, step), desc="evaluate", unit="block", disable=not progress):
            ranker.rank_block(distmat[start:start + step], start, pool, n_threads)
    return ranker.result()


def evaluate_features(qf: Any, gf: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
                      metric: str = "euclidean", max_rank: int = 50, chunk_size: int = DEFAULT_CHUNK_SIZE,
                      progress: bool = False, num_threads: int | None = None, rerank: str = "none",
                      k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> ReIDMetrics:
    """Market-1501 protocol metrics straight from query/gallery features, in bounded memory.

    Features are numpy arrays or torch tensors [num, dim] (computed in float32 on the gallery
    tensor's device). Distances are computed ``chunk_size`` query rows at a time with one matmul
    each (into a reused buffer) and each block is ranked at once, so memory is the features plus
    one [chunk_size, num_gallery] block. The result equals
    ``evaluate(pairwise_distance(qf, gf, metric, chunk_size), ...)`` exactly. ``num_threads``
    (default: the available cores) applies to torch and the ranking.

    ``rerank="k-reciprocal"``: k-reciprocal re-ranking (Zhong et al. 2017) with ``k1``, ``k2``,
    ``lambda_value`` (the paper's 20, 6, 0.3), ``metric`` being the original distance. Memory stays
    bounded (features, neighbour lists, the sparse V, one [chunk_size, num_query + num_gallery]
    block; never a Q x G or (Q+G)^2 matrix) and the result equals
    ``evaluate(k_reciprocal_distances(qf, gf, k1, k2, lambda_value, metric=metric,
    chunk_size=chunk_size), ...)`` exactly. See :mod:`muva_core.eval.rerank`.
    """
    if rerank not in RERANK_METHODS:
        raise ValueError(f"rerank must be one of {RERANK_METHODS}, got {rerank!r}")
    ranker = _Ranker(q_pids, g_pids, q_camids, g_camids, max_rank)
    n_threads = num_threads or available_cores()
    if rerank == "k-reciprocal":
        n_q, n_g = as_features(qf, "qf").shape[0], as_features(gf, "gf").shape[0]
        ranker.check_shape((n_q, n_g), "(len(qf), len(gf))")
        if ranker.num_q == 0:
            raise ValueError("qf is empty: there is no query to evaluate")
        with torch_threads(n_threads), ThreadPoolExecutor(n_threads) as pool:
            state = KReciprocal(qf, gf, k1, k2, lambda_value, metric=metric, chunk_size=chunk_size,
                                progress=progress)
            for start, block in state.blocks():
                ranker.rank_block(block, start, pool, n_threads)
        return ranker.result()
    _rank_features(ranker, qf, gf, metric, chunk_size, n_threads, progress)
    return ranker.result()


def _rank_features(ranker: _Ranker, qf: Any, gf: Any, metric: str, chunk_size: int, n_threads: int,
                   progress: bool = False) -> None:
    """Score every query of ``ranker`` from the plain distances of ``qf`` / ``gf`` (blocks of ``chunk_size`` rows)."""
    prepared = prepare_features(qf, gf, metric)
    ranker.check_shape((prepared[0].shape[0], prepared[1].shape[0]), "(len(qf), len(gf))")
    if ranker.num_q == 0:
        raise ValueError("qf is empty: there is no query to evaluate")
    check_nan = not distances_finite(prepared, metric)
    with torch_threads(n_threads), ThreadPoolExecutor(n_threads) as pool:
        bar = tqdm(total=ranker.num_q, desc="evaluate_features", unit="query", disable=not progress)
        for start, dist in distance_blocks(prepared, metric, chunk_size, reuse=True):
            ranker.rank_block(dist.cpu().numpy(), start, pool, n_threads, check_nan)
            bar.update(dist.shape[0])
        bar.close()


def per_query_metrics(qf: Any, gf: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
                      metric: str = "euclidean", chunk_size: int = DEFAULT_CHUNK_SIZE,
                      num_threads: int | None = None) -> dict[str, np.ndarray]:
    """Each query's own numbers under the protocol of :func:`evaluate_features` (whose ``mAP`` is the mean of
    ``ap`` over the valid queries): ``ap`` and ``inp`` (NaN for a query with no positive), ``first_match`` (the
    0-based rank of its first positive, -1 without one) and ``num_positives``, each ``[num_query]``."""
    ranker = _Ranker(q_pids, g_pids, q_camids, g_camids, max_rank=1)
    _rank_features(ranker, qf, gf, metric, check_chunk_size(chunk_size), num_threads or available_cores())
    valid = ranker.first >= 0
    return {"ap": np.where(valid, ranker.ap, np.nan), "inp": np.where(valid, ranker.inp, np.nan),
            "first_match": ranker.first.copy(), "num_positives": np.diff(ranker._pos_ptr)}
