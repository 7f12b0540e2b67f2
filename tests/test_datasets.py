"""Dataset parsers: counts, rules (junk, distractors, relabelling, camids), root resolution, registry, errors."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from muva_core.data import datasets as D
from muva_core.data.datasets import (
    MarketStyleDataset,
    canonical_name,
    combine_train,
    list_datasets,
    load_dataset,
    read_image,
    register_dataset,
)
from muva_core.data.samples import DatasetError

from conftest import SYNTH_TRAIN_IDS, write_image


def by_rel(samples):
    return {s.relpath: s for s in samples}


# ---------------------------------------------------------------- Market-1501


def test_market_counts_rules_and_relabelling(market_root: Path):
    ds = load_dataset("market1501", market_root)
    assert ds.name == "market1501" and ds.dataset_dir == market_root
    # junk (-1) dropped from every split; distractor 0000 dropped from query, kept in gallery
    assert len(ds.train) == 7 and len(ds.query) == 3 and len(ds.gallery) == 6
    assert all(s.pid != -1 for s in ds.train + ds.query + ds.gallery)
    assert 0 not in {s.pid for s in ds.query}
    assert Counter(s.pid for s in ds.gallery)[0] == 2
    # train pids 2, 7, 10 relabelled 0, 1, 2 in sorted order; query/gallery keep original ids
    tr = by_rel(ds.train)
    assert tr["bounding_box_train/0002_c1s1_000451_03.jpg"].pid == 0
    assert tr["bounding_box_train/0007_c3s1_000101_01.jpg"].pid == 1
    assert tr["bounding_box_train/0010_c6s1_000011_01.jpg"].pid == 2
    assert {s.pid for s in ds.query} == {2, 7, 10}
    assert {s.pid for s in ds.gallery} == {0, 2, 7, 10, 11}
    # camids from the file name, 0-based
    assert tr["bounding_box_train/0007_c3s1_000101_01.jpg"].camid == 2
    assert tr["bounding_box_train/0010_c6s1_000011_01.jpg"].camid == 5
    assert {s.camid for s in ds.train} == {0, 1, 2, 4, 5}
    assert ds.num_train_pids == 3 and ds.num_train_cams == 5 and ds.num_train_imgs == 7
    s = ds.query[0]
    assert Path(s.path).is_absolute() and Path(s.path).is_file()
    assert Path(s.path) == market_root / s.relpath
    assert s.domain == "market1501" and s.key == f"market1501/{s.relpath}"


def test_market_summary_and_repr(market_root: Path):
    ds = load_dataset("MA", market_root)
    table = ds.summary()
    assert list(table.index) == ["train", "query", "gallery"]
    assert list(table.columns) == ["images", "ids", "cameras"]
    assert table.loc["train"].tolist() == [7, 3, 5]
    assert table.loc["gallery"].tolist() == [6, 5, 6]
    assert ds.stats()["query"] == {"images": 3, "ids": 3, "cameras": 3}
    text = repr(ds)
    assert "market1501" in text and "gallery" in text and str(market_root) in text


# ---------------------------------------------------------------- other layouts


def test_duke(duke_root: Path):
    ds = load_dataset("duke", duke_root.parent)
    assert ds.name == "dukemtmcreid"
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (4, 2, 3)
    tr = by_rel(ds.train)
    assert tr["bounding_box_train/0009_c8_f0001000.jpg"].camid == 7
    assert tr["bounding_box_train/0009_c8_f0001000.jpg"].pid == 1
    assert {s.pid for s in ds.gallery} == {5, 9, 12}


def test_msmt17_v1_lists(msmt_v1_root: Path):
    ds = load_dataset("msmt17", msmt_v1_root.parent)
    assert ds.dataset_dir == msmt_v1_root and ds.layout == "lists"
    # train = list_train (3) + list_val (2); pid 0 is a real identity in MSMT17 (no distractors)
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (5, 2, 3)
    assert ds.num_train_pids == 3
    tr = by_rel(ds.train)
    assert tr["train/0001/0001_000_15_0303noon_0010_0.jpg"].camid == 14
    assert tr["train/0000/0000_000_01_0303morning_0008_0.jpg"].camid == 0
    assert tr["train/0002/0002_000_03_0303afternoon_0012_0.jpg"].pid == 2  # from list_val
    assert {s.pid for s in ds.query} == {0, 1}
    assert by_rel(ds.gallery)["test/0002/0002_001_09_0303morning_0202_0.jpg"].camid == 8
    assert all(Path(s.path).is_file() for s in ds.train + ds.query + ds.gallery)


def test_msmt17_v2_list_layout(msmt_v1_root: Path):
    (msmt_v1_root / "train").rename(msmt_v1_root / "mask_train_v2")
    (msmt_v1_root / "test").rename(msmt_v1_root / "mask_test_v2")
    ds = load_dataset("msmt17", msmt_v1_root)
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (5, 2, 3)
    assert all(s.relpath.startswith("mask_train_v2/") for s in ds.train)
    assert all(Path(s.path).is_file() for s in ds.gallery)


def test_relative_root_gives_absolute_paths(market_root: Path, monkeypatch):
    monkeypatch.chdir(market_root.parent)
    ds = load_dataset("market", "Market-1501-v15.09.15")
    assert ds.dataset_dir == market_root and all(Path(s.path).is_absolute() for s in ds.gallery)


def test_msmt17_v2_market_style(msmt_v2_root: Path):
    ds = load_dataset("MS", msmt_v2_root.parent)
    assert ds.dataset_dir == msmt_v2_root and ds.layout == "market"
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (3, 2, 3)
    assert 0 in {s.pid for s in ds.query}  # pid 0 kept: MSMT17 has no distractors
    assert by_rel(ds.train)["bounding_box_train/0000_c14_0009.jpg"].camid == 13
    assert ds.num_train_pids == 2


def test_cuhk03_detected_and_labeled(cuhk03_root: Path):
    det = load_dataset("C3", cuhk03_root.parent)
    lab = load_dataset("cuhk03_np_labeled", cuhk03_root)
    assert det.name == "cuhk03_np" and lab.name == "cuhk03_np_labeled"
    assert (len(det.train), len(det.query), len(det.gallery)) == (4, 1, 2)
    assert (len(lab.train), len(lab.query), len(lab.gallery)) == (2, 2, 3)
    assert all(s.relpath.startswith("detected/") for s in det.train)
    assert all(s.relpath.startswith("labeled/") for s in lab.gallery)
    assert {s.pid for s in det.train} == {0, 1} and {s.camid for s in det.train} == {0, 1}
    # root given as the subset folder itself
    again = load_dataset("cuhk03", cuhk03_root / "detected")
    assert again.dataset_dir == cuhk03_root and len(again.train) == 4


def test_synthetic_domains(synth_root: Path):
    for letter, n in SYNTH_TRAIN_IDS.items():
        ds = load_dataset(f"synth_{letter}", synth_root)
        assert ds.name == f"synth_{letter}" and ds.num_train_pids == n
        assert len(ds.train) == 2 * n and len(ds.query) == 2
        assert Counter(s.pid for s in ds.gallery)[0] == 1  # distractor kept in gallery
        assert all(s.domain == f"synth_{letter}" for s in ds.gallery)
    direct = load_dataset("synth:B", synth_root / "synth_B")
    assert direct.num_train_pids == SYNTH_TRAIN_IDS["B"]
    # a synth_A folder must not be taken for synth_B
    with pytest.raises(DatasetError) as err:
        load_dataset("synth_B", synth_root / "synth_A")
    assert str(synth_root / "synth_A" / "synth_B") in str(err.value)


# ---------------------------------------------------------------- root resolution


def test_root_resolution_self_parent_and_nested(market_root: Path, tmp_path: Path):
    assert load_dataset("market", market_root).dataset_dir == market_root
    assert load_dataset("market", market_root.parent).dataset_dir == market_root
    nested = tmp_path / "other" / "market1501" / "Market-1501-v15.09.15"
    nested.parent.mkdir(parents=True)
    shutil.copytree(market_root, nested)
    assert load_dataset("market", tmp_path / "other").dataset_dir == nested


def test_root_not_found_lists_every_path_tried(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as err:
        load_dataset("market1501", empty)
    msg = str(err.value)
    for cand in D.Market1501.folder_names:
        assert str(empty / cand) in msg
    assert str(empty) + "  (" in msg  # the root itself was tried too
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("duke", tmp_path / "nowhere")


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("market1501", "market1501"), ("market", "market1501"), ("MA", "market1501"), ("Market-1501", "market1501"),
        ("dukemtmcreid", "dukemtmcreid"), ("duke", "dukemtmcreid"), ("D", "dukemtmcreid"),
        ("msmt17", "msmt17"), ("MS", "msmt17"),
        ("cuhk03_np", "cuhk03_np"), ("cuhk03", "cuhk03_np"), ("C3", "cuhk03_np"),
        ("cuhk03_np_labeled", "cuhk03_np_labeled"),
        ("synth_A", "synth_A"), ("synth:C", "synth_C"), ("synthD", "synth_D"),
    ],
)
def test_registry_aliases(alias: str, canonical: str):
    assert canonical_name(alias) == canonical


def test_unknown_dataset_lists_registered_names():
    with pytest.raises(ValueError) as err:
        load_dataset("marketplace", "/tmp")
    for name in ("market1501", "dukemtmcreid", "msmt17", "cuhk03_np", "synth_A"):
        assert name in str(err.value)
    assert set(list_datasets()) >= {"market1501", "dukemtmcreid", "msmt17", "cuhk03_np", "cuhk03_np_labeled",
                                    "synth_A", "synth_B", "synth_C", "synth_D"}


def test_register_dataset_decorator(tmp_path: Path):
    try:
        @register_dataset("toy_reid", aliases=("TOY",))
        class Toy(MarketStyleDataset):
            folder_names = ("ToyReID",)

        from conftest import _write_market_style, MARKET_FILES

        _write_market_style(tmp_path / "ToyReID", MARKET_FILES)
        ds = load_dataset("toy", tmp_path)
        assert ds.name == "toy_reid" and all(s.domain == "toy_reid" for s in ds.train)
        with pytest.raises(ValueError, match="already used"):
            register_dataset("toy2", aliases=("toy_reid",))(type("Toy2", (MarketStyleDataset,), {}))
    finally:
        D._REGISTRY.pop("toy_reid", None)
        for key in [k for k, v in D._ALIASES.items() if v == "toy_reid"]:
            del D._ALIASES[key]


# ---------------------------------------------------------------- errors


def test_error_missing_split_folder(market_root: Path):
    shutil.rmtree(market_root / "query")
    with pytest.raises(DatasetError) as err:
        load_dataset("market", market_root)
    assert str(market_root / "query") in str(err.value) and "missing" in str(err.value)


def test_error_empty_split(market_root: Path):
    for f in (market_root / "bounding_box_test").iterdir():
        f.unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("market", market_root)
    assert str(market_root / "bounding_box_test") in str(err.value) and "empty" in str(err.value)


def test_error_split_with_only_junk(market_root: Path):
    for f in (market_root / "query").iterdir():
        f.unlink()
    write_image(market_root / "query" / "-1_c1s1_000001_00.jpg")
    with pytest.raises(DatasetError) as err:
        load_dataset("market", market_root)
    assert str(market_root / "query") in str(err.value) and "empty" in str(err.value)


@pytest.mark.parametrize(
    "bad_name", ["garbage.jpg", "0002_x1s1_000001_01.jpg", "0002_c7s1_000001_01.jpg", "--1_c1s1_000001_01.jpg", "-2_c1s1_0_01.jpg"]
)
def test_error_unparseable_file_name(market_root: Path, bad_name: str):
    bad = write_image(market_root / "bounding_box_train" / bad_name)
    with pytest.raises(DatasetError) as err:
        load_dataset("market", market_root)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("line", ["just_a_path.jpg", "0000/0000_000_01_x_0_0.jpg zero", "a b c"])
def test_error_unparseable_list_line(msmt_v1_root: Path, line: str):
    list_path = msmt_v1_root / "list_query.txt"
    list_path.write_text(list_path.read_text() + line + "\n")
    with pytest.raises(DatasetError) as err:
        load_dataset("msmt17", msmt_v1_root)
    assert str(list_path) in str(err.value) and "line 3" in str(err.value)


def test_error_list_camera_field(msmt_v1_root: Path):
    list_path = msmt_v1_root / "list_gallery.txt"
    list_path.write_text(list_path.read_text() + "0003/0003_nocam.jpg 3\n")
    with pytest.raises(DatasetError) as err:
        load_dataset("msmt17", msmt_v1_root)
    assert str(list_path) in str(err.value) and "line 4" in str(err.value) and "0003_nocam.jpg" in str(err.value)


def test_error_list_missing_image_and_missing_list(msmt_v1_root: Path):
    missing = msmt_v1_root / "train" / "0001" / "0001_000_15_0303noon_0010_0.jpg"
    missing.unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("msmt17", msmt_v1_root)
    assert str(missing) in str(err.value) and "list_train.txt" in str(err.value)
    (msmt_v1_root / "list_val.txt").unlink()
    write_image(missing)
    with pytest.raises(DatasetError) as err:
        load_dataset("msmt17", msmt_v1_root)
    assert str(msmt_v1_root / "list_val.txt") in str(err.value)


def test_error_unreadable_image(market_root: Path):
    bad = market_root / "bounding_box_train" / "0002_c1s1_000451_03.jpg"
    bad.write_bytes(b"this is not a jpeg")
    ds = load_dataset("market", market_root)  # default: names only, images not opened
    assert len(ds.train) == 7
    with pytest.raises(DatasetError) as err:
        load_dataset("market", market_root, verify_images=True)
    assert str(bad) in str(err.value)
    with pytest.raises(DatasetError) as err:
        read_image(bad)
    assert str(bad) in str(err.value)


def test_error_truncated_image(market_root: Path):
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 128), (10, 200, 30)).save(buf, format="JPEG")
    bad = market_root / "query" / "0002_c1s1_001051_00.jpg"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DatasetError) as err:
        read_image(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(DatasetError, match="does not exist"):
        read_image(market_root / "query" / "nope.jpg")


def test_read_image_ok(market_root: Path):
    im = read_image(market_root / "query" / "0002_c1s1_001051_00.jpg")
    assert im.mode == "RGB" and im.size == (8, 16)


# ---------------------------------------------------------------- multi-source


def test_combine_train_offsets(market_root: Path, duke_root: Path, synth_root: Path):
    ma, du, sa = load_dataset("MA", market_root), load_dataset("D", duke_root), load_dataset("synth_A", synth_root)
    samples, info = combine_train([ma, du, sa])
    assert len(samples) == len(ma.train) + len(du.train) + len(sa.train)
    assert list(info) == ["market1501", "dukemtmcreid", "synth_A"]
    assert (info["market1501"].pid_offset, info["dukemtmcreid"].pid_offset, info["synth_A"].pid_offset) == (0, 3, 5)
    assert (info["market1501"].cam_offset, info["dukemtmcreid"].cam_offset, info["synth_A"].cam_offset) == (0, 6, 14)
    assert info["dukemtmcreid"].as_dict()["num_images"] == 4
    # identities never collide across sources, and are contiguous 0..N-1
    owner: dict[int, set[str]] = {}
    cam_owner: dict[int, set[str]] = {}
    for s in samples:
        owner.setdefault(s.pid, set()).add(s.domain)
        cam_owner.setdefault(s.camid, set()).add(s.domain)
    assert all(len(v) == 1 for v in owner.values()) and all(len(v) == 1 for v in cam_owner.values())
    assert sorted(owner) == list(range(3 + 2 + SYNTH_TRAIN_IDS["A"]))
    # a duke sample keeps its domain and relpath, shifted pid
    duke_sample = next(s for s in samples if s.domain == "dukemtmcreid" and s.relpath.endswith("0009_c8_f0001000.jpg"))
    assert duke_sample.pid == 3 + 1 and duke_sample.camid == 6 + 7
    with pytest.raises(ValueError, match="twice"):
        combine_train([ma, ma])
