"""Scoring predicted part masks against the truth: IoU and where the masks sit (muva_core/eval/masks.py)."""
from __future__ import annotations

import pytest
import torch

from muva_core.eval.masks import mask_iou, mask_placement

GRID = (12, 6)


def _heads(rows: list[int]) -> torch.Tensor:
    """One image per row: a head of two patches (columns 2-3) at that grid row, as ``[N, 1, 72]``."""
    out = torch.zeros(len(rows), 1, GRID[0], GRID[1])
    for i, r in enumerate(rows):
        out[i, 0, r, 2:4] = 1
    return out.view(len(rows), 1, -1)


def test_a_mask_that_follows_the_head_and_one_at_the_usual_place():
    rows = [0, 1, 2, 3, 1, 2]
    truth = _heads(rows)
    follows = truth * 0.9 + 0.05
    placed = follows.mean(0, keepdim=True).expand_as(truth).clone()      # the average head, whatever the image
    good = mask_placement(follows, truth, GRID, ["head"]).loc["head"]
    assert good["top-k precision"] == 1.0 and good["row error"] == pytest.approx(0, abs=1e-5)
    assert good["predicted row spread"] == pytest.approx(good["true row spread"], rel=1e-3)
    assert good["true patches"] == good["predicted patches"] == 2
    prior = mask_placement(placed, truth, GRID, ["head"]).loc["head"]
    assert prior["predicted row spread"] == pytest.approx(0, abs=1e-5) and prior["true row spread"] > 0.9
    assert prior["top-k precision"] < 0.6 and prior["row error"] > 0.5
    assert mask_iou(placed, truth).item() < mask_iou(follows, truth).item() == 1.0


def test_images_without_the_part_are_left_out_and_shapes_are_checked():
    truth = torch.cat([_heads([1, 2]), torch.zeros(1, 1, 72)])
    probs = torch.cat([truth[:2], torch.ones(1, 1, 72)])
    table = mask_placement(probs, truth, GRID, ["head"])
    assert table.loc["head", "images"] == 2 and table.loc["head", "top-k precision"] == 1.0
    with pytest.raises(ValueError, match=r"\[N, 2, 12x6\]"):
        mask_placement(probs, truth, GRID, ["head", "legs"])
