"""The grounding steps of a run: label -> calibrate -> vote, cached per dataset.

Outputs live under ``<cache_dir>/<dataset>/`` and are named by a short hash of the settings
that produced them, so runs of the same dataset share them and a changed setting never reads
a stale file:

    boxes-<backend>-<h>.parquet        raw expert answers (one row per image and part)
    calibrated-<h>.parquet             + cal_x0..cal_y1, replaced, rule
    calibration-<h>.json               the CalibrationReport (thresholds, replacement counts)
    masks-<h>.safetensors              patch masks [N, 3, Npatch] keyed by dataset/relpath

With ``masks_file`` set (the authors' masks, imported by ``muva import-masks``) none of these steps runs:
:func:`run_masks` reads that file instead.

The same three steps on files the user names (``muva ground`` / ``calibrate`` / ``vote``, or a notebook):
:func:`ground_file`, :func:`calibrate_file` and :func:`vote_file`; each returns what it did, printable.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..config import RunConfig
from ..paths import resolve
from ..data.samples import Sample
from ..io import write_json, write_parquet
from .base import GroundingBackend, get_backend
from .boxes import count_fixes, describe_fixes, sanitize_box_array
from .calibration import DEFAULT_WINDOWS, CalibrationReport, calibrate_boxes
from .labelling import label_dataset, label_dataset_distributed, summarize_labels
from .voting import MaskStore, load_masks, mask_statistics

log = logging.getLogger(__name__)


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def build_backend(cfg: RunConfig, dataset=None) -> GroundingBackend:
    """The grounding expert named by ``cfg.grounding.backend``. The simulated expert (``synthetic``) answers from
    the synthetic set's true part boxes, or, for another ``dataset`` (one declared in a file), from the
    ``part_boxes.parquet`` under its root; a dataset with neither is refused, naming it."""
    g = cfg.grounding
    if g.backend == "synthetic":
        truth = resolve(cfg.data.synth_root)
        if dataset is not None and not dataset.name.startswith("synth_"):
            from ..config import ConfigError
            from .simulated import TRUTH_FILE, dataset_truth

            truth = dataset_truth(dataset)
            if truth is None:
                raise ConfigError(f"backend=synthetic: the simulated grounding expert answers from true part boxes, "
                                  f"and dataset {dataset.name} has none ({Path(dataset.dataset_dir) / TRUTH_FILE} "
                                  "does not exist); label it with a real expert, e.g. -p backend=florence2")
        return get_backend("synthetic", truth=truth, seed=cfg.data.synth_seed)
    kwargs = {}
    if g.ground_model:
        kwargs["model_id"] = g.ground_model
    if g.backend == "cogvlm":
        kwargs["trust_remote_code"] = g.trust_remote_code
    if cfg.device != "auto":
        kwargs["device"] = cfg.device
    return get_backend(g.backend, **kwargs)


@dataclass
class GroundingPaths:
    boxes: Path
    calibrated: Path
    report: Path
    masks: Path


def data_identity(cfg: RunConfig, dataset: str) -> dict:
    """Which copy of ``dataset`` a cache entry belongs to: its root folder (and, for the synthetic set, its
    scale), so two synthetic sets (or two copies of Market-1501) never share pseudo labels."""
    from ..data.declared import declared_identity

    if dataset.startswith("synth_"):
        return {"root": str(resolve(cfg.data.synth_root).resolve()), "scale": cfg.data.synth_scale}
    return declared_identity(dataset) or {"root": str(resolve(cfg.data.data_root).resolve())}


def grounding_paths(cfg: RunConfig, dataset: str) -> GroundingPaths:
    """The cache files of each grounding step; each name carries a digest of every setting (and the data
    copy) it depends on."""
    g = cfg.grounding
    label_key = {"backend": g.backend, "model": g.ground_model, "splits": g.ground_splits,
                 "seed": cfg.data.synth_seed if g.backend == "synthetic" else None,
                 "data": data_identity(cfg, dataset)}
    h_label = _digest(label_key)
    calib_key = {**label_key, "calibrate": g.calibrate, "method": g.calib_method, "windows": g.calib_windows}
    h_cal = _digest(calib_key)
    vote_key = {**calib_key, "rule": g.vote_rule, "cov": g.vote_min_coverage, "patch": g.patch_size,
                "size": (cfg.data.height, cfg.data.width)}
    h_vote = _digest(vote_key)
    folder = resolve(g.cache_dir) / dataset
    return GroundingPaths(
        boxes=folder / f"boxes-{g.backend}-{h_label}.parquet",
        calibrated=folder / f"calibrated-{h_cal}.parquet",
        report=folder / f"calibration-{h_cal}.json",
        masks=folder / f"masks-{h_vote}.safetensors",
    )


def select_splits(dataset, splits: str) -> list[Sample]:
    out: list[Sample] = []
    for name in [s.strip() for s in splits.split(",") if s.strip()]:
        if name not in ("train", "query", "gallery"):
            raise ValueError(f"ground_splits: unknown split {name!r} (use train, query, gallery)")
        out.extend(getattr(dataset, name))
    return out


def run_grounding(cfg: RunConfig, dataset, backend: GroundingBackend | None = None, progress: bool = True) -> pd.DataFrame:
    """Label ``dataset``'s configured splits (resumable; returns the cached table when complete)."""
    paths = grounding_paths(cfg, dataset.name)
    samples = select_splits(dataset, cfg.grounding.ground_splits)
    if paths.boxes.is_file():
        return pd.read_parquet(paths.boxes)
    backend = backend or build_backend(cfg, dataset)
    return label_dataset(samples, backend, paths.boxes, batch_size=cfg.grounding.ground_batch_size or None,
                         progress=progress)


