"""The synthetic multi-domain dataset: layout, determinism, ground truth, domains, families."""
from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from muva_core.data import synthetic as syn
from muva_core.data.synthetic import (
    DOMAIN_STYLES,
    SCALES,
    generate_synthetic,
    load_attributes,
    load_part_boxes,
    render_person,
    sample_identity,
    sample_pose,
)

NAME = re.compile(r"^(-1|\d{4})_c(\d)s1_(\d{6})_(\d{2})\.jpg$")
SPLITS = ("bounding_box_train", "query", "bounding_box_test")
DOMAINS = ("A", "B", "C", "D")
H, W = 256, 128


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "out", seed=0, scale="small", workers=2,
                              progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _parse(name: str) -> tuple[int, int]:
    m = NAME.match(name)
    assert m, f"bad Market name {name}"
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------------

def test_layout_and_market_naming(root):
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["scale"] == "small" and manifest["version"] == syn.GENERATOR_VERSION
    assert sorted(manifest["domains"]) == list(DOMAINS)
    assert not list(root.glob(".synth-tmp-*")), "the temporary folder must be gone"
    for d in DOMAINS:
        droot = root / f"synth_{d}"
        n_cams = DOMAIN_STYLES[d]["n_cams"]
        assert len(manifest["domains"][d]["cameras"]) == n_cams
        by_split = {}
        for split in SPLITS:
            names = sorted(p.name for p in (droot / split).iterdir())
            assert names, f"{d}/{split} is empty"
            parsed = [_parse(n) for n in names]
            assert all(1 <= c <= n_cams for _, c in parsed)
            by_split[split] = parsed
        # junk (-1) and distractors (0000) exist, in the gallery only
        gallery_pids = {p for p, _ in by_split["bounding_box_test"]}
        assert -1 in gallery_pids and 0 in gallery_pids
        for split in ("bounding_box_train", "query"):
            assert all(p > 0 for p, _ in by_split[split]), f"{d}/{split} holds junk or distractors"
        # query: at most one image per id and camera, and each query id has a gallery match in another camera
        q = by_split["query"]
        assert len(q) == len(set(q))
        gal = {(p, c) for p, c in by_split["bounding_box_test"] if p > 0}
        for p, c in q:
            assert any(gp == p and gc != c for gp, gc in gal), f"{d}: query {p} c{c} has no cross-camera match"
        # train / test identities are disjoint
        train_ids = {p for p, _ in by_split["bounding_box_train"]}
        test_ids = {p for p, _ in q} | {p for p, _ in gal}
        assert train_ids and test_ids and not train_ids & test_ids
        counts = manifest["domains"][d]["counts"]
        assert counts["images"] == sum(len(v) for v in by_split.values())
        assert counts["junk"] == sum(p == -1 for p, _ in by_split["bounding_box_test"])
    with Image.open(next((root / "synth_A" / "query").iterdir())) as im:
        assert im.format == "JPEG" and im.size == (W, H) and im.mode == "RGB"


def test_deterministic_across_runs_and_workers(root, tmp_path):
    again = generate_synthetic(tmp_path / "again", seed=0, scale="small", workers=1, progress=False)
    a, b = _files(root), _files(again)
    assert sorted(a) == sorted(b)
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"{len(diff)} files differ, e.g. {diff[:3]}"
    other = generate_synthetic(tmp_path / "other", seed=1, scale="small", domains=("A",), progress=False)
    c = _files(other / "synth_A")
    a_dom = _files(root / "synth_A")
    same_names = set(c) & set(a_dom)
    assert set(c) != set(a_dom) or any(c[k] != a_dom[k] for k in same_names)
    imgs = [k for k in same_names if k.endswith(".jpg")]
    assert all(c[k] != a_dom[k] for k in imgs)


