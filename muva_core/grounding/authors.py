"""The authors' released part masks (RikoLi/MUVA ``blobs/*.pkl``) into the project's mask store.

The authors publish the pseudo labels they trained with: one pickle per dataset (and one for the
multi-source MA+D+MS+C3 set), a dict from image file name (basename) to a ``[R, L]`` array, read in
their ``engine/datasets/dataset.py`` (``ImageDatasetGroundingMask``) as ``mask_dict[basename(img_path)]``.
What the values mean follows from how that code uses them: the array is added to the attention logits
(``convert_to_attn_mask``: 0 lets a local token see a patch, ``-inf`` blocks it) and the mask loss reads
its target as ``mask.bool().logical_not()``. So a patch belongs to part ``r`` where the value is 0
(``convention="reference"``, the default); ``convention="binary"`` reads files whose nonzero values
mark the part instead.

Reading a pickle can run code. :func:`read_authors_pickle` uses a restricted unpickler that knows only
dicts, lists, tuples, strings, numbers and numpy arrays of booleans, integers and floats: every other
global the file names (a ``__reduce__`` payload's function, a class, an object array) is refused with
its name, before anything is called, so nothing in the file is executed.

:func:`import_authors_masks` maps each basename to the project's mask keys (``dataset/relpath``, from
the dataset parsers), checks every array's shape against the patch grid and part count, normalises the
values to uint8 0/1 (1 = the patch belongs to the part) and returns a :class:`MaskStore` with an
:class:`ImportReport`: basenames that collide (several images share one; each gets the mask, as the
authors' loader gives it), basenames that match no image, and training images that have no mask.
"""
from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.samples import PARTS
from ..io import file_digest
from .voting import FORMAT, MaskStore, grid_shape, mask_statistics

__all__ = ["CONVENTIONS", "UnsafePickleError", "ImportReport", "read_authors_pickle", "import_authors_masks",
           "AUTHORS_SOURCE"]

CONVENTIONS = ("reference", "binary")
"""How a file's values mark a part: ``reference`` (0 = in the part, as the authors' code reads it) | ``binary``."""

AUTHORS_SOURCE = "authors"
"""``meta["source"]`` of a mask store made by :func:`import_authors_masks`."""

