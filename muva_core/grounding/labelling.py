"""The batch-labelling engine behind ``muva ground``: run a grounding backend over a dataset.

Writes one row per image and part (:data:`LABEL_COLUMNS`) to a parquet table. Built for runs of
100k images at seconds per image:

* resumable: progress goes to atomic chunk files in ``<out>.parts/``; a killed run, started
  again, labels only what no chunk holds yet (no row lost or duplicated), then writes the
  output atomically and removes the chunks;
* sharded: ``shard=(i, n)`` labels every n-th sample of the sorted list (offset i) into
  ``<out stem>.shard-i-of-n.parquet``; :func:`merge_shards` joins them;
  :func:`label_dataset_distributed` does both under torchrun / accelerate;
* robust: an unreadable image becomes rows with status ``unreadable``, a malformed answer a
  row with status ``parse_error``, a box with inverted corners or reaching outside the image is
  swapped / clipped with status ``inverted`` / ``clipped`` (whichever backend produced it), and (``on_error="record"``) an image on which the backend
  raises a row with status ``error``; only a backend failing on many images in a row stops
  the run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from ..data.samples import PARTS, Sample
from ..io import write_json, write_parquet
from .base import STATUS_MISSING, STATUS_PARSE_ERROR, GroundingBackend, PartBox
from .boxes import join_status, sanitize_box

log = logging.getLogger(__name__)

STATUS_UNREADABLE = "unreadable"  # the image file could not be read: no query was made
STATUS_ERROR = "error"            # the backend raised on this image (on_error="record")

LABEL_COLUMNS: tuple[str, ...] = (
    "relpath", "dataset", "key", "part", "x0", "y0", "x1", "y1",
    "score", "raw", "status", "backend", "seconds", "img_w", "img_h",
)
"""Columns of a labelling table, one row per image and part; boxes in the image's own pixels, NaN when missing."""

_FLOAT_COLUMNS = ("x0", "y0", "x1", "y1", "score", "seconds", "img_w", "img_h")


class LabellingError(RuntimeError):
    """A labelling run that cannot go on (inconsistent resume state, missing or overlapping shards)."""


# ---------------------------------------------------------------------------- tables
def empty_label_table() -> pd.DataFrame:
    """A labelling table with no rows and the right column types."""
    frame = pd.DataFrame({c: pd.Series(dtype=float if c in _FLOAT_COLUMNS else object) for c in LABEL_COLUMNS})
    return frame


def boxes_table(
    keys: Sequence[str],
    results: Sequence[Sequence[PartBox]],
    img_sizes: Sequence[tuple[float, float]],
    parts: Sequence[str] = PARTS,
    backend: str = "",
    seconds: float | Sequence[float] = math.nan,
) -> pd.DataFrame:
    """Turn backend answers into a labelling table.

    keys:      sample keys ``dataset/relpath``, one per image
    results:   the backend's answers, one list of :class:`PartBox` per image
    img_sizes: each image's ``(width, height)`` in pixels
    """
    if not (len(keys) == len(results) == len(img_sizes)):
        raise ValueError(f"got {len(keys)} keys, {len(results)} results and {len(img_sizes)} image sizes")
    secs = [float(seconds)] * len(keys) if np.isscalar(seconds) else [float(s) for s in seconds]
    rows: list[dict] = []
    for key, boxes, size, sec in zip(keys, results, img_sizes, secs):
        rows.extend(_image_rows(str(key), boxes, size, parts, backend, sec))
    return _frame(rows)


def _split_key(key: str) -> tuple[str, str]:
    dataset, sep, relpath = key.partition("/")
    return (dataset, relpath) if sep else ("", key)


