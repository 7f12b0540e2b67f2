"""The pretraining data: decoded images of the pretraining domains with their part boxes and attributes
(:class:`PretrainImages`), CLIP normalisation, part masking, and the training batch (flips, captions, the part
masked in, the patch tokens to keep)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.captions import caption_facts, facts_true_of, hard_negative_caption
from ..data.samples import PARTS, DatasetError
from .config import PretrainConfig

__all__ = ["PretrainImages", "load_pretrain_images", "normalise_images", "masked_part_images", "Batch",
           "make_batch"]


@dataclass
class PretrainImages:
    """Decoded images of one split of the pretraining set, with their identities' attributes.

    images: ``[N, 3, H, W]`` uint8; boxes: ``[N, 3, 5]`` float (x0, y0, x1, y1, visible) of
    head, upper, legs in pixels; attrs[i]: the identity attribute dict of image i.
    """

    images: torch.Tensor
    boxes: np.ndarray
    attrs: list[dict]
    pids: np.ndarray
    domains: list[str]
    relpaths: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Sequence[int]) -> "PretrainImages":
        idx = [int(i) for i in index]
        return PretrainImages(self.images[idx], self.boxes[idx], [self.attrs[i] for i in idx], self.pids[idx],
                              [self.domains[i] for i in idx], [self.relpaths[i] for i in idx])

    def resized(self, size: Sequence[int], chunk: int = 256) -> "PretrainImages":
        """The images resized to ``size`` = (H, W) (bilinear, antialiased), boxes scaled with them; ``chunk`` images
        at a time, so that only that many are ever held as floats (the whole wide set as floats would be ~7 GB)."""
        h, w = (int(v) for v in size)
        H, W = self.images.shape[-2:]
        if (h, w) == (H, W):
            return self
        out = torch.empty((len(self), self.images.shape[1], h, w), dtype=torch.uint8)
        for s in range(0, len(self), chunk):
            x = torch.nn.functional.interpolate(self.images[s:s + chunk].float(), size=(h, w), mode="bilinear",
                                                antialias=True, align_corners=False)
            out[s:s + chunk] = x.round().clamp(0, 255).to(torch.uint8)
        boxes = self.boxes.copy()
        boxes[..., [0, 2]] *= w / W
        boxes[..., [1, 3]] *= h / H
        return PretrainImages(out, boxes, self.attrs, self.pids, self.domains, self.relpaths)


def load_pretrain_images(root: str | os.PathLike, split: str = "train", domains: Sequence[str] | None = None,
                         limit: int | None = None, seed: int = 0, progress: bool = False) -> PretrainImages:
    """Read the ``train`` split (training identities) or the ``test`` split (query + gallery images of
    the held-out identities; distractors and junk left out) of generated pretraining domains.

    limit: keep a seeded random subset of this many images (sorted back into file order).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from ..data.synthetic import PRETRAIN_DOMAINS, SPLIT_DIRS, load_attributes, load_part_boxes

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    dirs = (SPLIT_DIRS["train"],) if split == "train" else (SPLIT_DIRS["query"], SPLIT_DIRS["gallery"])
    rows: list[tuple[str, str, int, dict, np.ndarray]] = []
    for d in domains or PRETRAIN_DOMAINS:
        droot = root / f"synth_{d}"
        idents = load_attributes(droot)["identities"]
        boxes = load_part_boxes(droot)
        boxes = boxes[boxes["relpath"].str.split("/").str[0].isin(dirs) & boxes["part"].isin(PARTS)]
        wide = boxes.pivot(index="relpath", columns="part", values=["x0", "y0", "x1", "y1", "visible"])
        wide = wide.reindex(columns=[(c, p) for p in PARTS for c in ("x0", "y0", "x1", "y1", "visible")])
        if wide.isna().any().any():
            raise DatasetError(f"{droot / 'part_boxes.parquet'}: images without a box for every part {PARTS}")
        values = wide.to_numpy(np.float32).reshape(len(wide), len(PARTS), 5)
        for rel, b in zip(wide.index.tolist(), values):
            pid = int(Path(rel).name.split("_")[0])
            if pid <= 0:
                continue
            ident = idents.get(f"{pid:04d}")
            if ident is None:
                raise DatasetError(f"{droot / 'attributes.json'}: no identity {pid:04d} for image {rel}")
            rows.append((d, rel, pid, ident["attrs"], b))
    if not rows:
        raise DatasetError(f"{root}: no {split} images in the pretraining domains {list(domains or PRETRAIN_DOMAINS)}")
    if limit is not None and 0 < limit < len(rows):
        keep = np.sort(np.random.default_rng(seed).permutation(len(rows))[:limit])
        rows = [rows[i] for i in keep]
    images: np.ndarray | None = None
    for k, (d, rel, *_) in enumerate(tqdm(rows, desc=f"pretrain images ({split})", disable=not progress)):
        path = root / f"synth_{d}" / rel
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from exc
        if images is None:
            images = np.empty((len(rows), *arr.shape), np.uint8)
        if arr.shape != images.shape[1:]:
            raise DatasetError(f"{path}: image of shape {arr.shape}, expected {images.shape[1:]}")
        images[k] = arr
    assert images is not None
    return PretrainImages(images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                          boxes=np.stack([r[4] for r in rows]),
                          attrs=[r[3] for r in rows], pids=np.asarray([r[2] for r in rows], np.int64),
                          domains=[r[0] for r in rows], relpaths=[r[1] for r in rows])


