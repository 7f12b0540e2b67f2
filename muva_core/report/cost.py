"""A Table 13-style cost table measured on the machine it runs on.

For MUVA and MUVA without AM-MSA (global token only): parameters (trained / used at inference),
latency per batch for inference, a stage-1 step and a stage-2 step, and peak memory of each
(CUDA: ``max_memory_allocated``; CPU: the peak growth of the process's resident memory, sampled),
in the run's precision (muva_core/precision.py). ``muva doctor`` times the same steps at the run's batch.
"""
from __future__ import annotations

import copy
import statistics
import threading
import time
from contextlib import contextmanager
from typing import Callable

import pandas as pd
import torch

from ..config import RunConfig
from ..model.factory import build_muva, part_indices
from ..train.losses import cmp_loss, normalize_per_granularity
from ..train.stage2 import build_loss, build_optimizer


@contextmanager
def peak_memory(device: torch.device, out: dict):
    """Peak memory (GB) of the block: CUDA allocator peak, or sampled RSS growth on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        out["GB"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        return
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        out["GB"] = max(peak[0] - base, 0) / 2**30


def median_ms(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def training_steps(cfg: RunConfig, device: torch.device, batch_size: int, num_classes: int,
                   stage1_ids: int | None = None) -> dict:
    """One inference batch, one stage-1 step and one stage-2 step of ``cfg``'s model on random inputs, as
    closures (``infer``, ``step1`` (None for the vision-only model), ``step2``), in the run's precision
    (:func:`~muva_core.precision.precision_plan`: autocast and, for float16, the GradScaler), with the
    parameter counts (``params_infer_M``, ``params_train_M``). ``stage1_ids``: identities a stage-1 step
    encodes (default ``batch_size``)."""
    from ..precision import make_scaler, precision_plan, scaler_step

    plan = precision_plan(device, cfg)
    built = build_muva(cfg, num_classes)
    model = built.model.to(device)
    enc = model.encoder
    H, W = cfg.data.height, cfg.data.width
    images = torch.randn(batch_size, 3, H, W, device=device)
    pids = torch.arange(batch_size, device=device) % num_classes
    G = 1 + enc.n_parts
    out = {
        "params_infer_M": sum(p.numel() for p in enc.parameters()) / 1e6,
        "params_train_M": (sum(p.numel() for p in model.parameters() if p.requires_grad)
                           + (sum(p.numel() for p in built.prompts.learnable_parameters()) if built.prompts else 0)) / 1e6,
        "precision": plan.note,
    }

    def autocast():
        return torch.autocast(device.type, dtype=plan.dtype, enabled=plan.autocast)

    def infer():
        with torch.no_grad(), autocast():
            enc.eval()(images)

    out["infer"], out["step1"] = infer, None
    if built.prompts is not None:
        prompts = built.prompts.to(device).train()
        ids = torch.arange(stage1_ids or batch_size, device=device) % num_classes
        centroids = normalize_per_granularity(torch.randn(num_classes, enc.feat_dim, device=device), G)
        opt1 = torch.optim.Adam(prompts.learnable_parameters(), lr=1e-4)
        scaler1 = make_scaler(device, plan)

        def step1():
            with autocast():
                text = prompts(ids)
            loss = cmp_loss(normalize_per_granularity(text.float(), G), centroids, ids)
            opt1.zero_grad()
            scaler_step(loss, opt1, scaler1)

        out["step1"] = step1

    criterion = build_loss(cfg, model)
    optimizer, _ = build_optimizer(model, cfg)
    scaler2 = make_scaler(device, plan)
    memory = normalize_per_granularity(torch.randn(num_classes, enc.feat_dim, device=device), G)
    model.text_prototypes.copy_(memory)
    targets = (torch.rand(batch_size, 3, enc.n_patches, device=device) > 0.5).float()
    idx = part_indices(model.parts)

    def step2():
        model.train()
        with autocast():
            res, logits = model(images)
        terms = criterion(pids, id_logits=logits.float(), features=normalize_per_granularity(res.features.float(), G),
                          bn_features=res.bn_features.float(), memory=memory,
                          text_prototypes=model.text_prototypes if criterion.enabled["i2tce"] else None,
                          mask_logits=[m.float() for m in res.mask_logits] if criterion.enabled["mask"] else None,
                          mask_targets=targets[:, idx] if criterion.enabled["mask"] else None)
        optimizer.zero_grad()
        scaler_step(terms["total"], optimizer, scaler2)

    out["step2"] = step2
    return out


def measure_variant(cfg: RunConfig, device: torch.device, batch_size: int, num_classes: int, repeats: int,
                    warmup: int = 1) -> dict:
    steps = training_steps(cfg, device, batch_size, num_classes)
    row = {k: steps[k] for k in ("params_infer_M", "params_train_M")}
    for name, fn, key in (("infer", steps["infer"], "infer"), ("s1", steps["step1"], "s1"), ("s2", steps["step2"], "s2")):
        if fn is None:
            continue
        mem: dict = {}
        with peak_memory(device, mem):
            row[f"latency_{key}_ms"] = median_ms(fn, device, repeats, warmup)
        row[f"memory_{key}_GB"] = mem["GB"]
    return row


def cost_table(cfg: RunConfig, batch_size: int | None = None, num_classes: int = 64, repeats: int | None = None,
               device: str | None = None) -> pd.DataFrame:
    """Rows "MUVA (w/o AM-MSA)" (global token only) and "MUVA" (``cfg``'s model) measured here. Defaults: batch
    16, 3 repeats after a warm-up; on a CPU with the ViT-B/16 backbone batch 4, one repeat, no warm-up (each
    step there takes minutes)."""
    from ..eval.features import resolve_device

    dev = resolve_device(device or cfg.device)
    slow = dev.type == "cpu" and cfg.model.backbone == "vit-b-16"
    batch_size = batch_size or (4 if slow else 16)
    repeats = repeats or (1 if slow else 3)
    plain = copy.deepcopy(cfg)
    plain.model.granularity = "G"
    rows = {
        "MUVA (w/o AM-MSA)": measure_variant(plain, dev, batch_size, num_classes, repeats, warmup=0 if slow else 1),
        "MUVA": measure_variant(cfg, dev, batch_size, num_classes, repeats, warmup=0 if slow else 1),
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.attrs.update({"device": str(dev), "batch_size": batch_size, "backbone": cfg.model.backbone})
    return table
