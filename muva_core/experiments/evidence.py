"""``muva evidence``: do the paper's ablation directions hold on the synthetic DG benchmark?

Runs Tables 5 (granularity), 6 (language), 8 (AM-MSA vs stripes) and 9 (calibration) with
``muva sweep`` on two synthetic single-source protocols and one multi-source protocol, several
seeds each, then writes ``reports/evidence.md``: per claim, the paper's numbers, this
benchmark's mean and standard deviation, and whether the direction holds beyond seed noise
(the difference of means exceeds twice its standard error, Welch). Only the variants that a
claim compares are trained (Table 5: G, G+H, G+U, G+L, G+H+U+L).

Scales: ``small`` (tiny random CLIP, small data, 2 epochs, 2 seeds) runs in CI and checks that
every table is produced; ``full`` is the study, one command a user can leave running: the
``small`` CLIP language-pretrained by ``muva pretrain-clip`` (made first when missing), the
``evidence`` synthetic set (as many training identities as the default, twice the test
identities), 3 seeds, short stage 2 (4 epochs single-source, 2 multi-source); ``regime`` is the study in issue
18's regime (Re-ID sized sources, trained to the end from the mini CLIP of the wide pretraining; ~40 min a run,
so fewer variants and protocols; ``reports/evidence-regime.md``). ``jobs`` runs
that many trainings at once, each with ``cpu_count // jobs`` threads (2 x 1 thread is about
1.2x faster than 1 x 2 threads on 2 cores; float sums then differ in the last bits from a
2-thread run).

Across machines the study is shared like a sweep (:func:`muva_core.experiments.sweep.train_runs`): through the run
folders' locks, or by ``shard=(i, n)``; the page is written by the process that finds every run done, or by
``collect=True``, which trains nothing and fails naming the runs missing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..paths import RunFiles, portable, resolve
from ..report.evidence import CLAIMS, evaluate_claims, read_notes, write_evidence
from .sweep import VARIANTS, all_done, pending_runs, run_sweep, sweep_dir, train_runs, variant_config

TABLES = (5, 6, 8, 9)
PROTOCOLS = ("synth:A2B", "synth:C2D", "synth:B+C+D->A")
RECIPE_TABLES: dict[str, tuple[int, ...]] = {"workbook": TABLES, "reference": (6, 9)}
"""Per training recipe (``recipe:``), the tables the study runs under it: every table under the project's own
recipe; language (6) and calibration (9), with the full model they share, under the authors' (issue 11)."""

