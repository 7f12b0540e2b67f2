"""A trained run reopened: its configuration and model, and its evaluation on a protocol or on one dataset.

``muva eval``, ``muva export-onnx``, ``muva embed`` and ``muva search`` all start from a run folder
(``reports/<protocol>/run-<hash>``, holding ``config.yaml`` and ``model.safetensors``)::

    cfg, model = load_run_model("reports/synth_A2B/run-2e76cf80", device="cpu")
    result = evaluate_run("reports/synth_A2B/run-2e76cf80", dataset="configs/datasets/mine.yaml")
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, RunConfig

__all__ = ["EvalResult", "evaluate_run", "load_run_model", "model_file"]


def model_file(run: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
    """The trained model of a run folder (``model.safetensors``, or ``checkpoint``); an error naming it when it
    is missing or records no ``num_classes``."""
    from ..paths import RunFiles, resolve
    from ..runs import existing_run_folder
    from ..train.checkpoint import read_checkpoint_info

    folder = existing_run_folder(run, "--run")
    path = resolve(checkpoint) if checkpoint else RunFiles(folder).model
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained model" + ("" if checkpoint else " in the run folder (train "
                                "it first with `muva train` / `muva run`, or pass --checkpoint)"))
    if not int(read_checkpoint_info(path)["extra"].get("num_classes", 0) or 0):
        raise ValueError(f"{path}: the checkpoint does not record num_classes (not a final model.safetensors)")
    return path


def load_run_model(run: str | os.PathLike, checkpoint: str | os.PathLike | None = None, device: str | None = None,
                   overrides: dict | None = None):
    """``(cfg, model)``: the run's configuration (``config.yaml`` plus ``overrides``) and its trained
    :class:`~muva_core.model.factory.MUVAReID` in eval mode on ``device`` (default: the configuration's)."""
    from ..eval.features import resolve_device
    from ..runs import Run
    from ..train.checkpoint import read_checkpoint_info
    from ..train.run import load_trained

    opened = Run.reopen(run, overrides)
    cfg = opened.cfg
    path = model_file(opened.folder, checkpoint)
    num_classes = int(read_checkpoint_info(path)["extra"]["num_classes"])
    return cfg, load_trained(cfg, path, num_classes, resolve_device(device or cfg.device))


@dataclass
class EvalResult:
    """What :func:`evaluate_run` measured: ``name`` (the protocol, or the dataset), the metrics (percent, as
    ``ReIDMetrics.as_dict``), the predicted-mask IoU against true part boxes (where the target has them)."""

    name: str
    metrics: dict
    mask_iou_truth: dict
    cfg: RunConfig
    data: object = field(repr=False, default=None)


def evaluate_run(run: str | os.PathLike, protocol: str | None = None, dataset: str | None = None,
                 checkpoint: str | os.PathLike | None = None, overrides: dict | None = None,
                 progress: bool = True) -> EvalResult:
    """Evaluate a trained run on the target of its own protocol, of ``protocol``, or on the query / gallery of
    ``dataset`` (a dataset name or a dataset file, :mod:`muva_core.data.declared`). Everything is checked before
    the model runs: the datasets, every image (all unreadable files in one message), the model file."""
    from ..checks import eval_preflight
    from ..eval.features import resolve_device
    from ..runs import Run
    from ..train.run import evaluate_model

    if protocol and dataset:
        raise ConfigError("give --protocol or --dataset, not both (a protocol's target is one dataset)")
    overrides = dict(overrides or {})
    if protocol:
        overrides["protocol"] = protocol
    opened = Run.reopen(run, overrides)
    cfg, folder = opened.cfg, opened.folder
    data = eval_preflight(cfg, dataset, progress=progress)
    path = model_file(folder, checkpoint)
    _, model = load_run_model(folder, path, resolve_device(cfg.device), overrides)
    metrics, iou = evaluate_model(cfg, model, data, resolve_device(cfg.device), progress=progress)
    return EvalResult(data.protocol.name, metrics, iou, cfg, data)
