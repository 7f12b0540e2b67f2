"""Learning-rate schedules and optimiser parameter groups (paper section 4.2).

Both schedulers are ordinary ``torch.optim.lr_scheduler.LRScheduler`` subclasses with a
closed-form learning rate, stepped once per epoch *after* the epoch (``scheduler.step()``):
the learning rate used during 0-based epoch ``e`` is ``base_lr * factor(e)``. Every parameter
group keeps its own base learning rate (so the RMP groups stay at 10x). ``state_dict`` holds
only numbers and lists (JSON-serialisable, as the checkpoint stores it).

Reference-code note: the authors (as CLIP-ReID) call ``scheduler.step(epoch)`` with the
1-based epoch *before* each epoch, so their epoch ``n`` (1-based) uses ``factor(n)`` where
the workbook uses ``factor(n - 1)``: their warm-up starts one step in (0.19 rather than 0.1 of the
base for stage 2) and each decay comes one epoch earlier. Milestones here count epochs
completed: with ``milestones=(30, 50)`` epochs 0-29 (1-based 1-30) run before the first decay.
``lr_schedule: reference`` reproduces it: the training loops call :func:`step_before_epoch` (one
``step()`` at the start of every epoch, so 1-based epoch ``n`` runs at ``factor(n)``) instead of
:func:`step_after_epoch`, and stage 1 uses timm's cosine (``cosine_from_zero=True``). Both keep
``last_epoch`` = epochs finished at every epoch boundary, so checkpoints resume either way.
"""
from __future__ import annotations

import math
import re
import warnings
from bisect import bisect_right
from typing import Iterable, Mapping

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupMultiStepLR", "WarmupCosineLR", "make_param_groups", "step_before_epoch", "step_after_epoch"]


def step_before_epoch(scheduler, lr_schedule: str) -> None:
    """At the start of an epoch: ``step()`` under ``lr_schedule="reference"`` (the epoch then runs at the
    1-based epoch's learning rate, as the reference's ``scheduler.step(epoch)``), nothing otherwise."""
    if lr_schedule == "reference":
        with warnings.catch_warnings():  # the closed-form schedules skip nothing when stepped first
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            scheduler.step()


def step_after_epoch(scheduler, lr_schedule: str) -> None:
    """At the end of an epoch: ``step()`` under ``lr_schedule="workbook"`` (0-based epochs), nothing otherwise."""
    if lr_schedule not in ("workbook", "reference"):
        raise ValueError(f"lr_schedule must be 'workbook' or 'reference', got {lr_schedule!r}")
    if lr_schedule == "workbook":
        scheduler.step()


class WarmupMultiStepLR(LRScheduler):
    """Linear (or constant) warm-up, then step decay by ``gamma`` at each milestone (stage 2).

    ``factor(e) = w(e) * gamma ** #{m in milestones: m <= e}`` with, for ``e < warmup_epochs``,
    ``w(e) = warmup_factor * (1 - e / warmup_epochs) + e / warmup_epochs`` (linear) or
    ``warmup_factor`` (constant), and 1 afterwards. Defaults are the reference stage-2 schedule:
    10 warm-up epochs from 0.1, decay x0.1 at epochs 30 and 50 (60 epochs in all).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Iterable[int] = (30, 50),
        gamma: float = 0.1,
        warmup_factor: float = 0.1,
        warmup_epochs: int = 10,
        warmup_method: str = "linear",
        last_epoch: int = -1,
    ) -> None:
        milestones = [int(m) for m in milestones]
        if milestones != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {milestones}")
        if warmup_method not in ("linear", "constant"):
            raise ValueError(f"warmup_method must be 'linear' or 'constant', got {warmup_method!r}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.milestones = milestones
        self.gamma = float(gamma)
        self.warmup_factor = float(warmup_factor)
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_method = warmup_method
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch: int) -> float:
        """The multiplier of the base learning rate during 0-based epoch ``epoch``."""
        warm = 1.0
        if epoch < self.warmup_epochs:
            if self.warmup_method == "constant":
                warm = self.warmup_factor
            else:
                alpha = epoch / self.warmup_epochs
                warm = self.warmup_factor * (1.0 - alpha) + alpha
        return warm * self.gamma ** bisect_right(self.milestones, epoch)

    def get_lr(self) -> list[float]:
        return self._get_closed_form_lr()

    def _get_closed_form_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]


class WarmupCosineLR(LRScheduler):
    """Linear warm-up, then cosine annealing to ``eta_min`` (stage 1).

    For ``e < warmup_epochs`` the learning rate goes linearly from ``start`` to ``base_lr``:
    ``start + (base_lr - start) * e / warmup_epochs`` with ``start = warmup_lr_init`` when given
    (an absolute value for every group, the reference code's timm ``warmup_lr_init=1e-5``) or
    ``warmup_factor * base_lr``. Then ``eta_min + (base_lr - eta_min) * (1 + cos(pi * t)) / 2`` with
    ``t = (e - warmup_epochs) / (max_epochs - warmup_epochs)``, so the last epoch runs just above
    ``eta_min`` (absolute, as in ``CosineAnnealingLR``). Defaults: 120 epochs, 5 warm-up epochs
    from 1e-5, to 1e-6 (the reference stage-1 schedule).

    ``cosine_from_zero=True`` is timm's ``CosineLRScheduler`` as the reference builds it
    (``warmup_prefix=False``, ``cycle_limit=1``): after the warm-up the cosine is
    ``eta_min + (base_lr - eta_min) * (1 + cos(pi * e / max_epochs)) / 2``, counted from epoch 0 (not
    from the end of the warm-up), and ``eta_min`` from ``e = max_epochs`` on.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_epochs: int = 120,
        warmup_epochs: int = 5,
        eta_min: float = 1e-6,
        warmup_factor: float = 0.01,
        warmup_lr_init: float | None = 1e-5,
        last_epoch: int = -1,
        cosine_from_zero: bool = False,
    ) -> None:
        if max_epochs <= warmup_epochs:
            raise ValueError(f"max_epochs ({max_epochs}) must exceed warmup_epochs ({warmup_epochs})")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.max_epochs = int(max_epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.eta_min = float(eta_min)
        self.warmup_factor = float(warmup_factor)
        self.warmup_lr_init = None if warmup_lr_init is None else float(warmup_lr_init)
        self.cosine_from_zero = bool(cosine_from_zero)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, epoch: int) -> float:
        """The learning rate of a group with base ``base_lr`` during 0-based epoch ``epoch``."""
        if epoch < self.warmup_epochs:
            start = self.warmup_lr_init if self.warmup_lr_init is not None else self.warmup_factor * base_lr
            return start + (base_lr - start) * epoch / self.warmup_epochs
        if self.cosine_from_zero:
            if epoch >= self.max_epochs:
                return self.eta_min
            return self.eta_min + 0.5 * (base_lr - self.eta_min) * (1.0 + math.cos(math.pi * epoch / self.max_epochs))
        t = min(1.0, (epoch - self.warmup_epochs) / (self.max_epochs - self.warmup_epochs))
        return self.eta_min + (base_lr - self.eta_min) * 0.5 * (1.0 + math.cos(math.pi * t))

    def get_lr(self) -> list[float]:
        return self._get_closed_form_lr()

    def _get_closed_form_lr(self) -> list[float]:
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]


