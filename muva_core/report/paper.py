"""The paper's published numbers (arXiv 2603.14012), for side-by-side tables.

Values are (mAP, Rank-1) in percent, copied from Tables 1-3 (MUVA rows) and the ablation
Tables 5-12 (protocols MA->MS and MS->MA), and the cost Table 13.
"""
from __future__ import annotations

MAIN_RESULTS: dict[str, tuple[float, float]] = {
    # Table 1: single-source
    "MA2D": (52.0, 72.1), "MA2MS": (27.6, 56.8), "D2MA": (51.4, 78.3), "D2MS": (26.8, 55.7),
    "MS2MA": (59.5, 82.7), "MS2D": (62.0, 77.8),
    # Table 2: single-source with CUHK03-NP (detected)
    "MA2C3": (38.8, 40.8), "D2C3": (29.4, 31.1), "MS2C3": (40.2, 42.0), "C32MA": (45.1, 70.2),
    "C32D": (45.6, 66.7), "C32MS": (21.0, 49.8),
    # Table 3: multi-source leave-one-out
    "D+MS+C3->MA": (66.7, 86.1), "MA+MS+C3->D": (63.8, 79.4), "MA+D+C3->MS": (34.5, 63.1),
    "MA+D+MS->C3": (48.6, 49.6),
}
"""MUVA's mAP / Rank-1 per protocol (Tables 1-3)."""

# Ablations: variant -> {protocol: (mAP, Rank-1)}; protocol keys MA2MS and MS2MA.
ABLATIONS: dict[int, dict[str, dict[str, tuple[float, float]]]] = {
    5: {
        "G": {"MA2MS": (26.0, 54.7), "MS2MA": (51.9, 77.4)},
        "G+H": {"MA2MS": (25.0, 53.7), "MS2MA": (53.4, 78.6)},
        "G+U": {"MA2MS": (26.4, 55.8), "MS2MA": (52.9, 78.8)},
        "G+L": {"MA2MS": (27.3, 56.2), "MS2MA": (56.7, 81.6)},
        "G+H+U": {"MA2MS": (26.9, 56.1), "MS2MA": (55.5, 79.9)},
        "G+H+L": {"MA2MS": (27.0, 56.0), "MS2MA": (56.8, 81.1)},
        "G+U+L": {"MA2MS": (27.2, 56.0), "MS2MA": (57.1, 81.1)},
        "G+H+U+L": {"MA2MS": (27.6, 56.8), "MS2MA": (59.5, 82.7)},
    },
    6: {
        "vision-only, single-grained": {"MA2MS": (25.2, 53.8), "MS2MA": (52.6, 77.1)},
        "vision-language, single-grained": {"MA2MS": (26.0, 54.7), "MS2MA": (51.9, 77.4)},
        "vision-only, multi-grained": {"MA2MS": (26.7, 55.2), "MS2MA": (56.8, 80.8)},
        "vision-language, multi-grained": {"MA2MS": (27.6, 56.8), "MS2MA": (59.5, 82.7)},
    },
    7: {
        "PAP": {"MA2MS": (27.7, 56.7), "MS2MA": (58.5, 82.2)},
        "DSP": {"MA2MS": (27.4, 56.4), "MS2MA": (58.5, 82.0)},
        "original": {"MA2MS": (27.6, 56.8), "MS2MA": (59.5, 82.7)},
    },
    8: {
        "stripe-like": {"MA2MS": (25.8, 54.3), "MS2MA": (55.5, 80.1)},
        "AM-MSA": {"MA2MS": (27.6, 56.8), "MS2MA": (59.5, 82.7)},
    },
    9: {
        "w/o calibration": {"MA2MS": (27.3, 56.1), "MS2MA": (57.7, 81.7)},
        "w/ calibration": {"MA2MS": (27.6, 56.8), "MS2MA": (59.5, 82.7)},
    },
    10: {
        "RMP w/o LN+RC": {"MA2MS": (26.9, 55.6), "MS2MA": (58.4, 82.2)},
        "RMP w/ LN": {"MA2MS": (27.4, 56.1), "MS2MA": (58.7, 82.8)},
        "RMP w/ RC": {"MA2MS": (27.4, 56.6), "MS2MA": (59.2, 82.6)},
        "RMP w/ LN+RC": {"MA2MS": (27.6, 56.8), "MS2MA": (59.5, 82.7)},
    },
    11: {
        "w/ RCRE": {"MA2MS": (25.9, 55.1), "MS2MA": (57.4, 81.7)},
        "w/o RCRE": {"MA2MS": (27.6, 56.8), "MS2MA": (59.5, 82.7)},
    },
    12: {
        "1 head": {"MA2MS": (27.4, 56.1), "MS2MA": (58.2, 81.7)},
        "2 heads": {"MA2MS": (27.6, 56.8), "MS2MA": (58.5, 82.2)},
        "4 heads": {"MA2MS": (27.4, 55.9), "MS2MA": (58.7, 82.4)},
        "8 heads": {"MA2MS": (27.2, 56.0), "MS2MA": (59.5, 82.7)},
        "16 heads": {"MA2MS": (26.9, 55.7), "MS2MA": (59.2, 82.7)},
    },
}

COST_TABLE13 = {
    "MUVA (w/o AM-MSA)": {"params_train_M": 126.2, "params_infer_M": 86.1, "latency_s1_ms": 58.9,
                          "latency_s2_ms": 152.1, "latency_infer_ms": 22.1, "memory_s1_GB": 2.1,
                          "memory_s2_GB": 4.6, "memory_infer_GB": 0.7},
    "MUVA": {"latency_s2_ms": 247.2, "latency_infer_ms": 69.4, "memory_s2_GB": 6.9, "memory_infer_GB": 0.9},
}
"""Table 13 (RTX A6000, batch 64; the VGE at batch 1); only the figures quoted in the notes for MUVA itself."""


def paper_result(protocol: str) -> tuple[float, float] | None:
    """MUVA's published (mAP, Rank-1) for a protocol name (``MA2MS``, ``D+MS+C3->MA``), or None."""
    return MAIN_RESULTS.get(protocol)