def calibration_windows(name: str, key: str = "windows") -> str | dict[str, tuple[float, float]]:
    """The ``windows`` argument of :func:`calibrate_boxes` for a configured name: ``"stripes"`` (the fixed
    stripe windows) or ``"data"`` (learnt from the table); any other name is an error naming ``key``."""
    if name not in ("stripes", "data"):
        raise ValueError(f"{key}: expected 'stripes' or 'data', got {name!r}")
    return "data" if name == "data" else DEFAULT_WINDOWS


def run_calibration(cfg: RunConfig, dataset_name: str, boxes: pd.DataFrame) -> tuple[pd.DataFrame, CalibrationReport | None]:
    """Calibrate the raw boxes (or, with ``calibrate: false``, keep them as they are) and cache the result.

    The report (printed by notebook 02) counts the replaced boxes by rule and, in ``report.fixed``, the
    boxes with bad coordinates by reason (inverted, clipped, NaN, ...); those rows' ``status`` says so.
    With ``calibrate: false`` there is no report, but the same bad coordinates are still swapped, clipped
    or dropped (as voting would) and flagged in ``status``, and a warning gives their counts.
    """
    g = cfg.grounding
    paths = grounding_paths(cfg, dataset_name)
    if g.calibrate:
        table, report = calibrate_boxes(boxes, method=g.calib_method,
                                        windows=calibration_windows(g.calib_windows, "calib_windows"))
        write_json(paths.report, report.to_dict())
        fixes = report.fixed_total()
        if fixes:
            log.warning("%s: boxes with bad coordinates: %s", dataset_name, describe_fixes(fixes))
    else:
        table, report = boxes.copy(), None
        raw = table[["x0", "y0", "x1", "y1"]].to_numpy(float)
        status = table["status"].astype(str).to_numpy() if "status" in table.columns else None
        w = table["img_w"].to_numpy(float) if "img_w" in table.columns else float("nan")
        h = table["img_h"].to_numpy(float) if "img_h" in table.columns else float("nan")
        clean, status, fixed = sanitize_box_array(raw, w, h, status)
        table["status"] = status
        for i, c in enumerate(("x0", "y0", "x1", "y1")):
            table[f"cal_{c}"] = clean[:, i]
        table["replaced"] = False
        table["rule"] = ""
        fixes = count_fixes(fixed)
        if fixes:
            log.warning("%s (calibrate: false): boxes with bad coordinates: %s", dataset_name, describe_fixes(fixes))
    write_parquet(paths.calibrated, table)
    return table, report


