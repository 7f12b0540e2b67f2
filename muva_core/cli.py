"""The ``muva`` command line: batch runs of every workbook step.

    muva synth     --out DIR --seed S [--scale small|default|evidence|large]
    muva ground    --dataset NAME --root DIR --backend B --out boxes.parquet [--shard i/n]
    muva merge-shards --out boxes.parquet --count N
    muva calibrate --boxes boxes.parquet --out calibrated.parquet [--report report.json]
    muva vote      --boxes calibrated.parquet --out masks.safetensors
    muva import-masks --authors FILE.pkl --dataset NAME [--dataset NAME ...] --root DATA_ROOT --out MASKS
    muva doctor    --protocol NAME [--data-root DIR] [--json]   (can this run reproduce the paper?)
    muva train     --protocol NAME [--config FILE] [-p key=value ...] [--wait]
    muva eval      --run DIR [--protocol NAME | --dataset NAME_OR_FILE.yaml]
    muva embed     --run DIR --images DIR_OR_GLOB --out FILE.parquet|.npz [--onnx MODEL.onnx]
    muva search    --run DIR --query IMG_OR_DIR --gallery DIR_OR_FEATURES --top K --out DIR [--masks]
    muva run       --protocol NAME [--config FILE] [--steps 01-06] [-p key=value ...] [--wait]
    muva export-onnx --run DIR --out model.onnx
    muva sweep     --table 5..12 --protocol NAME [--seeds 0,1,2] [--shard i/n] [--wait] [--collect]
    muva evidence  [--scale small|full|regime] [--jobs N] [--shard i/n] [--wait] [--collect]
                   (Tables 5, 6, 8, 9 on 3 synthetic protocols -> reports/evidence.md)
    muva pretrain-clip --out DIR [--backbone small] [--image-size 256x128]   (language-pretrained small CLIP)
    muva report    [--reports-dir DIR]             (reports/README.md index + the README results table)
    muva datasets  NAME --root DIR | FILE.yaml    (summary of a dataset's splits)
    muva protocols [--kind single|multi|synthetic]
    muva baseline  --protocol NAME [--config FILE] [-p key=value ...]
    muva demo      [-p key=value ...]            (= muva run --protocol synth:A2B)
    muva lab       [--port N] [jupyter options]   (JupyterLab on notebooks/, this environment's kernel)
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from .config import ConfigError, RunConfig, parse_overrides


def _cli_path(value: str) -> Path:
    """A path given on the command line: as typed when it exists from here, else under the project root."""
    from .paths import resolve

    path = Path(value).expanduser()
    if path.exists():
        return path.absolute()
    return path if path.is_absolute() else resolve(value)


def _add_config_args(p: argparse.ArgumentParser, protocol: bool = True) -> None:
    if protocol:
        p.add_argument("--protocol", help="protocol name, e.g. synth:A2B, MA2MS, 'D+MS+C3->MA'")
    p.add_argument("--config", help="YAML config file (configs/<protocol>.yaml)")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")


def _add_wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true",
                   help="when another process holds a run folder's lock, wait for it (default: say who holds it and "
                        "move on); a lock without a heartbeat for $MUVA_LOCK_TIMEOUT s (180) is broken")


def _add_sharing_args(p: argparse.ArgumentParser, what: str) -> None:
    """The options that share a sweep or the evidence study between processes (docs/cluster.md)."""
    p.add_argument("--shard", metavar="i/n", help="train only every n-th run from the i-th (sorted by config hash); "
                   "without it, every process takes the runs that are neither done nor locked")
    _add_wait_arg(p)
    p.add_argument("--collect", action="store_true", help=f"train nothing: write the {what} from the finished runs, "
                   "or fail naming the runs missing or still locked")


def cmd_synth(args) -> int:
    from .data.synthetic import generate_synthetic

    t0 = time.perf_counter()
    root = generate_synthetic(args.out, seed=args.seed, scale=args.scale, overwrite=args.overwrite)
    print(f"synthetic dataset ({args.scale}, seed {args.seed}) at {root} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_datasets(args) -> int:
    from .data.declared import describe_dataset, open_dataset

    ds = open_dataset(args.name, args.root, verify_images=args.scan_images)
    print(describe_dataset(ds))
    if args.scan_images:
        print(f"  all {sum(len(getattr(ds, s)) for s in ('train', 'query', 'gallery'))} images decode")
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
    from .grounding.labelling import parse_shard
    from .grounding.steps import ground_file

    cfg = RunConfig().update({"backend": args.backend, "ground_model": args.model or "", "synth_seed": args.seed,
                              "trust_remote_code": args.trust_remote_code, "device": _device_for_rank(args.device),
                              **({"synth_root": args.root} if args.root else {})})
    print(ground_file(cfg, args.dataset, args.root, args.out, splits=args.splits,
                      shard=parse_shard(args.shard) if args.shard else None, batch_size=args.batch_size,
                      progress=not args.quiet, resume=not args.no_resume))
    return 0


def cmd_merge_shards(args) -> int:
    from .grounding.labelling import merge_shards

    table = merge_shards(args.out, args.count, remove=args.remove)
    print(f"merged {args.count} shards into {args.out}: {len(table)} rows")
    return 0


def cmd_calibrate(args) -> int:
    from .grounding.calibration import parse_img_size
    from .grounding.steps import calibrate_file

    print(calibrate_file(args.boxes, args.out, img_size=parse_img_size(args.img_size), method=args.method,
                         windows=args.windows, report=args.report))
    return 0


def cmd_vote(args) -> int:
    from .grounding.calibration import parse_img_size
    from .grounding.steps import vote_file

    print(vote_file(args.boxes, args.out, img_size=(args.height, args.width), patch=args.patch, rule=args.rule,
                    min_coverage=args.min_coverage, raw=args.raw, box_img_size=parse_img_size(args.img_size)))
    return 0


def cmd_import_masks(args) -> int:
    import json

    from .grounding.authors import import_masks_file

    cfg = _resolved(args) if (args.protocol or args.config or args.param) else RunConfig()
    report = import_masks_file(_cli_path(args.authors), args.dataset, _cli_path(args.root), _cli_path(args.out),
                               img_size=(cfg.data.height, cfg.data.width), patch=cfg.grounding.patch_size,
                               convention=args.convention)
    print(json.dumps(report.as_dict(), indent=1) if args.json else report)
    print(f"wrote {report.keys_written} masks to {args.out}; train with them: -p masks_file={args.out}")
    return 0


def cmd_doctor(args) -> int:
    import json

    from .report.doctor import doctor_report, format_report

    if args.data_root:
        args.param = [*(args.param or []), f"data_root={_cli_path(args.data_root)}"]
    report = doctor_report(_resolved(args), run_estimate=not args.no_estimate, steps=args.steps)
    print(json.dumps(report, indent=1, default=str) if args.json else format_report(report))
    return 0


def _resolved(args) -> RunConfig:
    from .config import resolve_config

    return resolve_config(getattr(args, "protocol", None), getattr(args, "config", None),
                          parse_overrides(getattr(args, "param", None)))


def cmd_train(args) -> int:
    from .runs import train_protocol

    cfg = _resolved(args)
    result = train_protocol(cfg, progress=not args.quiet, wait=args.wait)
    if result.metrics:
        print(_metrics_line(cfg.data.protocol, result.metrics, result.mask_iou_truth))
        print(f"run folder: {result.run_dir} ({result.seconds:.0f} s)")
    return 0


def cmd_eval(args) -> int:
    import json

    from .inference.runs import evaluate_run

    overrides = parse_overrides(args.param)
    if args.rerank:
        overrides["rerank"] = args.rerank
    result = evaluate_run(_cli_path(args.run), protocol=args.protocol, dataset=args.dataset,
                          checkpoint=_cli_path(args.checkpoint) if args.checkpoint else None, overrides=overrides,
                          progress=not args.quiet)
    e = result.cfg.eval
    if e.rerank != "none":
        print(f"({e.rerank} re-ranking: k1={e.k1}, k2={e.k2}, lambda={e.lambda_value}; "
              "the paper reports no re-ranking)")
    print(_metrics_line(result.name, result.metrics, result.mask_iou_truth))
    skipped = result.metrics.get("num_skipped_queries", 0)
    if skipped:
        print(f"{skipped} of {skipped + result.metrics['num_valid_queries']} queries have no gallery image of their "
              "identity from another camera: not scored (the Market-1501 protocol)")
    if args.json:
        print(json.dumps({"metrics": result.metrics, "mask_iou_truth": result.mask_iou_truth}))
    return 0


def cmd_export_onnx(args) -> int:
    import torch

    from .export import check_onnx_parity, export_onnx
    from .inference.runs import load_run_model
    from .config import config_hash

    cfg, model = load_run_model(_cli_path(args.run), device="cpu")
    # the file's own "backbone" entry describes the architecture; the config's name goes beside it
    path = export_onnx(model.encoder, args.out, image_size=(cfg.data.height, cfg.data.width), norm=cfg.data.norm,
                       extra_metadata={"backbone_name": cfg.model.backbone, "protocol": cfg.data.protocol,
                                       "test_resize": cfg.data.test_resize, "config_hash": config_hash(cfg)})
    diff = check_onnx_parity(model.encoder, path, torch.randn(2, 3, cfg.data.height, cfg.data.width))
    print(f"wrote {path}; ONNX Runtime vs PyTorch max abs difference {diff:.2e}")
    return 0


def cmd_embed(args) -> int:
    from .inference.embed import embed_images

    result = embed_images(args.images, args.out, run=_cli_path(args.run) if args.run else None, onnx=args.onnx,
                          device=args.device, progress=not args.quiet)
    print(f"wrote {result.path}: {result.images} images x {result.feature_dim}-d features ({result.kind}); "
          f"pid/camid from {result.with_ids} Market-style file names")
    return 0


def cmd_search(args) -> int:
    from .inference.search import search

    result = search(args.query, args.gallery, args.out, run=_cli_path(args.run) if args.run else None,
                    onnx=args.onnx, device=args.device, top=args.top, masks=args.masks, progress=not args.quiet)
    print(f"{result.queries} queries x {result.gallery} gallery images (gallery features: {result.embedded_gallery} "
          f"embedded, {result.cached_gallery} from the cache or the feature file)")
    print(f"wrote {result.out / 'ranks.csv'}, {len(result.figures)} ranked-list PNGs, {result.out / 'index.html'}")
    return 0


def cmd_run(args) -> int:
    from .experiments.runner import parse_steps, run_notebooks

    cfg = _resolved(args)
    t0 = time.perf_counter()
    command = getattr(args, "command_line", None) or "muva " + shlex.join(getattr(args, "argv", sys.argv[1:]))
    folder = run_notebooks(cfg, parse_steps(args.steps), run_id=args.run_id, force=args.force,
                           progress=not args.quiet, command=command, wait=args.wait)
    from .runs import Run

    summary = Run(cfg, folder).summary_record()
    if summary.get("metrics"):
        print(_metrics_line(cfg.data.protocol, summary["metrics"], summary.get("mask_iou_truth") or {}))
    from .paths import resolve

    print(f"report: {folder} ({time.perf_counter() - t0:.0f} s); index: {resolve(cfg.reports_dir) / 'README.md'}")
    return 0


def cmd_sweep(args) -> int:
    from .grounding.labelling import parse_shard
    from .experiments.sweep import run_sweep, sweep_dir

    shard = parse_shard(args.shard) if args.shard else None
    cfg = _resolved(args)
    seeds = [int(s) for s in args.seeds.replace(",", " ").split()]
    summary = run_sweep(cfg, args.table, seeds=seeds, variants=args.variant, progress=not args.quiet, shard=shard,
                        wait=args.wait, collect=args.collect)
    if summary is not None:
        print(summary.round(2).to_string())
        print(f"wrote {sweep_dir(cfg, args.table)}/table{args.table}.md and .csv")
    return 0


def cmd_evidence(args) -> int:
    from .grounding.labelling import parse_shard
    from .experiments.evidence import run_evidence

    shard = parse_shard(args.shard) if args.shard else None
    overrides = parse_overrides(args.param)
    protocols = args.protocol or None   # the scale's (muva_core.experiments.evidence.scale_protocols)
    seeds = [int(s) for s in args.seeds.replace(",", " ").split()] if args.seeds else None
    recipes = [r for item in args.recipe for r in item.split(",")] if args.recipe else None
    out = run_evidence(overrides, scale=args.scale, protocols=protocols, seeds=seeds, progress=not args.quiet,
                       jobs=args.jobs, shard=shard, wait=args.wait, collect=args.collect,
                       **({"recipes": recipes} if recipes else {}))
    if out is not None:
        print(f"wrote {out}")
    return 0


def _metrics_line(protocol: str, metrics: dict, iou: dict) -> str:
    from .report.paper import paper_result

    line = (f"{protocol}: mAP {metrics['mAP']:.1f}  Rank-1 {metrics['Rank-1']:.1f}  Rank-5 {metrics['Rank-5']:.1f}  "
            f"Rank-10 {metrics['Rank-10']:.1f}  mINP {metrics['mINP']:.1f}")
    if iou:
        line += "\npredicted part masks vs ground-truth boxes (IoU): " + ", ".join(f"{k} {v:.2f}" for k, v in iou.items())
    paper = paper_result(protocol)
    if paper:
        line += f"\npaper (MUVA, ViT-B/16): mAP {paper[0]:.1f}  Rank-1 {paper[1]:.1f}"
    return line


def cmd_baseline(args) -> int:
    import pandas as pd

    from .eval.baselines import run_baseline
    from .paths import RunFiles
    from .report.tables import format_table

    record = run_baseline(_resolved(args), progress=not args.quiet)
    print(format_table(pd.DataFrame(record["metrics"]).T,
                       f"{record['protocol']}: colour-histogram baselines and the start CLIP's image features "
                       "(clip-start, no Re-ID training) on the target domain"))
    print(f"clip-start: {record['clip_start']}")
    print(f"wrote {RunFiles(record['folder']).summary}")
    return 0


def parse_image_size(text: str) -> tuple[int, int]:
    """``"256x128"`` -> ``(256, 128)`` (height x width); a clear exit on anything else (the commands and tools/)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--image-size: expected HEIGHTxWIDTH such as 256x128, got {text!r}") from None
    return h, w