SCALES: dict[str, dict] = {
    "small": {
        "seeds": (0, 1),
        "overrides": {"synth_scale": "small", "synth_root": "data/synthetic-small", "backbone": "tiny",
                      "pretrained": "none", "stage1_epochs": 2, "stage1_warmup_epochs": 1, "stage2_epochs": 2,
                      "warmup_epochs": 0, "lr_milestones": [2], "batch_size": 16, "num_workers": 0},
    },
    "full": {
        "seeds": (0, 1, 2),
        # pretrained: pretrain-clip = the language-pretrained CLIP (muva pretrain-clip --out data/clip --backbone
        # small --seed 0), made before the runs when missing (muva_core.pretrain.provision.ensure_pretrained_clip);
        # short stage 2 (4 epochs, no warm-up, lr / 10 for the last) to fit 81 runs into ~2 h on 2 cores
        "overrides": {"synth_scale": "evidence", "synth_root": "data/synthetic-evidence", "backbone": "small",
                      "pretrained": "pretrain-clip", "stage2_lr": 2.0e-4, "stage2_epochs": 4, "warmup_epochs": 0,
                      "lr_milestones": [3]},
        # three sources = three times the images per epoch: 2 epochs (1.5x the single-source steps)
        "multi_source": {"stage2_epochs": 2, "lr_milestones": [2]},
    },
    "regime": {
        # issue 18: Re-ID sized sources (702 training identities per domain), models trained to the end (training-ID
        # accuracy >= 0.9 at the last epoch: 28 epochs, the learning-rate drop at 24, chosen on held-out A), the mini
        # CLIP at 192x96 language-pretrained on 4x the people with the Re-ID photometric jitter, every batch at one
        # granularity with soft positives (docs/pretraining.md, clip5: chosen over clip2 and clip6 on held-out
        # pretraining people and held-out A; 2026-12-06, session 11, after 11 runs from clip2). About 35-40 min a run
        # on one core: the variants are cut to the pairs the claims judge (Table 5: the full model against the
        # global token alone), the protocols to the two single-source ones.
        "seeds": (0, 1, 2),
        "protocols": ("synth:A2B", "synth:C2D"),
        # made on one thread, so that every machine of the same CPU kind makes the same weights; ``weights_sha256``:
        # the build (:func:`muva_core.model.checkpoints.weights_sha256`) the study's runs start from since
        # 2026-12-06 (session 14: an AMD EPYC with AVX-512 and native bfloat16, torch 2.14.1; the first build, of
        # the 15 runs before, was made on an AVX2 machine and differs in its last bits: docs/evidence.md)
        "clip": {"folder": "clip-wide-one", "backbone": "mini", "image_size": (192, 96), "epochs": 16,
                 "scale": "pretrain-wide", "color_jitter": True, "loss": "multi_positive", "batch_granularity": "one",
                 "seed": 0, "threads": 1,
                 "weights_sha256": "61cd3bbc877732e8baa9412a5e3182761d915a0b5458b66d14471843d58ab3b3"},
        "overrides": {"synth_scale": "reid", "synth_root": "data/synthetic-reid", "backbone": "mini", "height": 192,
                      "width": 96, "pretrained": "none", "stage2_lr": 3.0e-4, "stage2_epochs": 28,
                      "lr_milestones": [24], "memory_rebuild": "train_pass", "num_workers": 0},
        "multi_source": {"stage2_epochs": 10, "lr_milestones": [8]},
        "variants": {5: ("G", "G+H+U+L")},
    },
}
"""Per scale: seeds, config overrides (all protocols) and ``multi_source`` overrides on top for protocols with
several sources. ``pretrained: pretrain-clip`` starts from the language-pretrained CLIP (unless the user sets
``checkpoint_path``; ``-p pretrained=none`` = random weights). Optional: ``protocols`` (the default protocols of
the scale, else :data:`PROTOCOLS`), ``clip`` (the runs start from the CLIP ``muva pretrain-clip`` makes with these
settings under ``<data_root>/<folder>``, made first when missing: :func:`scale_clip`) and ``variants`` (per table,
the variants trained, when fewer than every one a claim compares)."""


def claim_variants(table: int, scale: str | None = None) -> list[str]:
    """The variants of ``table`` that some claim compares, in the table's order (at ``scale``: those its
    ``variants`` keeps)."""
    names = {v for c in CLAIMS if c.table == table for v in (c.better, c.worse)}
    kept = SCALES[scale].get("variants", {}).get(table) if scale else None
    return [v for v in VARIANTS[table] if v in names and (kept is None or v in kept)]


def evidence_sweep_dir(cfg, table: int, scale: str) -> Path:
    """Where the study at ``scale`` writes a protocol's table: the sweep's own folder (:func:`sweep_dir`) for
    ``full``, ``<that>-<scale>`` for the other scales, so no scale overwrites another's tables."""
    folder = sweep_dir(cfg, table)
    return folder if scale == "full" else folder.with_name(f"{folder.name}-{scale}")


def scale_protocols(scale: str) -> tuple[str, ...]:
    """The protocols ``muva evidence --scale <scale>`` runs when none is given."""
    return tuple(SCALES[scale].get("protocols", PROTOCOLS))


def scale_clip(scale: str, data_root: str | Path) -> dict | None:
    """The :func:`~muva_core.pretrain.loop.pretrain_clip` arguments of the CLIP the runs of ``scale`` start from
    (``out_dir`` under ``data_root``), None when the scale names none (it uses ``pretrained:``)."""
    spec = SCALES[scale].get("clip")
    if spec is None:
        return None
    args = {k: v for k, v in spec.items() if k not in ("folder", "weights_sha256")}
    return {"out_dir": resolve(data_root) / spec["folder"], **args}


