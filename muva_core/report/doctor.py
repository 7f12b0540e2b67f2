"""``muva doctor``: everything that decides whether a run can reproduce the paper's numbers, in one report.

Sections (the keys of :func:`doctor_report`, and of ``muva doctor --json``):

``environment``      Python, torch, CUDA, cuDNN, the GPUs and their memory, open_clip and transformers,
                     float16 / bfloat16 support, and the precision training will use (muva_core/precision.py)
``datasets``         per dataset of the protocol: found or not (every folder tried), the layout version
                     (MSMT17 V1 / V2 / a market-style conversion; CUHK03-NP detected / labeled), and per split
                     the images and identities beside the published numbers (:data:`PUBLISHED`)
``masks``            per source: the share of training images with part masks, and where they come from
``checkpoint``       the CLIP weights: found, recognised (OpenAI's TorchScript archive or a state dict of
                     the backbone's shapes), to be downloaded, or missing
``config_vs_paper``  the recipe, every key that differs from the paper's section 4.2, the batch and learning
                     rates against the number of processes (torchrun) with the linear-scaling rule
``estimate``         measured here: a few stage-1 and stage-2 steps at the configuration's batch (random
                     inputs, the run's precision) -> seconds per step, peak memory, the whole run extrapolated

:func:`short_report` is the few lines ``muva run`` prints before it starts a paper protocol.
"""
from __future__ import annotations

import copy
import importlib.metadata
import math
import os
import platform
from pathlib import Path

import torch

from ..config import RunConfig
from ..data.protocols import get_protocol
from ..paths import resolve

PUBLISHED: dict[str, dict[str, tuple[int, int]]] = {
    # Zheng et al. ICCV 2015; query/gallery ids: 750 test identities (+ the 0000 distractors in the gallery)
    "market1501": {"train": (12936, 751), "query": (3368, 750), "gallery": (15913, 751)},
    # Zheng et al. ICCV 2017 (gallery: 702 test identities + 408 distractor identities)
    "dukemtmcreid": {"train": (16522, 702), "query": (2228, 702), "gallery": (17661, 1110)},
    # Wei et al. CVPR 2018; train = list_train + list_val (the authors' engine/datasets/msmt17.py)
    "msmt17": {"train": (32621, 1041), "query": (11659, 3060), "gallery": (82161, 3060)},
    # Zhong et al. CVPR 2017, the new protocol (767 / 700 split)
    "cuhk03_np": {"train": (7365, 767), "query": (1400, 700), "gallery": (5332, 700)},
    "cuhk03_np_labeled": {"train": (7368, 767), "query": (1400, 700), "gallery": (5328, 700)},
}
"""Published (images, identities) per split of the real datasets, junk images dropped."""

MSMT17_TRAIN_ONLY = 30248
"""MSMT17 images of list_train.txt alone (torchreid's train split without ``combineall``)."""

PAPER_SETTINGS: dict[str, object] = {
    "backbone": "vit-b-16", "height": 256, "width": 128, "augment": "flip", "n_ctx": 4, "local_pos_embed": "cls",
    "backend": "cogvlm", "mask_threshold": 0.5, "granularity": "G+H+U+L", "mask_mode": "predicted",
    "stage1_lr": 3.5e-4, "stage1_epochs": 120, "stage2_lr": 5e-6, "stage2_epochs": 60, "rmp_lr_scale": 10.0,
    "memory_momentum": 0.2, "imp_temperature": 0.01, "weight_decay": 1e-4, "batch_size": 64, "num_instances": 4,
}
"""The settings section 4.2 of the paper states (``rmp_heads``: 8 when MSMT17 or several datasets are the
sources, else 2; pretrained weights: OpenAI's CLIP; one RTX A6000)."""

PAPER_BATCH = 64
COGVLM_SECONDS_PER_IMAGE = 7.2
"""The paper's grounding time per image with CogVLM (section 4.5)."""


