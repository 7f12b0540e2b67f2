"""The training of one opened run, resumable: masks -> stage 1 -> stage 2 -> evaluation.

:func:`muva_core.runs.open_run` starts the run (checks, lock, claim); :func:`prepare_training` builds the masks and
the model into a :class:`RunContext`; :func:`stage1`, :func:`stage2` and :func:`finish_run` train and evaluate it
(:func:`muva_core.runs.train_protocol` calls them in order; notebooks 04-05 one by one).
Layout of a run folder (``RunConfig.run_dir`` or ``reports/<protocol>/run-<config hash>``; names in
:class:`muva_core.paths.RunFiles`)::

    config.yaml                    the resolved configuration
    checkpoints/stage1-last.safetensors, stage1.safetensors
    checkpoints/stage2-last.safetensors
    model.safetensors              the final model (encoder, classifier, text prototypes)
    history_stage1.csv, history_stage2.csv
    metrics/train.json             evaluation on the target domain (+ mask IoU vs ground truth)

Every step writes atomically; ``train.resume`` continues from the last finished epoch, and a
resumed CPU run ends with the same metrics as an uninterrupted one. A folder made with other settings
is refused (:func:`muva_core.runs.claim_run_folder`); ``resume=false`` starts it afresh. The folder is
locked while the run works (:mod:`muva_core.locks`): a second process never trains it at the same time.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ..config import RunConfig
from ..eval.metrics import evaluate_features
from ..eval.features import extract_features, resolve_device, sample_arrays
from ..eval.masks import mask_iou
from ..grounding.voting import truth_patch_masks
from ..io import atomic_path
from ..locks import check_held, shared_data
from ..model.checkpoints import start_record
from ..model.factory import BuiltModel, MUVAReID, build_muva, part_indices
from ..paths import RunFiles
from ..precision import precision_plan
from ..progress import epoch_line, report
from .checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from .distributed import DistInfo, barrier
from .memory import PrototypeMemory, all_gather_variable
from .stage1 import (build_stage1_optimizer, grad_scaler, stage1_centroids, text_prototypes, train_stage1,
                     visual_centroids)
from .stage2 import build_optimizer, train_stage2


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    history_stage1: pd.DataFrame
    history_stage2: pd.DataFrame
    mask_iou_truth: dict = field(default_factory=dict)
    seconds: float = 0.0


def _write_history(path: Path, previous: pd.DataFrame | None, new_row: dict) -> pd.DataFrame:
    frame = pd.concat([previous, pd.DataFrame([new_row])], ignore_index=True) if previous is not None else pd.DataFrame([new_row])
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def _read_history(path: Path, upto_epoch: int) -> pd.DataFrame | None:
    if not path.is_file() or upto_epoch <= 0:
        return None
    frame = pd.read_csv(path)
    return frame[frame["epoch"] <= upto_epoch]


def epoch_seconds(folder: str | Path) -> float | None:
    """The training time of a run folder: the ``seconds`` of every epoch of both stages' histories, summed (so a
    run resumed across processes counts each segment, where ``metrics/train.json``'s ``seconds`` is the last
    process's); None when the folder has no history with that column."""
    files, total, found = RunFiles(Path(folder)), 0.0, False
    for stage in (1, 2):
        path = files.history(stage)
        if path.is_file():
            frame = pd.read_csv(path)
            if "seconds" in frame.columns:
                total, found = total + float(frame["seconds"].sum()), True
    return total if found else None


def training_device(cfg: RunConfig, info: DistInfo) -> torch.device:
    """The device a (torchrun) process trains on: its local GPU under torchrun, else ``cfg.device``."""
    if info.enabled and torch.cuda.is_available() and cfg.device in ("auto", "cuda"):
        return torch.device(f"cuda:{info.local_rank}")
    return resolve_device(cfg.device)


