"""The ``muva`` command line: batch runs of every workbook step.

    muva synth     --out DIR --seed S [--scale small|default]
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
