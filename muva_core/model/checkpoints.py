"""Names of the pretrained CLIP checkpoint files the model factory loads, and which CLIP a run configuration starts
from (:func:`uses_pretrain_clip`, :func:`clip_start`, :func:`start_file`) and which file that was, by its digest
(:func:`start_record`, in each run's record); no training code here.

``muva pretrain-clip`` (:mod:`muva_core.pretrain`) writes ``<out_dir>/clip-<backbone>-seed<seed>.safetensors``;
a run configuration with ``pretrained: pretrain-clip`` starts from the one at
``<data_root>/clip/clip-<backbone>-seed0.safetensors`` (:func:`config_clip_path`). The pretraining package
makes and reuses that file; :func:`muva_core.model.factory.build_muva` only needs its name, which lives here so
the model imports nothing above it.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Sequence

from ..io import file_digest
from ..paths import resolve

__all__ = ["PRETRAINED_TAG", "CONFIG_CLIP_SEED", "pretrained_clip_file", "config_clip_dir", "config_clip_path",
           "uses_pretrain_clip", "clip_start", "start_file", "start_record", "weights_sha256"]

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


def start_file(cfg) -> str | None:
    """The CLIP file a run configuration starts from (``checkpoint_path``, or the one ``pretrained: pretrain-clip``
    names), None for random weights or an open_clip tag."""
    if uses_pretrain_clip(cfg):
        return str(config_clip_path(cfg))
    return cfg.model.checkpoint_path or None


def weights_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a checkpoint's weights: for a ``.safetensors`` file, of its tensors (their names, dtypes,
    shapes and bytes) and not of its metadata, which ``muva pretrain-clip`` fills with the build's report and which
    safetensors writes in no fixed key order (two builds of the same weights differ in their file bytes); for other
    files, of their bytes."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return file_digest(path)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def start_record(cfg) -> dict | None:
    """``{"path": <start file, as configured>, "weights_sha256": <its weights' digest>}`` for a run that starts from
    a CLIP file (:func:`start_file`), so a run's record says which build of that file it started from (a CLIP made
    again on another machine keeps its name; :func:`weights_sha256`); None when the run starts from random weights
    or an open_clip tag. The digest is None when the file is gone."""
    name = start_file(cfg)
    if name is None:
        return None
    path = resolve(name)
    return {"path": str(name), "weights_sha256": weights_sha256(path) if path.is_file() else None}