def _id_domains(data) -> torch.Tensor:
    """Source-dataset index of every training identity (domain-specific prompts)."""
    out = torch.zeros(data.num_classes, dtype=torch.long)
    for i, info in enumerate(data.sources.values()):
        out[info.pid_offset: info.pid_offset + info.num_pids] = i
    return out


def _saved_scaler(path: Path, scaler):
    """``scaler`` when the checkpoint at ``path`` holds a loss-scaler state to restore into it, else None."""
    return scaler if scaler is not None and "scaler" in read_checkpoint_info(path)["sections"] else None


def _report_scaler(path: Path, scaler, restored, echo: bool) -> None:
    """Say whether a resumed float16 run continues from the saved loss scale or starts afresh (a checkpoint written
    without one: another precision, or an older version)."""
    if scaler is None:
        return
    if restored is not None:
        report(f"loss scale {scaler.get_scale():g} restored from {path.name}", echo=echo)
    else:
        report(f"{path.name} holds no loss-scaler state: the float16 loss scale starts afresh at "
               f"{scaler.get_scale():g}", echo=echo)


def _sharded_centroids(model: MUVAReID, train, masks, cfg, device, info: DistInfo, progress: bool) -> torch.Tensor:
    """VPM-1 (:func:`~muva_core.train.stage1.stage1_centroids` of the raw pre-BN features); under torchrun
    each rank encodes its share of the images and the features are gathered."""
    if not info.enabled:
        return visual_centroids(model.encoder, train, masks, model.classifier.out_features, cfg, device, progress)
    mode = "pseudo" if model.encoder.n_parts else None
    share = train[info.rank::info.world_size]
    feats = extract_features(model.encoder, share, cfg, device, masks=masks if mode else None, mask_mode=mode,
                             which="pre", normalize=False, progress=progress and info.main, desc="VPM-1 features")
    labels = torch.tensor([s.pid for s in share], device=device)
    feats, labels = all_gather_variable(feats.to(device)), all_gather_variable(labels)
    return stage1_centroids(feats, labels, model.classifier.out_features, cfg)


def run_stage1(cfg: RunConfig, built: BuiltModel, train, masks, device, info: DistInfo, folder: Path,
               progress: bool = True) -> pd.DataFrame:
    """Stage 1 with resume; leaves the text prototypes (TPM, the raw text features of every identity) in
    ``built.model.text_prototypes``."""
    model, prompts = built.model, built.prompts
    files = RunFiles(folder)
    final, last = files.checkpoint("stage1"), files.checkpoint("stage1-last")
    hist_path = files.history(1)
    flat = cfg.to_flat()
    prompts.to(device)
    if cfg.train.resume and final.is_file():
        load_checkpoint(final, prompts=prompts, restore_rng=False)
        history = _read_history(hist_path, cfg.train.stage1_epochs)
        report(f"stage 1 finished earlier: prompts loaded from {final}", echo=progress and info.main)
    else:
        optimizer = scheduler = None
        start = 0
        scaler = grad_scaler(device, cfg)
        if cfg.train.resume and last.is_file():
            optimizer, scheduler = build_stage1_optimizer(prompts, cfg)
            saved = _saved_scaler(last, scaler)
            start = load_checkpoint(last, prompts=prompts, optimizer=optimizer, scheduler=scheduler,
                                    scaler=saved)["epoch"]
            report(f"resuming stage 1 from epoch {start} ({last})", echo=progress and info.main)
            _report_scaler(last, scaler, saved, progress and info.main)
        centroids = _sharded_centroids(model, train, masks, cfg, device, info, progress)
        previous = [_read_history(hist_path, start)]

        def on_epoch_end(epoch, row, opt, sched):
            if info.main:
                check_held(folder)  # stop before writing if another process took the run over
            previous[0] = _write_history(hist_path, previous[0], row) if info.main else previous[0]
            if info.main:
                report(epoch_line("stage 1", epoch, cfg.train.stage1_epochs, row), echo=False)
                save_checkpoint(last, prompts=prompts, optimizer=opt, scheduler=sched, scaler=scaler, epoch=epoch,
                                config=flat, extra={"stage": 1})

        train_stage1(prompts, centroids, cfg, device, logit_scale=float(model.clip_logit_scale), start_epoch=start,
                     optimizer=optimizer, scheduler=scheduler, on_epoch_end=on_epoch_end, progress=progress and info.main,
                     labels=torch.tensor([s.pid for s in train]), scaler=scaler)
        if info.main:
            save_checkpoint(final, prompts=prompts, epoch=cfg.train.stage1_epochs, config=flat, extra={"stage": 1},
                            rng=False)
        history = previous[0]
    model.text_prototypes.copy_(text_prototypes(prompts, device))  # raw: stage2_losses normalises per the recipe
    return history if history is not None else pd.DataFrame()


