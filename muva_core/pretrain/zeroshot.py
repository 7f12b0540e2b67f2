"""Zero-shot attribute retrieval: how well the CLIP's image features find the prompt of each attribute's true
value, on whole images and on the attribute's part masked in; on held-out pretraining images and on the Re-ID
domains; and the report's lines as ``muva pretrain-clip`` prints them."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..data.captions import ZERO_SHOT_ATTRIBUTES, zero_shot_prompts
from ..data.samples import PARTS
from .data import PretrainImages, load_pretrain_images, masked_part_images, normalise_images
from .model import encode_text

__all__ = ["zero_shot_accuracy", "evaluate_zero_shot", "evaluate_zero_shot_domains", "format_zero_shot_report",
           "linear_probe_accuracy", "probe_attributes", "supervised_attribute_ceiling"]


def zero_shot_accuracy(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
                       balanced: bool = False) -> float:
    """Share of images whose most similar (cosine) text is their true value.

    image_features ``[N, E]``, text_features ``[K, E]`` (one per value), labels ``[N]`` value
    indices, ``-1`` = not applicable (skipped). balanced=True: the mean over the values present
    of the share of their images classified right (chance = 1 / values present, whatever the
    class frequencies). NaN when no label applies.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    keep = labels >= 0
    if not bool(keep.any()):
        return float("nan")
    img = nn.functional.normalize(image_features[keep].float(), dim=-1)
    txt = nn.functional.normalize(text_features.float(), dim=-1)
    pred = (img @ txt.T).argmax(dim=1)
    y = labels[keep]
    hit = (pred == y).float()
    if not balanced:
        return float(hit.mean())
    return _balanced(hit, y)


def _balanced(hit: torch.Tensor, y: torch.Tensor) -> float:
    """The mean over the classes present in ``y`` of the share of their items ``hit``."""
    return float(torch.stack([hit[y == c].mean() for c in torch.unique(y)]).mean())


def _attribute_labels(spec, values: list[str], attrs: Sequence[dict]) -> torch.Tensor:
    """Each identity's value of the attribute ``spec`` as an index into ``values``; -1 where it does not apply."""
    return torch.tensor([values.index(v) if (v := spec.value_of(at)) is not None else -1 for at in attrs])