def cmd_pretrain_clip(args) -> int:
    """Contrastive CLIP pretraining on captioned synthetic pedestrians (muva_core.pretrain)."""
    from .pretrain.loop import pretrain_clip
    from .pretrain.provision import pretrain_clip_summary

    options = {} if args.keep_tokens is None else {"keep_tokens": args.keep_tokens}
    if args.color_jitter:
        options["color_jitter"] = True
        if args.color_jitter != "reid":
            options["jitter_ranges"] = args.color_jitter
    if args.loss:
        options["loss"] = args.loss
    if args.hard_negatives:
        options["hard_negatives"] = args.hard_negatives
    if args.batch_granularity:
        options["batch_granularity"] = args.batch_granularity
    image_size = parse_image_size(args.image_size)
    path = pretrain_clip(args.out, backbone=args.backbone, seed=args.seed, epochs=args.epochs, scale=args.scale,
                         synth_root=args.synth_root, overwrite=args.overwrite, progress=not args.quiet,
                         image_size=image_size, reid_root=args.reid_root, threads=args.threads, **options)
    print(pretrain_clip_summary(path, args.backbone, image_size))
    return 0


def cmd_demo(args) -> int:
    """`muva run` on the default synthetic protocol (configs/synth_A2B.yaml: the language-pretrained small CLIP,
    made first when missing), the chance level and colour histograms beside the model; the demo's own run (no
    -p, no --config) also copies its Figure 7 and its ranked lists to the paths the README shows."""
    from .experiments.runner import DEMO_PROTOCOL, demo_summary
    from .runs import run_folder

    if not getattr(args, "protocol", None):
        args.protocol = DEMO_PROTOCOL
    args.steps, args.run_id, args.force = None, None, False
    own = args.protocol == DEMO_PROTOCOL and not getattr(args, "param", None) and not getattr(args, "config", None)
    args.command_line = "make demo" if own else None   # None: the command line as typed
    rc = cmd_run(args)
    if rc:
        return rc
    for line in demo_summary(run_folder(_resolved(args)), publish=own):
        print(line)
    return 0


