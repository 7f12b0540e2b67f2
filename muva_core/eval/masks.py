"""Scoring predicted part masks: against pseudo labels (training) or ground-truth boxes (synthetic)."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch


def mask_iou(probabilities: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-part IoU of thresholded probabilities ``[N, P, Npatch]`` against binary targets, averaged over
    the images whose union is non-empty (an invisible part predicted empty is no evidence either way): ``[P]``."""
    pred = torch.as_tensor(probabilities) > threshold
    tgt = torch.as_tensor(targets).bool()
    inter = (pred & tgt).sum(-1).float()
    union = (pred | tgt).sum(-1).float()
    valid = union > 0
    iou = torch.where(valid, inter / union.clamp(min=1), torch.zeros_like(inter))
    return iou.sum(0) / valid.sum(0).clamp(min=1)


def _centroids(masses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column centroids of ``[N, Gh, Gw]`` non-negative masses (in patches)."""
    total = masses.sum((1, 2)).clamp(min=1e-6)
    rows = torch.arange(masses.shape[1], dtype=masses.dtype)
    cols = torch.arange(masses.shape[2], dtype=masses.dtype)
    return (masses.sum(2) * rows).sum(1) / total, (masses.sum(1) * cols).sum(1) / total


def mask_placement(probabilities: torch.Tensor, targets: torch.Tensor, grid_hw: tuple[int, int],
                   parts: Sequence[str]) -> pd.DataFrame:
    """Where predicted part masks ``[N, P, Gh*Gw]`` sit against binary targets, per part (rows), over the images
    where the part is visible: ``true patches`` / ``predicted patches`` (mean sizes, prediction ``> 0.5``),
    ``top-k precision`` (the share of the k most probable patches on the part, k = its true size: placement
    without a threshold), the spread (std over images) of the row centroids of the truth and of those k patches
    (``true row spread`` / ``predicted row spread``: a predictor that puts every mask at the usual place has a
    spread near 0) and the mean distance of the two centroids in rows and columns."""
    probs = torch.as_tensor(probabilities).float()
    tgt = torch.as_tensor(targets).float()
    gh, gw = grid_hw
    if probs.shape != tgt.shape or probs.shape[-1] != gh * gw or probs.shape[1] != len(parts):
        raise ValueError(f"masks {tuple(probs.shape)} and targets {tuple(tgt.shape)} must both be "
                         f"[N, {len(parts)}, {gh}x{gw}]")
    rows = []
    for p, part in enumerate(parts):
        visible = tgt[:, p].sum(-1) > 0
        pr, tr = probs[visible, p], tgt[visible, p]
        k = tr.sum(-1).long()
        order = pr.argsort(-1, descending=True)
        rank_of = torch.empty_like(order)
        rank_of.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
        in_top = (rank_of < k[:, None]).float()
        precision = ((in_top * tr).sum(-1) / k.clamp(min=1)).mean()
        t_row, t_col = _centroids(tr.view(-1, gh, gw))
        p_row, p_col = _centroids(in_top.view(-1, gh, gw))
        rows.append({"part": part, "images": int(visible.sum()), "true patches": float(tr.sum(-1).mean()),
                     "predicted patches": float((pr > 0.5).float().sum(-1).mean()),
                     "top-k precision": float(precision), "true row spread": float(t_row.std()),
                     "predicted row spread": float(p_row.std()),
                     "row error": float((t_row - p_row).abs().mean()),
                     "column error": float((t_col - p_col).abs().mean())})
    return pd.DataFrame(rows).set_index("part")
