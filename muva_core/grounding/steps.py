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
from .labelling import label_dataset
from .voting import MaskStore, load_masks

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
        if g.calib_windows not in ("stripes", "data"):
            raise ValueError(f"calib_windows: expected 'stripes' or 'data', got {g.calib_windows!r}")
        windows = "data" if g.calib_windows == "data" else DEFAULT_WINDOWS
        table, report = calibrate_boxes(boxes, method=g.calib_method, windows=windows)
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
