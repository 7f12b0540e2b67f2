"""The retrieval explorer (notebook 09): choose a query, see its ranked list, its AP and the matches it missed.

A testable core plus a thin ipywidgets layer, like the part-mask explorer (:mod:`.explorer`):

* :class:`RetrievalState` - what is shown: the query, how the query list is sorted (by AP, worst or best
  first, or by file name), the camera it is filtered to, K, whether the part masks are drawn;
* :class:`RetrievalExplorer` - the :class:`~muva_core.inference.ranked.RankedLists` of a trained run on
  its target's query / gallery, :meth:`~RetrievalExplorer.render` (the top K with distances, then the true
  matches beyond K with their ranks) and :meth:`~RetrievalExplorer.widget`, whose executed copy keeps the
  current figure as a static PNG (an untrusted notebook renders no widget).
"""
from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from .ranked import QUERY_SORTS

if TYPE_CHECKING:  # annotations only: the lists are built by muva_core.inference (above this package)
    from ..inference.ranked import RankedLists

__all__ = ["ALL_CAMERAS", "RetrievalExplorer", "RetrievalState"]

ALL_CAMERAS = "all"


@dataclass(frozen=True)
class RetrievalState:
    """query: index into the queries; sort: one of ``QUERY_SORTS``; camera: a query camid or ``"all"``; k: the
    gallery images shown; masks: draw the predicted part masks."""

    query: int
    sort: str = QUERY_SORTS[0]
    camera: int | str = ALL_CAMERAS
    k: int = 10
    masks: bool = False

    def replace(self, **changes) -> "RetrievalState":
        return dataclasses.replace(self, **changes)


