"""Scoring predicted part masks: against pseudo labels (training) or ground-truth boxes (synthetic)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..data.samples import PARTS


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


def truth_patch_masks(truth: pd.DataFrame, keys: Sequence[str], img_size=(256, 128), patch: int = 16,
                      rule: str = "center") -> np.ndarray:
    """Ground-truth part boxes (a ``load_truth`` table) voted into patch masks ``[len(keys), 3, Npatch]``
    in the order of ``keys`` (the same voting as the pseudo labels, so the IoUs compare like with like)."""
    from ..grounding.voting import vote_table

    rows = truth[truth["part"].isin(PARTS) & truth["key"].isin(set(keys))]
    found, masks = vote_table(rows, img_size=img_size, patch=patch, rule=rule, columns="raw")
    index = {k: i for i, k in enumerate(found)}
    missing = [k for k in keys if k not in index]
    if missing:
        raise KeyError(f"{len(missing)} images have no ground-truth boxes, e.g. {missing[:3]}")
    return masks[[index[k] for k in keys]]
