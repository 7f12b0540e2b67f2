"""Answer parsing and box sanitising shared by the grounding backends (paper section 3.2.3).

Everything here is pure Python and never raises on odd model output: a box that cannot be
used comes back as ``None`` with a status explaining why (see the status constants in
:mod:`muva_core.grounding.base`).

Conventions:

- boxes are ``(x0, y0, x1, y1)`` in image pixels, ``0 <= x0 < x1 <= img_w``,
  ``0 <= y0 < y1 <= img_h``;
- CogVLM answers hold boxes as ``[[x0,y0,x1,y1]]`` in relative coordinates times 1000
  (000-999), several boxes of one phrase separated by ``;`` inside one bracket pair;
  :func:`rel1000_to_pixels` maps them with ``v / 1000 * size``;
- stripe windows (:func:`stripe_box`) are the full-width horizontal bands where a part is
  expected in a person crop; backends use them as a fallback and calibration may too.

The last section holds the two small loading helpers the model backends share
(:func:`resolve_device`, :func:`check_model_path`).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .base import (
    STATUS_CLIPPED,
    STATUS_DEGENERATE,
    STATUS_INVERTED,
    STATUS_MISSING,
    STATUS_MULTIPLE,
    STATUS_OK,
    STATUS_PARSE_ERROR,
    PartBox,
)

Box = tuple[float, float, float, float]

STATUS_FALLBACK = "fallback"
"""The backend could not locate the part and returned the part's stripe window instead."""

STRIPE_WINDOWS: dict[str, tuple[float, float]] = {
    "head": (0.0, 0.25),
    "upper": (0.2, 0.6),
    "legs": (0.5, 1.0),
}
"""Vertical extent (fractions of the image height) of each part's stripe window.

The paper only says "stripe-like windows that focus on the top, middle or bottom areas";
these bands are our choice for upright person crops (head in the top quarter, upper body
from 20% to 60%, legs in the bottom half)."""

CHOOSE_RULES = ("score", "first", "union")

_CLIP_EPS = 1e-6


def join_status(*statuses: str) -> str:
    """Join statuses with ``+`` in the order given, dropping ``ok``, empties and repeats."""
    out: list[str] = []
    for s in statuses:
        for piece in (s or "").split("+"):
            if piece and piece != STATUS_OK and piece not in out:
                out.append(piece)
    return "+".join(out) if out else STATUS_OK


def _as_floats(box: object) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(v) for v in box)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        return None
    return vals


def sanitize_box(box: Sequence[float] | None, img_w: float, img_h: float, min_size: float = 1.0) -> tuple[Box | None, str]:
    """Make ``box`` a valid pixel box inside a ``img_w`` x ``img_h`` image.

    - not four finite numbers -> ``(None, "parse_error")``;
    - ``x0 > x1`` or ``y0 > y1``: the corners are swapped, status ``inverted``;
    - parts outside the image are clipped, status ``clipped``;
    - a side shorter than ``min_size`` pixels after clipping (zero area, or a box lying
      entirely outside the image) -> ``(None, "degenerate")`` (with the other flags).

    Returns the box and its status (several flags joined by ``+``, e.g. ``inverted+clipped``).
    """
    vals = _as_floats(box) if box is not None else None
    if vals is None or not (img_w > 0 and img_h > 0):
        return None, STATUS_PARSE_ERROR
    x0, y0, x1, y1 = vals
    flags: list[str] = []
    if x0 > x1 or y0 > y1:
        flags.append(STATUS_INVERTED)
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
    cx0, cy0 = min(max(x0, 0.0), img_w), min(max(y0, 0.0), img_h)
    cx1, cy1 = min(max(x1, 0.0), img_w), min(max(y1, 0.0), img_h)
    if max(abs(cx0 - x0), abs(cy0 - y0), abs(cx1 - x1), abs(cy1 - y1)) > _CLIP_EPS:
        flags.append(STATUS_CLIPPED)
    if cx1 - cx0 < min_size or cy1 - cy0 < min_size or (cx1 - cx0) * (cy1 - cy0) <= 0:
        flags.append(STATUS_DEGENERATE)
        return None, join_status(*flags)
    return (cx0, cy0, cx1, cy1), join_status(*flags)


