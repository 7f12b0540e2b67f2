"""A tiny CLIP that knows language: contrastive pretraining on captioned synthetic pedestrians.

MUVA's language branch (the multi-grained prompts, paper 3.1.1) only helps when the text
encoder carries meaning. Without real CLIP weights (no downloads here) the small named configs
start from random weights, so this module pretrains one on data no Re-ID protocol uses:

* **Data.** :func:`muva_core.data.synthetic.generate_synthetic` with the pretraining-only
  domains ``P``, ``Q``, ``R`` (:data:`~muva_core.data.synthetic.PRETRAIN_DOMAIN_STYLES`: their
  own camera styles; pids 4001 and up, disjoint from ``synth_A`` .. ``synth_D``) at scale
  ``pretrain`` (600 ids per domain, 2-4 images each, ~5.4k images), written under
  ``<data>/synthetic-pretrain`` once and reused. The train split (3/4 of the identities, ~4.3k
  images) trains; images of the other identities (never seen in training) measure zero-shot
  retrieval.
* **Pairs.** Each training image is paired with one random caption of its identity
  (:mod:`muva_core.data.captions`): a global caption with probability ``p_global`` (0.2),
  else a part caption (head / upper body / legs, one of the parts at least half visible).
  Captions are drawn afresh at every step (new phrasing and attribute subset).
  A part caption is paired with the *whole* image in which everything outside the part's
  ground-truth box (padded by ``part_pad`` pixels) is set to the mean colour (zero after
  normalisation). The part keeps its position and scale, as the part tokens that MUVA's AM-MSA
  pools do; a resized crop would change both, and the 16x8 positional grid would mean something
  else. Horizontal flips (boxes flipped too).
* **Training.** open_clip's ``ClipLoss`` (symmetric InfoNCE with the learnable logit scale,
  clamped to 100), AdamW (weight decay on matrices only), linear warm-up then cosine decay per
  step (:class:`~muva_core.train.schedulers.WarmupCosineLR`), 256x128 input, so the positional
  grid is MUVA's 16x8 and ``BackboneConfig(checkpoint_path=...)`` loads it without a resize.
  The patch embedding is trained here (MUVA freezes it later). FLIP-style token dropping: each
  training image keeps ``keep_tokens`` (32) of its 128 patch tokens (a part caption keeps the
  part's tokens first); evaluation and MUVA see every token. Three epochs for ``small``.
* **Output.** ``<out_dir>/clip-<backbone>-seed<seed>.safetensors``: the plain CLIP state dict
  (the keys of :func:`~muva_core.model.backbone.build_clip`'s model), written atomically, with
  metadata (settings, architecture, epochs, accuracies); a JSON report beside it (zero-shot
  accuracies of the random initialisation and of the pretrained model, loss curve, timings).
  A checkpoint with the same settings is reused; other settings raise unless ``overwrite``.
* **Resume.** After every epoch the model, optimiser, scheduler and losses so far go to
  ``<out_dir>/clip-<backbone>-seed<seed>.partial.safetensors`` (atomically); an interrupted run with the
  same settings continues from its last finished epoch and ends with the same weights as an
  uninterrupted one; a partial file with other settings is refused like a checkpoint (``overwrite``
  discards it). The partial file is removed once the checkpoint is written.
* **Runs that start from it.** ``pretrained: pretrain-clip`` in a run configuration (the synthetic
  configs) means this CLIP for the run's backbone and input size, with the default settings and seed 0,
  at :func:`config_clip_path` = ``<data_root>/clip/clip-<backbone>-seed0.safetensors``: the checks before
  a run (:func:`muva_core.pipeline.ensure_pretrained_clip`, called by ``preflight``) make it when it is
  missing, reuse it when its settings are the same, and refuse it when they differ.

Usage::

    path = pretrain_clip("data/clip", backbone="small", seed=0)      # a few minutes on 2 CPU cores
    # then: muva train -p pretrained=pretrain-clip  (the same file), or -p checkpoint_path=<path> -p pretrained=none
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .data.captions import ZERO_SHOT_ATTRIBUTES, caption, zero_shot_prompts
from .data.samples import PARTS, DatasetError
from .io import atomic_path, write_json

__all__ = [
    "CheckpointExistsError",
    "PRETRAIN_FORMAT",
    "CAPTIONS_VERSION",
    "DEFAULT_EPOCHS",
    "PretrainConfig",
    "PretrainImages",
    "pretrain_data_root",
    "checkpoint_file",
    "report_file",
    "load_pretrain_images",
    "Batch",
    "TokenSelect",
    "build_pretrain_clip",
    "make_optimizer",
    "make_batch",
    "contrastive_step",
    "encode_text",
    "evaluate_zero_shot_domains",
    "zero_shot_accuracy",
    "evaluate_zero_shot",
    "pretrain_clip",
    "read_pretrain_info",
    "partial_file",
    "PRETRAINED_TAG",
    "CONFIG_CLIP_SEED",
    "CONFIG_CLIP_OPTIONS",
    "config_clip_spec",
    "config_clip_path",
    "uses_pretrain_clip",
]

class CheckpointExistsError(FileExistsError, ValueError):
    """A pretrained checkpoint exists at the path with other settings (the message lists them)."""


PRETRAIN_FORMAT = "muva-clip-pretrain"
PRETRAIN_FORMAT_VERSION = 1
CAPTIONS_VERSION = "1"
"""Bumped whenever :mod:`muva_core.data.captions` changes what it writes (part of the reuse key)."""

DEFAULT_EPOCHS: dict[str, int] = {"tiny": 10, "mini": 3, "small": 3, "vit-b-16": 5}
"""Epochs over the ``pretrain`` train split (~4.3k images, ~67 steps of 64) when ``epochs`` is not given."""


@dataclass
class PretrainConfig:
    """Everything that decides the pretrained weights (the checkpoint's reuse key).

    backbone:   named CLIP config (``tiny`` | ``small``; see :data:`~muva_core.model.backbone.NAMED_CONFIGS`)
    seed:       model initialisation and batch order
    epochs:     passes over the training images
    batch_size: image-caption pairs per contrastive step
    lr / weight_decay / warmup_frac: AdamW peak learning rate, decay of weight matrices, warm-up share
    p_global:   probability of a global caption (else a part caption with the part masked in)
    min_part_visible: a part is captioned only when at least this fraction is visible
    part_pad:   pixels added around a part box before masking
    keep_tokens: patch tokens kept per training image (FLIP-style token dropping; 32 of 128 by default): for a part caption the tokens on the part first, then random ones; for a global
                caption random ones; 0 = all. Evaluation and later use always see every token.
    scale / data_seed: the pretraining synthetic set (``SCALES[scale]``, domains P, Q, R)
    eval_images: held-out images for the zero-shot report (0 = skip the report)
    image_size: (H, W) of the input; 256x128 = MUVA's grid
    color_jitter: the photometric jitter of :func:`muva_core.data.transforms.photometric_jitter` on every
                training image (lighting and camera changes; in the reuse key only when on)
    """

    backbone: str = "small"
    seed: int = 0
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    p_global: float = 0.2
    min_part_visible: float = 0.5
    part_pad: int = 4
    keep_tokens: int = 32
    scale: str = "pretrain"
    data_seed: int = 0
    eval_images: int = 200
    image_size: tuple[int, int] = (256, 128)
    color_jitter: bool = False

    def __post_init__(self) -> None:
        from .data.synthetic import SCALES
        from .model.backbone import NAMED_CONFIGS

        if self.backbone not in NAMED_CONFIGS:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {sorted(NAMED_CONFIGS)}")
        if self.scale not in SCALES:
            raise ValueError(f"unknown synthetic scale {self.scale!r}; expected one of {sorted(SCALES)}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {self.epochs} and {self.batch_size}")
        if not 0.0 <= self.p_global <= 1.0:
            raise ValueError(f"p_global must be in [0, 1], got {self.p_global}")
        self.image_size = tuple(int(s) for s in self.image_size)  # type: ignore[assignment]

    def settings(self) -> dict[str, Any]:
        """The reuse key: this config plus the generator and caption versions."""
        from .data.synthetic import GENERATOR_VERSION

        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        if not d["color_jitter"]:   # added later: in the key only when on, so earlier checkpoints keep theirs
            del d["color_jitter"]
        d.update(generator_version=GENERATOR_VERSION, captions_version=CAPTIONS_VERSION,
                 format_version=PRETRAIN_FORMAT_VERSION)
        return d


def pretrain_data_root(out_dir: str | os.PathLike) -> Path:
    """Default home of the pretraining set: ``<parent of out_dir>/synthetic-pretrain`` (``data/clip`` ->
    ``data/synthetic-pretrain``)."""
    return Path(out_dir).resolve().parent / "synthetic-pretrain"


def checkpoint_file(out_dir: str | os.PathLike, backbone: str, seed: int,
                    image_size: Sequence[int] = (256, 128)) -> Path:
    """``<out_dir>/clip-<backbone>-seed<seed>.safetensors``; ``clip-<backbone>-<H>x<W>-seed<seed>`` for an input
    size other than MUVA's 256x128."""
    h, w = (int(v) for v in image_size)
    size = "" if (h, w) == (256, 128) else f"-{h}x{w}"
    return Path(out_dir) / f"clip-{backbone}{size}-seed{int(seed)}.safetensors"


def report_file(checkpoint: str | os.PathLike) -> Path:
    """The JSON report beside a checkpoint (same name, ``.json``)."""
    return Path(checkpoint).with_suffix(".json")


def partial_file(checkpoint: str | os.PathLike) -> Path:
    """The per-epoch resume state beside a checkpoint: ``clip-...-seed0.partial.safetensors``."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


# ---------------------------------------------------------------------------------------------
# the CLIP a run configuration starts from (``pretrained: pretrain-clip``)

PRETRAINED_TAG = "pretrain-clip"
"""The ``pretrained`` value of a run configuration that starts from this module's CLIP."""

CONFIG_CLIP_SEED = 0
"""Seed of the CLIP that ``pretrained: pretrain-clip`` names (the same CLIP for every run seed)."""

CONFIG_CLIP_OPTIONS: dict[str, Any] = {}
""":func:`pretrain_clip` arguments beyond the defaults for ``pretrained: pretrain-clip`` (empty: the
defaults, i.e. ``muva pretrain-clip --out <data_root>/clip --backbone <backbone> --seed 0``; tests shrink it)."""


def uses_pretrain_clip(cfg) -> bool:
    """Whether a :class:`~muva_core.config.RunConfig` starts from this module's CLIP (``pretrained:
    pretrain-clip`` and no ``checkpoint_path``, which would win)."""
    return cfg.model.pretrained == PRETRAINED_TAG and not cfg.model.checkpoint_path


def config_clip_spec(cfg) -> dict[str, Any]:
    """The :func:`pretrain_clip` arguments of the CLIP ``pretrained: pretrain-clip`` names for ``cfg``: its
    backbone, input size and ``data_root``, seed :data:`CONFIG_CLIP_SEED`, the default settings otherwise."""
    from .paths import resolve

    return {"out_dir": resolve(cfg.data.data_root) / "clip", "backbone": cfg.model.backbone, "seed": CONFIG_CLIP_SEED,
            "image_size": (int(cfg.data.height), int(cfg.data.width)), "reid_root": resolve(cfg.data.synth_root),
            **CONFIG_CLIP_OPTIONS}


def config_clip_path(cfg) -> Path:
    """``<data_root>/clip/clip-<backbone>-seed0.safetensors``: where ``pretrained: pretrain-clip`` loads from."""
    spec = config_clip_spec(cfg)
    return checkpoint_file(spec["out_dir"], spec["backbone"], spec["seed"], spec["image_size"])


# ---------------------------------------------------------------------------------------------
# data

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

    def resized(self, size: Sequence[int]) -> "PretrainImages":
        """The images resized to ``size`` = (H, W) (bilinear, antialiased), boxes scaled with them."""
        h, w = (int(v) for v in size)
        H, W = self.images.shape[-2:]
        if (h, w) == (H, W):
            return self
        x = torch.nn.functional.interpolate(self.images.float(), size=(h, w), mode="bilinear", antialias=True,
                                            align_corners=False)
        boxes = self.boxes.copy()
        boxes[..., [0, 2]] *= w / W
        boxes[..., [1, 3]] *= h / H
        return PretrainImages(x.round().clamp(0, 255).to(torch.uint8), boxes, self.attrs, self.pids,
                              self.domains, self.relpaths)


def load_pretrain_images(root: str | os.PathLike, split: str = "train", domains: Sequence[str] | None = None,
                         limit: int | None = None, seed: int = 0, progress: bool = False) -> PretrainImages:
    """Read the ``train`` split (training identities) or the ``test`` split (query + gallery images of
    the held-out identities; distractors and junk left out) of generated pretraining domains.

    limit: keep a seeded random subset of this many images (sorted back into file order).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from .data.synthetic import PRETRAIN_DOMAINS, SPLIT_DIRS, load_attributes, load_part_boxes

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


def _normalise(images: torch.Tensor, jitter: torch.Generator | None = None) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> CLIP-normalised floats; with ``jitter``, each image photometrically jittered first."""
    from .data.transforms import CLIP_MEAN, CLIP_STD, photometric_jitter

    x = images.float().div_(255.0)
    if jitter is not None:
        x = torch.stack([photometric_jitter(im, jitter) for im in x])
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
    x = _normalise(data.images[list(index)])
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
    else a part caption of a random visible part (that part masked in, the rest zeroed).
    With ``cfg.keep_tokens`` > 0: ``keep_tokens`` random patches, those on the captioned part first.
    """
    index = [int(i) for i in index]
    jitter = torch.Generator().manual_seed(int(rng.integers(2**31))) if cfg.color_jitter else None
    x = _normalise(data.images[index], jitter)
    h, w = x.shape[-2:]
    grid = (h // patch, w // patch)
    n_tok = grid[0] * grid[1]
    k = int(cfg.keep_tokens)
    keep = [] if 0 < k < n_tok else None
    texts, grans = [], []
    for b, i in enumerate(index):
        boxes = data.boxes[i].copy()
        if rng.random() < 0.5:
            x[b] = x[b].flip(-1)
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        g = "global"
        if rng.random() >= cfg.p_global:
            visible = [p for j, p in enumerate(PARTS) if boxes[j, 4] >= cfg.min_part_visible]
            if visible:
                g = visible[int(rng.integers(len(visible)))]
        if g != "global":
            x[b] *= _part_mask(boxes[PARTS.index(g)], h, w, cfg.part_pad)
        texts.append(caption(data.attrs[i], g, rng))
        grans.append(g)
        if keep is not None:
            score = rng.random(n_tok)
            if g != "global":
                score += _token_priority(boxes[PARTS.index(g)], grid, patch, cfg.part_pad)
            keep.append(np.sort(np.argsort(-score, kind="stable")[:k]))
    keep_t = torch.from_numpy(np.stack(keep)).long() if keep is not None else None
    return Batch(images=x, texts=texts, granularities=grans, keep=keep_t)


class TokenSelect(nn.Module):
    """Keeps the class token and the patch tokens ``index`` ``[B, K]`` (set per batch); identity when
    ``index`` is None. Takes the place of open_clip's ``visual.patch_dropout`` (no parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.index: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return x
        idx = self.index.to(x.device)
        if idx.shape[0] != x.shape[0]:
            raise ValueError(f"token index for {idx.shape[0]} images, batch of {x.shape[0]}")
        patches = torch.gather(x[:, 1:], 1, idx[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], patches], dim=1)