# ---- environment --------------------------------------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(cfg: RunConfig) -> dict:
    """Versions, devices, half-precision support and the precision a training step will use."""
    from ..eval.features import resolve_device
    from ..precision import cpu_capabilities, precision_plan

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_GB": round(props.total_memory / 2**30, 1),
                         "bfloat16": bool(torch.cuda.is_bf16_supported()), "float16": True})
    device = resolve_device(cfg.device)
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": gpus, "open_clip": _version("open_clip_torch"), "transformers": _version("transformers"),
        "cpu": {"machine": platform.machine(), "cores": os.cpu_count(), **cpu_capabilities()},
        "device": str(device), "precision": precision_plan(device, cfg).note,
    }


# ---- datasets -----------------------------------------------------------------------------------------
def _layout(ds) -> tuple[str, list[str]]:
    """(layout version, notes) of a parsed dataset."""
    from ..data.datasets import MSMT17, CUHK03NP

    notes: list[str] = []
    if isinstance(ds, MSMT17):
        if ds.layout == "market":
            notes.append("a market-style conversion: the authors' own loader reads this layout (engine/datasets/"
                         "dataloader.py maps 'msmt17' to msmt17_v2.py), and their released MSMT17 masks are keyed by "
                         "its file names")
            return "market-style conversion (bounding_box_train/, query/, bounding_box_test/)", notes
        version = "V2" if (ds.dataset_dir / "mask_train_v2").is_dir() and not (ds.dataset_dir / "train").is_dir() \
            else "V1"
        train_only = _list_lines(ds.dataset_dir / "list_train.txt")
        notes.append(f"train = list_train.txt + list_val.txt = {len(ds.train)} images (as the authors' "
                     f"engine/datasets/msmt17.py and this workbook read it); torchreid without combineall uses "
                     f"list_train.txt alone: {train_only} images (published: {MSMT17_TRAIN_ONLY})")
        folders = "train/, test/" if version == "V1" else "mask_train_v2/, mask_test_v2/"
        return version, [f"MSMT17_{version} layout ({folders} + list files)", *notes]
    if isinstance(ds, CUHK03NP):
        subsets = [s for s in ("detected", "labeled") if (ds.dataset_dir / s / "bounding_box_train").is_dir()]
        notes.append(f"subsets present: {', '.join(subsets) or 'none'}; this dataset name reads {ds.subdir} "
                     f"(the paper's C3 is detected)")
        return ds.subdir, notes
    return "Market-1501 layout (bounding_box_train/, query/, bounding_box_test/)", notes


def _list_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def dataset_report(name: str, root: Path, role: str, parsed=None) -> dict:
    """One dataset: found (every folder tried), layout version, per split counts against :data:`PUBLISHED`."""
    return _inspect_dataset(name, root, role, parsed)[0]


def _inspect_dataset(name: str, root: Path, role: str, parsed=None) -> tuple[dict, object]:
    """(:func:`dataset_report`, the parsed dataset or None)."""
    from ..data.datasets import DatasetError, get_dataset_class, load_dataset

    out: dict = {"role": role, "root": str(root), "found": False}
    tried = get_dataset_class(name).folders_tried(root)
    if tried:
        out["tried"] = [t.strip() for t in tried]
        return out, None
    try:
        ds = parsed if parsed is not None else load_dataset(name, root)
    except DatasetError as err:
        out.update(found=True, error=str(err))
        return out, None
    version, notes = _layout(ds)
    out.update(found=True, dir=str(ds.dataset_dir), version=version, notes=notes, splits={})
    published = PUBLISHED.get(name)
    for split, counts in ds.stats().items():
        row = {"images": counts["images"], "ids": counts["ids"]}
        if published:
            pi, pid = published[split]
            row.update(published_images=pi, published_ids=pid, match=(counts["images"], counts["ids"]) == (pi, pid))
        out["splits"][split] = row
    out["match"] = all(r.get("match", False) for r in out["splits"].values()) if published else None
    return out, ds


