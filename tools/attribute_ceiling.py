"""Supervised ceiling of the zero-shot attributes: can the CLIP's image tower at an input size learn them at all?

The image tower of ``--backbone`` (random weights) is trained with one linear head per zero-shot attribute on
``--train`` pretraining images (``--mode part``: each step one part masked in, as the ``part`` zero-shot mode sees
them; ``--mode global``: whole images; class-weighted cross-entropy) and scored on ``--test`` held-out people
(balanced accuracy). An attribute near chance here is out of reach of any caption or contrastive loss for that
tower at that size (docs/pretraining.md).

    python tools/attribute_ceiling.py --root data/synthetic-pretrain-wide --image-size 192x96 --epochs 6 --train 12000
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from muva_core.cli import parse_image_size
from muva_core.pretrain.data import load_pretrain_images
from muva_core.pretrain.zeroshot import supervised_attribute_ceiling


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="a generated pretraining set (synth_P, synth_Q, synth_R)")
    ap.add_argument("--image-size", default="192x96", help="HxW the images are resized to")
    ap.add_argument("--backbone", default="mini")
    ap.add_argument("--mode", choices=["part", "global"], default="part", help="part: one part masked in per step "
                    "(the zero-shot part mode); global: whole images, every attribute at every step")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train", type=int, default=12000, help="training images")
    ap.add_argument("--test", type=int, default=1000, help="held-out images they are scored on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args(argv)
    size = parse_image_size(args.image_size)
    t0 = time.perf_counter()
    train = load_pretrain_images(args.root, "train", limit=args.train, seed=args.seed + 1).resized(size)
    test = load_pretrain_images(args.root, "test", limit=args.test, seed=args.seed + 2).resized(size)
    res = supervised_attribute_ceiling(train, test, backbone=args.backbone, mode=args.mode, epochs=args.epochs,
                                       seed=args.seed, progress=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["settings"] = {**vars(args), "train_images": len(train), "test_images": len(test)}
    print(f"{args.backbone} at {size[0]}x{size[1]} ({args.mode}), {args.epochs} epochs on {len(train)} images, "
          f"{len(test)} held out: supervised balanced accuracy "
          + ", ".join(f"{a} {v:.2f}" for a, v in res["balanced_accuracy"].items())
          + f" ({res['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
