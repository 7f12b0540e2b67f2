"""Stage 2 (paper 3.1.2, 3.2, 3.3): train the image encoder with AM-MSA; text side frozen.

Per epoch: rebuild VPM-2 from the whole training set (features encoded with the pseudo-label
masks, as the paper says), then P x K batches with flip-only augmentation applied to image and
mask together; loss = L_id + L_imp + L_i2tce + L_mask (eq. 11); VPM-2 updated with the hardest
sample of each identity after every step (eq. 3).

The loss of one batch is :func:`stage2_losses` (the loop calls it; a notebook can call it on any
batch). Recipe keys (``muva_core.config.RECIPES``) it and the loop follow:

=================  ==============================================  =========================================
key                workbook                                        reference (RikoLi/MUVA @ 8965263)
=================  ==============================================  =========================================
i2tce_similarity   mean of per-granularity cosines of the pre-BN   raw dot product of the pre-BN feature and
                   feature and the text prototypes                 the raw text prototypes (NORM_I2TCE False)
i2tce_logit_scale  0 = CLIP's logit scale (~100 for ViT-B/16)      1.0 (1 / I2TCE_TAU)
mask_dice_smooth   1.0                                             1e-3 (losses/mask_loss.py: 1e-6 / scale 1000)
rmp_weight_decay   -1 = weight_decay                               0 (engine/solvers/optimizers.py 114-115)
lr_schedule        stepped after each epoch                        stepped at the start, epochs from 1
amp_dtype          bfloat16 autocast                               float16 autocast + GradScaler (CPU: precision.py)
=================  ==============================================  =========================================

Under ``recipe: reference`` each step also calls the BN neck a second time on the same pre-BN feature, as
the reference's stage-2 loop does (``proj_feat_bn = model.bnneck(proj_feat)`` for the memory loss after the
model's own call, engine/coop_trainers.py): in training mode the output is the same, but the running mean and
variance take two momentum updates a step (:func:`second_bn_neck_call`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.samples import Sample
from ..data.sampler import RandomIdentitySampler
from ..data.transforms import ReIDImageDataset, build_train_transform, preload_images, preload_wanted
from ..eval.features import extract_features
from ..eval.masks import mask_iou
from ..model.factory import part_indices
from .losses import MUVALoss, normalize_per_granularity
from .memory import PrototypeMemory, all_reduce_sum
from .schedulers import WarmupMultiStepLR, make_param_groups, step_after_epoch, step_before_epoch
from .stage1 import amp_settings, backward_step, grad_scaler, scaler_fields

RMP_PATTERN = r"\brmp\b|\.rmp\."
"""Parameter names of the RMP (10x learning rate; ``rmp_weight_decay``)."""


def train_loader(samples: Sequence[Sample], masks, cfg, rank: int = 0, world_size: int = 1, progress: bool = False):
    """P x K loader; flip (and, for Table 11, crop + erasing) moves the part mask with the image. With
    ``data.cache_images`` (:func:`preload_wanted`) the images are decoded and resized once, here
    (:func:`preload_images`)."""
    from ..config import CHOICES

    if cfg.train.augment not in CHOICES["augment"]:
        raise ValueError(f"augment: expected one of {', '.join(CHOICES['augment'])}, got {cfg.train.augment!r}")
    steps = set(cfg.train.augment.split("+"))
    transform = build_train_transform((cfg.data.height, cfg.data.width), cfg.grounding.patch_size,
                                      random_crop="crop" in steps, random_erasing="erase" in steps,
                                      norm=cfg.data.norm, color_jitter="color" in steps)
    sampler = RandomIdentitySampler(samples, num_instances=cfg.data.num_instances,
                                    batch_size=cfg.data.batch_size // world_size, seed=cfg.seed,
                                    rank=rank, world_size=world_size)
    preload = preload_wanted(cfg.data.cache_images, len(samples), transform.size)
    images = preload_images(samples, transform, progress=progress) if preload else None
    loader = DataLoader(ReIDImageDataset(samples, transform, masks=masks, images=images),
                        batch_sampler=_BatchSampler(sampler),
                        num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=False)
    return loader, sampler


class _BatchSampler:
    """Groups the identity sampler's flat index stream into its P x K batches."""

    def __init__(self, sampler: RandomIdentitySampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        yield from self.sampler.batches()

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.batch_size


def build_optimizer(model, cfg):
    """Adam with the RMP group at ``rmp_lr_scale`` x the learning rate (and ``rmp_weight_decay`` when it is
    not negative), and the warm-up + multi-step schedule."""
    t = cfg.train
    wd = {RMP_PATTERN: t.rmp_weight_decay} if t.rmp_weight_decay >= 0 else None
    groups = make_param_groups(model, t.stage2_lr, t.weight_decay, lr_scale_patterns={RMP_PATTERN: t.rmp_lr_scale},
                               weight_decay_patterns=wd)
    optimizer = torch.optim.Adam(groups, lr=t.stage2_lr, weight_decay=t.weight_decay)
    warm = min(t.warmup_epochs, max(0, t.stage2_epochs - 1))
    scheduler = WarmupMultiStepLR(optimizer, milestones=t.lr_milestones, gamma=t.lr_gamma,
                                  warmup_factor=t.warmup_factor, warmup_epochs=warm)
    return optimizer, scheduler


def _loss(cfg, use_mask: bool, logit_scale: float | None) -> MUVALoss:
    t = cfg.train
    scale = t.i2tce_logit_scale if t.i2tce_logit_scale > 0 else logit_scale
    if scale is None:
        if not t.vision_only:
            raise ValueError("i2tce_logit_scale = 0 means CLIP's logit scale: pass logit_scale="
                             "float(model.clip_logit_scale)")
        scale = 1.0
    return MUVALoss(use_i2tce=not t.vision_only, use_mask=use_mask, weights={"mask": t.mask_loss_weight},
                    id_epsilon=t.id_epsilon, imp_temperature=t.imp_temperature, i2tce_logit_scale=float(scale),
                    i2tce_normalize=False, mask_dice=t.mask_dice, mask_smooth=t.mask_dice_smooth)


def build_loss(cfg, model) -> MUVALoss:
    """The stage-2 criterion of ``model`` (inputs prepared by the caller; :func:`stage2_losses` does both)."""
    return _loss(cfg, model.encoder.rmp is not None, float(model.clip_logit_scale))


def stage2_losses(output, id_logits: torch.Tensor, pids: torch.Tensor, memory, text_prototypes: torch.Tensor | None,
                  mask_targets: torch.Tensor | None, cfg, *, logit_scale: float | None = None) -> dict[str, torch.Tensor]:
    """The stage-2 loss of one batch (eq. 11): ``{"id", "imp", "i2tce", "mask_bce", "mask_dice", "total"}``.

    output: the encoder's :class:`~muva_core.model.muva.MUVAOutput` of the batch (predicted masks: its
        ``mask_logits`` are supervised when the RMP ran); id_logits: the classifier's logits ``[B, C]``;
        pids: ``[B]``; memory: VPM-2 (a :class:`PrototypeMemory`, or a ``[C, d]`` tensor with
        ``imp_temperature``); text_prototypes: the raw text features of all identities ``[C, G*E]`` (TPM;
        ``None`` for the vision-only model, whose dict has no ``i2tce``); mask_targets: the pseudo masks
        ``[B, P, N]`` of the configured parts. ``logit_scale`` (CLIP's) is needed when ``i2tce_logit_scale`` is 0.

    L_id: label-smoothed CE of ``id_logits``; L_imp: CE of the L2-normalised BN feature against VPM-2 / tau;
    L_i2tce: label-smoothed CE of ``i2tce_logit_scale x sim(pre-BN feature, text prototypes)``, ``sim`` the
    mean per-granularity cosine (``i2tce_similarity="cosine"``) or the raw dot product (``"dot"``); mask:
    BCE on the logits and soft Dice (smoothing ``mask_dice_smooth``) over all layers; ``total`` the sum
    (mask terms weighted by ``mask_loss_weight``). Terms are float32 (call outside autocast or inside).
    """
    t = cfg.train
    use_mask = bool(output.mask_logits)
    criterion = _loss(cfg, use_mask, logit_scale)
    G = output.granularity_features.shape[1]
    if t.i2tce_similarity == "cosine":
        feats = normalize_per_granularity(output.features.float(), G)
        protos = normalize_per_granularity(text_prototypes.float(), G) if text_prototypes is not None else None
    else:
        feats = output.features.float()
        protos = text_prototypes.float() if text_prototypes is not None else None
    return criterion(
        pids, id_logits=id_logits.float(), features=feats, bn_features=output.bn_features.float(),
        memory=memory, text_prototypes=protos,
        mask_logits=[m.float() for m in output.mask_logits] if use_mask else None,
        mask_targets=mask_targets if use_mask else None,
    )


def second_bn_neck_call(model, output, cfg):
    """Under ``recipe: reference``: ``output`` with ``bn_features`` from a second call of the BN neck on its
    pre-BN ``features`` (the reference's ``model.bnneck(proj_feat)`` before the memory loss), which in training
    mode updates the running statistics a second time; otherwise ``output`` unchanged."""
    if cfg.recipe != "reference":
        return output
    return dataclasses.replace(output, bn_features=model.encoder.bottleneck(output.features))


def rebuild_memory(model, memory: PrototypeMemory, samples, masks, cfg, device, progress: bool) -> None:
    """VPM-2 from the BN features of the whole training set, encoded with the pseudo masks."""
    enc = model.encoder
    mode = "pseudo" if enc.n_parts else None
    feats = extract_features(enc, samples, cfg, device, masks=masks if mode else None, mask_mode=mode,
                             which="bn", normalize=True, progress=progress, desc="VPM-2 rebuild")
    memory.build(feats.to(device), torch.tensor([s.pid for s in samples], device=device))


def train_stage2(model, memory: PrototypeMemory, samples: Sequence[Sample], masks, cfg, device, *,
                 optimizer=None, scheduler=None, start_epoch: int = 0, ddp_model=None, rank: int = 0,
                 world_size: int = 1, monitor: Sequence[Sample] = (), on_epoch_end: Callable | None = None,
                 evaluate: Callable | None = None, progress: bool = True, scaler=None) -> pd.DataFrame:
    """Run stage-2 epochs ``start_epoch..stage2_epochs``; returns the per-epoch history.

    Each row: the mean loss terms, ``train_id_acc`` (the share of the epoch's training images whose identity the
    classifier got right, as they were trained on: augmented, in training mode), ``lr``, ``seconds`` and
    ``rebuild_seconds`` (the VPM-2 rebuild's share). monitor: a few training images whose predicted masks are
    scored against their pseudo labels after each epoch (``mask_iou_<part>`` columns). evaluate: called every
    ``eval_every`` epochs and after the last (rank 0) with the model, returning columns for the row (the target and
    held-out diagnostics of :func:`muva_core.train.run.run_stage2`); it runs with the random state saved and
    restored, so the training is the same with it or without. ``ddp_model`` is the DDP-wrapped ``model`` under
    torchrun (gradients all-reduced; VPM-2 updates gathered from every rank). ``scaler``: the float16
    GradScaler (from a checkpoint when resuming; made here when None and the precision needs one).
    """
    t = cfg.train
    net = ddp_model or model
    if optimizer is None:
        optimizer, scheduler = build_optimizer(model, cfg)
    loader, sampler = train_loader(samples, masks, cfg, rank, world_size, progress=progress and rank == 0)
    idx = part_indices(model.parts)
    text_protos = model.text_prototypes if not t.vision_only else None
    logit_scale = float(model.clip_logit_scale)
    has_mask = model.encoder.rmp is not None
    amp, amp_dtype = amp_settings(device, cfg)
    scaler = scaler if scaler is not None else grad_scaler(device, cfg)
    train_pass = t.memory_rebuild == "train_pass"
    rows = []
    main = rank == 0
    for epoch in range(start_epoch, t.stage2_epochs):
        t0 = time.perf_counter()
        step_before_epoch(scheduler, t.lr_schedule)
        if not (train_pass and memory.is_built):
            rebuild_memory(model, memory, samples, masks, cfg, device, progress and main)
        rebuild_s = time.perf_counter() - t0
        sampler.set_epoch(epoch)
        net.train()
        sums: dict[str, float] = {}
        steps = skipped = correct = seen = 0
        bar = tqdm(loader, desc=f"stage 2 epoch {epoch + 1}/{t.stage2_epochs}", disable=not (progress and main),
                   leave=False)
        for batch in bar:
            images = batch["image"].to(device, non_blocking=True)
            pids = batch["pid"].to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                out, logits = net(images)
                out = second_bn_neck_call(model, out, cfg)
            mask_targets = batch["mask"][:, idx].to(device).float() if has_mask else None
            terms = stage2_losses(out, logits, pids, memory, text_protos, mask_targets, cfg, logit_scale=logit_scale)
            optimizer.zero_grad(set_to_none=True)
            skipped += not backward_step(terms["total"], optimizer, scaler)
            memory.update(out.bn_features.detach().float(), pids, gather=world_size > 1)
            if train_pass:
                memory.accumulate(out.bn_features.detach().float(), pids)
            correct += int((logits.detach().argmax(dim=1) == pids).sum())
            seen += int(pids.numel())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            steps += 1
            if steps % max(1, t.log_every) == 0:
                bar.set_postfix(loss=f"{sums['total'] / steps:.3f}", acc=f"{correct / max(seen, 1):.2f}")
        if train_pass:
            r0 = time.perf_counter()
            memory.rebuild_from_accumulated(gather=world_size > 1)
            rebuild_s += time.perf_counter() - r0
        step_after_epoch(scheduler, t.lr_schedule)
        if world_size > 1:
            correct, seen = (int(v) for v in all_reduce_sum(torch.tensor([correct, seen], device=device)).tolist())
        row = {"epoch": epoch + 1, **{f"loss_{k}": v / max(steps, 1) for k, v in sums.items()},
               "train_id_acc": correct / max(seen, 1), "lr": optimizer.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0, "rebuild_seconds": rebuild_s, **scaler_fields(scaler, skipped)}
        if monitor and model.encoder.rmp is not None and main:
            _, probs = extract_features(model.encoder, monitor, cfg, device, return_masks=True, progress=False)
            target = torch.as_tensor(np.stack([masks.get(s.key) for s in monitor]))[:, idx]
            for part, v in zip(model.parts, mask_iou(probs, target, cfg.model.mask_threshold).tolist()):
                row[f"mask_iou_{part}"] = v
        last = epoch + 1 == t.stage2_epochs
        if evaluate is not None and main and t.eval_every > 0 and ((epoch + 1) % t.eval_every == 0 or last):
            with torch.random.fork_rng(devices=[]):
                row.update(evaluate(model))
        rows.append(row)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row, optimizer, scheduler)
    return pd.DataFrame(rows)
