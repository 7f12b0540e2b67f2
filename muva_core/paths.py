"""Where things are: the project root, the paths of a configuration, and run folders.

Every relative path in a configuration (``data_root``, ``synth_root``, ``cache_dir``,
``reports_dir``, ``run_dir``, ``checkpoint_path``) is relative to the **project root**, not to
the working directory, so a notebook gives the same result whether JupyterLab started its kernel
in ``notebooks/``, papermill ran it, or ``muva run`` did. The root is ``$MUVA_HOME`` when set,
else the nearest folder at or above the working directory that holds ``configs/`` and
``pyproject.toml`` (or ``notebooks/``), else the folder this package was installed from.

Run folders are keyed by their configuration: ``<reports_dir>/<protocol slug>/run-<config hash>``
unless ``run_dir`` names one. :func:`claim_run_folder` refuses to reuse a folder made with other
settings (naming the keys that differ) unless ``resume`` is off, which starts the folder afresh.
Notebooks, the CLI, ``muva run`` and training all call these functions; nothing else decides paths.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import RunConfig

PATH_KEYS = ("data_root", "synth_root", "cache_dir", "reports_dir", "run_dir", "checkpoint_path", "masks_file")
"""Config keys that hold file-system paths (relative ones are relative to the project root)."""

OPERATIONAL_KEYS = frozenset({
    "run_dir", "reports_dir", "resume", "device", "num_workers", "log_every", "num_examples", "ground_batch_size",
    "cpu_amp", "eval_every",
})
"""Keys that say how a run is carried out, not what it trains."""

OMITTED_AT_DEFAULT = {"masks_file": "", "memory_rebuild": "full"}
"""Keys left out of a configuration's identity while they hold this value: keys added after run folders were
named, so that those folders keep their names."""

SPELLED_IN_PROTOCOL = frozenset({"sources", "target"})
"""Keys written into ``protocol`` (``SOURCE+SOURCE->TARGET``): the hash counts them there, once, so run folders
named before these keys existed keep their names."""

EVAL_SECTION = "eval"
"""Evaluation keys do not change the trained model either: a resumed run re-evaluates with the new ones."""

PACKAGE_ROOT = Path(__file__).resolve().parents[1]

RUN_ARTEFACTS = ("checkpoints", "history_stage1.csv", "history_stage2.csv", "model.safetensors", "metrics",
                 "metrics.json", "steps.json", "notebooks", "figures", "progress.log")
"""What a run writes into its folder (removed when a folder is started afresh with ``resume=false``)."""


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names the folder and the way out."""


# ---- the project root -------------------------------------------------------------------
def _is_root(folder: Path) -> bool:
    return (folder / "configs").is_dir() and ((folder / "pyproject.toml").is_file() or (folder / "notebooks").is_dir())


def project_root() -> Path:
    """The folder relative config paths are resolved against (see the module docstring)."""
    home = os.environ.get("MUVA_HOME")
    if home:
        root = Path(home).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"MUVA_HOME={home}: no such folder (it should be the workbook's root, "
                                    "the folder holding configs/ and notebooks/)")
        return root
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if _is_root(folder):
            return folder
    return PACKAGE_ROOT if _is_root(PACKAGE_ROOT) else here


def resolve(value: str | os.PathLike, root: Path | None = None) -> Path:
    """An absolute path: ``~`` expanded; a relative path taken relative to the project root."""
    path = Path(os.path.expandvars(str(value))).expanduser()
    if path.is_absolute():
        return path
    return (root or project_root()) / path


def portable(value: str | os.PathLike, root: Path | None = None) -> str:
    """The path as it is stored: relative to the project root when inside it, else absolute."""
    if value in ("", None):
        return ""
    root = root or project_root()
    path = Path(os.path.normpath(resolve(value, root)))
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def config_dir() -> Path:
    return project_root() / "configs"


def notebook_dir() -> Path:
    """The numbered notebooks (JupyterLab starts their kernels here; so does ``muva run``)."""
    return project_root() / "notebooks"


# ---- configuration identity ---------------------------------------------------------------
def portable_flat(cfg: "RunConfig", root: Path | None = None) -> dict[str, Any]:
    """The flat configuration with every path key in its portable (root-relative) form."""
    root = root or project_root()
    flat = cfg.to_flat()
    for key in PATH_KEYS:
        if flat.get(key):
            flat[key] = portable(flat[key], root)
    return flat


