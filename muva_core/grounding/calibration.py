"""Calibration of implausible part boxes (paper section 3.2.3, Figure 5).

The grounding expert hallucinates: leg boxes spanning the whole person (a peak near the full
image height in the leg-height histogram), tiny over-split fragments, missing answers, boxes of
the wrong part. The paper replaces "extremely large or small boxes" by stripe windows at the
top / middle / bottom of the image, without giving thresholds. Here the thresholds are derived
from the data, per part, on the boxes' normalised height, width, area and centre:

``method="quantile"``  Tukey fences ``[q_lo - k * IQR, q_hi + k * IQR]`` with ``quantiles=(0.25, 0.75)``
                       and ``k=1.5`` (``quantiles=(0.01, 0.99), k=0`` gives plain percentiles; beware
                       they sit *inside* the failure peaks once a failure mode exceeds 1 % of the data,
                       as the paper's whole-person leg boxes do)
``method="robust_z"``  ``median +- z * 1.4826 * MAD`` with ``z=3.5`` (the default)

Sizes (height, width, area) are fenced on the log scale (sizes vary by ratios; the lower fence
stays positive), centres on the linear scale. Plus absolute guards that hold whatever the data
say (a box under ``min_height`` of the image is always an over-split fragment, a head box taller
than half the image is never a head, a head centre in the bottom half is wrong, ...).

Before any statistic, every row that claims a box is sanitised like a backend's answer
(:func:`muva_core.grounding.boxes.sanitize_box_array`): inverted corners are swapped (status
``inverted``), a box reaching outside the image is clipped (``clipped``), NaN coordinates or a box
with no area inside the image are dropped (``missing`` / ``parse_error`` / ``degenerate``, then
replaced by the ``missing`` rule). The row's ``status`` gets the flag, and the report counts each
reason (:attr:`CalibrationReport.fixed`): such a box is never kept as ``ok`` silently.

Rules, checked in this order (the first that fires is recorded in ``rule``):

``missing``                      no box (missing, unparseable, degenerate)
``height_high`` / ``height_low`` height out of the part's range (whole person / over-split)
``width_high`` / ``width_low``   width out of range (off unless listed in ``rules``)
``area_high`` / ``area_low``     area out of range
``centre``                       box centre out of range, or outside the part's band of the image
                                 (head in the top half, legs in the bottom part, ...)

A replaced box becomes the part's window: by default the full-width stripes of
:data:`muva_core.grounding.boxes.STRIPE_WINDOWS` (head ``(0, 0.25)``, upper body ``(0.2, 0.6)``,
legs ``(0.5, 1.0)`` of the image height), which overlap like real parts of a person crop do (the
paper's literal thirds are ``windows=((0, 1/3), (1/3, 2/3), (2/3, 1))``). ``windows="data"`` uses
each part's median plausible box instead; it scores better against ground truth, most of all for
the head, whose full-width stripe overlaps a true head box little.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..data.samples import PARTS
from .boxes import FIX_REASONS, STRIPE_WINDOWS, count_fixes, describe_fixes, has_no_box, sanitize_box_array
from .voting import CALIBRATED_COLUMNS, RAW_COLUMNS, table_keys

STATS: tuple[str, ...] = ("height", "width", "area", "cx", "cy")
"""Per-box statistics, normalised by the image size (area = height * width)."""

RULES: tuple[str, ...] = (
    "missing", "height_high", "height_low", "width_high", "width_low", "area_high", "area_low", "centre",
)
RULE_OK = "ok"
RULE_NO_SIZE = "no_size"  # image size unknown (an unreadable image): the box is left as it is

DEFAULT_RULES: tuple[str, ...] = ("missing", "height", "area", "centre")
"""Rule groups on by default ("height" = height_high + height_low, ...)."""

DEFAULT_WINDOWS: dict[str, tuple[float, float]] = dict(STRIPE_WINDOWS)
"""Replacement stripes per part: (top, bottom) as fractions of the image height, full width; the same
bands the backends fall back to (:data:`muva_core.grounding.boxes.STRIPE_WINDOWS`)."""

DEFAULT_GUARDS: dict[str, float] = {"min_height": 0.03, "min_width": 0.03, "min_area": 0.002}
"""Absolute lower guards: a box below these fractions of the image is always implausible."""

DEFAULT_MAX_HEIGHT: dict[str, float] = {"head": 0.5, "upper": 0.85, "legs": 0.85}
"""Absolute upper guards on the height fraction per part (a leg box near the full height is never legs)."""

DEFAULT_CENTRE_BANDS: dict[str, tuple[float, float]] = {"head": (0.0, 0.5), "upper": (0.15, 0.8), "legs": (0.35, 1.0)}
"""Where each part's box centre may lie vertically (fractions of the image height)."""



