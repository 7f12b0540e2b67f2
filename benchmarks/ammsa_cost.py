"""Cost of the MUVA image encoder (AM-MSA) against the plain CLIP ViT of the same size.

Times, in one process and interleaved (A, B, A, B, ... so drift hits both alike):
  * inference: one forward of a batch (no grad, eval mode);
  * training step: forward, loss, backward, Adam step (MUVA's loss includes a BCE over all
    layers' mask logits, like L_mask; the patch projection is frozen in both).
The baseline is open_clip's own ``clip.visual`` forward (CLS feature, flash/efficient SDPA).
Prints medians (and the ratios of the minima, steadier on a shared machine), the median
ratios and PASS/FAIL against the targets (<= 1.25x inference, <= 1.5x training step). Random weights (speed does not depend on them).

    python benchmarks/ammsa_cost.py                                   # CPU, small config, batch 16
    python benchmarks/ammsa_cost.py --config vit-b-16 --batch 64 --device cuda --dtype bf16
    python benchmarks/ammsa_cost.py ... --compile --reference-rmp
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from muva_core.model import BackboneConfig, MUVAConfig, MUVAEncoder, ResidualMaskPredictor, build_clip

TARGET_INFER = 1.25
TARGET_TRAIN = 1.5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _ReferenceRMP(ResidualMaskPredictor):
    """The straightforward RMP (projects all patch keys/values), for comparison only."""

    def cross_attention(self, queries, keys):  # type: ignore[override]
        return self.cross_attention_reference(queries, keys)


def _use_reference_rmp(enc: MUVAEncoder) -> None:
    for m in enc.rmp or []:
        m.__class__ = _ReferenceRMP


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _peak_memory(fn: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small", choices=["tiny", "small", "vit-b-16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rmp-heads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--reference-rmp", action="store_true",
                    help="also time MUVA with the straightforward RMP cross-attention")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clip, _ = build_clip(BackboneConfig(name=args.config, pretrained=None))
    base_visual = clip.visual
    del clip
    H, W = base_visual.image_size
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, H, W, device=device)

    def make_muva(reference: bool) -> MUVAEncoder:
        enc = MUVAEncoder(copy.deepcopy(base_visual), MUVAConfig(rmp_heads=args.rmp_heads))
        if reference:
            _use_reference_rmp(enc)
        return enc.to(device)

    models: dict[str, torch.nn.Module] = {"plain ViT": copy.deepcopy(base_visual).to(device), "MUVA": make_muva(False)}
    if args.reference_rmp:
        models["MUVA (reference RMP)"] = make_muva(True)
    n_patches = models["MUVA"].n_patches
    targets = (torch.rand(args.batch, 3, n_patches, device=device) > 0.6).float()

    runners: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
    for name, model in models.items():
        fwd = torch.compile(model) if args.compile else model
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-6)
        is_muva = isinstance(model, MUVAEncoder)

        def infer(fwd=fwd, model=model):
            model.eval()
            with torch.inference_mode(), _autocast(device, args.dtype):
                fwd(images)

        def train(fwd=fwd, model=model, opt=opt, is_muva=is_muva):
            model.train()
            opt.zero_grad(set_to_none=True)
            with _autocast(device, args.dtype):
                out = fwd(images)
                if is_muva:
                    loss = out.bn_features.float().pow(2).mean()
                    logits = torch.stack(out.mask_logits).float()
                    loss = loss + F.binary_cross_entropy_with_logits(
                        logits, targets.unsqueeze(0).expand_as(logits))
                else:
                    loss = out.float().pow(2).mean()
            loss.backward()
            opt.step()

        runners[name] = (infer, train)

    results: dict[str, dict[str, float]] = {name: {} for name in runners}
    for phase, idx in (("infer", 0), ("train", 1)):
        for _ in range(args.warmup):
            for name, r in runners.items():
                r[idx]()
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.iters):
            for name, r in runners.items():
                times[name].append(_timed(r[idx], device))
        for name in runners:
            results[name][phase] = statistics.median(times[name])
            results[name][phase + "_min"] = min(times[name])
            mem = _peak_memory(runners[name][idx], device)
            if mem is not None:
                results[name][phase + "_mem"] = mem

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"config={args.config} batch={args.batch} device={dev_name} dtype={args.dtype} "
          f"compile={args.compile} rmp_heads={args.rmp_heads} iters={args.iters} (median) warmup={args.warmup}")
    print(f"{'model':<24}{'infer ms':>10}{'train ms':>10}{'infer x':>9}{'train x':>9}"
          f"{'min: infer x':>14}{'train x':>9}")
    base = results["plain ViT"]
    ok = True
    for name, r in results.items():
        ri, rt = r["infer"] / base["infer"], r["train"] / base["train"]
        mi, mt = r["infer_min"] / base["infer_min"], r["train_min"] / base["train_min"]
        mem = f"  peak GB infer {r['infer_mem']:.2f} train {r['train_mem']:.2f}" if "infer_mem" in r else ""
        print(f"{name:<24}{r['infer']:>10.2f}{r['train']:>10.2f}{ri:>9.2f}{rt:>9.2f}{mi:>14.2f}{mt:>9.2f}{mem}")
    ri = results["MUVA"]["infer"] / base["infer"]
    rt = results["MUVA"]["train"] / base["train"]
    for label, ratio, target in (("inference", ri, TARGET_INFER), ("train step", rt, TARGET_TRAIN)):
        verdict = "PASS" if ratio <= target else "FAIL"
        ok &= ratio <= target
        print(f"MUVA/plain {label}: {ratio:.2f}x (target <= {target}x) {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
