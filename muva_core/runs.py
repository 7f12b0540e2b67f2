"""A run's life: which folder it runs in, the checks before it starts, its claim and lock, its files and records.

Run folders are keyed by their configuration: ``<reports_dir>/<protocol slug>/run-<config hash>`` unless
``run_dir`` names one. Everything that starts or reopens a run goes through this module:

* :func:`open_run` starts one, once for training (``muva train``, notebooks 04-05), ``muva run`` and sweeps:
  validate the configuration -> check the folder against it (:func:`check_run_folder`: a folder made with other
  settings is refused, naming the keys that differ, unless ``resume`` is off) -> preflight
  (:func:`muva_core.checks.preflight`, then the language-pretrained CLIP is made when the configuration needs it)
  -> lock the folder (:mod:`muva_core.locks`) -> claim it (write ``config.yaml``; ``resume=false`` starts it
  afresh). Nothing is written before every check has passed.
* :meth:`Run.reopen` opens a finished (or partly finished) run folder by path: ``muva eval``, ``export-onnx``,
  ``embed``, ``search``, notebooks 06-09 and the explorers.

A :class:`Run` knows its folder and its files by name (:class:`muva_core.paths.RunFiles`), what each step
recorded (:meth:`Run.record` / :meth:`Run.read_record`), its trained model and its summary.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError, RunConfig, config_differences, config_hash, store_portable_paths
from .io import write_json
from .paths import RUN_ARTEFACTS, RunFiles, resolve

__all__ = ["RunFolderError", "Run", "Recorded", "run_folder", "existing_run_folder", "load_run_config",
           "check_run_folder", "claim_run_folder", "chosen_folder", "open_run", "prepare_run", "train_protocol"]


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names the folder and the way out."""


# ---- which folder -------------------------------------------------------------------------------------------
def run_folder(cfg: RunConfig, run_id: str | None = None) -> Path:
    """The folder a run writes to: ``run_dir`` when set, else ``<reports_dir>/<slug>/<run_id or run-<hash>>``."""
    if cfg.run_dir and not run_id:
        return resolve(cfg.run_dir)
    from .data.protocols import get_protocol, protocol_slug

    slug = protocol_slug(get_protocol(cfg.data.protocol).name)
    return resolve(cfg.reports_dir) / slug / (run_id or f"run-{config_hash(cfg)}")


def existing_run_folder(value: str | os.PathLike, what: str = "run_dir", require_config: bool = True) -> Path:
    """A run folder that must already exist (with its ``config.yaml``, which training writes), reopened by
    eval, export and the explorer."""
    folder = resolve(value)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}={value}: run folder not found ({folder}); run folders are "
                                f"reports/<protocol>/run-<hash>, listed in reports/README.md")
    if require_config and not RunFiles(folder).config.is_file():
        raise FileNotFoundError(f"{what}={value}: {folder} is not a run folder (no {RunFiles.CONFIG} in it)")
    return folder


def chosen_folder(cfg: RunConfig, require_config: bool = False) -> Path:
    """The run folder a notebook or an explorer works in: ``run_dir`` when given (it must exist, with its
    ``config.yaml`` when ``require_config``), else the configuration's own folder (which may not exist yet)."""
    return existing_run_folder(cfg.run_dir, require_config=require_config) if cfg.run_dir else run_folder(cfg)


def load_run_config(folder: str | os.PathLike, overrides: dict | None = None) -> RunConfig:
    """The configuration a run folder was made with (its paths resolve against the project root)."""
    folder = existing_run_folder(folder, "run")
    return RunConfig.from_yaml(RunFiles(folder).config, overrides)