def _image_rows(
    key: str, boxes: Sequence[PartBox] | None, size: tuple[float, float], parts: Sequence[str], backend: str, seconds: float
) -> list[dict]:
    """One row per part; a malformed answer never raises but becomes a ``parse_error`` row."""
    dataset, relpath = _split_key(key)
    base = {"relpath": relpath, "dataset": dataset, "key": key, "backend": backend, "seconds": seconds,
            "img_w": float(size[0]), "img_h": float(size[1])}
    by_part: dict[str, PartBox] = {}
    problem = ""
    try:
        boxes = list(boxes or [])
        named = [b for b in boxes if isinstance(b, PartBox) and b.part in parts]
        if len(named) == len(boxes) and len({b.part for b in named}) == len(named):
            by_part = {b.part: b for b in named}
        elif len(boxes) == len(parts) and all(isinstance(b, PartBox) for b in boxes):
            by_part = dict(zip(parts, boxes))  # positional, whatever the part names say
        else:
            problem = f"backend answer not one PartBox per part: {boxes!r}"[:500]
    except TypeError as err:
        problem = f"backend answer not a list of PartBox: {err}"
    size_known = all(math.isfinite(v) and v > 0 for v in (base["img_w"], base["img_h"]))
    rows = []
    for part in parts:
        row = dict(base, part=part, x0=math.nan, y0=math.nan, x1=math.nan, y1=math.nan, score=math.nan)
        pb = by_part.get(part)
        if pb is None:
            row.update(raw=problem or "backend returned no box for this part", status=STATUS_PARSE_ERROR if problem else STATUS_MISSING)
        else:
            row.update(raw=str(pb.raw), status=str(pb.status or "ok"))
            try:
                score = float(pb.score)
            except (TypeError, ValueError):
                score = math.nan
            row["score"] = score
            if pb.box is not None:
                try:
                    coords = [float(v) for v in pb.box]
                except (TypeError, ValueError):
                    coords = []
                if len(coords) != 4 or not all(math.isfinite(v) for v in coords):
                    row.update(status=STATUS_PARSE_ERROR, raw=f"{pb.raw} | bad box {pb.box!r}")
                elif size_known:
                    # whatever the backend did: inverted corners are swapped, a box outside the image is clipped,
                    # one with no area left is dropped, and the row's status says so (never a silent "ok")
                    clean, flags = sanitize_box(coords, row["img_w"], row["img_h"], min_size=0.0)
                    row["status"] = join_status(row["status"], flags)
                    if clean is not None:
                        row.update(x0=clean[0], y0=clean[1], x1=clean[2], y1=clean[3])
                else:
                    row.update(x0=coords[0], y0=coords[1], x1=coords[2], y1=coords[3])
            elif row["status"] == "ok":
                row["status"] = STATUS_MISSING
        rows.append(row)
    return rows


def _failed_rows(key: str, size: tuple[float, float], parts: Sequence[str], backend: str, status: str, message: str) -> list[dict]:
    dataset, relpath = _split_key(key)
    return [
        {"relpath": relpath, "dataset": dataset, "key": key, "part": part, "x0": math.nan, "y0": math.nan,
         "x1": math.nan, "y1": math.nan, "score": math.nan, "raw": message, "status": status, "backend": backend,
         "seconds": 0.0, "img_w": float(size[0]), "img_h": float(size[1])}
        for part in parts
    ]


def _frame(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return empty_label_table()
    frame = pd.DataFrame(rows, columns=list(LABEL_COLUMNS))
    for c in _FLOAT_COLUMNS:
        frame[c] = frame[c].astype(float)
    return frame


def _sort(frame: pd.DataFrame, parts: Sequence[str]) -> pd.DataFrame:
    order = {p: i for i, p in enumerate(parts)}
    frame = frame.assign(_p=frame["part"].map(order)).sort_values(["key", "_p"], kind="stable")
    return frame.drop(columns="_p").reset_index(drop=True)


def summarize_labels(table: pd.DataFrame) -> dict:
    """Counts for a labelling table: images, rows per status, per part and status, seconds per image."""
    images = table.drop_duplicates("key")
    return {
        "images": int(len(images)),
        "rows": int(len(table)),
        "status": {str(k): int(v) for k, v in table["status"].value_counts().items()},
        "status_per_part": {
            str(p): {str(k): int(v) for k, v in g["status"].value_counts().items()} for p, g in table.groupby("part")
        },
        "unreadable_images": int((images["status"] == STATUS_UNREADABLE).sum()),
        "error_images": int((images["status"] == STATUS_ERROR).sum()),
        "seconds_per_image": float(images["seconds"].mean()) if len(images) else math.nan,
    }


# ---------------------------------------------------------------------------- shards
def shard_path(out_path: str | os.PathLike, index: int, count: int) -> Path:
    """Output of shard ``index`` of ``count``: ``labels.parquet`` -> ``labels.shard-0-of-4.parquet``."""
    out = Path(out_path)
    stem = out.name[: -len(".parquet")] if out.name.endswith(".parquet") else out.name
    return out.with_name(f"{stem}.shard-{index}-of-{count}.parquet")


def select_shard(samples: Sequence, index: int, count: int, key=lambda s: s.key) -> list:
    """Shard ``index`` of ``count`` of the samples (or any items) sorted by ``key``: every ``count``-th one from
    ``index``."""
    _check_shard(index, count)
    ordered = sorted(samples, key=key)
    return ordered[index::count]


def _check_shard(index: int, count: int) -> None:
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"bad shard {index}/{count}: need 0 <= i < n")


