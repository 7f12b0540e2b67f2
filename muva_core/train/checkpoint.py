"""Training checkpoints: one safetensors file per checkpoint, written atomically, no pickle.

Layout of a checkpoint file:

* tensors, flattened with a prefix per section:
  ``model.<key>``, ``prompts.<key>``, ``memory.<key>`` (state dicts; DDP's ``module.`` and
  ``torch.compile``'s ``_orig_mod.`` prefixes removed), ``optim.state.<param_idx>.<name>``
  (optimiser state tensors, e.g. Adam's ``exp_avg``, ``exp_avg_sq``, ``step``),
  ``rng.torch`` and ``rng.cuda.<i>`` (generator states, uint8).
* safetensors metadata (string -> string), JSON-encoded where structured:
  ``format`` / ``format_version``, ``epoch`` and ``step`` (epochs / steps completed when saved),
  ``config``, ``extra``, ``sections``, ``optimizer`` (class, ``param_groups`` and non-tensor
  state values), ``scheduler`` (class and ``state_dict``), ``scaler`` (a float16 GradScaler's
  ``state_dict``: loss scale, growth tracker, factors), ``rng`` (Python and NumPy states),
  ``torch_version``.

JSON keeps tuples, dicts with non-string keys and ``collections.Counter`` through small tags,
so an optimiser's ``betas`` come back as a tuple. Writing goes through
:func:`muva_core.io.atomic_path`: a crash during a save leaves the previous file intact.
Every tensor is copied to its own contiguous CPU storage before writing, so tied weights
(which safetensors refuses) are saved as independent copies and re-tied by ``load_state_dict``.

Under DDP save from rank 0 only (:class:`CheckpointManager` does so); the RNG states stored are
those of the saving process.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from muva_core.io import atomic_path
from muva_core.seeding import rng_state, set_rng_state

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_info",
    "latest_checkpoint",
    "CheckpointManager",
    "unwrap_model",
]

FORMAT = "muva-checkpoint"
FORMAT_VERSION = 1
EPOCH_FILE_RE = re.compile(r"^ckpt-epoch-(\d+)\.safetensors$")
LAST_FILE = "last.safetensors"
_MAX_LISTED = 5


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file and the problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


# ---- JSON with tags ----------------------------------------------------------------------
def _to_json(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Counter):
        return {"__counter__": [[_to_json(k, where), _to_json(v, where)] for k, v in obj.items()]}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: _to_json(v, where) for k, v in obj.items()}
        return {"__items__": [[_to_json(k, where), _to_json(v, where)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v, where) for v in obj]}
    if isinstance(obj, list):
        return [_to_json(v, where) for v in obj]
    try:  # numpy scalars / 0-d tensors holding a plain number
        import numpy as np

        if isinstance(obj, np.generic):
            return _to_json(obj.item(), where)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Tensor) and obj.numel() == 1 and obj.dim() == 0:
        return {"__tensor_scalar__": obj.item(), "dtype": str(obj.dtype).replace("torch.", "")}
    raise CheckpointError(f"{where}: cannot store a {type(obj).__name__} in checkpoint metadata (JSON only)")


def _from_json(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (tag, value), = obj.items()
            if tag == "__tuple__":
                return tuple(_from_json(v) for v in value)
            if tag == "__items__":
                return {_from_json(k): _from_json(v) for k, v in value}
            if tag == "__counter__":
                return Counter({_from_json(k): _from_json(v) for k, v in value})
            if tag == "__float__":
                return float(value)
        if set(obj) == {"__tensor_scalar__", "dtype"}:
            return torch.tensor(obj["__tensor_scalar__"], dtype=getattr(torch, obj["dtype"]))
        return {k: _from_json(v) for k, v in obj.items()}
    return obj


def _dumps(obj: Any, where: str) -> str:
    return json.dumps(_to_json(obj, where), allow_nan=False)


# ---- state helpers -----------------------------------------------------------------------
def unwrap_model(module: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(module, "module", None)
        if isinstance(inner, nn.Module) and isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = inner
            continue
        orig = getattr(module, "_orig_mod", None)
        if isinstance(orig, nn.Module):
            module = orig
            continue
        return module


def _strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``module.`` / ``_orig_mod.`` when *every* key carries it (a wrapped model's state dict)."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _state_tensors(obj: nn.Module | Mapping[str, Tensor], section: str) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):
        state = unwrap_model(obj).state_dict()
    else:
        state = _strip_wrapper_prefixes(obj)
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{section} state entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(state)


def _cpu_copy(t: Tensor) -> Tensor:
    # own storage (safetensors refuses shared / overlapping tensors), contiguous, on CPU
    return t.detach().to("cpu", copy=True).contiguous()


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---- save --------------------------------------------------------------------------------
def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | Mapping[str, Tensor] | None = None,
    prompts: nn.Module | Mapping[str, Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    memory: nn.Module | None = None,
    scaler: Any = None,
    epoch: int,
    step: int = 0,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    rng: bool = True,
) -> Path:
    """Write one safetensors checkpoint atomically and return its path.

    epoch / step: epochs and optimiser steps completed. config: the run configuration (a
    JSON-compatible dict, e.g. ``RunConfig.to_flat()``, or a dataclass, stored as ``asdict``). extra: any JSON-compatible payload
    (metrics, stage name, ...). rng=True stores the Python, NumPy, torch CPU and CUDA generator
    states, so a resumed run draws the same random numbers. scaler: a ``torch.amp.GradScaler`` whose
    loss scale and growth tracker a resumed float16 run continues from.
    """
    path = Path(path)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    tensors: dict[str, Tensor] = {}
    sections: list[str] = []
    meta: dict[str, str] = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "epoch": str(int(epoch)),
        "step": str(int(step)),
        "config": _dumps(dict(config), f"{path}: config"),
        "extra": _dumps(dict(extra or {}), f"{path}: extra"),
        "torch_version": torch.__version__,
    }
    for name, obj in (("model", model), ("prompts", prompts), ("memory", memory)):
        if obj is None:
            continue
        for key, value in _state_tensors(obj, name).items():
            tensors[f"{name}.{key}"] = _cpu_copy(value)
        sections.append(name)
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, pstate in state["state"].items():
            for key, value in pstate.items():
                if isinstance(value, Tensor):
                    tensors[f"optim.state.{int(idx)}.{key}"] = _cpu_copy(value)
                else:
                    scalars.setdefault(str(int(idx)), {})[key] = value
        meta["optimizer"] = _dumps(
            {"class": type(optimizer).__name__, "param_groups": state["param_groups"], "scalars": scalars},
            f"{path}: optimizer state",
        )
        sections.append("optimizer")
    if scheduler is not None:
        meta["scheduler"] = _dumps(
            {"class": type(scheduler).__name__, "state": scheduler.state_dict()}, f"{path}: scheduler state"
        )
        sections.append("scheduler")
    if scaler is not None:
        meta["scaler"] = _dumps({"class": type(scaler).__name__, "state": scaler.state_dict()}, f"{path}: scaler state")
        sections.append("scaler")
    if rng:
        state = rng_state()
        tensors["rng.torch"] = _cpu_copy(state["torch"])
        for i, s in enumerate(state["cuda"]):
            tensors[f"rng.cuda.{i}"] = _cpu_copy(s)
        meta["rng"] = _dumps({"python": state["python"], "numpy": state["numpy"]}, f"{path}: RNG state")
        sections.append("rng")
    meta["sections"] = json.dumps(sections)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


# ---- load --------------------------------------------------------------------------------
def _open(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers / truncation
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a MUVA checkpoint (metadata format={meta.get('format')!r}, expected {FORMAT!r})")
    return meta, tensors


def _listed(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _load_module(
    path: Path, section: str, module: nn.Module, tensors: dict[str, Tensor], strict: bool
) -> dict[str, list[str]]:
    prefix = f"{section}."
    saved = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    target = unwrap_model(module)
    expected = target.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shape = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved and isinstance(v, Tensor) and tuple(saved[k].shape) != tuple(v.shape)
    ]
    if strict and (missing or unexpected or shape):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
        if shape:
            parts.append(f"{len(shape)} shape mismatch(es) (saved vs expected): {_listed(shape)}")
        raise CheckpointError(f"{path}: {section} state does not match the given object: " + "; ".join(parts))
    bad_shape = {s.split(" ", 1)[0] for s in shape}
    load = {k: v for k, v in saved.items() if k in expected and k not in bad_shape}
    target.load_state_dict(load, strict=strict)
    return {"missing": missing, "unexpected": unexpected, "shape_mismatch": shape}


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """Metadata only (no tensors read): ``epoch``, ``step``, ``config``, ``extra``, ``sections``, ``path``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a MUVA checkpoint (metadata format={meta.get('format')!r})")
    return _info(path, meta)


