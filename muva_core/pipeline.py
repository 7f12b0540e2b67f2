"""Run-level orchestration shared by the CLI and the notebooks."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from .config import ConfigError, RunConfig
from .io import write_json
from .paths import resolve

BASELINE_FEATURES = {"hist-global": 1, "hist-3stripes": 3}
"""Colour-histogram baselines: name -> number of horizontal stripes."""


def ensure_synthetic(cfg: RunConfig, progress: bool = True) -> Path:
    """Generate the synthetic domains of the protocol at ``cfg.data.synth_root`` unless they are there already
    (the other domains are added when a protocol needs them)."""
    from .data.protocols import get_protocol
    from .data.synthetic import generate_synthetic

    proto = get_protocol(cfg.data.protocol)
    domains = [d.removeprefix("synth_") for d in dict.fromkeys((*proto.sources, proto.target))
               if d.startswith("synth_")]
    return generate_synthetic(resolve(cfg.data.synth_root), seed=cfg.data.synth_seed, scale=cfg.data.synth_scale,
                              domains=domains, progress=progress)


def protocol_roots(cfg: RunConfig) -> dict[str, Path]:
    """Dataset roots for ``build_protocol_data``: the synthetic root, and ``data_root`` for every real dataset
    (both resolved against the project root)."""
    return {"synth": resolve(cfg.data.synth_root), "*": resolve(cfg.data.data_root)}


DATASET_LAYOUTS = {
    "market1501": "Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}",
    "dukemtmcreid": "DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}",
    "msmt17": "MSMT17_V1/{train,test,list_train.txt,list_val.txt,list_query.txt,list_gallery.txt} "
              "(or MSMT17_V2, or a market-style conversion)",
    "cuhk03_np": "cuhk03-np/{detected,labeled}/{bounding_box_train,query,bounding_box_test}",
}
"""What to put under ``data_root`` for each real dataset (as the README says)."""


def check_datasets_present(cfg: RunConfig) -> None:
    """Every real dataset of the protocol can be found under ``data_root``; else one error naming, for each
    missing dataset, every folder tried and what to put there. Synthetic domains are generated, not checked; a
    dataset declared in a file was checked when the protocol was read (its root, CSV and split folders)."""
    from .data.datasets import DatasetError, get_dataset_class
    from .data.declared import declared_spec
    from .data.protocols import get_protocol

    proto = get_protocol(cfg.data.protocol)
    root = resolve(cfg.data.data_root)
    problems = []
    for name in dict.fromkeys((*proto.sources, proto.target)):
        if name.startswith("synth_") or declared_spec(name) is not None:
            continue
        tried = folders_tried(get_dataset_class(name), root)
        if not tried:
            continue
        layout = DATASET_LAYOUTS.get(name, name)
        problems.append(f"{name}: not found; tried\n" + "\n".join(tried) + f"\n  put it there as {root}/{layout}")
    if problems:
        raise DatasetError(f"protocol {proto.name} needs datasets that are not under data_root={cfg.data.data_root} "
                           f"({root}):\n" + "\n".join(problems)
                           + "\n(pass -p data_root=<folder> if they live elsewhere; `muva datasets NAME --root DIR` "
                             "checks one)")


def folders_tried(cls, root: Path) -> list[str]:
    """``[]`` when the dataset class finds its folder under ``root``, else each folder tried and why not."""
    if not root.is_dir():
        return [f"  {root}  (does not exist)"]
    probe = cls.__new__(cls)  # the class's folder rules without parsing anything
    tried = []
    for cand in probe.candidate_dirs(root):
        why = probe._looks_like(cand) if cand.is_dir() else "does not exist"
        if why is None:
            return []
        tried.append(f"  {cand}  ({why})")
    return tried


def ensure_pretrained_clip(cfg: RunConfig, progress: bool = True) -> Path | None:
    """The language-pretrained CLIP that ``pretrained: pretrain-clip`` names (:func:`muva_core.pretrain.config_clip_path`,
    ``<data_root>/clip/clip-<backbone>-seed0.safetensors``): made by ``muva pretrain-clip`` with the default settings
    when it is missing (an interrupted pretraining resumes at its last epoch), reused when its settings are the
    same, refused (:class:`~muva_core.pretrain.CheckpointExistsError`, naming the settings that differ) when they
    are not. None when the configuration starts from other weights (``checkpoint_path``, an open_clip tag, none)."""
    from .pretrain import CheckpointExistsError, config_clip_spec, pretrain_clip, uses_pretrain_clip

    if not uses_pretrain_clip(cfg):
        return None
    spec = config_clip_spec(cfg)
    try:
        return pretrain_clip(progress=progress, **spec)
    except CheckpointExistsError as err:
        raise CheckpointExistsError(
            f"pretrained={cfg.model.pretrained}: {err}. The file was made with other settings than this version's "
            f"`muva pretrain-clip --out {spec['out_dir']} --backbone {spec['backbone']} --seed {spec['seed']}`; "
            "move it away (or add --overwrite to that command) to make the one this configuration needs, or start "
            "from it as it is with -p checkpoint_path=<file> -p pretrained=none") from None


def clip_start(cfg: RunConfig) -> str:
    """The weights the run's CLIP starts from, in words: ``random init``, ``language-pretrained`` (``pretrained:
    pretrain-clip``), the checkpoint file, or the open_clip tag."""
    m = cfg.model
    if m.checkpoint_path:
        return m.checkpoint_path
    if m.pretrained in ("none", ""):
        return "random init"
    if m.pretrained == "pretrain-clip":
        return "language-pretrained: muva pretrain-clip"
    if m.pretrained == "auto":
        return "openai" if m.backbone == "vit-b-16" else "random init"
    return m.pretrained


def check_checkpoint(cfg: RunConfig) -> None:
    if cfg.model.checkpoint_path and not resolve(cfg.model.checkpoint_path).is_file():
        raise FileNotFoundError(f"checkpoint_path={cfg.model.checkpoint_path}: no such file "
                                f"({resolve(cfg.model.checkpoint_path)})")


def check_batch_plan(cfg: RunConfig, data) -> None:
    """The P x K batches of stage 2 can be formed from the training identities; else a ConfigError naming the
    keys (checked before grounding and stage 1, where the sampler would otherwise fail after hours)."""
    from .data.sampler import RandomIdentitySampler

    try:
        RandomIdentitySampler(data.train, num_instances=cfg.data.num_instances, batch_size=cfg.data.batch_size)
    except ValueError as err:
        raise ConfigError(f"batch_size={cfg.data.batch_size} with num_instances={cfg.data.num_instances} "
                          f"(P = {cfg.data.batch_size // cfg.data.num_instances} identities x K = "
                          f"{cfg.data.num_instances} images) does not fit the training set of {data.protocol.name} "
                          f"({data.num_classes} identities, {len(data.train)} images): {err}; lower batch_size "
                          f"or num_instances") from None


def check_images_readable(cfg: RunConfig, samples, what: str, progress: bool = True):
    """Decode every image once (in parallel; cached by file size and mtime under ``<cache_dir>/image-scan``) and
    report all unreadable files in one error."""
    from .data.scan import require_readable

    return require_readable(list(samples), cache_dir=resolve(cfg.grounding.cache_dir) / "image-scan",
                            progress=progress, what=what)


def preflight(cfg: RunConfig, progress: bool = True):
    """Everything a run can check before it starts working: the datasets are there, the checkpoint exists, the
    imported masks of ``masks_file`` fit the patch grid and cover every training image (the
    language-pretrained CLIP of ``pretrained: pretrain-clip`` is made when missing, see
    :func:`ensure_pretrained_clip`), the protocol's data loads (the synthetic set is generated when missing), the
    batches can be formed, and every image of the splits it reads can be decoded. Returns the protocol's data."""
    cfg.validate()
    check_datasets_present(cfg)
    check_checkpoint(cfg)
    data = load_protocol(cfg, progress=progress)
    check_batch_plan(cfg, data)
    if cfg.grounding.masks_file:
        from .grounding.steps import imported_masks

        imported_masks(cfg, data.train)
    check_images_readable(cfg, [*data.train, *data.query, *data.gallery], progress=progress,
                          what=f"images of {data.protocol.name} (train, query, gallery)")
    ensure_pretrained_clip(cfg, progress=progress)  # work (minutes when missing): after every check
    return data


