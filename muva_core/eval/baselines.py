"""Training-free baseline features: colour histograms, global and per horizontal stripe.

They give every protocol a reference point that needs no model: the global histogram shows
how much colour alone identifies a person (and how badly it transfers across camera
styles); the stripe histogram is the crudest part-based feature, a stand-in for MUVA's
head / upper-body / legs split.
"""
from __future__ import annotations

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
