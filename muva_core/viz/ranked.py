"""Ranked-list figures: a query, then its nearest gallery images with their distances.

Frames: blue for the query, green for a gallery image of the query's identity, red for another identity,
grey where the identities are not known (file names that carry no ids). With part masks, each image
shows its predicted masks (thresholded) in the part colours of :data:`~muva_core.viz.plots.PART_COLOURS`.
Drawn with no state, so notebooks 06 and 09, ``muva search`` and the demo's figure share it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from .plots import PART_COLOURS, blend_parts, display_image

QUERY_SORTS: tuple[str, ...] = ("AP, worst first", "AP, best first", "file name")
"""The orders in which the queries of a ranked list can be browsed."""

__all__ = ["FRAME_COLOURS", "Panel", "display_image", "gallery_title", "plot_ranked_rows", "query_title"]

FRAME_COLOURS = {"query": "#1f77b4", True: "#2ca02c", False: "#d62728", None: "#7f7f7f"}
"""Frame colour of the query panel and of a gallery panel by ``match`` (same identity, other, unknown)."""


@dataclass
class Panel:
    """One image of a ranked list: ``image`` uint8 ``[H, W, 3]``, its ``title``, ``match`` (True / False / None;
    ``"query"`` for the query) and, optionally, part-mask probabilities ``[P, Npatch]``."""

    image: np.ndarray
    title: str
    match: bool | str | None = None
    masks: np.ndarray | None = None


def _short(text: str, width: int = 22) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def plot_ranked_rows(rows: Sequence[tuple[str, Sequence[Panel]]], parts: Sequence[str] = (),
                     grid: tuple[int, int] = (16, 8), threshold: float = 0.5,
                     panel_size: tuple[float, float] = (1.45, 2.9), note: str | None = None) -> Figure:
    """One row per ranked list (``(label, [query panel, gallery panels ...])``), labelled on the left; a legend
    of the frames (and of the part colours when masks are drawn) at the bottom."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("no ranked list to draw")
    n_cols = max(len(panels) for _, panels in rows)
    fig = Figure(figsize=(panel_size[0] * n_cols + 0.8, (panel_size[1] + 0.45) * len(rows) + 0.7), layout="compressed")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    masked = False
    for r, (label, panels) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.axis("off")
                continue
            p = panels[c]
            image = p.image
            if p.masks is not None and len(parts):
                image = blend_parts(image, np.asarray(p.masks) > threshold, parts, grid)
                masked = True
            ax.imshow(image)
            colour = FRAME_COLOURS.get(p.match, FRAME_COLOURS[None])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4 if p.match is not None else 1.5)
            ax.set_title(p.title, fontsize=8, color="black")
        axes[r][0].set_ylabel(label, fontsize=9)
    handles = [Patch(facecolor="none", edgecolor=FRAME_COLOURS[k], linewidth=3, label=t) for k, t in
               (("query", "query"), (True, "same identity"), (False, "other identity"))]
    if masked:
        handles += [Patch(facecolor=PART_COLOURS.get(p, "y"), alpha=0.8, label=p) for p in parts]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False,
               title=note, title_fontsize=8)
    return fig


def gallery_title(rank: int, distance: float, name: str) -> str:
    return f"#{rank}  d {distance:.3g}\n{_short(name)}"


def query_title(name: str, extra: str = "") -> str:
    return f"query{('  ' + extra) if extra else ''}\n{_short(name)}"
