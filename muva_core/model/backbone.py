"""The CLIP backbone (open_clip): named configs, pretrained/local weights, 256x128 positional grid.

MUVA builds on CLIP ViT-B/16 (paper section 4.2). Person crops are 256x128, so the 14x14
positional grid of the 224x224 checkpoint is resized bilinearly to 16x8 (class position kept,
as in CLIP-ReID) and the patch projection ``conv1`` is frozen in both training stages.

Small named configs (``tiny``, ``small``) with random, seeded weights exist for tests, CPU
runs and benchmarks; ``vit-b-16`` is the real architecture (random weights unless
``pretrained`` / ``checkpoint_path`` give weights).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import load_state_dict as _oc_load_state_dict
from open_clip.model import CLIP, resize_pos_embed
from open_clip.pretrained import download_pretrained, get_pretrained_cfg
from open_clip.tokenizer import SimpleTokenizer

__all__ = [
    "BackboneConfig",
    "NAMED_CONFIGS",
    "build_clip",
    "is_torchscript_archive",
    "load_clip_weights",
    "patch_grid",
    "read_clip_state_dict",
]

# Architectures by name. ``open_clip_name`` entries are built with open_clip.create_model
# (force_image_size); the others from the dicts with open_clip's CLIP(embed_dim, vision_cfg, text_cfg).
# Vision heads = width // head_width. Text vocab stays 49408 so open_clip's BPE tokenizer works.
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        embed_dim=64,
        vision_cfg=dict(layers=2, width=64, head_width=32, patch_size=16, mlp_ratio=4.0),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
        quick_gelu=True,
    ),
    "small": dict(
        embed_dim=128,
        vision_cfg=dict(layers=6, width=192, head_width=64, patch_size=16, mlp_ratio=4.0),
        text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
        quick_gelu=True,
    ),
    # the synthetic benchmark's CLIP (configs/synth_*.yaml, at 192x96: a 12x6 patch grid): a third of small's
    # step, so that Re-ID sized sources train to the end on 2 CPU cores
    "mini": dict(
        embed_dim=128,
        vision_cfg=dict(layers=4, width=128, head_width=32, patch_size=16, mlp_ratio=4.0),
        text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
        quick_gelu=True,
    ),
    # OpenAI CLIP weights were trained with QuickGELU (open_clip's 'openai' tag sets quick_gelu=True).
    "vit-b-16": dict(open_clip_name="ViT-B-16", quick_gelu=True),
}


@dataclass
class BackboneConfig:
    """Which CLIP to build and how.

    name:            ``tiny`` | ``small`` | ``vit-b-16`` (see :data:`NAMED_CONFIGS`)
    pretrained:      open_clip pretrained tag (``openai``), downloaded by open_clip where there is
                     internet; ``None`` = random weights; ``"auto"`` (default) = ``openai`` for
                     ``vit-b-16`` and random weights for the small named configs.
    checkpoint_path: a local CLIP state dict (``.safetensors``, ``.pt/.bin`` loaded with
                     ``weights_only=True``, or OpenAI's original TorchScript ``.pt`` read with
                     ``torch.jit.load`` on CPU); takes precedence over ``pretrained``.
    image_size:      (height, width) of the input; the positional grid follows it (16x8 at 256x128).
    freeze_patch_embed: freeze ``visual.conv1`` (paper section 4.2).
    pos_interpolation: interpolation mode used to resize a checkpoint's positional grid.
    seed:            seed of the random initialisation (the global RNG state is left untouched).
    cache_dir:       download cache for pretrained tags.
    """

    name: str = "vit-b-16"
    pretrained: str | None = "auto"
    checkpoint_path: str | None = None
    image_size: tuple[int, int] = (256, 128)
    freeze_patch_embed: bool = True
    pos_interpolation: str = "bilinear"
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.name not in NAMED_CONFIGS:
            raise ValueError(f"unknown backbone {self.name!r}; choose one of {sorted(NAMED_CONFIGS)}")
        self.image_size = tuple(int(s) for s in self.image_size)  # type: ignore[assignment]
        if len(self.image_size) != 2:
            raise ValueError(f"image_size must be (height, width), got {self.image_size}")
        if self.pretrained == "auto":
            self.pretrained = "openai" if "open_clip_name" in NAMED_CONFIGS[self.name] else None
        if self.pretrained is not None and "open_clip_name" not in NAMED_CONFIGS[self.name]:
            raise ValueError(
                f"backbone {self.name!r} has no pretrained weights (pretrained={self.pretrained!r}); "
                "use pretrained=None or checkpoint_path"
            )


def patch_grid(model: CLIP) -> tuple[int, int]:
    """(rows, cols) of the patch grid of ``model.visual`` (16x8 for ViT-B/16 at 256x128)."""
    return tuple(model.visual.grid_size)  # type: ignore[return-value]


def build_architecture(cfg: BackboneConfig) -> CLIP:
    spec = NAMED_CONFIGS[cfg.name]
    if "open_clip_name" in spec:
        model = open_clip.create_model(
            spec["open_clip_name"],
            pretrained=None,
            force_image_size=cfg.image_size,
            force_quick_gelu=spec.get("quick_gelu", False),
        )
    else:
        vision_cfg = dict(spec["vision_cfg"], image_size=cfg.image_size)
        model = CLIP(
            embed_dim=spec["embed_dim"],
            vision_cfg=vision_cfg,
            text_cfg=dict(spec["text_cfg"]),
            quick_gelu=spec.get("quick_gelu", False),
        )
    if not isinstance(model, CLIP):
        raise TypeError(f"expected an open_clip CLIP, got {type(model).__name__}")
    return model


def _resolve_checkpoint(cfg: BackboneConfig) -> str | None:
    if cfg.checkpoint_path is not None:
        path = Path(cfg.checkpoint_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"CLIP checkpoint not found: {path} (BackboneConfig.checkpoint_path). "
                "Give a .safetensors / .pt / .bin CLIP state dict (or OpenAI's TorchScript ViT-B-16.pt), or set pretrained='openai' "
                "where open_clip can download it."
            )
        return str(path)
    if cfg.pretrained is None:
        return None
    oc_name = NAMED_CONFIGS[cfg.name]["open_clip_name"]
    pcfg = get_pretrained_cfg(oc_name, cfg.pretrained)
    if not pcfg:
        raise ValueError(
            f"unknown pretrained tag {cfg.pretrained!r} for {oc_name}; "
            f"available: {open_clip.list_pretrained_tags_by_model(oc_name)}"
        )
    try:
        path = download_pretrained(pcfg, cache_dir=cfg.cache_dir)
    except Exception as exc:  # network errors come in many types
        raise RuntimeError(
            f"could not obtain pretrained weights {oc_name}/{cfg.pretrained} "
            f"(hf hub {pcfg.get('hf_hub', '-')}, url {pcfg.get('url', '-')}, cache {cfg.cache_dir or 'default'}): "
            f"{exc}. Without internet, download the checkpoint elsewhere and pass checkpoint_path."
        ) from exc
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights for {oc_name}/{cfg.pretrained} not found at {path!r}")
    return path


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``; OpenAI's original ``ViT-B-16.pt``):
    a zip whose top folder holds ``constants.pkl`` or ``code/``. A plain ``torch.save`` zip has neither."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    for name in names:
        inner = name.split("/", 1)[1] if "/" in name else name
        if inner == "constants.pkl" or inner.startswith("code/"):
            return True
    return False


def read_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The CLIP state dict in ``path``, in open_clip's (= OpenAI's) key layout.

    * ``.safetensors``: read with safetensors;
    * a TorchScript archive (OpenAI's original ``.pt``, what CLIP-ReID loads with ``torch.jit.load``):
      ``torch.jit.load(path, map_location="cpu").state_dict()``. TorchScript deserialisation uses
      TorchScript's own restricted unpickler, never Python's ``pickle``: no Python code of the archive
      is executed (its TorchScript methods are compiled, and ``forward`` is never called);
    * anything else (``.pt`` / ``.bin`` state dicts): ``torch.load(weights_only=True)``.

    OpenAI's export metadata (``input_resolution``, ``context_length``, ``vocab_size``) is dropped, as
    open_clip's ``build_model_from_openai_state_dict`` does; a ``module.`` prefix is stripped.
    """
    path = str(path)
    if is_torchscript_archive(path):
        import warnings

        try:
            with warnings.catch_warnings():      # torch >= 2.9 flags torch.jit as deprecated
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as exc:
            raise RuntimeError(f"cannot read CLIP checkpoint {path} (a TorchScript archive): {exc}") from exc
        state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    else:
        try:
            state = _oc_load_state_dict(path, device="cpu", weights_only=True)
        except Exception as exc:
            raise RuntimeError(
                f"cannot read CLIP checkpoint {path}: {exc}. Give a CLIP state dict as .safetensors, a .pt/.bin "
                "state dict (loaded with weights_only=True), or OpenAI's original TorchScript .pt."
            ) from exc
    state = dict(state)
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI export metadata
        state.pop(key, None)
    return state


