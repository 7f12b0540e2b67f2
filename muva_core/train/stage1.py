"""Stage 1 (paper 3.1.2): learn the multi-grained prompts against fixed visual centroids (VPM-1).

The image encoder is frozen. VPM-1 holds, per identity, the normalised centroid of its images'
multi-grained visual tokens, computed once with the grounding expert's part masks (pseudo
mode). Each step draws a batch and pulls each identity's multi-grained text token ``t^mg``
towards its centroid against all others (L_cmp, eq. 1).

The loss of one batch is two public functions that the loop below calls and a notebook can call
on any batch: :func:`stage1_centroids` (VPM-1 from the frozen encoder's raw pre-BN features) and
:func:`stage1_loss` (L_cmp of the raw text features). What they do follows the recipe keys
(``muva_core.config.RECIPES``):

================  ==========================================  ===========================================
key               workbook                                    reference (RikoLi/MUVA @ 8965263)
================  ==========================================  ===========================================
vpm1_mean         mean of per-granularity normalised features  mean of the raw features (engine/utils.py)
cmp_normalize     per granularity, / sqrt(G)                   the whole (1+R)*E vector (coop_trainers 103)
cmp_temperature   0 = 1 / CLIP's logit scale                   1.0 (PCL.CLUSTER_NCE_TEMP)
stage1_sampling   stage1_batch_ids distinct identities a step  P x K images (pk_sampling, ~N_images / 64)
lr_schedule       stepped after each epoch, cosine after warm-up  stepped at the start (epochs from 1), timm cosine
amp_dtype         bfloat16 autocast                           float16 autocast + GradScaler (CPU: muva_core/precision.py)
================  ==========================================  ===========================================
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.sampler import RandomIdentitySampler
from ..data.samples import Sample
from ..eval.features import extract_features
from ..model.muva import parts_from_code
from ..precision import make_scaler, precision_plan, scaler_step
from .losses import cmp_loss, normalize_per_granularity
from .memory import PrototypeMemory
from .schedulers import WarmupCosineLR, step_after_epoch, step_before_epoch

__all__ = [
    "amp_settings", "grad_scaler", "scaler_fields", "granularity_count", "stage1_centroids", "stage1_text", "stage1_loss",
    "cmp_temperature", "visual_centroids", "build_stage1_optimizer", "stage1_batches", "train_stage1",
    "text_prototypes", "similarity_matrix",
]

STAGE1_EPOCH_OFFSET = 10_000
"""Stage-1 image batches use sampler epochs ``10000 + epoch``, so stage 1 never repeats stage 2's order."""


# ---- shared with stage 2 -------------------------------------------------------------------
def amp_settings(device: torch.device, cfg) -> tuple[bool, torch.dtype]:
    """``(autocast on, its dtype)`` of :func:`muva_core.precision.precision_plan` (GPU: ``amp`` /
    ``amp_dtype``; CPU: ``cpu_amp``)."""
    plan = precision_plan(device, cfg)
    return plan.autocast, plan.dtype


def grad_scaler(device: torch.device, cfg):
    """A ``GradScaler`` when training runs under float16 autocast (the reference), else ``None``."""
    return make_scaler(device, precision_plan(device, cfg))


def backward_step(loss: torch.Tensor, optimizer, scaler) -> bool:
    """``loss.backward(); optimizer.step()``, through ``scaler`` when there is one; False when the scaler
    skipped the step (inf/NaN gradients: a float16 overflow)."""
    return scaler_step(loss, optimizer, scaler)


def scaler_fields(scaler, skipped: int) -> dict:
    """The epoch row's ``grad_scale`` (the loss scale at the epoch's end) and ``overflow_skipped`` (steps the
    scaler skipped on inf/NaN gradients) when a float16 GradScaler runs."""
    return {} if scaler is None else {"grad_scale": float(scaler.get_scale()), "overflow_skipped": int(skipped)}


def granularity_count(cfg) -> int:
    """G = 1 + the number of local parts of ``cfg.model.granularity``."""
    return 1 + len(parts_from_code(cfg.model.granularity))


def _normalize(x: torch.Tensor, cfg) -> torch.Tensor:
    """The L_cmp normalisation of ``cmp_normalize``: per granularity (/ sqrt(G)) or the whole vector."""
    if cfg.train.cmp_normalize == "whole":
        return F.normalize(x.float(), dim=1)
    return normalize_per_granularity(x.float(), granularity_count(cfg))