NO_BOX_STATUSES: frozenset[str] = frozenset({STATUS_MISSING, STATUS_PARSE_ERROR, STATUS_DEGENERATE, "unreadable", "error"})
"""Status flags meaning the row has no usable box (its coordinates are NaN)."""

FIX_REASONS: tuple[str, ...] = (STATUS_INVERTED, STATUS_CLIPPED, STATUS_DEGENERATE, STATUS_MISSING, STATUS_PARSE_ERROR)
"""What :func:`sanitize_box_array` can find wrong with a row that claims a box, in report order:
``inverted`` (corners swapped), ``clipped`` (cut to the image), ``degenerate`` (no area left in the
image: dropped), ``missing`` (all four coordinates NaN: dropped), ``parse_error`` (some coordinate
NaN or infinite: dropped)."""

FIX_DESCRIPTIONS: dict[str, str] = {
    STATUS_INVERTED: "inverted (corners swapped)",
    STATUS_CLIPPED: "clipped (cut to the image)",
    STATUS_DEGENERATE: "degenerate (no area inside the image; dropped)",
    STATUS_MISSING: "missing (NaN coordinates; dropped)",
    STATUS_PARSE_ERROR: "parse_error (some coordinate NaN or infinite; dropped)",
}


def has_no_box(status: str) -> bool:
    """Whether a (``+``-joined) status says the row has no usable box (missing, parse_error, degenerate, ...)."""
    return any(piece in NO_BOX_STATUSES for piece in str(status or "").split("+"))


