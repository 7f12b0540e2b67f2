"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in bounded memory.

The algorithm is the standard one (the ``re_ranking`` of the authors' code, torchreid, CLIP-ReID),
over all ``N = Q + G`` query and gallery items:

1. original distance ``d(i, j)``: squared euclidean (or ``1 - cos`` with ``metric="cosine"``),
   divided by its maximum over the column, i.e. over all N items (``d`` is symmetric, so this is
   the maximum of row i: ``O[i, j] = d(i, j) / max_k d(i, k)``);
2. ``initial_rank[i]``: the items by ascending ``O[i, :]`` (ties: lower index first);
3. ``R(i)``: the k-reciprocal neighbours, the items j among the first ``k1 + 1`` of i that have i
   among their own first ``k1 + 1``;
4. the 1/2-expansion: for each ``c in R(i)``, its ``round(k1 / 2)``-reciprocal set ``R_h(c)``
   (same rule with ``round(k1 / 2) + 1`` neighbours, numpy's round-half-even) is added when more
   than 2/3 of it lies in ``R(i)``; ``E(i)`` is the union;
5. ``V[i, j] = exp(-O[i, j]) / sum_{j' in E(i)} exp(-O[i, j'])`` for ``j in E(i)``, 0 elsewhere;
6. local query expansion (when ``k2 != 1``): ``V[i] <- mean of V[t] over the first k2 of i``;
7. Jaccard distance ``J[i, j] = 1 - s / (2 - s)`` with ``s = sum_t min(V[i, t], V[j, t])``;
8. ``final = (1 - lambda) * J + lambda * O``, restricted to query rows and gallery columns.

Nothing here holds an N x N, a (Q+G)^2 or a Q x G matrix. The neighbour lists come from chunked
GEMMs with a top-k over all N items (``chunk_size`` rows at a time), ``V`` is sparse (CSR, about
N x |E| entries), the Jaccard sums come from an inverted index of the gallery rows of ``V``, and the
final distances are produced ``chunk_size`` query rows at a time, to be ranked at once by the
plain evaluation's routine (:func:`muva_core.eval.evaluate_features` with
``rerank="k-reciprocal"``). :func:`k_reciprocal_distances` assembles the same blocks into the
dense [Q, G] matrix, for problems that fit in memory; both give bit-identical distances at equal
``chunk_size``, and for every chunk size when the distances are exact in float32.

Numerics: distances are float32 (as the standard), ``V`` and the Jaccard sums float64 (the
standard keeps ``V`` in float16 or float32), the final combination in float32. A row
whose distances are all 0 (all items identical) is divided by 1 instead of 0. Features with NaN
or inf are refused with a ``ValueError``.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from muva_core.eval.distance import (
    DEFAULT_CHUNK_SIZE,
    METRICS,
    available_cores,
    check_chunk_size,
    feature_pair,
    ragged_arange,
    squared_norms,
    torch_threads,
)

ITEM_BLOCK = 4096
"""Items per vectorised step of the neighbour-set and query-expansion stages."""

MAX_CONTRIBUTIONS = 1 << 23
"""Upper bound on the (query, gallery, term) contributions gathered at once for the Jaccard sums
(whole queries only; about 40 bytes each)."""

JACCARD_ROWS = 128
"""Query rows per step of the Jaccard sums (a [128, G] float64 accumulator)."""


