"""`muva import-masks`: the authors' released pickle masks, read without running code, into the mask store."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import paper_trees
from conftest import MARKET_FILES, write_image
from muva_core.cli import main
from muva_core.config import RunConfig
from muva_core.data.datasets import load_dataset
from muva_core.grounding.authors import (CONVENTIONS, UnsafePickleError, import_authors_masks, read_authors_pickle)
from muva_core.grounding.voting import load_masks


class _OpensAFile:
    """A pickle payload: unpickling it calls ``open(path, "w")``, which creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_authors_pickle_is_imported_with_every_count_right(market_root, data_root, tmp_path, capsys):
    train = MARKET_FILES["bounding_box_train"]          # 7 usable train images (+1 junk, dropped by the parser)
    with_mask = [n for n in train if not n.startswith("-1")][:5]
    query = MARKET_FILES["query"][0]
    pkl = paper_trees.authors_pickle(tmp_path / "blobs" / "market.pkl", [*with_mask, query, "9999_c1s1_000001_00.jpg"])
    out = tmp_path / "masks.safetensors"
    code, text = _cli(["import-masks", "--authors", str(pkl), "--dataset", "market1501", "--root", str(data_root),
                       "--out", str(out)], capsys)
    assert code == 0, text
    assert "7 masks ([3, 128] each, grid 16x8, values [-inf, 0.0]" in text
    assert "6 images of market1501 got a mask" in text                       # 5 train + 1 query
    assert "market1501 train: 5 of 7 images have a mask, 2 have none" in text
    assert "1 file names in the file match no image (e.g. 9999_c1s1_000001_00.jpg)" in text
    assert f"-p masks_file={out}" in text

    store = load_masks(out)
    assert len(store) == 6 and store.grid == (16, 8) and store.masks.dtype == np.uint8
    assert store.meta["source"] == "authors" and store.meta["authors_file"] == str(pkl.resolve())
    key = f"market1501/bounding_box_train/{with_mask[0]}"
    expected = (paper_trees.part_mask() == 0).astype(np.uint8)            # 0 in the file = the patch is in the part
    np.testing.assert_array_equal(store[key], expected)
    assert store[key][0, :24].all() and not store[key][0, 24:].any()      # the head: rows 0-2 of the 16 x 8 grid
    assert f"market1501/query/{query}" in store

    # the same file read as binary (nonzero = part) gives the complement, and says the parts look inverted
    ds = load_dataset("market1501", data_root)
    inverted, report = import_authors_masks(pkl, [ds], convention="binary")
    np.testing.assert_array_equal(inverted[key], 1 - expected)
    assert any("try --convention reference" in w for w in report.warnings)
    import argparse

    from muva_core.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(next(a.choices for a in sub.choices["import-masks"]._actions if a.dest == "convention")) == set(CONVENTIONS)


def test_a_pickle_that_runs_a_function_is_refused_and_nothing_runs(tmp_path, data_root, market_root, capsys):
    live = tmp_path / "live-marker"
    with open(tmp_path / "live.pkl", "wb") as fh:
        pickle.dump({"x.jpg": _OpensAFile(live)}, fh)
    with open(tmp_path / "live.pkl", "rb") as fh:
        pickle.load(fh)                                    # plain pickle runs the payload: the test's payload is live
    assert live.exists()

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as fh:
        pickle.dump({"0002_c1s1_000451_03.jpg": _OpensAFile(marker)}, fh)
    with pytest.raises(UnsafePickleError, match=r"asks for io\.open.*Nothing in it was executed"):
        read_authors_pickle(evil)
    assert not marker.exists()

    out = tmp_path / "masks.safetensors"
    code, text = _cli(["import-masks", "--authors", str(evil), "--dataset", "market1501", "--root", str(data_root),
                       "--out", str(out)], capsys)
    assert code == 2 and "refused to load" in text and "io.open" in text and "Traceback" not in text
    assert not marker.exists() and not out.exists()

    objects = tmp_path / "objects.pkl"                    # an object array would unpickle arbitrary objects
    with open(objects, "wb") as fh:
        pickle.dump({"x.jpg": np.array([None, 1], dtype=object)}, fh)
    with pytest.raises(UnsafePickleError, match="dtype object"):
        read_authors_pickle(objects)


def test_every_pickle_protocol_and_dtype_of_the_format_reads(tmp_path):
    masks = {"a.jpg": paper_trees.part_mask(), "b.jpg": np.zeros((3, 128), bool),
             "c.jpg": np.asfortranarray(np.zeros((3, 128), np.float16)), "d.jpg": [[0.0] * 128] * 3}
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(masks, protocol=protocol))
        got = read_authors_pickle(path)
        assert all(np.array_equal(got[k], np.asarray(v)) for k, v in masks.items()), protocol
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a dict from image file name"):
        read_authors_pickle(tmp_path / "list.pkl")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps(masks)[:100])
    with pytest.raises(ValueError, match="not a readable pickle"):
        read_authors_pickle(tmp_path / "cut.pkl")