def run_stage2(cfg: RunConfig, built: BuiltModel, train, masks, device, info: DistInfo, folder: Path,
               progress: bool = True, evaluate: Callable | None = None) -> pd.DataFrame:
    model = built.model
    files = RunFiles(folder)
    ckpt, hist_path = files.checkpoint("stage2-last"), files.history(2)
    t = cfg.train
    memory = PrototypeMemory(model.classifier.out_features, model.encoder.feat_dim, momentum=t.memory_momentum,
                             temperature=t.imp_temperature).to(device)
    optimizer, scheduler = build_optimizer(model, cfg)
    scaler = grad_scaler(device, cfg)
    start = 0
    if t.resume and ckpt.is_file():
        saved = _saved_scaler(ckpt, scaler)
        start = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, memory=memory,
                                scaler=saved)["epoch"]
        if start >= t.stage2_epochs:
            report(f"stage 2 finished earlier ({start} epochs): model loaded from {ckpt}", echo=progress and info.main)
        else:
            report(f"resuming stage 2 from epoch {start} ({ckpt})", echo=progress and info.main)
            _report_scaler(ckpt, scaler, saved, progress and info.main)
    ddp = None
    if info.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    rng = np.random.default_rng(cfg.seed)
    monitor = [train[i] for i in sorted(rng.choice(len(train), size=min(64, len(train)), replace=False))]
    previous = [_read_history(hist_path, start)]
    flat = cfg.to_flat()

    def on_epoch_end(epoch, row, opt, sched):
        if info.main:
            check_held(folder)  # stop before writing if another process took the run over
            report(epoch_line("stage 2", epoch, t.stage2_epochs, row), echo=progress)
            previous[0] = _write_history(hist_path, previous[0], row)
            save_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, memory=memory, scaler=scaler,
                            epoch=epoch, config=flat, extra={"stage": 2})

    train_stage2(model, memory, train, masks, cfg, device, optimizer=optimizer, scheduler=scheduler,
                 start_epoch=start, ddp_model=ddp, rank=info.rank, world_size=info.world_size, monitor=monitor,
                 on_epoch_end=on_epoch_end, evaluate=evaluate, progress=progress, scaler=scaler)
    return previous[0] if previous[0] is not None else pd.DataFrame()


def evaluate_split(cfg: RunConfig, model: MUVAReID, query, gallery, dataset, device,
                   progress: bool = True, desc: str = "test features") -> tuple[dict, dict]:
    """Re-ID metrics of ``query`` against ``gallery``, and predicted-mask IoU against the ground-truth boxes of
    ``dataset`` when it has them (synthetic domains)."""
    samples = list(query) + list(gallery)
    feats, probs = extract_features(model.encoder, samples, cfg, device, return_masks=True, progress=progress, desc=desc)
    nq = len(query)
    qp, qc = sample_arrays(query)
    gp, gc = sample_arrays(gallery)
    metrics = evaluate_features(feats[:nq], feats[nq:], qp, gp, qc, gc, metric=cfg.eval.metric,
                                max_rank=cfg.eval.max_rank, chunk_size=cfg.eval.eval_chunk_size,
                                rerank=cfg.eval.rerank, k1=cfg.eval.k1, k2=cfg.eval.k2,
                                lambda_value=cfg.eval.lambda_value)
    iou = {}
    truth = true_part_masks(cfg, model, samples, dataset) if probs is not None else None
    if truth is not None:
        values = mask_iou(probs, truth, cfg.model.mask_threshold)
        iou = {p: float(v) for p, v in zip(model.parts, values)}
    return metrics.as_dict(), iou