def normalise_images(images: torch.Tensor, jitter: torch.Generator | None = None,
                     ranges: str = "reid") -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> CLIP-normalised floats; with ``jitter``, each image photometrically jittered first
    with the named ``ranges`` (:data:`muva_core.data.transforms.JITTER_RANGES`)."""
    from ..data.transforms import CLIP_MEAN, CLIP_STD, JITTER_RANGES, photometric_jitter

    x = images.float().div_(255.0)
    if jitter is not None:
        x = torch.stack([photometric_jitter(im, jitter, ranges=JITTER_RANGES[ranges]) for im in x])
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _part_mask(box: np.ndarray, h: int, w: int, pad: int) -> torch.Tensor:
    m = torch.zeros(h, w)
    x0, y0 = max(0, int(math.floor(box[0])) - pad), max(0, int(math.floor(box[1])) - pad)
    x1, y1 = min(w, int(math.ceil(box[2])) + pad), min(h, int(math.ceil(box[3])) + pad)
    m[y0:y1, x0:x1] = 1.0
    return m


def masked_part_images(data: PretrainImages, index: Sequence[int], part: str, pad: int = 4) -> torch.Tensor:
    """Normalised images with everything outside ``part``'s box (padded) set to 0 (the mean colour)."""
    j = PARTS.index(part)
    x = normalise_images(data.images[list(index)])
    h, w = x.shape[-2:]
    masks = torch.stack([_part_mask(data.boxes[i, j], h, w, pad) for i in index])
    return x * masks[:, None]


@dataclass
class Batch:
    """One training batch: normalised images ``[B, 3, H, W]``, a caption per image, its granularity,
    and the patch tokens to keep per image ``[B, K]`` (None = all)."""

    images: torch.Tensor
    texts: list[str]
    granularities: list[str]
    keep: torch.Tensor | None
    positives: torch.Tensor | None = None   # [B, B] bool: caption j is true of image i (``loss: multi_positive``)
    negatives: list[str] | None = None      # hard negative captions (``hard_negatives``): never true of their image


def _token_priority(box: np.ndarray, grid: tuple[int, int], patch: int, pad: int) -> np.ndarray:
    """1 for the patches whose centre lies in ``box`` (padded), else 0; row-major ``[gh * gw]``."""
    gh, gw = grid
    cy = (np.arange(gh) + 0.5) * patch
    cx = (np.arange(gw) + 0.5) * patch
    iny = (cy >= box[1] - pad) & (cy <= box[3] + pad)
    inx = (cx >= box[0] - pad) & (cx <= box[2] + pad)
    return (iny[:, None] & inx[None, :]).reshape(-1).astype(np.float64)


def make_batch(data: PretrainImages, index: Sequence[int], rng: np.random.Generator,
               cfg: PretrainConfig, patch: int = 16) -> Batch:
    """The batch of images ``index``: flips, captions, part masking and the tokens to keep.

    Per image: flip with probability 0.5; a global caption with probability ``cfg.p_global``,
    else a part caption of a random visible part (that part masked in, the rest zeroed); with
    ``cfg.batch_granularity == "one"`` the batch draws the granularity once and every image takes it (global
    where that part is not visible).
    With ``cfg.keep_tokens`` > 0: ``keep_tokens`` random patches, those on the captioned part first.
    With ``cfg.hard_negatives`` = n > 0: up to n hard negative captions per image
    (:func:`~muva_core.data.captions.hard_negative_caption`) in ``negatives``.
    """
    index = [int(i) for i in index]
    jitter = torch.Generator().manual_seed(int(rng.integers(2**31))) if cfg.color_jitter else None
    x = normalise_images(data.images[index], jitter, cfg.jitter_ranges)
    h, w = x.shape[-2:]
    grid = (h // patch, w // patch)
    n_tok = grid[0] * grid[1]
    k = int(cfg.keep_tokens)
    keep = [] if 0 < k < n_tok else None
    texts, grans, facts, negatives = [], [], [], []
    one = None   # batch_granularity "one": the batch's granularity
    if cfg.batch_granularity == "one":
        one = "global" if rng.random() < cfg.p_global else PARTS[int(rng.integers(len(PARTS)))]
    for b, i in enumerate(index):
        boxes = data.boxes[i].copy()
        if rng.random() < 0.5:
            x[b] = x[b].flip(-1)
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        g = "global"
        if one is not None:
            if one != "global" and boxes[PARTS.index(one), 4] >= cfg.min_part_visible:
                g = one
        elif rng.random() >= cfg.p_global:
            visible = [p for j, p in enumerate(PARTS) if boxes[j, 4] >= cfg.min_part_visible]
            if visible:
                g = visible[int(rng.integers(len(visible)))]
        if g != "global":
            x[b] *= _part_mask(boxes[PARTS.index(g)], h, w, cfg.part_pad)
        if cfg.hard_negatives:
            text, fact, negs = hard_negative_caption(data.attrs[i], g, rng, count=cfg.hard_negatives)
            negatives += negs
        else:
            text, fact = caption_facts(data.attrs[i], g, rng)
        texts.append(text)
        facts.append(fact)
        grans.append(g)
        if keep is not None:
            score = rng.random(n_tok)
            if g != "global":
                score += _token_priority(boxes[PARTS.index(g)], grid, patch, cfg.part_pad)
            keep.append(np.sort(np.argsort(-score, kind="stable")[:k]))
    keep_t = torch.from_numpy(np.stack(keep)).long() if keep is not None else None
    positives = None
    if cfg.loss == "multi_positive":
        attrs = [data.attrs[i] for i in index]
        positives = torch.tensor([[gi == gj and facts_true_of(fj, aj, ai) for gj, fj, aj in zip(grans, facts, attrs)]
                                  for gi, ai in zip(grans, attrs)])
    return Batch(images=x, texts=texts, granularities=grans, keep=keep_t, positives=positives,
                 negatives=negatives if cfg.hard_negatives else None)

