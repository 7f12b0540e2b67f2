"""Typed run configuration: one dataclass per step, YAML files per protocol, flat keys.

Every field name is unique across the sections, so a configuration flattens to one
``{key: value}`` dict. Those flat keys are, at once, the YAML keys (nested by section or
flat), the notebooks' papermill parameters and the CLI's ``-p key=value`` overrides.
Unknown keys fail with a message that names the file and suggests the closest key.

Recipes. ``recipe`` names a set of defaults for the training-recipe keys (:data:`RECIPES`):
``workbook`` (the project's own choices, the dataclass defaults) or ``reference`` (the authors' code,
RikoLi/MUVA at commit 8965263). Setting ``recipe`` writes its value into every recipe key that was not
given explicitly; a key given explicitly (in the YAML file, an override, a notebook parameter) wins,
whatever the order. The resolved values are the fields themselves, so :meth:`RunConfig.to_flat` (and the
run folder's config hash) shows what runs: ``recipe: reference`` and ``recipe: reference`` plus a key set
to the value the recipe gives it name the same run.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .paths import portable, project_root


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says where and why."""


@dataclass
class DataConfig:
    """Which protocol, where its data lives, and how images are prepared."""

    protocol: str = "synth:A2B"
    sources: list = field(default_factory=list)  # dataset names or dataset files (.yaml): with target, the protocol
    target: str = ""                   # (written into `protocol` as SOURCE+SOURCE->TARGET; docs/own-images.md)
    data_root: str = "data"            # real datasets: folder holding Market-1501-v15.09.15/, MSMT17_V1/, ...
    synth_root: str = "data/synthetic"  # where `muva synth` writes (and the synthetic protocols read)
    synth_scale: str = "default"       # small | default | evidence | large | reid (data.synthetic.SCALES)
    synth_seed: int = 0                # seed of the synthetic data and of the simulated expert (fixed across run seeds)
    height: int = 256
    width: int = 128
    norm: str = "clip"                 # clip | half (the reference code's mean = std = 0.5); recipe key
    test_resize: str = "bicubic"       # resize of test / feature-extraction images: bicubic | bilinear; recipe key
    num_instances: int = 4             # K images per identity in a P x K batch
    batch_size: int = 64               # P x K
    num_workers: int = 2
    cache_images: str = "auto"         # stage 2 decodes + resizes the training images once and keeps them in memory
                                       # (same pixels; 98 KB an image at 256x128): auto = when they take <= 2 GiB
                                       # (Market-1501 1.3 GB yes, MSMT17 3.2 GB no) | always | never


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
    masks_file: str = ""               # part masks of every source training image made by `muva import-masks` (the
                                       # authors' released masks): grounding, calibration and voting are skipped


@dataclass
class ModelConfig:
    """The MUVA model (paper 3.1, 3.2, 4.2) and every ablation switch of Tables 5-8, 10, 12."""

    backbone: str = "vit-b-16"         # vit-b-16 (the paper) | small | mini | tiny (random weights, CPU tests/demos)
    pretrained: str = "auto"           # open_clip tag (openai); auto = openai for vit-b-16, random for small/tiny; none;
                                       # pretrain-clip = the CLIP of `muva pretrain-clip`, made when missing (muva_core.pretrain)
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
    # recipe keys (RECIPES): workbook value first, then the reference code's
    prompt_template: str = "paper"     # paper ("A photo of a X X X X person.") | reference (no period, "a ... legs")
    local_pos_embed: str = "cls"       # cls (local tokens use the CLS positional row) | separate (own trained copies)
    rmp_activation: str = "gelu"       # gelu | quickgelu (the RMP MLP's activation)
    rmp_qkv_bias: bool = True          # biases on the RMP cross-attention's q/k/v projections (reference: none)
    rmp_init: str = "xavier"           # xavier (q/k/v; PyTorch default elsewhere) | trunc_normal (std 0.02, MLP biases 0)