def sanitize_box_array(
    boxes,
    img_w,
    img_h,
    status: Sequence[str] | None = None,
    min_size: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`sanitize_box` over the rows of a table, vectorised, without dropping anything silently.

    boxes:  ``[N, 4]`` (x0, y0, x1, y1) in each row's image pixels
    img_w, img_h: each row's image size (scalars broadcast); a row with an unknown (NaN or non-positive)
            size is not clipped
    status: each row's status; rows whose status already says "no box" (:data:`NO_BOX_STATUSES`) are
            left alone (default: every row claims a box)
    min_size: a side shorter than this after clipping is ``degenerate`` (0: only zero area)

    Returns ``(clean [N, 4], status [N], fixed [N])``: the usable boxes (NaN where there is none), each
    row's status with the new flags joined in (e.g. ``ok`` -> ``inverted+clipped``), and the flags this
    call added (``""`` where nothing was wrong). The flags are those of :data:`FIX_REASONS`.
    """
    b = np.array(boxes, dtype=np.float64, copy=True).reshape(-1, 4)
    n = len(b)
    w = np.broadcast_to(np.asarray(img_w, dtype=np.float64), (n,))
    h = np.broadcast_to(np.asarray(img_h, dtype=np.float64), (n,))
    old = np.array([STATUS_OK] * n if status is None else [str(s) if s is not None else STATUS_OK for s in status],
                   dtype=object)
    claims = np.array([not has_no_box(s) for s in old], dtype=bool)
    finite = np.isfinite(b)
    all_nan = np.isnan(b).all(axis=1)
    bad_num = claims & ~finite.all(axis=1)
    flags = {r: np.zeros(n, dtype=bool) for r in FIX_REASONS}
    flags[STATUS_MISSING] = bad_num & all_nan
    flags[STATUS_PARSE_ERROR] = bad_num & ~all_nan
    live = claims & ~bad_num
    x0, y0, x1, y1 = b[:, 0].copy(), b[:, 1].copy(), b[:, 2].copy(), b[:, 3].copy()
    with np.errstate(invalid="ignore"):
        inv = live & ((x0 > x1) | (y0 > y1))
        flags[STATUS_INVERTED] = inv
        x0, x1 = np.where(live, np.minimum(x0, x1), x0), np.where(live, np.maximum(x0, x1), x1)
        y0, y1 = np.where(live, np.minimum(y0, y1), y0), np.where(live, np.maximum(y0, y1), y1)
        sized = live & np.isfinite(w) & np.isfinite(h) & (w > 0) & (h > 0)
        cx0, cx1 = np.clip(x0, 0.0, w), np.clip(x1, 0.0, w)
        cy0, cy1 = np.clip(y0, 0.0, h), np.clip(y1, 0.0, h)
        moved = np.maximum.reduce([np.abs(cx0 - x0), np.abs(cy0 - y0), np.abs(cx1 - x1), np.abs(cy1 - y1)]) > _CLIP_EPS
        flags[STATUS_CLIPPED] = sized & moved
        x0, y0 = np.where(sized, cx0, x0), np.where(sized, cy0, y0)
        x1, y1 = np.where(sized, cx1, x1), np.where(sized, cy1, y1)
        degenerate = live & ((x1 - x0 < min_size) | (y1 - y0 < min_size) | ((x1 - x0) * (y1 - y0) <= 0))
    flags[STATUS_DEGENERATE] = degenerate
    clean = np.stack([x0, y0, x1, y1], axis=1)
    clean[claims & (bad_num | degenerate)] = np.nan
    fixed = np.full(n, "", dtype=object)
    new_status = old.copy()
    touched = np.zeros(n, dtype=bool)
    for r in FIX_REASONS:
        touched |= flags[r]
    for i in np.flatnonzero(touched):
        added = [r for r in (STATUS_MISSING, STATUS_PARSE_ERROR, STATUS_INVERTED, STATUS_CLIPPED, STATUS_DEGENERATE)
                 if flags[r][i]]
        fixed[i] = "+".join(added)
        new_status[i] = join_status(old[i], *added)
    return clean, new_status, fixed


def count_fixes(fixed: Sequence[str]) -> dict[str, int]:
    """Rows per reason (:data:`FIX_REASONS` order) of :func:`sanitize_box_array`'s ``fixed`` flags; a row
    with two flags counts under both."""
    counts = {r: 0 for r in FIX_REASONS}
    for f in fixed:
        for piece in str(f or "").split("+"):
            if piece in counts:
                counts[piece] += 1
    return {r: n for r, n in counts.items() if n}


def describe_fixes(counts: dict[str, int]) -> str:
    """``"1 inverted (corners swapped), 2 clipped (cut to the image)"``; ``"none"`` for no fixes."""
    return ", ".join(f"{n} {FIX_DESCRIPTIONS.get(r, r)}" for r, n in counts.items() if n) or "none"


def box_area(box: Sequence[float]) -> float:
    """Area of an ``(x0, y0, x1, y1)`` box (0 for inverted boxes)."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def choose_box(
    part: str,
    candidates: Iterable[Sequence[float]] | None,
    img_w: float,
    img_h: float,
    scores: Sequence[float] | None = None,
    raw: str = "",
    rule: str = "score",
    min_size: float = 1.0,
) -> PartBox:
    """Pick one box for ``part`` among the backend's ``candidates`` (pixels); never raises.

    Every candidate is first passed through :func:`sanitize_box`; unusable ones are dropped.
    Among the usable ones, ``rule`` decides:

    - ``"score"`` (default): the highest score; ties (or no scores) -> the largest area;
      remaining ties -> the earliest candidate;
    - ``"first"``: the earliest usable candidate;
    - ``"union"``: the box enclosing all usable candidates (e.g. two leg boxes); its score
      is the maximum score.

    Status: ``missing`` for no candidates; the sanitising flags of the chosen box (or of the
    first candidate when none is usable, e.g. ``degenerate`` / ``parse_error``); plus
    ``multiple`` when more than one candidate was given. ``PartBox.candidates`` holds the
    sanitised usable candidates; ``score`` is the chosen score (1.0 without scores, 0.0 when
    missing).
    """
    try:
        cands = list(candidates or [])
    except TypeError:
        cands = []
    if rule not in CHOOSE_RULES:
        rule = "score"
    score_list: list[float] | None = None
    if scores is not None:
        try:
            score_list = [float(s) for s in scores]
        except (TypeError, ValueError):
            score_list = None
        if score_list is not None and len(score_list) != len(cands):
            score_list = None
    if not cands:
        return PartBox(part=part, box=None, score=0.0, raw=raw, status=STATUS_MISSING)

    multiple = STATUS_MULTIPLE if len(cands) > 1 else ""
    valid: list[tuple[int, Box, str, float]] = []  # (index, box, status, score)
    first_status = ""
    for i, cand in enumerate(cands):
        box, status = sanitize_box(cand, img_w, img_h, min_size=min_size)
        if i == 0:
            first_status = status
        if box is not None:
            s = score_list[i] if score_list is not None else 1.0
            valid.append((i, box, status, s if math.isfinite(s) else -math.inf))
    if not valid:
        return PartBox(part=part, box=None, score=0.0, raw=raw, status=join_status(multiple, first_status))

    kept = [v[1] for v in valid]
    if rule == "union":
        box = (min(b[0] for b in kept), min(b[1] for b in kept), max(b[2] for b in kept), max(b[3] for b in kept))
        status = join_status(multiple, *(v[2] for v in valid))
        best_score = max(v[3] for v in valid)
    else:
        if rule == "first":
            chosen = valid[0]
        else:
            chosen = max(valid, key=lambda v: (v[3], box_area(v[1]), -v[0]))
        box, status, best_score = chosen[1], join_status(multiple, chosen[2]), chosen[3]
    score = best_score if score_list is not None and math.isfinite(best_score) else (1.0 if score_list is None else 0.0)
    return PartBox(part=part, box=box, score=float(score), raw=raw, status=status, candidates=kept)


