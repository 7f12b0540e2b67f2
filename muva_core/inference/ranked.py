"""Ranked lists of a query / gallery split under the evaluation protocol: what Re-ID users look at first.

:class:`RankedLists` holds the features of a split (and the predicted part masks, when the model has
them), each query's AP and first-match rank (:func:`muva_core.eval.per_query_metrics`, the numbers whose
mean is the run's mAP), and gives one query's top K (:meth:`RankedLists.top`), the true matches it missed
(:meth:`RankedLists.missed`), and the best, median and worst queries by AP (:meth:`RankedLists.pick`).

A query's list follows the protocol it is scored by: gallery images of its own identity seen by its own
camera are left out (they are neither matches nor errors), so the green (same identity) and red (other
identity) frames of a list are exactly what its AP counts. Ties are ordered by gallery index, as in the
metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..data.samples import Sample
from ..viz.ranked import QUERY_SORTS

__all__ = ["PICKS", "RankedLists", "ranked_lists_of_model", "top_k"]

PICKS: tuple[str, ...] = ("best", "median", "worst")
"""The queries notebook 06 shows, by AP among the valid queries (ties: the first query)."""


def top_k(qf, gf, k: int, metric: str = "euclidean", chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """``(indices [Q, k'], distances [Q, k'])`` of each query's ``k' = min(k, G)`` nearest gallery items, nearest
    first, ties by gallery index (the metrics' rule), computed ``chunk_size`` queries at a time."""
    from ..eval.distance import iter_distance_chunks

    k = max(0, min(int(k), len(gf)))
    idx, dist = [np.zeros((0, k), np.int64)], [np.zeros((0, k), np.float32)]
    for _, block in iter_distance_chunks(qf, gf, metric, chunk_size=chunk_size):
        d = block.cpu().numpy()
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        idx.append(order)
        dist.append(np.take_along_axis(d, order, 1).astype(np.float32))
    return np.concatenate(idx), np.concatenate(dist)


@dataclass
class RankedLists:
    """Ranked lists of ``query`` against ``gallery``.

    qf, gf:        features ``[Q, D]``, ``[G, D]`` (float32 tensors, as the evaluation ranks them)
    metric:        the distance (``euclidean`` | ``cosine``)
    query_masks, gallery_masks: predicted part-mask probabilities ``[N, P, Npatch]`` or None
    parts, grid:   the mask channels and the patch grid
    """

    query: list[Sample]
    gallery: list[Sample]
    qf: torch.Tensor
    gf: torch.Tensor
    metric: str = "euclidean"
    query_masks: np.ndarray | None = None
    gallery_masks: np.ndarray | None = None
    parts: tuple[str, ...] = ()
    grid: tuple[int, int] = (16, 8)

    def __post_init__(self) -> None:
        from ..eval.metrics import per_query_metrics
        from ..eval.features import sample_arrays

        (qp, qc), (gp, gc) = sample_arrays(self.query), sample_arrays(self.gallery)
        self._g_pids, self._g_cams = gp, gc
        per = per_query_metrics(self.qf, self.gf, qp, gp, qc, gc, metric=self.metric)
        self.scores = pd.DataFrame({"query": range(len(self.query)), "image": [s.relpath for s in self.query],
                                    "pid": qp, "camid": qc, "AP": per["ap"],
                                    "first_match": per["first_match"] + 1, "matches": per["num_positives"]})
        self.scores.loc[per["first_match"] < 0, "first_match"] = 0
        """One row per query: its AP (NaN: no match in the gallery, not scored), the rank of its first match
        (1-based; 0: none), its number of true matches."""

    # ------------------------------------------------------------------ one query
    def _row(self, q: int) -> tuple[np.ndarray, np.ndarray]:
        """The query's gallery order (protocol: same identity + same camera left out) and distances."""
        from ..eval.distance import pairwise_distance

        if not 0 <= int(q) < len(self.query):
            raise IndexError(f"query {q} out of range ({len(self.query)} queries)")
        d = pairwise_distance(self.qf[int(q):int(q) + 1], self.gf, self.metric).cpu().numpy()[0]
        s = self.query[int(q)]
        keep = np.flatnonzero(~((self._g_pids == s.pid) & (self._g_cams == s.camid)))
        order = keep[np.argsort(d[keep], kind="stable")]
        return order, d[order]

    def top(self, q: int, k: int = 10) -> pd.DataFrame:
        """The query's ``k`` nearest gallery images: ``rank`` (1-based), ``gallery`` (index), ``image``, ``pid``,
        ``camid``, ``distance``, ``match`` (same identity)."""
        order, dist = self._row(q)
        order, dist = order[:k], dist[:k]
        pid = self.query[int(q)].pid
        return pd.DataFrame({"rank": np.arange(1, len(order) + 1), "gallery": order,
                             "image": [self.gallery[i].relpath for i in order], "pid": self._g_pids[order],
                             "camid": self._g_cams[order], "distance": dist, "match": self._g_pids[order] == pid})

    def missed(self, q: int, k: int = 10) -> pd.DataFrame:
        """The query's true matches that are not in its top ``k``, with their rank and distance (columns as
        :meth:`top`)."""
        order, dist = self._row(q)
        pid = self.query[int(q)].pid
        ranks = np.flatnonzero(self._g_pids[order] == pid)
        ranks = ranks[ranks >= k]
        g = order[ranks]
        return pd.DataFrame({"rank": ranks + 1, "gallery": g, "image": [self.gallery[i].relpath for i in g],
                             "pid": self._g_pids[g], "camid": self._g_cams[g], "distance": dist[ranks],
                             "match": True})

    def pick(self) -> dict[str, int]:
        """``{"best": q, "median": q, "worst": q}`` by AP among the scored queries (the median: the middle of the
        queries sorted by AP; ties by query index)."""
        valid = self.scores.dropna(subset=["AP"]).sort_values(["AP", "query"], ascending=[False, True], kind="stable")
        if valid.empty:
            raise ValueError("no query has a true match in the gallery: there is no AP to rank queries by")
        q = valid["query"].to_numpy()
        return {"best": int(q[0]), "median": int(q[(len(q) - 1) // 2]), "worst": int(q[-1])}

    def query_order(self, sort: str = "AP, worst first", camera: int | None = None) -> list[int]:
        """Query indices sorted (``AP, worst first`` | ``AP, best first`` | ``file name``), optionally only those of
        one camera; queries without a match (no AP) come last."""
        rows = self.scores if camera is None else self.scores[self.scores["camid"] == camera]
        if sort == "file name":
            return rows.sort_values(["image", "query"], kind="stable")["query"].tolist()
        ascending = sort == "AP, worst first"
        if sort not in QUERY_SORTS:
            raise ValueError(f"sort must be one of {QUERY_SORTS}, got {sort!r}")
        return rows.sort_values(["AP", "query"], ascending=[ascending, True], na_position="last",
                                kind="stable")["query"].tolist()

    def masks_of(self, which: str, index: int) -> np.ndarray | None:
        """The predicted part masks ``[P, Npatch]`` of query or gallery image ``index`` (None without masks)."""
        masks = self.query_masks if which == "query" else self.gallery_masks
        return None if masks is None else np.asarray(masks[int(index)])

    def label(self, q: int) -> str:
        """``AP 0.42 · first match #3`` (or ``no true match in the gallery``) of a query."""
        row = self.scores.iloc[int(q)]
        if np.isnan(row["AP"]):
            return "no true match in the gallery"
        return f"AP {row['AP']:.2f} · first match #{int(row['first_match'])}"

    def panels(self, q: int, k: int = 10, size: tuple[int, int] = (256, 128), masks: bool = False):
        """The query and its top ``k`` as :class:`~muva_core.viz.ranked.Panel` s (images at ``size``; with ``masks``,
        the predicted part masks where the model has them)."""
        from ..viz.ranked import Panel, display_image, gallery_title, query_title

        s = self.query[int(q)]
        out = [Panel(display_image(s.path, size), query_title(s.relpath.rpartition("/")[2], f"pid {s.pid}"), "query",
                     self.masks_of("query", q) if masks else None)]
        for row in self.top(q, k).itertuples():
            g = self.gallery[row.gallery]
            out.append(Panel(display_image(g.path, size), gallery_title(row.rank, row.distance,
                                                                        g.relpath.rpartition("/")[2]),
                             bool(row.match), self.masks_of("gallery", row.gallery) if masks else None))
        return out

    def figure(self, queries: dict[str, int], k: int = 8, size: tuple[int, int] = (256, 128), masks: bool = False,
               threshold: float = 0.5):
        """The ranked lists of ``queries`` (``{row label: query index}``), one row each."""
        from ..viz.ranked import plot_ranked_rows

        rows = [(label, self.panels(q, k, size, masks)) for label, q in queries.items()]
        return plot_ranked_rows(rows, parts=self.parts, grid=self.grid, threshold=threshold, note=PROTOCOL_NOTE)

    def picked_figure(self, k: int = 8, size: tuple[int, int] = (256, 128)):
        """The best, median and worst queries by AP (:meth:`pick`), each row labelled as such with its AP."""
        return self.figure({f"{name} query\n{self.label(q)}": q for name, q in self.pick().items()}, k, size)


PROTOCOL_NOTE = "same-identity images from the query's own camera are left out, as the evaluation leaves them out"




def ranked_lists_of_model(model, query: Sequence[Sample], gallery: Sequence[Sample], cfg, device,
                          progress: bool = True) -> RankedLists:
    """:class:`RankedLists` of a trained :class:`MUVAReID` (its evaluation features and, when it predicts them,
    its final part masks) on a query / gallery split."""
    from ..eval.features import extract_features

    samples = list(query) + list(gallery)
    feats, probs = extract_features(model.encoder, samples, cfg, device, return_masks=True, progress=progress,
                                    desc="ranked lists")
    nq = len(query)
    probs = probs.numpy() if probs is not None else None
    return RankedLists(list(query), list(gallery), feats[:nq], feats[nq:], metric=cfg.eval.metric,
                       query_masks=None if probs is None else probs[:nq],
                       gallery_masks=None if probs is None else probs[nq:],
                       parts=tuple(getattr(model, "parts", ()) or ()), grid=tuple(model.encoder.grid))