def _check_params(k1: Any, k2: Any, lambda_value: Any) -> tuple[int, int, float]:
    for name, v in (("k1", k1), ("k2", k2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}")
    return int(k1), int(k2), float(lambda_value)


class KReciprocal:
    """The sparse state of k-reciprocal re-ranking for one query/gallery pair of feature sets.

    Building it runs stages 1-6 (neighbours, V, query expansion); :meth:`blocks` then yields the
    re-ranked distances [b, G] (float32 numpy) of ``chunk_size`` queries at a time. Memory: the
    features (with ``metric="cosine"`` also their normalised copies), the neighbour lists
    (N x (k1 + 1)), the sparse V and its gallery inverted index, and one [chunk_size, N] block.
    """

    def __init__(self, qf: Any, gf: Any, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                 metric: str = "euclidean", chunk_size: int = DEFAULT_CHUNK_SIZE,
                 progress: bool = False) -> None:
        self.k1, self.k2, self.lambda_value = _check_params(k1, k2, lambda_value)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.metric = metric
        self.chunk_size = check_chunk_size(chunk_size)
        self.progress = progress
        q, g = feature_pair(qf, gf)
        for name, x in (("qf", q), ("gf", g)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} contains NaN or inf: re-ranking needs finite features")
        if metric == "cosine":
            q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)
            self._qa = self._ga = None
        else:
            self._qa, self._ga = squared_norms(q), squared_norms(g)
        self._q, self._g = q, g
        self.num_query, self.num_gallery = q.shape[0], g.shape[0]
        n = self.num_items = self.num_query + self.num_gallery
        self.k_fwd = min(self.k1 + 1, n)                       # first k1 + 1 of initial_rank
        self.k_half = min(int(np.around(self.k1 / 2)) + 1, n)  # first round(k1/2) + 1
        self.k_qe = min(self.k2, n)                            # first k2 (query expansion)
        self.k_keep = max(self.k_fwd, self.k_qe)
        with torch.no_grad():
            self._neighbours()
        indptr, indices, data = self._weights()
        if self.k2 != 1:
            indptr, indices, data = self._query_expansion(indptr, indices, data)
        self._index(indptr, indices, data)

    # ---- distances -----------------------------------------------------------------------
    def _features(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (and squared norms) of the items ``start .. stop - 1`` (queries first)."""
        nq = self.num_query
        parts, aux = [], []
        if start < nq:
            parts.append(self._q[start:min(stop, nq)])
            if self._qa is not None:
                aux.append(self._qa[start:min(stop, nq)])
        if stop > nq:
            parts.append(self._g[max(start - nq, 0):stop - nq])
            if self._ga is not None:
                aux.append(self._ga[max(start - nq, 0):stop - nq])
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        a = None if not aux else (aux[0] if len(aux) == 1 else torch.cat(aux))
        return x, a

    def _distance_into(self, x: torch.Tensor, xa: torch.Tensor | None, target: torch.Tensor,
                       ta: torch.Tensor | None, out: torch.Tensor) -> None:
        """``out = d(x, target)`` (float32, one addmm; ``out`` may be a column slice)."""
        if self.metric == "euclidean":
            torch.add(xa.unsqueeze(1), ta.unsqueeze(0), out=out)
            out.addmm_(x, target.T, beta=1.0, alpha=-2.0).clamp_(min=0.0)
        else:
            torch.mm(x, target.T, out=out)
            out.neg_().add_(1.0)

    def _pair_distances(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """``d(i, j)`` for item pairs, float32 (the same formula as the blocks, pair by pair).

        The pairs are grouped by (query or gallery item) x (query or gallery item), so that every
        batch gathers its rows with one ``index_select`` per side into reused buffers.
        """
        nq, step = self.num_query, 2048
        out = np.empty(len(i), dtype=np.float32)
        side = (i >= nq).astype(np.int64) * 2 + (j >= nq)
        order = np.argsort(side, kind="stable")
        bounds = np.searchsorted(side[order], np.arange(5))
        xi = self._g.new_empty((min(step, len(i)), self._g.shape[1]))
        xj = torch.empty_like(xi)
        for c in range(4):
            src_i, src_j = (self._q, self._g)[c // 2], (self._q, self._g)[c % 2]
            aux_i, aux_j = (self._qa, self._ga)[c // 2], (self._qa, self._ga)[c % 2]
            sel = order[bounds[c]:bounds[c + 1]]
            for a in range(0, len(sel), step):
                k = sel[a:a + step]
                ti = torch.from_numpy(i[k] - nq * (c // 2)).to(self._g.device)
                tj = torch.from_numpy(j[k] - nq * (c % 2)).to(self._g.device)
                bi, bj = xi[: len(k)], xj[: len(k)]
                torch.index_select(src_i, 0, ti, out=bi)
                torch.index_select(src_j, 0, tj, out=bj)
                dot = torch.bmm(bi.unsqueeze(1), bj.unsqueeze(2)).view(-1)
                if self.metric == "euclidean":
                    d = (aux_i[ti] + aux_j[tj]).sub_(dot.mul_(2.0)).clamp_(min=0.0)
                else:
                    d = dot.neg_().add_(1.0)
                out[k] = d.cpu().numpy()
        return out

    # ---- stage 1-2: neighbour lists ---------------------------------------------------------
    def _neighbours(self) -> None:
        """``rank`` [N, k_keep] (int64), ``rank_dist`` (their O values) and the row maxima."""
        n, nq, k = self.num_items, self.num_query, self.k_keep
        k_top = min(k + 1, n)  # one more: tells whether a tie crosses the cut
        self.rank = np.empty((n, k), dtype=np.int64)
        self.rank_dist = np.empty((n, k), dtype=np.float32)
        self.row_max = np.empty(n, dtype=np.float32)
        buf = self._g.new_empty((min(self.chunk_size, n), n))
        bar = tqdm(total=n, desc="re-ranking: neighbours", unit="item", disable=not self.progress)
        for start in range(0, n, self.chunk_size):
            stop = min(start + self.chunk_size, n)
            d = buf[: stop - start]
            x, xa = self._features(start, stop)
            self._distance_into(x, xa, self._q, self._qa, d[:, :nq])
            self._distance_into(x, xa, self._g, self._ga, d[:, nq:])
            m = d.max(dim=1).values
            if not bool(torch.isfinite(m).all()):
                raise ValueError("the distances contain NaN or inf (features too large?)")
            m = torch.where(m > 0, m, torch.ones_like(m))
            d.div_(m.unsqueeze(1))
            vals, idx = torch.topk(d, k_top, dim=1, largest=False, sorted=True)
            vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
            order = np.lexsort((idx, vals), axis=-1)  # by value, then index: the stable order
            vals = np.take_along_axis(vals, order, axis=1)
            idx = np.take_along_axis(idx, order, axis=1)
            if k_top > k:  # a tie at the cut may hide lower indices: rank those rows exactly
                for r in np.flatnonzero(vals[:, k] == vals[:, k - 1]):
                    row = d[r].cpu().numpy()
                    o = np.argsort(row, kind="stable")[:k]
                    idx[r, :k], vals[r, :k] = o, row[o]
            self.rank[start:stop] = idx[:, :k]
            self.rank_dist[start:stop] = vals[:, :k]
            self.row_max[start:stop] = m.cpu().numpy()
            bar.update(stop - start)
        bar.close()

    def _reciprocal_masks(self) -> tuple[np.ndarray, np.ndarray]:
        """``fwd_mask[i, a]``: ``rank[i, a]`` is a k1-reciprocal neighbour of i (a < k1 + 1);
        ``half_mask[c, b]``: ``rank[c, b]`` is a round(k1/2)-reciprocal neighbour of c."""
        n = self.num_items
        fwd_mask = np.empty((n, self.k_fwd), dtype=bool)
        half_mask = np.empty((n, self.k_half), dtype=bool)
        for a in range(0, n, ITEM_BLOCK):
            b = min(a + ITEM_BLOCK, n)
            ids = np.arange(a, b)[:, None, None]
            for k, mask in ((self.k_fwd, fwd_mask), (self.k_half, half_mask)):
                fwd = self.rank[a:b, :k]
                mask[a:b] = (self.rank[fwd, :k] == ids).any(axis=2)
        return fwd_mask, half_mask

    # ---- stage 3-5: V ----------------------------------------------------------------------
    def _expansion_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The sorted unique pairs (i, j), j in E(i) (the expanded k-reciprocal set)."""
        n, kf, kh = self.num_items, self.k_fwd, self.k_half
        fwd_mask, half_mask = self._reciprocal_masks()
        keys = []
        for a in range(0, n, ITEM_BLOCK):
            b = min(a + ITEM_BLOCK, n)
            fwd = self.rank[a:b, :kf]                   # candidates c (valid where fm)
            fm = fwd_mask[a:b]
            recip = np.where(fm, fwd, -1)               # R(i), -1 elsewhere
            half = self.rank[fwd, :kh]                  # [n, kf, kh]: first kh of each c
            hm = half_mask[fwd]                         # ... that are in R_h(c)
            inside = (half[..., None] == recip[:, None, None, :]).any(axis=3) & hm
            n_inside, n_half = inside.sum(axis=2), hm.sum(axis=2)
            take = fm & (n_inside > (2.0 / 3.0) * n_half)  # the standard's "> 2/3 * len" test
            rows = np.arange(a, b, dtype=np.int64)
            i_r = np.broadcast_to(rows[:, None], fm.shape)[fm]
            i_h = np.broadcast_to(rows[:, None, None], half.shape)[take[..., None] & hm]
            j = np.concatenate([fwd[fm], half[take[..., None] & hm]])
            i = np.concatenate([i_r, i_h])
            keys.append(np.unique(i * n + j))
        key = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
        return key // n, key % n

    def _weights(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """V as CSR (indptr, indices, float64 data): Gaussian weights of O over E(i), row-normalised."""
        n = self.num_items
        i, j = self._expansion_pairs()
        dist = np.empty(len(i), dtype=np.float32)
        for a in range(0, len(i), 1 << 20):  # O(i, j) from the neighbour lists where j is listed
            ii, jj = i[a:a + (1 << 20)], j[a:a + (1 << 20)]
            hit = self.rank[ii] == jj[:, None]
            found = hit.any(axis=1)
            dist[a:a + len(ii)][found] = self.rank_dist[ii[found], hit[found].argmax(axis=1)]
            missing = np.flatnonzero(~found)
            if missing.size:  # else computed: d(i, j) / row_max(i), as in the blocks
                with torch.no_grad():
                    d = self._pair_distances(ii[missing], jj[missing])
                dist[a + missing] = d / self.row_max[ii[missing]]
        w = np.exp(-dist.astype(np.float64))
        counts = np.bincount(i, minlength=n)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        nonempty = counts > 0
        sums = np.zeros(n, dtype=np.float64)
        if len(w):
            sums[nonempty] = np.add.reduceat(w, indptr[:-1][nonempty])
        data = w / sums[i]
        return indptr, j.astype(np.int32), data

    def _query_expansion(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``V_qe[i] = mean of V[t]`` over the first k2 items t of i, as CSR."""
        n, kq = self.num_items, self.k_qe
        lengths = np.diff(indptr)
        counts = np.zeros(n, dtype=np.int64)
        out_j, out_v = [], []
        for a in range(0, n, ITEM_BLOCK):
            b = min(a + ITEM_BLOCK, n)
            t = self.rank[a:b, :kq].reshape(-1)                      # (i, a) major order
            src = ragged_arange(indptr[t], lengths[t])
            rows = np.repeat(np.repeat(np.arange(b - a, dtype=np.int64), kq), lengths[t])
            key = rows * n + indices[src]
            order = np.argsort(key, kind="stable")                   # keeps the k2 order per entry
            key = key[order]
            if not len(key):
                continue
            first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
            out_v.append(np.add.reduceat(data[src][order], first) / kq)
            key = key[first]
            out_j.append((key % n).astype(np.int32))
            counts[a:b] = np.bincount(key // n, minlength=b - a)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        if not out_j:
            return indptr, np.zeros(0, dtype=np.int32), np.zeros(0)
        return indptr, np.concatenate(out_j), np.concatenate(out_v)

    # ---- stage 7-8: Jaccard and the final distances ---------------------------------------
    def _index(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        """Query rows of V (CSR) and the inverted index of its gallery rows (CSC: term -> items)."""
        nq, n = self.num_query, self.num_items
        qe = indptr[nq]
        self._q_indptr, self._q_terms, self._q_vals = indptr[: nq + 1], indices[:qe], data[:qe]
        g_terms = indices[qe:]
        g_rows = np.repeat(np.arange(self.num_gallery, dtype=np.int32), np.diff(indptr[nq:]))
        order = np.argsort(g_terms, kind="stable")  # gallery items ascending within each term
        self._col_rows = g_rows[order]
        self._col_vals = data[qe:][order]
        self._col_ptr = np.concatenate([[0], np.cumsum(np.bincount(g_terms, minlength=n))])
        self.nnz = int(len(indices))

    def _jaccard_sums(self, start: int, stop: int) -> np.ndarray:
        """``s[i, j] = sum_t min(V[i, t], V[j, t])`` for queries ``start .. stop - 1`` (flat
        [(stop - start) * G] float64; each sum added in ascending t, as the standard's loop)."""
        ng = self.num_gallery
        lo, hi = self._q_indptr[start], self._q_indptr[stop]
        terms, vals = self._q_terms[lo:hi], self._q_vals[lo:hi]
        rows = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(self._q_indptr[start:stop + 1]))
        counts = self._col_ptr[terms + 1] - self._col_ptr[terms]
        src = ragged_arange(self._col_ptr[terms], counts)
        key = np.repeat(rows * ng, counts) + self._col_rows[src]
        w = np.minimum(np.repeat(vals, counts), self._col_vals[src])
        return np.bincount(key, weights=w, minlength=(stop - start) * ng)

    def _query_groups(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """Consecutive query ranges whose Jaccard contributions stay under MAX_CONTRIBUTIONS
        (whole queries only, at most JACCARD_ROWS rows)."""
        lo, hi = self._q_indptr[start], self._q_indptr[stop]
        terms = self._q_terms[lo:hi]
        per_entry = self._col_ptr[terms + 1] - self._col_ptr[terms]
        cum = np.concatenate([[0], np.cumsum(per_entry)])
        per_query = cum[self._q_indptr[start + 1:stop + 1] - lo] - cum[self._q_indptr[start:stop] - lo]
        a = start
        while a < stop:
            total, b = 0, a
            while b < stop and b - a < min(JACCARD_ROWS, self.chunk_size) and (b == a or total + per_query[b - start] <= MAX_CONTRIBUTIONS):
                total += int(per_query[b - start])
                b += 1
            yield a, b
            a = b

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_query, final distances [b, G] float32 numpy)`` for ``chunk_size`` queries at a
        time (the block is reused: valid until the next one is requested).

        ``final = fl32(fl32(lambda * O) + fl32((1 - lambda) * J))`` in float32 (lambda and
        1 - lambda rounded to float32, J in float64): where no term is shared (s = 0, J = 1) that is
        the two in-place float32 passes over the block, elsewhere the same formula on the few
        (query, gallery) pairs with s > 0.
        """
        nq, ng = self.num_query, self.num_gallery
        lam32, c32 = float(np.float32(self.lambda_value)), float(np.float32(1.0 - self.lambda_value))
        c = 1.0 - self.lambda_value
        dist = self._g.new_empty((min(self.chunk_size, nq), ng))
        bar = tqdm(total=nq, desc="re-ranking: queries", unit="query", disable=not self.progress)
        for start in range(0, nq, self.chunk_size):
            stop = min(start + self.chunk_size, nq)
            d = dist[: stop - start]
            with torch.no_grad():
                x, xa = self._features(start, stop)
                self._distance_into(x, xa, self._g, self._ga, d)
                d.div_(torch.from_numpy(self.row_max[start:stop]).to(d.device).unsqueeze(1))
                o_t = d.cpu()  # O[query, gallery], float32 (the same memory on the CPU)
            o = o_t.numpy().reshape(-1)
            shared = []
            for a, b in self._query_groups(start, stop):
                s = self._jaccard_sums(a, b)
                nz = np.flatnonzero(s)
                sv = s[nz]
                nz += (a - start) * ng
                jac = 1.0 - sv / (2.0 - sv)
                shared.append((nz, np.float32(lam32) * o[nz] + (c * jac).astype(np.float32)))
            with torch.no_grad():
                o_t.mul_(lam32).add_(c32)  # J = 1 where s = 0
            for nz, v in shared:
                o[nz] = v
            bar.update(stop - start)
            yield start, o_t.numpy()
        bar.close()


def k_reciprocal_distances(query_features: Any, gallery_features: Any, k1: int = 20, k2: int = 6,
                           lambda_value: float = 0.3, *, metric: str = "euclidean",
                           chunk_size: int = DEFAULT_CHUNK_SIZE, num_threads: int | None = None,
                           progress: bool = False) -> torch.Tensor:
    """k-reciprocal re-ranked query-gallery distances [Q, G] (float32 tensor on the CPU).

    The standard algorithm of Zhong et al. (CVPR 2017) with its parameters (k1=20, k2=6,
    lambda=0.3 as in the paper); see the module docstring for the exact definition and tie rule.
    The result is dense (Q x G floats), for problems that fit in memory; for evaluation at any
    scale use ``evaluate_features(..., rerank="k-reciprocal")``, which ranks the same blocks as
    they are produced: ``evaluate(k_reciprocal_distances(qf, gf, chunk_size=c), ...)`` equals it
    exactly at equal ``chunk_size``. ``metric="euclidean"`` (the standard) uses the squared
    euclidean distance as the original distance, ``"cosine"`` uses ``1 - cos``.
    """
    with torch_threads(num_threads or available_cores()):
        state = KReciprocal(query_features, gallery_features, k1, k2, lambda_value, metric=metric,
                            chunk_size=chunk_size, progress=progress)
        out = np.empty((state.num_query, state.num_gallery), dtype=np.float32)
        for start, block in state.blocks():
            out[start:start + len(block)] = block
    return torch.from_numpy(out)