def missing_box(part: str, raw: str = "", status: str = STATUS_MISSING, score: float = 0.0) -> PartBox:
    """A :class:`PartBox` without a box (``status`` says why)."""
    return PartBox(part=part, box=None, score=score, raw=raw, status=status)


def stripe_box(part: str, img_w: float, img_h: float) -> Box:
    """The full-width stripe window of ``part`` (see :data:`STRIPE_WINDOWS`)."""
    if part not in STRIPE_WINDOWS:
        raise ValueError(f"no stripe window for part {part!r}; known: {sorted(STRIPE_WINDOWS)}")
    top, bottom = STRIPE_WINDOWS[part]
    return (0.0, top * img_h, float(img_w), bottom * img_h)


# ---------------------------------------------------------------------------------- CogVLM

_GROUP_RE = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX_RE = re.compile(rf"^{_NUM},{_NUM},{_NUM},{_NUM}$")
_BOX_SEP_RE = re.compile(r";|\]\s*,?\s*\[")


def parse_cogvlm_boxes(text: str | None) -> list[list[tuple[float, float, float, float]]]:
    """Parse the boxes of a CogVLM grounding answer.

    Each ``[[...]]`` bracket group becomes one list of boxes; inside a group boxes are
    separated by ``;`` (also ``],[`` is accepted). A box is exactly four numbers separated by
    commas (the model writes 3-digit integers, relative x1000); anything else (3 numbers,
    words, empty) is skipped, and groups without any valid box are dropped. Text around the
    groups is ignored. Values are returned as written (ints as ``int``), no range check:
    values above 999 are clipped later by :func:`sanitize_box`.

    >>> parse_cogvlm_boxes("the head[[302,113,508,289]] and [[1,2,3,4;5,6,7,8]]")
    [[(302, 113, 508, 289)], [(1, 2, 3, 4), (5, 6, 7, 8)]]
    """
    if not text:
        return []
    groups: list[list[tuple[float, float, float, float]]] = []
    for match in _GROUP_RE.finditer(str(text)):
        boxes = []
        for piece in _BOX_SEP_RE.split(match.group(1)):
            m = _BOX_RE.match(piece)
            if m is None:
                continue
            vals = tuple(float(v) if "." in v else int(v) for v in m.groups())
            boxes.append(vals)  # type: ignore[arg-type]
        if boxes:
            groups.append(boxes)
    return groups


