"""The few helpers every numbered notebook uses, so the notebooks stay thin.

A notebook's ``parameters`` cell assigns config keys as plain variables (papermill overwrites them);
``None`` means "the value in ``configs/<protocol>.yaml``" (or, when ``run_dir`` names an existing
run folder, the value in its ``config.yaml``). :func:`config_from_namespace` turns them into the
run's :class:`RunConfig`: that file, then every parameter that is not ``None``. So with its defaults a notebook opened in JupyterLab uses the same configuration, and
therefore the same run folder, as ``muva run --protocol <protocol>``. A name in the parameters cell
that is not a config key is an error naming the closest key. :func:`record` writes the step's
numbers to ``<run folder>/metrics/<step>.json`` where the runner and tests read them.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError, RunConfig, unknown_key_message, resolve_config
from .paths import RunFiles, resolve
from .runs import Recorded, Run, run_folder


def _literal_assignments(source: str) -> dict[str, Any] | None:
    """``{name: value}`` when ``source`` is a cell of plain ``name = <literal>`` lines, else None."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    if not tree.body:
        return None
    out: dict[str, Any] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            return None
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            return None
    return out


def parameters_from_history(history: list[str]) -> dict[str, Any]:
    """The values of every parameters-style cell executed so far (``In``: the parameters cell, papermill's
    injected cell, re-runs of either), later cells winning; the cell running now (the last) is left out."""
    values: dict[str, Any] = {}
    for source in history[:-1]:
        found = _literal_assignments(source)
        if found:
            values.update(found)
    return values


def config_from_namespace(namespace: Mapping[str, Any]) -> RunConfig:
    """The run configuration from a notebook's parameters (its ``globals()``).

    In a kernel the parameters are read from the executed cells (``In``), so a variable that a later cell
    reuses (``device = resolve_device(...)``) never leaks into the configuration; outside one, every config
    key in ``namespace`` counts."""
    known = set(RunConfig().to_flat())
    history = namespace.get("In")
    if isinstance(history, list) and history and all(isinstance(h, str) for h in history):
        params = parameters_from_history(history)
        unknown = [k for k in params if k not in known]
        if unknown:
            raise ConfigError(unknown_key_message(unknown[0], "notebook parameters cell", sorted(known), list_known=False)
                              + (f" (also not config keys: {', '.join(unknown[1:])})" if unknown[1:] else "")
                              + "; every name in the parameters cell must be a config key")
    else:
        params = {k: v for k, v in namespace.items() if k in known}
    values = {k: v for k, v in params.items() if v is not None}
    if values.get("run_dir"):
        saved = RunFiles(resolve(values["run_dir"])).config
        if saved.is_file():  # an existing run folder: its configuration, then the parameters given
            return RunConfig.from_yaml(saved, values)
    return resolve_config(overrides=values)


def run_dir(cfg: RunConfig) -> Path:
    """The run folder (see :func:`muva_core.runs.run_folder`)."""
    return run_folder(cfg)


def trained_run(cfg: RunConfig) -> Path:
    """The run folder of ``cfg`` that must already hold a trained ``model.safetensors`` (notebooks 06-09)."""
    run = Run.of(cfg, require_config=True)
    run.trained_model()
    return run.folder


def trained_model(cfg: RunConfig) -> Path:
    """The trained model file of ``cfg``'s run folder (an error saying how to train it when missing)."""
    return Run.of(cfg, require_config=True).trained_model()


def model_file(cfg: RunConfig) -> Path:
    """Where ``cfg``'s run folder keeps its trained model (``model.safetensors``; it may not exist yet)."""
    return Run.of(cfg).model


def figures_dir(cfg: RunConfig) -> Path:
    return Run(cfg).figures


def record(cfg: RunConfig, step: str, values: Mapping[str, Any]) -> Recorded:
    """Write a step's recorded values to ``<run folder>/metrics/<step>.json`` (atomically) and return the path."""
    return Run(cfg).record(step, values)


def read_record(folder: str | Path, step: str) -> dict:
    """Read back what :func:`record` wrote for ``step`` under a run folder."""
    return Run(RunConfig(), folder).read_record(step)


def part_mask_explorer(cfg: RunConfig, progress: bool = False):
    """Notebook 08's explorer: from the run folder when it holds a trained model, else from the protocol's mask
    files. A ``run_dir`` that was given must exist."""
    from .viz.explorer import PartMaskExplorer

    run = Run.of(cfg)
    if run.model.is_file():
        return PartMaskExplorer.from_run(run.folder, device=cfg.device, progress=progress)
    return PartMaskExplorer.from_masks(cfg, progress=progress)


def retrieval_explorer(cfg: RunConfig, progress: bool = False):
    """Notebook 09's explorer: the trained model of ``cfg``'s run folder on its protocol's target."""
    from .data.protocols import load_protocol
    from .eval.features import resolve_device
    from .inference.ranked import ranked_lists_of_model
    from .train.run import load_trained
    from .viz.retrieval import RetrievalExplorer

    path = trained_model(cfg)
    data = load_protocol(cfg, progress=progress)
    device = resolve_device(cfg.device)
    model = load_trained(cfg, path, data.num_classes, device)
    lists = ranked_lists_of_model(model, data.query, data.gallery, cfg, device, progress=progress)
    return RetrievalExplorer(lists, (cfg.data.height, cfg.data.width), cfg.model.mask_threshold,
                             source=f"{path.parent} on {data.protocol.target} ({data.protocol.name})")
