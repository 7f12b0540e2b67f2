"""Run-level orchestration shared by the CLI and the notebooks."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from .config import RunConfig
from .io import write_json

BASELINE_FEATURES = {"hist-global": 1, "hist-3stripes": 3}
"""Colour-histogram baselines: name -> number of horizontal stripes."""


def ensure_synthetic(cfg: RunConfig, progress: bool = True) -> Path:
    """Generate the synthetic set at ``cfg.data.synth_root`` unless the same one is there already."""
    from .data.synthetic import generate_synthetic

    return generate_synthetic(cfg.data.synth_root, seed=cfg.data.synth_seed, scale=cfg.data.synth_scale, progress=progress)


def protocol_roots(cfg: RunConfig) -> dict[str, str]:
    """Dataset roots for ``build_protocol_data``: the synthetic root, and ``data_root`` for every real dataset."""
    return {"synth": cfg.data.synth_root, "*": cfg.data.data_root}


def load_protocol(cfg: RunConfig, progress: bool = True):
    """The protocol's data (:class:`~muva_core.data.protocols.ProtocolData`); generates the synthetic set if needed."""
    from .data.protocols import build_protocol_data, get_protocol

    proto = get_protocol(cfg.data.protocol)
    if proto.synthetic:
        ensure_synthetic(cfg, progress=progress)
    return build_protocol_data(proto.name, protocol_roots(cfg))


def source_datasets(data) -> list:
    """The parsed source datasets of a protocol (whose train splits get part pseudo-labels)."""
    return [data.datasets[name] for name in data.sources]


def evaluate_baselines(query, gallery, cfg: RunConfig, progress: bool = True) -> dict[str, dict[str, float]]:
    """mAP / CMC / mINP of each colour-histogram baseline on one query/gallery split."""
    import numpy as np

    from .baselines import extract_histograms
    from .eval import evaluate_features

    results = {}
    for name, stripes in BASELINE_FEATURES.items():
        qf = extract_histograms(query, stripes=stripes, progress=progress, desc=f"{name} query")
        gf = extract_histograms(gallery, stripes=stripes, progress=progress, desc=f"{name} gallery")
        m = evaluate_features(
            qf, gf,
            np.array([s.pid for s in query]), np.array([s.pid for s in gallery]),
            np.array([s.camid for s in query]), np.array([s.camid for s in gallery]),
            metric=cfg.eval.metric, max_rank=cfg.eval.max_rank,
        )
        results[name] = m.as_dict()
    return results


def chance_level(query, gallery, cfg: RunConfig, draws: int = 20, dim: int = 64, seed: int = 0) -> dict[str, float]:
    """mAP / CMC / mINP of random features (Gaussian, ``dim``-d), averaged over ``draws`` seeded draws: what
    a model that learned nothing scores on this query/gallery split."""
    import numpy as np

    from .eval import evaluate_features

    rng = np.random.default_rng(seed)
    qp, gp = np.array([s.pid for s in query]), np.array([s.pid for s in gallery])
    qc, gc = np.array([s.camid for s in query]), np.array([s.camid for s in gallery])
    runs = []
    for _ in range(draws):
        qf = rng.standard_normal((len(query), dim)).astype(np.float32)
        gf = rng.standard_normal((len(gallery), dim)).astype(np.float32)
        runs.append(evaluate_features(qf, gf, qp, gp, qc, gc, metric=cfg.eval.metric, max_rank=cfg.eval.max_rank).as_dict())
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {k: float(np.mean([r[k] for r in runs])) for k in keys}


def run_baseline(cfg: RunConfig, progress: bool = True) -> dict:
    """Colour-histogram baselines on the target domain of ``cfg.data.protocol``; writes metrics.json."""
    from .data.protocols import protocol_slug

    data = load_protocol(cfg, progress=progress)
    proto = data.protocol
    t0 = time.perf_counter()
    metrics = evaluate_baselines(data.query, data.gallery, cfg, progress=progress)
    out = Path(cfg.reports_dir) / protocol_slug(proto.name) / "baseline"
    record = {"protocol": proto.name, "metrics": metrics, "seconds": round(time.perf_counter() - t0, 2),
              "config": cfg.to_flat()}
    write_json(out / "metrics.json", record)
    print(format_table(pd.DataFrame(metrics).T, f"{proto.name}: colour-histogram baselines on the target domain"))
    print(f"wrote {out / 'metrics.json'}")
    return record


def format_table(frame: pd.DataFrame, title: str) -> str:
    return f"\n{title}\n" + frame.round(2).to_string() + "\n"
