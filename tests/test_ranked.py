"""Ranked lists, top K, feature files and the feature cache on hand-made features (no model): the numbers the
figures and `muva search` show are the evaluation's."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from muva_core.data.samples import Sample
from muva_core.eval import evaluate_features, pairwise_distance
from muva_core.inference.embed import Embedder, FeatureCache, FeatureTable, image_samples, read_features, write_features
from muva_core.inference.ranked import RankedLists, top_k

from conftest import write_image


def _samples(pids, cams, split):
    return [Sample(f"/x/{split}/{i}.jpg", int(p), int(c), "toy", f"{split}/{p:04d}_c{c}_{i}.jpg")
            for i, (p, c) in enumerate(zip(pids, cams))]


@pytest.fixture
def toy():
    rng = np.random.default_rng(3)
    qp, qc = rng.integers(0, 6, 12), rng.integers(0, 3, 12)
    gp, gc = rng.integers(0, 6, 60), rng.integers(0, 3, 60)
    qf = torch.nn.functional.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    gf = torch.nn.functional.normalize(torch.randn(60, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    return RankedLists(_samples(qp, qc, "q"), _samples(gp, gc, "g"), qf, gf), (qf, gf, qp, gp, qc, gc)


def test_per_query_ap_is_what_the_metrics_average(toy):
    lists, (qf, gf, qp, gp, qc, gc) = toy
    m = evaluate_features(qf, gf, qp, gp, qc, gc)
    assert np.isclose(lists.scores["AP"].mean(), m.mAP) and lists.scores["AP"].notna().sum() == m.num_valid_queries
    assert np.isclose((lists.scores["first_match"] == 1).sum() / m.num_valid_queries, m.rank1)


def test_a_list_leaves_out_the_querys_own_camera_and_its_matches_give_its_ap(toy):
    lists, _ = toy
    for q in range(len(lists.query)):
        s = lists.query[q]
        everything = lists.top(q, k=len(lists.gallery))
        assert not ((everything["pid"] == s.pid) & (everything["camid"] == s.camid)).any()
        assert everything["distance"].is_monotonic_increasing
        hits = np.flatnonzero(everything["match"].to_numpy()) + 1          # 1-based ranks of the true matches
        ap = lists.scores.at[q, "AP"]
        if len(hits):
            assert np.isclose(np.mean(np.arange(1, len(hits) + 1) / hits), ap)
            assert hits[0] == lists.scores.at[q, "first_match"]
            missed = lists.missed(q, k=3)
            assert missed["rank"].tolist() == [h for h in hits if h > 3] and missed["match"].all()
        else:
            assert np.isnan(ap) and lists.label(q) == "no true match in the gallery"


def test_best_median_and_worst_queries(toy):
    lists, _ = toy
    picked = lists.pick()
    aps = lists.scores["AP"].dropna().sort_values(ascending=False)
    assert lists.scores.at[picked["best"], "AP"] == aps.iloc[0] and lists.scores.at[picked["worst"], "AP"] == aps.iloc[-1]
    assert lists.scores.at[picked["median"], "AP"] == aps.iloc[(len(aps) - 1) // 2]
    order = lists.query_order("AP, worst first")
    assert order[0] == picked["worst"] and lists.scores.loc[order, "AP"].dropna().is_monotonic_increasing
    cams = lists.query_order("file name", camera=1)
    assert cams and all(lists.query[q].camid == 1 for q in cams)
    with pytest.raises(ValueError, match="sort must be one of"):
        lists.query_order("by mood")


def test_top_k_is_the_stable_order_of_the_distances():
    qf = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    gf = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [3.0, 0.0]])    # exact ties
    idx, dist = top_k(qf, gf, 4, chunk_size=1)
    assert idx.tolist() == [[1, 3, 0, 2], [0, 2, 1, 3]]                 # ties by gallery index, as the metrics
    assert np.allclose(dist, np.take_along_axis(pairwise_distance(qf, gf).numpy(), idx, 1))
    assert top_k(qf, gf, 99)[0].shape == (2, 5)


def test_feature_files_round_trip(tmp_path):
    for name in ("0002_c3s1_000451_03.jpg", "crop.jpg"):
        write_image(tmp_path / name)
    samples = image_samples([tmp_path / "0002_c3s1_000451_03.jpg", tmp_path / "crop.jpg"])
    feats = np.arange(6, dtype=np.float32).reshape(2, 3)
    table = FeatureTable.of(samples, feats, {"feature_dim": 3, "run": "r"})
    for suffix in ("parquet", "npz"):
        back = read_features(write_features(tmp_path / f"f.{suffix}", table))
        assert back.paths == [str(tmp_path / "0002_c3s1_000451_03.jpg"), str(tmp_path / "crop.jpg")]
        assert np.array_equal(back.features, feats) and back.features.dtype == np.float32
        assert back.has_ids.tolist() == [True, False] and (back.pid[0], back.camid[0]) == (2, 2)
        assert back.meta["run"] == "r" and back.meta["format"] == "muva-features/1"
    frame = pd.read_parquet(tmp_path / "f.parquet")
    assert list(frame.columns) == ["path", "feature", "pid", "camid"] and pd.isna(frame["pid"][1])
    with np.load(tmp_path / "f.npz", allow_pickle=False) as z:                 # no pickle needed to read it
        assert z["feature"].shape == (2, 3)
    (tmp_path / "bad.parquet").write_text("no parquet")
    with pytest.raises(ValueError, match="not a feature file written by `muva embed`"):
        read_features(tmp_path / "bad.parquet")


class CountingEmbedder(Embedder):
    """A real Embedder's cache key and size, with features from the file bytes; counts the files it embeds."""

    def __init__(self):
        super().__init__("test", None, "cpu", meta={"feature_dim": 2, "model": "counting"})
        self.embedded = []

    def __call__(self, samples, progress=True, desc=""):
        self.embedded += [s.path for s in samples]
        return np.array([[len(open(s.path, "rb").read()), i] for i, s in enumerate(samples)], dtype=np.float32)


def test_the_feature_cache_embeds_only_new_or_changed_files(tmp_path):
    paths = [write_image(tmp_path / f"{i}.jpg") for i in range(3)]
    embedder = CountingEmbedder()
    cache = FeatureCache(tmp_path / "cache", embedder)
    first, n = cache.features(image_samples(paths))
    assert n == 3 and len(embedder.embedded) == 3
    again, n = cache.features(image_samples(paths))
    assert n == 0 and np.array_equal(first, again) and len(embedder.embedded) == 3
    write_image(paths[1], color=(1, 2, 3))                       # changed: new size or date
    os.utime(paths[1], ns=(1, 1))
    _, n = cache.features(image_samples(paths + [write_image(tmp_path / "new.jpg")]))
    assert n == 2 and embedder.embedded[3:] == [str(paths[1]), str(tmp_path / "new.jpg")]
    another = CountingEmbedder()
    another.meta["model"] = "another model"
    assert FeatureCache(tmp_path / "cache", another).path != cache.path      # one cache per model
