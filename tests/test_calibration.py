"""Calibration: data-derived thresholds, better boxes against ground truth, consistent reports."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from muva_core.data.samples import PARTS
from muva_core.grounding.calibration import DEFAULT_WINDOWS, box_iou, box_stats, calibrate_boxes, iou_against_truth, iou_per_row
from muva_core.grounding.labelling import boxes_table
from muva_core.grounding.simulated import SimulatedExpert, failure_mode
from conftest import make_truth


@pytest.fixture(scope="module")
def truth():
    return make_truth(1500, seed=1)


@pytest.fixture(scope="module")
def labels(truth):
    ex = SimulatedExpert(truth, seed=3, domain="synth_A")
    keys = ex.keys
    table = boxes_table(keys, ex.ground(None, keys), [(128, 256)] * len(keys), backend="synthetic")
    table["mode"] = table["raw"].map(failure_mode)
    return table


def test_box_iou():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [np.nan] * 4, [0, 0, 0, 10]], float)
    b = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 15, 10], [0, 0, 10, 10], [0, 0, 0, 10]], float)
    np.testing.assert_allclose(box_iou(a, b), [1.0, 0.0, 1 / 3, 0.0, 0.0])
    assert box_iou(a[:, None], b[None]).shape == (5, 5)  # broadcasts


@pytest.mark.parametrize("method", ["quantile", "robust_z"])
def test_calibration_improves_iou_against_truth(labels, truth, method):
    cal, _ = calibrate_boxes(labels, method=method)
    before = iou_against_truth(cal, truth, "raw")
    after = iou_against_truth(cal, truth, "calibrated")
    assert after["all"] > before["all"] + 0.02
    assert after["upper"] > before["upper"] and after["legs"] > before["legs"]
    # windows at each part's median plausible box improve every part
    cal_d, _ = calibrate_boxes(labels, method=method, windows="data")
    after_d = iou_against_truth(cal_d, truth, "calibrated")
    for part in PARTS:
        assert after_d[part] > before[part] + 0.02, part


def test_failures_are_caught_and_good_boxes_kept(labels):
    cal, _ = calibrate_boxes(labels)
    legs = cal[cal["part"] == "legs"]
    by_mode = legs.groupby("mode")["replaced"].mean()
    assert by_mode["whole_person"] > 0.95 and by_mode["oversplit"] > 0.9 and by_mode["missing"] == 1.0
    assert (legs.loc[legs["mode"] == "whole_person", "rule"] == "height_high").mean() > 0.95
    assert (legs.loc[legs["mode"] == "oversplit", "rule"] == "height_low").mean() > 0.9
    assert (cal.loc[cal["mode"] == "missing", "rule"] == "missing").all()
    assert cal.loc[cal["mode"] == "ok", "replaced"].mean() < 0.02  # few false alarms
    # plain 1st/99th percentiles sit inside the whole-person peak (12 % of leg boxes) and miss it
    cal_p, _ = calibrate_boxes(labels, method="quantile", quantiles=(0.01, 0.99), k=0.0, max_height={"legs": 1.0})
    legs_p = cal_p[cal_p["part"] == "legs"]
    assert legs_p.loc[legs_p["mode"] == "whole_person", "replaced"].mean() < 0.2


def test_replaced_boxes_are_windows_and_others_untouched(labels):
    cal, rep = calibrate_boxes(labels)
    rep_rows = cal[cal["replaced"]]
    assert DEFAULT_WINDOWS["head"][0] == 0.0 and DEFAULT_WINDOWS["legs"][1] == 1.0
    for part, (top, bottom) in DEFAULT_WINDOWS.items():
        r = rep_rows[rep_rows["part"] == part]
        assert len(r) > 0
        np.testing.assert_allclose(r[["cal_x0", "cal_y0", "cal_x1", "cal_y1"]].to_numpy(),
                                   np.tile([0.0, top * 256, 128.0, bottom * 256], (len(r), 1)))
        assert rep.windows[part] == [0.0, top, 1.0, bottom]
    kept = cal[~cal["replaced"]]
    np.testing.assert_array_equal(kept[["cal_x0", "cal_y0", "cal_x1", "cal_y1"]].to_numpy(),
                                  kept[["x0", "y0", "x1", "y1"]].to_numpy())
    assert (kept["rule"] == "ok").all() and (rep_rows["rule"] != "ok").all()
    assert list(labels.columns) == list(cal.columns[: len(labels.columns)])  # raw columns kept
    # the paper's literal thirds, and 4-tuple windows per part
    cal3, _ = calibrate_boxes(labels, windows=((0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1)))
    r = cal3[cal3["replaced"] & (cal3["part"] == "upper")]
    np.testing.assert_allclose(r["cal_y0"], 256 / 3)
    cal4, _ = calibrate_boxes(labels, windows={"head": (0.25, 0, 0.75, 0.2), "upper": (0, 0.1, 1, 0.6), "legs": (0.1, 0.5, 0.9, 1)})
    r = cal4[cal4["replaced"] & (cal4["part"] == "head")]
    np.testing.assert_allclose(r[["cal_x0", "cal_x1", "cal_y1"]].to_numpy(), np.tile([32.0, 96.0, 51.2], (len(r), 1)))
    with pytest.raises(ValueError, match="window"):
        calibrate_boxes(labels, windows={"head": (0.5, 0.2)})


def test_thresholds_follow_the_data(labels):
    base = labels.copy()
    base[["y0", "y1"]] *= 240 / 256  # room below every box, so the shift below clips none
    _, rep = calibrate_boxes(base, method="robust_z")
    shifted = base.copy()
    shifted[["y0", "y1"]] += 12.8  # every box 5 % lower in the image
    _, rep_s = calibrate_boxes(shifted, method="robust_z")
    assert rep_s.fixed_total() == {}
    squeezed = base.copy()
    squeezed["y1"] = squeezed["y0"] + 0.8 * (squeezed["y1"] - squeezed["y0"])
    _, rep_q = calibrate_boxes(squeezed, method="robust_z")
    for part in PARTS:
        for side in ("lo", "hi"):
            assert rep_s.thresholds[part]["cy"][side] == pytest.approx(rep.thresholds[part]["cy"][side] + 0.05, abs=1e-9)
            assert rep_s.thresholds[part]["height"][side] == pytest.approx(rep.thresholds[part]["height"][side], abs=1e-9)
        assert rep_q.thresholds[part]["height"]["hi"] == pytest.approx(0.8 * rep.thresholds[part]["height"]["hi"], rel=1e-9)
        assert rep_q.thresholds[part]["width"]["hi"] == pytest.approx(rep.thresholds[part]["width"]["hi"], rel=1e-9)
    # quantile fences move with the data too
    _, rq = calibrate_boxes(base, method="quantile")
    _, rq_s = calibrate_boxes(shifted, method="quantile")
    assert rq_s.thresholds["legs"]["cy"]["hi"] == pytest.approx(rq.thresholds["legs"]["cy"]["hi"] + 0.05, abs=1e-9)
    # shifted without room, the boxes reaching below the image are clipped, flagged and counted
    out = labels.copy()
    out[["y0", "y1"]] += 12.8
    cal, rep_o = calibrate_boxes(out)
    below = (out["y1"] > 256).to_numpy()
    assert below.sum() > 0 and sum(rep_o.fixed[p].get("clipped", 0) for p in PARTS) == below.sum()
    assert cal.loc[below & out["status"].eq("ok").to_numpy(), "status"].eq("clipped").all()
    assert cal.loc[below, "status"].str.contains("clipped").all() and (cal["cal_y1"].dropna() <= 256).all()


def test_absolute_guards():
    # every leg box is a whole-person box: the data alone would accept them, the height guard does not
    n = 50
    rows = [dict(relpath=f"x/{i}.jpg", dataset="d", part=p, x0=30.0, y0=y0, x1=98.0, y1=y1, status="ok", img_w=128, img_h=256)
            for i in range(n) for p, (y0, y1) in {"head": (10, 40), "upper": (35, 140), "legs": (5 + i % 3, 250)}.items()]
    table = pd.DataFrame(rows)
    cal, rep = calibrate_boxes(table)
    assert rep.thresholds["legs"]["height"]["hi"] == pytest.approx(0.85)
    assert cal.loc[cal["part"] == "legs", "rule"].eq("height_high").all()
    assert not cal.loc[cal["part"] != "legs", "replaced"].any()  # identical boxes are not outliers of themselves
    table.loc[0, ["y0", "y1"]] = [10.0, 14.0]  # a 4-pixel head is always over-split
    cal, _ = calibrate_boxes(table)
    assert cal.loc[0, "rule"] == "height_low"


def test_report_counts_consistent_and_serialisable(labels):
    cal, rep = calibrate_boxes(labels)
    for part in PARTS:
        sel = cal["part"] == part
        assert sum(rep.counts[part].values()) == rep.rows[part] == sel.sum()
        assert rep.counts[part] == cal.loc[sel, "rule"].value_counts().to_dict()
        assert rep.replaced(part) == cal.loc[sel, "replaced"].sum()
        assert rep.thresholds[part]["height"]["lo"] < rep.thresholds[part]["height"]["centre"] < rep.thresholds[part]["height"]["hi"]
    assert rep.replaced() == cal["replaced"].sum()
    frame = rep.to_frame()
    assert list(frame.index) == list(PARTS)
    assert frame.loc["legs", "height_high"] == rep.counts["legs"]["height_high"]
    assert frame.loc["legs", "replaced"] == rep.replaced("legs")
    assert {"height_lo", "height_hi", "cy_lo", "area_hi"} <= set(frame.columns)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["method"] == "robust_z" and d["counts"]["legs"]["height_high"] == rep.counts["legs"]["height_high"]
    assert "legs" in str(rep)


def test_sizes_missing_and_unknown(labels):
    no_size = labels.drop(columns=["img_w", "img_h"])
    with pytest.raises(ValueError, match="img_size"):
        calibrate_boxes(no_size)
    a, _ = calibrate_boxes(no_size, img_size=(256, 128))
    b, _ = calibrate_boxes(labels)
    assert (a["rule"].to_numpy() == b["rule"].to_numpy()).all()
    unread = labels.head(6).copy()
    unread.loc[unread.index[:3], ["img_w", "img_h", "x0", "y0", "x1", "y1"]] = np.nan
    unread.loc[unread.index[:3], "status"] = "unreadable"
    cal, rep = calibrate_boxes(pd.concat([unread, labels.iloc[6:]]))
    assert (cal["rule"].iloc[:3] == "no_size").all() and not cal["replaced"].iloc[:3].any()
    with pytest.raises(ValueError, match="method"):
        calibrate_boxes(labels, method="median")
    with pytest.raises(ValueError, match="rule"):
        calibrate_boxes(labels, rules=("missing", "aspect"))


def test_box_stats_and_per_row_iou(labels, truth):
    stats = box_stats(labels)
    legs = stats[labels["part"] == "legs"]
    whole = labels.loc[labels["part"] == "legs", "mode"] == "whole_person"
    assert legs.loc[whole.to_numpy(), "height"].median() > 0.75 > legs.loc[~whole.to_numpy(), "height"].median()
    rows = iou_per_row(labels, truth, "raw")
    assert len(rows) == len(labels) and rows["iou"].between(0, 1).all()
    assert rows.loc[labels["mode"].to_numpy() == "missing", "iou"].eq(0).all()
