"""Binary voting of boxes into patch masks, flips, and the mask store."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from muva_core.grounding.voting import (
    MaskStore,
    MissingMasksError,
    flip_boxes,
    flip_masks,
    grid_shape,
    load_masks,
    vote_boxes,
    vote_patch_masks,
    vote_table,
)

NAN4 = [np.nan] * 4


def grid_of(mask_row, gh=16, gw=8):
    return np.asarray(mask_row).reshape(gh, gw)


def test_box_on_patch_edges_and_rowwise_order():
    # x 0..64 (cols 0-3), y 0..32 (rows 0-1) in a 256x128 image with 16x16 patches
    boxes = np.array([[0, 0, 64, 32], NAN4, NAN4])
    for rule in ("center", "coverage"):
        m = vote_patch_masks(boxes, rule=rule)
        assert m.shape == (3, 128) and m.dtype == np.uint8
        expected = np.zeros((16, 8), np.uint8)
        expected[0:2, 0:4] = 1
        np.testing.assert_array_equal(grid_of(m[0]), expected)
        assert np.flatnonzero(m[0]).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]  # row-wise: index = row * 8 + col
        assert m[1:].sum() == 0  # missing boxes vote nothing


def test_centre_vs_coverage_rule():
    small = np.array([[4, 4, 12, 12], NAN4, NAN4])  # around patch 0's centre, a quarter of its area
    assert vote_patch_masks(small, rule="center")[0].tolist() == [1] + [0] * 127
    assert vote_patch_masks(small, rule="coverage")[0].sum() == 0
    assert vote_patch_masks(small, rule="coverage", min_coverage=0.25)[0].tolist() == [1] + [0] * 127
    # 10 of 16 columns of patch 0 covered: coverage 0.625, centre (8) inside
    part = np.array([[0, 0, 10, 16], NAN4, NAN4])
    assert vote_patch_masks(part, rule="coverage")[0, 0] == 1
    assert vote_patch_masks(part, rule="coverage", min_coverage=0.7)[0, 0] == 0
    # shifted box: patch 0 covered 6/16 (centre 8 outside), patch 1 covered 14/16 (centre 24 inside)
    shifted = np.array([[10, 0, 30, 16], NAN4, NAN4])
    for rule in ("center", "coverage"):
        assert vote_patch_masks(shifted, rule=rule)[0, :2].tolist() == [0, 1]
    with pytest.raises(ValueError, match="rule"):
        vote_patch_masks(part, rule="majority")


def test_full_image_outside_and_degenerate_boxes():
    boxes = np.array([[0, 0, 128, 256], [200, 10, 300, 50], [10, 10, 10, 80]])
    for rule in ("center", "coverage"):
        m = vote_patch_masks(boxes, rule=rule)
        assert m[0].all() and m[1].sum() == 0 and m[2].sum() == 0
    bigger = vote_patch_masks(np.array([[-50, -50, 500, 500], NAN4, NAN4]))
    assert bigger[0].all()


def test_other_sizes_grids_and_scaling():
    # 224x224 input, 14-pixel patches: 16x16 grid; the left half is 8 columns of every row
    m = vote_patch_masks(np.array([[0, 0, 112, 224], NAN4, NAN4]), img_size=(224, 224), patch=14)
    assert m.shape == (3, 256) and grid_of(m[0], 16, 16)[:, :8].all() and not grid_of(m[0], 16, 16)[:, 8:].any()
    # rectangular patches
    assert grid_shape((256, 128), (32, 16)) == (8, 8)
    m = vote_patch_masks(np.array([[0, 0, 128, 64], NAN4, NAN4]), patch=(32, 16))
    assert m.shape == (3, 64) and m[0].sum() == 16  # top two rows of 8
    # a grid that does not divide evenly by a patch: give the grid
    m = vote_patch_masks(np.array([[0, 0, 125, 125], NAN4, NAN4]), img_size=(250, 125), grid=(10, 5))
    assert m[0].sum() == 25
    with pytest.raises(ValueError, match="multiple"):
        grid_shape((250, 125), 16)
    # boxes on a 64x128 image are scaled to the 128x256 input first
    small = vote_patch_masks(np.array([[0, 0, 32, 16], NAN4, NAN4]), box_size=(64, 128))
    np.testing.assert_array_equal(small, vote_patch_masks(np.array([[0, 0, 64, 32], NAN4, NAN4])))


@pytest.mark.parametrize("rule", ["center", "coverage"])
def test_flip_consistency(rule):
    rng = np.random.default_rng(0)
    W, H = 128.0, 256.0
    xs = np.sort(rng.uniform(-10, W + 10, (200, 3, 2)), axis=-1)
    ys = np.sort(rng.uniform(-10, H + 10, (200, 3, 2)), axis=-1)
    boxes = np.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], -1)
    edges = np.array([[[0, 0, 64, 32], [8, 16, 40, 48], [16, 100, 120, 256]]], float)  # on edges and centres
    boxes = np.concatenate([boxes, edges])
    masks = vote_boxes(boxes, rule=rule)
    flipped = vote_boxes(flip_boxes(boxes, W), rule=rule)
    np.testing.assert_array_equal(flipped, flip_masks(masks, (16, 8)))
    np.testing.assert_array_equal(flip_masks(flip_masks(masks, (16, 8)), (16, 8)), masks)
    t = flip_masks(torch.from_numpy(masks), (16, 8))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), flipped)
    with pytest.raises(ValueError, match="grid"):
        flip_masks(masks, (8, 8))


def _table():
    rows = []
    for rel, (w, h) in {"b/2.jpg": (64, 128), "a/1.jpg": (128, 256)}.items():
        s = w / 128
        for part, box in {"head": (0, 0, 64, 32), "upper": (0, 32, 128, 128), "legs": (0, 128, 128, 256)}.items():
            bx = [v * s for v in box]
            rows.append(dict(relpath=rel, dataset="synth_A", part=part, x0=bx[0], y0=bx[1], x1=bx[2], y1=bx[3],
                             cal_x0=bx[0], cal_y0=bx[1], cal_x1=bx[2], cal_y1=bx[3], img_w=w, img_h=h))
    rows.append(dict(relpath="c/3.jpg", dataset="synth_B", part="head", x0=np.nan, y0=np.nan, x1=np.nan, y1=np.nan,
                     cal_x0=0, cal_y0=0, cal_x1=128, cal_y1=64, img_w=128, img_h=256))  # raw missing, no upper/legs rows
    return pd.DataFrame(rows)


def test_vote_table_matches_single_votes():
    table = _table()
    keys, masks = vote_table(table)
    assert keys == ["synth_A/a/1.jpg", "synth_A/b/2.jpg", "synth_B/c/3.jpg"]
    assert masks.shape == (3, 3, 128) and masks.dtype == np.uint8
    np.testing.assert_array_equal(masks[0], masks[1])  # the same boxes at half the image size
    one = table[table["relpath"] == "a/1.jpg"]
    np.testing.assert_array_equal(masks[0], vote_patch_masks(one))
    assert masks[0, 0].sum() == 8 and masks[0, 1].sum() == 48 and masks[0, 2].sum() == 64
    assert masks[2, 0].sum() == 32 and masks[2, 1:].sum() == 0
    _, raw = vote_table(table, columns="raw")
    assert raw[2].sum() == 0
    with pytest.raises(ValueError, match="calibrate_boxes"):
        vote_table(table.drop(columns=["cal_x0"]))
    with pytest.raises(ValueError, match="several rows"):
        vote_table(pd.concat([table, table.head(1)]))


def test_mask_store_round_trip_and_missing_keys(tmp_path):
    store = MaskStore.from_table(_table(), source="labels.calibrated.parquet")
    path = store.save(tmp_path / "masks" / "part_masks.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["part_masks.safetensors"]  # no temporary file left
    loaded = load_masks(path)
    assert loaded.keys == store.keys and len(loaded) == 3
    np.testing.assert_array_equal(loaded.masks, store.masks)
    assert loaded.grid == (16, 8)
    assert loaded.meta["img_size"] == [256, 128] and loaded.meta["rule"] == "center"
    assert loaded.meta["source"] == "labels.calibrated.parquet" and loaded.meta["format"].startswith("muva-part-masks")
    np.testing.assert_array_equal(loaded.get("synth_A/a/1.jpg"), store.masks[0])
    assert "synth_B/c/3.jpg" in loaded and "c/3.jpg" not in loaded
    np.testing.assert_array_equal(loaded.stack(["synth_B/c/3.jpg", "synth_A/a/1.jpg"]), store.masks[[2, 0]])
    loaded.require(["synth_A/a/1.jpg"])
    wanted = ["synth_A/a/1.jpg"] + [f"synth_A/missing/{i}.jpg" for i in range(9)]
    with pytest.raises(MissingMasksError) as err:
        loaded.require(wanted)
    msg = str(err.value)
    assert "9 of 10" in msg and "synth_A/missing/0.jpg" in msg and str(path) in msg and "synth_A/missing/8.jpg" not in msg
    with pytest.raises(KeyError, match="synth_A/zzz.jpg"):
        loaded.get("synth_A/zzz.jpg")
    # saving again replaces the file atomically
    MaskStore(["k/1"], np.ones((1, 3, 128), np.uint8), {"grid": [16, 8]}).save(path)
    assert load_masks(path).keys == ["k/1"] and os.listdir(path.parent) == ["part_masks.safetensors"]
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_masks(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_masks(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="duplicate"):
        MaskStore(["a", "a"], np.zeros((2, 3, 4)))


def test_grounding_cache_names_depend_on_the_data_copy_and_settings(tmp_path):
    from muva_core.config import RunConfig
    from muva_core.grounding.steps import grounding_paths

    def paths(dataset="synth_A", **keys):
        return grounding_paths(RunConfig().update({"synth_root": str(tmp_path / "a"), **keys}), dataset)

    base = paths()
    assert paths() == base  # stable
    assert paths(synth_root=str(tmp_path / "b")).boxes != base.boxes  # another synthetic set
    assert paths(synth_scale="evidence").masks != base.masks
    m1, m2 = paths("market1501", data_root=str(tmp_path / "x")), paths("market1501", data_root=str(tmp_path / "y"))
    assert m1.boxes != m2.boxes
    raw = paths(calibrate=False)  # calibration changes its own and the voting step's files, not the labels
    assert raw.boxes == base.boxes and raw.calibrated != base.calibrated and raw.masks != base.masks