def load_protocol(cfg: RunConfig, progress: bool = True):
    """The protocol's data (:class:`~muva_core.data.protocols.ProtocolData`); generates the synthetic set if needed."""
    from .data.protocols import build_protocol_data, get_protocol, load_declared

    proto = get_protocol(cfg.data.protocol)
    declared = load_declared(proto)      # datasets declared in files: checked before anything is generated
    if proto.synthetic:
        ensure_synthetic(cfg, progress=progress)
    return build_protocol_data(proto, protocol_roots(cfg), parsed=declared)


def load_dataset_for(cfg: RunConfig, dataset: str, progress: bool = True):
    """One dataset, by name or by its file (:mod:`muva_core.data.declared`), with the roots of ``cfg``: a declared
    dataset under its own root, a synthetic domain in the synthetic set (generated when missing), a real one under
    ``data_root`` (the folders tried named when it is not there)."""
    from .data.declared import dataset_name
    from .data.protocols import load_protocol_dataset

    name = dataset_name(dataset)
    if name.startswith("synth_"):
        ensure_synthetic(cfg, progress=progress)
    return load_protocol_dataset(name, protocol_roots(cfg))


def source_datasets(data) -> list:
    """The parsed source datasets of a protocol (whose train splits get part pseudo-labels)."""
    return [data.datasets[name] for name in data.sources]


