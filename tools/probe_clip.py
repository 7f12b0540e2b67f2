"""Linear probes of pretrained CLIPs: is an attribute in the image features at all?

For each checkpoint of ``muva pretrain-clip`` (or ``random``: the same architecture at random weights), a softmax
regression per zero-shot attribute is fitted on the image features of ``--train`` pretraining images (the
attribute's part masked in, as the ``part`` zero-shot mode sees it) and scored on ``--test`` held-out people
(balanced accuracy). A probe well above the zero-shot accuracy says the text side is what misses; a probe near
chance says the image tower does not see the attribute.

    python tools/probe_clip.py --root data/synthetic-pretrain-wide random data/clip-wide/clip-mini-192x96-seed0.safetensors
"""
from __future__ import annotations

import argparse
import sys

import torch

from muva_core.cli import parse_image_size
from muva_core.pretrain.config import PretrainConfig
from muva_core.pretrain.data import load_pretrain_images
from muva_core.pretrain.files import load_pretrained_clip
from muva_core.pretrain.model import build_pretrain_clip
from muva_core.pretrain.zeroshot import probe_attributes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="pretrained CLIP files, or 'random'")
    ap.add_argument("--root", required=True, help="a generated pretraining set (synth_P, synth_Q, synth_R)")
    ap.add_argument("--train", type=int, default=3000, help="training images of the probes")
    ap.add_argument("--test", type=int, default=600, help="held-out images they are scored on")
    ap.add_argument("--backbone", default="mini", help="the architecture of 'random'")
    ap.add_argument("--image-size", default="192x96", help="input of 'random' (the checkpoints use their own)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    cache = {}
    for ck in args.checkpoints:
        if ck == "random":
            cfg = PretrainConfig(backbone=args.backbone, image_size=parse_image_size(args.image_size))
            model, _ = build_pretrain_clip(cfg)
        else:
            model, _, cfg = load_pretrained_clip(ck)
        size = tuple(cfg.image_size)
        if size not in cache:
            cache[size] = (load_pretrain_images(args.root, "train", limit=args.train, seed=args.seed + 1).resized(size),
                           load_pretrain_images(args.root, "test", limit=args.test, seed=args.seed + 2).resized(size))
        acc = probe_attributes(model, *cache[size], part_pad=cfg.part_pad)
        print(f"{ck}: linear probe balanced accuracy " + ", ".join(f"{a} {v:.2f}" for a, v in acc.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
