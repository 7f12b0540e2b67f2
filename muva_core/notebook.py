"""The few helpers every numbered notebook uses, so the notebooks stay thin.

A notebook's ``parameters`` cell assigns config keys as plain variables (papermill overwrites
them); :func:`config_from_namespace` turns them into a :class:`RunConfig`; :func:`record` writes
the step's numbers to ``<run_dir>/metrics/<step>.json`` where the runner and tests read them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .config import RunConfig
from .io import write_json


def config_from_namespace(namespace: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from every config key defined in ``namespace`` (a notebook's ``globals()``)."""
    cfg = base or RunConfig()
    keys = set(cfg.to_flat())
    return cfg.update({k: v for k, v in namespace.items() if k in keys}, source="notebook parameters")


def run_dir(cfg: RunConfig) -> Path:
    """The folder a run writes to: ``cfg.run_dir`` or ``<reports_dir>/<protocol slug>/interactive``."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    from .data.protocols import protocol_slug

    return Path(cfg.reports_dir) / protocol_slug(cfg.data.protocol) / "interactive"


def figures_dir(cfg: RunConfig) -> Path:
    return run_dir(cfg) / "figures"


def record(cfg: RunConfig, step: str, values: Mapping[str, Any]) -> Path:
    """Write a step's recorded values to ``<run_dir>/metrics/<step>.json`` (atomically) and return the path."""
    path = run_dir(cfg) / "metrics" / f"{step}.json"
    write_json(path, dict(values))
    return path


def read_record(folder: str | Path, step: str) -> dict:
    """Read back what :func:`record` wrote for ``step`` under a run folder."""
    return json.loads((Path(folder) / "metrics" / f"{step}.json").read_text())
