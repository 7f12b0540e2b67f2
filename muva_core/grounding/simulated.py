"""The simulated grounding expert: ground-truth part boxes with jitter and the paper's failure modes.

Stands in for the visual grounding expert (VGE, paper section 3.2.3) on the synthetic data, where
the true part boxes are known, so calibration and voting can be scored. Besides jittered true
boxes it reproduces the hallucinations of the paper's Figure 5 at configurable rates:

``whole_person``  the leg (or upper-body) query answered with the whole person: the raw leg-height
                  histogram gets its peak near the full image height
``oversplit``     a tiny fragment of the part (one shoe, a piece of the torso): the peak at tiny heights
``missing``       no box at all
``wrong_part``    a neighbouring part (the head query answered with the upper body) or a shifted box

Every answer is deterministic per ``(seed, key, part)``, whatever the batch composition or order,
and its failure mode is recorded as JSON in :attr:`PartBox.raw` (``{"mode": ..., "source": ...}``),
readable with :func:`failure_mode`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ..data.samples import PARTS, DatasetError
from .base import (
    STATUS_CLIPPED,
    STATUS_DEGENERATE,
    STATUS_MISSING,
    STATUS_OK,
    GroundingBackend,
    PartBox,
    register_backend,
)

TRUTH_FILE = "part_boxes.parquet"
"""Ground-truth file of a synthetic domain folder: one row per image and part (head, upper, legs, person)."""

TRUTH_PARTS: tuple[str, ...] = (*PARTS, "person")

FAILURE_MODES: tuple[str, ...] = ("whole_person", "oversplit", "missing", "wrong_part")
"""Simulated failure modes, drawn in this order from one uniform number per (seed, key, part)."""

DEFAULT_RATES: dict[str, dict[str, float]] = {
    "whole_person": {"head": 0.0, "upper": 0.06, "legs": 0.12},
    "oversplit": {"head": 0.06, "upper": 0.06, "legs": 0.06},
    "missing": {"head": 0.03, "upper": 0.03, "legs": 0.03},
    "wrong_part": {"head": 0.03, "upper": 0.03, "legs": 0.03},
}
"""Default failure rates per mode and part, chosen so the raw leg-height histogram shows Figure 5's
two spurious peaks (near the full height and tiny)."""

# the neighbour answered instead of each part by the "wrong_part" mode
_NEIGHBOURS: dict[str, tuple[str, ...]] = {"head": ("upper",), "upper": ("head", "legs"), "legs": ("upper",)}

_COLUMNS = ("relpath", "part", "x0", "y0", "x1", "y1", "img_w", "img_h")


class UnknownKeyError(KeyError):
    """A sample key the simulated expert has no ground truth for."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def failure_mode(raw: str) -> str:
    """The failure mode recorded in a simulated answer's ``raw`` ("ok", "whole_person", ...; "" if not simulated)."""
    try:
        return str(json.loads(raw).get("mode", ""))
    except (TypeError, ValueError, AttributeError):
        return ""


def dataset_truth(dataset) -> pd.DataFrame | None:
    """The ground-truth part boxes of a parsed dataset (keyed by its name), or None when it has none (any real
    dataset); ``dataset`` may be None."""
    path = Path(dataset.dataset_dir) / TRUTH_FILE if dataset is not None else None
    return load_truth(path, dataset.name) if path is not None and path.is_file() else None


