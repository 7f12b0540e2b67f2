"""A Table 13-style cost table measured on the machine it runs on.

For MUVA and MUVA without AM-MSA (global token only): parameters (trained / used at inference),
latency per batch for inference, a stage-1 step and a stage-2 step, and peak memory of each
(CUDA: ``max_memory_allocated``; CPU: the peak growth of the process's resident memory, sampled).
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
from ..precision import autocast_settings
from ..train.losses import cmp_loss, normalize_per_granularity
from ..train.stage2 import build_loss, build_optimizer


@contextmanager
def _peak_memory(device: torch.device, out: dict):
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


def _median_ms(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 1) -> float:
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


def measure_variant(cfg: RunConfig, device: torch.device, batch_size: int, num_classes: int, repeats: int) -> dict:
    built = build_muva(cfg, num_classes)
    model = built.model.to(device)
    enc = model.encoder
    H, W = cfg.data.height, cfg.data.width
    images = torch.randn(batch_size, 3, H, W, device=device)
    pids = torch.arange(batch_size, device=device) % num_classes
    G = 1 + enc.n_parts
    row = {
        "params_infer_M": sum(p.numel() for p in enc.parameters()) / 1e6,
        "params_train_M": (sum(p.numel() for p in model.parameters() if p.requires_grad)
                           + (sum(p.numel() for p in built.prompts.learnable_parameters()) if built.prompts else 0)) / 1e6,
    }
    amp, amp_dtype = autocast_settings(device, cfg)

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            enc.eval()(images)

    mem: dict = {}
    with _peak_memory(device, mem):
        row["latency_infer_ms"] = _median_ms(infer, device, repeats)
    row["memory_infer_GB"] = mem["GB"]

    if built.prompts is not None:
        prompts = built.prompts.to(device).train()
        centroids = normalize_per_granularity(torch.randn(num_classes, enc.feat_dim, device=device), G)
        opt1 = torch.optim.Adam(prompts.learnable_parameters(), lr=1e-4)

        def step1():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                text = prompts(pids)
            loss = cmp_loss(normalize_per_granularity(text.float(), G), centroids, pids)
            opt1.zero_grad()
            loss.backward()
            opt1.step()

        mem = {}
        with _peak_memory(device, mem):
            row["latency_s1_ms"] = _median_ms(step1, device, repeats)
        row["memory_s1_GB"] = mem["GB"]

    criterion = build_loss(cfg, model)
    optimizer, _ = build_optimizer(model, cfg)
    memory = normalize_per_granularity(torch.randn(num_classes, enc.feat_dim, device=device), G)
    model.text_prototypes.copy_(memory)
    targets = (torch.rand(batch_size, 3, enc.n_patches, device=device) > 0.5).float()
    idx = part_indices(model.parts)

    def step2():
        model.train()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            out, logits = model(images)
        terms = criterion(pids, id_logits=logits.float(), features=normalize_per_granularity(out.features.float(), G),
                          bn_features=out.bn_features.float(), memory=memory,
                          text_prototypes=model.text_prototypes if criterion.enabled["i2tce"] else None,
                          mask_logits=[m.float() for m in out.mask_logits] if criterion.enabled["mask"] else None,
                          mask_targets=targets[:, idx] if criterion.enabled["mask"] else None)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()

    mem = {}
    with _peak_memory(device, mem):
        row["latency_s2_ms"] = _median_ms(step2, device, repeats)
    row["memory_s2_GB"] = mem["GB"]
    return row


def cost_table(cfg: RunConfig, batch_size: int = 16, num_classes: int = 64, repeats: int = 3,
               device: str | None = None) -> pd.DataFrame:
    """Rows "MUVA (w/o AM-MSA)" (global token only) and "MUVA" (``cfg``'s model) measured here."""
    from ..eval.features import resolve_device

    dev = resolve_device(device or cfg.device)
    plain = copy.deepcopy(cfg)
    plain.model.granularity = "G"
    rows = {
        "MUVA (w/o AM-MSA)": measure_variant(plain, dev, batch_size, num_classes, repeats),
        "MUVA": measure_variant(cfg, dev, batch_size, num_classes, repeats),
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.attrs.update({"device": str(dev), "batch_size": batch_size, "backbone": cfg.model.backbone})
    return table