def load_clip_weights(model: CLIP, path: str, interpolation: str = "bilinear") -> None:
    """Load a CLIP state dict from ``path`` into ``model`` (strict), resizing the visual grid.

    ``path`` is read by :func:`read_clip_state_dict`: ``.safetensors`` with safetensors, a TorchScript
    archive (OpenAI's original ``ViT-B-16.pt``) with ``torch.jit.load`` on CPU, anything else with
    ``torch.load(weights_only=True)`` (no pickle execution). Half-precision weights (OpenAI's) are cast
    to the model's dtype. A positional embedding of another (square) grid is interpolated to the
    model's grid; the class position is kept.
    """
    state = read_clip_state_dict(path)
    resize_pos_embed(state, model, interpolation=interpolation, antialias=False)
    # open_clip keeps logit_scale scalar; some exports store it as [1]
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"CLIP checkpoint {path} does not match the backbone architecture: {exc}") from exc


def build_clip(cfg: BackboneConfig | None = None) -> tuple[CLIP, SimpleTokenizer]:
    """Build the CLIP model (weights per ``cfg``) and open_clip's BPE tokenizer (context length 77)."""
    cfg = cfg or BackboneConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_architecture(cfg)
    path = _resolve_checkpoint(cfg)
    if path is not None:
        load_clip_weights(model, path, interpolation=cfg.pos_interpolation)
    if cfg.freeze_patch_embed:
        model.visual.conv1.weight.requires_grad_(False)
    tokenizer = SimpleTokenizer(context_length=model.context_length)
    return model, tokenizer