def identity(cfg: "RunConfig") -> dict[str, Any]:
    """The keys that decide what a run trains (all but the operational and evaluation keys), paths portable."""
    return {k: v for k, v in portable_flat(cfg).items()
            if k not in OPERATIONAL_KEYS and k not in SPELLED_IN_PROTOCOL and cfg.section_of(k) != EVAL_SECTION
            and not (k in OMITTED_AT_DEFAULT and v == OMITTED_AT_DEFAULT[k])}


def config_hash(cfg: "RunConfig") -> str:
    """8 hex digits naming what a configuration trains (:func:`identity`): runs that differ only in how they
    are carried out (device, workers, ``resume``) or evaluated share a folder."""
    return hashlib.sha1(json.dumps(identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]


def config_differences(old: "RunConfig", new: "RunConfig") -> dict[str, tuple[Any, Any]]:
    """``{key: (old value, new value)}`` for the keys of :func:`identity` that differ."""
    a, b = identity(old), identity(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


# ---- run folders --------------------------------------------------------------------------
def run_folder(cfg: "RunConfig", run_id: str | None = None) -> Path:
    """The folder a run writes to: ``run_dir`` when set, else ``<reports_dir>/<slug>/<run_id or run-<hash>>``."""
    if cfg.run_dir and not run_id:
        return resolve(cfg.run_dir)
    from .data.protocols import get_protocol, protocol_slug

    slug = protocol_slug(get_protocol(cfg.data.protocol).name)
    return resolve(cfg.reports_dir) / slug / (run_id or f"run-{config_hash(cfg)}")


def figures_folder(cfg: "RunConfig") -> Path:
    return run_folder(cfg) / "figures"


def existing_run_folder(value: str | os.PathLike, what: str = "run_dir", require_config: bool = True) -> Path:
    """A run folder that must already exist (with its ``config.yaml``, which training writes), reopened by
    eval, export and the explorer."""
    folder = resolve(value)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}={value}: run folder not found ({folder}); run folders are "
                                f"reports/<protocol>/run-<hash>, listed in reports/README.md")
    if require_config and not (folder / "config.yaml").is_file():
        raise FileNotFoundError(f"{what}={value}: {folder} is not a run folder (no config.yaml in it)")
    return folder


def load_run_config(folder: str | os.PathLike, overrides: dict | None = None) -> "RunConfig":
    """The configuration a run folder was made with (its paths resolve against the project root)."""
    from .config import RunConfig

    folder = existing_run_folder(folder, "run")
    return RunConfig.from_yaml(folder / "config.yaml", overrides)


def check_run_folder(cfg: "RunConfig", folder: Path | None = None) -> None:
    """Refuse (:class:`RunFolderError`) a folder whose ``config.yaml`` differs from ``cfg`` in a key that
    changes training, while ``resume`` is on. Writes nothing."""
    from .config import ConfigError, RunConfig

    folder = folder or run_folder(cfg)
    saved = folder / "config.yaml"
    if not saved.is_file() or not cfg.train.resume:
        return
    try:
        diff = config_differences(RunConfig.from_yaml(saved), cfg)
    except ConfigError as err:
        diff = {"config.yaml": (f"unreadable ({err})", "this run's configuration")}
    if diff:
        lines = "\n".join(f"  {k}: {a!r} in the folder, {b!r} now" for k, (a, b) in diff.items())
        raise RunFolderError(
            f"run folder {folder} was made with other settings:\n{lines}\n"
            f"Either use a new folder (leave run_dir empty for reports/<protocol>/run-<config hash>, or pass "
            f"-p run_dir=<new folder>), or start this one afresh with -p resume=false (which deletes its "
            f"checkpoints, histories and metrics).")


def claim_run_folder(cfg: "RunConfig", folder: Path | None = None) -> Path:
    """Make ``folder`` (default :func:`run_folder`) this configuration's run folder and write its ``config.yaml``.

    :func:`check_run_folder` first; with ``resume=false`` the folder's previous outputs are removed and it
    starts afresh. Nothing is created before the check has passed."""
    folder = folder or run_folder(cfg)
    check_run_folder(cfg, folder)
    if not cfg.train.resume:
        for name in RUN_ARTEFACTS:
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(folder)
    store_portable_paths(cfg)
    cfg.to_yaml(folder / "config.yaml")
    return folder


def store_portable_paths(cfg: "RunConfig") -> "RunConfig":
    """Rewrite ``cfg``'s path keys in their portable form (what a run folder's ``config.yaml`` holds, so the
    folder reopens from any working directory); returns ``cfg``."""
    root = project_root()
    values = {k: portable(v, root) for k, v in cfg.to_flat().items() if k in PATH_KEYS and v}
    return cfg.update(values, source="paths")
