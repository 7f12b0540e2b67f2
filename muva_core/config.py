"""Typed run configuration: one dataclass per step, YAML files per protocol, flat keys.

Every field name is unique across the sections, so a configuration flattens to one
``{key: value}`` dict. Those flat keys are, at once, the YAML keys (nested by section or
flat), the notebooks' papermill parameters and the CLI's ``-p key=value`` overrides.
Unknown keys fail with a message that names the file and suggests the closest key.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says where and why."""


@dataclass
class DataConfig:
    """Which protocol, where its data lives, and how images are prepared."""

    protocol: str = "synth:A2B"
    data_root: str = "data"            # real datasets: folder holding Market-1501-v15.09.15/, MSMT17_V1/, ...
    synth_root: str = "data/synthetic"  # where `muva synth` writes (and the synthetic protocols read)
    synth_scale: str = "default"       # small | default | evidence | large (data.synthetic.SCALES)
    synth_seed: int = 0                # seed of the synthetic data and of the simulated expert (fixed across run seeds)
    height: int = 256
    width: int = 128
    norm: str = "clip"                 # clip | half (the reference code's mean = std = 0.5)
    num_instances: int = 4             # K images per identity in a P x K batch
    batch_size: int = 64               # P x K
    num_workers: int = 2


@dataclass
class GroundingConfig:
    """Part pseudo-labels: which expert, how boxes are calibrated and voted into patch masks."""

    backend: str = "synthetic"         # synthetic | cogvlm | florence2 | owlv2 | grounding_dino | vitpose
    ground_model: str = ""             # model id or local path ("" = the backend's default id)
    ground_splits: str = "train"       # comma-separated splits to label (training needs train only)
    ground_batch_size: int = 0         # 0 = the backend's own batch size
    trust_remote_code: bool = False    # required for cogvlm (remote model code; explicit opt-in)
    cache_dir: str = "data/cache"      # grounding tables and masks, shared across runs of a dataset
    calibrate: bool = True             # False = vote raw boxes (Table 9 ablation)
    calib_method: str = "robust_z"     # robust_z | quantile
    calib_windows: str = "stripes"     # stripes (the paper) | data (median plausible box per part)
    vote_rule: str = "center"          # center | coverage
    vote_min_coverage: float = 0.5
    patch_size: int = 16


@dataclass
class ModelConfig:
    """The MUVA model (paper 3.1, 3.2, 4.2) and every ablation switch of Tables 5-8, 10, 12."""

    backbone: str = "vit-b-16"         # vit-b-16 (the paper) | small | tiny (random weights, CPU tests/demos)
    pretrained: str = "auto"           # open_clip tag (openai); auto = openai for vit-b-16, random for small/tiny; none
    checkpoint_path: str = ""          # local CLIP weights (.safetensors / .pt); wins over pretrained
    granularity: str = "G+H+U+L"       # Table 5: G, G+H, G+U, G+L, G+H+U, G+H+L, G+U+L, G+H+U+L
    mask_mode: str = "predicted"       # predicted (AM-MSA) | stripe (Table 8)
    rmp_heads: int = 2                 # Table 12: 2 single-source, 8 for MS and multi-source
    rmp_layernorm: bool = True         # Table 10 LN
    rmp_residual: bool = True          # Table 10 RC
    mask_threshold: float = 0.5        # t of the mask gating
    n_ctx: int = 4                     # learnable prompt tokens per identity per granularity
    part_agnostic_prompts: bool = False  # Table 7 PAP: no part words in the templates
    domain_specific_prompts: bool = False  # Table 7 DSP: learnable per-domain prompt tokens