# ---- masks --------------------------------------------------------------------------------------------
def masks_report(cfg: RunConfig, datasets: dict) -> dict:
    """Per source dataset: the share of training images with a part mask, and where the masks come from."""
    from ..grounding.steps import grounding_paths
    from ..grounding.voting import load_masks

    out: dict = {}
    store = None
    if cfg.grounding.masks_file:
        path = resolve(cfg.grounding.masks_file)
        if path.is_file():
            store = load_masks(path)
    for name, ds in datasets.items():
        if ds is None:
            out[name] = {"coverage": None, "source": "dataset not found"}
            continue
        if cfg.grounding.masks_file:
            path = resolve(cfg.grounding.masks_file)
            if store is None:
                out[name] = {"coverage": 0.0, "source": f"masks_file {path} does not exist"}
                continue
            meta = store.meta
            source = (f"the authors' file {meta['authors_file']} (muva import-masks)" if meta.get("authors_file")
                      else f"masks_file {path}")
            have = sum(1 for s in ds.train if s.key in store)
        else:
            path = grounding_paths(cfg, name).masks
            if not path.is_file():
                n = len(ds.train)
                note = f"not made yet: the run grounds {n} training images with {cfg.grounding.backend} first"
                if cfg.grounding.backend == "cogvlm":
                    note += (f" (~{COGVLM_SECONDS_PER_IMAGE} s an image in the paper: ~"
                             f"{n * COGVLM_SECONDS_PER_IMAGE / 3600:.1f} GPU-hours; the authors' masks: muva import-masks)")
                out[name] = {"coverage": 0.0, "source": note}
                continue
            store_ds = load_masks(path)
            source = f"a grounding run ({cfg.grounding.backend}, {path})"
            have = sum(1 for s in ds.train if s.key in store_ds)
        out[name] = {"coverage": have / max(1, len(ds.train)), "with_mask": have, "train_images": len(ds.train),
                     "source": source}
    return out


# ---- checkpoint ---------------------------------------------------------------------------------------
def checkpoint_report(cfg: RunConfig) -> dict:
    """The CLIP weights the run starts from: recognised, to be downloaded, random, or missing."""
    m = cfg.model
    if m.checkpoint_path:
        from ..model.backbone import BackboneConfig, build_architecture, is_torchscript_archive, read_clip_state_dict

        path = resolve(m.checkpoint_path)
        if not path.is_file():
            return {"status": "missing", "path": str(path), "note": "checkpoint_path names no file"}
        kind = "OpenAI's TorchScript archive" if is_torchscript_archive(path) else "a state dict"
        try:
            state = read_clip_state_dict(path)
        except RuntimeError as err:
            return {"status": "not recognised", "path": str(path), "note": str(err)}
        arch = build_architecture(BackboneConfig(name=m.backbone, pretrained=None,
                                                  image_size=(cfg.data.height, cfg.data.width))).state_dict()
        missing = [k for k in arch if k not in state]
        unexpected = [k for k in state if k not in arch]
        shapes = [k for k in arch if k in state and k != "visual.positional_embedding"
                  and tuple(state[k].shape) != tuple(arch[k].shape)]
        if missing or unexpected or shapes:
            return {"status": "not recognised", "path": str(path), "kind": kind,
                    "note": f"not the {m.backbone} CLIP: {len(missing)} keys missing (e.g. {missing[:2]}), "
                            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(shapes)} of other shapes "
                            f"(e.g. {shapes[:2]})"}
        return {"status": "recognised", "path": str(path), "kind": kind,
                "note": f"{kind} of the {m.backbone} CLIP ({len(state)} tensors, {path.stat().st_size / 2**20:.0f} MiB)"}
    tag = {"auto": "openai" if m.backbone == "vit-b-16" else "none"}.get(m.pretrained, m.pretrained)
    if tag in ("none", ""):
        return {"status": "random", "note": f"random {m.backbone} weights (the paper starts from OpenAI's CLIP)"}
    if tag == "pretrain-clip":
        from ..model.checkpoints import config_clip_path

        path = config_clip_path(cfg)
        return {"status": "recognised" if path.is_file() else "missing", "path": str(path),
                "note": "the language-pretrained CLIP of muva pretrain-clip" + ("" if path.is_file() else
                                                                                 " (made before the run)")}
    return {"status": "download", "tag": tag,
            "note": f"open_clip downloads ViT-B-16/{tag} on first use (internet needed); without internet pass "
                    "checkpoint_path=<OpenAI's ViT-B-16.pt or a state dict>"}


