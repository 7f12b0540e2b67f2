"""The numeric precision a training step runs in: autocast on or off, its dtype, and the loss scaler.

GPU (``amp`` on): ``torch.autocast("cuda", amp_dtype)``; float16 (the reference recipe: ``amp.autocast``
+ ``GradScaler``) with ``torch.amp.GradScaler("cuda")``.

CPU, as ``cpu_amp`` says (an operational key: it does not name another run):

``native`` (default)  autocast only where this CPU does the arithmetic of ``amp_dtype`` in hardware
                      (float16: AVX512-FP16 or AMX-FP16, on ARM the half-precision SIMD; bfloat16:
                      AVX512-BF16 or AMX). float16 asked for but only bfloat16 native: bfloat16; neither:
                      float32. Without them torch emulates half precision: on a 2-core AMD EPYC with AVX2
                      a 1024x768 @ 768x3072 matmul ran at 0.4 GFLOPS in float16 and bfloat16 against 17.7 in
                      float32 (45x), and a stage-2 step of the ``small`` backbone took 146 s in float16
                      against 11 s in float32 (measured for issue 19).
``always``            autocast in ``amp_dtype`` whatever it costs: ``torch.autocast("cpu")``, and for
                      float16 ``torch.amp.GradScaler("cpu")``; where torch's CPU autocast lacks float16
                      (older torch: it warns and disables itself) bfloat16 instead.
``never``             float32.

The environment variable ``MUVA_CPU_AMP=0`` turns ``native`` into float32 on every CPU (the test suite sets it, so
that its numbers are the same on a CPU with native bfloat16 as on one without); ``always`` and ``never`` win over it.

:func:`precision_plan` returns the choice with one sentence saying what runs and why; a run prints it
once (``prepare_run``) and ``muva doctor`` shows it.
"""
from __future__ import annotations

import os
import platform
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["CPU_AMP", "CPU_AMP_ENV", "Precision", "cpu_capabilities", "precision_plan", "make_scaler", "scaler_step"]

CPU_AMP = ("native", "always", "never")
"""Values of ``cpu_amp``."""

CPU_AMP_ENV = "MUVA_CPU_AMP"
"""``0``: ``cpu_amp: native`` runs float32 whatever the CPU (``1`` or unset: as the CPU allows)."""


@dataclass(frozen=True)
class Precision:
    """``autocast``: whether the forward runs under autocast; ``dtype``: its dtype (float32 when off);
    ``scaler``: whether a GradScaler scales the loss (float16 only); ``note``: what runs and why."""

    autocast: bool
    dtype: torch.dtype
    scaler: bool
    note: str

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return flags


def _probe(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if callable(fn) else False
    except Exception:  # noqa: BLE001 - a capability probe never fails a run
        return False


@lru_cache(maxsize=1)
def _float16_autocast_works() -> bool:
    """Torch's CPU autocast runs float16 (and a CPU GradScaler exists): older versions warn and fall back."""
    try:
        torch.amp.GradScaler("cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast("cpu", dtype=torch.float16):
                out = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
        return out.dtype == torch.float16
    except Exception:  # noqa: BLE001
        return False


@lru_cache(maxsize=1)
def cpu_capabilities() -> dict:
    """What this CPU and torch offer for half precision: ``capability`` (torch's SIMD level, e.g. AVX2),
    ``float16_native`` / ``bfloat16_native`` (hardware arithmetic), ``float16_autocast`` (torch's CPU autocast
    runs float16 with a CPU GradScaler)."""
    flags = _cpu_flags()
    arm = platform.machine().lower() in ("aarch64", "arm64")
    fp16 = _probe("_is_amx_fp16_supported") or "avx512_fp16" in flags or (arm and "asimdhp" in flags)
    bf16 = _probe("_is_avx512_bf16_supported") or _probe("_is_amx_tile_supported") or "avx512_bf16" in flags \
        or "amx_bf16" in flags or (arm and "bf16" in flags)
    return {"capability": torch.backends.cpu.get_cpu_capability(), "float16_native": bool(fp16),
            "bfloat16_native": bool(bf16), "float16_autocast": _float16_autocast_works()}


def precision_plan(device, cfg) -> Precision:
    """The precision of a training step on ``device`` under ``cfg`` (``amp``, ``amp_dtype``, ``cpu_amp``)."""
    t = cfg.train
    want = torch.float16 if t.amp_dtype == "float16" else torch.bfloat16
    name = t.amp_dtype
    if torch.device(device).type == "cuda":
        if not t.amp:
            return Precision(False, torch.float32, False, "float32 (amp: false)")
        scaler = want == torch.float16
        return Precision(True, want, scaler, f"{name} autocast" + (" + GradScaler" if scaler else "") + " on the GPU")
    if torch.device(device).type != "cpu" or not t.amp or t.cpu_amp == "never":
        why = "amp: false" if not t.amp else ("cpu_amp: never" if t.cpu_amp == "never" else f"device {device}")
        return Precision(False, torch.float32, False, f"float32 ({why})")
    caps = cpu_capabilities()
    if t.cpu_amp == "always":
        if want == torch.float16 and not caps["float16_autocast"]:
            return Precision(True, torch.bfloat16, False, f"bfloat16 autocast on the CPU: torch {torch.__version__}'s "
                             "CPU autocast does not run float16 (asked for by amp_dtype: float16, cpu_amp: always)")
        scaler = want == torch.float16
        native = caps["float16_native" if scaler else "bfloat16_native"]
        slow = "" if native else (f"; this CPU ({caps['capability']}) has no {name} arithmetic, so its matmuls are "
                                  "emulated (tens of times slower than float32)")
        return Precision(True, want, scaler, f"{name} autocast" + (" + GradScaler('cpu')" if scaler else "")
                         + f" on the CPU (cpu_amp: always){slow}")
    # native
    env = os.environ.get(CPU_AMP_ENV, "").strip()
    if env not in ("", "0", "1"):
        raise ValueError(f"{CPU_AMP_ENV}={env!r}: expected 0 or 1 (or unset)")
    if env == "0":
        return Precision(False, torch.float32, False, f"float32 on the CPU ({CPU_AMP_ENV}=0)")
    if want == torch.float16 and caps["float16_native"] and caps["float16_autocast"]:
        return Precision(True, torch.float16, True, "float16 autocast + GradScaler('cpu') on the CPU "
                         f"({caps['capability']} computes float16 natively)")
    if caps["bfloat16_native"]:
        instead = " instead of float16 (no native float16 on this CPU)" if want == torch.float16 else ""
        return Precision(True, torch.bfloat16, False, f"bfloat16 autocast on the CPU{instead}")
    return Precision(False, torch.float32, False,
                     f"float32 on the CPU: this CPU ({caps['capability']}) has no native {name} arithmetic, and "
                     f"emulated {name} is tens of times slower than float32 (cpu_amp: always runs it anyway)")


def make_scaler(device, plan: Precision):
    """The GradScaler of ``plan`` on ``device`` (None when the plan has none)."""
    return torch.amp.GradScaler(torch.device(device).type) if plan.scaler else None


def scaler_step(loss: torch.Tensor, optimizer, scaler) -> bool:
    """``loss.backward(); optimizer.step()`` through ``scaler`` when there is one; False when the scaler
    found inf/NaN gradients and skipped the step (it lowers its scale then)."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        return True
    scaler.scale(loss).backward()
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return not scaler.get_scale() < before
