"""Names of the pretrained CLIP checkpoint files the model factory loads (no training code here).

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

__all__ = ["PRETRAINED_TAG", "CONFIG_CLIP_SEED", "pretrained_clip_file", "config_clip_dir", "config_clip_path"]

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