def true_part_masks(cfg: RunConfig, model: MUVAReID, samples, dataset) -> torch.Tensor | None:
    """The ground-truth part boxes of ``samples`` (from ``dataset``, synthetic domains) as patch masks
    ``[N, P, Npatch]`` of ``model``'s parts, what its predicted masks are scored against; None without boxes."""
    from ..grounding.simulated import dataset_truth

    truth = dataset_truth(dataset) if dataset is not None else None
    if truth is None:
        return None
    masks = truth_patch_masks(truth, [s.key for s in samples], (cfg.data.height, cfg.data.width),
                              cfg.grounding.patch_size)
    return torch.as_tensor(masks)[:, part_indices(model.parts)]


def evaluate_model(cfg: RunConfig, model: MUVAReID, data, device, progress: bool = True) -> tuple[dict, dict]:
    """Re-ID metrics on the target's query/gallery, and predicted-mask IoU against ground-truth boxes
    when the target has them (synthetic domains)."""
    return evaluate_split(cfg, model, data.query, data.gallery, data.datasets.get(data.protocol.target), device,
                          progress)


def heldout_sources(data) -> dict[str, object]:
    """The source datasets with a query/gallery split of their own (identities never trained on): the held-out
    split a run's settings are chosen on."""
    out = {}
    for name in data.protocol.sources:
        ds = data.datasets.get(name)
        if ds is not None and len(getattr(ds, "query", ())) and len(getattr(ds, "gallery", ())):
            out[name] = ds
    return out


def evaluate_heldout(cfg: RunConfig, model: MUVAReID, data, device, progress: bool = True) -> dict[str, dict]:
    """``{source: {"metrics": ..., "mask_iou_truth": ...}}`` on each source's own held-out query/gallery."""
    out = {}
    for name, ds in heldout_sources(data).items():
        metrics, iou = evaluate_split(cfg, model, ds.query, ds.gallery, ds, device, progress,
                                      desc=f"held-out {name} features")
        out[name] = {"metrics": metrics, "mask_iou_truth": iou}
    return out


def diagnostics(cfg: RunConfig, data, device) -> Callable[[MUVAReID], dict]:
    """The ``evaluate`` hook of :func:`~muva_core.train.stage2.train_stage2` (``eval_every``): target mAP / Rank-1 /
    mask IoU and each source's held-out mAP / Rank-1 as history columns. A diagnostic: nothing is chosen on the
    target; the held-out columns are what a schedule is chosen on."""
    def evaluate(model: MUVAReID) -> dict:
        metrics, iou = evaluate_model(cfg, model, data, device, progress=False)
        row = {"target_mAP": metrics["mAP"], "target_rank1": metrics["Rank-1"],
               **{f"target_mask_iou_{p}": v for p, v in iou.items()}}
        held = evaluate_heldout(cfg, model, data, device, progress=False)
        for name, res in held.items():
            suffix = "" if len(held) == 1 else f"_{name}"
            row[f"heldout_mAP{suffix}"] = res["metrics"]["mAP"]
            row[f"heldout_rank1{suffix}"] = res["metrics"]["Rank-1"]
        return row

    return evaluate