# ---------------------------------------------------------------------------------------------
# training

def build_pretrain_clip(cfg: PretrainConfig):
    """The CLIP to pretrain (random weights seeded by ``cfg.seed``, patch embedding trainable, a
    :class:`TokenSelect` in place of the patch dropout) and its tokenizer."""
    from .model.backbone import BackboneConfig, build_clip

    model, tokenizer = build_clip(BackboneConfig(name=cfg.backbone, pretrained=None, image_size=cfg.image_size,
                                                 freeze_patch_embed=False, seed=cfg.seed))
    model.visual.patch_dropout = TokenSelect()
    return model, tokenizer


def make_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings (token, positional, class) and the logit scale."""
    from .train.schedulers import make_param_groups

    groups = make_param_groups(model, cfg.lr, cfg.weight_decay, lr_scale_patterns={},
                               weight_decay_patterns={r"embedding|logit_scale": 0.0}, no_decay_bias_norm=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98), eps=1e-6,
                             fused=True)  # fused: ~10x faster than the per-tensor loop on CPU


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (open_clip, argmax pooling at the EOT token) over the positions up to the batch's
    last EOT only: the text attention is causal, so the padding after it never changes what the EOT reads, and a
    caption of ~20 tokens costs a quarter of the 77-token context."""
    n = int(tokens.argmax(dim=-1).max()) + 1
    if n >= tokens.shape[1] or getattr(model, "text_pool_type", "argmax") != "argmax":
        return model.encode_text(tokens)
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :n]).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0], device=x.device), tokens[:, :n].argmax(dim=-1)]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def contrastive_step(model: nn.Module, tokenizer, images: torch.Tensor, texts: Sequence[str],
                     optimizer: torch.optim.Optimizer | None, loss_fn: nn.Module | None = None,
                     keep: torch.Tensor | None = None) -> float:
    """One ClipLoss step on (image, caption) pairs; returns the loss. ``optimizer=None``: loss only.

    keep: ``[B, K]`` patch tokens to keep per image (needs the model from :func:`build_pretrain_clip`).
    """
    from open_clip.loss import ClipLoss

    loss_fn = loss_fn or ClipLoss()
    tokens = tokenizer(list(texts)).to(images.device)
    selector = model.visual.patch_dropout
    if keep is not None and not isinstance(selector, TokenSelect):
        raise TypeError("keep needs visual.patch_dropout = TokenSelect() (see build_pretrain_clip)")
    try:
        if keep is not None:
            selector.index = keep
        with torch.set_grad_enabled(optimizer is not None):
            img_f = nn.functional.normalize(model.encode_image(images), dim=-1)
            txt_f = nn.functional.normalize(encode_text(model, tokens), dim=-1)
            loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
    finally:
        if isinstance(selector, TokenSelect):
            selector.index = None
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------
# zero-shot attribute retrieval

