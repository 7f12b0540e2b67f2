"""Figure 7 of the paper: the model's predicted part masks on the unseen target domain, one column per image."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle

from ..data.datasets import read_image
from ..data.samples import Sample
from ..eval.masks import mask_iou
from ..grounding.voting import truth_patch_masks
from ..model.factory import part_indices
from .plots import PART_COLOURS, mask_to_grid, overlay_mask


def figure7_grid(examples: Sequence[Sample], probs: np.ndarray, grid: tuple[int, int], parts: Sequence[str],
                 size: tuple[int, int], patch_size: int, truth: pd.DataFrame | None = None,
                 threshold: float = 0.5, title: str = "") -> plt.Figure:
    """One column per image: the image, then each part's predicted mask over it (with the true box and IoU).

    ``probs[j]`` is the ``[len(parts), Npatch]`` mask probability of ``examples[j]`` on the patch ``grid``;
    images are shown at the model input ``size = (H, W)``. With ``truth`` (a ground-truth box table with a
    ``key`` column, :func:`~muva_core.grounding.simulated.load_truth`) each part's true box is drawn as a
    white dashed rectangle and its title gives the IoU of the mask thresholded at ``threshold`` against the
    box voted into ``patch_size`` patches (the voting of the scores of notebook 06). ``title``: the suptitle.
    """
    h, w = size
    fig, axes = plt.subplots(1 + len(parts), len(examples), figsize=(1.25 * len(examples), 2.45 * (1 + len(parts))),
                             squeeze=False)
    keys = [s.key for s in examples]
    target = truth_patch_masks(truth, keys, size, patch_size)[:, part_indices(parts)] \
        if truth is not None else None
    for j, (s, p) in enumerate(zip(examples, probs)):
        image = read_image(s.path)
        sx, sy = w / image.width, h / image.height
        image = image.resize((w, h))
        axes[0, j].imshow(image)
        axes[0, j].set_title(f"pid {s.pid}, cam {s.camid + 1}", fontsize=7)
        axes[0, j].axis("off")
        for i, part in enumerate(parts, start=1):
            ax = axes[i, j]
            part_title = part
            if target is not None:
                iou = float(mask_iou(p[None, i - 1:i], target[j:j + 1, i - 1:i], threshold)[0])
                part_title = f"{part} IoU {iou:.2f}"
            overlay_mask(ax, image, p[i - 1], grid, colour=PART_COLOURS[part], alpha=0.6, title=part_title)
            fine = np.kron(mask_to_grid(p[i - 1], grid), np.ones((h // grid[0], w // grid[1])))
            ax.contour(fine, levels=[threshold], colors=[PART_COLOURS[part]], linewidths=1.0)
            if truth is not None:
                row = truth[(truth["key"] == s.key) & (truth["part"] == part)]
                for r in row.itertuples():
                    ax.add_patch(Rectangle((r.x0 * sx, r.y0 * sy), (r.x1 - r.x0) * sx, (r.y1 - r.y0) * sy,
                                           fill=False, ec="w", lw=1.0, ls="--"))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