def check_run_folder(cfg: RunConfig, folder: Path | None = None) -> None:
    """Refuse (:class:`RunFolderError`) a folder whose ``config.yaml`` differs from ``cfg`` in a key that
    changes training, while ``resume`` is on. Writes nothing."""
    folder = folder or run_folder(cfg)
    saved = RunFiles(folder).config
    if not saved.is_file() or not cfg.train.resume:
        return
    try:
        diff = config_differences(RunConfig.from_yaml(saved), cfg)
    except ConfigError as err:
        diff = {RunFiles.CONFIG: (f"unreadable ({err})", "this run's configuration")}
    if diff:
        lines = "\n".join(f"  {k}: {a!r} in the folder, {b!r} now" for k, (a, b) in diff.items())
        raise RunFolderError(
            f"run folder {folder} was made with other settings:\n{lines}\n"
            f"Either use a new folder (leave run_dir empty for reports/<protocol>/run-<config hash>, or pass "
            f"-p run_dir=<new folder>), or start this one afresh with -p resume=false (which deletes its "
            f"checkpoints, histories and metrics).")


def claim_run_folder(cfg: RunConfig, folder: Path | None = None) -> Path:
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
    cfg.to_yaml(RunFiles(folder).config)
    return folder


# ---- a run -------------------------------------------------------------------------------------------------
class Recorded(str):
    """The path of a step's record; shows as ``recorded: <path>`` as a cell's last value."""

    def __repr__(self) -> str:
        return f"recorded: {self}"


class Run(RunFiles):
    """One run folder and its configuration; its files by name (:class:`~muva_core.paths.RunFiles`).

    ``data`` is the protocol's data when the run was opened by :func:`open_run` (preflight loads it); ``lock``
    holds the folder's lock while :func:`open_run` was asked to keep it (``close()`` releases it)."""

    def __init__(self, cfg: RunConfig, folder: str | os.PathLike | None = None, data: Any = None,
                 wait: bool = False, main: bool = True) -> None:
        super().__init__(folder if folder is not None else run_folder(cfg))
        self.cfg = cfg
        self.data = data
        self.wait = wait
        self.main = main
        self.lock = ExitStack()
        self.started = time.perf_counter()

    def __repr__(self) -> str:
        return f"Run({self.folder})"

    @classmethod
    def reopen(cls, folder: str | os.PathLike, overrides: dict | None = None, what: str = "--run") -> "Run":
        """An existing run folder with the configuration it was made with (plus ``overrides``)."""
        folder = existing_run_folder(folder, what)
        return cls(load_run_config(folder, overrides), folder)

    @classmethod
    def of(cls, cfg: RunConfig, require_config: bool = False) -> "Run":
        """The run of ``cfg`` as a notebook sees it (:func:`chosen_folder`), nothing else checked or written."""
        return cls(cfg, chosen_folder(cfg, require_config))

    # ---- records ----
    def record(self, step: str, values: Mapping[str, Any]) -> Recorded:
        """Write a step's recorded values to ``metrics/<step>.json`` (atomically) and return the path."""
        path = self.record_path(step)
        write_json(path, dict(values))
        return Recorded(path)

    def read_record(self, step: str) -> dict:
        """What :meth:`record` wrote for ``step``."""
        return json.loads(self.record_path(step).read_text())

    def summary_record(self) -> dict:
        """``metrics.json``, the run's summary (``muva run``)."""
        return json.loads(self.summary.read_text())

    def trained_model(self) -> Path:
        """``model.safetensors``; an error saying how to make it when the run has not trained yet."""
        if not self.model.is_file():
            raise FileNotFoundError(f"no trained model in {self.folder} ({RunFiles.MODEL}): run notebooks 04-05 "
                                    f"with the same parameters, or `muva train --protocol '{self.cfg.data.protocol}'`, "
                                    "first")
        return self.model

    # ---- lock ----
    def locked(self):
        """The run folder's lock for one step (main process only; re-entrant, so a no-op while the run holds
        it)."""
        from .locks import hold

        return hold(self.folder, wait=self.wait) if self.main else nullcontext()

    def close(self) -> None:
        """Release the lock :func:`open_run` kept."""
        self.lock.close()