def test_a_basename_in_two_folders_is_reported_and_both_images_get_the_mask(market_root, duke_root, data_root,
                                                                           tmp_path, capsys):
    shared = "0002_c1s1_000451_03.jpg"                    # a Market train image; the same name in Duke's train folder
    write_image(duke_root / "bounding_box_train" / shared)
    pkl = paper_trees.authors_pickle(tmp_path / "multi.pkl", [shared, "0005_c2_f0046985.jpg"])
    out = tmp_path / "multi.safetensors"
    code, text = _cli(["import-masks", "--authors", str(pkl), "--dataset", "market1501", "--dataset", "dukemtmcreid",
                       "--root", str(data_root), "--out", str(out), "--json"], capsys)
    assert code == 0, text
    import json

    report = json.loads(text[: text.rindex("}") + 1])
    assert report["collisions_count"] == 1
    assert sorted(report["collisions"][shared]) == [f"dukemtmcreid/bounding_box_train/{shared}",
                                                    f"market1501/bounding_box_train/{shared}"]
    store = load_masks(out)
    assert f"dukemtmcreid/bounding_box_train/{shared}" in store and f"market1501/bounding_box_train/{shared}" in store
    assert report["keys_written"] == 3
    code, text = _cli(["import-masks", "--authors", str(pkl), "--dataset", "market1501", "--dataset", "dukemtmcreid",
                       "--root", str(data_root), "--out", str(out)], capsys)
    assert f"1 file names name several images; each of them got the mask" in text and shared in text


def test_shapes_are_checked_against_the_configured_grid_and_nothing_is_written(market_root, data_root, tmp_path, capsys):
    name = "0002_c1s1_000451_03.jpg"
    pkl = paper_trees.authors_pickle(tmp_path / "bad.pkl", [name], **{"0007_c3s1_000101_01.jpg": np.zeros((3, 129))})
    out = tmp_path / "m.safetensors"
    code, text = _cli(["import-masks", "--authors", str(pkl), "--dataset", "market1501", "--root", str(data_root),
                       "--out", str(out)], capsys)
    assert code == 2 and "1 of 2 masks are not [R, L] = [3, 128]" in text and "0007_c3s1_000101_01.jpg (3, 129)" in text
    assert not out.exists()
    # the configuration's grid decides: 384 x 128 input has a 24 x 8 grid, so [3, 128] arrays no longer fit
    code, text = _cli(["import-masks", "--authors", str(pkl), "--dataset", "market1501", "--root", str(data_root),
                       "--out", str(out), "-p", "height=384"], capsys)
    assert code == 2 and "[3, 192]" in text and "24x8 patch grid of 384x128" in text
    nan = paper_trees.authors_pickle(tmp_path / "nan.pkl", [name], **{"x.jpg": np.full((3, 128), np.nan)})
    code, text = _cli(["import-masks", "--authors", str(nan), "--dataset", "market1501", "--root", str(data_root),
                       "--out", str(out)], capsys)
    assert code == 2 and "NaN values, e.g. x.jpg" in text
    other = paper_trees.authors_pickle(tmp_path / "other.pkl", ["0000_000_01_0303morning_0008_0.jpg"])
    code, text = _cli(["import-masks", "--authors", str(other), "--dataset", "market1501", "--root", str(data_root),
                       "--out", str(out)], capsys)
    assert code == 2 and "no mask matches an image of market1501" in text and "another dataset or layout" in text
    assert not out.exists()


def test_a_run_with_masks_file_checks_it_and_skips_grounding(tmp_path, capsys):
    from muva_core.config import resolve_config
    from muva_core.grounding.steps import imported_masks, run_masks, skipped_note
    from muva_core.checks import preflight

    root = tmp_path / "data"
    paper_trees.msmt17_v1(root)
    paper_trees.market1501(root)
    names = sorted(p.name for p in (root / "MSMT17_V1" / "train").rglob("*.jpg"))
    half = paper_trees.authors_pickle(tmp_path / "half.pkl", names[:10])
    assert main(["import-masks", "--authors", str(half), "--dataset", "msmt17", "--root", str(root),
                 "--out", str(tmp_path / "half.safetensors")]) == 0
    overrides = {"data_root": str(root), "cache_dir": str(tmp_path / "cache"), "reports_dir": str(tmp_path / "r"),
                 "backbone": "tiny", "pretrained": "none", "num_workers": 0,
                 "masks_file": str(tmp_path / "half.safetensors")}
    cfg = resolve_config("MS2MA", overrides=overrides)       # configs/MS2MA.yaml: backend cogvlm, as shipped
    with pytest.raises(ValueError, match=r"6 training images have no mask \(msmt17 6 of 16\)"):
        preflight(cfg, progress=False)
    cfg = resolve_config("MS2MA", overrides={**overrides, "height": 384})
    with pytest.raises(ValueError, match=r"grid \(16, 8\) .* needs grid \(24, 8\)"):
        imported_masks(cfg)
    cfg = resolve_config("MS2MA", overrides={**overrides, "masks_file": str(tmp_path / "none.safetensors")})
    with pytest.raises(FileNotFoundError, match="masks_file=.*none.safetensors: no such file"):
        preflight(cfg, progress=False)

    full = paper_trees.authors_pickle(tmp_path / "full.pkl", names)
    assert main(["import-masks", "--authors", str(full), "--dataset", "msmt17", "--root", str(root),
                 "--out", str(tmp_path / "full.safetensors")]) == 0
    cfg = resolve_config("MS2MA", overrides={**overrides, "masks_file": str(tmp_path / "full.safetensors")})
    data = preflight(cfg, progress=False)
    store = run_masks(cfg, [data.datasets["msmt17"]])
    store.require([s.key for s in data.train])
    note = skipped_note(cfg)
    assert "grounding (cogvlm), calibration and voting do not run" in note and str(full.resolve()) in note
    assert not any((tmp_path / "cache").glob("msmt17/*")), "no grounding output may be written"
    from muva_core.viz.explorer import PartMaskExplorer

    explorer = PartMaskExplorer.from_masks(cfg)              # notebook 08 shows the imported masks too
    assert explorer.masks.path == tmp_path / "full.safetensors" and len(explorer.masks) == 16
    assert RunConfig().grounding.masks_file == ""
