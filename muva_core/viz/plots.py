"""Matplotlib / seaborn figures of the workbook (paper Figures 4, 5, 6 and 7 style).

Every function returns a matplotlib Figure; :func:`save_figure` writes it as PNG and SVG (and
returns a :class:`SavedFigure`, the list of both paths that shows as one short ``saved: ...`` line
in a notebook); :func:`whole_table` shows a wide table without pandas' column cut.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from ..data.samples import PARTS, Sample

PART_COLOURS = {"head": "#2ca02c", "upper": "#1f77b4", "legs": "#d62728", "person": "#7f7f7f"}


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory, else to the project root, else as it is."""
    path = Path(os.path.abspath(path))
    bases = [Path.cwd()]
    try:
        from ..paths import project_root

        bases.append(project_root())
    except Exception:  # no project root (an installed package used elsewhere): absolute paths
        pass
    for base in bases:
        try:
            return path.relative_to(Path(os.path.abspath(base))).as_posix()
        except ValueError:
            continue
    return path.as_posix()


class SavedFigure(list):
    """The paths :func:`save_figure` wrote (a ``list`` of :class:`~pathlib.Path`, PNG first), shown in a
    notebook as one line ``saved: figures/x.png, x.svg`` instead of ``[PosixPath(...), ...]``."""

    def __str__(self) -> str:
        if not self:
            return "saved: nothing"
        first = _display_path(self[0])
        folder = first.rsplit("/", 1)[0] + "/" if "/" in first else ""
        rest = [_display_path(p) for p in self[1:]]
        rest = [r[len(folder):] if folder and r.startswith(folder) else r for r in rest]
        return "saved: " + ", ".join([first, *rest])

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, printer, cycle: bool) -> None:   # IPython's text/plain
        printer.text(str(self))

    def _repr_html_(self) -> str:
        return f"<code>{html.escape(str(self))}</code>"


def save_figure(fig, folder: str | Path, name: str, dpi: int = 120) -> SavedFigure:
    """Save ``fig`` as ``<folder>/<name>.png`` and ``.svg``; returns both paths (a list, PNG first, that a
    notebook shows as ``saved: <folder>/<name>.png, <name>.svg``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = SavedFigure([folder / f"{name}.png", folder / f"{name}.svg"])
    for p in paths:
        fig.savefig(p, dpi=dpi, bbox_inches="tight")
    return paths


class WholeTable:
    """A table shown whole in a notebook: every row and column (pandas' ``display.max_columns`` /
    ``max_rows`` cut does not apply); ``frame`` is the table itself."""

    def __init__(self, frame: pd.DataFrame, caption: str = "") -> None:
        self.frame = frame
        self.caption = caption

    def _repr_html_(self) -> str:
        table = self.frame.to_html(max_rows=None, max_cols=None, notebook=True, na_rep="n/a")
        return (f"<p><b>{html.escape(self.caption)}</b></p>" if self.caption else "") + table

    def __repr__(self) -> str:
        text = self.frame.to_string(max_rows=None, max_cols=None, na_rep="n/a")
        return f"{self.caption}\n{text}" if self.caption else text

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        printer.text(repr(self))


def whole_table(frame: pd.DataFrame, transpose: bool = False, caption: str = "") -> WholeTable:
    """``frame`` for display without pandas' column / row cut; ``transpose``: rows become columns (a wide
    per-part table becomes one column per part), each column keeping its values' types (counts stay
    integers)."""
    if transpose:
        frame = frame.astype(object).T
    return WholeTable(frame, caption)


def _boxes_of(table: pd.DataFrame, key: str, columns: Sequence[str]) -> dict[str, tuple[float, ...] | None]:
    rows = table[table["key"] == key]
    out = {}
    for _, r in rows.iterrows():
        box = tuple(float(r[c]) for c in columns)
        out[r["part"]] = None if any(np.isnan(box)) else box
    return out


def draw_boxes(ax, image, boxes: dict[str, tuple[float, ...] | None], title: str = "", linewidth: float = 1.5,
               fontsize: float = 7) -> None:
    """An image with one coloured rectangle per part (missing parts are listed in the title)."""
    ax.imshow(image)
    missing = []
    for part, box in boxes.items():
        if box is None:
            missing.append(part)
            continue
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=linewidth, ec=PART_COLOURS.get(part, "y")))
    ax.set_title(title + (f"\nmissing: {','.join(missing)}" if missing else ""), fontsize=fontsize)
    ax.axis("off")


def plot_part_boxes(samples: Sequence[Sample], table: pd.DataFrame, columns: Sequence[str] = ("x0", "y0", "x1", "y1"),
                    ncols: int = 8, title: str = "") -> plt.Figure:
    """Figure 4 style: sample images with their head / upper-body / leg boxes."""
    from ..data.datasets import read_image

    n = len(samples)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.4 * ncols, 2.9 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples):
        draw_boxes(ax, read_image(s.path), _boxes_of(table, s.key, columns), title=Path(s.relpath).name[:14])
    handles = [Rectangle((0, 0), 1, 1, fill=False, ec=PART_COLOURS[p], label=p) for p in PARTS]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_box_height_hist(raw_stats: pd.DataFrame, cal_stats: pd.DataFrame, parts: pd.Series,
                         stat: str = "height", bins: int = 40) -> plt.Figure:
    """Figure 5 style: per part, the distribution of a normalised box statistic, raw vs calibrated."""
    import seaborn as sns

    frame = pd.concat([
        pd.DataFrame({stat: raw_stats[stat].to_numpy(), "part": parts.to_numpy(), "boxes": "raw"}),
        pd.DataFrame({stat: cal_stats[stat].to_numpy(), "part": parts.to_numpy(), "boxes": "calibrated"}),
    ], ignore_index=True).dropna()
    order = [p for p in PARTS if p in set(frame["part"])]
    fig, axes = plt.subplots(1, len(order), figsize=(4.2 * len(order), 3.2), squeeze=False)
    for ax, part in zip(axes[0], order):
        sns.histplot(frame[frame["part"] == part], x=stat, hue="boxes", bins=bins, binrange=(0, 1), ax=ax,
                     element="step", stat="count", common_norm=False, palette={"raw": "#1f77b4", "calibrated": "#d62728"})
        ax.set_title(f"{part}: box {stat} / image {stat if stat != 'area' else 'area'}")
        ax.set_xlabel(f"normalised {stat}")
    fig.tight_layout()
    return fig


def mask_to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A flattened (row-wise) patch mask ``[Npatch]`` back to its ``[gh, gw]`` grid."""
    return np.asarray(mask).reshape(grid)