class RetrievalExplorer:
    """Ranked lists of a trained run's target queries, one query at a time.

    lists:     the :class:`RankedLists` (features, per-query AP, masks)
    size:      images are shown at the network input ``(H, W)``
    threshold: the mask-gating threshold the masks are drawn at
    source:    a line saying where the lists come from (shown in the caption)
    """

    def __init__(self, lists: RankedLists, size: tuple[int, int] = (256, 128), threshold: float = 0.5,
                 source: str = "") -> None:
        if not lists.query or not lists.gallery:
            raise ValueError("the retrieval explorer needs query and gallery images")
        self.lists = lists
        self.size = (int(size[0]), int(size[1]))
        self.threshold = float(threshold)
        self.source = source
        self.state = self.default_state()
        self.controls: dict = {}
        self.image_widget = self.caption_widget = None

    # ------------------------------------------------------------------ choices
    @property
    def has_masks(self) -> bool:
        return self.lists.query_masks is not None

    @property
    def cameras(self) -> list[int]:
        return sorted(int(c) for c in self.lists.scores["camid"].unique())

    def default_state(self) -> RetrievalState:
        """The worst-AP query first (the list a user learns most from), top 10, masks off."""
        order = self.lists.query_order(QUERY_SORTS[0])
        return RetrievalState(query=order[0], k=min(10, len(self.lists.gallery)))

    def choices(self, state: RetrievalState) -> list[tuple[str, int]]:
        """``(label, query index)`` of the queries the state's sort and camera give, in order."""
        camera = None if state.camera == ALL_CAMERAS else int(state.camera)
        scores = self.lists.scores
        out = []
        for q in self.lists.query_order(state.sort, camera):
            ap = scores.at[q, "AP"]
            ap_text = "no match" if ap != ap else f"AP {ap:.2f}"
            out.append((f"{ap_text} · cam {scores.at[q, 'camid']} · {scores.at[q, 'image'].rpartition('/')[2]}", q))
        return out

    def check(self, state: RetrievalState) -> RetrievalState:
        if not 0 <= int(state.query) < len(self.lists.query):
            raise ValueError(f"query must be 0..{len(self.lists.query) - 1}, got {state.query}")
        if state.sort not in QUERY_SORTS:
            raise ValueError(f"sort must be one of {QUERY_SORTS}, got {state.sort!r}")
        if state.camera != ALL_CAMERAS and int(state.camera) not in self.cameras:
            raise ValueError(f"camera must be {ALL_CAMERAS!r} or one of {self.cameras}, got {state.camera!r}")
        if not 1 <= int(state.k) <= len(self.lists.gallery):
            raise ValueError(f"k must be 1..{len(self.lists.gallery)}, got {state.k}")
        if state.masks and not self.has_masks:
            raise ValueError("this model predicts no part masks")
        return state

    # ------------------------------------------------------------------ one query
    def render(self, state: RetrievalState | None = None) -> Figure:
        """The query and its top K; below, the true matches beyond K (up to K of them) with their ranks."""
        from .ranked import Panel, display_image, gallery_title, plot_ranked_rows

        state = self.check(state or self.state)
        lists, q = self.lists, int(state.query)
        rows = [(f"top {state.k}\n{lists.label(q)}", lists.panels(q, state.k, self.size, state.masks))]
        missed = lists.missed(q, state.k)
        if len(missed):
            shown = missed.head(state.k)
            panels = [Panel(display_image(lists.gallery[row.gallery].path, self.size),
                            gallery_title(row.rank, row.distance, row.image.rpartition("/")[2]), True,
                            lists.masks_of("gallery", row.gallery) if state.masks else None)
                      for row in shown.itertuples()]
            rows.append((f"missed: {len(missed)} true\nmatch{'es' if len(missed) > 1 else ''} beyond #{state.k}",
                         panels))
        return plot_ranked_rows(rows, parts=lists.parts, grid=lists.grid, threshold=self.threshold,
                                note="same-identity images from the query's own camera are left out (the protocol)")

    def render_png(self, state: RetrievalState | None = None, dpi: int = 100) -> bytes:
        from .explorer import figure_png

        return figure_png(self.render(state), dpi=dpi)

    def caption(self, state: RetrievalState | None = None) -> str:
        """HTML: the query's file, identity, camera, AP, first-match rank, matches and the ones missed."""
        state = state or self.state
        q = int(state.query)
        row = self.lists.scores.iloc[q]
        missed = self.lists.missed(q, state.k)
        lost = ", ".join(f"#{r.rank} {html.escape(r.image.rpartition('/')[2])}" for r in missed.head(10).itertuples())
        return (f"<b>{html.escape(self.lists.query[q].key)}</b> &nbsp; pid {row['pid']}, camid {row['camid']} &nbsp; "
                f"<b>{html.escape(self.lists.label(q))}</b>, {row['matches']} true matches; missed in the top "
                f"{state.k}: {len(missed)}{(' (' + lost + ('…' if len(missed) > 10 else '') + ')') if lost else ''}"
                f"<br><i>{html.escape(self.source)}</i>")

    # ------------------------------------------------------------------ widgets
    def widget(self, state: RetrievalState | None = None):
        """Controls (sort, camera, query, K, masks) above the ranked list; the controls are kept in
        ``self.controls``, the image in ``self.image_widget``. Displays with the image as a static ``image/png``
        beside the widget view (what an executed, untrusted copy shows)."""
        import ipywidgets as W

        from .explorer import figure_png, static_png_box_class

        self.state = self.check(state or self.state)
        s = self.state
        sort = W.ToggleButtons(options=list(QUERY_SORTS), value=s.sort, description="sort")
        camera = W.Dropdown(options=[("all", ALL_CAMERAS)] + [(str(c), c) for c in self.cameras], value=s.camera,
                            description="camera")
        query = W.Dropdown(options=self.choices(s), value=s.query, description="query",
                           layout=W.Layout(width="520px"))
        k = W.IntSlider(value=s.k, min=1, max=min(30, len(self.lists.gallery)), description="top K",
                        continuous_update=False)
        masks = W.Checkbox(value=s.masks, description="part masks", disabled=not self.has_masks)
        query.add_class("muva-retrieval-query")
        self.controls = {"sort": sort, "camera": camera, "query": query, "k": k, "masks": masks}
        self.image_widget = W.Image(format="png")
        self.image_widget.add_class("muva-retrieval-image")
        self.caption_widget = W.HTML()
        busy = [False]

        def refresh(_=None) -> None:
            if busy[0] or query.value is None:
                return
            self.state = RetrievalState(query=int(query.value), sort=sort.value, camera=camera.value, k=int(k.value),
                                        masks=bool(masks.value))
            self.image_widget.value = figure_png(self.render(self.state))
            self.caption_widget.value = self.caption(self.state)

        def on_filter(_=None) -> None:
            busy[0] = True
            try:
                options = self.choices(RetrievalState(query=0, sort=sort.value, camera=camera.value))
                current = query.value
                query.options = options
                ids = [q for _, q in options]
                query.value = current if current in ids else (ids[0] if ids else None)
            finally:
                busy[0] = False
            refresh()

        sort.observe(on_filter, "value")
        camera.observe(on_filter, "value")
        for control in (query, k, masks):
            control.observe(refresh, "value")
        refresh()
        box = static_png_box_class()([W.VBox([sort, camera, query, k, masks]), self.caption_widget,
                                      self.image_widget])
        box.static_png = lambda: bytes(self.image_widget.value)
        box.static_text = lambda: (f"retrieval explorer: query {self.state.query} "
                                   f"({self.lists.query[self.state.query].key}); interactive in a trusted notebook "
                                   "with a running kernel")
        return box