def clip_build_note(scale: str, path: str | Path) -> str | None:
    """A note when the CLIP file at ``path`` is not the build the study at ``scale`` names (its ``clip``'s
    ``weights_sha256``): runs from it start from other weights under the same name (the page counts the runs per
    build)."""
    from ..model.checkpoints import weights_sha256

    expected = (SCALES[scale].get("clip") or {}).get("weights_sha256")
    if not expected or not Path(path).is_file():
        return None
    digest = weights_sha256(path)
    if digest == expected:
        return None
    return (f"note: {portable(path)} is another build of the study's CLIP (weights SHA-256 {digest[:12]}, the "
            f"study's runs since 2026-12-06 start from {expected[:12]}): its runs start from other weights of the "
            "same settings (made on another number of threads or another kind of CPU); the evidence page counts the "
            "runs per build")


def clip_command(spec: dict, reid_root: str | Path | None = None) -> str:
    """``muva pretrain-clip ...``: the command that makes the CLIP of :func:`scale_clip`'s arguments (its report
    with the zero-shot accuracy on the Re-ID domains under ``reid_root``, as the study's runs make it)."""
    import dataclasses

    from ..pretrain.config import PretrainConfig

    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    late = PretrainConfig(**{k: v for k, v in spec.items() if k in fields}).changed_late_options()
    flags = {"color_jitter": lambda v: " --color-jitter" + ("" if late.get("jitter_ranges") is None
                                                             else f" {late['jitter_ranges']}"),
             "jitter_ranges": lambda v: "",     # written with --color-jitter
             "loss": lambda v: f" --loss {v}",
             "hard_negatives": lambda v: f" --hard-negatives {v}",
             "batch_granularity": lambda v: f" --batch-granularity {v}"}
    h, w = spec["image_size"]
    options = [flags[name](value) for name, value in late.items()]
    options += [f" --seed {spec['seed']}" if spec["seed"] else "",
                f" --reid-root {portable(reid_root)}" if reid_root else "",
                f" --threads {spec['threads']}" if spec.get("threads") else ""]
    return (f"muva pretrain-clip --out {portable(spec['out_dir'])} --backbone {spec['backbone']} --image-size {h}x{w} "
            f"--epochs {spec['epochs']} --scale {spec['scale']}" + "".join(options))


def scale_overrides(scale: str, protocol: str, base: dict, progress: bool = True) -> dict:
    """The config overrides of one protocol at ``scale``, the user's (``base``) last."""
    from ..data.protocols import get_protocol

    if scale not in SCALES:
        raise ValueError(f"--scale: expected one of {sorted(SCALES)}, got {scale!r}")
    spec = SCALES[scale]
    out = dict(spec["overrides"])
    if get_protocol(protocol).kind == "multi":
        out.update(spec.get("multi_source", {}))
    return {**out, **base}


def protocol_configs(base_cfg: dict, scale: str, protocols: Sequence[str], progress: bool = True,
                     recipe: str | None = None, make_clip: bool = True) -> dict:
    """Each protocol's resolved configuration at ``scale`` (under ``recipe`` when given; the user's overrides
    last); the pretrained CLIP a configuration starts from is made here (with ``make_clip``), once, before any
    run, by one process at a time (:func:`muva_core.pretrain.provision.ensure_pretrained_clip`)."""
    from ..locks import shared_data
    from ..config import resolve_config
    from ..pretrain.files import checkpoint_file
    from ..pretrain.loop import pretrain_clip
    from ..pretrain.provision import ensure_pretrained_clip

    extra = {"recipe": recipe} if recipe else {}
    configs = {p: resolve_config(p, overrides={**extra, **scale_overrides(scale, p, base_cfg, progress)})
               for p in protocols}
    for p, cfg in configs.items():
        spec = scale_clip(scale, cfg.data.data_root)
        if spec is None or "checkpoint_path" in base_cfg or "pretrained" in base_cfg:   # the user's start wins
            continue
        path = checkpoint_file(spec["out_dir"], spec["backbone"], spec["seed"], spec["image_size"])
        configs[p] = cfg.update({"checkpoint_path": str(path), "pretrained": "none"}, source=f"--scale {scale}")
        if make_clip:
            with shared_data(cfg):
                pretrain_clip(progress=progress, reid_root=resolve(cfg.data.synth_root), **spec)
            note = clip_build_note(scale, path)
            if note:
                print(note, file=sys.stderr, flush=True)
    for cfg in configs.values() if make_clip else ():
        with shared_data(cfg):
            ensure_pretrained_clip(cfg, progress=progress)
    return configs