_NO_DECAY_MODULES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of biases and of the parameters of normalisation layers."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias" or p_name.endswith("_bias") or isinstance(module, _NO_DECAY_MODULES):
                names.add(full)
    return names


def make_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    lr_scale_patterns: Mapping[str, float] | None = None,
    weight_decay_patterns: Mapping[str, float] | None = None,
    no_decay_bias_norm: bool = False,
) -> list[dict]:
    """Optimiser parameter groups: trainable parameters only, RMP at 10x learning rate.

    lr_scale_patterns: ``{regex: lr multiplier}``, searched (``re.search``) in each parameter's
        name; the first matching pattern wins. Default ``{"rmp": 10.0}`` (paper 4.2: the RMP
        modules at 10x). Frozen parameters (``requires_grad=False``) are skipped.
    weight_decay_patterns: ``{regex: weight decay}`` overriding ``weight_decay`` for matching
        names. Default ``None`` (one weight decay for all). The reference code gives the RMP
        parameters weight decay 0: ``{"rmp": 0.0}`` replicates it.
    no_decay_bias_norm: exempt biases and normalisation-layer parameters from weight decay.
        Default ``False``, as the reference code (Adam with L2 weight decay 1e-4 on all
        non-RMP parameters, biases and norms included); ``True`` is the common modern choice.

    Parameters with equal (lr, weight decay) share one group; each group carries a ``name``
    (``"default"``, ``"lr_x10"``, ``"no_decay"``, ``"lr_x10_no_decay"``, ...). Group entries stay
    JSON-serialisable (the checkpoint stores them). Raises when nothing is trainable.
    """
    lr_scale_patterns = {"rmp": 10.0} if lr_scale_patterns is None else dict(lr_scale_patterns)
    weight_decay_patterns = dict(weight_decay_patterns or {})
    lr_res = [(re.compile(p), float(s)) for p, s in lr_scale_patterns.items()]
    wd_res = [(re.compile(p), float(w)) for p, w in weight_decay_patterns.items()]
    while isinstance(getattr(model, "module", None), nn.Module):  # DDP / DataParallel
        model = model.module
    no_decay = _no_decay_names(model) if no_decay_bias_norm else set()

    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = next((s for r, s in lr_res if r.search(name)), 1.0)
        wd = next((w for r, w in wd_res if r.search(name)), float(weight_decay))
        if name in no_decay:
            wd = 0.0
        key = (scale, wd)
        if key not in groups:
            parts = [f"lr_x{scale:g}"] if scale != 1.0 else []
            if wd != float(weight_decay):
                parts.append("no_decay" if wd == 0.0 else f"wd_{wd:g}")
            label = "_".join(parts) or "default"
            groups[key] = {"params": [], "lr": base_lr * scale, "weight_decay": wd, "name": label}
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("make_param_groups: the model has no trainable parameter (all requires_grad=False)")
    return list(groups.values())
