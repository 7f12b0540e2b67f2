"""Which autocast a run uses on its device: one decision for training, feature extraction and the benchmarks.

* GPU: ``train.amp`` on -> autocast in ``train.amp_dtype`` (bfloat16, or float16 with a GradScaler under the
  reference recipe).
* CPU: ``train.cpu_amp``:
  - ``auto`` (the default): bfloat16 autocast where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX;
    about 1.9x a float32 step there), float32 elsewhere (on an AVX2-only CPU bfloat16 is emulated and much
    slower than float32). The environment variable ``MUVA_CPU_AMP`` = ``0`` / ``1`` overrides the detection (the
    test suite sets ``0`` so that its numbers are the same on every machine);
  - ``on``: bfloat16 autocast on any CPU (slow where it is emulated); ``off``: float32.
  Float16 autocast (``amp_dtype: float16``) stays a GPU setting: on CPU the run uses bfloat16 under the same rule.

:func:`autocast_settings` returns ``(enabled, dtype)``; :func:`describe` says it in words for the run's log.
"""
from __future__ import annotations

import os

import torch

__all__ = ["CPU_AMP_ENV", "cpu_has_native_bf16", "autocast_settings", "autocast", "describe"]

CPU_AMP_ENV = "MUVA_CPU_AMP"


def cpu_has_native_bf16() -> bool:
    """True where this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _cpu_amp_on(mode: str) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    env = os.environ.get(CPU_AMP_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise ValueError(f"{CPU_AMP_ENV}={env!r}: expected 0 or 1 (or unset for automatic detection)")
    return cpu_has_native_bf16()


def autocast_settings(device, cfg) -> tuple[bool, torch.dtype]:
    """``(autocast on, its dtype)`` for ``cfg`` on ``device`` (see the module docstring)."""
    dev = torch.device(device).type
    dtype = torch.float16 if cfg.train.amp_dtype == "float16" else torch.bfloat16
    if not cfg.train.amp:
        return False, dtype
    if dev == "cuda":
        return True, dtype
    if dev == "cpu":
        return _cpu_amp_on(cfg.train.cpu_amp), torch.bfloat16
    return False, dtype


def autocast(device, cfg):
    """The ``torch.autocast`` context of :func:`autocast_settings`."""
    on, dtype = autocast_settings(device, cfg)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=on)


def describe(device, cfg) -> str:
    """``"bfloat16 autocast"`` / ``"float32"``, with the reason on CPU."""
    on, dtype = autocast_settings(device, cfg)
    name = str(dtype).removeprefix("torch.")
    if torch.device(device).type != "cpu":
        return f"{name} autocast" if on else "float32"
    native = cpu_has_native_bf16()
    why = "this CPU has native bfloat16" if native else "this CPU has no native bfloat16"
    mode = cfg.train.cpu_amp
    if mode != "auto" or os.environ.get(CPU_AMP_ENV, "").strip() in ("0", "1"):
        why = f"cpu_amp={mode}" + (f", {CPU_AMP_ENV}={os.environ[CPU_AMP_ENV]}" if mode == "auto" else "")
    return f"{name} autocast ({why})" if on else f"float32 ({why})"