def cmd_report(args) -> int:
    from .paths import project_root, resolve
    from .report.index import update_readme_results, write_reports_index

    reports = resolve(args.reports_dir)
    index = write_reports_index(reports)
    changed = update_readme_results(project_root() / "README.md", reports)
    print(f"wrote {index}; README results table {'updated' if changed else 'unchanged'}")
    return 0


def lab_command(port: int | None = None, extra: list[str] | None = None) -> list[str]:
    """The JupyterLab command line of ``muva lab`` / ``make lab``: served from the project root, opened on
    ``notebooks/``, kernels are this environment's Python (so they import this ``muva_core``)."""
    from .paths import project_root

    root = project_root()
    cmd = [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.root_dir={root}",
           "--LabApp.default_url=/lab/tree/notebooks", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if port:
        cmd.append(f"--port={port}")
    return cmd + list(extra or [])


def cmd_lab(args) -> int:
    import subprocess

    from .paths import project_root

    cmd = lab_command(args.port, args.jupyter_args)
    print("JupyterLab on the workbook: " + " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, cwd=str(project_root()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muva", description="MUVA workbook: batch runs of the workbook's steps")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate the synthetic multi-domain person dataset")
    p.add_argument("--out", required=True, help="output folder (holds synth_A/ ... synth_D/ and manifest.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", choices=["small", "default", "evidence", "large", "reid"], default="default",
                   help="see muva_core.data.synthetic.SCALES")
    p.add_argument("--overwrite", action="store_true", help="replace an existing set made with other settings")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("datasets", help="parse a dataset and print its split summary")
    p.add_argument("name", help="dataset name or alias (market1501, dukemtmcreid, msmt17, cuhk03_np, synth_A, ...) "
                   "or a dataset file (.yaml, docs/own-images.md)")
    p.add_argument("--root", help="the dataset's folder or a parent of it (a dataset file names its own root)")
    p.add_argument("--scan-images", action="store_true", help="also decode every image (all unreadable files at once)")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("protocols", help="list the registered protocols")
    p.add_argument("--kind", choices=["single", "multi", "synthetic"], default=None)
    p.set_defaults(func=cmd_protocols)

    p = sub.add_parser("ground", help="label part boxes with a grounding expert (resumable; sharded; torchrun-aware)")
    p.add_argument("--dataset", required=True, help="dataset name (market1501, msmt17, synth_A, ...) or file (.yaml)")
    p.add_argument("--root", help="dataset root (for synth_* the synthetic root; a dataset file names its own)")
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
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh: relabel every image, discarding an earlier run's <out>.parts/ and <out>")
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
    p.add_argument("--img-size", metavar="HxW", help="size of the labelled images, e.g. 256x128 (needed when the "
                   "table has no img_w/img_h columns; overrides them)")
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
    p.add_argument("--img-size", metavar="HxW", help="size of the labelled images the boxes are in, e.g. 256x128 "
                   "(default: the table's img_w/img_h; without them the boxes are taken to be in --height x --width)")
    p.set_defaults(func=cmd_vote)

    p = sub.add_parser("import-masks", help="the authors' released part masks (RikoLi/MUVA blobs/*.pkl) -> a mask "
                       "file for masks_file (read without running any code of the pickle)")
    p.add_argument("--authors", required=True, help="the authors' mask pickle: a dict from image file name to [3, L]")
    p.add_argument("--dataset", action="append", required=True,
                   help="dataset the file covers (repeat for the multi-source MA+D+MS+C3 file)")
    p.add_argument("--root", required=True, help="data root holding the datasets (as data_root)")
    p.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    p.add_argument("--convention", choices=["reference", "binary"], default="reference",
                   help="reference: 0 marks the part's patches (the authors' additive 0/-inf masks); binary: nonzero")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_import_masks)

    p = sub.add_parser("doctor", help="everything that decides whether a run can reproduce the paper: environment, "
                       "datasets vs their published counts, masks, checkpoint, config vs section 4.2, a time estimate")
    _add_config_args(p)
    p.add_argument("--data-root", help="folder holding the datasets (= -p data_root=...)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--no-estimate", action="store_true", help="skip the measured training steps")
    p.add_argument("--steps", type=int, default=3, help="training steps timed for the estimate (default 3)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("baseline", help="evaluate the training-free baselines (colour histograms, the start CLIP's "
                       "image features) on a protocol's target domain")
    _add_config_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("train", help="two-stage training + evaluation of a protocol (resumable; torchrun-aware)")
    _add_config_args(p)
    _add_wait_arg(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run folder on its (or another) protocol's target")
    p.add_argument("--run", required=True, help="run folder holding config.yaml and model.safetensors")
    p.add_argument("--protocol", help="evaluate on this protocol's target instead")
    p.add_argument("--dataset", help="evaluate on this dataset's query / gallery instead: a name or a dataset file (.yaml)")
    p.add_argument("--checkpoint", help="model file (default: <run>/model.safetensors)")
    p.add_argument("--rerank", choices=["none", "k-reciprocal"], default=None,
                   help="k-reciprocal re-ranking (Zhong et al. 2017) before the metrics; = -p rerank=...")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export-onnx", help="export a trained encoder's embedding to ONNX (checked against PyTorch)")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("embed", help="the evaluation feature of every image of a folder or glob -> parquet / npz")
    p.add_argument("--run", help="trained run folder (config.yaml, model.safetensors)")
    p.add_argument("--images", required=True, help="a folder (searched recursively), a quoted glob, or an image")
    p.add_argument("--out", required=True, help="feature file: .parquet (path, feature, pid, camid) or .npz")
    p.add_argument("--onnx", help="embed with ONNX Runtime from this `muva export-onnx` file")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: the run's)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("search", help="rank a gallery for query images -> ranks.csv, a PNG per query, index.html")
    p.add_argument("--run", help="trained run folder (config.yaml, model.safetensors)")
    p.add_argument("--query", required=True, help="a query image, a folder of them or a quoted glob")
    p.add_argument("--gallery", required=True, help="a folder of gallery images (or a glob), or a `muva embed` file")
    p.add_argument("--top", type=int, default=10, help="gallery images shown per query (default 10)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--masks", action="store_true", help="overlay the predicted part masks")
    p.add_argument("--onnx", help="embed with ONNX Runtime from this `muva export-onnx` file")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: the run's)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("run", help="execute the numbered notebooks for a protocol with papermill into reports/")
    _add_config_args(p)
    p.add_argument("--steps", help="which notebooks, e.g. 01-03 or 01,04 (default: 01-07)")
    p.add_argument("--run-id", help="run folder name (default: run-<config hash>)")
    p.add_argument("--force", action="store_true", help="re-run steps even when unchanged")
    _add_wait_arg(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="run the variants of one of the paper's ablation tables (5-12) on a protocol")
    p.add_argument("--table", type=int, required=True, choices=range(5, 13), metavar="5..12")
    _add_config_args(p)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--variant", action="append", help="only this variant (repeatable; the paper's row label)")
    _add_sharing_args(p, "table")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("evidence", help="the ablation study (Tables 5, 6, 8, 9) on synthetic protocols -> reports/evidence.md")
    p.add_argument("--scale", choices=["small", "full", "regime"], default="full",
                   help="full: the small CLIP, 50 training ids a domain, short stage 2; regime: Re-ID sized sources, "
                   "trained to the end (docs/evidence.md)")
    p.add_argument("--protocol", action="append", help="protocols (default: synth:A2B, synth:C2D, synth:B+C+D->A; "
                   "regime: synth:A2B, synth:C2D)")
    p.add_argument("--seeds", help="comma-separated seeds (default: 0,1,2 full and regime; 0,1 small)")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once, each with cpu_count // jobs threads")
    p.add_argument("--recipe", action="append", help="training recipes (default: workbook for Tables 5, 6, 8, 9 and "
                   "reference for Tables 6 and 9)")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE")
    _add_sharing_args(p, "page")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evidence)

    p = sub.add_parser("report", help="regenerate reports/README.md and the README's results table from reports/")
    p.add_argument("--reports-dir", default="reports")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("pretrain-clip", help="pretrain a small CLIP on captioned synthetic people (domains P, Q, R)")
    p.add_argument("--out", required=True, help="folder of clip-<backbone>-seed<seed>.safetensors and its .json report")
    p.add_argument("--backbone", choices=["tiny", "mini", "small"], default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="default: muva_core.pretrain.DEFAULT_EPOCHS")
    p.add_argument("--scale", choices=["pretrain", "pretrain-wide", "small"], default="pretrain", help="size of the pretraining set")
    p.add_argument("--synth-root", default=None, help="pretraining set (default: <parent of --out>/synthetic-pretrain)")
    p.add_argument("--image-size", default="256x128", help="HEIGHTxWIDTH of the input (MUVA: 256x128; the Re-ID "
                   "configs' height/width must match, the 16-pixel patch grid is not resized)")
    p.add_argument("--keep-tokens", type=int, default=None, help="patch tokens kept per training image "
                   "(default 32 of the 128 at 256x128; all when at least the grid size)")
    p.add_argument("--color-jitter", nargs="?", const="reid", default=None, choices=["reid", "wide"],
                   help="photometric jitter (lighting, camera) on every training image, with the Re-ID training's "
                   "ranges (plain --color-jitter) or wider ones (--color-jitter wide: strong colour casts, "
                   "contrast, noise, low resolution)")
    p.add_argument("--loss", choices=["clip", "multi_positive"], default=None, help="contrastive loss (default clip: "
                   "one positive per image; multi_positive: every caption of the batch true of an image is one)")
    p.add_argument("--hard-negatives", type=int, default=0, metavar="N", help="per image, N captions with one "
                   "attribute changed (NegCLIP hard negatives) that it must rank below its own (default 0)")
    p.add_argument("--batch-granularity", choices=["mixed", "one"], default=None, help="mixed (default): each "
                   "image draws its caption's granularity; one: the whole batch is captioned at one granularity "
                   "(harder negatives: 63 other legs instead of a mix of parts)")
    p.add_argument("--reid-root", default=None, help="a generated synthetic Re-ID set (e.g. data/synthetic): the "
                   "report adds zero-shot accuracy on the test images of its domains A-D")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="compute on N CPU threads (default: "
                   "torch's). The weights' last bits follow the thread count: the same command on the same number "
                   "of threads and the same kind of CPU makes the same weights (not a setting of the reuse key)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint made with other settings")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pretrain_clip)

    p = sub.add_parser("lab", help="open the workbook's notebooks in JupyterLab (kernels use this environment)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("jupyter_args", nargs=argparse.REMAINDER, help="more jupyter lab options, e.g. --no-browser")
    p.set_defaults(func=cmd_lab)

    p = sub.add_parser("demo", help="the main job: `muva run` on the synthetic default synth:A2B (writes reports/)")
    _add_config_args(p)
    _add_wait_arg(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]   # the command line as typed (run records)
    try:
        if hasattr(args, "wait"):  # a command that locks run folders: a bad $MUVA_LOCK_TIMEOUT before any work
            from .locks import lock_timeout

            lock_timeout()
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        # every library error carries the path and the reason; show it without a traceback
        # (MUVA_DEBUG=1 shows the traceback too)
        if os.environ.get("MUVA_DEBUG"):
            raise
        from .locks import LockHeld

        hint = "; add --wait to wait for it" if isinstance(err, LockHeld) and hasattr(args, "wait") else ""
        print(f"muva {args.command}: error: {err}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
