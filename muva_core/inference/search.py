"""``muva search``: rank a gallery for each query image with a trained run, and show the ranked lists.

    result = search("reports/synth_A2B/run-2e76cf80", query="probe.jpg", gallery="crops/", out="search/", top=10)

writes ``out/ranks.csv`` (columns ``query``, ``rank``, ``gallery``, ``distance``; rank 1 = nearest, ties by
gallery order as in the metrics), one PNG per query (the query, then its top K with their distances; green /
red frames where both file names carry Market-style ids, the predicted part masks when ``masks=True``) and
``out/index.html`` linking them. Query and gallery features come from a :class:`~.embed.FeatureCache` under
``<cache_dir>/features`` keyed by each file's size and modification time, so a second search over the same
gallery embeds nothing; the gallery may also be a feature file written by ``muva embed``.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.samples import Sample
from .embed import (
    Embedder,
    FeatureCache,
    collect_images,
    image_samples,
    is_feature_file,
    market_ids,
    read_features,
    scan_images,
)

__all__ = ["SearchResult", "search"]


@dataclass
class SearchResult:
    """What :func:`search` did: the output folder, the ranks table, and how many features it computed."""

    out: Path
    ranks: pd.DataFrame
    queries: int
    gallery: int
    embedded_queries: int
    embedded_gallery: int
    figures: list[Path]

    @property
    def cached_gallery(self) -> int:
        return self.gallery - self.embedded_gallery


def _gallery_from_file(path: Path, embedder: Embedder) -> tuple[list[Sample], np.ndarray]:
    table = read_features(path, "--gallery")
    meta = table.meta
    if table.features.shape[1] != embedder.feature_dim:
        raise ValueError(f"--gallery {path}: {table.features.shape[1]}-d features, but the model gives "
                         f"{embedder.feature_dim}-d ones (embed the gallery with this run)")
    mine, theirs = embedder.meta.get("config_hash"), meta.get("config_hash")
    if mine and theirs and mine != theirs:
        raise ValueError(f"--gallery {path}: features of another run (config hash {theirs}, made from "
                         f"{meta.get('run', '?')}), not of this one ({mine}); embed the gallery with this run")
    return image_samples(table.paths), table.features


def _figure_name(i: int, sample: Sample) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(sample.path).stem)
    return f"q{i + 1:04d}_{stem}.png"


def _match(query: Sample, gallery: Sample) -> bool | None:
    q, g = market_ids(query.path), market_ids(gallery.path)
    return None if q is None or g is None else q[0] == g[0]


def _write_index(out: Path, rows: list[tuple[Sample, str, pd.DataFrame]], top: int, note: str) -> Path:
    from ..io import atomic_path

    items = []
    for sample, figure, ranked in rows:
        first = ranked.iloc[0] if len(ranked) else None
        best = (f"{html.escape(Path(first['gallery']).name)} (d {first['distance']:.3f})" if first is not None
                else "-")
        items.append(f'<tr><td><a href="{html.escape(figure)}"><img src="{html.escape(figure)}" height="120"></a>'
                     f'</td><td>{html.escape(sample.path)}</td><td>{best}</td></tr>')
    text = ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>muva search</title></head><body>\n"
            f"<h1>muva search: {len(rows)} queries, top {top}</h1>\n<p>{html.escape(note)}</p>\n"
            "<p>Every ranking is in <a href=\"ranks.csv\">ranks.csv</a>.</p>\n"
            "<table border=\"1\" cellpadding=\"4\">\n<tr><th>ranked list</th><th>query</th><th>nearest</th></tr>\n"
            + "\n".join(items) + "\n</table>\n</body></html>\n")
    path = out / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def search(query, gallery, out: str | os.PathLike, run: str | os.PathLike | None = None,
           onnx: str | os.PathLike | None = None, device: str | None = None, top: int = 10, masks: bool = False,
           progress: bool = True, embedder: Embedder | None = None) -> SearchResult:
    """Rank ``gallery`` (images: a folder, glob or file; or a ``muva embed`` feature file) for each image of
    ``query`` with the model of ``run`` (or the ``onnx`` file; or a ready ``embedder``) and write
    ``out/ranks.csv``, one PNG per query and ``out/index.html``.

    Checked before any feature is computed: ``top`` >= 1, the query and gallery images exist and all decode
    (every unreadable file in one message), a gallery feature file matches the model, ``masks`` needs a model
    that predicts part masks."""
    from ..io import atomic_path
    from ..paths import resolve
    from ..viz.explorer import figure_png
    from ..viz.ranked import Panel, display_image, gallery_title, plot_ranked_rows, query_title
    from .embed import load_embedder
    from .ranked import top_k

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"--top must be a whole number >= 1, got {top!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if masks and embedder is None and run is None:
        raise ValueError("--masks needs the run (--run): the part masks come from its PyTorch model, an ONNX file "
                         "gives only the features")
    queries = image_samples(collect_images(query, "--query"))
    gallery_file = is_feature_file(gallery) and Path(gallery).is_file()
    gallery_samples = None if gallery_file else image_samples(collect_images(gallery, "--gallery"))
    embedder = embedder or load_embedder(run, onnx, device)
    model = embedder.model
    if masks and (model is None or getattr(model.encoder, "rmp", None) is None or not model.encoder.n_parts):
        raise ValueError("--masks: the model predicts no part masks (granularity G or stripe masks)"
                         if model is not None else "--masks needs the run (--run)")
    gallery_feats = None
    if gallery_file:
        gallery_samples, gallery_feats = _gallery_from_file(Path(gallery), embedder)
    scan_images(embedder, [*queries, *gallery_samples], progress=progress,
                what=f"images of --query {query} and --gallery {gallery}")

    cache = FeatureCache(resolve(embedder.cfg.grounding.cache_dir) / "features", embedder)
    qf, n_q = cache.features(queries, progress=progress, desc="query features")
    n_g = 0
    if gallery_feats is None:
        gallery_feats, n_g = cache.features(gallery_samples, progress=progress, desc="gallery features")
    metric = embedder.meta.get("metric", "euclidean")
    order, dist = top_k(qf, gallery_feats, top, metric=metric)

    rows, figures, index_rows = [], [], []
    out.mkdir(parents=True, exist_ok=True)
    size = (embedder.cfg.data.height, embedder.cfg.data.width)
    predict = None
    if masks:
        from ..eval.features import test_transform
        from ..viz.explorer import PredictedMasks, select_layer

        predictor = PredictedMasks(model.encoder, test_transform(embedder.cfg))
        predict = lambda s: select_layer(predictor(s))  # noqa: E731
    for i, q in enumerate(queries):
        ranked = pd.DataFrame({"query": q.path, "rank": np.arange(1, order.shape[1] + 1),
                               "gallery": [gallery_samples[j].path for j in order[i]], "distance": dist[i]})
        rows.append(ranked)
        panels = [Panel(display_image(q.path, size), query_title(Path(q.path).name), "query",
                        predict(q) if predict else None)]
        for rank, (j, d) in enumerate(zip(order[i], dist[i]), start=1):
            g = gallery_samples[j]
            panels.append(Panel(display_image(g.path, size), gallery_title(rank, float(d), Path(g.path).name),
                                _match(q, g), predict(g) if predict else None))
        fig = plot_ranked_rows([(f"query {i + 1}", panels)], parts=tuple(model.parts) if predict else (),
                               grid=tuple(model.encoder.grid) if predict else (16, 8),
                               note="frames where the file names carry ids (Market-style)")
        name = _figure_name(i, q)
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(figure_png(fig))
        figures.append(out / name)
        index_rows.append((q, name, ranked))
    ranks = pd.concat(rows, ignore_index=True)
    with atomic_path(out / "ranks.csv") as tmp:
        ranks.to_csv(tmp, index=False, float_format="%.6f")
    _write_index(out, index_rows, top, f"model: {embedder.meta.get('run') or embedder.meta.get('onnx', {}).get('file')}"
                                       f" ({embedder.kind}); distance: {metric}")
    return SearchResult(out, ranks, len(queries), len(gallery_samples), n_q, n_g, figures)