# ---- the loss of one batch -----------------------------------------------------------------
@torch.no_grad()
def stage1_centroids(raw_features: torch.Tensor, pids: torch.Tensor, num_classes: int, cfg) -> torch.Tensor:
    """VPM-1 ``[num_classes, G*E]`` from the frozen encoder's raw pre-BN features ``[N, G*E]`` of every
    training image (encoded with its pseudo masks) and their identities ``[N]``.

    ``vpm1_mean="normalized"`` (workbook): each image's feature normalised per granularity, averaged per
    identity; ``"raw"`` (reference, ``compute_cluster_centroids``): the raw features averaged. Then the
    mean is normalised as ``cmp_normalize`` says (per granularity / the whole vector). Every identity in
    ``[0, num_classes)`` needs at least one image.
    """
    G = granularity_count(cfg)
    pids = torch.as_tensor(pids, device=raw_features.device).long()
    if cfg.train.vpm1_mean == "normalized":
        memory = PrototypeMemory(num_classes, raw_features.shape[1]).to(raw_features.device)
        memory.build(normalize_per_granularity(raw_features, G), pids, gather=False)
        means = memory.centroids.clone()
    else:
        feats = raw_features.float()
        counts = torch.bincount(pids, minlength=num_classes)
        if bool((counts == 0).any()):
            missing = (counts == 0).nonzero().flatten()[:10].tolist()
            raise ValueError(f"stage1_centroids: identities {missing} (of {num_classes}) have no image")
        sums = torch.zeros(num_classes, feats.shape[1], device=feats.device).index_add_(0, pids, feats)
        means = sums / counts.unsqueeze(1).to(sums.dtype)
    return _normalize(means, cfg)


def stage1_text(raw_text_features: torch.Tensor, cfg) -> torch.Tensor:
    """The text features as L_cmp compares them (normalised as ``cmp_normalize`` says), float32."""
    return _normalize(raw_text_features, cfg)


def cmp_temperature(cfg, clip_logit_scale: float | None) -> float:
    """The configured L_cmp temperature; 0 means CLIP's own (1 / logit scale)."""
    t = cfg.train.cmp_temperature
    if t > 0:
        return t
    if clip_logit_scale is None:
        raise ValueError("cmp_temperature = 0 means 1 / CLIP's logit scale: pass logit_scale="
                         "float(model.clip_logit_scale)")
    return 1.0 / clip_logit_scale


def stage1_loss(raw_text_features: torch.Tensor, centroids: torch.Tensor, pids: torch.Tensor, cfg, *,
                logit_scale: float | None = None) -> torch.Tensor:
    """L_cmp (eq. 1) of one batch: ``CE(norm(t) . M1^T / temperature, pids)``.

    raw_text_features: the prompt learner's multi-grained text features ``[B, G*E]`` of identities
    ``pids`` (not normalised); centroids: VPM-1 from :func:`stage1_centroids` (constant).
    ``logit_scale`` (CLIP's) is needed when ``cmp_temperature`` is 0.
    """
    temperature = cmp_temperature(cfg, logit_scale)
    text = stage1_text(raw_text_features, cfg)
    if cfg.train.cmp_normalize == "whole":
        logits = text @ centroids.detach().float().t() / temperature
        return F.cross_entropy(logits, torch.as_tensor(pids, device=logits.device).long())
    return cmp_loss(text, centroids, pids, temperature=temperature)


# ---- the loop ------------------------------------------------------------------------------
def visual_centroids(encoder, samples: Sequence[Sample], masks, num_classes: int, cfg, device,
                     progress: bool = True) -> torch.Tensor:
    """VPM-1 of ``samples``: their raw pre-BN features, encoded with pseudo masks, through :func:`stage1_centroids`."""
    mode = "pseudo" if encoder.n_parts else None
    feats = extract_features(encoder, samples, cfg, device, masks=masks if mode else None, mask_mode=mode,
                             which="pre", normalize=False, progress=progress, desc="VPM-1 features")
    labels = torch.tensor([s.pid for s in samples])
    return stage1_centroids(feats, labels, num_classes, cfg)


def build_stage1_optimizer(prompts, cfg):
    """Adam on the prompt vectors and the warm-up + cosine schedule (timm's under ``lr_schedule: reference``)."""
    t = cfg.train
    optimizer = torch.optim.Adam(prompts.learnable_parameters(), lr=t.stage1_lr, weight_decay=t.weight_decay)
    warm = min(t.stage1_warmup_epochs, max(0, t.stage1_epochs - 1))
    scheduler = WarmupCosineLR(optimizer, max_epochs=t.stage1_epochs, warmup_epochs=warm,
                               warmup_lr_init=min(1e-5, t.stage1_lr), cosine_from_zero=t.lr_schedule == "reference")
    return optimizer, scheduler