def zero_shot_accuracy(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
                       balanced: bool = False) -> float:
    """Share of images whose most similar (cosine) text is their true value.

    image_features ``[N, E]``, text_features ``[K, E]`` (one per value), labels ``[N]`` value
    indices, ``-1`` = not applicable (skipped). balanced=True: the mean over the values present
    of the share of their images classified right (chance = 1 / values present, whatever the
    class frequencies). NaN when no label applies.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    keep = labels >= 0
    if not bool(keep.any()):
        return float("nan")
    img = nn.functional.normalize(image_features[keep].float(), dim=-1)
    txt = nn.functional.normalize(text_features.float(), dim=-1)
    pred = (img @ txt.T).argmax(dim=1)
    y = labels[keep]
    hit = (pred == y).float()
    if not balanced:
        return float(hit.mean())
    return float(torch.stack([hit[y == c].mean() for c in torch.unique(y)]).mean())


@torch.no_grad()
def _encode_images(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model.encode_image(x[s:s + batch_size]) for s in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def evaluate_zero_shot(model, tokenizer, data: PretrainImages, attributes: Sequence[str] | None = None,
                       modes: Sequence[str] = ("global", "part"), part_pad: int = 4, batch_size: int = 64,
                       progress: bool = False) -> dict[str, Any]:
    """Zero-shot attribute classification of ``data`` by the most similar prompt among each attribute's values.

    modes: ``global`` = whole image vs "A photo of a person in a red shirt."; ``part`` = the
    attribute's part masked in vs "A photo of the upper body of a person in a red shirt.".
    Returns ``{mode: {attribute: {accuracy, chance, majority, balanced_accuracy, balanced_chance, n,
    values}}, "mean": {mode: {...the same, averaged over the attributes}}}``: chance = 1 / number of
    values, majority = share of the commonest value, balanced_chance = 1 / values present.
    """
    from tqdm.auto import tqdm

    attributes = list(attributes or ZERO_SHOT_ATTRIBUTES)
    was_training = model.training
    model.eval()
    index = list(range(len(data)))
    feats: dict[str, torch.Tensor] = {}
    jobs = (["global"] if "global" in modes else []) + (list(PARTS) if "part" in modes else [])
    for g in tqdm(jobs, desc="zero-shot features", disable=not progress):
        x = _normalise(data.images) if g == "global" else masked_part_images(data, index, g, part_pad)
        feats[g] = _encode_images(model, x, batch_size)
    out: dict[str, Any] = {}
    for mode in modes:
        res = {}
        for a in attributes:
            spec = ZERO_SHOT_ATTRIBUTES[a]
            prompts = zero_shot_prompts(a, mode)
            values = list(prompts)
            txt = encode_text(model, tokenizer([prompts[v] for v in values]))
            labels = torch.tensor([values.index(v) if (v := spec.value_of(at)) is not None else -1
                                   for at in data.attrs])
            img = feats["global" if mode == "global" else spec.part]
            n = int((labels >= 0).sum())
            counts = np.bincount(labels[labels >= 0].numpy(), minlength=len(values))
            res[a] = {"accuracy": zero_shot_accuracy(img, txt, labels), "chance": 1.0 / len(values),
                      "majority": float(counts.max() / max(1, n)),
                      "balanced_accuracy": zero_shot_accuracy(img, txt, labels, balanced=True),
                      "balanced_chance": 1.0 / max(1, int((counts > 0).sum())), "n": n, "values": len(values)}
        out[mode] = res
    keys = ("accuracy", "chance", "majority", "balanced_accuracy", "balanced_chance")
    out["mean"] = {m: {k: float(np.nanmean([r[k] for r in out[m].values()])) for k in keys} for m in modes}
    model.train(was_training)
    return out


def evaluate_zero_shot_domains(model, tokenizer, root: str | os.PathLike, domains: Sequence[str], limit: int,
                               image_size: Sequence[int], part_pad: int = 4, seed: int = 0,
                               progress: bool = False) -> dict[str, Any]:
    """:func:`evaluate_zero_shot` on the test images (query + gallery) of generated Re-ID domains (``synth_A`` ..
    ``synth_D``: other people, cameras and lighting than the pretraining domains), ``limit`` images of each:
    ``{domain: {"global": ..., "part": ..., "mean": ...}, "mean": {mode: {...}}}`` (the mean over the domains)."""
    out: dict[str, Any] = {}
    for d in domains:
        data = load_pretrain_images(root, "test", domains=[d], limit=limit, seed=seed).resized(image_size)
        out[d] = evaluate_zero_shot(model, tokenizer, data, part_pad=part_pad, progress=progress)
    if out:
        modes = list(next(iter(out.values()))["mean"])
        out["mean"] = {m: {k: float(np.mean([out[d]["mean"][m][k] for d in domains])) for k in out[domains[0]]["mean"][m]}
                       for m in modes}
    return out


# ---------------------------------------------------------------------------------------------
# checkpoint

def read_pretrain_info(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a pretrained CLIP checkpoint (settings, architecture, accuracies, ...)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained CLIP checkpoint not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:
        raise RuntimeError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if meta.get("format") != PRETRAIN_FORMAT:
        raise RuntimeError(f"{path}: not a {PRETRAIN_FORMAT} checkpoint (format {meta.get('format')!r})")
    return {k: (json.loads(v) if k in ("settings", "architecture", "zero_shot", "epochs") else v)
            for k, v in meta.items()}


def _save_clip(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    strmeta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=strmeta)


def _differences(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the image renderers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class _Clock:
    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=_cpu_seconds)

    def lap(self) -> dict[str, float]:
        return {"wall_s": round(time.perf_counter() - self.wall, 2), "cpu_s": round(_cpu_seconds() - self.cpu, 2)}


def _partial_state(partial: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The resume state of an interrupted run with the same settings (None: start afresh); a partial file
    with other settings is refused unless ``overwrite`` (then it is removed)."""
    if not partial.is_file():
        return None
    from .train.checkpoint import CheckpointError, read_checkpoint_info

    try:
        info = read_checkpoint_info(partial)
        old = info["config"]
    except CheckpointError:
        info, old = None, None
    if info is not None and old == settings:
        return info
    if not overwrite:
        diff = _differences(old, settings) if isinstance(old, dict) else ["not a pretrain-clip resume state"]
        raise CheckpointExistsError(f"{partial}: an interrupted pretraining with other settings ({'; '.join(diff)}); "
                                    "pass overwrite=True (--overwrite) to discard it, or choose another --out")
    partial.unlink()
    return None