def load_truth(source: pd.DataFrame | str | os.PathLike, domain: str | None = None) -> pd.DataFrame:
    """Load ground-truth part boxes and add a ``key`` column (``domain/relpath``).

    ``source`` is a table, a ``part_boxes.parquet`` file, a synthetic domain folder holding one,
    or a synthetic root whose sub-folders each hold one (keyed by the sub-folder name).
    A table keys its rows by its ``key`` column, else ``dataset``/``domain`` + ``relpath``,
    else ``domain`` + ``relpath``.
    """
    if isinstance(source, pd.DataFrame):
        return _with_keys(source.copy(), domain, "the ground-truth table")
    path = Path(source)
    if path.is_file():
        return _with_keys(_read_truth(path), domain or path.parent.name, str(path))
    if not path.is_dir():
        raise DatasetError(f"{path}: no such ground-truth file or synthetic data folder")
    if (path / TRUTH_FILE).is_file():
        return _with_keys(_read_truth(path / TRUTH_FILE), domain or path.name, str(path / TRUTH_FILE))
    files = sorted(path.glob(f"*/{TRUTH_FILE}"))
    if not files:
        raise DatasetError(f"{path}: no {TRUTH_FILE} in it or in any of its sub-folders (is it a synthetic root?)")
    tables = [_with_keys(_read_truth(f), f.parent.name, str(f)) for f in files]
    return pd.concat(tables, ignore_index=True)