def run_voting(cfg: RunConfig, dataset_name: str, calibrated: pd.DataFrame) -> MaskStore:
    """Vote calibrated boxes into patch masks and save the mask file."""
    g = cfg.grounding
    paths = grounding_paths(cfg, dataset_name)
    store = MaskStore.from_table(calibrated, img_size=(cfg.data.height, cfg.data.width), patch=g.patch_size,
                                 rule=g.vote_rule, min_coverage=g.vote_min_coverage, source=paths.calibrated.name)
    store.save(paths.masks)
    return store


def prepare_masks(cfg: RunConfig, datasets: Sequence, progress: bool = True) -> dict[str, Path]:
    """Label, calibrate and vote every dataset (each step skipped when its cached output exists)."""
    out = {}
    for ds in datasets:
        paths = grounding_paths(cfg, ds.name)
        if not paths.masks.is_file():
            boxes = run_grounding(cfg, ds, progress=progress)
            if paths.calibrated.is_file():
                calibrated = pd.read_parquet(paths.calibrated)
            else:
                calibrated, _ = run_calibration(cfg, ds.name, boxes)
            run_voting(cfg, ds.name, calibrated)
        out[ds.name] = paths.masks
    return out


def imported_masks(cfg: RunConfig, train: Sequence[Sample] | None = None) -> MaskStore:
    """The mask store of ``masks_file`` (made by ``muva import-masks``), checked against the configuration's
    patch grid and, given ``train``, against every training image (all problems in one error)."""
    from .voting import grid_shape

    path = resolve(cfg.grounding.masks_file)
    where = f"masks_file={cfg.grounding.masks_file}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file ({path}); make it with `muva import-masks --authors FILE.pkl "
                                f"--dataset NAME --root DATA_ROOT --out {cfg.grounding.masks_file}`")
    try:
        store = load_masks(path)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    want = grid_shape((cfg.data.height, cfg.data.width), cfg.grounding.patch_size)
    if store.grid != want or store.masks.shape[1] != 3:
        raise ValueError(f"{where}: masks of grid {store.grid} with {store.masks.shape[1]} parts; this configuration "
                         f"({cfg.data.height}x{cfg.data.width}, patch_size {cfg.grounding.patch_size}) needs grid "
                         f"{want} with 3 parts: import the file again with these settings")
    if train is not None:
        missing = [s for s in train if s.key not in store]
        if missing:
            per: dict[str, int] = {}
            for s in missing:
                per[s.domain] = per.get(s.domain, 0) + 1
            counts = ", ".join(f"{d} {n} of {sum(1 for s in train if s.domain == d)}" for d, n in per.items())
            raise ValueError(f"{where}: {len(missing)} training images have no mask ({counts}), e.g. "
                             f"{', '.join(s.key for s in missing[:3])}; import the masks of these datasets "
                             "(muva import-masks --dataset NAME for each source) or run grounding instead "
                             "(leave masks_file empty)")
    return store


def skipped_note(cfg: RunConfig) -> str | None:
    """With ``masks_file`` set: the sentence notebooks 01-03 show (grounding, calibration and voting do not
    run); None otherwise."""
    if not cfg.grounding.masks_file:
        return None
    path = resolve(cfg.grounding.masks_file)
    origin = ""
    if path.is_file():
        meta = load_masks(path).meta
        if meta.get("authors_file"):
            origin = f", imported from {meta['authors_file']} by muva import-masks"
    return (f"masks_file is set ({cfg.grounding.masks_file}{origin}): the part masks come from that file, so "
            f"grounding ({cfg.grounding.backend}), calibration and voting do not run in this run")


