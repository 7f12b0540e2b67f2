"""Where things are: the project root, the paths of a configuration, and the files of a run folder.

Every relative path in a configuration (``data_root``, ``synth_root``, ``cache_dir``,
``reports_dir``, ``run_dir``, ``checkpoint_path``) is relative to the **project root**, not to
the working directory, so a notebook gives the same result whether JupyterLab started its kernel
in ``notebooks/``, papermill ran it, or ``muva run`` did. The root is ``$MUVA_HOME`` when set,
else the nearest folder at or above the working directory that holds ``configs/`` and
``pyproject.toml`` (or ``notebooks/``), else the folder this package was installed from.

A run folder's files have their names here, once (:class:`RunFiles`); which folder a configuration runs
in, and its life (check, claim, lock), is :mod:`muva_core.runs`. This module imports nothing of the project.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


class RunFiles:
    """The files of one run folder, by name: the only place in the library where their names are written.

    ``RunFiles(folder).model`` is ``<folder>/model.safetensors``; :data:`RUN_ARTEFACTS` lists what a run writes
    (removed when a folder is started afresh)."""

    CONFIG = "config.yaml"
    MODEL = "model.safetensors"
    SUMMARY = "metrics.json"
    STEPS = "steps.json"
    RECORDS = "metrics"
    CHECKPOINTS = "checkpoints"
    NOTEBOOKS = "notebooks"
    FIGURES = "figures"
    PROGRESS_LOG = "progress.log"
    HISTORIES = ("history_stage1.csv", "history_stage2.csv")

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def __fspath__(self) -> str:
        return str(self.folder)

    @property
    def config(self) -> Path:
        """``config.yaml``: the resolved configuration (the run's single source of truth)."""
        return self.folder / self.CONFIG

    @property
    def model(self) -> Path:
        """``model.safetensors``: the trained model (written at the end of stage 2)."""
        return self.folder / self.MODEL

    @property
    def summary(self) -> Path:
        """``metrics.json``: the run's summary (``muva run``)."""
        return self.folder / self.SUMMARY

    @property
    def steps(self) -> Path:
        """``steps.json``: per notebook, the hash of its inputs and its wall time."""
        return self.folder / self.STEPS

    @property
    def records(self) -> Path:
        """``metrics/``: what each step recorded (:meth:`record_path`)."""
        return self.folder / self.RECORDS

    def record_path(self, step: str) -> Path:
        """``metrics/<step>.json`` (:meth:`muva_core.runs.Run.record` writes it)."""
        return self.records / f"{step}.json"

    @property
    def checkpoints(self) -> Path:
        return self.folder / self.CHECKPOINTS

    def checkpoint(self, name: str) -> Path:
        """``checkpoints/<name>.safetensors`` (``stage1``, ``stage1-last``, ``stage2-last``)."""
        return self.checkpoints / f"{name}.safetensors"

    def history(self, stage: int) -> Path:
        """``history_stage<stage>.csv``: one row per epoch."""
        return self.folder / self.HISTORIES[int(stage) - 1]

    @property
    def notebooks(self) -> Path:
        return self.folder / self.NOTEBOOKS

    def notebook(self, name: str) -> Path:
        return self.notebooks / f"{name}.ipynb"

    @property
    def figures(self) -> Path:
        return self.folder / self.FIGURES

    @property
    def progress_log(self) -> Path:
        return self.folder / self.PROGRESS_LOG


RUN_ARTEFACTS = (RunFiles.CHECKPOINTS, *RunFiles.HISTORIES, RunFiles.MODEL, RunFiles.RECORDS, RunFiles.SUMMARY,
                 RunFiles.STEPS, RunFiles.NOTEBOOKS, RunFiles.FIGURES, RunFiles.PROGRESS_LOG)
"""What a run writes into its folder (removed when a folder is started afresh with ``resume=false``)."""


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
