"""Where a trained run's predicted part masks sit, on its target and on each source's held-out split.

    python tools/mask_placement.py reports/synth_A2B/sweep-runs/run-3bb75409 [--images 800]

Prints, per split, the masks' IoU against the true part boxes at several thresholds and
:func:`muva_core.eval.masks.mask_placement` (top-k precision, centroid spreads and errors): whether a mask that
scores low on a new domain is misplaced or merely mis-sized. Inference only (the first ``--images`` of
query + gallery); synthetic domains (true part boxes) only.
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    from muva_core.checks import eval_preflight
    from muva_core.eval.features import extract_features
    from muva_core.eval.masks import mask_iou, mask_placement
    from muva_core.inference.runs import load_run_model
    from muva_core.train.run import heldout_sources, true_part_masks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a trained run folder (config.yaml, model.safetensors)")
    ap.add_argument("--images", type=int, default=800, help="query + gallery images per split (default 800)")
    ap.add_argument("--thresholds", default="0.2,0.3,0.4,0.5,0.6")
    args = ap.parse_args(argv)
    if args.images < 1:
        ap.error(f"--images must be >= 1, got {args.images}")
    thresholds = [float(t) for t in args.thresholds.split(",")]
    try:
        cfg, model = load_run_model(args.run, device="cpu")
    except (FileNotFoundError, ValueError) as exc:   # no run folder, no model, a config it cannot read
        ap.error(str(exc))
    if not model.parts:
        ap.error(f"{args.run}: the model has no part masks (granularity {cfg.model.granularity})")
    data = eval_preflight(cfg, None, progress=False)
    splits = {f"{data.protocol.target} (target)": (data.query, data.gallery, data.datasets.get(data.protocol.target))}
    splits.update({f"{name} (held-out)": (ds.query, ds.gallery, ds) for name, ds in heldout_sources(data).items()})
    grid = model.encoder.grid          # the patch grid the masks are predicted on
    for name, (query, gallery, dataset) in splits.items():
        samples = (list(query) + list(gallery))[:args.images]
        truth = true_part_masks(cfg, model, samples, dataset)
        if truth is None:
            print(f"{name}: no true part boxes, skipped")
            continue
        _, probs = extract_features(model.encoder, samples, cfg, torch.device("cpu"), return_masks=True,
                                    progress=False)
        print(f"\n## {name}: {len(samples)} images, {grid[0]}x{grid[1]} patches\n")
        print("IoU by threshold: " + "; ".join(
            f"{t}: " + " / ".join(f"{v:.3f}" for v in mask_iou(probs, truth, t).tolist()) for t in thresholds)
            + f" ({' / '.join(model.parts)})\n")
        print(mask_placement(probs, truth, grid, model.parts).round(3).to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