@torch.no_grad()
def _encode_images(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model.encode_image(x[s:s + batch_size]) for s in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def evaluate_zero_shot(model, tokenizer, data: PretrainImages, attributes: Sequence[str] | None = None,
                       modes: Sequence[str] = ("global", "part"), part_pad: int = 4, batch_size: int = 64,
                       progress: bool = False) -> dict[str, Any]:
    """Zero-shot attribute classification of ``data`` by the most similar prompt among each attribute's values.

    modes: ``global`` = whole image vs "A photo of a person in a red shirt."; ``part`` = the
    attribute's part masked in vs "A photo of the upper body of a person in a red shirt.".
    Returns ``{mode: {attribute: {accuracy, chance, majority, balanced_accuracy, balanced_chance, n,
    values}}, "mean": {mode: {...the same, averaged over the attributes}}}``: chance = 1 / number of
    values, majority = share of the commonest value, balanced_chance = 1 / values present.
    """
    from tqdm.auto import tqdm

    attributes = list(attributes or ZERO_SHOT_ATTRIBUTES)
    was_training = model.training
    model.eval()
    index = list(range(len(data)))
    feats: dict[str, torch.Tensor] = {}
    jobs = (["global"] if "global" in modes else []) + (list(PARTS) if "part" in modes else [])
    for g in tqdm(jobs, desc="zero-shot features", disable=not progress):
        x = normalise_images(data.images) if g == "global" else masked_part_images(data, index, g, part_pad)
        feats[g] = _encode_images(model, x, batch_size)
    out: dict[str, Any] = {}
    for mode in modes:
        res = {}
        for a in attributes:
            spec = ZERO_SHOT_ATTRIBUTES[a]
            prompts = zero_shot_prompts(a, mode)
            values = list(prompts)
            txt = encode_text(model, tokenizer([prompts[v] for v in values]))
            labels = _attribute_labels(spec, values, data.attrs)
            img = feats["global" if mode == "global" else spec.part]
            n = int((labels >= 0).sum())
            counts = np.bincount(labels[labels >= 0].numpy(), minlength=len(values))
            res[a] = {"accuracy": zero_shot_accuracy(img, txt, labels), "chance": 1.0 / len(values),
                      "majority": float(counts.max() / max(1, n)),
                      "balanced_accuracy": zero_shot_accuracy(img, txt, labels, balanced=True),
                      "balanced_chance": 1.0 / max(1, int((counts > 0).sum())), "n": n, "values": len(values)}
        out[mode] = res
    keys = ("accuracy", "chance", "majority", "balanced_accuracy", "balanced_chance")
    out["mean"] = {m: {k: float(np.nanmean([r[k] for r in out[m].values()])) for k in keys} for m in modes}
    model.train(was_training)
    return out


def evaluate_zero_shot_domains(model, tokenizer, root: str | os.PathLike, domains: Sequence[str], limit: int,
                               image_size: Sequence[int], part_pad: int = 4, seed: int = 0,
                               progress: bool = False) -> dict[str, Any]:
    """:func:`evaluate_zero_shot` on the test images (query + gallery) of generated Re-ID domains (``synth_A`` ..
    ``synth_D``: other people, cameras and lighting than the pretraining domains), ``limit`` images of each:
    ``{domain: {"global": ..., "part": ..., "mean": ...}, "mean": {mode: {...}}}`` (the mean over the domains)."""
    out: dict[str, Any] = {}
    for d in domains:
        data = load_pretrain_images(root, "test", domains=[d], limit=limit, seed=seed).resized(image_size)
        out[d] = evaluate_zero_shot(model, tokenizer, data, part_pad=part_pad, progress=progress)
    if out:
        modes = list(next(iter(out.values()))["mean"])
        out["mean"] = {m: {k: float(np.mean([out[d]["mean"][m][k] for d in domains])) for k in out[domains[0]]["mean"][m]}
                       for m in modes}
    return out



def format_zero_shot_report(report: dict[str, Any]) -> str:
    """The zero-shot accuracies of a pretraining report (:func:`~muva_core.pretrain.files.read_pretrain_report`), one
    line per attribute and their mean (random init -> pretrained, accuracy / balanced accuracy, with chance and
    majority), then one line per Re-ID domain and their mean; ``""`` when the report has none."""
    lines: list[str] = []
    zs = report.get("zero_shot", {})
    if zs.get("pretrained"):
        modes = list(zs["pretrained"]["mean"])
        lines.append(f"zero-shot attribute retrieval on {report['data']['heldout_images']} held-out images of "
                     f"{report['data']['heldout_identities']} unseen identities, random init -> pretrained "
                     "(accuracy / balanced accuracy, whose chance is 1 / values):")

        def row(run: str, mode: str, attr: str) -> dict:
            return zs[run]["mean"][mode] if attr == "mean" else zs[run][mode][attr]

        for attr in [*zs["pretrained"][modes[0]], "mean"]:
            cells = [f"{m} {row('random', m, attr)['accuracy']:.2f} -> {row('pretrained', m, attr)['accuracy']:.2f}"
                     f" / {row('random', m, attr)['balanced_accuracy']:.2f} -> "
                     f"{row('pretrained', m, attr)['balanced_accuracy']:.2f}" for m in modes]
            ref = row("pretrained", modes[0], attr)
            lines.append(f"  {attr:14s} " + "   ".join(cells)
                         + f"   (chance {ref['balanced_chance']:.2f}, majority {ref['majority']:.2f})")
    for d, res in (zs.get("reid_domains") or {}).items():   # each domain, then their mean
        lines.append(f"  Re-ID domain {d:4s} balanced accuracy " + "   ".join(
            f"{m} {(res['mean'] if d != 'mean' else res)[m]['balanced_accuracy']:.2f}"
            for m in (res["mean"] if d != "mean" else res)))
    return "\n".join(lines)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                          classes: int, l2: float = 1e-3, iterations: int = 200) -> float:
    """Balanced accuracy on ``test`` of a softmax regression fitted on ``train`` (features standardised with the
    training statistics, L-BFGS, ``l2`` on the weights): how much of a label a linear read-out of the features
    holds, whatever the text tower says. Labels ``-1`` are skipped."""
    keep, keep_t = train_y >= 0, test_y >= 0
    x, y, tx, ty = train_x[keep].float(), train_y[keep], test_x[keep_t].float(), test_y[keep_t]
    if not len(y) or not len(ty):
        return float("nan")
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, tx = (x - mu) / sd, (tx - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return _balanced(((tx @ w + b).argmax(1) == ty).float(), ty)


@torch.no_grad()
def probe_attributes(model, train: PretrainImages, test: PretrainImages, part_pad: int = 4,
                     batch_size: int = 128) -> dict[str, float]:
    """:func:`linear_probe_accuracy` of every zero-shot attribute on the image features of its part masked in
    (as the ``part`` zero-shot mode sees it): ``{attribute: balanced accuracy, "mean": ...}``."""
    was_training = model.training
    model.eval()
    feats = {}
    for name, data in (("train", train), ("test", test)):
        for part in PARTS:
            feats[name, part] = _encode_images(model, masked_part_images(data, range(len(data)), part, part_pad),
                                               batch_size)
    model.train(was_training)
    out: dict[str, float] = {}
    for a, spec in ZERO_SHOT_ATTRIBUTES.items():
        values = list(spec.values)
        out[a] = linear_probe_accuracy(feats["train", spec.part], _attribute_labels(spec, values, train.attrs),
                                       feats["test", spec.part], _attribute_labels(spec, values, test.attrs),
                                       len(values))
    out["mean"] = float(np.nanmean(list(out.values())))
    return out


def supervised_attribute_ceiling(train: PretrainImages, test: PretrainImages, backbone: str = "mini",
                                 mode: str = "part", epochs: int = 6, batch_size: int = 64, lr: float = 5e-4,
                                 weight_decay: float = 0.05, part_pad: int = 4, seed: int = 0,
                                 progress: bool = False) -> dict[str, Any]:
    """What the image tower can learn of each zero-shot attribute from its labels: the ``backbone``'s image tower,
    from random weights at the images' size, trained with a linear head per attribute (class-weighted
    cross-entropy, AdamW with a one-cycle schedule, horizontal flips) on ``train``, as the zero-shot ``mode`` sees
    the images (``part``: each step one part masked in, in turn head, upper, legs, and the loss of that part's
    attributes; ``global``: the whole image and every attribute's loss at every step), then scored on ``test``
    (balanced accuracy). Where even this stays near chance, no caption or contrastive loss can teach the attribute to
    that tower at that input size.

    Returns ``{"balanced_accuracy": {attribute: ..., "mean": ...}, "chance": {attribute: 1 / values present},
    "loss": [mean loss of each epoch], "steps": n}``. Deterministic for a seed (the global torch RNG is left as
    it was)."""
    from tqdm.auto import tqdm

    from .config import PretrainConfig
    from .model import build_pretrain_clip

    if mode not in ("part", "global"):
        raise ValueError(f"mode must be 'part' or 'global', got {mode!r}")
    if epochs < 1 or len(train) < batch_size:
        raise ValueError(f"need epochs >= 1 and at least batch_size={batch_size} training images, got epochs={epochs} "
                         f"and {len(train)} images")
    if tuple(train.images.shape[-2:]) != tuple(test.images.shape[-2:]):
        raise ValueError(f"train images are {tuple(train.images.shape[-2:])}, test images "
                         f"{tuple(test.images.shape[-2:])}: resize both to one size")
    attrs = list(ZERO_SHOT_ATTRIBUTES)
    values = {a: list(ZERO_SHOT_ATTRIBUTES[a].values) for a in attrs}

    def labels(d: PretrainImages) -> torch.Tensor:
        return torch.stack([_attribute_labels(ZERO_SHOT_ATTRIBUTES[a], values[a], d.attrs) for a in attrs], 1)

    y_train, y_test = labels(train), labels(test)
    weights = []
    for k, a in enumerate(attrs):
        counts = torch.bincount(y_train[:, k][y_train[:, k] >= 0], minlength=len(values[a])).float().clamp(min=1)
        inverse = counts.sum() / counts
        weights.append(inverse / inverse.mean())
    views = list(PARTS) if mode == "part" else ["global"]
    of_view = {v: [k for k, a in enumerate(attrs) if v in ("global", ZERO_SHOT_ATTRIBUTES[a].part)] for v in views}

    def images(d: PretrainImages, index: Sequence[int], view: str) -> torch.Tensor:
        return normalise_images(d.images[list(index)]) if view == "global" else masked_part_images(d, index, view,
                                                                                                  part_pad)

    size = tuple(train.images.shape[-2:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _ = build_pretrain_clip(PretrainConfig(backbone=backbone, image_size=size, seed=seed))
        tower = model.visual
        heads = nn.ModuleList([nn.Linear(tower.output_dim, len(values[a])) for a in attrs])
        opt = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=lr, weight_decay=weight_decay)
        per_epoch = len(train) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * per_epoch, pct_start=0.1)
        tower.train()
        history: list[float] = []
        step = 0
        bar = tqdm(total=epochs * per_epoch, desc="supervised ceiling", disable=not progress)
        for _ in range(epochs):
            order, total = torch.randperm(len(train)), 0.0
            for s in range(0, per_epoch * batch_size, batch_size):
                index = order[s:s + batch_size].tolist()
                view = views[step % len(views)]
                x = images(train, index, view)
                flip = torch.rand(len(index)) < 0.5
                x[flip] = x[flip].flip(-1)
                features, y = tower(x), y_train[index]
                loss = sum(nn.functional.cross_entropy(heads[k](features), y[:, k], weight=weights[k],
                                                       ignore_index=-1) for k in of_view[view])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                total += float(loss.detach())
                bar.update()
            history.append(total / per_epoch)
        bar.close()
    tower.eval()
    accuracy: dict[str, float] = {}
    chance: dict[str, float] = {}
    with torch.no_grad():
        for view in views:
            features = _encode_images(model, images(test, range(len(test)), view), 128)
            for k in of_view[view]:
                y = y_test[:, k]
                keep = y >= 0
                hit = (heads[k](features[keep]).argmax(1) == y[keep]).float()
                accuracy[attrs[k]] = _balanced(hit, y[keep]) if bool(keep.any()) else float("nan")
                chance[attrs[k]] = 1.0 / max(1, len(torch.unique(y[keep])))
    accuracy = {a: accuracy[a] for a in attrs}
    accuracy["mean"] = float(np.nanmean(list(accuracy.values())))
    return {"balanced_accuracy": accuracy, "chance": {a: chance[a] for a in attrs}, "loss": history, "steps": step}