def run_masks(cfg: RunConfig, datasets: Sequence) -> MaskStore:
    """The part masks a run trains with: ``masks_file`` when set, else the voted masks of every source dataset
    (made by :func:`prepare_masks`)."""
    if cfg.grounding.masks_file:
        return imported_masks(cfg)
    return load_protocol_masks({d.name: grounding_paths(cfg, d.name).masks for d in datasets})


def masks_by_dataset(cfg: RunConfig, datasets: Sequence, progress: bool = True) -> dict[str, MaskStore]:
    """Each source dataset's part masks (notebook 03): the voted masks (labelled, calibrated and voted first when
    not cached), or, with ``masks_file`` set, that file's masks of each dataset's images."""
    if not cfg.grounding.masks_file:
        return {name: load_masks(path) for name, path in prepare_masks(cfg, datasets, progress).items()}
    store = imported_masks(cfg)
    out = {}
    for ds in datasets:
        keys = [k for k in store.keys if k.startswith(f"{ds.name}/")]
        out[ds.name] = MaskStore(keys, store.stack(keys), store.meta, store.path)
    return out


def load_protocol_masks(paths: dict[str, Path]) -> MaskStore:
    """One store holding the masks of every source dataset (keys are unique across datasets)."""
    import numpy as np

    stores = [load_masks(p) for p in paths.values()]
    if len(stores) == 1:
        return stores[0]
    keys = [k for s in stores for k in s.keys]
    return MaskStore(keys, np.concatenate([s.masks for s in stores]), stores[0].meta)


# ---------------------------------------------------------------------------- the steps on named files


