"""What Re-ID metrics and re-ranking share: the query-gallery distances and their chunking.

``metric="euclidean"`` is the SQUARED euclidean distance (as torchreid; same ranking), ``"cosine"``
is ``1 - cosine similarity``. The distance blocks are one ``addmm`` each (precomputed norms),
optionally into a reused buffer, ``chunk_size`` query rows at a time. :mod:`muva_core.eval.metrics`
ranks these blocks, :mod:`muva_core.eval.rerank` builds the k-reciprocal neighbour lists from the
same features; both also share the thread and ragged-index helpers below.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

METRICS: tuple[str, ...] = ("euclidean", "cosine")
"""Supported distances: squared euclidean (as torchreid) and cosine distance ``1 - cos``."""

DEFAULT_CHUNK_SIZE = 1024
"""Query rows per distance block: 1024 x 82,161 gallery items is 336 MB of float32 (smaller blocks
make the GEMM slower: each call re-packs the whole gallery)."""


# --------------------------------------------------------------------------------------------
# distances


def as_features(x: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    """A 2-D float32 tensor view of ``x`` (no copy when it already is one)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        with warnings.catch_warnings():  # read-only arrays are fine: the features are never written
            warnings.filterwarnings("ignore", message=".*not writable.*")
            t = torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num, dim], got shape {tuple(t.shape)}")
    if device is not None:
        t = t.to(device)
    return t.to(torch.float32)


def squared_norms(x: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """Row-wise squared L2 norms, in row blocks (no full-size temporary)."""
    return torch.cat([b.pow(2).sum(dim=1) for b in x.split(block)]) if len(x) else x.new_empty(0)


def feature_pair(qf: Any, gf: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and gallery features as float32 tensors on one device, of the same width, the gallery not empty."""
    g = as_features(gf, "gf")
    q = as_features(qf, "qf", device=g.device)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"feature dims differ: qf has {q.shape[1]}, gf has {g.shape[1]}")
    if g.shape[0] == 0:
        raise ValueError("gf is empty: the gallery needs at least one item")
    return q, g


def prepare_features(qf: Any, gf: Any, metric: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated float32 features and the per-row terms of the distance (computed once)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    q, g = feature_pair(qf, gf)
    if metric == "euclidean":
        q_aux = squared_norms(q)
        g_aux = squared_norms(g)
    else:  # cosine: normalise the (small) query side, divide by the gallery norms per block
        q = F.normalize(q, dim=1)
        q_aux = q.new_empty(0)
        g_aux = -1.0 / g.norm(dim=1).clamp_min(1e-12)
    return q, g, q_aux, g_aux


def distance_block(q: torch.Tensor, q_aux: torch.Tensor, g: torch.Tensor, g_aux: torch.Tensor,
                   metric: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Distances of a block of (prepared) query rows to the whole gallery, float32 [B, G].

    One GEMM (``addmm``) per block, written into ``out`` when given (a [B, G] float32 tensor whose
    rows are contiguous, e.g. a reused buffer or a row/column slice of a bigger matrix): no other
    full-size temporary. The values do not depend on whether ``out`` is given.
    """
    if out is None:
        out = q.new_empty((q.shape[0], g.shape[0]))
    if metric == "euclidean":
        # (|q|^2 + |g|^2) - 2 q.g, clamped at 0 (rounding can make it slightly negative)
        torch.add(q_aux.unsqueeze(1), g_aux.unsqueeze(0), out=out)
        return out.addmm_(q, g.T, beta=1.0, alpha=-2.0).clamp_(min=0.0)
    torch.mm(q, g.T, out=out)  # q is unit-norm; g_aux = -1/|g|  ->  1 - cos
    return out.mul_(g_aux.unsqueeze(0)).add_(1.0)


def distances_finite(prepared: tuple[torch.Tensor, ...], metric: str) -> bool:
    """Whether every distance of these prepared features is finite (so no row can hold NaN).

    Euclidean: ``|q.g| <= (|q|^2 + |g|^2) / 2``, so finite squared norms whose sum is finite bound
    every term of the GEMM. Cosine: unit-norm finite queries and finite non-zero ``-1/|g|``.
    """
    q, g, q_aux, g_aux = prepared
    if metric == "euclidean":
        return bool(torch.isfinite(q_aux.max() + g_aux.max())) if len(q_aux) else True
    return bool(torch.isfinite(q).all()) and bool((torch.isfinite(g_aux) & (g_aux != 0)).all())


def check_chunk_size(chunk_size: Any) -> int:
    """``chunk_size`` as an int, or a ``ValueError`` unless it is a positive int."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk_size)


def distance_blocks(prepared: tuple[torch.Tensor, ...], metric: str, chunk_size: int, reuse: bool = False
                    ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, block)`` over query blocks; with ``reuse`` every block is written into the same
    buffer (so a block is only valid until the next one is requested)."""
    chunk_size = check_chunk_size(chunk_size)
    q, g, q_aux, g_aux = prepared
    buf = q.new_empty((min(chunk_size, q.shape[0]), g.shape[0])) if reuse else None
    for start in range(0, q.shape[0], chunk_size):
        stop = min(start + chunk_size, q.shape[0])
        q_aux_blk = q_aux[start:stop] if q_aux.numel() else q_aux
        with torch.no_grad():  # not around the yield: grad mode is thread-global
            out = buf[: stop - start] if buf is not None else None
            block = distance_block(q[start:stop], q_aux_blk, g, g_aux, metric, out=out)
        yield start, block


def iter_distance_chunks(qf: Any, gf: Any, metric: str = "euclidean",
                         chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_query_index, distances [B, num_gallery])`` blocks of the query-gallery
    distance matrix, float32, on the features' device. Memory: one block at a time (each block is
    a new tensor the caller may keep)."""
    return distance_blocks(prepare_features(qf, gf, metric), metric, chunk_size)


def pairwise_distance(qf: Any, gf: Any, metric: str = "euclidean",
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Full query-gallery distance matrix [num_query, num_gallery], float32.

    ``metric="euclidean"`` is the SQUARED euclidean distance (as torchreid; same ranking),
    ``"cosine"`` is ``1 - cosine similarity``. Computed in query blocks of ``chunk_size`` rows
    written straight into the result (no concatenation copy), exactly as ``evaluate_features``
    does, so the two agree bit for bit at equal ``chunk_size``.
    """
    chunk_size = check_chunk_size(chunk_size)
    q, g, q_aux, g_aux = prepare_features(qf, gf, metric)
    out = q.new_empty((q.shape[0], g.shape[0]))
    with torch.no_grad():
        for start in range(0, q.shape[0], chunk_size):
            stop = min(start + chunk_size, q.shape[0])
            q_aux_blk = q_aux[start:stop] if q_aux.numel() else q_aux
            distance_block(q[start:stop], q_aux_blk, g, g_aux, metric, out=out[start:stop])
    return out


compute_distmat = pairwise_distance
"""Alias of :func:`pairwise_distance`."""


# --------------------------------------------------------------------------------------------
# threads and ragged indices


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily run torch CPU ops on ``n`` threads."""
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)


def ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), as int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    offsets = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)
    return offsets + np.arange(total, dtype=np.int64)