def parse_shard(text: str) -> tuple[int, int]:
    """Parse the CLI's ``--shard i/n``."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"bad shard {text!r}: expected 'i/n', e.g. '0/4'") from None
    _check_shard(i, n)
    return i, n


def merge_shards(out_path: str | os.PathLike, count: int, parts: Sequence[str] = PARTS, remove: bool = False) -> pd.DataFrame:
    """Merge the ``count`` shard outputs of ``out_path`` into ``out_path`` (atomic) and return the table.

    Raises :class:`LabellingError` naming the missing shards, or the keys labelled by two shards.
    """
    paths = [shard_path(out_path, i, count) for i in range(count)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise LabellingError(f"cannot merge {out_path}: {len(missing)} of {count} shard outputs missing: {missing}")
    frames = [pd.read_parquet(p) for p in paths]
    merged = pd.concat(frames, ignore_index=True) if frames else empty_label_table()
    dup = merged.duplicated(["key", "part"], keep=False)
    if dup.any():
        keys = sorted(merged.loc[dup, "key"].unique())
        raise LabellingError(f"cannot merge {out_path}: {len(keys)} keys labelled by several shards, e.g. {keys[:5]}")
    merged = _sort(merged, parts)
    write_parquet(out_path, merged)
    if remove:
        for p in paths:
            p.unlink(missing_ok=True)
    return merged


def shard_from_env(environ: dict | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process from torchrun / accelerate / MPI / Slurm variables; ``(0, 1)`` if none."""
    env = os.environ if environ is None else environ
    for rank_var, size_var in (
        ("RANK", "WORLD_SIZE"),                                # torchrun, accelerate launch
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),      # accelerate's MPI variables
        ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ):
        if env.get(rank_var) is not None and env.get(size_var) is not None:
            rank, size = int(env[rank_var]), int(env[size_var])
            _check_shard(rank, size)
            return rank, size
    return 0, 1


# ---------------------------------------------------------------------------- engine
def _load_image(path: str) -> tuple[Image.Image | None, str]:
    try:
        with Image.open(path) as img:
            return img.convert("RGB"), ""
    except Exception as err:  # noqa: BLE001 - any unreadable file is recorded, not fatal
        return None, f"cannot read image {path}: {type(err).__name__}: {err}"


def _load_batch(batch: Sequence[Sample]) -> list[tuple[Image.Image | None, str]]:
    return [_load_image(s.path) for s in batch]


def _manifest(backend: GroundingBackend, keys: Sequence[str], parts: Sequence[str], shard: tuple[int, int] | None) -> dict:
    digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()
    return {"backend": getattr(backend, "name", type(backend).__name__), "parts": list(parts), "samples": len(keys),
            "keys_sha1": digest, "shard": list(shard) if shard else None}


def _read_parts(parts_dir: Path) -> list[pd.DataFrame]:
    frames = []
    for f in sorted(parts_dir.glob("chunk-*.parquet")):
        frames.append(pd.read_parquet(f))
    return frames


