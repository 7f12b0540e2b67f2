"""The pretraining loop: one contrastive step, and :func:`pretrain_clip` (data, model, epochs with a resume state
after each, zero-shot reports before and after, the checkpoint and its report; reused when the settings are the
same, refused when they differ)."""
from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..io import write_json
from .config import PRETRAIN_FORMAT, PRETRAIN_FORMAT_VERSION, DEFAULT_EPOCHS, PretrainConfig
from .data import load_pretrain_images, make_batch
from .files import (CheckpointExistsError, checkpoint_file, partial_file, pretrain_data_root, read_pretrain_info,
                    report_file, save_clip)
from .model import TokenSelect, build_pretrain_clip, encode_text, make_optimizer
from .zeroshot import evaluate_zero_shot, evaluate_zero_shot_domains

__all__ = ["contrastive_step", "multi_positive_loss", "pretrain_clip"]


def multi_positive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                        positives: torch.Tensor | None = None,
                        negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with several positives: ``positives[i, j]`` = caption j is true of image i (the diagonal
    always; None = the diagonal only). Each image's target is uniform over its true captions, each caption's over
    the images it is true of; with only the diagonal true it equals open_clip's ClipLoss.

    negatives: ``[M, E]`` features of hard negative captions: further texts in every image's softmax, true of none
    (NegCLIP); they have no image, so they enter the image -> text direction only.
    """
    n = len(image_features)
    logits = logit_scale * image_features @ text_features.T
    eye = torch.eye(n, device=logits.device)
    pos = eye if positives is None else torch.maximum(positives.to(logits.device).float(), eye)
    i2t_logits, i2t_pos = logits, pos
    if negatives is not None and len(negatives):
        i2t_logits = torch.cat([logits, logit_scale * image_features @ negatives.T], dim=1)
        i2t_pos = torch.cat([pos, pos.new_zeros(n, len(negatives))], dim=1)
    i2t = -(i2t_pos / i2t_pos.sum(1, keepdim=True) * i2t_logits.log_softmax(1)).sum(1).mean()
    t2i = -(pos / pos.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (i2t + t2i) / 2


def contrastive_step(model: nn.Module, tokenizer, images: torch.Tensor, texts: Sequence[str],
                     optimizer: torch.optim.Optimizer | None, loss_fn: nn.Module | None = None,
                     keep: torch.Tensor | None = None, positives: torch.Tensor | None = None,
                     negatives: Sequence[str] | None = None) -> float:
    """One contrastive step on (image, caption) pairs; returns the loss. ``optimizer=None``: loss only.

    keep: ``[B, K]`` patch tokens to keep per image (needs the model from :func:`build_pretrain_clip`).
    positives: ``[B, B]`` captions true of each image: :func:`multi_positive_loss` instead of ``loss_fn``
    (open_clip's ClipLoss by default). negatives: hard negative captions (:func:`multi_positive_loss`'s).
    """
    from open_clip.loss import ClipLoss

    loss_fn = loss_fn or ClipLoss()
    negatives = list(negatives or [])
    tokens = tokenizer(list(texts) + negatives).to(images.device)
    selector = model.visual.patch_dropout
    if keep is not None and not isinstance(selector, TokenSelect):
        raise TypeError("keep needs visual.patch_dropout = TokenSelect() (see build_pretrain_clip)")
    try:
        if keep is not None:
            selector.index = keep
        with torch.set_grad_enabled(optimizer is not None):
            img_f = nn.functional.normalize(model.encode_image(images), dim=-1)
            txt_f = nn.functional.normalize(encode_text(model, tokens), dim=-1)
            if positives is not None or negatives:
                n = len(texts)
                loss = multi_positive_loss(img_f, txt_f[:n], model.logit_scale.exp(), positives, txt_f[n:])
            else:
                loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
    finally:
        if isinstance(selector, TokenSelect):
            selector.index = None
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))
    return float(loss.detach())


def _differences(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the image renderers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class _Clock:
    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=_cpu_seconds)

    def lap(self) -> dict[str, float]:
        return {"wall_s": round(time.perf_counter() - self.wall, 2), "cpu_s": round(_cpu_seconds() - self.cpu, 2)}


def _partial_state(partial: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The resume state of an interrupted run with the same settings (None: start afresh); a partial file
    with other settings is refused unless ``overwrite`` (then it is removed)."""
    if not partial.is_file():
        return None
    from ..train.checkpoint import CheckpointError, read_checkpoint_info

    try:
        info = read_checkpoint_info(partial)
        old = info["config"]
    except CheckpointError:
        info, old = None, None
    if info is not None and old == settings:
        return info
    if not overwrite:
        diff = _differences(old, settings) if isinstance(old, dict) else ["not a pretrain-clip resume state"]
        raise CheckpointExistsError(f"{partial}: an interrupted pretraining with other settings ({'; '.join(diff)}); "
                                    "pass overwrite=True (--overwrite) to discard it, or choose another --out")
    partial.unlink()
    return None