# ---- configuration against the paper ------------------------------------------------------------------
def config_vs_paper(cfg: RunConfig) -> dict:
    """The recipe, every key that differs from section 4.2, and the batch / learning rates against the GPU count."""
    proto = get_protocol(cfg.data.protocol)
    flat = cfg.to_flat()
    paper = dict(PAPER_SETTINGS, rmp_heads=8 if ("msmt17" in proto.sources or len(proto.sources) > 1) else 2)
    differs = []
    for key, value in paper.items():
        mine = flat[key]
        same = math.isclose(mine, value) if isinstance(value, float) else mine == value
        if not same:
            note = ""
            if key == "backend" and cfg.grounding.masks_file:
                note = "masks_file is set: the authors' released masks are used, no grounding runs"
            differs.append({"key": key, "value": mine, "paper": value, **({"note": note} if note else {})})
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    per_rank = cfg.data.batch_size / world
    notes = []
    if world > 1:
        notes.append(f"{world} processes (torchrun): each takes batch_size / {world} = {per_rank:g} images a step, so "
                     f"the global batch stays {cfg.data.batch_size} and the learning rates apply as they are")
        if per_rank % cfg.data.num_instances:
            notes.append(f"batch_size / {world} = {per_rank:g} is not a multiple of num_instances "
                         f"({cfg.data.num_instances}): the per-process P x K batch cannot be formed")
    if cfg.data.batch_size != PAPER_BATCH:
        f = cfg.data.batch_size / PAPER_BATCH
        notes.append(f"batch_size {cfg.data.batch_size} is not the paper's {PAPER_BATCH} (one RTX A6000): by the linear "
                     f"scaling rule (Goyal et al. 2017) the learning rates would be stage1_lr {3.5e-4 * f:.3g} and "
                     f"stage2_lr {5e-6 * f:.3g} (here {cfg.train.stage1_lr:g} and {cfg.train.stage2_lr:g})")
    else:
        notes.append(f"batch {PAPER_BATCH} = 16 identities x 4 images, the paper's single-GPU setting"
                     + (f", over {world} processes" if world > 1 else ""))
    return {"recipe": cfg.recipe, "differs": differs, "processes": world, "batch_size": cfg.data.batch_size,
            "stage1_lr": cfg.train.stage1_lr, "stage2_lr": cfg.train.stage2_lr, "notes": notes}


