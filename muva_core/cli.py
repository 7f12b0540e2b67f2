"""The ``muva`` command line: batch runs of every workbook step.

    muva synth     --out DIR --seed S [--scale small|default]
    muva ground    --dataset NAME --root DIR --backend B --out boxes.parquet [--shard i/n]
    muva merge-shards --out boxes.parquet --count N
    muva calibrate --boxes boxes.parquet --out calibrated.parquet [--report report.json]
    muva vote      --boxes calibrated.parquet --out masks.safetensors
    muva datasets  NAME --root DIR                 (summary of a dataset's splits)
    muva protocols [--kind single|multi|synthetic]
    muva baseline  --protocol NAME [--config FILE] [-p key=value ...]
    muva demo      [--config FILE] [-p key=value ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .config import ConfigError, RunConfig, parse_overrides


def _load_config(args) -> RunConfig:
    overrides = parse_overrides(getattr(args, "param", None))
    if getattr(args, "protocol", None):
        overrides["protocol"] = args.protocol
    if getattr(args, "config", None):
        return RunConfig.from_yaml(args.config, overrides)
    return RunConfig().update(overrides)


def _add_config_args(p: argparse.ArgumentParser, protocol: bool = True) -> None:
    if protocol:
        p.add_argument("--protocol", help="protocol name, e.g. synth:A2B, MA2MS, 'D+MS+C3->MA'")
    p.add_argument("--config", help="YAML config file (configs/<protocol>.yaml)")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")


def cmd_synth(args) -> int:
    from .data.synthetic import generate_synthetic

    t0 = time.perf_counter()
    root = generate_synthetic(args.out, seed=args.seed, scale=args.scale, overwrite=args.overwrite)
    print(f"synthetic dataset ({args.scale}, seed {args.seed}) at {root} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_datasets(args) -> int:
    from .data.datasets import load_dataset

    ds = load_dataset(args.name, args.root)
    print(ds)
    return 0


def cmd_protocols(args) -> int:
    from .data.protocols import get_protocol, list_protocols

    for name in list_protocols(args.kind):
        proto = get_protocol(name)
        print(f"{name:24s} {' + '.join(proto.sources)} -> {proto.target}")
    return 0


def _device_for_rank(device: str) -> str:
    """Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if device == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def cmd_ground(args) -> int:
    from .data.datasets import load_dataset
    from .grounding.labelling import label_dataset, label_dataset_distributed, parse_shard, summarize_labels
    from .grounding.steps import build_backend, select_splits

    cfg = RunConfig().update({"backend": args.backend, "ground_model": args.model or "", "seed": args.seed,
                              "trust_remote_code": args.trust_remote_code, "device": _device_for_rank(args.device),
                              "synth_root": args.root})
    ds = load_dataset(args.dataset, args.root)
    samples = select_splits(ds, args.splits)
    backend = build_backend(cfg)
    common = dict(batch_size=args.batch_size or None, progress=not args.quiet)
    if args.shard:  # one shard by hand (several machines): merge later with `muva merge-shards`
        table = label_dataset(samples, backend, args.out, shard=parse_shard(args.shard), **common)
    else:  # plain run, or under torchrun / accelerate: each rank its shard, rank 0 merges
        table = label_dataset_distributed(samples, backend, args.out, **common)
    summary = summarize_labels(table)
    print(f"{ds.name}: {summary['images']} images labelled by {args.backend} "
          f"({summary['seconds_per_image']:.3f} s/image); status counts {summary['status']}")
    return 0


def cmd_merge_shards(args) -> int:
    from .grounding.labelling import merge_shards

    table = merge_shards(args.out, args.count, remove=args.remove)
    print(f"merged {args.count} shards into {args.out}: {len(table)} rows")
    return 0


def cmd_calibrate(args) -> int:
    import pandas as pd

    from .grounding.calibration import DEFAULT_WINDOWS, calibrate_boxes
    from .io import write_json, write_parquet

    boxes = pd.read_parquet(args.boxes)
    windows = "data" if args.windows == "data" else DEFAULT_WINDOWS
    table, report = calibrate_boxes(boxes, method=args.method, windows=windows)
    write_parquet(args.out, table)
    if args.report:
        write_json(args.report, report.to_dict())
    print(report)
    print(f"wrote {args.out}")
    return 0


