"""What a run checks before it works: datasets on disk, the checkpoint, imported masks, the batch plan, images.

:func:`preflight` runs them all in that order (the cheap ones first) and returns the protocol's data; every
failure is one error that names the key or file and the way out. :func:`muva_core.runs.open_run` calls it once
per run start; ``muva doctor`` reads the same folder rules
(``ReIDDataset.folders_tried``) for its report.
"""
from __future__ import annotations

from .config import ConfigError, RunConfig
from .paths import resolve

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
        tried = get_dataset_class(name).folders_tried(root)
        if not tried:
            continue
        layout = DATASET_LAYOUTS.get(name, name)
        problems.append(f"{name}: not found; tried\n" + "\n".join(tried) + f"\n  put it there as {root}/{layout}")
    if problems:
        raise DatasetError(f"protocol {proto.name} needs datasets that are not under data_root={cfg.data.data_root} "
                           f"({root}):\n" + "\n".join(problems)
                           + "\n(pass -p data_root=<folder> if they live elsewhere; `muva datasets NAME --root DIR` "
                             "checks one)")


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
    """Everything a run can check before it starts working, on a validated configuration: the datasets are
    there, the checkpoint exists, the imported masks of ``masks_file`` fit the patch grid and cover every
    training image, the protocol's data loads (the synthetic set is generated when missing), the batches can be
    formed, and every image of the splits it reads can be decoded. Returns the protocol's data."""
    from .data.protocols import load_protocol

    check_datasets_present(cfg)
    check_checkpoint(cfg)
    data = load_protocol(cfg, progress=progress)
    check_batch_plan(cfg, data)
    if cfg.grounding.masks_file:
        from .grounding.steps import imported_masks

        imported_masks(cfg, data.train)
    check_images_readable(cfg, [*data.train, *data.query, *data.gallery], progress=progress,
                          what=f"images of {data.protocol.name} (train, query, gallery)")
    return data


def eval_preflight(cfg: RunConfig, dataset: str | None = None, progress: bool = True):
    """What evaluating a trained run checks before the model runs: the target of ``cfg``'s protocol (its datasets
    on disk), or ``dataset`` (a name or a dataset file) alone, and every query / gallery image decodes (all
    unreadable files in one message). Returns the :class:`~muva_core.data.protocols.ProtocolData` to evaluate."""
    from .data.protocols import load_dataset_for, load_protocol, target_data

    if dataset:
        data = target_data(load_dataset_for(cfg, dataset, progress=progress))
    else:
        check_datasets_present(cfg)
        data = load_protocol(cfg, progress=progress)
    check_images_readable(cfg, [*data.query, *data.gallery], progress=progress,
                          what=f"images of {data.protocol.name} (query, gallery)")
    return data