def plan_runs(configs: dict, tables: Sequence[int], seeds: Sequence[int], scale: str | None = None) -> list:
    """Every distinct run configuration of the study (a run shared by several tables appears once; at ``scale``,
    the variants it keeps)."""
    plan: dict[str, object] = {}
    for cfg in configs.values():
        for seed in seeds:  # seed-major: an interrupted study has whole seeds of a protocol done
            for table in tables:
                for variant in claim_variants(table, scale):
                    run = variant_config(cfg, table, variant, seed)
                    plan.setdefault(run.run_dir, run)
    return list(plan.values())


def run_evidence(base_cfg, scale: str = "full", protocols: Sequence[str] | None = None,
                 tables: Sequence[int] | None = None, seeds: Sequence[int] | None = None, out: str | Path | None = None,
                 progress: bool = True, jobs: int = 1, recipes: Sequence[str] = tuple(RECIPE_TABLES),
                 shard: tuple[int, int] | None = None, wait: bool = False, collect: bool = False) -> Path | None:
    """Run every (recipe, protocol, table) sweep and write the evidence page; returns its path. ``tables``
    (default: :data:`RECIPE_TABLES` per recipe) limits the tables of every recipe. ``jobs``, ``shard`` and
    ``wait`` as in :func:`~muva_core.experiments.sweep.train_runs`; None when runs of other processes are not done
    yet (they are listed). ``collect``: train nothing; :class:`~muva_core.experiments.sweep.RunsIncomplete` names the
    runs missing."""
    if scale not in SCALES:
        raise ValueError(f"--scale: expected one of {sorted(SCALES)}, got {scale!r}")
    unknown = [r for r in recipes if r not in RECIPE_TABLES]
    if unknown:
        raise ValueError(f"--recipe: expected one of {', '.join(RECIPE_TABLES)}, got {unknown}")
    seeds = tuple(seeds or SCALES[scale]["seeds"])
    protocols = tuple(protocols or scale_protocols(scale))
    plans = {}
    for recipe in recipes:
        chosen = tuple(t for t in RECIPE_TABLES[recipe] if tables is None or t in tables)
        if chosen:
            plans[recipe] = (protocol_configs(base_cfg, scale, protocols, progress, recipe=recipe,
                                              make_clip=not collect), chosen)
    runs = {r.run_dir: r for configs, chosen in plans.values() for r in plan_runs(configs, chosen, seeds, scale)}
    if not collect:
        train_runs(list(runs.values()), jobs=jobs, shard=shard, wait=wait, progress=progress, what="evidence")
    missing = pending_runs((f"{r.data.protocol}, recipe {r.recipe}, seed {r.seed}", r) for r in runs.values())
    if not all_done(missing, len(runs), "evidence", "the page", collect):
        return None
    frames = []
    for recipe, (configs, chosen) in plans.items():
        for cfg in configs.values():
            for table in chosen:
                folder = evidence_sweep_dir(cfg, table, scale)
                run_sweep(cfg, table, seeds=seeds, variants=claim_variants(table, scale), progress=progress,
                          collect=True, out=folder, command=f"muva evidence --scale {scale} --protocol "
                          f"'{cfg.data.protocol}' --recipe {recipe} --seeds {','.join(map(str, seeds))}")
                per_run = pd.read_csv(folder / f"table{table}-runs.csv")
                per_run.insert(0, "protocol", cfg.data.protocol)
                per_run.insert(0, "recipe", recipe)
                per_run.insert(0, "table", table)
                frames.append(per_run)
    runs = pd.concat(frames, ignore_index=True)
    claims = evaluate_claims(runs)
    first = next(iter(plans.values()))[0]
    first_cfg = next(iter(first.values()))
    reports_dir = resolve(first_cfg.reports_dir)
    out = Path(out) if out else reports_dir / ("evidence.md" if scale == "full" else f"evidence-{scale}.md")
    clip = None if {"checkpoint_path", "pretrained"} & set(base_cfg) else scale_clip(scale, first_cfg.data.data_root)
    write_evidence(out, claims, runs, scale, seeds, protocols, settings=SCALES[scale],
                   recipes={r: RECIPE_TABLES[r] for r in plans}, diagnostics=diagnostics(first, runs),
                   notes=read_notes(out), clip=clip_command(clip, first_cfg.data.synth_root) if clip else None,
                   user=base_cfg)
    return out


