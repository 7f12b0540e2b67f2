"""Feature extraction over a list of samples (query / gallery / train), batched, no grad."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.samples import Sample
from ..data.transforms import ReIDImageDataset, build_test_transform
from ..precision import precision_plan


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def test_transform(cfg):
    """The configuration's test / feature-extraction transform (size, normalisation, resize interpolation)."""
    return build_test_transform((cfg.data.height, cfg.data.width), cfg.grounding.patch_size, norm=cfg.data.norm,
                                interpolation=cfg.data.test_resize)


def test_loader(samples: Sequence[Sample], cfg, masks=None, batch_size: int | None = None) -> DataLoader:
    return DataLoader(ReIDImageDataset(samples, test_transform(cfg), masks=masks), batch_size=batch_size or cfg.data.batch_size,
                      shuffle=False, num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def extract_features(encoder, samples: Sequence[Sample], cfg, device: torch.device, *, masks=None,
                     mask_mode: str | None = None, which: str = "bn", normalize: bool = True,
                     return_masks: bool = False, progress: bool = True, desc: str = "features"):
    """Features of ``samples``: ``which="bn"`` (BN neck; the test feature) or ``"pre"`` (before BN).

    ``masks`` (a mask store) with ``mask_mode="pseudo"`` encodes with the pseudo-label masks (VPM
    centroids). ``return_masks=True`` also returns the final predicted mask probabilities
    ``[N, P, Npatch]`` (when the RMP ran). The encoder's train/eval mode is restored afterwards.
    """
    was_training = encoder.training
    encoder.eval()
    feats, probs = [], []
    plan = precision_plan(device, cfg)
    amp, amp_dtype = plan.autocast, plan.dtype
    for batch in tqdm(test_loader(samples, cfg, masks=masks), desc=desc, disable=not progress, leave=False):
        images = batch["image"].to(device, non_blocking=True)
        part_masks = batch["mask"].to(device) if mask_mode == "pseudo" else None
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            out = encoder(images, part_masks=part_masks, mask_mode=mask_mode)
        f = (out.bn_features if which == "bn" else out.features).float()
        feats.append(torch.nn.functional.normalize(f, dim=-1) if normalize else f)
        if return_masks and out.final_mask_logits is not None:
            probs.append(out.final_mask_logits.float().sigmoid().cpu())
    encoder.train(was_training)
    result = torch.cat(feats).cpu() if feats else torch.zeros(0)
    if return_masks:
        return result, (torch.cat(probs) if probs else None)
    return result


def sample_arrays(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([s.pid for s in samples]), np.array([s.camid for s in samples])