_NUMERIC_KINDS = "biuf"
_SHOWN = 5


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle that asks for something other than dicts, strings, numbers and numpy arrays; nothing was run."""


def _refuse(path: str, what: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"{path}: refused to load: the file asks for {what}, which is not a dict, list, string, number or numeric "
        "numpy array. Nothing in it was executed (a pickle can run code on load, so only the authors' mask "
        "format is read: a dict from image file name to a numpy array)")


def _numpy_internals():
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    return multiarray, numeric


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the handful of globals a pickled numpy array needs, each wrapped to check its arguments."""

    _NDARRAY = object()   # stands for numpy.ndarray: the class itself is never handed to the pickle

    def __init__(self, file, path: str) -> None:
        super().__init__(file)
        self.path = path
        multiarray, numeric = _numpy_internals()
        ndarray = self._NDARRAY

        def numeric_dtype(obj, align=False, copy=False):
            if not isinstance(obj, str):
                raise _refuse(path, f"a numpy dtype built from a {type(obj).__name__}")
            dtype = np.dtype(obj)
            if dtype.kind not in _NUMERIC_KINDS:
                raise _refuse(path, f"a numpy array of dtype {dtype} (kind {dtype.kind!r})")
            return dtype

        def check(dtype) -> np.dtype:
            if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS:
                raise _refuse(path, f"a numpy array of dtype {dtype!r}")
            return dtype

        def reconstruct(subtype, shape, dtype_code):
            if subtype is not ndarray:
                raise _refuse(path, f"an array of type {subtype!r}")
            return multiarray._reconstruct(np.ndarray, shape, dtype_code)

        def scalar(dtype, data=None):
            return multiarray.scalar(check(dtype), data) if data is not None else multiarray.scalar(check(dtype))

        def frombuffer(buffer, dtype, shape, order):
            return numeric._frombuffer(buffer, check(dtype), shape, order)

        def latin1(text, encoding="latin1"):
            if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
                raise _refuse(path, "_codecs.encode with other arguments than (text, 'latin1')")
            return text.encode("latin1")

        allowed = {"_reconstruct": reconstruct, "ndarray": ndarray, "dtype": numeric_dtype, "scalar": scalar,
                   "_frombuffer": frombuffer}
        self._globals = {("_codecs", "encode"): latin1, ("collections", "OrderedDict"): OrderedDict}
        for module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                       "numpy._core.numeric"):
            for name, fn in allowed.items():
                self._globals[(module, name)] = fn

    def find_class(self, module: str, name: str):
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise _refuse(self.path, f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise _refuse(self.path, f"a persistent object {pid!r}")


def read_authors_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The authors' mask pickle as ``{basename: array}``, read with the restricted unpickler.

    Raises :class:`UnsafePickleError` (naming the global) for anything but dicts, strings, numbers and
    numeric numpy arrays, ``ValueError`` naming the file for a top level that is not such a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the authors' masks: one .pkl per dataset, see "
                                "docs/reproducing-the-paper.md)")
    with open(path, "rb") as fh:
        try:
            data = _RestrictedUnpickler(fh, str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as err:  # a truncated or foreign file: name it
            raise ValueError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict from image file name to a [R, L] array, got a {type(data).__name__}")
    out: dict[str, np.ndarray] = {}
    bad: list[str] = []
    for key, value in data.items():
        if isinstance(key, bytes):
            key = key.decode("utf-8", errors="replace")
        if not isinstance(key, str):
            bad.append(f"key {key!r} is a {type(key).__name__}, not a file name")
            continue
        if isinstance(value, (list, tuple)):
            try:
                value = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                bad.append(f"{key!r}: a list that is not numbers")
                continue
        if not isinstance(value, np.ndarray):
            bad.append(f"{key!r}: a {type(value).__name__}, not an array")
            continue
        out[key] = value
    if bad:
        raise ValueError(f"{path}: {len(bad)} entries are not file name -> array: " + "; ".join(bad[:_SHOWN])
                         + (f" (+{len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""))
    return out


def _to_part_masks(arrays: Sequence[np.ndarray], convention: str) -> np.ndarray:
    stacked = np.stack([np.asarray(a) for a in arrays]) if arrays else np.zeros((0, len(PARTS), 0))
    values = stacked.astype(np.float64, copy=False)
    if np.isnan(values).any():
        raise ValueError("NaN")
    return (values == 0) if convention == "reference" else (values != 0)


@dataclass
class ImportReport:
    """What :func:`import_authors_masks` found; ``str()`` is the summary ``muva import-masks`` prints."""

    file: str
    datasets: list[str]
    entries: int
    keys_written: int
    convention: str
    grid: tuple[int, int]
    values: list[float] = field(default_factory=list)
    """The distinct values in the file (up to 10), e.g. ``[-inf, 0.0]``."""
    collisions: dict[str, list[str]] = field(default_factory=dict)
    """basename -> every image key it names (more than one)."""
    unmatched: list[str] = field(default_factory=list)
    """basenames in the file that match no image of the datasets."""
    train: dict[str, dict] = field(default_factory=dict)
    """dataset -> {"images", "with_mask", "without_mask", "examples"} over its training split."""
    coverage: dict[str, float] = field(default_factory=dict)
    """part -> mean fraction of the patches the imported masks give it."""
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["grid"] = list(self.grid)
        out["collisions_count"] = len(self.collisions)
        out["unmatched_count"] = len(self.unmatched)
        out["collisions"] = dict(list(self.collisions.items())[:50])
        out["unmatched"] = self.unmatched[:50]
        return out

    def __str__(self) -> str:
        lines = [f"{self.file}: {self.entries} masks ([{len(PARTS)}, {self.grid[0] * self.grid[1]}] each, grid "
                 f"{self.grid[0]}x{self.grid[1]}, values {self.values}, read as convention '{self.convention}'); "
                 f"{self.keys_written} images of {', '.join(self.datasets)} got a mask"]
        for name, t in self.train.items():
            line = f"  {name} train: {t['with_mask']} of {t['images']} images have a mask"
            if t["without_mask"]:
                line += f", {t['without_mask']} have none (e.g. {', '.join(t['examples'])})"
            lines.append(line)
        if self.unmatched:
            lines.append(f"  {len(self.unmatched)} file names in the file match no image (e.g. "
                         f"{', '.join(self.unmatched[:_SHOWN])})")
        if self.collisions:
            first = next(iter(self.collisions.items()))
            lines.append(f"  {len(self.collisions)} file names name several images; each of them got the mask, as the "
                         f"authors' loader (which keys by file name) gives it: e.g. {first[0]} -> {', '.join(first[1])}")
        lines.append("  part coverage (mean share of the patches): "
                     + ", ".join(f"{p} {v:.2f}" for p, v in self.coverage.items()))
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def import_authors_masks(path: str | os.PathLike, datasets: Sequence, img_size: tuple[int, int] = (256, 128),
                         patch: int = 16, convention: str = "reference") -> tuple[MaskStore, ImportReport]:
    """The authors' mask pickle ``path`` as a :class:`MaskStore` over the images of ``datasets`` (parsed
    :class:`~muva_core.data.datasets.ReIDDataset` objects), and what the import found.

    Every array must be ``[3, gh * gw]`` for the patch grid of ``img_size`` / ``patch`` (the reference's
    ``[R, L]``); a file with other shapes is refused, naming the entries. A basename is matched against
    every split of every dataset; an image key gets the mask of its basename.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    if not datasets:
        raise ValueError("import_authors_masks needs at least one dataset (--dataset NAME)")
    path = Path(path)
    grid = grid_shape(tuple(img_size), patch)
    expected = (len(PARTS), grid[0] * grid[1])
    raw = read_authors_pickle(path)
    wrong = [f"{k} {tuple(v.shape)}" for k, v in raw.items() if tuple(v.shape) != expected]
    if wrong:
        raise ValueError(
            f"{path}: {len(wrong)} of {len(raw)} masks are not [R, L] = {list(expected)} ({len(PARTS)} parts x the "
            f"{grid[0]}x{grid[1]} patch grid of {img_size[0]}x{img_size[1]} input with {patch}-pixel patches): "
            + ", ".join(wrong[:_SHOWN]) + (f" (+{len(wrong) - _SHOWN} more)" if len(wrong) > _SHOWN else "")
            + "; import with the height / width / patch_size the file was made for")
    names = list(raw)
    try:
        parts = _to_part_masks([raw[n] for n in names], convention)
    except ValueError:
        bad = [n for n in names if np.isnan(np.asarray(raw[n], dtype=np.float64)).any()]
        raise ValueError(f"{path}: {len(bad)} masks hold NaN values, e.g. {', '.join(bad[:_SHOWN])}") from None
    values = np.unique(np.concatenate([np.unique(np.asarray(raw[n], dtype=np.float64)) for n in names])) \
        if names else np.zeros(0)

    index: dict[str, list[str]] = {}
    train_keys: dict[str, list[tuple[str, str]]] = {}
    for ds in datasets:
        for split in ("train", "query", "gallery"):
            for s in getattr(ds, split):
                index.setdefault(os.path.basename(s.path), []).append(s.key)
        train_keys[ds.name] = [(s.key, os.path.basename(s.path)) for s in ds.train]
    keys: list[str] = []
    rows: list[int] = []
    unmatched: list[str] = []
    collisions: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        found = index.get(name)
        if not found:
            unmatched.append(name)
            continue
        if len(found) > 1:
            collisions[name] = list(found)
        keys += found
        rows += [i] * len(found)
    order = np.argsort(keys, kind="stable")
    keys = [keys[j] for j in order]
    masks = parts[np.asarray(rows, dtype=np.int64)[order]].astype(np.uint8) if rows \
        else np.zeros((0, *expected), np.uint8)

    report = ImportReport(file=str(path), datasets=[d.name for d in datasets], entries=len(raw),
                          keys_written=len(keys), convention=convention, grid=grid,
                          values=[float(v) for v in values[:10]], collisions=collisions, unmatched=unmatched)
    have = set(raw)
    for name, pairs in train_keys.items():
        missing = [key for key, base in pairs if base not in have]
        report.train[name] = {"images": len(pairs), "with_mask": len(pairs) - len(missing),
                              "without_mask": len(missing), "examples": missing[:3]}
    if len(masks):
        stats = mask_statistics(masks)
        report.coverage = {p: float(stats.loc[p, "coverage"]) for p in PARTS}
        if sum(report.coverage.values()) > 1.5:
            report.warnings.append(
                f"the three parts cover {sum(report.coverage.values()):.2f} of the image together: the file may mark "
                f"each part with {'nonzero values (try --convention binary)' if convention == 'reference' else 'zeros (try --convention reference)'}")
    if convention == "reference" and len(values) and set(values.tolist()) <= {0.0, 1.0}:
        report.warnings.append("the values are 0 and 1 only: read as the authors' code reads them (0 = the patch is in "
                               "the part); pass --convention binary if 1 marks the part")
    if names and not keys:
        example = next((os.path.basename(s.path) for d in datasets for s in d.train), "-")
        report.warnings.append(f"no file name in the file matches an image (the file has e.g. {names[0]}, the "
                               f"datasets e.g. {example}): is it the file of another dataset or layout?")
    meta = {"format": FORMAT, "grid": list(grid), "img_size": [int(v) for v in img_size], "patch": int(patch),
            "parts": list(PARTS), "source": AUTHORS_SOURCE, "authors_file": str(path.resolve()),
            "authors_sha1": file_digest(path, "sha1"), "convention": convention, "datasets": report.datasets,
            "rule": "imported", "import": {k: v for k, v in report.as_dict().items()
                                           if k in ("entries", "keys_written", "collisions_count", "unmatched_count",
                                                    "train", "values", "coverage")}}
    return MaskStore(keys, masks, meta), report



def import_masks_file(path: str | os.PathLike, dataset_names: Sequence[str], root: str | os.PathLike,
                      out: str | os.PathLike, img_size: tuple[int, int] = (256, 128), patch: int = 16,
                      convention: str = "reference") -> ImportReport:
    """``muva import-masks``: parse each dataset under ``root``, import the authors' file, write the store to
    ``out`` (atomically; the file name goes in ``masks_file``). Nothing is written when a check fails."""
    from ..data.datasets import load_dataset

    names = list(dict.fromkeys(dataset_names))
    datasets = [load_dataset(name, root) for name in names]
    store, report = import_authors_masks(path, datasets, img_size=img_size, patch=patch, convention=convention)
    if not len(store):
        raise ValueError(f"{path}: no mask matches an image of {', '.join(names)} under {root}: nothing written\n"
                         + str(report))
    store.save(out)
    return report
