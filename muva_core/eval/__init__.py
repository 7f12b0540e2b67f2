"""Evaluation: Re-ID retrieval metrics (Market-1501 protocol), optionally k-reciprocal re-ranked."""
from muva_core.eval.distance import (
    DEFAULT_CHUNK_SIZE,
    METRICS,
    compute_distmat,
    iter_distance_chunks,
    pairwise_distance,
)
from muva_core.eval.metrics import (
    RERANK_METHODS,
    ReIDMetrics,
    evaluate,
    evaluate_features,
    per_query_metrics,
)
from muva_core.eval.rerank import k_reciprocal_distances

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "METRICS",
    "RERANK_METHODS",
    "ReIDMetrics",
    "compute_distmat",
    "evaluate",
    "evaluate_features",
    "iter_distance_chunks",
    "k_reciprocal_distances",
    "pairwise_distance",
    "per_query_metrics",
]
