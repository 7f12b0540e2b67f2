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
  at :func:`~muva_core.model.checkpoints.config_clip_path` = ``<data_root>/clip/clip-<backbone>-seed0.safetensors``:
  the checks before a run (:func:`muva_core.pretrain.provision.ensure_pretrained_clip`, called by ``preflight``)
  make it when it is missing, reuse it when its settings are the same, and refuse it when they differ.

Modules: :mod:`~muva_core.pretrain.config` (the settings, the reuse key), :mod:`~muva_core.pretrain.data` (images,
masks, batches), :mod:`~muva_core.pretrain.model` (token dropping, optimiser, text encoding),
:mod:`~muva_core.pretrain.loop` (the training loop, resume), :mod:`~muva_core.pretrain.zeroshot` (zero-shot
evaluation and its report lines), :mod:`~muva_core.pretrain.files` (checkpoint, report and resume files; the
checkpoint's name lives in :mod:`muva_core.model.checkpoints`), :mod:`~muva_core.pretrain.provision` (the CLIP a
run configuration starts from). This package re-exports their public names for users and notebooks; the library
imports them from the submodules.

Usage::

    path = pretrain_clip("data/clip", backbone="small", seed=0)      # a few minutes on 2 CPU cores
    # then: muva train -p pretrained=pretrain-clip  (the same file), or -p checkpoint_path=<path> -p pretrained=none
"""
from __future__ import annotations

from ..model.checkpoints import CONFIG_CLIP_SEED, PRETRAINED_TAG, config_clip_path
from .config import CAPTIONS_VERSION, DEFAULT_EPOCHS, PRETRAIN_FORMAT, PRETRAIN_FORMAT_VERSION, PretrainConfig
from .data import Batch, PretrainImages, load_pretrain_images, make_batch, masked_part_images, normalise_images
from .files import (CheckpointExistsError, checkpoint_file, partial_file, pretrain_data_root, read_pretrain_info,
                    read_pretrain_report, report_file, save_clip)
from .loop import contrastive_step, pretrain_clip
from .model import TokenSelect, build_pretrain_clip, encode_text, make_optimizer
from .provision import (CONFIG_CLIP_OPTIONS, clip_start, config_clip_spec, ensure_pretrained_clip, pretrain_clip_summary,
                        uses_pretrain_clip)
from .zeroshot import evaluate_zero_shot, evaluate_zero_shot_domains, format_zero_shot_report, zero_shot_accuracy

__all__ = [
    "CheckpointExistsError",
    "PRETRAIN_FORMAT",
    "PRETRAIN_FORMAT_VERSION",
    "CAPTIONS_VERSION",
    "DEFAULT_EPOCHS",
    "PretrainConfig",
    "PretrainImages",
    "pretrain_data_root",
    "checkpoint_file",
    "report_file",
    "read_pretrain_report",
    "load_pretrain_images",
    "normalise_images",
    "masked_part_images",
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
    "format_zero_shot_report",
    "pretrain_clip",
    "read_pretrain_info",
    "save_clip",
    "partial_file",
    "PRETRAINED_TAG",
    "CONFIG_CLIP_SEED",
    "CONFIG_CLIP_OPTIONS",
    "config_clip_spec",
    "config_clip_path",
    "uses_pretrain_clip",
    "ensure_pretrained_clip",
    "clip_start",
    "pretrain_clip_summary",
]