def rel1000_to_pixels(box: Sequence[float], img_w: float, img_h: float) -> Box:
    """Map a relative-x1000 box ``(x0, y0, x1, y1)`` (000-999) to pixels: ``v / 1000 * size``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return (x0 / 1000.0 * img_w, y0 / 1000.0 * img_h, x1 / 1000.0 * img_w, y1 / 1000.0 * img_h)


# ------------------------------------------------------------------------------- Florence-2

_LOC_BOX_RE = re.compile(r"<loc_(\d+)>\s*<loc_(\d+)>\s*<loc_(\d+)>\s*<loc_(\d+)>")


def parse_florence_locations(text: str | None, img_w: float, img_h: float) -> list[Box]:
    """Boxes from Florence-2 ``<loc_k>`` tokens, in pixels.

    Every run of four consecutive ``<loc_k>`` tokens is one box ``(x0, y0, x1, y1)`` in bins
    of 1000 per side; a bin maps to its centre, ``(k + 0.5) / 1000 * size`` (the processor's
    dequantisation). Leftover location tokens (fewer than four) are ignored; out-of-range
    bins are kept and clipped later by :func:`sanitize_box`.
    """
    if not text:
        return []
    boxes: list[Box] = []
    for m in _LOC_BOX_RE.finditer(str(text)):
        x0, y0, x1, y1 = (int(v) for v in m.groups())
        boxes.append(
            ((x0 + 0.5) / 1000.0 * img_w, (y0 + 0.5) / 1000.0 * img_h, (x1 + 0.5) / 1000.0 * img_w, (y1 + 0.5) / 1000.0 * img_h)
        )
    return boxes


# ------------------------------------------------------------------- backend loading helpers


def resolve_device(device: str | None) -> str:
    """``device`` as given, else ``"cuda"`` when available, else ``"cpu"``."""
    if device is not None:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_model_path(model_id_or_path: str | os.PathLike) -> str:
    """Fail early, and clearly, when a local checkpoint path does not exist.

    Hub ids look like ``org/name``; anything absolute, starting with ``.`` or ``~``, or with
    more than one ``/`` is taken as a local path and must exist.
    """
    name = os.fspath(model_id_or_path)
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if looks_local:
        raise FileNotFoundError(f"no model checkpoint directory at {path} (expected a local path or a Hub id 'org/name')")
    return name


__all__ = [
    "Box",
    "check_model_path",
    "resolve_device",
    "CHOOSE_RULES",
    "FIX_DESCRIPTIONS",
    "FIX_REASONS",
    "NO_BOX_STATUSES",
    "STATUS_FALLBACK",
    "STRIPE_WINDOWS",
    "box_area",
    "choose_box",
    "count_fixes",
    "describe_fixes",
    "has_no_box",
    "join_status",
    "missing_box",
    "parse_cogvlm_boxes",
    "parse_florence_locations",
    "rel1000_to_pixels",
    "sanitize_box",
    "sanitize_box_array",
    "stripe_box",
]


def load_hf_model(label: str, model_cls, processor_cls, model_id: str, device: str | None = None, dtype=None):
    """``(model in eval mode, processor)`` from a Hub id or a local directory, with clear errors:
    a missing local path names the path; a failed load says how to make the files available."""
    model_id = check_model_path(model_id)
    try:
        processor = processor_cls.from_pretrained(model_id)
        model = model_cls.from_pretrained(model_id)
    except OSError as err:
        raise OSError(
            f"could not load {label} from {model_id!r}: {err}. Download it first or pass a local directory "
            "(with HF_HUB_OFFLINE=1 only cached files are used)."
        ) from err
    model = model.to(device=resolve_device(device))
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval(), processor