def test_part_boxes_complete_and_consistent(root):
    for d in DOMAINS:
        droot = root / f"synth_{d}"
        df = load_part_boxes(droot)
        assert list(df.columns) == list(syn.PART_BOX_COLUMNS)
        on_disk = {p.relative_to(droot).as_posix() for s in SPLITS for p in (droot / s).iterdir()}
        assert set(df.relpath) == on_disk
        per = df.groupby("relpath").part.apply(sorted)
        assert all(v == sorted(["head", "upper", "legs", "person"]) for v in per)
        assert (df.img_w == W).all() and (df.img_h == H).all()
        assert (df.x0 >= 0).all() and (df.y0 >= 0).all() and (df.x1 <= W).all() and (df.y1 <= H).all()
        assert (df.x0 <= df.x1).all() and (df.y0 <= df.y1).all()
        assert df.visible.between(0, 1).all()

        wide = df.pivot(index="relpath", columns="part", values=["x0", "y0", "x1", "y1", "visible"])
        normal = [r for r in wide.index if not Path(r).name.startswith("-1_")]
        w = wide.loc[normal]
        cy = {p: (w[("y0", p)] + w[("y1", p)]) / 2 for p in ("head", "upper", "legs")}
        assert (cy["head"] < cy["upper"]).all() and (cy["upper"] < cy["legs"]).all()
        for p in ("head", "upper", "legs"):
            assert ((w[("x1", p)] - w[("x0", p)]) > 2).all() and ((w[("y1", p)] - w[("y0", p)]) > 2).all()
            assert (w[("x0", p)] >= w[("x0", "person")] - 1e-6).all() and (w[("y1", p)] <= w[("y1", "person")] + 1e-6).all()
        # an identity's detection shows the whole person, tightly framed (distractors are looser)
        ident = wide.loc[[r for r in normal if _parse(Path(r).name)[0] > 0]]
        assert (ident[("y0", "head")] > 0).all() and (ident[("y1", "legs")] < H).all()
        assert ((ident[("y1", "person")] - ident[("y0", "person")]) > 0.7 * H).all()
        # junk crops cut the body: their person box is clipped, so something is out of the frame
        junk = wide.loc[[r for r in wide.index if Path(r).name.startswith("-1_")]]
        assert (junk[("visible", "person")] < 1.0).all()
    allv = np.concatenate([load_part_boxes(root / f"synth_{d}").visible.to_numpy() for d in DOMAINS])
    assert 0.02 < (allv < 0.999).mean() < 0.5, "some, not most, parts are occluded"


def test_boxes_follow_the_drawn_pose():
    attrs = sample_identity(np.random.default_rng(3))
    pose = sample_pose(np.random.default_rng(4), "normal")
    pose = dict(pose, occluder=None, cx=0.5, height=0.85, foot=0.98)
    _, a = render_person(attrs, pose, None, np.random.default_rng(0))
    _, b = render_person(attrs, dict(pose, cx=0.6), None, np.random.default_rng(0))
    _, c = render_person(attrs, dict(pose, height=0.7), None, np.random.default_rng(0))
    for p in ("head", "upper", "legs", "person"):
        assert b[p].x0 - a[p].x0 == pytest.approx(0.1 * W, abs=0.6)
        assert a[p].visible == pytest.approx(1.0)
    ha, hc = a["person"].y1 - a["person"].y0, c["person"].y1 - c["person"].y0
    assert hc / ha == pytest.approx(0.7 / 0.85, rel=0.03)
    # the rendered pixels agree with the boxes: the person is darker/different from a plain background
    img, gt = render_person(attrs, pose, None, np.random.default_rng(0))
    arr = np.asarray(img, dtype=np.float32)
    x0, y0, x1, y1 = (int(round(v)) for v in gt["person"].box)
    outside = np.concatenate([arr[:, : max(1, x0 - 2)].reshape(-1, 3), arr[:, min(W - 1, x1 + 2):].reshape(-1, 3)])
    assert outside.std(axis=0).max() < 25, "outside the person box there is only the plain background"


def _stats(root: Path, d: str) -> dict[str, float]:
    files = sorted((root / f"synth_{d}" / "bounding_box_train").iterdir())[:25]
    arr = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files])
    lum = arr @ np.asarray([0.299, 0.587, 0.114], np.float32)
    lap = np.abs(lum[:, 1:-1, 1:-1] * 4 - lum[:, :-2, 1:-1] - lum[:, 2:, 1:-1] - lum[:, 1:-1, :-2] - lum[:, 1:-1, 2:])
    return {"lum": float(lum.mean()), "blue_red": float(arr[..., 2].mean() / arr[..., 0].mean()),
            "contrast": float(lum.std(axis=(1, 2)).mean()), "detail": float(lap.mean())}