def _progress_line(line: str) -> None:
    """One line per epoch to the run's progress log when a ``muva run`` kernel or the runner is listening."""
    from .progress import report

    report(line, echo=False)


# ---------------------------------------------------------------------------------------------
# the entry point

def _reid_domains(root: str | os.PathLike | None) -> list[str]:
    """The synthetic Re-ID domains (A-D) generated under ``root``."""
    if root is None:
        return []
    from .data.synthetic import read_manifest

    manifest = read_manifest(Path(root)) or {}
    return sorted(d for d in manifest.get("domains", {}) if d in "ABCD" and (Path(root) / f"synth_{d}").is_dir())


def pretrain_clip(out_dir: str | os.PathLike, backbone: str = "small", seed: int = 0, epochs: int | None = None,
                  scale: str = "pretrain", synth_root: str | os.PathLike | None = None, overwrite: bool = False,
                  progress: bool = True, reid_root: str | os.PathLike | None = None, **options: Any) -> Path:
    """Pretrain a named CLIP config on captioned synthetic pedestrians; return the checkpoint path.

    out_dir:    folder of ``clip-<backbone>-seed<seed>.safetensors`` and its ``.json`` report
    epochs:     default :data:`DEFAULT_EPOCHS` ``[backbone]``
    scale:      size of the pretraining set (``pretrain``; ``small`` for tests)
    synth_root: where the pretraining set is generated / reused (default :func:`pretrain_data_root`)
    overwrite:  replace a checkpoint made with other settings (otherwise :class:`CheckpointExistsError`)
    reid_root:  a generated synthetic Re-ID set (``synth_A`` .. ``synth_D``): the report adds the zero-shot accuracy
                on the test images of the domains it holds (``zero_shot["reid_domains"]``; not a setting)
    options:    other :class:`PretrainConfig` fields (batch_size, lr, eval_images, ...)

    Returns at once when the checkpoint exists with the same settings.
    """
    cfg = PretrainConfig(backbone=backbone, seed=int(seed), scale=scale,
                         epochs=int(epochs if epochs is not None else DEFAULT_EPOCHS.get(backbone, 4)), **options)
    settings = cfg.settings()
    path = checkpoint_file(out_dir, backbone, seed, cfg.image_size)
    partial = partial_file(path)
    if path.is_file():
        try:
            old = read_pretrain_info(path).get("settings", {})
        except RuntimeError:
            old = None
        if old == settings:
            if progress:
                print(f"pretrain-clip: reusing {path} (same settings)")
            return path
        if not overwrite:
            diff = _differences(old, settings) if isinstance(old, dict) else ["not a pretrain-clip checkpoint"]
            raise CheckpointExistsError(f"{path}: exists with other settings ({'; '.join(diff)}); "
                                  "pass overwrite=True (--overwrite) to replace it, or choose another --out")
    resume = _partial_state(partial, settings, overwrite)

    from open_clip.loss import ClipLoss
    from tqdm.auto import tqdm

    from .data.synthetic import PRETRAIN_DOMAINS, generate_synthetic
    from .model.backbone import NAMED_CONFIGS
    from .train.checkpoint import load_checkpoint, save_checkpoint
    from .train.schedulers import WarmupCosineLR

    timings: dict[str, dict[str, float]] = {}
    load_before = os.getloadavg()[0]
    total = _Clock()
    clock = _Clock()
    root = Path(synth_root) if synth_root is not None else pretrain_data_root(out_dir)
    generate_synthetic(root, seed=cfg.data_seed, scale=cfg.scale, domains=PRETRAIN_DOMAINS, progress=progress)
    train = load_pretrain_images(root, "train", progress=progress).resized(cfg.image_size)
    held = (load_pretrain_images(root, "test", limit=cfg.eval_images, seed=cfg.data_seed,
                                 progress=progress).resized(cfg.image_size) if cfg.eval_images > 0 else None)
    timings["data"] = clock.lap()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, tokenizer = build_pretrain_clip(cfg)
        model.train()
        loss_fn = ClipLoss()
        batch = min(cfg.batch_size, len(train))
        steps_per_epoch = max(1, len(train) // batch)  # drop the ragged last batch
        n_steps = steps_per_epoch * cfg.epochs
        optimizer = make_optimizer(model, cfg)
        warm = min(n_steps - 1, max(1, int(round(cfg.warmup_frac * n_steps))))
        scheduler = WarmupCosineLR(optimizer, max_epochs=n_steps, warmup_epochs=warm, eta_min=0.0,
                                   warmup_lr_init=None, warmup_factor=0.01)
        clock = _Clock()
        zero_shot: dict[str, Any] = {}
        epoch_loss: list[float] = []
        step_loss: list[float] = []
        start = 0
        if resume is not None:
            info = load_checkpoint(partial, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=False)
            start = int(info["epoch"])
            zero_shot = dict(info["extra"].get("zero_shot", {}))
            epoch_loss = list(info["extra"].get("epoch_loss", []))
            step_loss = list(info["extra"].get("step_loss", []))
            if progress:
                print(f"pretrain-clip: resuming from epoch {start} of {cfg.epochs} ({partial})")
        elif held is not None:
            zero_shot["random"] = evaluate_zero_shot(model, tokenizer, held, part_pad=cfg.part_pad, progress=progress)
        timings["eval_random"] = clock.lap()

        clock = _Clock()
        gen = torch.Generator().manual_seed(cfg.seed)
        for _ in range(start):  # the batch order of the epochs already done
            torch.randperm(len(train), generator=gen)
        bar = tqdm(total=n_steps, initial=start * steps_per_epoch, desc=f"pretrain CLIP {backbone}", unit="step",
                   disable=not progress)
        try:
            for epoch in range(start, cfg.epochs):
                order = torch.randperm(len(train), generator=gen).tolist()
                losses = []
                for s in range(steps_per_epoch):
                    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(epoch, s)))
                    bt = make_batch(train, order[s * batch:(s + 1) * batch], rng, cfg,
                                    patch=int(model.visual.patch_size[0]))
                    losses.append(contrastive_step(model, tokenizer, bt.images, bt.texts, optimizer, loss_fn,
                                                   keep=bt.keep))
                    scheduler.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", epoch=epoch + 1)
                step_loss += losses
                epoch_loss.append(float(np.mean(losses)))
                if epoch + 1 < cfg.epochs:  # the last epoch ends in the checkpoint itself
                    save_checkpoint(partial, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch + 1,
                                    step=(epoch + 1) * steps_per_epoch, config=settings, rng=False,
                                    extra={"zero_shot": zero_shot, "epoch_loss": epoch_loss, "step_loss": step_loss})
                _progress_line(f"pretrain-clip epoch {epoch + 1}/{cfg.epochs}: loss {epoch_loss[-1]:.3f}")
        finally:
            bar.close()
        timings["train"] = clock.lap()
        clock = _Clock()
        if held is not None:
            zero_shot["pretrained"] = evaluate_zero_shot(model, tokenizer, held, part_pad=cfg.part_pad,
                                                         progress=progress)
            domains = _reid_domains(reid_root)
            if domains:
                zero_shot["reid_domains"] = evaluate_zero_shot_domains(
                    model, tokenizer, reid_root, domains, cfg.eval_images, cfg.image_size, cfg.part_pad,
                    seed=cfg.data_seed, progress=progress)
        timings["eval_pretrained"] = clock.lap()
    timings["total"] = total.lap()

    report = {
        "checkpoint": str(path),
        "settings": settings,
        "architecture": NAMED_CONFIGS[backbone],
        "data": {"root": str(root), "domains": list(PRETRAIN_DOMAINS), "train_images": len(train),
                 "train_identities": int(len(np.unique(train.pids))),
                 "heldout_images": len(held) if held is not None else 0,
                 "heldout_identities": int(len(np.unique(held.pids))) if held is not None else 0},
        "steps": n_steps,
        "resumed_from_epoch": start,
        "loss": {"per_epoch": epoch_loss, "first_steps": step_loss[:5], "last_steps": step_loss[-5:]},
        "logit_scale": float(model.logit_scale.detach().exp()),
        "zero_shot": zero_shot,
        "timings": timings,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        "torch_version": torch.__version__,
    }
    write_json(report_file(path), report)
    summary = {k: {m: v["mean"][m] for m in v["mean"]} for k, v in zero_shot.items()}
    _save_clip(path, model, {
        "format": PRETRAIN_FORMAT, "format_version": str(PRETRAIN_FORMAT_VERSION), "backbone": backbone,
        "settings": settings, "architecture": NAMED_CONFIGS[backbone], "epochs": cfg.epochs,
        "zero_shot": summary, "torch_version": torch.__version__,
    })
    partial.unlink(missing_ok=True)
    if progress:
        t = timings["total"]
        print(f"pretrain-clip: {backbone} seed {seed}, {cfg.epochs} epochs ({n_steps} steps) in {t['wall_s']:.0f} s "
              f"wall / {t['cpu_s']:.0f} s CPU -> {path}")
    return path