@dataclass
class RunContext:
    """Everything the steps of one run share (built once by :func:`prepare_training` on an opened run)."""

    run: object            # the muva_core.runs.Run that open_run returned
    masks: object
    built: BuiltModel
    device: torch.device
    info: DistInfo

    @property
    def cfg(self) -> RunConfig:
        return self.run.cfg

    @property
    def data(self):
        return self.run.data

    @property
    def folder(self) -> Path:
        return self.run.folder

    @property
    def started(self) -> float:
        return self.run.started

    def locked(self):
        """The run folder's lock for one step (rank 0; re-entrant, so a no-op while the run holds it)."""
        return self.run.locked()


def prepare_training(run, info: DistInfo, device: torch.device, progress: bool = True) -> RunContext:
    """The part masks (labelled / calibrated / voted when not cached) and the model of an opened, claimed run
    (:func:`muva_core.runs.open_run`, which holds the folder's lock while this works)."""
    from ..data.protocols import source_datasets
    from ..grounding.steps import prepare_masks, run_masks

    cfg, data = run.cfg, run.data
    if info.main:
        report(f"precision: {precision_plan(device, cfg).note}", echo=progress)
        if not cfg.grounding.masks_file:
            with shared_data(cfg):
                prepare_masks(cfg, source_datasets(data), progress=progress)
    barrier(info)
    masks = run_masks(cfg, source_datasets(data))
    masks.require([s.key for s in data.train])
    built = build_muva(cfg, data.num_classes, _id_domains(data))
    built.model.to(device)
    return RunContext(run, masks, built, device, info)


def stage1(ctx: RunContext, progress: bool = True) -> pd.DataFrame:
    """Stage 1 (skipped for vision-only models): returns its history."""
    if ctx.built.prompts is None:
        return pd.DataFrame()
    with ctx.locked():
        return run_stage1(ctx.cfg, ctx.built, ctx.data.train, ctx.masks, ctx.device, ctx.info, ctx.folder, progress)


def stage2(ctx: RunContext, progress: bool = True) -> pd.DataFrame:
    with ctx.locked():
        return run_stage2(ctx.cfg, ctx.built, ctx.data.train, ctx.masks, ctx.device, ctx.info, ctx.folder, progress,
                          evaluate=diagnostics(ctx.cfg, ctx.data, ctx.device) if ctx.cfg.train.eval_every else None)


def finish_run(ctx: RunContext, progress: bool = True) -> tuple[dict, dict]:
    """Save the final model, evaluate on the target, record ``metrics/train.json`` (rank 0; with the host and
    process that trained it)."""
    metrics, iou = {}, {}
    if ctx.info.main:
        cfg = ctx.cfg
        with ctx.locked():
            check_held(ctx.folder)
            save_checkpoint(ctx.run.model, model=ctx.built.model, epoch=cfg.train.stage2_epochs,
                            config=cfg.to_flat(), extra={"stage": "final", "num_classes": ctx.data.num_classes},
                            rng=False)
            metrics, iou = evaluate_model(cfg, ctx.built.model, ctx.data, ctx.device, progress)
            heldout = evaluate_heldout(cfg, ctx.built.model, ctx.data, ctx.device, progress)
            ctx.run.record("train", {"protocol": ctx.data.protocol.name, "metrics": metrics, "mask_iou_truth": iou,
                                  "heldout_source": heldout, "precision": precision_plan(ctx.device, cfg).note,
                                  "seconds": round(time.perf_counter() - ctx.started, 2),
                                  "num_classes": ctx.data.num_classes, "train_images": len(ctx.data.train),
                                  "start_checkpoint": start_record(cfg),
                                  "trained_by": {"host": socket.gethostname(), "pid": os.getpid()}})
    barrier(ctx.info)
    return metrics, iou


def load_trained(cfg: RunConfig, path: str | Path, num_classes: int, device="cpu") -> MUVAReID:
    """A trained :class:`MUVAReID` from ``model.safetensors`` (or a stage-2 checkpoint)."""
    built = build_muva(cfg, num_classes)
    load_checkpoint(path, model=built.model, restore_rng=False)
    return built.model.to(device).eval()
