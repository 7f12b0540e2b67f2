"""Figure 7's grid (muva_core.viz.figure7): one column per image, a row per part, IoU against the true boxes."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from muva_core.data.samples import Sample  # noqa: E402
from muva_core.viz.figure7 import figure7_grid  # noqa: E402

SIZE, GRID, PATCH = (64, 32), (4, 2), 16  # model input (H, W), its patch grid, the patch size
PARTS = ("head", "upper", "legs")


@pytest.fixture
def examples(tmp_path) -> list[Sample]:
    """Two 128 x 64 images (twice the model input): the figure scales them and their boxes by 1/2."""
    out = []
    for i in range(2):
        name = f"000{i + 1}_c{i + 1}s1_000001_00.png"
        Image.fromarray(np.full((128, 64, 3), 60 * (i + 1), dtype=np.uint8)).save(tmp_path / name)
        out.append(Sample(str(tmp_path / name), i + 1, i, "toy", f"query/{name}"))
    return out


def _truth(examples: list[Sample]) -> pd.DataFrame:
    """Head: the top patch row, upper body: the second, legs: the last two (in input pixels x 2)."""
    boxes = {"head": (0, 0, 64, 32), "upper": (0, 32, 64, 64), "legs": (0, 64, 64, 128)}
    return pd.DataFrame([{"key": s.key, "part": p, "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3],
                          "img_w": 64, "img_h": 128} for s in examples for p, b in boxes.items()])


def _probs(n: int) -> np.ndarray:
    """Head exactly its row (IoU 1), upper empty (IoU 0), legs half its two rows (IoU 0.5); [n, 3, 8]."""
    p = np.zeros((n, 3, GRID[0] * GRID[1]), dtype=np.float32)
    p[:, 0, 0:2] = 0.9
    p[:, 2, 4:6] = 0.8
    p[:, 2, 6:8] = 0.2
    return p


def test_grid_has_a_column_per_image_and_a_row_per_part_with_the_ious_and_true_boxes(examples):
    fig = figure7_grid(examples, _probs(2), GRID, PARTS, SIZE, PATCH, _truth(examples), threshold=0.5,
                       title="toy: predicted part masks")
    try:
        assert len(fig.axes) == (1 + len(PARTS)) * len(examples)
        axes = np.asarray(fig.axes).reshape(1 + len(PARTS), len(examples))  # row-major, as plt.subplots made them
        assert [ax.get_title() for ax in axes[0]] == ["pid 1, cam 1", "pid 2, cam 2"]
        for j in range(len(examples)):
            assert [ax.get_title() for ax in axes[1:, j]] == ["head IoU 1.00", "upper IoU 0.00", "legs IoU 0.50"]
        assert fig.get_suptitle() == "toy: predicted part masks"
        head_boxes = [p for p in axes[1, 0].patches if isinstance(p, Rectangle)]
        assert len(head_boxes) == 1
        assert (head_boxes[0].get_x(), head_boxes[0].get_y(), head_boxes[0].get_width(),
                head_boxes[0].get_height()) == (0.0, 0.0, 32.0, 16.0)  # scaled from 128 x 64 to the input size
        assert axes[0, 0].get_images()[0].get_array().shape[:2] == SIZE
    finally:
        plt.close(fig)


def test_without_truth_the_titles_are_the_parts_and_a_subset_of_parts_gives_fewer_rows(examples):
    fig = figure7_grid(examples[:1], _probs(1)[:, [0, 2]], GRID, ("head", "legs"), SIZE, PATCH)
    try:
        assert len(fig.axes) == 3
        assert [ax.get_title() for ax in fig.axes[1:]] == ["head", "legs"]
        assert not any(isinstance(p, Rectangle) for ax in fig.axes for p in ax.patches)
    finally:
        plt.close(fig)


def test_part_subset_scores_against_the_matching_truth_channels(examples):
    """``parts=("upper", "legs")``: the masks' channels are those two, compared with the same true parts."""
    probs = _probs(2)[:, [1, 2]]
    fig = figure7_grid(examples, probs, GRID, ("upper", "legs"), SIZE, PATCH, _truth(examples))
    try:
        assert [ax.get_title() for ax in fig.axes[2:]] == ["upper IoU 0.00"] * 2 + ["legs IoU 0.50"] * 2
    finally:
        plt.close(fig)