def upsample_mask(mask: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    h, w = size
    m = mask_to_grid(mask, grid).astype(np.float32)
    return np.kron(m, np.ones((int(np.ceil(h / grid[0])), int(np.ceil(w / grid[1])))))[:h, :w]


def blend_parts(image: np.ndarray, masks: np.ndarray, parts: Sequence[str], grid: tuple[int, int],
                alpha: float = 0.45) -> np.ndarray:
    """``image`` (uint8 ``[H, W, 3]``) with each part's patch mask (binary or in [0, 1]) blended in its
    colour, like :func:`~muva_core.viz.plots.overlay_mask`; returns uint8."""
    from matplotlib.colors import to_rgb

    out = np.asarray(image, dtype=np.float32) / 255.0
    for mask, part in zip(masks, parts):
        up = upsample_mask(mask, grid, out.shape[:2])[..., None] * alpha
        out = out * (1 - up) + np.asarray(to_rgb(PART_COLOURS.get(part, "y")), dtype=np.float32) * up
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def overlay_mask(ax, image, mask: np.ndarray, grid: tuple[int, int], colour: str = "#d62728", alpha: float = 0.45,
                 title: str = "", fontsize: float = 7) -> None:
    """Draw ``image`` with a patch mask (binary or probabilities in [0, 1]) as a coloured overlay."""
    from matplotlib.colors import to_rgb

    img = np.asarray(image, dtype=np.float32) / 255.0
    h, w = img.shape[:2]
    m = mask_to_grid(mask, grid).astype(np.float32)
    up = np.kron(m, np.ones((int(np.ceil(h / grid[0])), int(np.ceil(w / grid[1])))))[:h, :w]
    rgb = np.asarray(to_rgb(colour), dtype=np.float32)
    blended = img * (1 - alpha * up[..., None]) + rgb * (alpha * up[..., None])
    ax.imshow(np.clip(blended, 0, 1))
    gh, gw = grid
    for i in range(1, gh):
        ax.axhline(i * h / gh - 0.5, color="w", lw=0.2, alpha=0.5)
    for j in range(1, gw):
        ax.axvline(j * w / gw - 0.5, color="w", lw=0.2, alpha=0.5)
    ax.set_title(title, fontsize=fontsize)
    ax.axis("off")


def plot_mask_voting(samples: Sequence[Sample], boxes_table: pd.DataFrame | None, masks: np.ndarray,
                     grid: tuple[int, int], size: tuple[int, int] = (256, 128)) -> plt.Figure:
    """Figure 6 style: per sample, the calibrated boxes, then each part's voted patch mask.

    ``masks[i]`` is the ``[3, Npatch]`` mask of ``samples[i]``; boxes are drawn at the model input ``size``.
    ``boxes_table=None`` (masks imported with ``muva import-masks``, no boxes): the image alone, then the masks.
    """
    from ..data.datasets import read_image

    if boxes_table is None:
        cols = ()
    else:
        cols = ("cal_x0", "cal_y0", "cal_x1", "cal_y1") if "cal_x0" in boxes_table.columns else ("x0", "y0", "x1", "y1")
    fig, axes = plt.subplots(len(samples), 1 + len(PARTS), figsize=(1.5 * (1 + len(PARTS)), 2.9 * len(samples)),
                             squeeze=False)
    for row, s, sample_masks in zip(axes, samples, masks):
        image = read_image(s.path)
        scale_x, scale_y = size[1] / image.width, size[0] / image.height
        boxes = {} if boxes_table is None else {
            p: (None if b is None else (b[0] * scale_x, b[1] * scale_y, b[2] * scale_x, b[3] * scale_y))
            for p, b in _boxes_of(boxes_table, s.key, cols).items()}
        image = image.resize((size[1], size[0]))
        draw_boxes(row[0], image, boxes, title="calibrated boxes" if boxes_table is not None else "image")
        for ax, (p, part) in zip(row[1:], enumerate(PARTS)):
            overlay_mask(ax, image, sample_masks[p], grid, colour=PART_COLOURS[part],
                         title=f"{part}: {int(sample_masks[p].sum())} patches")
    fig.tight_layout()
    return fig


def _is_integral(values) -> bool:
    values = pd.to_numeric(pd.Series(values), errors="coerce").dropna().to_numpy(dtype=float)
    return len(values) > 0 and bool(np.all(values == np.round(values)))


def plot_curves(history: pd.DataFrame, x: str, ys: Sequence[str], title: str = "", logy: bool = False) -> plt.Figure:
    """Loss / metric curves from a history table (one column per term); an integer ``x`` (epochs)
    gets integer ticks however few epochs there are."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for y in ys:
        if y in history:
            ax.plot(history[x], history[y], label=y, marker="." if len(history) < 40 else None)
    ax.set_xlabel(x)
    if x in history and _is_integral(history[x]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        values = pd.to_numeric(history[x], errors="coerce").dropna()
        if values.nunique() == 1:                     # one epoch: centred, not a +-5 % fractional axis
            ax.set_xlim(float(values.iloc[0]) - 0.5, float(values.iloc[0]) + 0.5)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_training_progress(history: pd.DataFrame) -> plt.Figure:
    """Stage 2 per epoch: training-identity accuracy (left axis, 0-1) and, where the history has them
    (``eval_every``), the held-out source and target mAP (right axis, %; the diagnostics' epochs only)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if "train_id_acc" in history:
        ax.plot(history["epoch"], history["train_id_acc"], marker=".", color="black", label="train-ID accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training-identity accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    handles, labels = ax.get_legend_handles_labels()
    maps = [c for c in history.columns if c.startswith(("heldout_mAP", "target_mAP"))]
    if maps:
        ax2 = ax.twinx()
        for c in maps:
            rows = history[["epoch", c]].dropna()
            style = "--" if c.startswith("target") else "-"
            ax2.plot(rows["epoch"], rows[c], style, marker="o", label=c.replace("_", " "))
        ax2.set_ylabel("mAP (%)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="lower right")
    ax.set_title("stage 2: training identities and held-out mAP")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_cmc(cmc, max_rank: int = 20, title: str = "CMC") -> plt.Figure:
    """A CMC curve: matching rate (%) at ranks 1..``max_rank`` (``cmc[k-1]`` = rate at rank k, in [0, 1]);
    integer rank ticks."""
    cmc = np.asarray(cmc, dtype=float).reshape(-1)[: int(max_rank)]
    if not len(cmc):
        raise ValueError("plot_cmc needs at least one rank of the CMC curve")
    ranks = np.arange(1, len(cmc) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ranks, 100 * cmc, marker=".")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlim(0.5, len(cmc) + 0.5)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_predicted_masks(samples: Sequence[Sample], probabilities: np.ndarray, grid: tuple[int, int],
                         parts: Sequence[str] = PARTS, size: tuple[int, int] = (256, 128)) -> plt.Figure:
    """Figure 7 style: each image, then its predicted mask probability per part (brighter = more focus)."""
    from ..data.datasets import read_image

    n = len(samples)
    fig, axes = plt.subplots(n, 1 + len(parts), figsize=(1.2 * (1 + len(parts)), 2.3 * n), squeeze=False)
    for row, s, probs in zip(axes, samples, probabilities):
        image = read_image(s.path).resize((size[1], size[0]))
        row[0].imshow(image)
        row[0].set_title(Path(s.relpath).name[:12], fontsize=6)
        for ax, part, p in zip(row[1:], parts, probs):
            ax.imshow(mask_to_grid(p, grid), cmap="magma", vmin=0, vmax=1)
            ax.set_title(part, fontsize=7)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    return fig


def display_image(path, size: tuple[int, int]) -> np.ndarray:
    """An image file as uint8 ``[H, W, 3]`` at ``size = (H, W)`` (the network input; bicubic)."""
    from PIL import Image

    from ..data.datasets import read_image

    h, w = size
    return np.asarray(read_image(path).resize((w, h), Image.BICUBIC))
