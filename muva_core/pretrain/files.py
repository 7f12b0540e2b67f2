"""The files of a pretrained CLIP: the checkpoint (named below ``model/``, :mod:`muva_core.model.checkpoints`),
its JSON report, the per-epoch resume state, the checkpoint's metadata, the atomic write, and the default home of
the pretraining set."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..io import atomic_path
from ..model.checkpoints import pretrained_clip_file
from .config import PRETRAIN_FORMAT

__all__ = ["CheckpointExistsError", "pretrain_data_root", "checkpoint_file", "report_file", "partial_file",
           "read_pretrain_info", "read_pretrain_report", "save_clip", "load_pretrained_clip"]


class CheckpointExistsError(FileExistsError, ValueError):
    """A pretrained checkpoint exists at the path with other settings (the message lists them)."""



def pretrain_data_root(out_dir: str | os.PathLike, scale: str = "pretrain") -> Path:
    """Default home of the pretraining set: ``<parent of out_dir>/synthetic-pretrain`` for the ``pretrain`` scale
    (``data/clip`` -> ``data/synthetic-pretrain``), ``synthetic-<scale>`` for another (``data/clip-wide`` at
    ``pretrain-wide`` -> ``data/synthetic-pretrain-wide``), so that sets of two scales never share a folder."""
    return Path(out_dir).resolve().parent / ("synthetic-pretrain" if scale == "pretrain" else f"synthetic-{scale}")


def checkpoint_file(out_dir: str | os.PathLike, backbone: str, seed: int,
                    image_size: Sequence[int] = (256, 128)) -> Path:
    """``<out_dir>/clip-<backbone>-seed<seed>.safetensors``; ``clip-<backbone>-<H>x<W>-seed<seed>`` for an input
    size other than MUVA's 256x128 (:func:`muva_core.model.checkpoints.pretrained_clip_file`)."""
    return pretrained_clip_file(out_dir, backbone, seed, image_size)


def report_file(checkpoint: str | os.PathLike) -> Path:
    """The JSON report beside a checkpoint (same name, ``.json``)."""
    return Path(checkpoint).with_suffix(".json")


def read_pretrain_report(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The JSON report beside a checkpoint (:func:`report_file`); ``{}`` when there is none."""
    path = report_file(checkpoint)
    return json.loads(path.read_text()) if path.is_file() else {}


def partial_file(checkpoint: str | os.PathLike) -> Path:
    """The per-epoch resume state beside a checkpoint: ``clip-...-seed0.partial.safetensors``."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


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


def save_clip(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """The model's state dict to ``path`` (safetensors, written atomically) with ``meta`` (non-strings as JSON)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    strmeta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=strmeta)



def load_pretrained_clip(path: str | os.PathLike):
    """A checkpoint of ``muva pretrain-clip`` as the CLIP it trained: ``(model, tokenizer, PretrainConfig)``,
    built from the settings in its metadata (eval mode)."""
    from safetensors.torch import load_file

    from .config import PretrainConfig
    from .model import build_pretrain_clip

    settings = dict(read_pretrain_info(path)["settings"])
    for key in ("generator_version", "captions_version", "format_version"):
        settings.pop(key, None)
    cfg = PretrainConfig(**settings)
    model, tokenizer = build_pretrain_clip(cfg)
    model.load_state_dict(load_file(str(path)))
    return model.eval(), tokenizer, cfg