def test_domains_have_clearly_different_styles(root):
    s = {d: _stats(root, d) for d in DOMAINS}
    assert s["B"]["lum"] < s["A"]["lum"] - 50, s  # dark vs bright
    assert s["B"]["blue_red"] < 0.8 < 1.05 < s["C"]["blue_red"], s  # warm vs cool cast
    assert s["C"]["detail"] < 0.6 * min(s[d]["detail"] for d in "ABD"), s  # low-res, blurry
    assert s["D"]["detail"] > 1.5 * s["A"]["detail"], s  # noisy
    assert s["D"]["contrast"] > max(s[d]["contrast"] for d in "BC"), s
    # cameras inside a domain differ too
    cams = json.loads((root / "manifest.json").read_text())["domains"]["A"]["cameras"]
    assert len({(c["brightness"], tuple(c["cast"]), tuple(c["wall_rgb"])) for c in cams}) == len(cams)


def test_identities_disjoint_across_domains_and_splits(root):
    seen_pids: set[int] = set()
    seen_attrs: list[str] = []
    for d in DOMAINS:
        doc = load_attributes(root / f"synth_{d}")
        assert doc["domain"] == d and doc["seed"] == 0
        pids = {int(p) for p in doc["identities"]}
        assert len(pids) == SCALES["small"]["ids_per_domain"]
        assert not pids & seen_pids
        seen_pids |= pids
        attrs = [json.dumps(v["attrs"], sort_keys=True) for v in doc["identities"].values()]
        assert len(set(attrs)) == len(attrs)
        assert not set(attrs) & set(seen_attrs)
        seen_attrs += attrs
        # a family lives in one split; file pids agree with the attribute file
        for fam in doc["families"].values():
            assert len({doc["identities"][f"{p:04d}"]["split"] for p in fam["pids"]}) == 1
        train_files = {_parse(p.name)[0] for p in (root / f"synth_{d}" / "bounding_box_train").iterdir()}
        assert train_files == {int(p) for p, v in doc["identities"].items() if v["split"] == "train"}


def test_family_members_differ_in_exactly_one_part(root):
    n_pairs = 0
    varied = set()
    for d in DOMAINS:
        doc = load_attributes(root / f"synth_{d}")
        ids = doc["identities"]
        for fam_id, fam in doc["families"].items():
            assert len(fam["pids"]) >= 2, fam_id
            varied.add(fam["varied_part"])
            for p, q in itertools.combinations(fam["pids"], 2):
                a, b = ids[f"{p:04d}"]["attrs"], ids[f"{q:04d}"]["attrs"]
                diff = [part for part in ("head", "upper", "legs") if a[part] != b[part]]
                assert diff == [fam["varied_part"]], (fam_id, p, q, diff)
                assert a["body"] == b["body"]
                fields = syn._GROUP_FIELDS[fam["varied_attr"]]
                assert any(a[diff[0]][f] != b[diff[0]][f] for f in fields)
                n_pairs += 1
    assert n_pairs >= 16 and varied == {"head", "upper", "legs"}