@dataclass
class TrainConfig:
    """Two-stage training (paper 3.3, 4.2). Defaults are the paper's; synthetic configs shrink them."""

    vision_only: bool = False          # Table 6: no stage 1, no i2tce
    stage1_epochs: int = 120
    stage1_lr: float = 3.5e-4
    stage1_warmup_epochs: int = 5
    stage1_batch_ids: int = 64         # identities per stage-1 step
    cmp_temperature: float = 0.0       # 0 = 1 / CLIP's logit scale (see README); 1.0 = the paper's literal eq. 1
    stage2_epochs: int = 60
    stage2_lr: float = 5e-6
    weight_decay: float = 1e-4
    rmp_lr_scale: float = 10.0
    warmup_epochs: int = 10
    warmup_factor: float = 0.1
    lr_milestones: list = field(default_factory=lambda: [30, 50])
    lr_gamma: float = 0.1
    id_epsilon: float = 0.1
    imp_temperature: float = 0.01
    memory_momentum: float = 0.2
    i2tce_logit_scale: float = 0.0     # 0 = CLIP's logit scale; 1.0 = the paper's literal eq. 4
    mask_loss_weight: float = 1.0
    mask_dice: str = "soft"            # soft | elementwise (eq. 8 as printed)
    augment: str = "flip"              # flip (the paper) | flip+crop+erase (Table 11)
    amp: bool = True                   # bf16 autocast on GPU (ignored on CPU: fp32)
    log_every: int = 20                # steps between progress-bar loss updates
    resume: bool = True                # continue from the run's checkpoints when they exist


@dataclass
class EvalConfig:
    """Re-ID evaluation (paper section 4.1: mAP and CMC, no re-ranking)."""

    metric: str = "euclidean"          # distance on the BN-neck features after L2 normalisation
    max_rank: int = 50
    eval_chunk_size: int = 1024


@dataclass
class RunConfig:
    """The whole run. Sections are plain attributes; keys are unique across sections."""

    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda
    reports_dir: str = "reports"
    run_dir: str = ""                  # where a run's notebooks write ("" = <reports_dir>/<protocol>/interactive)
    num_examples: int = 8              # images shown in example figures
    data: DataConfig = field(default_factory=DataConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ---- flat view ---------------------------------------------------------------------
    def to_flat(self) -> dict[str, Any]:
        """All keys as one flat dict (the papermill parameters)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out.update(dataclasses.asdict(value))
            else:
                out[f.name] = value
        return out

    def to_nested(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_of(self, key: str) -> str | None:
        """The section holding ``key`` (``None`` for a top-level key); KeyError when unknown."""
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                if key in {g.name for g in fields(value)}:
                    return f.name
            elif f.name == key:
                return None
        raise KeyError(key)

    def update(self, values: dict[str, Any], source: str = "overrides") -> "RunConfig":
        """Set flat or section-nested keys in place, type-checked; returns ``self``."""
        for key, value in values.items():
            section_names = {f.name for f in fields(self) if dataclasses.is_dataclass(getattr(self, f.name))}
            if key in section_names and isinstance(value, dict):
                self.update(value, source=f"{source} [{key}]")
                continue
            try:
                section = self.section_of(key)
            except KeyError:
                raise ConfigError(_unknown_key_message(key, source, list(self.to_flat()))) from None
            target = self if section is None else getattr(self, section)
            setattr(target, key, _coerce(target, key, value, source))
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}")
        cfg = cls().update(loaded, source=str(path))
        if overrides:
            cfg.update(overrides)
        return cfg

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_nested(), sort_keys=False)
        if path is not None:
            from .io import atomic_path

            with atomic_path(path) as tmp:
                tmp.write_text(text)
        return text


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` (CLI ``-p``) to a dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _unknown_key_message(key: str, source: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{source}: unknown config key {key!r}{hint} (known keys: {', '.join(sorted(known))})"


def _coerce(obj: Any, key: str, value: Any, source: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    expected = hints[key]
    origin = typing.get_origin(expected)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (int, float, str, bool):
        if isinstance(value, bool) and expected is not bool:
            raise ConfigError(f"{source}: key {key!r} expects {expected.__name__}, got {value!r}")
        if not isinstance(value, expected):
            raise ConfigError(f"{source}: key {key!r} expects {expected.__name__}, got {value!r}")
        return value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        return type(getattr(obj, key))(value) if getattr(obj, key) is not None else list(value)
    return value