def _progress_line(line: str) -> None:
    """One line per epoch to the run's progress log when a ``muva run`` kernel or the runner is listening."""
    from ..progress import report

    report(line, echo=False)


# ---------------------------------------------------------------------------------------------
# the entry point

def _reid_domains(root: str | os.PathLike | None) -> list[str]:
    """The synthetic Re-ID domains (A-D) generated under ``root``."""
    if root is None:
        return []
    from ..data.synthetic import read_manifest

    manifest = read_manifest(Path(root)) or {}
    return sorted(d for d in manifest.get("domains", {}) if d in "ABCD" and (Path(root) / f"synth_{d}").is_dir())


def pretrain_clip(out_dir: str | os.PathLike, backbone: str = "small", seed: int = 0, epochs: int | None = None,
                  scale: str = "pretrain", synth_root: str | os.PathLike | None = None, overwrite: bool = False,
                  progress: bool = True, reid_root: str | os.PathLike | None = None, threads: int | None = None,
                  **options: Any) -> Path:
    """Pretrain a named CLIP config on captioned synthetic pedestrians; return the checkpoint path.

    out_dir:    folder of ``clip-<backbone>-seed<seed>.safetensors`` and its ``.json`` report
    epochs:     default :data:`DEFAULT_EPOCHS` ``[backbone]``
    scale:      size of the pretraining set (``pretrain``; ``small`` for tests)
    synth_root: where the pretraining set is generated / reused (default :func:`pretrain_data_root`)
    overwrite:  replace a checkpoint made with other settings (otherwise :class:`CheckpointExistsError`)
    reid_root:  a generated synthetic Re-ID set (``synth_A`` .. ``synth_D``): the report adds the zero-shot accuracy
                on the test images of the domains it holds (``zero_shot["reid_domains"]``; not a setting)
    threads:    compute on this many CPU threads (default: torch's; not a setting). The weights' last bits follow
                the thread count (float sums split across threads): the same settings on the same number of
                threads and the same kind of CPU give the same weights; the report records the count
    options:    other :class:`PretrainConfig` fields (batch_size, lr, eval_images, ...)

    Returns at once when the checkpoint exists with the same settings.
    """
    from contextlib import nullcontext

    from ..eval.distance import torch_threads

    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads: expected a positive number of CPU threads, got {threads}")
    with nullcontext() if threads is None else torch_threads(int(threads)):
        return _pretrain_clip(out_dir, backbone, seed, epochs, scale, synth_root, overwrite, progress, reid_root,
                              **options)