def label_dataset(
    samples: Iterable[Sample],
    backend: GroundingBackend,
    out_path: str | os.PathLike,
    shard: tuple[int, int] | None = None,
    batch_size: int | None = None,
    resume: bool = True,
    progress: bool = True,
    flush_every: int = 512,
    flush_seconds: float = 300.0,
    parts: Sequence[str] = PARTS,
    on_error: str = "record",
    max_consecutive_errors: int = 16,
    prefetch: bool = True,
) -> pd.DataFrame:
    """Label every sample's head, upper body and legs with ``backend``; write and return the table.

    samples:       the images (:class:`Sample`); sorted by key, duplicate keys are an error
    out_path:      output parquet; with ``shard=(i, n)`` the shard writes :func:`shard_path` instead
    batch_size:    images per backend call (default: the backend's ``batch_size``)
    resume:        continue from ``<target>.parts/`` chunks (and return a complete existing output as is);
                   ``False`` starts afresh
    flush_every:   images per chunk file; a chunk is also written after ``flush_seconds``
    on_error:      "record": a batch on which the backend raises is retried image by image and each
                   failing image is recorded with status ``error`` (the run stops once
                   ``max_consecutive_errors`` images fail in a row); "raise": the exception propagates
    prefetch:      read the next batch's images in a thread while the backend works
    """
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    samples = sorted(samples, key=lambda s: s.key)
    keys = [s.key for s in samples]
    dups = sorted({k for k, c in zip(*np.unique(keys, return_counts=True)) if c > 1}) if keys else []
    if dups:
        raise ValueError(f"{len(dups)} duplicate sample keys, e.g. {dups[:5]}")
    if shard is not None and shard[1] > 1:
        samples = select_shard(samples, *shard)
        keys = [s.key for s in samples]
        target = shard_path(out_path, *shard)
    else:
        shard = None
        target = Path(out_path)
    backend_name = getattr(backend, "name", type(backend).__name__)
    batch_size = int(batch_size or getattr(backend, "batch_size", 1) or 1)
    key_set = set(keys)

    if resume and target.is_file():
        existing = pd.read_parquet(target)
        if set(existing["key"]) == key_set and set(existing["part"]) >= set(parts):
            log.info("%s already holds all %d images; nothing to label", target, len(keys))
            shutil.rmtree(Path(f"{target}.parts"), ignore_errors=True)  # left by a crash after the final write
            return existing
        log.warning("%s exists but does not cover these %d samples; relabelling", target, len(keys))

    parts_dir = Path(f"{target}.parts")
    manifest = _manifest(backend, keys, parts, shard)
    done_frames: list[pd.DataFrame] = []
    if parts_dir.exists() and not resume:
        shutil.rmtree(parts_dir)
    if parts_dir.exists():
        mpath = parts_dir / "manifest.json"
        old = json.loads(mpath.read_text()) if mpath.is_file() else None
        if old is not None and old != manifest:
            raise LabellingError(
                f"{parts_dir} holds chunks of a different run (backend, parts, samples or shard differ: "
                f"{old} vs {manifest}); to start afresh, delete {parts_dir} or pass resume=False "
                "(muva ground --no-resume)"
            )
        for tmp in parts_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        done_frames = _read_parts(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    write_json(parts_dir / "manifest.json", manifest)

    done = pd.concat(done_frames, ignore_index=True) if done_frames else empty_label_table()
    if done.duplicated(["key", "part"]).any():
        raise LabellingError(f"{parts_dir}: chunks overlap (duplicate rows); to start afresh, delete {parts_dir} "
                             "or pass resume=False (muva ground --no-resume)")
    stray = set(done["key"]) - key_set
    if stray:
        raise LabellingError(f"{parts_dir}: chunks hold {len(stray)} keys not in this run, e.g. {sorted(stray)[:5]}")
    done_keys = set(done["key"])
    todo = [s for s in samples if s.key not in done_keys]
    if done_keys:
        log.info("resuming %s: %d of %d images already labelled", target, len(done_keys), len(keys))

    chunk_no = len(done_frames)
    buffer: list[dict] = []
    buffered_images = 0
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal buffer, buffered_images, chunk_no, last_flush
        if buffer:
            write_parquet(parts_dir / f"chunk-{chunk_no:06d}.parquet", _frame(buffer))
            chunk_no += 1
        buffer, buffered_images, last_flush = [], 0, time.monotonic()

    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    consecutive = 0
    counts = {STATUS_UNREADABLE: 0, STATUS_ERROR: 0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(keys), initial=len(done_keys), desc=f"ground {backend_name}", unit="img")
    pool = ThreadPoolExecutor(max_workers=1) if prefetch and len(batches) > 1 else None
    try:
        pending = pool.submit(_load_batch, batches[0]) if (pool and batches) else None
        for bi, batch in enumerate(batches):
            loaded = pending.result() if pending is not None else _load_batch(batch)
            pending = pool.submit(_load_batch, batches[bi + 1]) if (pool and bi + 1 < len(batches)) else None
            good = [(s, img) for s, (img, _) in zip(batch, loaded) if img is not None]
            for s, (img, msg) in zip(batch, loaded):
                if img is None:
                    counts[STATUS_UNREADABLE] += 1
                    buffer.extend(_failed_rows(s.key, (math.nan, math.nan), parts, backend_name, STATUS_UNREADABLE, msg))
            if good:
                rows, n_failed, consecutive = _ground_batch(
                    backend, good, parts, backend_name, on_error, consecutive, max_consecutive_errors
                )
                counts[STATUS_ERROR] += n_failed
                buffer.extend(rows)
            buffered_images += len(batch)
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(unreadable=counts[STATUS_UNREADABLE], errors=counts[STATUS_ERROR], refresh=False)
            if buffered_images >= flush_every or time.monotonic() - last_flush >= flush_seconds:
                flush()
        flush()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()

    frames = [f for f in _read_parts(parts_dir) if len(f)]
    table = pd.concat(frames, ignore_index=True) if frames else empty_label_table()
    missing = key_set - set(table["key"])
    if missing or table.duplicated(["key", "part"]).any():  # cannot happen unless the folder was tampered with
        raise LabellingError(f"{parts_dir}: chunks inconsistent ({len(missing)} keys missing or rows duplicated)")
    table = _sort(table, parts)
    write_parquet(target, table)
    shutil.rmtree(parts_dir, ignore_errors=True)
    summary = summarize_labels(table)
    log.info("labelled %s: %s", target, summary)
    if summary["unreadable_images"] or summary["error_images"]:
        log.warning("%s: %d unreadable images, %d images the backend failed on (see status/raw columns)",
                    target, summary["unreadable_images"], summary["error_images"])
    return table


def _ground_batch(
    backend: GroundingBackend,
    good: list[tuple[Sample, Image.Image]],
    parts: Sequence[str],
    backend_name: str,
    on_error: str,
    consecutive: int,
    max_consecutive: int,
) -> tuple[list[dict], int, int]:
    """Ground one batch; returns (rows, images failed, consecutive failures so far)."""
    keys = [s.key for s, _ in good]
    images = [img for _, img in good]
    sizes = [(img.width, img.height) for img in images]
    t0 = time.perf_counter()
    try:
        results = backend.ground(images, keys=keys, parts=tuple(parts))
        if len(results) != len(images):
            raise ValueError(f"backend {backend_name} returned {len(results)} answers for {len(images)} images")
    except Exception as err:
        if on_error == "raise":
            raise
        if len(good) > 1:  # find the image(s) it fails on: one at a time
            rows, failed = [], 0
            for item in good:
                r, f, consecutive = _ground_batch(backend, [item], parts, backend_name, on_error, consecutive, max_consecutive)
                rows.extend(r)
                failed += f
            return rows, failed, consecutive
        consecutive += 1
        if consecutive >= max_consecutive:
            raise LabellingError(
                f"backend {backend_name} failed on {consecutive} images in a row (last: {keys[0]}): {type(err).__name__}: {err}"
            ) from err
        msg = f"backend raised {type(err).__name__}: {err}"[:2000]
        log.warning("%s: %s", keys[0], msg)
        return _failed_rows(keys[0], sizes[0], parts, backend_name, STATUS_ERROR, msg), 1, consecutive
    per_image = (time.perf_counter() - t0) / len(images)
    rows: list[dict] = []
    for key, boxes, size in zip(keys, results, sizes):
        rows.extend(_image_rows(key, boxes, size, parts, backend_name, per_image))
    return rows, 0, 0


def label_dataset_distributed(
    samples: Iterable[Sample],
    backend: GroundingBackend,
    out_path: str | os.PathLike,
    shard: tuple[int, int] | None = None,
    timeout: float = 7 * 24 * 3600.0,
    poll_seconds: float = 10.0,
    **kwargs,
) -> pd.DataFrame:
    """Each rank labels its shard; rank 0 merges all shards into ``out_path`` once they exist.

    The rank and world size come from ``shard`` or :func:`shard_from_env`. With torch.distributed
    initialised the ranks meet at a barrier (mind the process group's timeout); otherwise rank 0
    waits for the shard files, polling every ``poll_seconds`` for at most ``timeout`` seconds.
    Rank 0 returns the merged table, the other ranks their shard.
    """
    rank, world = shard if shard is not None else shard_from_env()
    if world <= 1:
        return label_dataset(samples, backend, out_path, **kwargs)
    own = label_dataset(samples, backend, out_path, shard=(rank, world), **kwargs)
    dist = _initialised_dist()
    if dist is not None:
        dist.barrier()
    elif rank == 0:
        wait_for_shards(out_path, world, timeout=timeout, poll_seconds=poll_seconds)
    merged = merge_shards(out_path, world, parts=kwargs.get("parts", PARTS)) if rank == 0 else own
    if dist is not None:
        dist.barrier()  # every rank may read the merged output after this
    return merged


def wait_for_shards(out_path: str | os.PathLike, count: int, timeout: float, poll_seconds: float = 10.0) -> None:
    """Block until all ``count`` shard outputs exist; :class:`LabellingError` naming the missing ones after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [str(shard_path(out_path, i, count)) for i in range(count) if not shard_path(out_path, i, count).is_file()]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise LabellingError(f"timed out after {timeout:.0f} s waiting for {len(missing)} shard outputs: {missing}")
        time.sleep(poll_seconds)


def _initialised_dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


__all__ = [
    "LABEL_COLUMNS",
    "STATUS_ERROR",
    "STATUS_UNREADABLE",
    "LabellingError",
    "boxes_table",
    "empty_label_table",
    "label_dataset",
    "label_dataset_distributed",
    "merge_shards",
    "parse_shard",
    "select_shard",
    "shard_from_env",
    "shard_path",
    "summarize_labels",
    "wait_for_shards",
]
