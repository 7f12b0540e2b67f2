"""Binary voting: part boxes -> patch masks G [3, Npatch] (paper section 3.2.3, Figure 6).

A patch gets 1 for part p when the (calibrated) box of p covers it, 0 otherwise; the mask of
each part is flattened row-wise (index ``row * grid_w + col``) and the three are stacked.
"Covers" is a choice the paper leaves open:

``rule="center"``    the patch centre lies inside the box (closed interval, so the rule is
                     symmetric under a horizontal flip)
``rule="coverage"``  the box covers at least ``min_coverage`` of the patch's area

Boxes are in the pixels of the image they were predicted on; when that size differs from the
model input (``img_size``), they are scaled to the input size first, as the image will be.

Masks are stored in a :class:`MaskStore`: one safetensors file holding a uint8 tensor
``masks [N, 3, Npatch]`` and, in its metadata, the JSON list of keys (``dataset/relpath``),
the grid, the input size, the rule and the source table.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..data.samples import PARTS
from ..io import atomic_path

RAW_COLUMNS = ("x0", "y0", "x1", "y1")
CALIBRATED_COLUMNS = ("cal_x0", "cal_y0", "cal_x1", "cal_y1")
FORMAT = "muva-part-masks/1"


def grid_shape(img_size: tuple[int, int] = (256, 128), patch: int | tuple[int, int] = 16,
               grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """Patch grid ``(rows, cols)`` for an input ``img_size=(H, W)``: ``grid`` if given, else ``H // ph, W // pw``."""
    if grid is not None:
        gh, gw = int(grid[0]), int(grid[1])
    else:
        ph, pw = (patch, patch) if np.isscalar(patch) else patch
        if img_size[0] % ph or img_size[1] % pw:
            raise ValueError(f"image size {tuple(img_size)} is not a multiple of the patch size {(ph, pw)}; pass grid=")
        gh, gw = int(img_size[0] // ph), int(img_size[1] // pw)
    if gh < 1 or gw < 1:
        raise ValueError(f"empty patch grid {(gh, gw)} for image size {tuple(img_size)}")
    return gh, gw


def vote_boxes(
    boxes: np.ndarray,
    img_size: tuple[int, int] = (256, 128),
    patch: int | tuple[int, int] = 16,
    grid: tuple[int, int] | None = None,
    rule: str = "center",
    min_coverage: float = 0.5,
    box_sizes: np.ndarray | None = None,
) -> np.ndarray:
    """Vectorised voting: ``boxes [..., 4]`` (x0, y0, x1, y1) -> uint8 masks ``[..., gh * gw]``.

    box_sizes: ``[..., 2]`` (width, height) of the image each box was predicted on (broadcast
               against ``boxes[..., 0]``); ``None`` = already in input pixels. NaN boxes vote 0.
    """
    if rule not in ("center", "coverage"):
        raise ValueError(f"rule must be 'center' or 'coverage', got {rule!r}")
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [..., 4], got {boxes.shape}")
    H, W = float(img_size[0]), float(img_size[1])
    gh, gw = grid_shape(img_size, patch, grid)
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    if box_sizes is not None:
        sizes = np.asarray(box_sizes, dtype=np.float64)
        sx, sy = W / sizes[..., 0], H / sizes[..., 1]
        x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
    x0, x1 = np.minimum(x0, x1), np.maximum(x0, x1)
    y0, y1 = np.minimum(y0, y1), np.maximum(y0, y1)
    valid = np.isfinite(x0) & np.isfinite(x1) & np.isfinite(y0) & np.isfinite(y1) & (x1 > x0) & (y1 > y0)
    pw, ph = W / gw, H / gh
    col_lo, row_lo = np.arange(gw) * pw, np.arange(gh) * ph
    with np.errstate(invalid="ignore"):
        if rule == "center":
            cx, cy = col_lo + pw / 2, row_lo + ph / 2
            in_x = (cx >= x0[..., None]) & (cx <= x1[..., None])
            in_y = (cy >= y0[..., None]) & (cy <= y1[..., None])
            mask = in_y[..., :, None] & in_x[..., None, :]
        else:
            ox = np.clip(np.minimum(col_lo + pw, x1[..., None]) - np.maximum(col_lo, x0[..., None]), 0, None) / pw
            oy = np.clip(np.minimum(row_lo + ph, y1[..., None]) - np.maximum(row_lo, y0[..., None]), 0, None) / ph
            mask = (oy[..., :, None] * ox[..., None, :]) >= float(min_coverage) - 1e-9
    mask &= valid[..., None, None]
    return mask.reshape(*mask.shape[:-2], gh * gw).astype(np.uint8)


def vote_patch_masks(
    boxes,
    img_size: tuple[int, int] = (256, 128),
    patch: int | tuple[int, int] = 16,
    grid: tuple[int, int] | None = None,
    rule: str = "center",
    min_coverage: float = 0.5,
    box_size: tuple[float, float] | None = None,
    parts: Sequence[str] = PARTS,
    columns: str = "calibrated",
) -> np.ndarray:
    """The pseudo-label mask matrix G ``[3, Npatch]`` (uint8 0/1) of one image.

    boxes:    ``[3, 4]`` boxes (head, upper, legs; NaN = none) or the image's rows of a
              (calibrated) table, with a ``part`` column
    img_size: model input ``(H, W)``; ``patch`` size or ``grid=(rows, cols)`` gives the patch grid
    box_size: ``(width, height)`` of the image the boxes are in (default: ``img_size``; a table's
              ``img_w``/``img_h`` columns)
    """
    if isinstance(boxes, pd.DataFrame):
        cols = _box_columns(boxes, columns)
        arr = np.full((len(parts), 4), np.nan)
        for i, part in enumerate(parts):
            rows = boxes[boxes["part"] == part]
            if len(rows) > 1:
                raise ValueError(f"{len(rows)} rows for part {part!r}; pass one image's rows")
            if len(rows):
                arr[i] = rows[list(cols)].to_numpy(float)[0]
        if box_size is None and {"img_w", "img_h"} <= set(boxes.columns) and len(boxes):
            box_size = (float(boxes["img_w"].iloc[0]), float(boxes["img_h"].iloc[0]))
        boxes = arr
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [parts, 4], got shape {boxes.shape}")
    sizes = None if box_size is None else np.asarray(box_size, dtype=np.float64)
    return vote_boxes(boxes, img_size, patch, grid, rule, min_coverage, sizes)


def _box_columns(table: pd.DataFrame, columns: str) -> tuple[str, ...]:
    if columns not in ("calibrated", "raw"):
        raise ValueError(f"columns must be 'calibrated' or 'raw', got {columns!r}")
    cols = CALIBRATED_COLUMNS if columns == "calibrated" else RAW_COLUMNS
    missing = [c for c in cols if c not in table.columns]
    if missing:
        hint = " (run calibrate_boxes first, or vote on columns='raw')" if columns == "calibrated" else ""
        raise ValueError(f"table lacks box columns {missing}{hint}")
    return cols


def table_keys(table: pd.DataFrame) -> pd.Series:
    """Each row's sample key: the ``key`` column, else ``dataset/relpath``."""
    if "key" in table.columns:
        return table["key"].astype(str)
    if {"dataset", "relpath"} <= set(table.columns):
        return table["dataset"].astype(str) + "/" + table["relpath"].astype(str)
    raise ValueError("table has neither a key column nor dataset and relpath columns")


def _row_sizes(table: pd.DataFrame, box_img_size: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's image (width, height): ``box_img_size=(H, W)`` if given, else the ``img_w``/``img_h`` columns,
    else None (boxes already in input pixels)."""
    if box_img_size is not None:
        return np.full(len(table), float(box_img_size[1])), np.full(len(table), float(box_img_size[0]))
    if {"img_w", "img_h"} <= set(table.columns):
        return table["img_w"].to_numpy(float), table["img_h"].to_numpy(float)
    return None


def box_problems(
    table: pd.DataFrame,
    columns: str = "calibrated",
    img_size: tuple[int, int] = (256, 128),
    box_img_size: tuple[float, float] | None = None,
) -> dict:
    """What voting meets in a table, by reason, for the summary of ``muva vote``.

    Returns ``{"rows", "status": {status: rows}, "replaced": rows, "rules": {rule: rows} (replaced rows only),
    "fixes": {reason: rows}}``; ``fixes`` counts the boxes of ``columns`` that voting swaps (``inverted``),
    cuts to the image (``clipped``) or votes as empty (``missing`` / ``parse_error`` / ``degenerate``) although
    their row claims a box (see :func:`muva_core.grounding.boxes.sanitize_box_array`). A calibrated table's
    ``cal_*`` boxes are already clean; raw boxes straight from a hand-made or foreign table may not be.
    """
    from .boxes import count_fixes, sanitize_box_array

    cols = _box_columns(table, columns)
    sizes = _row_sizes(table, box_img_size)
    w, h = sizes if sizes is not None else (float(img_size[1]), float(img_size[0]))
    status = table["status"].astype(str).to_numpy() if "status" in table.columns else None
    _, _, fixed = sanitize_box_array(table[list(cols)].to_numpy(float), w, h, status)
    out = {"rows": int(len(table)), "status": {}, "replaced": 0, "rules": {}, "fixes": count_fixes(fixed)}
    if status is not None:
        out["status"] = {str(k): int(v) for k, v in pd.Series(status).value_counts().items()}
    if "replaced" in table.columns and columns == "calibrated":
        rep = table["replaced"].fillna(False).astype(bool)
        out["replaced"] = int(rep.sum())
        if "rule" in table.columns:
            out["rules"] = {str(k): int(v) for k, v in table.loc[rep, "rule"].value_counts().items()}
    return out


def vote_table(
    table: pd.DataFrame,
    img_size: tuple[int, int] = (256, 128),
    patch: int | tuple[int, int] = 16,
    grid: tuple[int, int] | None = None,
    rule: str = "center",
    min_coverage: float = 0.5,
    columns: str = "calibrated",
    parts: Sequence[str] = PARTS,
    box_img_size: tuple[float, float] | None = None,
) -> tuple[list[str], np.ndarray]:
    """Vote every image of a (calibrated) table: ``(sorted keys, masks [N, 3, Npatch] uint8)``.

    Boxes are scaled from each row's ``img_w``/``img_h`` (or ``box_img_size=(H, W)``, which overrides them;
    with neither the boxes are taken to be in input pixels) to ``img_size``; a part with no row or a
    NaN box votes all zeros; inverted corners are swapped and a box reaching outside the image votes only
    the patches inside (:func:`box_problems` counts such boxes). ``columns="raw"`` votes the uncalibrated
    boxes (the Table 9 ablation).
    """
    cols = _box_columns(table, columns)
    keys_col = table_keys(table).to_numpy()
    uniq, inv = np.unique(keys_col, return_inverse=True)
    part_idx = table["part"].map({p: i for i, p in enumerate(parts)})
    keep = part_idx.notna().to_numpy()
    pi = part_idx[keep].astype(int).to_numpy()
    if pd.Series(inv[keep] * len(parts) + pi).duplicated().any():
        raise ValueError("table has several rows for one key and part")
    boxes = np.full((len(uniq), len(parts), 4), np.nan)
    boxes[inv[keep], pi] = table.loc[keep, list(cols)].to_numpy(float)
    sizes = None
    row_sizes = _row_sizes(table, box_img_size)
    if row_sizes is not None:
        sizes = np.full((len(uniq), len(parts), 2), np.nan)
        sizes[inv[keep], pi] = np.stack(row_sizes, axis=1)[keep]
    masks = vote_boxes(boxes, img_size, patch, grid, rule, min_coverage, sizes)
    return uniq.tolist(), masks


def flip_masks(masks, grid_hw: tuple[int, int] = (16, 8)):
    """Horizontally flip row-wise flattened masks ``[..., gh * gw]`` (numpy or torch), like flipping the image."""
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if masks.shape[-1] != gh * gw:
        raise ValueError(f"masks have {masks.shape[-1]} patches, grid {gh}x{gw} needs {gh * gw}")
    shape = tuple(masks.shape)
    grid = masks.reshape(*shape[:-1], gh, gw)
    if type(masks).__module__.startswith("torch"):
        return grid.flip(-1).reshape(shape)
    return np.ascontiguousarray(grid[..., ::-1]).reshape(shape)


def flip_boxes(boxes: np.ndarray, width: float | np.ndarray) -> np.ndarray:
    """Horizontally flip boxes ``[..., 4]`` in an image of the given width."""
    boxes = np.asarray(boxes, dtype=np.float64)
    width = np.asarray(width, dtype=np.float64)
    out = boxes.copy()
    out[..., 0], out[..., 2] = width - boxes[..., 2], width - boxes[..., 0]
    return out


# ---------------------------------------------------------------------------- storage
def mask_statistics(masks: np.ndarray, parts: Sequence[str] = PARTS) -> pd.DataFrame:
    """Per part: mean / std patches per mask, fraction of masks empty or full, and mean overlap
    (patches shared) with each other part, for masks ``[N, P, Npatch]``."""
    m = np.asarray(masks).astype(bool)
    counts = m.sum(axis=2)
    rows = {}
    for i, part in enumerate(parts):
        row = {
            "patches_mean": float(counts[:, i].mean()) if len(m) else np.nan,
            "patches_std": float(counts[:, i].std()) if len(m) else np.nan,
            "coverage": float(counts[:, i].mean() / m.shape[2]) if len(m) else np.nan,
            "empty_frac": float((counts[:, i] == 0).mean()) if len(m) else np.nan,
            "full_frac": float((counts[:, i] == m.shape[2]).mean()) if len(m) else np.nan,
        }
        for j, other in enumerate(parts):
            if j != i:
                row[f"overlap_{other}"] = float((m[:, i] & m[:, j]).sum(axis=1).mean()) if len(m) else np.nan
        rows[part] = row
    return pd.DataFrame.from_dict(rows, orient="index")


class MissingMasksError(KeyError):
    """Samples with no part mask in a mask file."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MaskStore(Mapping):
    """Part masks ``[N, 3, Npatch]`` (uint8) keyed by ``dataset/relpath``, with their voting metadata.

    A read-only mapping ``key -> [3, Npatch]`` (so a data loader can take it as is)."""

    def __init__(self, keys: Sequence[str], masks: np.ndarray, meta: dict | None = None, path: str | os.PathLike | None = None):
        masks = np.asarray(masks)
        keys = [str(k) for k in keys]
        if masks.ndim != 3 or masks.shape[0] != len(keys):
            raise ValueError(f"masks must be [N, parts, Npatch] with N = {len(keys)} keys, got {masks.shape}")
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate keys in a mask store")
        self.keys = keys
        self.masks = masks.astype(np.uint8, copy=False)
        self.meta = dict(meta or {})
        self.path = None if path is None else Path(path)
        self._index = {k: i for i, k in enumerate(keys)}

    @classmethod
    def from_table(cls, table: pd.DataFrame, img_size: tuple[int, int] = (256, 128), patch: int | tuple[int, int] = 16,
                   grid: tuple[int, int] | None = None, rule: str = "center", min_coverage: float = 0.5,
                   columns: str = "calibrated", parts: Sequence[str] = PARTS, source: str | None = None,
                   box_img_size: tuple[float, float] | None = None) -> "MaskStore":
        """Vote a (calibrated) table into a store, recording how in the metadata (and, under ``box_problems``,
        the counts of :func:`box_problems`: statuses, replaced rows by rule, boxes fixed while voting)."""
        keys, masks = vote_table(table, img_size, patch, grid, rule, min_coverage, columns, parts, box_img_size)
        meta = {
            "format": FORMAT, "grid": list(grid_shape(img_size, patch, grid)), "img_size": [int(v) for v in img_size],
            "patch": patch if np.isscalar(patch) else list(patch), "rule": rule, "min_coverage": float(min_coverage),
            "columns": columns, "parts": list(parts), "source": source or "",
            "box_problems": box_problems(table, columns, img_size, box_img_size),
        }
        if box_img_size is not None:
            meta["box_img_size"] = [float(v) for v in box_img_size]
        return cls(keys, masks, meta)

    @property
    def grid(self) -> tuple[int, int] | None:
        g = self.meta.get("grid")
        return None if g is None else (int(g[0]), int(g[1]))

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "the mask store (not saved)"

    def get(self, key: str) -> np.ndarray:
        """The mask matrix ``[3, Npatch]`` of one sample."""
        try:
            return self.masks[self._index[key]]
        except KeyError:
            raise MissingMasksError(f"no part mask for {key!r} in {self._where()} ({len(self)} keys)") from None

    def __getitem__(self, key: str) -> np.ndarray:
        return self.get(key)

    def __iter__(self):
        return iter(self.keys)

    def require(self, keys: Iterable[str]) -> None:
        """Raise :class:`MissingMasksError` (how many, which, the file) if any of ``keys`` has no mask."""
        keys = list(keys)
        missing = [k for k in keys if k not in self._index]
        if missing:
            raise MissingMasksError(
                f"{len(missing)} of {len(keys)} samples have no part mask in {self._where()}, e.g. {missing[:5]}; "
                "label and vote these images (muva ground / calibrate / vote) or use a mask file built from them"
            )

    def stack(self, keys: Sequence[str]) -> np.ndarray:
        """Masks ``[len(keys), 3, Npatch]`` in the order of ``keys`` (after :meth:`require`)."""
        self.require(keys)
        return self.masks[[self._index[k] for k in keys]]

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as safetensors (tensor ``masks``; keys and settings in the metadata)."""
        from safetensors.numpy import save_file

        path = Path(path)
        meta = {"format": FORMAT, **self.meta}
        metadata = {"keys": json.dumps(self.keys), "meta": json.dumps(meta)}
        with atomic_path(path) as tmp:
            save_file({"masks": np.ascontiguousarray(self.masks)}, str(tmp), metadata=metadata)
        self.path = path
        return path


def load_masks(path: str | os.PathLike) -> MaskStore:
    """Load a :class:`MaskStore` written by :meth:`MaskStore.save`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such part-mask file (build it with `muva vote`)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            masks = f.get_tensor("masks")
        keys = json.loads(metadata["keys"])
        meta = json.loads(metadata.get("meta", "{}"))
    except Exception as err:  # noqa: BLE001 - name the file whatever went wrong
        raise ValueError(f"{path}: not a part-mask file ({type(err).__name__}: {err})") from err
    return MaskStore(keys, masks, meta, path)


__all__ = [
    "CALIBRATED_COLUMNS",
    "box_problems",
    "RAW_COLUMNS",
    "MaskStore",
    "MissingMasksError",
    "flip_boxes",
    "flip_masks",
    "grid_shape",
    "load_masks",
    "table_keys",
    "vote_boxes",
    "vote_patch_masks",
    "vote_table",
]


def truth_patch_masks(truth: pd.DataFrame, keys: Sequence[str], img_size=(256, 128), patch: int = 16,
                      rule: str = "center") -> np.ndarray:
    """Ground-truth part boxes (a ``load_truth`` table) voted into patch masks ``[len(keys), 3, Npatch]``
    in the order of ``keys`` (the same voting as the pseudo labels, so the IoUs compare like with like)."""
    rows = truth[truth["part"].isin(PARTS) & truth["key"].isin(set(keys))]
    found, masks = vote_table(rows, img_size=img_size, patch=patch, rule=rule, columns="raw")
    index = {k: i for i, k in enumerate(found)}
    missing = [k for k in keys if k not in index]
    if missing:
        raise KeyError(f"{len(missing)} images have no ground-truth boxes, e.g. {missing[:3]}")
    return masks[[index[k] for k in keys]]
