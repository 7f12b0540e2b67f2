"""Stage 2 (paper 3.1.2, 3.2, 3.3): train the image encoder with AM-MSA; text side frozen.

Per epoch: rebuild VPM-2 from the whole training set (features encoded with the pseudo-label
masks, as the paper says), then P x K batches with flip-only augmentation applied to image and
mask together; loss = L_id + L_imp + L_i2tce + L_mask (eq. 11); VPM-2 updated with the hardest
sample of each identity after every step (eq. 3).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.samples import Sample
from ..data.sampler import RandomIdentitySampler
from ..data.transforms import ReIDImageDataset, build_train_transform
from ..eval.features import extract_features
from ..eval.masks import mask_iou
from ..model.factory import part_indices
from .losses import MUVALoss, normalize_per_granularity
from .memory import PrototypeMemory
from .schedulers import WarmupMultiStepLR, make_param_groups


def train_loader(samples: Sequence[Sample], masks, cfg, rank: int = 0, world_size: int = 1):
    """P x K loader; flip (and, for Table 11, crop + erasing) moves the part mask with the image."""
    extra = cfg.train.augment == "flip+crop+erase"
    if cfg.train.augment not in ("flip", "flip+crop+erase"):
        raise ValueError(f"augment: expected 'flip' or 'flip+crop+erase', got {cfg.train.augment!r}")
    transform = build_train_transform((cfg.data.height, cfg.data.width), cfg.grounding.patch_size,
                                      random_crop=extra, random_erasing=extra, norm=cfg.data.norm)
    sampler = RandomIdentitySampler(samples, num_instances=cfg.data.num_instances,
                                    batch_size=cfg.data.batch_size // world_size, seed=cfg.seed,
                                    rank=rank, world_size=world_size)
    loader = DataLoader(ReIDImageDataset(samples, transform, masks=masks), batch_sampler=_BatchSampler(sampler),
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
    t = cfg.train
    groups = make_param_groups(model, t.stage2_lr, t.weight_decay, lr_scale_patterns={r"\brmp\b|\.rmp\.": t.rmp_lr_scale})
    optimizer = torch.optim.Adam(groups, lr=t.stage2_lr, weight_decay=t.weight_decay)
    warm = min(t.warmup_epochs, max(0, t.stage2_epochs - 1))
    scheduler = WarmupMultiStepLR(optimizer, milestones=t.lr_milestones, gamma=t.lr_gamma,
                                  warmup_factor=t.warmup_factor, warmup_epochs=warm)
    return optimizer, scheduler


def build_loss(cfg, model) -> MUVALoss:
    t = cfg.train
    scale = t.i2tce_logit_scale if t.i2tce_logit_scale > 0 else float(model.clip_logit_scale)
    has_mask = model.encoder.rmp is not None
    return MUVALoss(use_i2tce=not t.vision_only, use_mask=has_mask, weights={"mask": t.mask_loss_weight},
                    id_epsilon=t.id_epsilon, imp_temperature=t.imp_temperature, i2tce_logit_scale=scale,
                    i2tce_normalize=False, mask_dice=t.mask_dice)


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
                 progress: bool = True) -> pd.DataFrame:
    """Run stage-2 epochs ``start_epoch..stage2_epochs``; returns the per-epoch history.

    monitor: a few training images whose predicted masks are scored against their pseudo labels
    after each epoch (``mask_iou_<part>`` columns). ``ddp_model`` is the DDP-wrapped ``model``
    under torchrun (gradients all-reduced; VPM-2 updates gathered from every rank).
    """
    t = cfg.train
    net = ddp_model or model
    if optimizer is None:
        optimizer, scheduler = build_optimizer(model, cfg)
    criterion = build_loss(cfg, model)
    loader, sampler = train_loader(samples, masks, cfg, rank, world_size)
    idx = part_indices(model.parts)
    text_protos = model.text_prototypes if not t.vision_only else None
    amp = device.type == "cuda" and t.amp
    G = 1 + len(idx)
    rows = []
    main = rank == 0
    for epoch in range(start_epoch, t.stage2_epochs):
        t0 = time.perf_counter()
        rebuild_memory(model, memory, samples, masks, cfg, device, progress and main)
        sampler.set_epoch(epoch)
        net.train()
        sums: dict[str, float] = {}
        steps = 0
        bar = tqdm(loader, desc=f"stage 2 epoch {epoch + 1}/{t.stage2_epochs}", disable=not (progress and main),
                   leave=False)
        for batch in bar:
            images = batch["image"].to(device, non_blocking=True)
            pids = batch["pid"].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out, logits = net(images)
            mask_targets = batch["mask"][:, idx].to(device).float() if criterion.enabled["mask"] else None
            feats = normalize_per_granularity(out.features.float(), G)
            terms = criterion(
                pids, id_logits=logits.float(), features=feats, bn_features=out.bn_features.float(),
                memory=memory, text_prototypes=text_protos,
                mask_logits=[m.float() for m in out.mask_logits] if mask_targets is not None else None,
                mask_targets=mask_targets,
            )
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            memory.update(out.bn_features.detach().float(), pids, gather=world_size > 1)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            steps += 1
            if steps % max(1, t.log_every) == 0:
                bar.set_postfix(loss=f"{sums['total'] / steps:.3f}")
        scheduler.step()
        row = {"epoch": epoch + 1, **{f"loss_{k}": v / max(steps, 1) for k, v in sums.items()},
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        if monitor and model.encoder.rmp is not None and main:
            _, probs = extract_features(model.encoder, monitor, cfg, device, return_masks=True, progress=False)
            target = torch.as_tensor(np.stack([masks.get(s.key) for s in monitor]))[:, idx]
            for part, v in zip(model.parts, mask_iou(probs, target, cfg.model.mask_threshold).tolist()):
                row[f"mask_iou_{part}"] = v
        rows.append(row)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row, optimizer, scheduler)
    return pd.DataFrame(rows)