def test_colour_histograms_find_the_family(root):
    """Sanity: an identity looks the same across images, and siblings look alike: the nearest
    cross-camera neighbour of a query under a global colour histogram of the person box is in the
    query's family far more often than chance."""
    def feat(path: Path, box) -> np.ndarray:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        a = np.asarray(Image.open(path).convert("HSV"))[y0:y1, x0:x1].astype(np.int64)
        q = (a[..., 0] * 6 // 256) * 24 + (a[..., 1] * 6 // 256) * 4 + a[..., 2] * 4 // 256
        h = np.bincount(q.ravel(), minlength=144).astype(np.float64)
        return np.sqrt(h / h.sum())

    hits, chance = [], []
    for d in DOMAINS:
        droot = root / f"synth_{d}"
        boxes = load_part_boxes(droot).query("part == 'person'").set_index("relpath")[["x0", "y0", "x1", "y1"]]
        fam = {int(k): v["family"] for k, v in load_attributes(droot)["identities"].items()}
        f = lambda p: feat(p, boxes.loc[p.relative_to(droot).as_posix()])  # noqa: E731
        g = [p for p in sorted((droot / "bounding_box_test").iterdir()) if _parse(p.name)[0] > 0]
        G, gid = np.stack([f(p) for p in g]), [_parse(p.name) for p in g]
        for p in sorted((droot / "query").iterdir()):
            pid, cam = _parse(p.name)
            keep = [i for i, (gp, gc) in enumerate(gid) if not (gp == pid and gc == cam)]
            best = gid[keep[int(np.argmin(((G[keep] - f(p)) ** 2).sum(1)))]][0]
            hits.append(fam[best] == fam[pid])
            chance.append(np.mean([fam[gid[i][0]] == fam[pid] for i in keep]))
    assert np.mean(hits) > 0.6 and np.mean(hits) > 1.5 * np.mean(chance), (np.mean(hits), np.mean(chance))


def test_rerun_is_skipped_and_mismatch_fails(root, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    t = time.perf_counter()
    assert generate_synthetic(root, seed=0, scale="small", progress=False) == root
    assert generate_synthetic(root, seed=0, scale="small", domains=("B",), progress=False) == root
    assert time.perf_counter() - t < 1.0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_synthetic(root, seed=1, scale="small", progress=False)
    with pytest.raises(FileExistsError, match="scale"):
        generate_synthetic(root, seed=0, scale="default", progress=False)
    with pytest.raises(ValueError, match="unknown scale"):
        generate_synthetic(tmp_path / "x", scale="huge")
    with pytest.raises(ValueError, match="unknown domain"):
        generate_synthetic(tmp_path / "x", domains=("Z",))
    # missing domains are added beside the existing ones, which stay untouched
    out = generate_synthetic(tmp_path / "ow", seed=0, scale="small", domains=("A",), progress=False)
    a_before = _files(out / "synth_A")
    mtime = (out / "synth_A" / "part_boxes.parquet").stat().st_mtime_ns
    generate_synthetic(out, seed=0, scale="small", domains=("A", "B"), progress=False)
    assert list(json.loads((out / "manifest.json").read_text())["domains"]) == ["A", "B"]
    assert (out / "synth_A" / "part_boxes.parquet").stat().st_mtime_ns == mtime
    assert _files(out / "synth_B") == _files(root / "synth_B") and a_before == _files(root / "synth_A")
    # overwrite replaces the old dataset, domains that are no longer requested included
    out = generate_synthetic(out, seed=5, scale="small", domains=("A",), overwrite=True, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["seed"] == 5 and list(m["domains"]) == ["A"]
    assert not (out / "synth_B").exists() and load_attributes(out / "synth_A")["seed"] == 5


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(syn, "_run_jobs", boom)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path / "cut", seed=0, scale="small", progress=False)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == []


def test_a_foreign_folder_is_not_replaced(tmp_path):
    (tmp_path / "synth_A").mkdir()
    (tmp_path / "synth_A" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not written by"):
        generate_synthetic(tmp_path, seed=0, scale="small", domains=("A",), progress=False)
    assert (tmp_path / "synth_A" / "mine.txt").read_text() == "keep"


def test_the_market_parser_reads_it(root):
    from muva_core.data.datasets import load_dataset

    ds = load_dataset("synth_C", root)
    assert ds.train and ds.query and ds.gallery
    assert all(s.domain == "synth_C" and s.pid != -1 for s in ds.gallery)
    assert any(s.pid == 0 for s in ds.gallery)
    assert {s.relpath for s in ds.query} <= set(load_part_boxes(root / "synth_C").relpath)


# ---- target splits large enough to rank (issue 13) ----------------------------------------------

def _valid_queries(plan: dict) -> int:
    """Queries with a gallery image of the same identity from another camera (the evaluation's valid ones)."""
    gallery = {(im["pid"], im["cam"]) for im in plan["images"] if im["split"] == "gallery" and im["pid"] > 0}
    return sum(any(p == im["pid"] and c != im["cam"] for p, c in gallery)
               for im in plan["images"] if im["split"] == "query")


@pytest.mark.parametrize("scale", ["default", "evidence"])
def test_every_target_of_the_demo_and_the_evidence_has_300_valid_queries(scale):
    """Planned, not rendered (a second): every synthetic target the README and the evidence page use (B for the
    demo, D for synth:C2D, A for synth:B+C+D->A; C too) ranks >= 300 valid queries against a gallery 2.5-6 times
    as large, while each domain keeps about 50 training identities (the training time of the demo)."""
    for d in DOMAINS:
        plan = syn._plan_domain(0, d, scale)
        counts = syn._counts(plan)
        assert _valid_queries(plan) >= 300, (d, counts)
        assert 48 <= counts["train_ids"] <= 56 and 400 <= counts["train_images"] <= 650, (d, counts)
        assert 2.5 <= counts["gallery_images"] / counts["query_images"] <= 6.0, (d, counts)
    assert _valid_queries(syn._plan_domain(0, "B", scale)) == syn._counts(syn._plan_domain(0, "B", scale))["test_ids"]


def test_train_ids_and_test_images_per_id_shape_the_splits(tmp_path, monkeypatch):
    """The two keys of the larger splits, rendered at a test size: whole families fill the training split up to
    ``train_ids``; test identities get ``test_images_per_id`` images; the files follow the plan."""
    spec = {"description": "test: few train ids, many small test ids", "ids_per_domain": 24, "train_ids": 6,
            "images_per_id": [5, 6], "test_images_per_id": [2, 3], "distractor_frac": 0.0, "junk_frac": 0.0,
            "min_distractors": 1, "min_junk": 1}
    monkeypatch.setitem(SCALES, "split-test", spec)
    plan = syn._plan_domain(0, "B", "split-test")
    counts = syn._counts(plan)
    assert 6 <= counts["train_ids"] <= 9 and counts["test_ids"] == 24 - counts["train_ids"]
    per_id: dict[int, int] = {}
    for im in plan["images"]:
        if im["kind"] == "normal":
            per_id[im["pid"]] = per_id.get(im["pid"], 0) + 1
    split = {pid: v["split"] for pid, v in plan["identities"].items()}
    assert all(5 <= n <= 6 for p, n in per_id.items() if split[p] == "train")
    assert all(2 <= n <= 3 for p, n in per_id.items() if split[p] == "test")
    assert counts["query_images"] == counts["test_ids"] == _valid_queries(plan)   # B: 2 cameras, one query each
    out = generate_synthetic(tmp_path / "s", seed=0, scale="split-test", domains=("B",), progress=False)
    from muva_core.data.datasets import load_dataset

    ds = load_dataset("synth_B", out)
    assert len(ds.query) == counts["query_images"] and len({s.pid for s in ds.train}) == counts["train_ids"]
    # the scale now means something else: the old set is not reused silently, the message says why
    monkeypatch.setitem(SCALES, "split-test", {**spec, "test_images_per_id": [3, 4]})
    with pytest.raises(FileExistsError, match="now defined otherwise"):
        generate_synthetic(out, seed=0, scale="split-test", domains=("B",), progress=False)
    # a new description alone is not a new definition
    monkeypatch.setitem(SCALES, "split-test", {**spec, "description": "reworded"})
    assert generate_synthetic(out, seed=0, scale="split-test", domains=("B",), progress=False) == out


def test_the_reid_scale_trains_on_reid_sized_sources_with_the_same_targets():
    """Planned, not rendered: the Re-ID sized scale (issue 18) gives every domain >= 700 training identities
    (Market-1501: 751) of 4-5 images, and its targets rank >= 300 valid queries as the default's do; the domains
    keep their look (the same camera styles as at the default scale) and their pids stay apart."""
    for d in DOMAINS:
        plan = syn._plan_domain(0, d, "reid")
        counts = syn._counts(plan)
        assert 700 <= counts["train_ids"] <= 705 and 2800 <= counts["train_images"] <= 3600, (d, counts)
        assert _valid_queries(plan) >= 300, (d, counts)
        assert plan["cameras"] == syn._plan_domain(0, d, "default")["cameras"]
        block = syn.SCALES["reid"]["pid_block"]
        assert all(syn._DOMAIN_INDEX[d] * block < p < (syn._DOMAIN_INDEX[d] + 1) * block for p in plan["identities"])