# ---- measured estimate --------------------------------------------------------------------------------
def estimate(cfg: RunConfig, counts: dict, steps: int = 3) -> dict:
    """Time ``steps`` stage-1 and stage-2 steps and ``steps`` inference batches at the configuration's batch (random
    weights and inputs, the run's precision) on its device, and extrapolate the whole run from ``counts``
    (``train``, ``ids``, ``test`` images)."""
    from ..eval.features import resolve_device
    from .cost import median_ms, peak_memory, training_steps

    device = resolve_device(cfg.device)
    timing = copy.deepcopy(cfg)
    timing.model.pretrained, timing.model.checkpoint_path = "none", ""   # weights do not change the time
    b, k = cfg.data.batch_size, cfg.data.num_instances
    t = cfg.train
    stage1_ids = b // k if t.stage1_sampling == "images" else t.stage1_batch_ids
    fns = training_steps(timing, device, b, max(1, counts["ids"]), stage1_ids=stage1_ids)
    out: dict = {"device": str(device), "batch_size": b, "steps": steps, "precision": fns["precision"],
                 "note": "model compute on random inputs; data loading and grounding not included"}
    for key, fn in (("inference_batch", fns["infer"]), ("stage1_step", fns["step1"]), ("stage2_step", fns["step2"])):
        if fn is None:
            continue
        mem: dict = {}
        with peak_memory(device, mem):
            out[f"{key}_seconds"] = median_ms(fn, device, steps, warmup=0) / 1000
        out[f"{key}_peak_GB"] = round(mem["GB"], 2)
    n, ids = counts["train"], counts["ids"]
    batches = math.ceil(n / b)
    steps1 = batches if t.stage1_sampling == "images" else math.ceil(ids / t.stage1_batch_ids)
    fwd = out["inference_batch_seconds"]
    s1 = (t.stage1_epochs * steps1 * out.get("stage1_step_seconds", 0.0) + batches * fwd) if "stage1_step_seconds" in out \
        else 0.0
    s2 = t.stage2_epochs * (max(1, n // b) * out["stage2_step_seconds"] + batches * fwd)
    ev = math.ceil(counts["test"] / b) * fwd
    out.update(stage1_hours=s1 / 3600, stage2_hours=s2 / 3600, evaluation_hours=ev / 3600,
               total_hours=(s1 + s2 + ev) / 3600, counts=counts)
    return out


# ---- the whole report ---------------------------------------------------------------------------------
def _protocol_datasets(cfg: RunConfig, data=None) -> tuple[dict, dict]:
    """({name: report}, {name: parsed dataset or None}) for the protocol's sources and target."""
    proto = get_protocol(cfg.data.protocol)
    root = resolve(cfg.data.synth_root) if proto.synthetic else resolve(cfg.data.data_root)
    reports, parsed = {}, {}
    for name in dict.fromkeys((*proto.sources, proto.target)):
        role = "source" if name in proto.sources else "target"
        if name == proto.target and name in proto.sources:
            role = "source and target"
        given = data.datasets.get(name) if data is not None else None
        reports[name], parsed[name] = _inspect_dataset(name, root, role, parsed=given)
    return reports, parsed


def doctor_report(cfg: RunConfig, run_estimate: bool = True, steps: int = 3, data=None) -> dict:
    """The whole report as one dict (``muva doctor --json``)."""
    proto = get_protocol(cfg.data.protocol)
    datasets, parsed = _protocol_datasets(cfg, data)
    report = {"protocol": proto.name, "environment": environment(cfg), "datasets": datasets,
              "masks": masks_report(cfg, {n: parsed[n] for n in proto.sources}),
              "checkpoint": checkpoint_report(cfg), "config_vs_paper": config_vs_paper(cfg), "estimate": None}
    if run_estimate:
        train = sum(len(parsed[n].train) if parsed[n] is not None else PUBLISHED.get(n, {}).get("train", (0, 0))[0]
                    for n in proto.sources)
        ids = sum(parsed[n].num_train_pids if parsed[n] is not None else PUBLISHED.get(n, {}).get("train", (0, 0))[1]
                  for n in proto.sources)
        tgt = parsed[proto.target]
        test = (len(tgt.query) + len(tgt.gallery)) if tgt is not None else \
            sum(PUBLISHED.get(proto.target, {}).get(s, (0, 0))[0] for s in ("query", "gallery"))
        report["estimate"] = estimate(cfg, {"train": train, "ids": ids, "test": test}, steps=steps)
    return report


def _split_text(name: str, r: dict) -> str:
    parts = []
    for split, row in r["splits"].items():
        text = f"{split} {row['images']}/{row['ids']}"
        if "match" in row:
            text += " ok" if row["match"] else f" (published {row['published_images']}/{row['published_ids']}: DIFFERS)"
        parts.append(text)
    return ", ".join(parts)


def format_report(report: dict, short: bool = False) -> str:
    """The report as text; ``short``: the few lines ``muva run`` prints before a paper protocol."""
    env = report["environment"]
    gpus = ", ".join(f"{g['name']} ({g['memory_GB']} GB)" for g in env["gpus"]) or "no GPU"
    lines = [f"muva doctor: {report['protocol']}"]
    lines.append(f"  environment: Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), "
                 f"open_clip {env['open_clip']}, transformers {env['transformers']}; {gpus}; CPU {env['cpu']['capability']} "
                 f"(native float16 {'yes' if env['cpu']['float16_native'] else 'no'}, bfloat16 "
                 f"{'yes' if env['cpu']['bfloat16_native'] else 'no'})")
    lines.append(f"  precision on {env['device']}: {env['precision']}")
    for name, r in report["datasets"].items():
        if not r["found"]:
            lines.append(f"  {name} ({r['role']}): NOT FOUND under {r['root']}; tried: " + "; ".join(r["tried"]))
        elif "error" in r:
            lines.append(f"  {name} ({r['role']}): found but unreadable: {r['error']}")
        else:
            lines.append(f"  {name} ({r['role']}) {r['version']} at {r['dir']}: {_split_text(name, r)}")
            if not short:
                lines += [f"    {n}" for n in r["notes"]]
    for name, m in report["masks"].items():
        cov = "-" if m["coverage"] is None else f"{100 * m['coverage']:.1f}% of the training images"
        lines.append(f"  masks {name}: {cov}; {m['source']}")
    ck = report["checkpoint"]
    lines.append(f"  checkpoint: {ck['status']}: {ck['note']}")
    cv = report["config_vs_paper"]
    diffs = ", ".join(f"{d['key']} {d['value']} (paper {d['paper']})" for d in cv["differs"]) or "none"
    lines.append(f"  config vs the paper (section 4.2): recipe {cv['recipe']}; differs: {diffs}")
    if not short:
        lines += [f"    {n}" for n in cv["notes"]]
        for d in cv["differs"]:
            if d.get("note"):
                lines.append(f"    {d['key']}: {d['note']}")
    est = report.get("estimate")
    if est and not short:
        lines.append(f"  estimate on {est['device']} ({est['precision']}; batch {est['batch_size']}, median of "
                     f"{est['steps']} steps; {est['note']}):")
        for key, label in (("stage1_step", "stage-1 step"), ("stage2_step", "stage-2 step"),
                           ("inference_batch", "inference batch")):
            if f"{key}_seconds" in est:
                lines.append(f"    {label}: {est[key + '_seconds']:.2f} s, peak memory {est[key + '_peak_GB']:.2f} GB")
        c = est["counts"]
        lines.append(f"    whole run ({c['train']} training images of {c['ids']} identities, {c['test']} test images): "
                     f"stage 1 {est['stage1_hours']:.2f} h + stage 2 {est['stage2_hours']:.2f} h + evaluation "
                     f"{est['evaluation_hours']:.2f} h = {est['total_hours']:.2f} h")
    if short:
        lines.append(f"  (the whole report with a measured time estimate: muva doctor --protocol '{report['protocol']}')")
    return "\n".join(lines)


def short_report(cfg: RunConfig, data=None) -> str:
    """The doctor's short form (no estimate), from already parsed protocol data when given."""
    return format_report(doctor_report(cfg, run_estimate=False, data=data), short=True)


__all__ = ["PUBLISHED", "PAPER_SETTINGS", "doctor_report", "format_report", "short_report", "dataset_report",
           "environment", "masks_report", "checkpoint_report", "config_vs_paper", "estimate"]
