"""Seeding and random-number-generator state: reproducible runs and exact resumption.

``seed_everything`` seeds Python, NumPy and torch (CPU and every CUDA device) and, by default,
asks torch for deterministic kernels. ``worker_init_fn`` gives every DataLoader worker its own
NumPy / Python seed derived from torch's per-worker seed. ``rng_state`` / ``set_rng_state``
capture and restore all global generators; the checkpoint module stores them (torch states
as uint8 tensors, Python and NumPy states as JSON-compatible lists), never with pickle.
"""
from __future__ import annotations

import os
import random
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "worker_init_fn", "seeded_generator", "rng_state", "set_rng_state"]


def seed_everything(seed: int, deterministic: bool = True) -> int:
    """Seed ``random``, ``numpy`` and ``torch`` (CPU and all CUDA devices); return ``seed``.

    deterministic=True: ``torch.use_deterministic_algorithms(True, warn_only=True)`` (ops without
    a deterministic implementation warn instead of failing), ``cudnn.deterministic=True``,
    ``cudnn.benchmark=False`` and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when not already set (cuBLAS
    reads it when CUDA initialises, so call this before the first CUDA operation).
    deterministic=False: deterministic algorithms off and ``cudnn.benchmark=True`` (fastest).
    ``PYTHONHASHSEED`` is exported too, which only affects subprocesses (e.g. DataLoader workers
    started with ``spawn``): the current interpreter's hash seed is fixed at start-up.
    """
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily when CUDA is not yet initialised)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    return seed


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed NumPy and ``random`` from torch's per-worker seed.

    torch gives worker ``i`` the seed ``base_seed + i`` (``base_seed`` drawn from the main
    process generator, or the DataLoader's ``generator``), but NumPy and ``random`` in forked
    workers would otherwise all share the parent's state and produce identical augmentations.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (for a DataLoader's ``generator=``)."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def rng_state() -> dict[str, Any]:
    """The state of every global generator.

    Returns ``{"python": list, "numpy": list, "torch": uint8 tensor, "cuda": [uint8 tensor, ...]}``;
    ``python`` and ``numpy`` are JSON-serialisable, ``cuda`` is empty when CUDA is unavailable.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "python": [version, list(internal), gauss],
        "numpy": [str(name), np.asarray(keys).astype(np.uint32).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators from :func:`rng_state` output; absent entries are left untouched.

    CUDA states are restored for ``min(saved, available)`` devices; a different device count
    warns (exact resumption then holds only for the devices in common).
    """
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if state.get("numpy") is not None:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if state.get("torch") is not None:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda = list(state.get("cuda") or [])
    if cuda:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available != len(cuda):
            warnings.warn(
                f"saved RNG states for {len(cuda)} CUDA device(s), {available} available: "
                f"restoring {min(available, len(cuda))}",
                stacklevel=2,
            )
        for i in range(min(available, len(cuda))):
            torch.cuda.set_rng_state(torch.as_tensor(cuda[i], dtype=torch.uint8).cpu(), device=i)