# ---------------------------------------------------------------------------- geometry
def box_iou(a, b) -> np.ndarray:
    """Vectorised IoU of boxes ``[..., 4]`` (x0, y0, x1, y1); a NaN or empty box has IoU 0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
        ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
        inter = iw * ih
        area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
        area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
        union = area_a + area_b - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return np.nan_to_num(iou, nan=0.0)


def _sizes(table: pd.DataFrame, img_size: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's image (width, height)."""
    n = len(table)
    if img_size is not None:
        return np.full(n, float(img_size[1])), np.full(n, float(img_size[0]))
    if not {"img_w", "img_h"} <= set(table.columns):
        raise ValueError("the boxes table has no img_w/img_h columns, so the image size is unknown; give it: "
                         "calibrate_boxes(..., img_size=(H, W)), or on the command line --img-size HxW "
                         "(e.g. muva calibrate --img-size 256x128)")
    return table["img_w"].to_numpy(float), table["img_h"].to_numpy(float)


def parse_img_size(text: str | None, flag: str = "--img-size") -> tuple[int, int] | None:
    """``"256x128"`` -> ``(256, 128)`` (height x width); None for None or ``""``; a ValueError naming ``flag``."""
    if text is None or str(text).strip() == "":
        return None
    try:
        h, w = (int(v) for v in str(text).lower().replace("\u00d7", "x").split("x"))
    except ValueError:
        raise ValueError(f"{flag}: expected HEIGHTxWIDTH such as 256x128, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{flag}: height and width must be positive, got {text!r}")
    return h, w


def box_stats(table: pd.DataFrame, columns: str = "raw", img_size: tuple[float, float] | None = None) -> pd.DataFrame:
    """Normalised ``height, width, area, cx, cy`` of each row's box (NaN when missing), e.g. for Figure 5."""
    cols = RAW_COLUMNS if columns == "raw" else CALIBRATED_COLUMNS
    w, h = _sizes(table, img_size)
    x0, y0, x1, y1 = (table[c].to_numpy(float) for c in cols)
    return _stats(x0, y0, x1, y1, w, h, table.index)


def _stats(x0, y0, x1, y1, w, h, index) -> pd.DataFrame:
    with np.errstate(invalid="ignore", divide="ignore"):
        out = pd.DataFrame(
            {"height": (y1 - y0) / h, "width": (x1 - x0) / w, "cx": (x0 + x1) / 2 / w, "cy": (y0 + y1) / 2 / h},
            index=index,
        )
    out["area"] = out["height"] * out["width"]
    return out[list(STATS)]


