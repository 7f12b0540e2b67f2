"""Names of the pretrained CLIP checkpoint files the model factory loads, and which CLIP a run configuration starts
from (:func:`uses_pretrain_clip`, :func:`clip_start`); no training code here.

``muva pretrain-clip`` (:mod:`muva_core.pretrain`) writes ``<out_dir>/clip-<backbone>-seed<seed>.safetensors``;
a run configuration with ``pretrained: pretrain-clip`` starts from the one at
``<data_root>/clip/clip-<backbone>-seed0.safetensors`` (:func:`config_clip_path`). The pretraining package
makes and reuses that file; :func:`muva_core.model.factory.build_muva` only needs its name, which lives here so
the model imports nothing above it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..paths import resolve

__all__ = ["PRETRAINED_TAG", "CONFIG_CLIP_SEED", "pretrained_clip_file", "config_clip_dir", "config_clip_path",
           "uses_pretrain_clip", "clip_start"]

PRETRAINED_TAG = "pretrain-clip"
"""The ``pretrained`` value of a run configuration that starts from the CLIP of ``muva pretrain-clip``."""

CONFIG_CLIP_SEED = 0
"""Seed of the CLIP that ``pretrained: pretrain-clip`` names (the same CLIP for every run seed)."""


def pretrained_clip_file(out_dir: str | os.PathLike, backbone: str, seed: int,
                         image_size: Sequence[int] = (256, 128)) -> Path:
    """``<out_dir>/clip-<backbone>-seed<seed>.safetensors``; ``clip-<backbone>-<H>x<W>-seed<seed>`` for an input
    size other than MUVA's 256x128."""
    h, w = (int(v) for v in image_size)
    size = "" if (h, w) == (256, 128) else f"-{h}x{w}"
    return Path(out_dir) / f"clip-{backbone}{size}-seed{int(seed)}.safetensors"


def config_clip_dir(cfg) -> Path:
    """``<data_root>/clip`` (resolved): the folder of the CLIPs ``pretrained: pretrain-clip`` names."""
    return resolve(cfg.data.data_root) / "clip"


def config_clip_path(cfg) -> Path:
    """``<data_root>/clip/clip-<backbone>-seed0.safetensors``: where ``pretrained: pretrain-clip`` loads from (for the
    run's backbone and input size, seed :data:`CONFIG_CLIP_SEED`)."""
    return pretrained_clip_file(config_clip_dir(cfg), cfg.model.backbone, CONFIG_CLIP_SEED,
                                (int(cfg.data.height), int(cfg.data.width)))


def uses_pretrain_clip(cfg) -> bool:
    """Whether a :class:`~muva_core.config.RunConfig` starts from the CLIP of ``muva pretrain-clip`` (``pretrained:
    pretrain-clip`` and no ``checkpoint_path``, which would win)."""
    return cfg.model.pretrained == PRETRAINED_TAG and not cfg.model.checkpoint_path


def clip_start(cfg) -> str:
    """The weights the run's CLIP starts from, in words: ``random init``, ``language-pretrained`` (``pretrained:
    pretrain-clip``), the checkpoint file, or the open_clip tag."""
    m = cfg.model
    if m.checkpoint_path:
        return m.checkpoint_path
    if m.pretrained in ("none", ""):
        return "random init"
    if m.pretrained == PRETRAINED_TAG:
        return "language-pretrained: muva pretrain-clip"
    if m.pretrained == "auto":
        return "openai" if m.backbone == "vit-b-16" else "random init"
    return m.pretrained
