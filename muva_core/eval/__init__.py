"""Evaluation: Re-ID retrieval metrics (Market-1501 protocol)."""
from muva_core.eval.metrics import (
    DEFAULT_CHUNK_SIZE,
    METRICS,
    ReIDMetrics,
    compute_distmat,
    evaluate,
    evaluate_features,
    iter_distance_chunks,
    pairwise_distance,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "METRICS",
    "ReIDMetrics",
    "compute_distmat",
    "evaluate",
    "evaluate_features",
    "iter_distance_chunks",
    "pairwise_distance",
]