# ---------------------------------------------------------------------------- report
@dataclass
class CalibrationReport:
    """What calibration did: thresholds per part and statistic, rule counts per part, windows."""

    method: str
    params: dict
    thresholds: dict[str, dict[str, dict[str, float]]]   # part -> stat -> {lo, hi, centre, spread | spread_log}
    counts: dict[str, dict[str, int]]                     # part -> rule -> rows (first rule that fired)
    rows: dict[str, int]                                  # part -> rows
    windows: dict[str, list[float]]                       # part -> replacement box (x0, y0, x1, y1) fractions
    centre_bands: dict[str, list[float]] = field(default_factory=dict)
    fixed: dict[str, dict[str, int]] = field(default_factory=dict)
    """part -> reason -> rows whose box was repaired or dropped before the rules (``inverted``, ``clipped``,
    ``degenerate``, ``missing``, ``parse_error``; see :data:`muva_core.grounding.boxes.FIX_REASONS`);
    a row with two flags counts under both. Those rows' ``status`` carries the flag."""

    def fixed_total(self, part: str | None = None) -> dict[str, int]:
        """Rows per fix reason, over one part or all."""
        parts = [part] if part else list(self.fixed)
        out = {r: sum(self.fixed.get(p, {}).get(r, 0) for p in parts) for r in FIX_REASONS}
        return {r: n for r, n in out.items() if n}

    def replaced(self, part: str | None = None) -> int:
        """Number of replaced rows (of one part, or all)."""
        parts = [part] if part else list(self.counts)
        return int(sum(n for p in parts for r, n in self.counts[p].items() if r not in (RULE_OK, RULE_NO_SIZE)))

    def to_frame(self) -> pd.DataFrame:
        """One row per part: rows, replaced, the count of each rule, ``fixed_<reason>`` for each sanitising
        reason that occurred (:attr:`fixed`), ``<stat>_lo`` / ``<stat>_hi`` thresholds."""
        seen_fixes = list(self.fixed_total())
        records = []
        for part in self.rows:
            rec: dict = {"part": part, "rows": self.rows[part], "replaced": self.replaced(part)}
            for rule in (RULE_OK, *RULES, RULE_NO_SIZE):
                rec[rule] = self.counts[part].get(rule, 0)
            for reason in seen_fixes:  # only the reasons that occurred, so a clean table adds no columns
                rec[f"fixed_{reason}"] = self.fixed.get(part, {}).get(reason, 0)
            for stat, th in self.thresholds.get(part, {}).items():
                rec[f"{stat}_lo"], rec[f"{stat}_hi"] = th["lo"], th["hi"]
            records.append(rec)
        return pd.DataFrame.from_records(records).set_index("part")

    def to_dict(self) -> dict:
        """JSON-able dictionary (``write_json(path, report.to_dict())``)."""
        return _plain(asdict(self))

    def __str__(self) -> str:
        lines = [f"calibration ({self.method}): {self.replaced()} of {sum(self.rows.values())} boxes replaced"]
        fixes = self.fixed_total()
        lines.append(f"  bad coordinates found: {describe_fixes(fixes)}" + (
            " (those rows' status says so)" if fixes else ""))
        for part in self.rows:
            fired = {r: n for r, n in self.counts[part].items() if r != RULE_OK and n}
            h = self.thresholds.get(part, {}).get("height", {})
            line = f"  {part}: height in [{h.get('lo', float('nan')):.3f}, {h.get('hi', float('nan')):.3f}], replaced {fired}"
            if self.fixed.get(part):
                line += f", bad coordinates {self.fixed[part]}"
            lines.append(line)
        return "\n".join(lines)


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ---------------------------------------------------------------------------- calibration
def _fences(values: np.ndarray, method: str, quantiles: tuple[float, float], k: float, z: float,
            min_spread: float, log: bool) -> dict[str, float]:
    """Fences of one statistic.

    Sizes (``log=True``: height, width, area) are fenced on the log scale, where a part's sizes are
    about symmetric and a fence is a ratio (the lower fence stays positive); the spread's floor is
    then ``min_spread`` in log units (about that fraction of the median). Positions are fenced on
    the linear scale with a floor of ``min_spread / 5`` of the image.
    """
    values = values[np.isfinite(values)]
    if log:
        values = np.log(values[values > 0])
    if len(values) == 0:
        return {"lo": -np.inf, "hi": np.inf, "centre": np.nan, "spread": np.nan}
    centre = float(np.median(values))
    floor = min_spread if log else min_spread / 5
    if method == "quantile":
        q_lo, q_hi = (float(v) for v in np.quantile(values, quantiles))
        spread = max(q_hi - q_lo, floor)
        lo, hi = q_lo - k * spread, q_hi + k * spread
    else:
        spread = max(1.4826 * float(np.median(np.abs(values - centre))), floor)
        lo, hi = centre - z * spread, centre + z * spread
    if log:
        return {"lo": float(np.exp(lo)), "hi": float(np.exp(hi)), "centre": float(np.exp(centre)), "spread_log": spread}
    return {"lo": lo, "hi": hi, "centre": centre, "spread": spread}