def _by_count(counts: dict[str, int]) -> str:
    """``"ok 40, missing 2"``: a status count, largest first."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


@dataclass
class LabelledFile:
    """What :func:`ground_file` did: ``summary`` is :func:`~muva_core.grounding.labelling.summarize_labels`
    of the table written to ``out``."""

    dataset: str
    backend: str
    out: Path
    summary: dict

    def __str__(self) -> str:
        s = self.summary
        lines = [f"{self.dataset}: {s['images']} images labelled by {self.backend} "
                 f"({s['seconds_per_image']:.3f} s/image); boxes by status: {_by_count(s['status'])}"]
        if s["unreadable_images"] or s["error_images"]:
            lines.append(f"  {s['unreadable_images']} unreadable images, {s['error_images']} images the backend "
                         f"failed on (rows with status unreadable / error; the reason is in the raw column of "
                         f"{self.out})")
        return "\n".join(lines)


def ground_file(cfg: RunConfig, dataset: str, root: str | Path | None, out: str | Path, splits: str = "train",
                shard: tuple[int, int] | None = None, batch_size: int | None = None, progress: bool = True,
                resume: bool = True) -> LabelledFile:
    """Label ``splits`` of ``dataset`` (a name under ``root``, or a dataset file) with ``cfg``'s grounding
    expert into the parquet ``out`` (``muva ground``): resumable; with ``shard=(i, n)`` only that shard
    (merge later with :func:`~muva_core.grounding.labelling.merge_shards`), else under torchrun / accelerate
    each rank its shard and rank 0 merges."""
    from ..data.declared import open_dataset

    ds = open_dataset(dataset, root)
    samples = select_splits(ds, splits)
    backend = build_backend(cfg, ds)
    common = dict(batch_size=batch_size or None, progress=progress, resume=resume)
    if shard:  # one shard by hand (several machines)
        table = label_dataset(samples, backend, out, shard=shard, **common)
    else:  # plain run, or under torchrun / accelerate: each rank its shard, rank 0 merges
        table = label_dataset_distributed(samples, backend, out, **common)
    return LabelledFile(ds.name, cfg.grounding.backend, Path(out), summarize_labels(table))


@dataclass
class CalibratedFile:
    """What :func:`calibrate_file` did: its report, the rows whose status calibration changed, the output."""

    report: CalibrationReport
    changed_status: int
    out: Path

    def __str__(self) -> str:
        lines = [str(self.report)]
        if self.changed_status:
            lines.append(f"{self.changed_status} rows got a status other than their input one (see the status "
                         f"column of {self.out})")
        lines.append(f"wrote {self.out}")
        return "\n".join(lines)


def calibrate_file(boxes: str | Path, out: str | Path, img_size: tuple[int, int] | None = None,
                   method: str = "robust_z", windows: str = "stripes",
                   report: str | Path | None = None) -> CalibratedFile:
    """Calibrate the labelling table ``boxes`` into the parquet ``out`` (``muva calibrate``), and write the
    report as JSON to ``report`` when given. ``img_size=(H, W)``: the labelled images' size, for a table
    without ``img_w``/``img_h`` columns; ``windows``: ``"stripes"`` or ``"data"``."""
    windows = calibration_windows(windows)
    table = pd.read_parquet(boxes)
    calibrated, calibration = calibrate_boxes(table, img_size=img_size, method=method, windows=windows)
    write_parquet(out, calibrated)
    if report:
        write_json(report, calibration.to_dict())
    changed = (calibrated["status"].astype(str) != table["status"].astype(str)).sum() \
        if "status" in table.columns else 0
    return CalibratedFile(calibration, int(changed), Path(out))


@dataclass
class VotedFile:
    """What :func:`vote_file` did: the saved store, which boxes it voted (``"calibrated"`` or ``"raw"``), and
    whether the boxes were taken to be in input pixels for want of image sizes (``sizes_assumed``)."""

    store: MaskStore
    columns: str
    out: Path
    input_size: tuple[int, int]
    sizes_assumed: bool

    def __str__(self) -> str:
        problems = self.store.meta["box_problems"]
        lines = [mask_statistics(self.store.masks).round(3).to_string(),
                 f"{problems['rows']} boxes; by status: {_by_count(problems['status']) or 'no status column'}"]
        if self.columns == "calibrated":
            rules = ", ".join(f"{k} {v}" for k, v in problems["rules"].items())
            lines.append(f"replaced by calibration: {problems['replaced']}" + (f" ({rules})" if rules else ""))
        lines.append(f"bad coordinates met while voting: {describe_fixes(problems['fixes'])}")
        if self.sizes_assumed:
            h, w = self.input_size
            lines.append(f"note: the table has no img_w/img_h columns: its boxes were taken to be in {h}x{w} "
                         "input pixels; pass --img-size HxW (the labelled images' size) if they are not")
        lines.append(f"wrote {len(self.store)} masks ({self.columns} boxes, grid {self.store.grid}) to {self.out}")
        return "\n".join(lines)


def vote_file(boxes: str | Path, out: str | Path, img_size: tuple[int, int] = (256, 128), patch: int = 16,
              rule: str = "center", min_coverage: float = 0.5, raw: bool = False,
              box_img_size: tuple[int, int] | None = None) -> VotedFile:
    """Vote the boxes of the table ``boxes`` into patch masks at the model input ``img_size=(H, W)`` and save
    them to ``out`` (``muva vote``): the calibrated boxes when the table has them and ``raw`` is False, else
    the raw ones. ``box_img_size=(H, W)``: the labelled images' size, for a table without ``img_w``/``img_h``."""
    table = pd.read_parquet(boxes)
    columns = "calibrated" if "cal_x0" in table.columns and not raw else "raw"
    store = MaskStore.from_table(table, img_size=img_size, patch=patch, rule=rule, min_coverage=min_coverage,
                                 columns=columns, source=str(boxes), box_img_size=box_img_size)
    store.save(out)
    sizes_assumed = box_img_size is None and not {"img_w", "img_h"} <= set(table.columns)
    return VotedFile(store, columns, Path(out), (int(img_size[0]), int(img_size[1])), sizes_assumed)
