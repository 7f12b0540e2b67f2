"""What decides a pretrained CLIP's weights: :class:`PretrainConfig` (the checkpoint's reuse key), the default
epochs per backbone and the format and caption versions that enter the key."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["BATCH_GRANULARITIES", "LATE_OPTIONS", "PRETRAIN_FORMAT", "PRETRAIN_FORMAT_VERSION", "CAPTIONS_VERSION",
           "DEFAULT_EPOCHS", "PretrainConfig"]

PRETRAIN_FORMAT = "muva-clip-pretrain"
PRETRAIN_FORMAT_VERSION = 1
CAPTIONS_VERSION = "1"
"""Bumped whenever :mod:`muva_core.data.captions` changes what it writes (part of the reuse key)."""

DEFAULT_EPOCHS: dict[str, int] = {"tiny": 10, "mini": 3, "small": 3, "vit-b-16": 5}
"""Epochs over the ``pretrain`` train split (~4.3k images, ~67 steps of 64) when ``epochs`` is not given."""


PRETRAIN_LOSSES = ("clip", "multi_positive")
"""The contrastive losses of :class:`PretrainConfig` (``loss``)."""

BATCH_GRANULARITIES = ("mixed", "one")
"""How :class:`PretrainConfig` (``batch_granularity``) draws the captions' granularities within a batch."""

LATE_OPTIONS = ("color_jitter", "loss", "hard_negatives", "batch_granularity", "jitter_ranges")
""":class:`PretrainConfig` fields added after checkpoints existed: in the reuse key only when not at their default."""


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
    loss:       ``clip``: open_clip's ClipLoss (each image's own caption is its only positive); ``multi_positive``:
                every caption of the batch that is true of an image is a positive for it (same granularity, the
                same values at every attribute the caption rests on, :func:`muva_core.data.captions.caption_facts`),
                soft-target cross-entropy both ways, so two people in red shirts are not pushed apart by "a person
                in a red shirt" (in the key only when not ``clip``)
    hard_negatives: per image, this many hard negative captions (NegCLIP): its caption with one attribute it names
                changed to another value (:func:`muva_core.data.captions.hard_negative_caption`), extra texts the
                image must rank below its own caption, so that every attribute a caption names counts, the shoes
                as much as the shirt (in the reuse key only when > 0)
    batch_granularity: ``mixed``: each image draws its own granularity (global with ``p_global``, else a visible
                part); ``one``: the batch draws one (global with ``p_global``, else a part) and every image is
                captioned at it (global where that part is not visible), so a legs caption is told apart from 63
                other legs, not from a mix of heads, upper bodies and legs in which the trouser colour alone
                already picks it out (in the key only when not ``mixed``)
    color_jitter: the photometric jitter of :func:`muva_core.data.transforms.photometric_jitter` on every
                training image (lighting and camera changes; in the reuse key only when on)
    jitter_ranges: the jitter's ranges (:data:`muva_core.data.transforms.JITTER_RANGES`): ``reid``, the Re-ID
                training's, or ``wide``: stronger colour casts, contrast and saturation, more noise and a random
                resolution drop (a wider world of looks than the three pretraining domains'; in the key only when
                not ``reid``; needs ``color_jitter``)
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
    loss: str = "clip"
    hard_negatives: int = 0
    batch_granularity: str = "mixed"
    jitter_ranges: str = "reid"

    def __post_init__(self) -> None:
        from ..data.synthetic import SCALES
        from ..model.backbone import NAMED_CONFIGS

        if self.backbone not in NAMED_CONFIGS:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {sorted(NAMED_CONFIGS)}")
        if self.scale not in SCALES:
            raise ValueError(f"unknown synthetic scale {self.scale!r}; expected one of {sorted(SCALES)}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {self.epochs} and {self.batch_size}")
        if not 0.0 <= self.p_global <= 1.0:
            raise ValueError(f"p_global must be in [0, 1], got {self.p_global}")
        if self.loss not in PRETRAIN_LOSSES:
            raise ValueError(f"loss must be one of {PRETRAIN_LOSSES}, got {self.loss!r}")
        if not 0 <= int(self.hard_negatives) <= 8:
            raise ValueError(f"hard_negatives must be in 0..8, got {self.hard_negatives}")
        self.hard_negatives = int(self.hard_negatives)
        if self.batch_granularity not in BATCH_GRANULARITIES:
            raise ValueError(f"batch_granularity must be one of {BATCH_GRANULARITIES}, got {self.batch_granularity!r}")
        from ..data.transforms import JITTER_RANGES

        if self.jitter_ranges not in JITTER_RANGES:
            raise ValueError(f"jitter_ranges must be one of {sorted(JITTER_RANGES)}, got {self.jitter_ranges!r}")
        if self.jitter_ranges != "reid" and not self.color_jitter:
            raise ValueError(f"jitter_ranges={self.jitter_ranges!r} needs color_jitter=True (no jitter is drawn "
                             "without it)")
        self.image_size = tuple(int(s) for s in self.image_size)  # type: ignore[assignment]

    def settings(self) -> dict[str, Any]:
        """The reuse key: this config plus the generator and caption versions."""
        from ..data.synthetic import GENERATOR_VERSION

        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        for name in self.late_options_at_default():   # added later: in the key only when set (earlier keys stay)
            del d[name]
        d.update(generator_version=GENERATOR_VERSION, captions_version=CAPTIONS_VERSION,
                 format_version=PRETRAIN_FORMAT_VERSION)
        return d

    def late_options_at_default(self) -> dict[str, Any]:
        """The options added after the first checkpoints were made (:data:`LATE_OPTIONS`) that are at their
        defaults: what :meth:`settings` leaves out of the key and ``muva pretrain-clip`` needs no flag for."""
        return {f.name: f.default for f in dataclasses.fields(self)
                if f.name in LATE_OPTIONS and getattr(self, f.name) == f.default}

    def changed_late_options(self) -> dict[str, Any]:
        """The :data:`LATE_OPTIONS` set away from their defaults (in the key; the flags a command must write)."""
        at_default = self.late_options_at_default()
        return {name: getattr(self, name) for name in LATE_OPTIONS if name not in at_default}