def evaluate_baselines(query, gallery, cfg: RunConfig, progress: bool = True) -> dict[str, dict[str, float]]:
    """mAP / CMC / mINP of each colour-histogram baseline on one query/gallery split."""
    import numpy as np

    from .eval.baselines import extract_histograms
    from .eval import evaluate_features

    results = {}
    for name, stripes in BASELINE_FEATURES.items():
        qf = extract_histograms(query, stripes=stripes, progress=progress, desc=f"{name} query")
        gf = extract_histograms(gallery, stripes=stripes, progress=progress, desc=f"{name} gallery")
        m = evaluate_features(
            qf, gf,
            np.array([s.pid for s in query]), np.array([s.pid for s in gallery]),
            np.array([s.camid for s in query]), np.array([s.camid for s in gallery]),
            metric=cfg.eval.metric, max_rank=cfg.eval.max_rank,
        )
        results[name] = m.as_dict()
    return results


def chance_level(query, gallery, cfg: RunConfig, draws: int = 20, dim: int = 64, seed: int = 0) -> dict[str, float]:
    """mAP / CMC / mINP of random features (Gaussian, ``dim``-d), averaged over ``draws`` seeded draws: what
    a model that learned nothing scores on this query/gallery split."""
    import numpy as np

    from .eval import evaluate_features

    rng = np.random.default_rng(seed)
    qp, gp = np.array([s.pid for s in query]), np.array([s.pid for s in gallery])
    qc, gc = np.array([s.camid for s in query]), np.array([s.camid for s in gallery])
    runs = []
    for _ in range(draws):
        qf = rng.standard_normal((len(query), dim)).astype(np.float32)
        gf = rng.standard_normal((len(gallery), dim)).astype(np.float32)
        runs.append(evaluate_features(qf, gf, qp, gp, qc, gc, metric=cfg.eval.metric, max_rank=cfg.eval.max_rank).as_dict())
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {k: float(np.mean([r[k] for r in runs])) for k in keys}


def run_baseline(cfg: RunConfig, progress: bool = True) -> dict:
    """Colour-histogram baselines on the target domain of ``cfg.data.protocol``; writes metrics.json."""
    from .data.protocols import protocol_slug

    data = load_protocol(cfg, progress=progress)
    proto = data.protocol
    t0 = time.perf_counter()
    metrics = evaluate_baselines(data.query, data.gallery, cfg, progress=progress)
    out = resolve(cfg.reports_dir) / protocol_slug(proto.name) / "baseline"
    record = {"protocol": proto.name, "metrics": metrics, "seconds": round(time.perf_counter() - t0, 2),
              "config": cfg.to_flat()}
    write_json(out / "metrics.json", record)
    print(format_table(pd.DataFrame(metrics).T, f"{proto.name}: colour-histogram baselines on the target domain"))
    print(f"wrote {out / 'metrics.json'}")
    return record


def format_table(frame: pd.DataFrame, title: str) -> str:
    return f"\n{title}\n" + frame.round(2).to_string() + "\n"
