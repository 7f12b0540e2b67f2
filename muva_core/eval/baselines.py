"""Training-free baseline features: colour histograms, global and per horizontal stripe, and the CLIP a run starts from.

They give every protocol a reference point that needs no Re-ID training: the global histogram shows
how much colour alone identifies a person (and how badly it transfers across camera
styles); the stripe histogram is the crudest part-based feature, a stand-in for MUVA's
head / upper-body / legs split; the start CLIP's image embedding (``clip-start``) is what the pretrained
weights know before any Re-ID training (the zero-shot CLIP row of CLIP-ReID), so a trained model's gain over it
is what Re-ID training added. Beside them, the chance level: what random features score on the same split.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data.samples import Sample


def colour_histogram(image: Image.Image, bins: int = 8, stripes: int = 1, size=(256, 128)) -> np.ndarray:
    """HSV histogram (bins per channel, concatenated) of each of ``stripes`` horizontal bands.

    Each band's histogram is L1-normalised, then the concatenation is L2-normalised.
    """
    hsv = np.asarray(image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR).convert("HSV"))
    q = (hsv.astype(np.int32) * bins) // 256  # [H, W, 3] in 0..bins-1
    feats = []
    for band in np.array_split(q, stripes, axis=0):
        flat = band.reshape(-1, 3)
        hist = [np.bincount(flat[:, c], minlength=bins) for c in range(3)]
        h = np.concatenate(hist).astype(np.float32)
        feats.append(h / max(h.sum(), 1.0))
    f = np.concatenate(feats)
    return f / max(np.linalg.norm(f), 1e-12)


def extract_histograms(
    samples: Sequence[Sample], bins: int = 8, stripes: int = 1, progress: bool = True, desc: str = "histograms"
) -> np.ndarray:
    """Histogram features for every sample, ``[N, 3 * bins * stripes]`` float32."""
    from ..data.datasets import read_image

    out = [
        colour_histogram(read_image(s.path), bins=bins, stripes=stripes)
        for s in tqdm(samples, desc=desc, disable=not progress, leave=False)
    ]
    return np.stack(out) if out else np.zeros((0, 3 * bins * stripes), np.float32)


BASELINE_FEATURES = {"hist-global": 1, "hist-3stripes": 3}
"""Colour-histogram baselines: name -> number of horizontal stripes."""


def _ranked(qf, gf, query, gallery, cfg) -> dict[str, float]:
    """mAP / CMC / mINP of query features ``qf`` against gallery features ``gf`` (the run's metric and max rank)."""
    from .features import sample_arrays
    from .metrics import evaluate_features

    (qp, qc), (gp, gc) = sample_arrays(query), sample_arrays(gallery)
    return evaluate_features(qf, gf, qp, gp, qc, gc, metric=cfg.eval.metric, max_rank=cfg.eval.max_rank).as_dict()


def evaluate_baselines(query, gallery, cfg, progress: bool = True) -> dict[str, dict[str, float]]:
    """mAP / CMC / mINP of each colour-histogram baseline on one query/gallery split."""
    results = {}
    for name, stripes in BASELINE_FEATURES.items():
        qf = extract_histograms(query, stripes=stripes, progress=progress, desc=f"{name} query")
        gf = extract_histograms(gallery, stripes=stripes, progress=progress, desc=f"{name} gallery")
        results[name] = _ranked(qf, gf, query, gallery, cfg)
    return results


def clip_image_features(visual, samples: Sequence[Sample], cfg, device, progress: bool = True,
                        desc: str = "CLIP features") -> np.ndarray:
    """The image embedding of a CLIP image tower (``visual``: pooled, projected) for every sample, L2-normalised,
    ``[N, E]`` float32; the run's test transform."""
    import torch

    from .features import test_loader

    visual.eval()
    out = []
    with torch.no_grad():
        for batch in tqdm(test_loader(samples, cfg), desc=desc, disable=not progress, leave=False):
            out.append(torch.nn.functional.normalize(visual(batch["image"].to(device)).float(), dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def evaluate_clip_start(query, gallery, cfg, progress: bool = True) -> dict[str, float] | None:
    """mAP / CMC / mINP of the image embedding of the CLIP ``cfg``'s runs start from (no Re-ID training); None when
    that CLIP is the one ``muva pretrain-clip`` makes and it is not made yet."""
    from ..model.checkpoints import config_clip_path, uses_pretrain_clip
    from ..model.factory import start_clip
    from .features import resolve_device

    if uses_pretrain_clip(cfg) and not config_clip_path(cfg).is_file():
        return None
    device = resolve_device(cfg.device)
    clip, _ = start_clip(cfg)
    visual = clip.visual.to(device)
    qf = clip_image_features(visual, query, cfg, device, progress, "clip-start query")
    gf = clip_image_features(visual, gallery, cfg, device, progress, "clip-start gallery")
    return _ranked(qf, gf, query, gallery, cfg)


def chance_level(query, gallery, cfg, draws: int = 20, dim: int = 64, seed: int = 0) -> dict[str, float]:
    """mAP / CMC / mINP of random features (Gaussian, ``dim``-d), averaged over ``draws`` seeded draws: what
    a model that learned nothing scores on this query/gallery split."""
    import numpy as np

    from .features import sample_arrays
    from .metrics import evaluate_features

    rng = np.random.default_rng(seed)
    (qp, qc), (gp, gc) = sample_arrays(query), sample_arrays(gallery)
    runs = []
    for _ in range(draws):
        qf = rng.standard_normal((len(query), dim)).astype(np.float32)
        gf = rng.standard_normal((len(gallery), dim)).astype(np.float32)
        runs.append(evaluate_features(qf, gf, qp, gp, qc, gc, metric=cfg.eval.metric, max_rank=cfg.eval.max_rank).as_dict())
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {k: float(np.mean([r[k] for r in runs])) for k in keys}


def run_baseline(cfg, progress: bool = True) -> dict:
    """The training-free baselines on the target domain of ``cfg.data.protocol``: colour histograms and the start
    CLIP's image features (``clip-start``, :func:`evaluate_clip_start`; ``clip_start`` says which CLIP, or why
    there is no row); writes ``<reports_dir>/<protocol>/baseline/metrics.json`` and returns its record."""
    from ..model.checkpoints import clip_start
    from ..data.protocols import load_protocol, protocol_slug
    from ..io import write_json
    from ..paths import RunFiles, resolve

    data = load_protocol(cfg, progress=progress)
    proto = data.protocol
    t0 = time.perf_counter()
    metrics = evaluate_baselines(data.query, data.gallery, cfg, progress=progress)
    clip = evaluate_clip_start(data.query, data.gallery, cfg, progress=progress)
    start = clip_start(cfg)
    if clip is None:
        start += " (not made yet: no clip-start row; `muva pretrain-clip` or the first `muva run` makes it)"
    else:
        metrics["clip-start"] = clip
    out = resolve(cfg.reports_dir) / protocol_slug(proto.name) / "baseline"
    record = {"protocol": proto.name, "metrics": metrics, "clip_start": start,
              "seconds": round(time.perf_counter() - t0, 2), "config": cfg.to_flat()}
    write_json(RunFiles(out).summary, record)
    return {**record, "folder": str(out)}
