"""Scoring predicted part masks: against pseudo labels (training) or ground-truth boxes (synthetic)."""
from __future__ import annotations

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
