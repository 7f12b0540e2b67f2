"""The CLIP a run configuration starts from (``pretrained: pretrain-clip``): making it before a run when it is
missing (reused when its settings are the same, refused when they differ) and what ``muva pretrain-clip`` prints
about a checkpoint. Which CLIP a configuration starts from (``uses_pretrain_clip``, ``clip_start``) lives in
:mod:`muva_core.model.checkpoints`, below evaluation, and is re-exported here."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..model.checkpoints import (CONFIG_CLIP_SEED, PRETRAINED_TAG, clip_start, config_clip_dir, config_clip_path,
                                 uses_pretrain_clip)
from .files import CheckpointExistsError, read_pretrain_report
from .loop import pretrain_clip
from .zeroshot import format_zero_shot_report

if TYPE_CHECKING:
    from ..config import RunConfig

__all__ = ["CONFIG_CLIP_OPTIONS", "uses_pretrain_clip", "config_clip_spec", "ensure_pretrained_clip", "clip_start",
           "pretrain_clip_summary"]

CONFIG_CLIP_OPTIONS: dict[str, Any] = {}
""":func:`~muva_core.pretrain.loop.pretrain_clip` arguments beyond the defaults for ``pretrained: pretrain-clip``
(empty: the defaults, i.e. ``muva pretrain-clip --out <data_root>/clip --backbone <backbone> --seed 0``; tests
shrink it). The file's name (out_dir, backbone, seed, image_size) comes from the run configuration
(:func:`~muva_core.model.checkpoints.config_clip_path`), not from here."""

_NAMING_KEYS = ("out_dir", "backbone", "seed", "image_size")


def config_clip_spec(cfg: RunConfig) -> dict[str, Any]:
    """The :func:`~muva_core.pretrain.loop.pretrain_clip` arguments of the CLIP ``pretrained: pretrain-clip`` names
    for ``cfg``: its backbone, input size and ``data_root``, seed :data:`CONFIG_CLIP_SEED`, the default settings
    otherwise (plus :data:`CONFIG_CLIP_OPTIONS`)."""
    from ..paths import resolve

    clash = sorted(set(CONFIG_CLIP_OPTIONS) & set(_NAMING_KEYS))
    if clash:
        raise ValueError(f"CONFIG_CLIP_OPTIONS may not set {clash}: the file's name comes from the run configuration "
                         "(muva_core.model.checkpoints.config_clip_path)")
    return {"out_dir": config_clip_dir(cfg), "backbone": cfg.model.backbone, "seed": CONFIG_CLIP_SEED,
            "image_size": (int(cfg.data.height), int(cfg.data.width)), "reid_root": resolve(cfg.data.synth_root),
            **CONFIG_CLIP_OPTIONS}


def ensure_pretrained_clip(cfg: RunConfig, progress: bool = True) -> Path | None:
    """The language-pretrained CLIP that ``pretrained: pretrain-clip`` names (:func:`config_clip_path`,
    ``<data_root>/clip/clip-<backbone>-seed0.safetensors``): made by ``muva pretrain-clip`` with the default settings
    when it is missing (an interrupted pretraining resumes at its last epoch), reused when its settings are the
    same, refused (:class:`~muva_core.pretrain.files.CheckpointExistsError`, naming the settings that differ) when
    they are not. None when the configuration starts from other weights (``checkpoint_path``, an open_clip tag,
    none)."""
    if not uses_pretrain_clip(cfg):
        return None
    spec = config_clip_spec(cfg)
    try:
        return pretrain_clip(progress=progress, **spec)
    except CheckpointExistsError as err:
        raise CheckpointExistsError(
            f"pretrained={cfg.model.pretrained}: {err}. The file was made with other settings than this version's "
            f"`muva pretrain-clip --out {spec['out_dir']} --backbone {spec['backbone']} --seed {spec['seed']}`; "
            "move it away (or add --overwrite to that command) to make the one this configuration needs, or start "
            "from it as it is with -p checkpoint_path=<file> -p pretrained=none") from None


def pretrain_clip_summary(path: Path, backbone: str, image_size: Sequence[int]) -> str:
    """What ``muva pretrain-clip`` prints after :func:`~muva_core.pretrain.loop.pretrain_clip`: the zero-shot
    accuracies of its report (:func:`~muva_core.pretrain.zeroshot.format_zero_shot_report`), the checkpoint, whether
    the run configurations with ``pretrained: pretrain-clip`` start from it, and how to start from it."""
    from ..config import RunConfig

    lines = [text] if (text := format_zero_shot_report(read_pretrain_report(path))) else []
    lines.append(f"checkpoint: {path}")
    h, w = (int(v) for v in image_size)
    if path.resolve() == config_clip_path(RunConfig().update({"backbone": backbone, "height": h,
                                                               "width": w})).resolve():
        lines.append(f"configs with `pretrained: pretrain-clip` and backbone {backbone} (the synthetic ones) start "
                     "from it")
    lines.append(f"use it: muva train -p checkpoint_path={path} -p backbone={backbone} -p pretrained=none ...")
    return "\n".join(lines)