def _read_truth(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - report which file is broken
        raise DatasetError(f"{path}: cannot read the ground-truth table ({type(err).__name__}: {err})") from err


def _with_keys(table: pd.DataFrame, domain: str | None, where: str) -> pd.DataFrame:
    missing = [c for c in _COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"{where}: ground-truth table lacks columns {missing}")
    if "key" not in table.columns:
        col = next((c for c in ("dataset", "domain") if c in table.columns), None)
        if col is not None:
            table["key"] = table[col].astype(str) + "/" + table["relpath"].astype(str)
        elif domain is not None:
            table["key"] = f"{domain}/" + table["relpath"].astype(str)
        else:
            raise DatasetError(f"{where}: no key, dataset or domain column and no domain given")
    if "visible" not in table.columns:
        table["visible"] = 1.0
    return table


def _uniform_seed(seed: int, key: str, part: str) -> list[int]:
    digest = hashlib.blake2b(f"{key}\x00{part}".encode(), digest_size=16).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return [int(seed) & 0xFFFFFFFF, *words]


@register_backend("synthetic")
class SimulatedExpert(GroundingBackend):
    """Grounding backend answering from ground truth, with jitter and Figure 5's failure modes.

    truth:     ground-truth table, ``part_boxes.parquet`` file, domain folder or synthetic root
               (see :func:`load_truth`)
    seed:      answers are a pure function of ``(seed, key, part)``
    rates:     failure rates, ``{mode: rate}`` or ``{mode: {part: rate}}``, merged over :data:`DEFAULT_RATES`
    jitter:    standard deviation of each corner's offset, as a fraction of the part's width / height
    hidden_miss: probability of no answer for a fully hidden part, scaled by ``1 - visible``
    """

    def __init__(
        self,
        truth: pd.DataFrame | str | os.PathLike,
        seed: int = 0,
        rates: Mapping[str, float | Mapping[str, float]] | None = None,
        jitter: float = 0.05,
        hidden_miss: float = 0.5,
        batch_size: int = 64,
        domain: str | None = None,
    ) -> None:
        self.seed = int(seed)
        self.jitter = float(jitter)
        self.hidden_miss = float(hidden_miss)
        self.batch_size = int(batch_size)
        self.rates = self._merge_rates(rates)
        table = load_truth(truth, domain)
        self._build_index(table)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _merge_rates(rates: Mapping[str, float | Mapping[str, float]] | None) -> dict[str, dict[str, float]]:
        merged = {mode: dict(per_part) for mode, per_part in DEFAULT_RATES.items()}
        for mode, value in (rates or {}).items():
            if mode not in merged:
                raise ValueError(f"unknown failure mode {mode!r}; known: {list(FAILURE_MODES)}")
            if isinstance(value, Mapping):
                for part, rate in value.items():
                    if part not in PARTS:
                        raise ValueError(f"failure rate for unknown part {part!r}; parts: {list(PARTS)}")
                    merged[mode][part] = float(rate)
            else:
                merged[mode] = {p: float(value) for p in PARTS}
        for part in PARTS:
            rs = [merged[m][part] for m in FAILURE_MODES]
            if min(rs) < 0 or sum(rs) > 1:
                raise ValueError(f"failure rates for {part!r} must be >= 0 and sum to <= 1, got {dict(zip(FAILURE_MODES, rs))}")
        return merged

    def _build_index(self, table: pd.DataFrame) -> None:
        keys = table["key"].astype(str).to_numpy()
        uniq, inv = np.unique(keys, return_inverse=True)
        self._keys = uniq
        self._index = {k: i for i, k in enumerate(uniq.tolist())}
        n = len(uniq)
        self._boxes = np.full((n, len(TRUTH_PARTS), 4), np.nan)
        self._visible = np.zeros((n, len(TRUTH_PARTS)))
        self._size = np.full((n, 2), np.nan)  # (w, h)
        part_idx = table["part"].map({p: i for i, p in enumerate(TRUTH_PARTS)})
        keep = part_idx.notna().to_numpy()
        rows, cols = inv[keep], part_idx[keep].astype(int).to_numpy()
        self._boxes[rows, cols] = table.loc[keep, ["x0", "y0", "x1", "y1"]].to_numpy(float)
        self._visible[rows, cols] = table.loc[keep, "visible"].to_numpy(float)
        self._size[inv] = table[["img_w", "img_h"]].to_numpy(float)
        # no "person" row: the union of the part boxes
        person = TRUTH_PARTS.index("person")
        no_person = np.isnan(self._boxes[:, person]).any(axis=1)
        if no_person.any():
            parts = self._boxes[no_person, : len(PARTS)]
            with np.errstate(all="ignore"):
                union = np.stack(
                    [np.nanmin(parts[..., 0], 1), np.nanmin(parts[..., 1], 1), np.nanmax(parts[..., 2], 1), np.nanmax(parts[..., 3], 1)], 1
                )
            self._boxes[no_person, person] = union
            self._visible[no_person, person] = 1.0

    @property
    def keys(self) -> list[str]:
        """Every sample key with ground truth, sorted."""
        return self._keys.tolist()

    def truth_box(self, key: str, part: str) -> tuple[float, float, float, float] | None:
        """The true box of ``part`` (or "person") in the original image's pixels."""
        box = self._boxes[self._row(key), TRUTH_PARTS.index(part)]
        return None if np.isnan(box).any() else tuple(float(v) for v in box)

    def _row(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise UnknownKeyError(
                f"simulated expert: no ground truth for sample key {key!r} "
                f"({len(self._keys)} keys known, e.g. {self._keys[:3].tolist()}); "
                "keys are 'domain/relpath' of the synthetic data it was built from"
            ) from None

    # ------------------------------------------------------------------ grounding
    def ground(
        self,
        images: Sequence[Image.Image | None] | None,
        keys: Sequence[str] | None = None,
        parts: Sequence[str] = PARTS,
    ) -> list[list[PartBox]]:
        """Answer each part query for each image; boxes in the pixels of the image given.

        ``images`` may be ``None`` (or hold ``None``): boxes are then in the ground truth's image size.
        """
        if keys is None:
            raise ValueError("the simulated expert needs the sample keys ('domain/relpath') to look up ground truth")
        if images is None:
            images = [None] * len(keys)
        if len(images) != len(keys):
            raise ValueError(f"got {len(images)} images but {len(keys)} keys")
        for part in parts:
            if part not in PARTS:
                raise ValueError(f"unknown part {part!r}; parts: {list(PARTS)}")
        out = []
        for image, key in zip(images, keys):
            row = self._row(str(key))
            w, h = self._size[row]
            if image is not None:
                sx, sy = image.width / w, image.height / h
                w, h = float(image.width), float(image.height)
            else:
                sx = sy = 1.0
            out.append([self._answer(row, str(key), part, (sx, sy), (w, h)) for part in parts])
        return out

    def _answer(self, row: int, key: str, part: str, scale: tuple[float, float], size: tuple[float, float]) -> PartBox:
        rng = np.random.default_rng(_uniform_seed(self.seed, key, part))
        u_hidden, u_mode = rng.random(2)
        score = float(rng.uniform(0.5, 1.0))
        p = TRUTH_PARTS.index(part)
        truth = self._boxes[row, p]
        scale4 = np.array([scale[0], scale[1], scale[0], scale[1]])

        def result(mode: str, box: np.ndarray | None, source: str = "") -> PartBox:
            raw = json.dumps({"mode": mode, "source": source or part})
            if box is None:
                return PartBox(part, None, 0.0, raw, STATUS_MISSING)
            return self._finish(part, box * scale4, score, raw, size)

        if np.isnan(truth).any() or u_hidden < self.hidden_miss * (1.0 - float(self._visible[row, p])):
            return result("not_visible", None)
        edges = np.cumsum([self.rates[m][part] for m in FAILURE_MODES])
        mode = FAILURE_MODES[int(np.searchsorted(edges, u_mode, side="right"))] if u_mode < edges[-1] else "ok"
        if mode == "ok":
            return result("ok", self._jitter(truth, rng))
        if mode == "missing":
            return result("missing", None)
        if mode == "whole_person":
            return result("whole_person", self._jitter(self._boxes[row, TRUTH_PARTS.index("person")], rng), "person")
        if mode == "oversplit":
            x0, y0, x1, y1 = truth
            fw, fh = rng.uniform(0.3, 0.7), rng.uniform(0.12, 0.35)
            bw, bh = (x1 - x0) * fw, (y1 - y0) * fh
            ox, oy = rng.uniform(x0, x1 - bw), rng.uniform(y0, y1 - bh)
            return result("oversplit", np.array([ox, oy, ox + bw, oy + bh]))
        # wrong_part: a neighbouring part's box (70%) or this part's box shifted by about its own height
        if rng.random() < 0.7:
            choices = _NEIGHBOURS[part]
            other = choices[int(rng.integers(len(choices)))]
            return result("wrong_part", self._jitter(self._boxes[row, TRUTH_PARTS.index(other)], rng), other)
        x0, y0, x1, y1 = truth
        dy = (y1 - y0) * rng.uniform(0.6, 1.0) * rng.choice([-1.0, 1.0])
        dx = (x1 - x0) * rng.uniform(-0.2, 0.2)
        return result("wrong_part", np.array([x0 + dx, y0 + dy, x1 + dx, y1 + dy]), "shift")

    def _jitter(self, box: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if np.isnan(box).any():
            return box
        w, h = box[2] - box[0], box[3] - box[1]
        return box + rng.normal(0.0, self.jitter, 4) * np.array([w, h, w, h])

    @staticmethod
    def _finish(part: str, box: np.ndarray, score: float, raw: str, size: tuple[float, float]) -> PartBox:
        if np.isnan(box).any():
            return PartBox(part, None, 0.0, raw, STATUS_MISSING)
        w, h = size
        x0, x1 = sorted((float(box[0]), float(box[2])))
        y0, y1 = sorted((float(box[1]), float(box[3])))
        clipped = (min(x0, y0) < 0) or x1 > w or y1 > h
        x0, x1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
        y0, y1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            return PartBox(part, None, 0.0, raw, STATUS_DEGENERATE)
        return PartBox(part, (x0, y0, x1, y1), score, raw, STATUS_CLIPPED if clipped else STATUS_OK)


__all__ = [
    "DEFAULT_RATES",
    "FAILURE_MODES",
    "TRUTH_FILE",
    "dataset_truth",
    "TRUTH_PARTS",
    "SimulatedExpert",
    "UnknownKeyError",
    "failure_mode",
    "load_truth",
]