def _pretrain_clip(out_dir, backbone, seed, epochs, scale, synth_root, overwrite, progress, reid_root,
                   **options: Any) -> Path:
    """:func:`pretrain_clip` on the threads it was given."""
    cfg = PretrainConfig(backbone=backbone, seed=int(seed), scale=scale,
                         epochs=int(epochs if epochs is not None else DEFAULT_EPOCHS.get(backbone, 4)), **options)
    settings = cfg.settings()
    path = checkpoint_file(out_dir, backbone, seed, cfg.image_size)
    partial = partial_file(path)
    if path.is_file():
        try:
            old = read_pretrain_info(path).get("settings", {})
        except RuntimeError:
            old = None
        if old == settings:
            if progress:
                print(f"pretrain-clip: reusing {path} (same settings)")
            return path
        if not overwrite:
            diff = _differences(old, settings) if isinstance(old, dict) else ["not a pretrain-clip checkpoint"]
            raise CheckpointExistsError(f"{path}: exists with other settings ({'; '.join(diff)}); "
                                  "pass overwrite=True (--overwrite) to replace it, or choose another --out")
    resume = _partial_state(partial, settings, overwrite)

    from open_clip.loss import ClipLoss
    from tqdm.auto import tqdm

    from ..data.synthetic import PRETRAIN_DOMAINS, generate_synthetic
    from ..model.backbone import NAMED_CONFIGS
    from ..train.checkpoint import load_checkpoint, save_checkpoint
    from ..train.schedulers import WarmupCosineLR

    timings: dict[str, dict[str, float]] = {}
    load_before = os.getloadavg()[0]
    total = _Clock()
    clock = _Clock()
    root = Path(synth_root) if synth_root is not None else pretrain_data_root(out_dir, cfg.scale)
    generate_synthetic(root, seed=cfg.data_seed, scale=cfg.scale, domains=PRETRAIN_DOMAINS, progress=progress)
    train = load_pretrain_images(root, "train", progress=progress).resized(cfg.image_size)
    held = (load_pretrain_images(root, "test", limit=cfg.eval_images, seed=cfg.data_seed,
                                 progress=progress).resized(cfg.image_size) if cfg.eval_images > 0 else None)
    timings["data"] = clock.lap()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, tokenizer = build_pretrain_clip(cfg)
        model.train()
        loss_fn = ClipLoss()
        batch = min(cfg.batch_size, len(train))
        steps_per_epoch = max(1, len(train) // batch)  # drop the ragged last batch
        n_steps = steps_per_epoch * cfg.epochs
        optimizer = make_optimizer(model, cfg)
        warm = min(n_steps - 1, max(1, int(round(cfg.warmup_frac * n_steps))))
        scheduler = WarmupCosineLR(optimizer, max_epochs=n_steps, warmup_epochs=warm, eta_min=0.0,
                                   warmup_lr_init=None, warmup_factor=0.01)
        clock = _Clock()
        zero_shot: dict[str, Any] = {}
        epoch_loss: list[float] = []
        step_loss: list[float] = []
        start = 0
        if resume is not None:
            info = load_checkpoint(partial, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=False)
            start = int(info["epoch"])
            zero_shot = dict(info["extra"].get("zero_shot", {}))
            epoch_loss = list(info["extra"].get("epoch_loss", []))
            step_loss = list(info["extra"].get("step_loss", []))
            if progress:
                print(f"pretrain-clip: resuming from epoch {start} of {cfg.epochs} ({partial})")
        elif held is not None:
            zero_shot["random"] = evaluate_zero_shot(model, tokenizer, held, part_pad=cfg.part_pad, progress=progress)
        timings["eval_random"] = clock.lap()

        clock = _Clock()
        gen = torch.Generator().manual_seed(cfg.seed)
        for _ in range(start):  # the batch order of the epochs already done
            torch.randperm(len(train), generator=gen)
        bar = tqdm(total=n_steps, initial=start * steps_per_epoch, desc=f"pretrain CLIP {backbone}", unit="step",
                   disable=not progress)
        try:
            for epoch in range(start, cfg.epochs):
                order = torch.randperm(len(train), generator=gen).tolist()
                losses = []
                for s in range(steps_per_epoch):
                    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(epoch, s)))
                    bt = make_batch(train, order[s * batch:(s + 1) * batch], rng, cfg,
                                    patch=int(model.visual.patch_size[0]))
                    losses.append(contrastive_step(model, tokenizer, bt.images, bt.texts, optimizer, loss_fn,
                                                   keep=bt.keep, positives=bt.positives,
                                                   negatives=bt.negatives))
                    scheduler.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", epoch=epoch + 1)
                step_loss += losses
                epoch_loss.append(float(np.mean(losses)))
                if epoch + 1 < cfg.epochs:  # the last epoch ends in the checkpoint itself
                    save_checkpoint(partial, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch + 1,
                                    step=(epoch + 1) * steps_per_epoch, config=settings, rng=False,
                                    extra={"zero_shot": zero_shot, "epoch_loss": epoch_loss, "step_loss": step_loss})
                _progress_line(f"pretrain-clip epoch {epoch + 1}/{cfg.epochs}: loss {epoch_loss[-1]:.3f}")
        finally:
            bar.close()
        timings["train"] = clock.lap()
        clock = _Clock()
        if held is not None:
            zero_shot["pretrained"] = evaluate_zero_shot(model, tokenizer, held, part_pad=cfg.part_pad,
                                                         progress=progress)
            domains = _reid_domains(reid_root)
            if domains:
                zero_shot["reid_domains"] = evaluate_zero_shot_domains(
                    model, tokenizer, reid_root, domains, cfg.eval_images, cfg.image_size, cfg.part_pad,
                    seed=cfg.data_seed, progress=progress)
        timings["eval_pretrained"] = clock.lap()
    timings["total"] = total.lap()

    report = {
        "checkpoint": str(path),
        "settings": settings,
        "architecture": NAMED_CONFIGS[backbone],
        "data": {"root": str(root), "domains": list(PRETRAIN_DOMAINS), "train_images": len(train),
                 "train_identities": int(len(np.unique(train.pids))),
                 "heldout_images": len(held) if held is not None else 0,
                 "heldout_identities": int(len(np.unique(held.pids))) if held is not None else 0},
        "steps": n_steps,
        "resumed_from_epoch": start,
        "loss": {"per_epoch": epoch_loss, "first_steps": step_loss[:5], "last_steps": step_loss[-5:]},
        "logit_scale": float(model.logit_scale.detach().exp()),
        "zero_shot": zero_shot,
        "timings": timings,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        "torch_version": torch.__version__,
    }
    write_json(report_file(path), report)
    summary = {k: {m: v["mean"][m] for m in v["mean"]} for k, v in zero_shot.items()}
    save_clip(path, model, {
        "format": PRETRAIN_FORMAT, "format_version": str(PRETRAIN_FORMAT_VERSION), "backbone": backbone,
        "settings": settings, "architecture": NAMED_CONFIGS[backbone], "epochs": cfg.epochs,
        "zero_shot": summary, "torch_version": torch.__version__,
    })
    partial.unlink(missing_ok=True)
    if progress:
        t = timings["total"]
        print(f"pretrain-clip: {backbone} seed {seed}, {cfg.epochs} epochs ({n_steps} steps) in {t['wall_s']:.0f} s "
              f"wall / {t['cpu_s']:.0f} s CPU -> {path}")
    return path