def _expand_rules(rules: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for r in rules:
        if r in RULES:
            out.add(r)
        elif r in ("height", "width", "area"):
            out |= {f"{r}_high", f"{r}_low"}
        else:
            raise ValueError(f"unknown calibration rule {r!r}; known: {list(RULES)} or height/width/area")
    return out


def _windows(windows, parts: Sequence[str], stats_by_part: dict[str, pd.DataFrame] | None) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    if isinstance(windows, str):
        if windows != "data":
            raise ValueError(f"windows must be a sequence, a dict per part or 'data', got {windows!r}")
        for part in parts:
            s = stats_by_part[part]
            if not len(s):
                raise ValueError(f"windows='data' but no plausible {part} box to take the median of")
            out[part] = [float(np.median(s[c])) for c in ("nx0", "ny0", "nx1", "ny1")]
        return out
    items = windows.items() if isinstance(windows, Mapping) else zip(parts, windows)
    for part, win in items:
        win = [float(v) for v in win]
        if len(win) == 2:
            win = [0.0, win[0], 1.0, win[1]]
        if len(win) != 4 or not (0 <= win[0] < win[2] <= 1 and 0 <= win[1] < win[3] <= 1):
            raise ValueError(f"bad window for {part}: {win} (want (top, bottom) or (x0, y0, x1, y1) fractions in [0, 1])")
        out[part] = win
    missing = [p for p in parts if p not in out]
    if missing:
        raise ValueError(f"no calibration window for parts {missing}")
    return out


def calibrate_boxes(
    table: pd.DataFrame,
    img_size: tuple[float, float] | None = None,
    method: str = "robust_z",
    quantiles: tuple[float, float] = (0.25, 0.75),
    k: float = 1.5,
    z: float = 3.5,
    min_spread: float = 0.1,
    rules: Sequence[str] = DEFAULT_RULES,
    windows: Sequence[Sequence[float]] | Mapping[str, Sequence[float]] | str = DEFAULT_WINDOWS,
    guards: Mapping[str, float] | None = None,
    max_height: Mapping[str, float] | None = None,
    centre_bands: Mapping[str, Sequence[float]] | None = None,
    parts: Sequence[str] = PARTS,
) -> tuple[pd.DataFrame, CalibrationReport]:
    """Replace statistically implausible part boxes by stripe windows.

    table:      a labelling table (one row per image and part: part, x0..y1 (NaN if missing),
                status, img_w, img_h, ...)
    img_size:   ``(H, W)`` of every image, overriding the table's ``img_w`` / ``img_h``
    method:     "robust_z" (median +- z MAD; the default: fewer false alarms on the synthetic data) or
                "quantile" (Tukey fences on ``quantiles`` with factor ``k``)
    min_spread: floor of the spread (IQR or MAD): in log units for sizes (about that fraction of the
                median), ``min_spread / 5`` of the image for centres, so near-identical boxes do not make
                every small deviation implausible
    rules:      rules to apply (see the module doc; "height" = height_high + height_low)
    windows:    replacement per part: ``(top, bottom)`` or ``(x0, y0, x1, y1)`` image fractions, a sequence
                in ``parts`` order or a dict; "data" = the median plausible box of each part
    guards:     absolute lower guards (:data:`DEFAULT_GUARDS`), ``max_height`` upper guards per part,
                ``centre_bands`` allowed vertical centre range per part

    Returns the table with ``cal_x0, cal_y0, cal_x1, cal_y1`` (pixels), ``replaced`` and ``rule``
    added, and a :class:`CalibrationReport`. The raw ``x0..y1`` are kept as given; rows whose box had to be
    swapped, clipped or dropped first get that flag in ``status`` (``ok`` -> ``inverted``, ``clipped``, ...)
    and are counted in ``report.fixed``; a kept box's ``cal_*`` is the sanitised box.
    """
    if method not in ("quantile", "robust_z"):
        raise ValueError(f"method must be 'quantile' or 'robust_z', got {method!r}")
    if "part" not in table.columns or not set(RAW_COLUMNS) <= set(table.columns):
        raise ValueError(f"table needs columns part, {', '.join(RAW_COLUMNS)}")
    active = _expand_rules(rules)
    guards = {**DEFAULT_GUARDS, **(guards or {})}
    max_h = {**DEFAULT_MAX_HEIGHT, **(max_height or {})}
    bands = {**DEFAULT_CENTRE_BANDS, **{p: tuple(v) for p, v in (centre_bands or {}).items()}}

    out = table.copy()
    w, h = _sizes(out, img_size)
    status = out["status"].astype(str).to_numpy() if "status" in out.columns else np.full(len(out), "ok", dtype=object)
    clean, status, fixed = sanitize_box_array(out[list(RAW_COLUMNS)].to_numpy(float), w, h, status)
    out["status"] = status
    x0, y0, x1, y1 = (clean[:, i] for i in range(4))
    stats = _stats(x0, y0, x1, y1, w, h, out.index)
    bad_status = np.array([has_no_box(s) for s in status], dtype=bool)
    has_size = np.isfinite(w) & np.isfinite(h) & (w > 0) & (h > 0)
    missing = bad_status | ~np.isfinite(stats["area"].to_numpy()) | ~(stats["height"].to_numpy() > 0) | ~(stats["width"].to_numpy() > 0)
    part_col = out["part"].astype(str).to_numpy()

    thresholds: dict[str, dict[str, dict[str, float]]] = {}
    rule = np.full(len(out), RULE_OK, dtype=object)
    stats_by_part: dict[str, pd.DataFrame] = {}
    for part in parts:
        sel = part_col == part
        valid = sel & ~missing & has_size
        th = {s: _fences(stats[s].to_numpy()[valid], method, quantiles, k, z, min_spread, s not in ("cx", "cy"))
              for s in STATS}
        th["height"]["lo"] = max(th["height"]["lo"], guards["min_height"])
        th["width"]["lo"] = max(th["width"]["lo"], guards["min_width"])
        th["area"]["lo"] = max(th["area"]["lo"], guards["min_area"])
        if part in max_h:
            th["height"]["hi"] = min(th["height"]["hi"], float(max_h[part]))
        thresholds[part] = {s: {kk: float(v) for kk, v in d.items()} for s, d in th.items()}

        fired = np.full(len(out), "", dtype=object)
        checks: list[tuple[str, np.ndarray]] = [("missing", missing)]
        for s in ("height", "width", "area"):
            vals = stats[s].to_numpy()
            checks.append((f"{s}_high", vals > th[s]["hi"]))
            checks.append((f"{s}_low", vals < th[s]["lo"]))
        cx, cy = stats["cx"].to_numpy(), stats["cy"].to_numpy()
        band = bands.get(part, (0.0, 1.0))
        off_centre = (cx < th["cx"]["lo"]) | (cx > th["cx"]["hi"]) | (cy < th["cy"]["lo"]) | (cy > th["cy"]["hi"])
        off_centre |= (cy < band[0]) | (cy > band[1])
        checks.append(("centre", off_centre))
        for name, hit in reversed([(n, c) for n, c in checks if n in active]):  # first rule in order wins
            fired[hit] = name
        part_rule = np.where(fired == "", RULE_OK, fired)
        part_rule = np.where(has_size, part_rule, RULE_NO_SIZE)
        rule[sel] = part_rule[sel]
        kept = sel & (rule == RULE_OK)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats_by_part[part] = pd.DataFrame({"nx0": x0[kept] / w[kept], "ny0": y0[kept] / h[kept],
                                                "nx1": x1[kept] / w[kept], "ny1": y1[kept] / h[kept]})

    wins = _windows(windows, parts, stats_by_part)
    replaced = (rule != RULE_OK) & (rule != RULE_NO_SIZE) & np.isin(part_col, list(parts))
    cal = np.stack([x0, y0, x1, y1], axis=1)
    for part in parts:
        idx = replaced & (part_col == part)
        fx0, fy0, fx1, fy1 = wins[part]
        cal[idx] = np.stack([fx0 * w[idx], fy0 * h[idx], fx1 * w[idx], fy1 * h[idx]], axis=1)
    for i, c in enumerate(CALIBRATED_COLUMNS):
        out[c] = cal[:, i]
    out["replaced"] = replaced
    out["rule"] = rule.astype(str)

    counts = {}
    rows = {}
    fixes = {}
    for part in parts:
        sel = part_col == part
        rows[part] = int(sel.sum())
        vc = pd.Series(rule[sel]).value_counts()
        counts[part] = {str(r): int(n) for r, n in vc.items()}
        fixes[part] = count_fixes(fixed[sel])
    params = {"quantiles": list(quantiles), "k": k} if method == "quantile" else {"z": z}
    params.update(min_spread=min_spread, rules=sorted(active), guards=dict(guards), max_height=dict(max_h),
                  img_size=list(img_size) if img_size is not None else None)
    report = CalibrationReport(method, params, thresholds, counts, rows, wins,
                               {p: list(bands.get(p, (0.0, 1.0))) for p in parts}, fixes)
    return out, report


# ---------------------------------------------------------------------------- scoring against truth
def _truth_keys(gt: pd.DataFrame, table: pd.DataFrame) -> pd.Series:
    if "key" in gt.columns:
        return gt["key"].astype(str)
    for col in ("dataset", "domain"):
        if col in gt.columns:
            return gt[col].astype(str) + "/" + gt["relpath"].astype(str)
    datasets = table["dataset"].unique() if "dataset" in table.columns else []
    if len(datasets) == 1:
        return f"{datasets[0]}/" + gt["relpath"].astype(str)
    raise ValueError("ground truth has no key/dataset column and the table spans several datasets; add a dataset column")


def iou_per_row(table: pd.DataFrame, gt_table: pd.DataFrame, columns: str = "raw", parts: Sequence[str] = PARTS) -> pd.DataFrame:
    """Each (image, part) of the table with a visible true box: ``key, part, iou`` (a missing box scores 0),
    indexed like the table's rows.

    True boxes are scaled from the truth's image size to the table's when both are known.
    """
    cols = RAW_COLUMNS if columns == "raw" else CALIBRATED_COLUMNS
    if columns not in ("raw", "calibrated"):
        raise ValueError(f"columns must be 'raw' or 'calibrated', got {columns!r}")
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks {missing}" + (" (run calibrate_boxes first)" if columns == "calibrated" else ""))
    gt = gt_table[gt_table["part"].isin(parts)].copy()
    gt["key"] = _truth_keys(gt, table).to_numpy()
    ok = gt[["x0", "y0", "x1", "y1"]].notna().all(axis=1)
    if "visible" in gt.columns:
        ok &= gt["visible"].fillna(0) > 0
    gt = gt[ok]
    pred = table.assign(key=table_keys(table).to_numpy(), _row=table.index)
    keep_pred = ["_row", "key", "part", *cols] + [c for c in ("img_w", "img_h") if c in pred.columns]
    keep_gt = ["key", "part", "x0", "y0", "x1", "y1"] + [c for c in ("img_w", "img_h") if c in gt.columns]
    if gt.duplicated(["key", "part"]).any():
        raise ValueError("ground truth has several boxes for one key and part")
    merged = pred[keep_pred].merge(gt[keep_gt], on=["key", "part"], how="inner", suffixes=("", "_gt"))
    tb = merged[[f"{c}_gt" if c in cols else c for c in ("x0", "y0", "x1", "y1")]].to_numpy(float)
    if {"img_w_gt", "img_w", "img_h_gt", "img_h"} <= set(merged.columns):
        sx = (merged["img_w"] / merged["img_w_gt"]).fillna(1.0).to_numpy()
        sy = (merged["img_h"] / merged["img_h_gt"]).fillna(1.0).to_numpy()
        tb = tb * np.stack([sx, sy, sx, sy], axis=1)
    pb = merged[list(cols)].to_numpy(float)
    return pd.DataFrame({"key": merged["key"].to_numpy(), "part": merged["part"].to_numpy(), "iou": box_iou(pb, tb)},
                        index=pd.Index(merged["_row"].to_numpy(), name=table.index.name))


def iou_against_truth(table: pd.DataFrame, gt_table: pd.DataFrame, columns: str = "raw",
                      parts: Sequence[str] = PARTS) -> pd.Series:
    """Mean IoU against the true part boxes, per part and over all rows (``"all"``)."""
    per_row = iou_per_row(table, gt_table, columns, parts)
    means = per_row.groupby("part")["iou"].mean().reindex(list(parts))
    means["all"] = per_row["iou"].mean() if len(per_row) else np.nan
    return means.rename(f"iou_{columns}")


__all__ = [
    "DEFAULT_CENTRE_BANDS",
    "DEFAULT_GUARDS",
    "DEFAULT_MAX_HEIGHT",
    "DEFAULT_RULES",
    "DEFAULT_WINDOWS",
    "RULES",
    "STATS",
    "CalibrationReport",
    "box_iou",
    "box_stats",
    "calibrate_boxes",
    "iou_against_truth",
    "iou_per_row",
    "parse_img_size",
]