@dataclass
class TrainConfig:
    """Two-stage training (paper 3.3, 4.2). Defaults are the paper's; synthetic configs shrink them."""

    vision_only: bool = False          # Table 6: no stage 1, no i2tce
    stage1_epochs: int = 120
    stage1_lr: float = 3.5e-4
    stage1_warmup_epochs: int = 5
    stage1_batch_ids: int = 64         # identities per stage-1 step
    cmp_temperature: float = 0.0       # 0 = 1 / CLIP's logit scale (see docs/recipes.md); 1.0 = the paper's eq. 1; recipe key
    cmp_normalize: str = "per_granularity"  # L_cmp / VPM-1 normalisation: per_granularity (/ sqrt(G)) | whole vector
    vpm1_mean: str = "normalized"      # VPM-1 averages per-granularity normalised features | raw features
    stage1_sampling: str = "identities"  # identities (stage1_batch_ids distinct ids a step) | images (P x K images)
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
    i2tce_logit_scale: float = 0.0     # 0 = CLIP's logit scale; 1.0 = the paper's eq. 4 / 1 / I2TCE_TAU; recipe key
    i2tce_similarity: str = "cosine"   # cosine (mean of per-granularity cosines) | dot (raw pre-BN feature . raw text)
    rmp_weight_decay: float = -1.0     # weight decay of the RMP parameters; negative = weight_decay (reference: 0)
    mask_loss_weight: float = 1.0
    mask_dice: str = "soft"            # soft | elementwise (eq. 8 as printed)
    mask_dice_smooth: float = 1.0      # smoothing of the soft Dice (reference: 1e-3)
    lr_schedule: str = "workbook"      # workbook (stepped after each epoch, from 0) | reference (at the start, from 1)
    augment: str = "flip"              # flip (the paper) | flip+crop+erase (Table 11) | ...+color (photometric jitter)
    amp: bool = True                   # autocast on GPU; on CPU as cpu_amp says
    cpu_amp: str = "native"            # CPU autocast: native (only where the CPU computes amp_dtype natively, else
                                       # float32: see muva_core/precision.py) | always | never; how a run is carried out
    amp_dtype: str = "bfloat16"        # bfloat16 | float16 (with a GradScaler, the reference); recipe key
    log_every: int = 20                # steps between progress-bar loss updates
    resume: bool = True                # continue from the run's checkpoints when they exist
    memory_rebuild: str = "full"       # VPM-2 each epoch: full (a feature pass over the training set, the paper) |
                                       # train_pass (the features the epoch's training steps computed; no extra pass)
    eval_every: int = 0                # every N stage-2 epochs evaluate the target and the source's held-out split
                                       # into the history (a diagnostic: nothing is chosen on it); 0 = off


@dataclass
class EvalConfig:
    """Re-ID evaluation (paper section 4.1: mAP and CMC, no re-ranking)."""

    metric: str = "euclidean"          # distance on the BN-neck features after L2 normalisation
    max_rank: int = 50
    eval_chunk_size: int = 1024
    rerank: str = "none"               # none | k-reciprocal (Zhong et al. 2017; not in the paper's tables)
    k1: int = 20                       # k-reciprocal re-ranking: neighbours,
    k2: int = 6                        # query-expansion neighbours,
    lambda_value: float = 0.3          # weight of the original distance


