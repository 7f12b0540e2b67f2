"""Stage-2 training throughput: the bare model step against the training loop, float32 against bfloat16.

Measured in one process, on the configuration of a protocol (default: the demo's, configs/synth_A2B.yaml) and
its real training images:

  * bare step: forward, the stage-2 loss of one batch (``stage2_losses``), backward and the Adam step, on one
    batch of the loader held in memory: the model's own rate;
  * loop: ``train_stage2`` over ``--ids`` of the training identities for ``--epochs`` epochs: data loading,
    augmentation, the P x K sampler, the prototype-memory update, logging. Its rate is over the training steps of
    the epochs after the first (the first builds VPM-2 with a full pass, as every run's first epoch does);
  * the image preload (``data.cache_images``: decoded and resized once per stage-2 run, before the epochs);
  * the VPM-2 rebuild's share of an epoch, for ``memory_rebuild: full`` (a feature pass over the training images
    each epoch, the paper) and ``train_pass`` (from the features the training steps computed);
  * bfloat16 autocast against float32 for the bare step (on a CPU without native bfloat16 the bfloat16 step is
    emulated and slow; the run says which, and the configuration then trains in float32).

Prints the rates and the ratios, with PASS/FAIL against the targets: loop / bare >= 0.85, rebuild <= 10 % of an
epoch (train_pass).

    python benchmarks/train_throughput.py                      # the demo configuration, 2 epochs over 64 ids
    python benchmarks/train_throughput.py -p synth_scale=reid -p synth_root=data/synthetic-reid \
        -p backbone=mini -p height=192 -p width=96                # the Re-ID sized regime (issue 18)
    python benchmarks/train_throughput.py --protocol synth:C2D -p batch_size=64 --ids 96 --epochs 3
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from muva_core.config import parse_overrides, resolve_config
from muva_core.eval.features import resolve_device
from muva_core.grounding.steps import prepare_masks, run_masks
from muva_core.model.factory import build_muva, part_indices
from muva_core.checks import preflight
from muva_core.data.protocols import source_datasets
from muva_core.precision import cpu_capabilities
from muva_core.seeding import seed_everything
from muva_core.train.memory import PrototypeMemory
from muva_core.train.stage2 import build_optimizer, stage2_losses, train_loader, train_stage2

TARGET_LOOP = 0.85
TARGET_REBUILD = 0.10


def _subset(train, n_ids: int):
    ids = sorted({s.pid for s in train})[:n_ids]
    keep = set(ids)
    remap = {p: i for i, p in enumerate(ids)}
    import dataclasses

    return [dataclasses.replace(s, pid=remap[s.pid]) for s in train if s.pid in keep], len(ids)


def _model(cfg, num_classes, device):
    seed_everything(cfg.seed)
    built = build_muva(cfg, num_classes)
    model = built.model.to(device)
    g = 1 + model.encoder.n_parts
    model.text_prototypes = torch.nn.functional.normalize(torch.randn(num_classes, model.encoder.feat_dim), dim=1) * g
    memory = PrototypeMemory(num_classes, model.encoder.feat_dim).to(device)
    return model, memory


def bare_step_seconds(cfg, model, memory, batch, device, dtype, steps: int) -> float:
    """Median seconds of one optimiser step on ``batch`` under ``dtype`` autocast (float32 = none)."""
    model = copy.deepcopy(model).train()
    memory = copy.deepcopy(memory)
    optimizer, _ = build_optimizer(model, cfg)
    images = batch["image"].to(device)
    pids = batch["pid"].to(device)
    masks = batch["mask"][:, part_indices(model.parts)].to(device).float()
    amp = dtype != torch.float32
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype if amp else torch.bfloat16, enabled=amp):
            out, logits = model(images)
        if not memory.is_built:
            memory.build(out.bn_features.detach().float().repeat(memory.num_classes, 1)[: memory.num_classes],
                         torch.arange(memory.num_classes, device=device), gather=False)
        terms = stage2_losses(out, logits, pids, memory, model.text_prototypes, masks if out.mask_logits else None,
                              cfg, logit_scale=float(model.clip_logit_scale))
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:                      # the first step warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loop(cfg, model, memory, train, masks, device, epochs: int, rebuild: str) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.train.memory_rebuild = rebuild
    cfg.train.stage2_epochs = epochs
    cfg.train.eval_every = 0
    model, memory = copy.deepcopy(model), copy.deepcopy(memory)
    hist = train_stage2(model, memory, train, masks, cfg, device, progress=False)
    later = hist.iloc[1:]
    counting = copy.deepcopy(cfg)
    counting.data.cache_images = "never"   # the step count only: no second preload
    steps = len(train_loader(train, masks, counting)[0])
    train_s = float((later["seconds"] - later["rebuild_seconds"]).sum())
    return {"steps_per_s": steps * len(later) / train_s,
            "rebuild_share": float((later["rebuild_seconds"] / later["seconds"]).mean()),
            "first_rebuild_s": float(hist["rebuild_seconds"].iloc[0]), "epoch_s": float(later["seconds"].mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--protocol", default="synth:A2B")
    ap.add_argument("--config")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--ids", type=int, default=64, help="training identities the loop runs over")
    ap.add_argument("--epochs", type=int, default=2, help="loop epochs (the first builds VPM-2 with a full pass)")
    ap.add_argument("--steps", type=int, default=5, help="bare steps timed (after one warm-up step)")
    ap.add_argument("--bf16-steps", type=int, default=0,
                    help="bare bfloat16 steps timed (default: --steps with native bfloat16, else 1)")
    args = ap.parse_args(argv)

    overrides = {"pretrained": "none", **parse_overrides(args.param)}   # the speed does not depend on the weights
    cfg = resolve_config(args.protocol, args.config, overrides)
    cfg.validate()
    device = resolve_device(cfg.device)
    data = preflight(cfg, progress=False)
    if not cfg.grounding.masks_file:
        prepare_masks(cfg, source_datasets(data), progress=False)
    masks = run_masks(cfg, source_datasets(data))
    train, n_ids = _subset(data.train, args.ids)
    model, memory = _model(cfg, n_ids, device)
    batch = next(iter(train_loader(train, masks, cfg)[0]))
    native = cpu_capabilities()["bfloat16_native"] if device.type == "cpu" else True
    print(f"{cfg.data.protocol}: backbone {cfg.model.backbone} at {cfg.data.height}x{cfg.data.width}, batch "
          f"{cfg.data.batch_size}, {len(train)} images of {n_ids} ids, {device}, {torch.get_num_threads()} threads, "
          f"native bfloat16: {native}")

    fp32 = bare_step_seconds(cfg, model, memory, batch, device, torch.float32, args.steps)
    bf16 = bare_step_seconds(cfg, model, memory, batch, device, torch.bfloat16,
                             args.bf16_steps or (args.steps if native else 1))
    c32 = copy.deepcopy(cfg)
    c32.train.cpu_amp = "never"        # the loop in float32, as the bare step's baseline, whatever the CPU
    t0 = time.perf_counter()
    train_loader(train, masks, c32)
    preload_s = time.perf_counter() - t0
    lp = loop(c32, model, memory, train, masks, device, args.epochs, "train_pass")
    full = loop(c32, model, memory, train, masks, device, args.epochs, "full")
    bare_rate = 1.0 / fp32
    ratio = lp["steps_per_s"] / bare_rate
    B = cfg.data.batch_size
    print(f"bare step float32   : {fp32:.3f} s ({B / fp32:.1f} img/s)")
    print(f"bare step bfloat16  : {bf16:.3f} s ({B / bf16:.1f} img/s)  bfloat16 / float32 speed: {fp32 / bf16:.2f}x"
          + ("" if native else "  (emulated: this CPU has no native bfloat16, so runs here train in float32)"))
    print(f"training loop       : {lp['steps_per_s']:.3f} steps/s ({B * lp['steps_per_s']:.1f} img/s), epoch "
          f"{lp['epoch_s']:.1f} s")
    print(f"image preload       : {preload_s:.2f} s once per stage-2 run for {len(train)} images "
          f"(data.cache_images: {cfg.data.cache_images})")
    print(f"loop / bare step    : {ratio:.3f}  (target >= {TARGET_LOOP})  {'PASS' if ratio >= TARGET_LOOP else 'FAIL'}")
    print(f"VPM-2 rebuild share : train_pass {lp['rebuild_share']:.3%}, full {full['rebuild_share']:.3%} of an epoch "
          f"(target <= {TARGET_REBUILD:.0%})  {'PASS' if lp['rebuild_share'] <= TARGET_REBUILD else 'FAIL'}")
    return 0 if ratio >= TARGET_LOOP and lp["rebuild_share"] <= TARGET_REBUILD else 1


if __name__ == "__main__":
    sys.exit(main())