def _info(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    try:
        return {
            "path": path,
            "epoch": int(meta["epoch"]),
            "step": int(meta.get("step", "0")),
            "config": _from_json(json.loads(meta.get("config", "{}"))),
            "extra": _from_json(json.loads(meta.get("extra", "{}"))),
            "sections": json.loads(meta.get("sections", "[]")),
        }
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({type(exc).__name__}: {exc})") from exc


def load_checkpoint(
    path: str | Path,
    model: nn.Module | None = None,
    prompts: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    memory: nn.Module | None = None,
    strict: bool = True,
    restore_rng: bool = True,
    scaler: Any = None,
) -> dict[str, Any]:
    """Restore the given objects from ``path``; return ``{epoch, step, config, extra, ...}``.

    Objects left ``None`` are not touched. strict=True: a requested section absent from the
    file, or a state with missing / unexpected keys or other shapes, raises
    :class:`CheckpointError` naming the file and listing the first keys; strict=False loads
    what matches and reports the rest under ``"report"``. Construct the scheduler before
    calling this (a scheduler's constructor overwrites the optimiser's learning rates).
    restore_rng=True also restores the generator states saved with the checkpoint.
    """
    path = Path(path)
    meta, tensors = _open(path)
    info = _info(path, meta)
    present = set(info["sections"])
    report: dict[str, Any] = {"skipped": []}

    def absent(section: str) -> bool:
        if section in present:
            return False
        if strict:
            raise CheckpointError(f"{path}: has no {section} state (it holds: {sorted(present) or 'nothing'})")
        report["skipped"].append(section)
        return True

    for section, obj in (("model", model), ("prompts", prompts), ("memory", memory)):
        if obj is not None and not absent(section):
            if not isinstance(obj, nn.Module):
                raise TypeError(f"load_checkpoint: {section} must be an nn.Module, got {type(obj).__name__}")
            report[section] = _load_module(path, section, obj, tensors, strict)
    if optimizer is not None and not absent("optimizer"):
        saved = _from_json(json.loads(meta["optimizer"]))
        if saved["class"] != type(optimizer).__name__:
            raise CheckpointError(f"{path}: optimizer state is for {saved['class']}, got {type(optimizer).__name__}")
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim.state."):
                idx, name = key[len("optim.state."):].split(".", 1)
                state.setdefault(int(idx), {})[name] = value
        for idx, values in saved["scalars"].items():
            state.setdefault(int(idx), {}).update(values)
        try:
            optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: optimizer state does not fit the given optimizer ({exc})") from exc
    if scheduler is not None and not absent("scheduler"):
        saved = _from_json(json.loads(meta["scheduler"]))
        if saved["class"] != type(scheduler).__name__:
            raise CheckpointError(f"{path}: scheduler state is for {saved['class']}, got {type(scheduler).__name__}")
        scheduler.load_state_dict(saved["state"])
    if scaler is not None and not absent("scaler"):
        saved = _from_json(json.loads(meta["scaler"]))
        if saved["class"] != type(scaler).__name__:
            raise CheckpointError(f"{path}: scaler state is for {saved['class']}, got {type(scaler).__name__}")
        scaler.load_state_dict(saved["state"])
    if restore_rng and "rng" in present:
        saved = _from_json(json.loads(meta["rng"]))
        cuda = []
        i = 0
        while f"rng.cuda.{i}" in tensors:
            cuda.append(tensors[f"rng.cuda.{i}"])
            i += 1
        set_rng_state({"python": saved["python"], "numpy": saved["numpy"], "torch": tensors["rng.torch"], "cuda": cuda})
    out = {k: info[k] for k in ("epoch", "step", "config", "extra")}
    out["path"] = path
    out["sections"] = info["sections"]
    out["report"] = report
    return out


# ---- run directories ---------------------------------------------------------------------
def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most advanced checkpoint in ``run_dir`` (by saved epoch, then step), or ``None``.

    Candidates are ``ckpt-epoch-NNNN.safetensors`` and ``last.safetensors``; on a tie the epoch
    file wins. Unreadable files are skipped with a warning.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    best: tuple[int, int, int] | None = None
    best_path: Path | None = None
    for p in run_dir.iterdir():
        if not (EPOCH_FILE_RE.match(p.name) or p.name == LAST_FILE):
            continue
        try:
            info = read_checkpoint_info(p)
        except CheckpointError as exc:
            warnings.warn(f"skipping unreadable checkpoint: {exc}", stacklevel=2)
            continue
        rank = (info["epoch"], info["step"], 1 if p.name != LAST_FILE else 0)
        if best is None or rank > best:
            best, best_path = rank, p
    return best_path


class CheckpointManager:
    """Checkpoints of one run directory: per-epoch files, a rolling ``last`` file, pruning, resume.

    ``save(epoch=...)`` writes ``ckpt-epoch-{epoch:04d}.safetensors`` and deletes the oldest
    epoch files beyond ``keep_last`` (``None`` keeps all); ``save_last`` writes
    ``last.safetensors`` (e.g. mid-epoch, for pre-emption). Under ``torch.distributed`` only
    rank 0 writes or deletes; other ranks return the path without writing.
    """

    def __init__(self, run_dir: str | Path, keep_last: int | None = 2) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last

    def path_for(self, epoch: int) -> Path:
        return self.run_dir / f"ckpt-epoch-{int(epoch):04d}.safetensors"

    @property
    def last_path(self) -> Path:
        return self.run_dir / LAST_FILE

    def checkpoints(self) -> list[Path]:
        """Per-epoch checkpoint files, oldest first."""
        if not self.run_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.run_dir.iterdir() if (m := EPOCH_FILE_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, *, epoch: int, **kwargs: Any) -> Path:
        """``save_checkpoint`` into the epoch file, then prune; kwargs as :func:`save_checkpoint`."""
        path = self.path_for(epoch)
        if not _is_main_process():
            return path
        save_checkpoint(path, epoch=epoch, **kwargs)
        if self.keep_last is not None:
            for old in self.checkpoints()[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def save_last(self, *, epoch: int, **kwargs: Any) -> Path:
        """``save_checkpoint`` into ``last.safetensors``."""
        if _is_main_process():
            save_checkpoint(self.last_path, epoch=epoch, **kwargs)
        return self.last_path

    def latest(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def resume(self, **objects: Any) -> dict[str, Any] | None:
        """Load the latest checkpoint into ``objects`` (kwargs of :func:`load_checkpoint`); ``None`` if none."""
        path = self.latest()
        return None if path is None else load_checkpoint(path, **objects)