def _lock(run: Run, dist, device) -> None:
    """The main process takes the run folder's lock into ``run.lock``; under torchrun every rank learns whether it
    did, and all stop with the holder's name when it did not."""
    from .locks import LockHeld, hold

    held = None
    if run.main:
        try:
            run.lock.enter_context(hold(run.folder, wait=run.wait))
        except LockHeld as err:
            held = err
    if dist is not None and dist.enabled:
        import torch

        from .train.distributed import broadcast_tensor

        flag = broadcast_tensor(torch.tensor([float(held is not None)], device=device), dist)
        if held is None and flag.item():
            raise RuntimeError(f"rank 0 could not lock the run folder {run.folder} (another process holds it)")
    if held is not None:
        raise held


def open_run(cfg: RunConfig, progress: bool = True, wait: bool = False, keep_lock: bool = True,
             run_id: str | None = None, dist=None, device=None) -> Run:
    """Start a run: validate -> folder check -> preflight -> lock -> claim, once (see the module docstring).

    Returns the :class:`Run` with the protocol's data. ``keep_lock``: the run keeps the folder's lock until
    ``run.close()``; otherwise it is released on return and each step takes it again while it works (a notebook's
    kernel holds no lock between cells). Another process's live lock raises :class:`~muva_core.locks.LockHeld`
    naming its holder, or is waited for with ``wait``. ``dist``: the torchrun process group
    (:class:`~muva_core.train.distributed.DistInfo`): only rank 0 locks and claims; every rank checks."""
    from .checks import preflight
    from .locks import shared_data
    from .pretrain.provision import ensure_pretrained_clip

    main = dist is None or dist.main
    cfg.validate()
    run = Run(cfg, run_folder(cfg, run_id), wait=wait, main=main)
    check_run_folder(cfg, run.folder)
    with shared_data(cfg):
        run.data = preflight(cfg, progress=progress and main)
        ensure_pretrained_clip(cfg, progress=progress and main)  # work (minutes when missing): after every check
    try:
        _lock(run, dist, device)
        if main:
            claim_run_folder(cfg, run.folder)
    except BaseException:
        run.close()
        raise
    if not keep_lock:
        run.close()
    return run


# ---- training ----------------------------------------------------------------------------------------------
def prepare_run(cfg: RunConfig, progress: bool = True, wait: bool = False, keep_lock: bool = False):
    """:func:`open_run` for training, then the part masks (labelled / calibrated / voted when not cached) and the
    model: the :class:`~muva_core.train.run.RunContext` the steps of notebooks 04-05 share. With ``keep_lock`` the
    context holds the folder's lock until ``ctx.run.close()`` (:func:`train_protocol`)."""
    from .seeding import seed_everything
    from .train.distributed import init_distributed
    from .train.run import prepare_training, training_device

    info = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    device = training_device(cfg, info)
    run = open_run(cfg, progress=progress, wait=wait, keep_lock=True, dist=info, device=device)
    try:
        ctx = prepare_training(run, info, device, progress=progress)
    except BaseException:
        run.close()
        raise
    if not keep_lock:
        run.close()
    return ctx


def train_protocol(cfg: RunConfig, progress: bool = True, wait: bool = False):
    """The whole pipeline for ``cfg.data.protocol``; resumable; torchrun-aware (stage 2 under DDP). The run
    folder is locked throughout (another process's live lock raises :class:`~muva_core.locks.LockHeld`, or is
    waited for with ``wait``). Returns a :class:`~muva_core.train.run.RunResult`."""
    from .train.distributed import shutdown
    from .train.run import RunResult, finish_run, stage1, stage2

    ctx = prepare_run(cfg, progress, wait=wait, keep_lock=True)
    try:
        h1 = stage1(ctx, progress)
        h2 = stage2(ctx, progress)
        metrics, iou = finish_run(ctx, progress)
        return RunResult(ctx.folder, metrics, h1, h2, iou, time.perf_counter() - ctx.started)
    finally:
        ctx.run.close()
        shutdown(ctx.info)