def diagnostics(configs: dict, runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The diagnostic tables of the evidence page, by section title."""
    from ..data.protocols import load_protocol

    data = {p: load_protocol(cfg, progress=False) for p, cfg in configs.items()}
    labels = pd.concat([pseudo_label_quality(cfg, data[p]) for p, cfg in configs.items()], ignore_index=True)
    if len(labels):
        labels = labels.drop(columns="protocol").drop_duplicates(["source", "pseudo labels", "part"])
        labels = labels.round(3).reset_index(drop=True)
    stripes = pd.DataFrame({cfg.data.protocol: stripe_quality(cfg, data[p]) for p, cfg in configs.items()}).T.round(3)
    from ..model.checkpoints import start_file

    checkpoints = {start_file(cfg) for cfg in configs.values()}
    floors = pd.DataFrame([{"protocol": cfg.data.protocol, "baseline": name, **m}
                           for p, cfg in configs.items() for name, m in target_baselines(cfg, data[p]).items()])
    return {
        "Models that learned nothing on the same targets (random features; colour histograms)": floors,
        "Pseudo labels on the source training images against the true part boxes (Table 9 trains with these)":
            labels,
        "Predicted part masks on the target against the true part boxes, per variant (mean over seeds)":
            part_mask_iou(runs),
        "Fixed stripes (Table 8 'stripe-like') on the target against the true part boxes": stripes,
        "The CLIP the runs start from: zero-shot attribute retrieval, mean balanced accuracy (Table 6 needs "
        "language knowledge)": clip_zero_shot(next(iter(checkpoints)) if len(checkpoints) == 1 else None),
    }


# diagnostics: what the variants train with and how good it is, to read a failing claim against

def pseudo_label_quality(cfg, data) -> pd.DataFrame:
    """Per source domain, pseudo labels (raw / calibrated) and part: IoU against the true part boxes of the
    boxes (box IoU) and of the patch masks voted from them (patch IoU), on the source training images: what
    Table 9's two variants train with. Rows only for pseudo labels already made and domains with truth."""
    import copy

    import torch

    from ..data.samples import PARTS
    from ..eval.masks import mask_iou
    from ..grounding.voting import truth_patch_masks
    from ..grounding.calibration import iou_against_truth
    from ..grounding.simulated import dataset_truth
    from ..grounding.steps import grounding_paths
    from ..grounding.voting import load_masks
    from ..data.protocols import source_datasets

    rows = []
    for ds in source_datasets(data):
        truth = dataset_truth(ds)
        if truth is None:
            continue
        for calibrate in (False, True):
            run = copy.deepcopy(cfg).update({"calibrate": calibrate})
            paths = grounding_paths(run, ds.name)
            if not (paths.masks.is_file() and paths.calibrated.is_file()):
                continue
            box = iou_against_truth(pd.read_parquet(paths.calibrated), truth,
                                    columns="calibrated" if calibrate else "raw")
            store = load_masks(paths.masks)
            keys = [s.key for s in ds.train if s.key in store]
            target = truth_patch_masks(truth, keys, (run.data.height, run.data.width), run.grounding.patch_size)
            patch = mask_iou(torch.as_tensor(store.stack(keys)).float(), torch.as_tensor(target))
            for j, part in enumerate(PARTS):
                rows.append({"protocol": cfg.data.protocol, "source": ds.name,
                             "pseudo labels": "calibrated" if calibrate else "raw", "part": part,
                             "box IoU": float(box[part]), "patch IoU": float(patch[j])})
    return pd.DataFrame(rows)


def stripe_quality(cfg, data) -> dict[str, float]:
    """IoU of Table 8's fixed stripes against the true part masks of the target's test images, per part
    (empty when the target has no truth)."""
    import torch

    from ..data.samples import PARTS
    from ..eval.masks import mask_iou
    from ..grounding.voting import truth_patch_masks
    from ..grounding.simulated import dataset_truth
    from ..model.ammsa import stripe_part_masks

    truth = dataset_truth(data.datasets.get(data.protocol.target))
    if truth is None:
        return {}
    keys = [s.key for s in (*data.query, *data.gallery)]
    size, patch = (cfg.data.height, cfg.data.width), cfg.grounding.patch_size
    truth = torch.as_tensor(truth_patch_masks(truth, keys, size, patch))
    stripes = stripe_part_masks((size[0] // patch, size[1] // patch), PARTS).float()
    iou = mask_iou(stripes.unsqueeze(0).expand(len(keys), -1, -1), truth)
    return {part: float(v) for part, v in zip(PARTS, iou)}


def target_baselines(cfg, data) -> dict[str, dict[str, float]]:
    """mAP and Rank-1 on the target of models that learned nothing (random features, mean of 20 draws) and of
    the training-free colour histograms: the floor the variants are read against."""
    from ..eval.baselines import chance_level, evaluate_baselines

    out = {"random features": chance_level(data.query, data.gallery, cfg)}
    out.update(evaluate_baselines(data.query, data.gallery, cfg, progress=False))
    return {name: {"mAP": round(m["mAP"], 2), "Rank-1": round(m["Rank-1"], 2)} for name, m in out.items()}


def part_mask_iou(runs: pd.DataFrame) -> pd.DataFrame:
    """Predicted-mask IoU against the true part boxes on the target per part, mean over seeds, read from
    each run's ``metrics/train.json`` (``run`` column)."""
    rows = []
    for rec in runs.itertuples(index=False):
        path = RunFiles(resolve(rec.run)).record_path("train")
        iou = json.loads(path.read_text()).get("mask_iou_truth", {}) if path.is_file() else {}
        rows.append({"recipe": getattr(rec, "recipe", "workbook"), "protocol": rec.protocol, "table": rec.table,
                     "variant": rec.variant, **iou})
    frame = pd.DataFrame(rows)
    parts = [c for c in ("head", "upper", "legs") if c in frame.columns]
    if not parts:
        return pd.DataFrame()
    return (frame.groupby(["recipe", "protocol", "table", "variant"], sort=False)[parts].mean().round(3)
            .reset_index())


def clip_zero_shot(checkpoint: str | Path | None) -> pd.DataFrame:
    """Mean zero-shot attribute retrieval (balanced accuracy) of the CLIP the runs start from, before and
    after language pretraining, from the checkpoint's report (empty without one)."""
    if not checkpoint:
        return pd.DataFrame()
    from ..pretrain.files import report_file

    path = report_file(checkpoint)
    if not path.is_file():
        return pd.DataFrame()
    zs = json.loads(path.read_text()).get("zero_shot", {})
    return pd.DataFrame({run: {mode: v["balanced_accuracy"] for mode, v in zs[run]["mean"].items()}
                         for run in zs}).T.round(3)