def cmd_vote(args) -> int:
    import pandas as pd

    from .grounding.voting import MaskStore, mask_statistics

    table = pd.read_parquet(args.boxes)
    columns = "calibrated" if "cal_x0" in table.columns and not args.raw else "raw"
    store = MaskStore.from_table(table, img_size=(args.height, args.width), patch=args.patch, rule=args.rule,
                                 min_coverage=args.min_coverage, columns=columns, source=str(args.boxes))
    store.save(args.out)
    print(mask_statistics(store.masks).round(3).to_string())
    print(f"wrote {len(store)} masks ({columns} boxes, grid {store.grid}) to {args.out}")
    return 0


def cmd_baseline(args) -> int:
    from .pipeline import run_baseline

    cfg = _load_config(args)
    run_baseline(cfg, progress=not args.quiet)
    return 0


def cmd_demo(args) -> int:
    from .pipeline import run_demo

    cfg = _load_config(args)
    run_demo(cfg, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muva", description="MUVA workbook: batch runs of the workbook's steps")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate the synthetic multi-domain person dataset")
    p.add_argument("--out", required=True, help="output folder (holds synth_A/ ... synth_D/ and manifest.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", choices=["small", "default"], default="default")
    p.add_argument("--overwrite", action="store_true", help="replace an existing set made with other settings")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("datasets", help="parse a dataset and print its split summary")
    p.add_argument("name", help="dataset name or alias (market1501, dukemtmcreid, msmt17, cuhk03_np, synth_A, ...)")
    p.add_argument("--root", required=True)
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("protocols", help="list the registered protocols")
    p.add_argument("--kind", choices=["single", "multi", "synthetic"], default=None)
    p.set_defaults(func=cmd_protocols)

    p = sub.add_parser("ground", help="label part boxes with a grounding expert (resumable; sharded; torchrun-aware)")
    p.add_argument("--dataset", required=True, help="dataset name (market1501, msmt17, synth_A, ...)")
    p.add_argument("--root", required=True, help="dataset root (for synth_* the synthetic root)")
    p.add_argument("--backend", default="synthetic",
                   help="synthetic | cogvlm | florence2 | owlv2 | grounding_dino | vitpose")
    p.add_argument("--out", required=True, help="output parquet (one row per image and part)")
    p.add_argument("--splits", default="train", help="comma-separated splits to label (default: train)")
    p.add_argument("--shard", help="i/n: label every n-th image from offset i (torchrun: taken from RANK/WORLD_SIZE)")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--model", help="model id or local path (default: the backend's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated expert")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the cogvlm backend's remote model code")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_ground)

    p = sub.add_parser("merge-shards", help="merge the shard files of a sharded `muva ground` run")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--remove", action="store_true", help="delete the shard files after merging")
    p.set_defaults(func=cmd_merge_shards)

    p = sub.add_parser("calibrate", help="replace implausible part boxes by stripe windows (calibrate_boxes)")
    p.add_argument("--boxes", required=True, help="labelling table from `muva ground`")
    p.add_argument("--out", required=True)
    p.add_argument("--report", help="write the calibration report (thresholds, counts) as JSON here")
    p.add_argument("--method", choices=["robust_z", "quantile"], default="robust_z")
    p.add_argument("--windows", choices=["stripes", "data"], default="stripes")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("vote", help="vote (calibrated) boxes into patch masks [3, Npatch] (vote_patch_masks)")
    p.add_argument("--boxes", required=True, help="calibrated table (or a raw labelling table)")
    p.add_argument("--out", required=True, help="mask file (.safetensors)")
    p.add_argument("--rule", choices=["center", "coverage"], default="center")
    p.add_argument("--min-coverage", type=float, default=0.5)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--raw", action="store_true", help="vote the raw boxes even when calibrated ones exist")
    p.set_defaults(func=cmd_vote)

    p = sub.add_parser("baseline", help="evaluate colour-histogram baselines on a protocol's target domain")
    _add_config_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("demo", help="the main job on the embedded synthetic default (writes reports/)")
    _add_config_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        # every library error carries the path and the reason; show it without a traceback
        # (MUVA_DEBUG=1 shows the traceback too)
        if os.environ.get("MUVA_DEBUG"):
            raise
        print(f"muva {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