@dataclass
class RunConfig:
    """The whole run. Sections are plain attributes; keys are unique across sections."""

    seed: int = 0
    recipe: str = "workbook"           # workbook | reference: defaults of the recipe keys (RECIPES); explicit keys win
    device: str = "auto"               # auto | cpu | cuda
    reports_dir: str = "reports"
    run_dir: str = ""                  # the run folder ("" = <reports_dir>/<protocol slug>/run-<config hash>)
    num_examples: int = 8              # images shown in example figures
    data: DataConfig = field(default_factory=DataConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # recipe keys given explicitly (they win over the recipe); not a field: not in to_flat / the hash
        self._explicit: set[str] = set()

    # ---- recipes -------------------------------------------------------------------------
    def apply_recipe(self) -> "RunConfig":
        """Write ``RECIPES[self.recipe]`` into every recipe key not given explicitly; returns ``self``."""
        for key, value in RECIPES[self.recipe].items():
            if key not in self._explicit:
                section = self.section_of(key)
                setattr(self if section is None else getattr(self, section), key, copy.deepcopy(value))
        return self

    def explicit_keys(self) -> set[str]:
        """The recipe keys that were set explicitly (and so are not taken from the recipe)."""
        return set(self._explicit)

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
        """Set flat or section-nested keys in place, type-checked; returns ``self``. ``sources`` / ``target`` given
        here rewrite ``protocol`` (:meth:`_compose_protocol`); a ``protocol`` given without them clears them."""
        for key, value in values.items():
            section_names = {f.name for f in fields(self) if dataclasses.is_dataclass(getattr(self, f.name))}
            if key in section_names and isinstance(value, dict):
                self.update(value, source=f"{source} [{key}]")
                continue
            try:
                section = self.section_of(key)
            except KeyError:
                raise ConfigError(unknown_key_message(key, source, list(self.to_flat()))) from None
            target = self if section is None else getattr(self, section)
            value = _coerce(target, key, value, source)
            check_value(key, value, source)
            setattr(target, key, value)
            if key in RECIPE_KEYS:
                self._explicit.add(key)
            elif key == "recipe":
                self.apply_recipe()
        if "protocol" in values and not {"sources", "target"} & set(values):
            self.data.sources, self.data.target = [], ""
        elif self.data.sources or self.data.target:
            self._compose_protocol(source)
        return self

    def _compose_protocol(self, source: str) -> None:
        """``sources`` / ``target`` name the protocol: ``protocol`` becomes ``SOURCE+SOURCE->TARGET`` (the half not
        given is the current protocol's), dataset files stored relative to the project root."""
        from .data.protocols import compose_protocol, protocol_datasets

        d = self.data
        try:
            sources, target = protocol_datasets(d.protocol) if not (d.sources and d.target) else ([], "")
            d.protocol = compose_protocol(d.sources or sources, d.target or target)
        except ValueError as err:
            keys = " and ".join(k for k in ("sources", "target") if getattr(d, k))
            raise ConfigError(f"{source}: key {keys}: {err}") from None
        d.sources, d.target = protocol_datasets(d.protocol)

    def validate(self, source: str = "configuration") -> "RunConfig":
        """Checks between keys (each key's own range is checked when it is set); returns ``self``."""
        d, g = self.data, self.grounding
        if d.batch_size % d.num_instances:
            raise ConfigError(f"{source}: batch_size ({d.batch_size}) must be a multiple of num_instances "
                              f"({d.num_instances}): a P x K batch holds K = num_instances images of each identity")
        for key in ("height", "width"):
            if getattr(d, key) % g.patch_size:
                raise ConfigError(f"{source}: {key} ({getattr(d, key)}) must be a multiple of patch_size ({g.patch_size})")
        milestones = list(self.train.lr_milestones)
        if milestones != sorted(milestones):
            raise ConfigError(f"{source}: lr_milestones must be increasing, got {milestones}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None,
                  require_protocol: bool = False) -> "RunConfig":
        """A configuration from a YAML file (flat or sectioned keys), then ``overrides``; checked."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}")
        if not loaded:
            raise ConfigError(f"{path}: the config file is empty; it should set at least `protocol:` "
                              f"(see configs/*.yaml)")
        named = {"protocol", "sources", "target"}
        data = loaded.get("data") if isinstance(loaded.get("data"), dict) else {}
        if require_protocol and not named & (set(loaded) | set(data) | set(overrides or {})):
            raise ConfigError(f"{path}: the config names no protocol: add `protocol: <name>` (see `muva protocols`) "
                              f"or `sources: [...]` and `target: ...` (dataset names or files), or pass --protocol")
        cfg = cls().update(loaded, source=str(path))
        if overrides:
            cfg.update(overrides)
        return cfg.validate(str(path))

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


RECIPES: dict[str, dict[str, Any]] = {
    # the project's own choices (the dataclass defaults: RunConfig() is the workbook recipe)
    "workbook": {
        "norm": "clip", "test_resize": "bicubic",
        "prompt_template": "paper", "local_pos_embed": "cls",
        "rmp_activation": "gelu", "rmp_qkv_bias": True, "rmp_init": "xavier",
        "cmp_normalize": "per_granularity", "cmp_temperature": 0.0, "vpm1_mean": "normalized",
        "stage1_sampling": "identities",
        "i2tce_similarity": "cosine", "i2tce_logit_scale": 0.0,
        "rmp_weight_decay": -1.0, "mask_dice_smooth": 1.0, "lr_schedule": "workbook", "amp_dtype": "bfloat16",
    },
    # the authors' code, RikoLi/MUVA @ 8965263 (file and line of each value in docs/recipes.md)
    "reference": {
        "norm": "half",                                   # configs/*.yml PIXEL_MEAN = PIXEL_STD = 0.5
        "test_resize": "bilinear",                        # test transforms: T.Resize's default interpolation
        "prompt_template": "reference",                   # model/visual_language_encoder.py 50-79
        "local_pos_embed": "separate",                    # visual_language_encoder.py 154-158
        "rmp_activation": "quickgelu", "rmp_qkv_bias": False, "rmp_init": "trunc_normal",  # model/ammsa.py, utils.py
        "cmp_normalize": "whole", "cmp_temperature": 1.0,  # engine/coop_trainers.py 98-106, CLUSTER_NCE_TEMP
        "vpm1_mean": "raw",                               # coop_trainers.py 54-69, engine/utils.py
        "stage1_sampling": "images",                      # engine/utils.py pk_sampling
        "i2tce_similarity": "dot", "i2tce_logit_scale": 1.0,  # coop_trainers.py 259-271 (NORM_I2TCE, I2TCE_TAU)
        "rmp_weight_decay": 0.0,                          # engine/solvers/optimizers.py 114-115
        "mask_dice_smooth": 1e-3,                         # losses/mask_loss.py 50-68
        "lr_schedule": "reference",                       # scheduler.step(epoch) at the start of each epoch
        "amp_dtype": "float16",                           # amp.autocast(float16) + GradScaler
    },
}
"""Named training recipes: defaults of the recipe keys (``recipe: <name>``; explicit keys win)."""

RECIPE_KEYS: frozenset[str] = frozenset(RECIPES["workbook"])
"""The keys a recipe sets."""

CHOICES: dict[str, tuple[str, ...]] = {
    "recipe": tuple(RECIPES),
    "synth_scale": ("small", "default", "evidence", "large", "reid"),           # data.synthetic.SCALES
    "norm": ("clip", "half"),
    "test_resize": ("bicubic", "bilinear"),
    "backend": ("synthetic", "cogvlm", "florence2", "owlv2", "grounding_dino", "vitpose"),  # grounding.BACKENDS
    "calib_method": ("robust_z", "quantile"),
    "calib_windows": ("stripes", "data"),
    "vote_rule": ("center", "coverage"),
    "backbone": ("vit-b-16", "small", "mini", "tiny"),                             # model.backbone.NAMED_CONFIGS
    "mask_mode": ("predicted", "stripe"),
    "mask_dice": ("soft", "elementwise"),
    "augment": ("flip", "flip+crop+erase", "flip+color", "flip+crop+erase+color"),   # +color: photometric jitter
    "metric": ("euclidean", "cosine"),                                     # eval.metrics.METRICS
    "rerank": ("none", "k-reciprocal"),
    "prompt_template": ("paper", "reference"),                             # model.prompts.TEMPLATE_SETS
    "local_pos_embed": ("cls", "separate"),
    "rmp_activation": ("gelu", "quickgelu"),
    "rmp_init": ("xavier", "trunc_normal"),
    "cmp_normalize": ("per_granularity", "whole"),
    "vpm1_mean": ("normalized", "raw"),
    "stage1_sampling": ("identities", "images"),
    "i2tce_similarity": ("cosine", "dot"),
    "lr_schedule": ("workbook", "reference"),
    "amp_dtype": ("bfloat16", "float16"),
    "cpu_amp": ("native", "always", "never"),                               # precision.CPU_AMP
    "memory_rebuild": ("full", "train_pass"),
    "cache_images": ("auto", "always", "never"),                            # data.transforms.CACHE_IMAGES
}
"""Keys with a fixed set of values (tests tie each list to the registry it mirrors)."""

# (low, high, low inclusive, high inclusive); None = unbounded
_INT_AT_LEAST_0 = (0, None, True, True)
_INT_AT_LEAST_1 = (1, None, True, True)
_POSITIVE = (0.0, None, False, True)
_NON_NEGATIVE = (0.0, None, True, True)
_FRACTION_OPEN = (0.0, 1.0, False, False)
RANGES: dict[str, tuple] = {
    "seed": _INT_AT_LEAST_0, "num_examples": _INT_AT_LEAST_1, "synth_seed": _INT_AT_LEAST_0,
    "height": (16, None, True, True), "width": (16, None, True, True),
    "num_instances": _INT_AT_LEAST_1, "batch_size": _INT_AT_LEAST_1, "num_workers": _INT_AT_LEAST_0,
    "ground_batch_size": _INT_AT_LEAST_0, "vote_min_coverage": (0.0, 1.0, False, True),
    "patch_size": _INT_AT_LEAST_1, "rmp_heads": _INT_AT_LEAST_1, "mask_threshold": _FRACTION_OPEN,
    "n_ctx": _INT_AT_LEAST_1,
    "stage1_epochs": _INT_AT_LEAST_0, "stage1_lr": _POSITIVE, "stage1_warmup_epochs": _INT_AT_LEAST_0,
    "stage1_batch_ids": _INT_AT_LEAST_1, "cmp_temperature": _NON_NEGATIVE,
    "stage2_epochs": _INT_AT_LEAST_1, "stage2_lr": _POSITIVE, "weight_decay": _NON_NEGATIVE,
    "rmp_lr_scale": _POSITIVE, "warmup_epochs": _INT_AT_LEAST_0, "warmup_factor": (0.0, 1.0, False, True),
    "lr_gamma": (0.0, 1.0, False, True), "id_epsilon": (0.0, 1.0, True, False), "imp_temperature": _POSITIVE,
    "memory_momentum": (0.0, 1.0, True, True), "i2tce_logit_scale": _NON_NEGATIVE,
    "mask_loss_weight": _NON_NEGATIVE, "log_every": _INT_AT_LEAST_1, "eval_every": _INT_AT_LEAST_0,
    "rmp_weight_decay": (-1.0, None, True, True), "mask_dice_smooth": _POSITIVE,
    "max_rank": _INT_AT_LEAST_1, "eval_chunk_size": _INT_AT_LEAST_1,
    "k1": _INT_AT_LEAST_1, "k2": _INT_AT_LEAST_1, "lambda_value": (0.0, 1.0, True, True),
}
"""The allowed range of every numeric key, checked when the key is set."""


def _range_text(low, high, low_inc, high_inc) -> str:
    if high is None:
        return f">= {low}" if low_inc else f"> {low}"
    return f"in {'[' if low_inc else '('}{low}, {high}{']' if high_inc else ')'}"


def check_value(key: str, value: Any, source: str = "configuration") -> None:
    """Raise :class:`ConfigError` naming ``key`` when ``value`` is outside its range or choices."""
    if key in CHOICES and value not in CHOICES[key]:
        close = difflib.get_close_matches(str(value), CHOICES[key], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source}: key {key!r} must be one of {', '.join(CHOICES[key])}, got {value!r}{hint}")
    if key == "device" and not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(value)):
        raise ConfigError(f"{source}: key 'device' must be auto, cpu, cuda or cuda:N, got {value!r}")
    if key == "granularity" and not re.fullmatch(r"G(\+H)?(\+U)?(\+L)?", str(value)):
        raise ConfigError(f"{source}: key 'granularity' must be G followed by any of +H, +U, +L in that order "
                          f"(e.g. G+H+U+L, Table 5), got {value!r}")
    if key == "sources" and not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{source}: key 'sources' must be a list of dataset names or dataset files (.yaml), "
                          f"got {value!r}")
    if key == "lr_milestones":
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            raise ConfigError(f"{source}: key 'lr_milestones' must be a list of epochs >= 1, got {value!r}")
    if key in RANGES:
        low, high, low_inc, high_inc = RANGES[key]
        ok = (value >= low if low_inc else value > low) if low is not None else True
        if high is not None:
            ok = ok and (value <= high if high_inc else value < high)
        if not ok or value != value:  # NaN fails every comparison but one
            raise ConfigError(f"{source}: key {key!r} must be {_range_text(low, high, low_inc, high_inc)}, got {value!r}")


def unknown_key_message(key: str, source: str, known: list[str], list_known: bool = True) -> str:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    listing = f" (known keys: {', '.join(sorted(known))})" if list_known else ""
    return f"{source}: unknown config key {key!r}{hint}{listing}"


def _coerce(obj: Any, key: str, value: Any, source: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    expected = hints[key]
    origin = typing.get_origin(expected)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if expected in (int, float, str, bool):
        if isinstance(value, bool) and expected is not bool:
            choices = f" (one of {', '.join(CHOICES[key])})" if key in CHOICES else ""
            raise ConfigError(f"{source}: key {key!r} expects {expected.__name__}{choices}, got {value!r}")
        if not isinstance(value, expected):
            raise ConfigError(f"{source}: key {key!r} expects {expected.__name__}, got {value!r}")
        return value
    if key == "sources" and isinstance(value, str):   # -p sources=a.yaml or a.yaml+b.yaml
        return [v.strip() for v in value.split("+")]
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        return type(getattr(obj, key))(value) if getattr(obj, key) is not None else list(value)
    return value


# ---- identity: what a configuration trains (its run folder is named by its hash) ----------------
PATH_KEYS = ("data_root", "synth_root", "cache_dir", "reports_dir", "run_dir", "checkpoint_path", "masks_file")
"""Config keys that hold file-system paths (relative ones are relative to the project root)."""

OPERATIONAL_KEYS = frozenset({
    "run_dir", "reports_dir", "resume", "device", "num_workers", "log_every", "num_examples", "ground_batch_size",
    "cpu_amp", "eval_every", "cache_images",
})
"""Keys that say how a run is carried out, not what it trains."""

OMITTED_AT_DEFAULT = {"masks_file": "", "memory_rebuild": "full"}
"""Keys left out of a configuration's identity while they hold this value: keys added after run folders were
named, so that those folders keep their names."""

SPELLED_IN_PROTOCOL = frozenset({"sources", "target"})
"""Keys written into ``protocol`` (``SOURCE+SOURCE->TARGET``): the hash counts them there, once, so run folders
named before these keys existed keep their names."""

EVAL_SECTION = "eval"
"""Evaluation keys do not change the trained model either: a resumed run re-evaluates with the new ones."""



def portable_flat(cfg: RunConfig, root: Path | None = None) -> dict[str, Any]:
    """The flat configuration with every path key in its portable (root-relative) form."""
    root = root or project_root()
    flat = cfg.to_flat()
    for key in PATH_KEYS:
        if flat.get(key):
            flat[key] = portable(flat[key], root)
    return flat


def identity(cfg: RunConfig) -> dict[str, Any]:
    """The keys that decide what a run trains (all but the operational and evaluation keys), paths portable."""
    return {k: v for k, v in portable_flat(cfg).items()
            if k not in OPERATIONAL_KEYS and k not in SPELLED_IN_PROTOCOL and cfg.section_of(k) != EVAL_SECTION
            and not (k in OMITTED_AT_DEFAULT and v == OMITTED_AT_DEFAULT[k])}


def config_hash(cfg: RunConfig) -> str:
    """8 hex digits naming what a configuration trains (:func:`identity`): runs that differ only in how they
    are carried out (device, workers, ``resume``) or evaluated share a folder."""
    return hashlib.sha1(json.dumps(identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]


def config_differences(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (old value, new value)}`` for the keys of :func:`identity` that differ."""
    a, b = identity(old), identity(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def store_portable_paths(cfg: RunConfig) -> RunConfig:
    """Rewrite ``cfg``'s path keys in their portable form (what a run folder's ``config.yaml`` holds, so the
    folder reopens from any working directory); returns ``cfg``."""
    root = project_root()
    values = {k: portable(v, root) for k, v in cfg.to_flat().items() if k in PATH_KEYS and v}
    return cfg.update(values, source="paths")


def protocol_config_path(protocol: str) -> Path:
    """``configs/<protocol slug>.yaml`` under the project root (the protocol checked against the registry)."""
    from .data.protocols import get_protocol, protocol_slug
    from .paths import config_dir

    return config_dir() / f"{protocol_slug(get_protocol(protocol).name)}.yaml"


def resolve_config(protocol: str | None = None, config: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> RunConfig:
    """The configuration of a run, checked before any work: the config file given (relative to the working
    directory, else to the project root), else ``configs/<protocol slug>.yaml`` of the protocol (given, in
    the overrides, or the default ``synth:A2B``) when it exists, else the defaults; then the overrides. An
    empty file, a file that names no protocol (and none given), an unknown protocol or key, and a value out
    of its range are errors that name the file and the key."""
    from .data.protocols import get_protocol

    overrides = dict(overrides or {})
    if protocol:
        overrides["protocol"] = protocol
    if config:
        path = Path(config).expanduser()
        if not path.is_file():
            from .paths import resolve

            path = resolve(config) if resolve(config).is_file() else path
        cfg = RunConfig.from_yaml(path, overrides, require_protocol=True)
    else:
        name = overrides.get("protocol", DataConfig.protocol)
        if not isinstance(name, str):
            raise ConfigError(f"overrides: key 'protocol' expects str, got {name!r}")
        path = protocol_config_path(name)
        cfg = RunConfig.from_yaml(path, overrides) if path.is_file() else RunConfig().update(overrides).validate()
    get_protocol(cfg.data.protocol)  # unknown protocol: fail before any work
    return cfg
