"""Bad boxes are counted and flagged, never silently fixed; CLI messages name flags that exist.

A boxes table as another tool (or a hand edit) may leave it: an inverted box, a NaN box and a box
reaching outside the image, all with status ``ok``. ``muva calibrate`` / ``muva vote`` (run through
``muva_core.cli.main`` as a user would) must count each by reason and flag those rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from muva_core.cli import build_parser, main
from muva_core.data.samples import PARTS, Sample
from muva_core.grounding.base import GroundingBackend, PartBox
from muva_core.grounding.boxes import sanitize_box, sanitize_box_array
from muva_core.grounding.calibration import calibrate_boxes
from muva_core.grounding.labelling import label_dataset
from muva_core.grounding.voting import MaskStore, load_masks

W, H = 128, 256
PART_BOXES = {"head": (44, 10, 84, 50), "upper": (30, 45, 98, 140), "legs": (34, 130, 94, 250)}
INVERTED, NAN, OUTSIDE = 3, 7, 11  # image indices of the three bad boxes (upper body)


def clean_table(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        rel = f"bounding_box_train/{i:04d}_c1s1_{i:06d}_00.jpg"
        dy = float(rng.uniform(-4, 4))
        for part, (x0, y0, x1, y1) in PART_BOXES.items():
            rows.append(dict(relpath=rel, dataset="d", key=f"d/{rel}", part=part, x0=float(x0), y0=y0 + dy,
                             x1=float(x1), y1=min(y1 + dy, H), score=1.0, raw="", status="ok", img_w=W, img_h=H))
    return pd.DataFrame(rows)


def bad_table() -> pd.DataFrame:
    t = clean_table()
    up = t["part"] == "upper"
    row = lambda i: t.index[up & (t["key"] == t["key"].unique()[i])][0]  # noqa: E731
    x0, y0, x1, y1 = t.loc[row(INVERTED), ["x0", "y0", "x1", "y1"]]
    t.loc[row(INVERTED), ["x0", "y0", "x1", "y1"]] = [x1, y1, x0, y0]  # corners swapped
    t.loc[row(NAN), ["x0", "y0", "x1", "y1"]] = np.nan                  # no coordinates, status still ok
    t.loc[row(OUTSIDE), ["x0", "x1"]] = [-20.0, 140.0]                  # wider than the image
    return t


def rows_of(table: pd.DataFrame, i: int) -> pd.Series:
    key = sorted(table["key"].unique())[i]
    return table[(table["key"] == key) & (table["part"] == "upper")].iloc[0]


def test_calibration_counts_bad_boxes_by_reason_and_flags_their_rows():
    cal, rep = calibrate_boxes(bad_table())
    assert rep.fixed_total() == {"inverted": 1, "clipped": 1, "missing": 1}
    assert rep.fixed["upper"] == {"inverted": 1, "clipped": 1, "missing": 1} and not rep.fixed["head"]
    inv, nan, out = rows_of(cal, INVERTED), rows_of(cal, NAN), rows_of(cal, OUTSIDE)
    assert (inv["status"], nan["status"], out["status"]) == ("inverted", "missing", "clipped")
    # the inverted box is swapped and kept, the clipped one cut to the image, the NaN one replaced by its window
    assert not inv["replaced"] and inv["cal_x0"] < inv["cal_x1"] and inv["cal_y0"] < inv["cal_y1"]
    assert (out["cal_x0"], out["cal_x1"]) == (0.0, W)
    assert nan["replaced"] and nan["rule"] == "missing" and nan["cal_y0"] == pytest.approx(0.2 * H)
    given = bad_table()  # the raw columns stay as given
    assert inv["x0"] == rows_of(given, INVERTED)["x0"] > inv["x1"] and np.isnan(nan["x0"]) and out["x0"] == -20.0
    assert (cal["status"] != "ok").sum() == 3  # every other row stays ok
    text = str(rep)
    assert "1 inverted" in text and "1 clipped" in text and "1 missing" in text
    frame = rep.to_frame()
    assert frame.loc["upper", ["fixed_inverted", "fixed_clipped", "fixed_missing"]].tolist() == [1, 1, 1]
    assert json.loads(json.dumps(rep.to_dict()))["fixed"]["upper"]["clipped"] == 1
    # a clean table adds no fixed_* columns and reports none
    _, clean_rep = calibrate_boxes(clean_table())
    assert clean_rep.fixed_total() == {} and not any(c.startswith("fixed_") for c in clean_rep.to_frame().columns)
    assert "bad coordinates found: none" in str(clean_rep)


def test_vectorised_sanitising_matches_sanitize_box():
    rng = np.random.default_rng(1)
    boxes = rng.uniform(-40, 300, (400, 4))
    clean, status, fixed = sanitize_box_array(boxes, W, H)
    for b, c, s in zip(boxes, clean, status):
        box, st = sanitize_box(b, W, H, min_size=0.0)
        assert st == s
        assert (box is None and np.isnan(c).all()) or np.allclose(box, c)
    # rows that already say "no box" are left alone
    _, status, fixed = sanitize_box_array([[np.nan] * 4, [5, 5, 1, 1]], W, H, ["unreadable", "multiple+degenerate"])
    assert list(status) == ["unreadable", "multiple+degenerate"] and list(fixed) == ["", ""]


def test_voting_counts_what_it_meets(tmp_path):
    raw = bad_table()
    store = MaskStore.from_table(raw, columns="raw")
    assert store.meta["box_problems"]["fixes"] == {"inverted": 1, "clipped": 1, "missing": 1}
    cal, _ = calibrate_boxes(raw)
    store = MaskStore.from_table(cal)
    probs = store.meta["box_problems"]
    assert probs["fixes"] == {}  # calibrated boxes are clean
    assert probs["status"] == {"ok": len(cal) - 3, "inverted": 1, "missing": 1, "clipped": 1}
    assert probs["replaced"] == int(cal["replaced"].sum()) and probs["rules"]["missing"] >= 1
    store.save(tmp_path / "m.safetensors")
    assert load_masks(tmp_path / "m.safetensors").meta["box_problems"]["fixes"] == {}


def test_cli_calibrate_and_vote_print_counts_by_reason(tmp_path, capsys):
    raw = tmp_path / "boxes.parquet"
    bad_table().to_parquet(raw)
    cal, rep, masks = tmp_path / "cal.parquet", tmp_path / "rep.json", tmp_path / "m.safetensors"
    assert main(["calibrate", "--boxes", str(raw), "--out", str(cal), "--report", str(rep)]) == 0
    out = capsys.readouterr().out
    assert "1 inverted (corners swapped)" in out and "1 clipped (cut to the image)" in out and "1 missing" in out
    assert "3 rows got a status other than their input one" in out
    table = pd.read_parquet(cal)
    assert sorted(table.loc[table["status"] != "ok", "status"]) == ["clipped", "inverted", "missing"]
    assert json.loads(rep.read_text())["fixed"]["upper"] == {"inverted": 1, "clipped": 1, "missing": 1}

    assert main(["vote", "--boxes", str(cal), "--out", str(masks)]) == 0
    out = capsys.readouterr().out
    assert "inverted 1" in out and "clipped 1" in out and "missing 1" in out  # statuses of the table
    assert "replaced by calibration:" in out and "bad coordinates met while voting: none" in out
    assert main(["vote", "--boxes", str(raw), "--out", str(masks), "--raw"]) == 0
    out = capsys.readouterr().out
    assert "bad coordinates met while voting: 1 inverted (corners swapped), 1 clipped (cut to the image), 1 missing" in out


def test_cli_image_size_flag_for_tables_without_img_columns(tmp_path, capsys):
    raw = tmp_path / "boxes.parquet"
    clean_table().drop(columns=["img_w", "img_h"]).to_parquet(raw)
    cal = tmp_path / "cal.parquet"
    assert main(["calibrate", "--boxes", str(raw), "--out", str(cal)]) == 2
    err = capsys.readouterr().err
    assert "--img-size HxW" in err and "muva calibrate --img-size 256x128" in err
    assert "img_size=(H, W)" in err  # the Python argument is named beside the flag
    args = build_parser().parse_args(["calibrate", "--boxes", "b", "--out", "o", "--img-size", "256x128"])
    assert args.img_size == "256x128"  # the flag the message names exists
    assert main(["calibrate", "--boxes", str(raw), "--out", str(cal), "--img-size", "256x128"]) == 0
    capsys.readouterr()
    assert main(["calibrate", "--boxes", str(raw), "--out", str(cal), "--img-size", "256"]) == 2
    assert "--img-size: expected HEIGHTxWIDTH" in capsys.readouterr().err

    # vote: boxes of 512x256 images, said so with --img-size, vote like the same boxes with img_w/img_h columns
    big = clean_table()
    big[["x0", "y0", "x1", "y1"]] *= 2
    no_size = tmp_path / "big.parquet"
    big.drop(columns=["img_w", "img_h"]).to_parquet(no_size)
    m1, m2 = tmp_path / "m1.safetensors", tmp_path / "m2.safetensors"
    assert main(["vote", "--boxes", str(no_size), "--out", str(m1), "--raw", "--img-size", "512x256"]) == 0
    assert "note: the table has no img_w/img_h" not in capsys.readouterr().out
    expected = MaskStore.from_table(big.assign(img_w=256.0, img_h=512.0), columns="raw")
    np.testing.assert_array_equal(load_masks(m1).masks, expected.masks)
    assert main(["vote", "--boxes", str(no_size), "--out", str(m2), "--raw"]) == 0
    assert "pass --img-size HxW" in capsys.readouterr().out


class _Careless(GroundingBackend):
    """A backend that returns boxes as they come: inverted, outside the image, status ok."""

    name = "careless"

    def ground(self, images, keys=None, parts=PARTS):
        out = []
        for img in images:
            w, h = img.width, img.height
            out.append([PartBox("head", (w * 0.8, h * 0.2, w * 0.2, 0.0)),          # inverted
                        PartBox("upper", (-5.0, h * 0.2, w + 5.0, h * 0.6)),       # outside
                        PartBox("legs", (w * 2.0, h * 0.5, w * 3.0, h * 1.0))])    # entirely outside
        return out


def test_labelling_flags_any_backends_bad_boxes(tmp_path):
    from conftest import write_image

    samples = [Sample(str(write_image(tmp_path / f"img{i}.jpg")), 0, 0, "d", f"img{i}.jpg") for i in range(3)]
    table = label_dataset(samples, _Careless(), tmp_path / "out.parquet", progress=False)
    by_part = table.groupby("part")["status"].unique().to_dict()
    assert list(by_part["head"]) == ["inverted"] and list(by_part["upper"]) == ["clipped"]
    assert list(by_part["legs"]) == ["clipped+degenerate"]
    head = table[table["part"] == "head"].iloc[0]
    assert head["x0"] < head["x1"] and head["y0"] < head["y1"]
    assert table.loc[table["part"] == "upper", ["x0", "x1"]].to_numpy().tolist()[0] == [0.0, 8.0]
    assert table.loc[table["part"] == "legs", "x0"].isna().all()


# ---------------------------------------------------------------------------------- muva ground
@pytest.fixture
def synth_with_truth(synth_root: Path) -> Path:
    """The fake synthetic root with a part_boxes.parquet for synth_A (8x16 images)."""
    folder = synth_root / "synth_A"
    rows = []
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        for f in sorted((folder / split).glob("*.jpg")):
            for part, (y0, y1) in {"head": (0, 4), "upper": (3, 9), "legs": (8, 16), "person": (0, 16)}.items():
                rows.append(dict(relpath=f"{split}/{f.name}", part=part, x0=1.0, y0=float(y0), x1=7.0, y1=float(y1),
                                 visible=1.0, img_w=8, img_h=16))
    pd.DataFrame(rows).to_parquet(folder / "part_boxes.parquet")
    return synth_root


def test_cli_ground_stale_resume_state_names_a_real_flag(synth_with_truth: Path, tmp_path: Path, capsys):
    out = tmp_path / "boxes.parquet"
    parts_dir = Path(f"{out}.parts")
    parts_dir.mkdir()
    (parts_dir / "manifest.json").write_text(json.dumps({"backend": "other", "parts": [], "samples": 0}))
    argv = ["ground", "--dataset", "synth_A", "--root", str(synth_with_truth), "--backend", "synthetic",
            "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--no-resume" in err and str(parts_dir) in err
    assert build_parser().parse_args(argv + ["--no-resume"]).no_resume is True  # the flag it names exists
    assert main(argv + ["--no-resume"]) == 0
    printed = capsys.readouterr().out
    assert "boxes by status:" in printed and "ok" in printed
    assert out.is_file() and not parts_dir.exists()
    assert main(argv) == 0  # complete output: resumed (nothing to do)


def test_the_cli_steps_are_library_functions_a_notebook_calls(tmp_path, capsys):
    """calibrate_file / vote_file (grounding.steps) write what `muva calibrate` / `muva vote` write and print it;
    a bad windows name is refused, naming the argument, before anything is written."""
    from muva_core.grounding.steps import calibrate_file, vote_file

    raw = tmp_path / "boxes.parquet"
    bad_table().to_parquet(raw)
    cal, rep = tmp_path / "cal.parquet", tmp_path / "rep.json"
    done = calibrate_file(raw, cal, report=rep)
    assert done.changed_status == 3 and done.out == cal
    assert done.report.fixed_total() == {"inverted": 1, "clipped": 1, "missing": 1}
    assert json.loads(rep.read_text()) == done.report.to_dict()
    assert main(["calibrate", "--boxes", str(raw), "--out", str(tmp_path / "cli.parquet")]) == 0
    assert capsys.readouterr().out == str(done).replace(str(cal), str(tmp_path / "cli.parquet")) + "\n"
    pd.testing.assert_frame_equal(pd.read_parquet(cal), pd.read_parquet(tmp_path / "cli.parquet"))

    voted = vote_file(cal, tmp_path / "m.safetensors", patch=16, rule="coverage", min_coverage=0.3)
    assert voted.columns == "calibrated" and not voted.sizes_assumed and len(voted.store) == 40
    saved = load_masks(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(saved.masks, voted.store.masks)
    assert saved.meta["rule"] == "coverage" and saved.meta["min_coverage"] == 0.3
    assert main(["vote", "--boxes", str(cal), "--out", str(tmp_path / "m.safetensors"), "--rule", "coverage",
                 "--min-coverage", "0.3"]) == 0
    assert capsys.readouterr().out == str(voted) + "\n"
    assert vote_file(cal, tmp_path / "r.safetensors", raw=True).columns == "raw"

    with pytest.raises(ValueError, match="windows: expected 'stripes' or 'data', got 'stripe'"):
        calibrate_file(raw, tmp_path / "never.parquet", windows="stripe")
    assert not (tmp_path / "never.parquet").exists()


def test_ground_file_labels_a_dataset_and_says_what_it_did(synth_with_truth: Path, tmp_path: Path):
    """`muva ground`'s library function, with a shard given as the CLI's --shard 1/2 parses it."""
    from muva_core.config import RunConfig
    from muva_core.grounding.labelling import parse_shard, shard_path
    from muva_core.grounding.steps import ground_file

    cfg = RunConfig().update({"backend": "synthetic", "synth_root": str(synth_with_truth)})
    out = tmp_path / "boxes.parquet"
    done = ground_file(cfg, "synth_A", synth_with_truth, out, splits="train,query", progress=False)
    table = pd.read_parquet(out)
    assert done.dataset == "synth_A" and done.summary["images"] == table["key"].nunique() > 0
    assert str(done).startswith(f"synth_A: {done.summary['images']} images labelled by synthetic")
    assert set(table["key"].str.split("/").str[1]) == {"bounding_box_train", "query"}
    half = ground_file(cfg, "synth_A", synth_with_truth, out, splits="train,query", shard=parse_shard("1/2"),
                       progress=False)
    assert shard_path(out, 1, 2).is_file() and 0 < half.summary["images"] < done.summary["images"]
