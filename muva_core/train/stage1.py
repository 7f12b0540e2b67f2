"""Stage 1 (paper 3.1.2): learn the multi-grained prompts against fixed visual centroids (VPM-1).

The image encoder is frozen. VPM-1 holds, per identity, the normalised centroid of its images'
multi-grained visual tokens, computed once with the grounding expert's part masks (pseudo
mode). Each step draws a batch of identities and pulls each identity's multi-grained text
token ``t^mg`` towards its centroid against all others (L_cmp, eq. 1).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data.samples import Sample
from ..eval.features import extract_features
from .losses import cmp_loss, normalize_per_granularity
from .memory import PrototypeMemory
from .schedulers import WarmupCosineLR


def visual_centroids(encoder, samples: Sequence[Sample], masks, num_classes: int, cfg, device,
                     progress: bool = True) -> torch.Tensor:
    """VPM-1: per-identity centroid of the pre-BN multi-grained features, encoded with pseudo masks."""
    mode = "pseudo" if encoder.n_parts else None
    feats = extract_features(encoder, samples, cfg, device, masks=masks if mode else None, mask_mode=mode,
                             which="pre", normalize=False, progress=progress, desc="VPM-1 features")
    G = 1 + encoder.n_parts
    labels = torch.tensor([s.pid for s in samples])
    memory = PrototypeMemory(num_classes, feats.shape[1]).build(normalize_per_granularity(feats, G), labels, gather=False)
    return normalize_per_granularity(memory.centroids.clone(), G)


def cmp_temperature(cfg, clip_logit_scale: float) -> float:
    """The configured L_cmp temperature; 0 means CLIP's own (1 / logit scale)."""
    t = cfg.train.cmp_temperature
    return t if t > 0 else 1.0 / clip_logit_scale


def train_stage1(prompts, centroids: torch.Tensor, cfg, device, *, logit_scale: float, start_epoch: int = 0,
                 optimizer=None, scheduler=None, on_epoch_end: Callable | None = None,
                 progress: bool = True) -> pd.DataFrame:
    """Optimise the prompt vectors with L_cmp; returns the per-epoch history.

    ``optimizer`` / ``scheduler`` / ``start_epoch`` come from a checkpoint when resuming.
    ``on_epoch_end(epoch, history_row, optimizer, scheduler)`` is called after each epoch (checkpointing).
    """
    t = cfg.train
    num_ids = centroids.shape[0]
    G = len(prompts.granularities)
    temperature = cmp_temperature(cfg, logit_scale)
    centroids = centroids.to(device)
    if optimizer is None:
        optimizer = torch.optim.Adam(prompts.learnable_parameters(), lr=t.stage1_lr, weight_decay=t.weight_decay)
    if scheduler is None:
        warm = min(t.stage1_warmup_epochs, max(0, t.stage1_epochs - 1))
        scheduler = WarmupCosineLR(optimizer, max_epochs=t.stage1_epochs, warmup_epochs=warm,
                                   warmup_lr_init=min(1e-5, t.stage1_lr))
    amp = device.type == "cuda" and t.amp
    rows = []
    steps_per_epoch = math.ceil(num_ids / t.stage1_batch_ids)
    bar = tqdm(range(start_epoch, t.stage1_epochs), desc="stage 1", disable=not progress)
    prompts.train()
    for epoch in bar:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(num_ids, generator=gen)
        total, correct = 0.0, 0
        for s in range(steps_per_epoch):
            pids = order[s * t.stage1_batch_ids:(s + 1) * t.stage1_batch_ids].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                text = prompts(pids)
            text = normalize_per_granularity(text.float(), G)
            loss = cmp_loss(text, centroids, pids, temperature=temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(pids)
            with torch.no_grad():
                correct += int(((text @ centroids.T).argmax(1) == pids).sum())
        scheduler.step()
        row = {"epoch": epoch + 1, "loss_cmp": total / num_ids, "text_to_centroid_acc": correct / num_ids,
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        rows.append(row)
        bar.set_postfix(loss=f"{row['loss_cmp']:.3f}", acc=f"{row['text_to_centroid_acc']:.2f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row, optimizer, scheduler)
    return pd.DataFrame(rows)


@torch.no_grad()
def text_prototypes(prompts, device, batch_size: int = 128, progress: bool = False) -> torch.Tensor:
    """TPM: every identity's multi-grained text token after stage 1 ``[C, G*E]`` (not normalised)."""
    prompts.eval()
    return prompts.text_features_all(batch_size=batch_size, progress=progress).to(device)


@torch.no_grad()
def similarity_matrix(ctx, max_ids: int = 24) -> torch.Tensor:
    """Cosine similarity ``[n, n]`` of the first ``n`` identities' text prototypes (TPM, after stage 1)
    against their visual centroids (VPM-1): a bright diagonal means the prompts learned the identities."""
    n = min(max_ids, ctx.data.num_classes)
    samples = [s for s in ctx.data.train if s.pid < n]
    centroids = visual_centroids(ctx.built.model.encoder, samples, ctx.masks, n, ctx.cfg, ctx.device, progress=False)
    text = ctx.built.model.text_prototypes[:n].to(centroids.device)
    return (text @ centroids.T).cpu()