def stage1_batches(cfg, epoch: int, num_ids: int, labels: torch.Tensor | None = None) -> list[tuple[torch.Tensor, int]]:
    """The batches of 0-based ``epoch``: ``(identities of the batch's rows, rows)`` each.

    ``stage1_sampling="identities"``: a random permutation of all identities cut into ``stage1_batch_ids``
    (every identity once an epoch, ``ceil(C / stage1_batch_ids)`` steps). ``"images"`` (the reference's
    ``pk_sampling``): P x K batches of training images (``batch_size`` = P x K, ``num_instances`` = K) drawn
    from ``labels``, the identity of every training image, so about ``N_images / batch_size`` steps; the
    rows are the images' identities (each identity K times in a batch)."""
    t = cfg.train
    if t.stage1_sampling == "images":
        if labels is None:
            raise ValueError("stage1_sampling='images' needs the identity of every training image (labels=)")
        labels = torch.as_tensor(labels).long().cpu()
        sampler = RandomIdentitySampler(labels.tolist(), num_instances=cfg.data.num_instances,
                                        batch_size=cfg.data.batch_size, seed=cfg.seed)
        sampler.set_epoch(STAGE1_EPOCH_OFFSET + epoch)
        return [(labels[torch.tensor(b)], len(b)) for b in sampler.batches()]
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(num_ids, generator=gen)
    steps = math.ceil(num_ids / t.stage1_batch_ids)
    out = []
    for s in range(steps):
        pids = order[s * t.stage1_batch_ids:(s + 1) * t.stage1_batch_ids]
        out.append((pids, len(pids)))
    return out


def train_stage1(prompts, centroids: torch.Tensor, cfg, device, *, logit_scale: float, start_epoch: int = 0,
                 optimizer=None, scheduler=None, on_epoch_end: Callable | None = None,
                 progress: bool = True, labels: torch.Tensor | None = None, scaler=None) -> pd.DataFrame:
    """Optimise the prompt vectors with L_cmp; returns the per-epoch history.

    ``labels``: the identity of every training image (needed by ``stage1_sampling="images"``).
    ``optimizer`` / ``scheduler`` / ``start_epoch`` (and the float16 ``scaler``) come from a checkpoint when resuming.
    ``on_epoch_end(epoch, history_row, optimizer, scheduler)`` is called after each epoch (checkpointing).
    History: ``loss_cmp`` and ``text_to_centroid_acc`` averaged over the epoch's rows, ``lr`` in the
    optimiser when the epoch ends (workbook: the next epoch's, the scheduler steps after the epoch;
    reference: the epoch's own, it steps at the start).
    """
    t = cfg.train
    num_ids = centroids.shape[0]
    centroids = centroids.to(device)
    if optimizer is None:
        optimizer, scheduler = build_stage1_optimizer(prompts, cfg)
    amp, amp_dtype = amp_settings(device, cfg)
    scaler = scaler if scaler is not None else grad_scaler(device, cfg)
    images = t.stage1_sampling == "images"
    rows = []
    bar = tqdm(range(start_epoch, t.stage1_epochs), desc="stage 1", disable=not progress)
    prompts.train()
    for epoch in bar:
        t0 = time.perf_counter()
        step_before_epoch(scheduler, t.lr_schedule)
        total, correct, seen, skipped = 0.0, 0, 0, 0
        for pids, n in stage1_batches(cfg, epoch, num_ids, labels):
            pids = pids.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                if images:  # each identity once through the text tower, then one row per image
                    ids, inverse = torch.unique(pids, return_inverse=True)
                    text = prompts(ids)[inverse]
                else:
                    text = prompts(pids)
            loss = stage1_loss(text, centroids, pids, cfg, logit_scale=logit_scale)
            optimizer.zero_grad(set_to_none=True)
            skipped += not backward_step(loss, optimizer, scaler)
            total += loss.item() * n
            seen += n
            with torch.no_grad():
                correct += int(((stage1_text(text, cfg) @ centroids.T).argmax(1) == pids).sum())
        step_after_epoch(scheduler, t.lr_schedule)
        row = {"epoch": epoch + 1, "loss_cmp": total / seen, "text_to_centroid_acc": correct / seen,
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
               **scaler_fields(scaler, skipped)}
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
    """Similarity ``[n, n]`` of the first ``n`` identities' text prototypes (TPM, after stage 1) against
    their visual centroids (VPM-1), both normalised as L_cmp compares them (the cosine; per granularity
    under the workbook recipe): a bright diagonal means the prompts learned the identities."""
    n = min(max_ids, ctx.data.num_classes)
    samples = [s for s in ctx.data.train if s.pid < n]
    centroids = visual_centroids(ctx.built.model.encoder, samples, ctx.masks, n, ctx.cfg, ctx.device, progress=False)
    text = stage1_text(ctx.built.model.text_prototypes[:n], ctx.cfg).to(centroids.device)
    return (text @ centroids.T).cpu()
