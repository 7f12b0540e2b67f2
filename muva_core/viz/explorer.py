"""The part-mask explorer: browse predicted part masks against pseudo labels and ground truth.

A testable core plus a thin ipywidgets layer:

* pure functions - per-layer mask probabilities of an encoder (:func:`layer_probabilities`),
  layer / part selection (:func:`select_layer`, :func:`select_parts`), thresholding
  (:func:`threshold_masks`), per-image IoU (:func:`part_iou`), rendering (:func:`render_view`,
  :func:`figure_png`), the file's own pid / camera (:func:`file_identity`);
* :class:`PredictedMasks` - a trained encoder run one image at a time, cached per image;
* :class:`PartMaskExplorer` - the data source (splits of the protocol's datasets, the predicted
  masks of a trained model and/or the pseudo-label mask file, the ground-truth part boxes of
  synthetic data) and :meth:`PartMaskExplorer.view` / :meth:`~PartMaskExplorer.render_png` for one
  :class:`ExplorerState`; :meth:`PartMaskExplorer.widget` wires ipywidgets controls to them.

Build it from a run folder holding ``model.safetensors`` (:meth:`PartMaskExplorer.from_run`), from
the protocol's mask files alone (:meth:`PartMaskExplorer.from_masks`, pseudo labels only), or let
:func:`muva_core.notebook.part_mask_explorer` choose. Masks are ``[P, Npatch]`` over the patch grid of the
network input, flattened row-wise; the mask logits of layer ``l`` are the running sums of the
residual mask predictors (eq. 5), their sigmoid the probabilities shown.
"""
from __future__ import annotations

import dataclasses
import html
import io
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..data.samples import PARTS, Sample
from .plots import PART_COLOURS, upsample_mask, blend_parts, display_image, draw_boxes, overlay_mask

__all__ = [
    "ALL_PARTS",
    "LAST_LAYER",
    "MODES",
    "ExplorerState",
    "MaskView",
    "PartMaskExplorer",
    "PredictedMasks",
    "blend_parts",
    "figure_png",
    "file_identity",
    "identity_caption",
    "layer_probabilities",
    "part_iou",
    "protocol_splits",
    "render_view",
    "select_layer",
    "select_parts",
    "threshold_masks",
]

LAST_LAYER = "last"
ALL_PARTS = "all"
MODES: tuple[str, ...] = ("binary", "soft")
"""``binary``: the thresholded mask; ``soft``: the probabilities as a heat overlay, outlined at the threshold."""

IOU_COLUMNS = {"pred_pseudo": "predicted vs pseudo", "pred_truth": "predicted vs truth",
               "pseudo_truth": "pseudo vs truth"}


# ---------------------------------------------------------------------------- pure functions
@torch.no_grad()
def layer_probabilities(encoder, images: torch.Tensor) -> np.ndarray:
    """Per-layer part-mask probabilities ``[B, L, P, Npatch]`` (sigmoid of each layer's running-sum
    logits) of an encoder in ``predicted`` mode, for normalised images ``[B, 3, H, W]``."""
    if getattr(encoder, "rmp", None) is None or not getattr(encoder, "n_parts", 0):
        raise ValueError("this encoder predicts no part masks (no parts, or built with mask_mode='stripe')")
    was_training = encoder.training
    encoder.eval()
    try:
        device = next(encoder.parameters()).device
        out = encoder(images.to(device), mask_mode="predicted")
    finally:
        encoder.train(was_training)
    return out.stacked_mask_logits.float().sigmoid().permute(1, 0, 2, 3).cpu().numpy()


def select_layer(probabilities: np.ndarray, layer: int | str = LAST_LAYER) -> np.ndarray:
    """The ``[P, Npatch]`` masks of one layer (1-based, or ``"last"``) of ``[L, P, Npatch]``."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 3:
        raise ValueError(f"per-layer masks must be [L, P, Npatch], got shape {probabilities.shape}")
    n = probabilities.shape[0]
    if layer == LAST_LAYER:
        return probabilities[-1]
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 1 <= int(layer) <= n:
        raise ValueError(f"layer must be 1..{n} or {LAST_LAYER!r}, got {layer!r}")
    return probabilities[int(layer) - 1]


def select_parts(masks: np.ndarray, part: str, parts: Sequence[str] = PARTS) -> tuple[tuple[str, ...], np.ndarray]:
    """``(names, masks [k, Npatch])`` of one part (k = 1) or of every part (``"all"``) of ``masks [P, Npatch]``
    whose channels are ``parts``."""
    masks = np.asarray(masks)
    parts = tuple(parts)
    if masks.ndim != 2 or masks.shape[0] != len(parts):
        raise ValueError(f"masks must be [P={len(parts)}, Npatch] for parts {parts}, got shape {masks.shape}")
    if part == ALL_PARTS:
        return parts, masks
    if part not in parts:
        raise ValueError(f"part must be one of {parts + (ALL_PARTS,)}, got {part!r}")
    i = parts.index(part)
    return (part,), masks[i:i + 1]


def threshold_masks(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Binary masks: probability ``> threshold`` (the rule of the mask gating and of :func:`mask_iou`)."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return np.asarray(probabilities) > float(threshold)


def part_iou(probabilities: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per-part IoU ``[P]`` of one image: ``probabilities [P, Npatch]`` thresholded against binary ``targets``
    (:func:`muva_core.eval.masks.mask_iou` on a batch of one); NaN where both masks are empty."""
    from ..eval.masks import mask_iou

    probs = torch.as_tensor(np.asarray(probabilities, dtype=np.float32))
    tgt = torch.as_tensor(np.asarray(targets)).bool()
    if probs.shape != tgt.shape or probs.dim() != 2:
        raise ValueError(f"probabilities and targets must both be [P, Npatch], "
                         f"got {tuple(probs.shape)} and {tuple(tgt.shape)}")
    iou = mask_iou(probs[None], tgt[None], threshold).numpy().astype(np.float64)
    union = ((probs > threshold) | tgt).sum(-1).numpy()
    return np.where(union > 0, iou, np.nan)


def _fmt_iou(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.2f}"


def file_identity(sample: Sample) -> tuple[int, int] | None:
    """``(pid, camera)`` of an image as its dataset names them, read from the file name with the dataset's
    own naming rule: the original identity id (not the 0-based training label of a train split) and the
    1-based camera number of the name (Market-style ``0002_c3s1_000451_03.jpg`` -> ``(2, 3)``; MSMT17's
    ``0000_000_01_0303morning_0008_0.jpg`` -> ``(0, 1)``). None where the name carries no ids."""
    import re

    from ..data.datasets import MSMT17, MarketStyleDataset, get_dataset_class

    name = Path(sample.relpath or sample.path).name
    try:
        cls = get_dataset_class(sample.domain)
    except (KeyError, ValueError):       # a domain no parser is registered for: try the Market naming
        cls = MarketStyleDataset
    match = getattr(cls, "pattern", MarketStyleDataset.pattern).match(name)
    if match is not None:
        return int(match.group(1)), int(match.group(2))
    if issubclass(cls, MSMT17) or cls is MarketStyleDataset:   # MSMT17 list layout: <pid>_<seq>_<camera>_...
        match = re.match(r"^(-?\d+)_\d+_(\d+)_", name)
        if match is not None:
            return int(match.group(1)), int(match.group(2))
    return None


def identity_caption(sample: Sample) -> str:
    """``pid 2, camera 3`` from the file name (:func:`file_identity`); the sample's labels where the name
    has no ids."""
    ids = file_identity(sample)
    if ids is None:
        return f"label pid {sample.pid}, camid {sample.camid} (no ids in the file name)"
    return f"pid {ids[0]}, camera {ids[1]}"


# ---------------------------------------------------------------------------- state and view
@dataclass(frozen=True)
class ExplorerState:
    """What the explorer shows: split name, image index, layer (1..L or "last"), part (or "all"),
    threshold in [0, 1], display mode (``binary`` | ``soft``)."""

    split: str
    index: int = 0
    layer: int | str = LAST_LAYER
    part: str = ALL_PARTS
    threshold: float = 0.5
    mode: str = "binary"

    def replace(self, **changes) -> "ExplorerState":
        return dataclasses.replace(self, **changes)


@dataclass
class MaskView:
    """Everything one render needs, for the parts shown (``parts``), masks ``[k, Npatch]``.

    predicted:   probabilities of the chosen layer (None without a model)
    pseudo:      the pseudo-label masks (None when the image has none)
    truth:       ground-truth boxes voted into patch masks (None without ground truth)
    truth_boxes: ground-truth boxes in input pixels, per shown part (None without ground truth)
    iou:         per-image IoU table over every part of the source (rows) and comparison (columns)
    """

    state: ExplorerState
    sample: Sample
    image: np.ndarray
    grid: tuple[int, int]
    parts: tuple[str, ...]
    layer: int | None
    n_layers: int
    predicted: np.ndarray | None
    pseudo: np.ndarray | None
    truth: np.ndarray | None
    truth_boxes: dict[str, tuple[float, ...] | None] | None
    iou: pd.DataFrame

    def shown_iou(self, column: str) -> float | None:
        """The IoU of the part shown (the mean row for ``"all"``) in ``column``, or None."""
        if column not in self.iou.columns:
            return None
        row = self.state.part
        if row == ALL_PARTS:
            row = "mean" if "mean" in self.iou.index else self.iou.index[0]
        return float(self.iou.loc[row, column]) if row in self.iou.index else None


TITLE_SIZE = 11
"""Font size (pt) of the explorer's panel titles and legend; the figure title is a little larger."""


def render_view(view: MaskView, alpha: float = 0.5, panel_size: tuple[float, float] = (2.7, 5.4)) -> Figure:
    """A figure with one panel per mask source: the prediction (thresholded or soft), the pseudo label,
    the ground-truth boxes (each only when available); the shown part's IoU in the panel titles, a
    legend of the part colours, the image's file name, pid and camera (as the file names them) on top.

    Sized to be read at 100 % zoom: ``panel_size`` inches per panel, rendered at 100 dpi (a 270 x 540
    pixel panel for a 128 x 256 input), text of at least 10 pt."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.patches import Patch

    panels = [name for name, m in (("predicted", view.predicted), ("pseudo", view.pseudo), ("truth", view.truth))
              if m is not None]
    n = max(1, len(panels))
    fig = Figure(figsize=(max(panel_size[0] * n, 4.0), panel_size[1] + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    state, parts, grid = view.state, view.parts, view.grid
    fs = TITLE_SIZE
    if not panels:
        overlay_mask(axes[0], view.image, np.zeros(grid[0] * grid[1]), grid, title="no masks for this image",
                     fontsize=fs)
    for ax, name in zip(axes, panels):
        if name == "predicted":
            probs = view.predicted
            shown = probs if state.mode == "soft" else threshold_masks(probs, state.threshold).astype(np.float32)
            base = blend_parts(view.image, shown[:-1], parts[:-1], grid, alpha)
            title = f"predicted, layer {view.layer}/{view.n_layers}\nt = {state.threshold:.2f} ({state.mode})"
            overlay_mask(ax, base, shown[-1], grid, colour=PART_COLOURS.get(parts[-1], "y"), alpha=alpha, title=title,
                         fontsize=fs)
            if state.mode == "soft":
                h, w = view.image.shape[:2]
                for mask, part in zip(probs, parts):
                    binary = mask > state.threshold
                    if binary.any() and not binary.all():
                        ax.contour(upsample_mask(binary, grid, (h, w)), levels=[0.5], colors=[PART_COLOURS.get(part, "y")],
                                   linewidths=1.5)
        elif name == "pseudo":
            base = blend_parts(view.image, view.pseudo[:-1], parts[:-1], grid, alpha)
            title = f"pseudo label\nIoU pred {_fmt_iou(view.shown_iou('predicted vs pseudo'))}" \
                if view.predicted is not None else "pseudo label"
            overlay_mask(ax, base, view.pseudo[-1], grid, colour=PART_COLOURS.get(parts[-1], "y"), alpha=alpha,
                         title=title, fontsize=fs)
        else:
            base = blend_parts(view.image, view.truth, parts, grid, alpha * 0.6)
            scores = [f"{label} {_fmt_iou(view.shown_iou(col))}" for label, col in
                      (("pred", "predicted vs truth"), ("pseudo", "pseudo vs truth")) if col in view.iou.columns]
            draw_boxes(ax, base, view.truth_boxes or {}, title="ground truth\nIoU " + ", ".join(scores) if scores
                       else "ground truth", linewidth=2.0, fontsize=fs)
    handles = [Patch(facecolor=PART_COLOURS.get(p, "y"), edgecolor="none", alpha=0.8, label=p) for p in parts]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=fs, frameon=False,
               title="part colours", title_fontsize=fs)
    sample = view.sample
    folder, _, filename = sample.relpath.rpartition("/")
    where = f"{sample.domain}/{folder}" if folder else sample.domain
    fig.suptitle(f"{filename}\n{identity_caption(sample)}  ·  {where}  ·  [{state.part}]", fontsize=fs + 1)
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """A figure as PNG bytes (no timestamp metadata, so equal figures give equal bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


# ---------------------------------------------------------------------------- data source
class PredictedMasks:
    """Per-layer mask probabilities ``[L, P, Npatch]`` of a trained encoder, one image at a time,
    cached per sample key (least recently used dropped beyond ``cache_size``)."""

    def __init__(self, encoder, transform, cache_size: int = 128) -> None:
        if getattr(encoder, "rmp", None) is None or not encoder.n_parts:
            raise ValueError("the model predicts no part masks (granularity 'G' or mask_mode 'stripe')")
        self.encoder = encoder.eval()
        self.transform = transform
        self.cache_size = int(cache_size)
        self.parts: tuple[str, ...] = tuple(encoder.parts)
        self.grid: tuple[int, int] = tuple(encoder.grid)
        self.n_layers = len(encoder.rmp)
        self.computed = 0
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, sample: Sample) -> np.ndarray:
        from ..data.datasets import read_image

        hit = self._cache.get(sample.key)
        if hit is not None:
            self._cache.move_to_end(sample.key)
            return hit
        out = self.transform(read_image(sample.path))
        tensor = out[0] if isinstance(out, tuple) else out
        probs = layer_probabilities(self.encoder, tensor[None])[0]
        self.computed += 1
        self._cache[sample.key] = probs
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return probs


def protocol_splits(data) -> dict[str, list[Sample]]:
    """``"<dataset>/<split>" -> samples`` for a protocol's data: the sources' train splits first (they have
    pseudo labels), then the target's query and gallery, then any other non-empty split."""
    order = [(s, "train") for s in data.sources] + [(data.protocol.target, "query"), (data.protocol.target, "gallery")]
    order += [(name, split) for name in data.datasets for split in ("train", "query", "gallery")]
    out: dict[str, list[Sample]] = {}
    for name, split in order:
        label = f"{name}/{split}"
        ds = data.datasets.get(name)
        if label not in out and ds is not None and len(getattr(ds, split)):
            out[label] = list(getattr(ds, split))
    return out


def protocol_truth(data) -> pd.DataFrame | None:
    """The ground-truth part boxes of every dataset of the protocol that has them (synthetic), or None."""
    from ..grounding.simulated import dataset_truth

    tables = [t for t in map(dataset_truth, data.datasets.values()) if t is not None]
    return pd.concat(tables, ignore_index=True) if tables else None


def _protocol_mask_paths(cfg, data) -> dict[str, Path]:
    """The pseudo-label mask file of each source: ``masks_file`` (the imported authors' masks) when set, else the
    voted file of ``cfg``'s grounding settings."""
    from ..grounding.steps import grounding_paths

    if cfg.grounding.masks_file:
        from ..paths import resolve

        return {name: resolve(cfg.grounding.masks_file) for name in data.sources}
    return {name: grounding_paths(cfg, name).masks for name in data.sources}


class PartMaskExplorer:
    """Browse part masks image by image.

    splits:     ``name -> samples`` (see :func:`protocol_splits`)
    predictor:  a :class:`PredictedMasks` (None: pseudo labels only)
    masks:      pseudo-label masks ``key -> [3, Npatch]`` (a :class:`MaskStore`; None: none)
    truth:      ground-truth part boxes (a ``load_truth`` table; None: none)
    img_size:   network input ``(H, W)``; images are shown at this size, on the patch grid ``img_size / patch_size``
    threshold:  the initial threshold (the model's mask-gating threshold)
    vote_rule:  how ground-truth boxes are voted into patch masks (as the pseudo labels were)
    """

    def __init__(self, splits: Mapping[str, Sequence[Sample]], predictor: PredictedMasks | None = None,
                 masks: Mapping[str, np.ndarray] | None = None, truth: pd.DataFrame | None = None,
                 img_size: tuple[int, int] = (256, 128), patch_size: int = 16, threshold: float = 0.5,
                 vote_rule: str = "center", source: str = "") -> None:
        self.splits = {str(k): list(v) for k, v in splits.items() if len(v)}
        if not self.splits:
            raise ValueError("the part-mask explorer needs at least one non-empty split of images")
        if predictor is None and masks is None:
            raise ValueError("the part-mask explorer needs a trained model, a pseudo-label mask file, or both")
        self.predictor = predictor
        self.masks = masks
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.patch_size = int(patch_size)
        self.grid = predictor.grid if predictor is not None else (self.img_size[0] // self.patch_size,
                                                                  self.img_size[1] // self.patch_size)
        mask_grid = getattr(masks, "grid", None)
        if mask_grid is not None and tuple(mask_grid) != tuple(self.grid):
            raise ValueError(f"the mask file's patch grid {tuple(mask_grid)} differs from the model's {tuple(self.grid)}")
        self.parts: tuple[str, ...] = predictor.parts if predictor is not None else PARTS
        self.threshold = float(threshold)
        self.vote_rule = vote_rule
        self.source = source or ("model" if predictor is not None else "masks")
        self._truth = None
        if truth is not None and len(truth):
            rows = truth[truth["part"].isin(PARTS)]
            self._truth = rows.set_index(rows["key"].astype(str)).sort_index()
        self._truth_cache: dict[str, tuple[np.ndarray, dict]] = {}
        self.state = self.default_state()
        self.controls: dict = {}
        self.image_widget = self.iou_widget = self.caption_widget = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run(cls, folder: str | Path, device: str | None = None, progress: bool = False,
                 cache_size: int = 128) -> "PartMaskExplorer":
        """From a run folder's ``model.safetensors`` (and its ``config.yaml``); the pseudo labels are the
        run's mask files when they are in the cache."""
        from ..config import RunConfig
        from ..eval.features import resolve_device, test_transform
        from ..paths import RunFiles
        from ..data.protocols import load_protocol
        from ..train.checkpoint import read_checkpoint_info
        from ..train.run import load_trained

        files = RunFiles(folder)
        model_path = files.model
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: no trained model in this run folder (train one with notebook 05 "
                                    "or `muva train`, or build the explorer from the mask file alone)")
        if files.config.is_file():
            cfg = RunConfig.from_yaml(files.config)
        else:
            cfg = RunConfig().update(read_checkpoint_info(model_path)["config"], source=str(model_path))
        data = load_protocol(cfg, progress=progress)
        model = load_trained(cfg, model_path, data.num_classes, resolve_device(device or cfg.device))
        transform = test_transform(cfg)
        masks = cls._existing_masks(cfg, data)
        if model.encoder.rmp is not None and model.encoder.n_parts:
            predictor, source = PredictedMasks(model.encoder, transform, cache_size), f"model {model_path}"
        elif masks is not None:   # granularity G or stripe masks: nothing predicted, show the pseudo labels
            predictor, source = None, f"pseudo labels ({model_path} predicts no part masks)"
        else:
            raise ValueError(f"{model_path} predicts no part masks (granularity {cfg.model.granularity!r}, mask_mode "
                             f"{cfg.model.mask_mode!r}) and the run's pseudo-label mask files are not in the cache")
        return cls._from_protocol(cfg, data, predictor, masks, source)

    @classmethod
    def from_masks(cls, cfg, paths: Mapping[str, str | Path] | None = None, progress: bool = False) -> "PartMaskExplorer":
        """Pseudo labels only: the protocol's mask files (``paths``: dataset -> file; default: the
        cached files of ``cfg``'s grounding settings)."""
        from ..data.protocols import load_protocol

        data = load_protocol(cfg, progress=progress)
        if paths is None:
            expected = _protocol_mask_paths(cfg, data)
            store = cls._existing_masks(cfg, data)
            if store is None:
                raise FileNotFoundError(
                    "no pseudo-label mask file for " + ", ".join(f"{n} (expected {p})" for n, p in expected.items())
                    + "; build them with notebooks 01-03 or `muva ground` / `calibrate` / `vote`")
        else:
            from ..grounding.steps import load_protocol_masks

            store = load_protocol_masks({k: Path(v) for k, v in paths.items()})
        return cls._from_protocol(cfg, data, None, store, "pseudo labels" + (f" {store.path}" if store.path else ""))

    @staticmethod
    def _existing_masks(cfg, data):
        from ..grounding.steps import load_protocol_masks

        found = {n: p for n, p in _protocol_mask_paths(cfg, data).items() if p.is_file()}
        if cfg.grounding.masks_file and found:
            from ..grounding.steps import imported_masks

            return imported_masks(cfg)
        return load_protocol_masks(found) if found else None

    @classmethod
    def _from_protocol(cls, cfg, data, predictor, masks, source: str) -> "PartMaskExplorer":
        return cls(protocol_splits(data), predictor=predictor, masks=masks, truth=protocol_truth(data),
                   img_size=(cfg.data.height, cfg.data.width), patch_size=cfg.grounding.patch_size,
                   threshold=cfg.model.mask_threshold, vote_rule=cfg.grounding.vote_rule, source=source)

    # ------------------------------------------------------------------ choices
    @property
    def has_model(self) -> bool:
        return self.predictor is not None

    @property
    def n_layers(self) -> int:
        return self.predictor.n_layers if self.predictor is not None else 0

    @property
    def layer_choices(self) -> list[int | str]:
        return [LAST_LAYER] + list(range(1, self.n_layers + 1))

    @property
    def part_choices(self) -> list[str]:
        return list(self.parts) + [ALL_PARTS]

    def default_state(self) -> ExplorerState:
        """The first split that has pseudo labels (else the first), image 0, last layer, all parts."""
        split = next(iter(self.splits))
        if self.masks is not None:
            split = next((name for name, samples in self.splits.items() if samples[0].key in self.masks), split)
        return ExplorerState(split=split, threshold=self.threshold)

    def sample(self, split: str, index: int) -> Sample:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; splits: {list(self.splits)}")
        samples = self.splits[split]
        if not 0 <= int(index) < len(samples):
            raise IndexError(f"image index {index} out of range for {split} ({len(samples)} images)")
        return samples[int(index)]

    def check(self, state: ExplorerState) -> ExplorerState:
        """Validate a state against this explorer's splits, layers, parts, threshold and modes."""
        self.sample(state.split, state.index)
        if state.layer not in self.layer_choices:
            raise ValueError(f"layer must be one of {self.layer_choices}, got {state.layer!r}")
        if state.part not in self.part_choices:
            raise ValueError(f"part must be one of {self.part_choices}, got {state.part!r}")
        if not 0.0 <= float(state.threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {state.threshold}")
        if state.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {state.mode!r}")
        return state

    # ------------------------------------------------------------------ masks of one image
    def image(self, sample: Sample) -> np.ndarray:
        """The image resized to the network input, uint8 ``[H, W, 3]``."""
        return display_image(sample.path, self.img_size)

    def pseudo_masks(self, sample: Sample) -> np.ndarray | None:
        """The pseudo-label masks ``[P, Npatch]`` (this explorer's parts) of an image, or None."""
        if self.masks is None or sample.key not in self.masks:
            return None
        return np.asarray(self.masks[sample.key])[[PARTS.index(p) for p in self.parts]]

    def truth(self, sample: Sample) -> tuple[np.ndarray, dict[str, tuple[float, ...] | None]] | None:
        """Ground truth of an image: patch masks ``[P, Npatch]`` and boxes in input pixels, or None."""
        from ..grounding.voting import truth_patch_masks

        if self._truth is None or sample.key not in self._truth.index:
            return None
        if sample.key not in self._truth_cache:
            rows = self._truth.loc[[sample.key]].reset_index(drop=True)
            masks = truth_patch_masks(rows, [sample.key], self.img_size, self.patch_size, rule=self.vote_rule)[0]
            h, w = self.img_size
            boxes = {}
            for _, r in rows.iterrows():
                sx, sy = w / float(r["img_w"]), h / float(r["img_h"])
                box = (float(r["x0"]) * sx, float(r["y0"]) * sy, float(r["x1"]) * sx, float(r["y1"]) * sy)
                boxes[str(r["part"])] = None if any(np.isnan(box)) else box
            self._truth_cache[sample.key] = (masks[[PARTS.index(p) for p in self.parts]], boxes)
        return self._truth_cache[sample.key]

    def probabilities(self, sample: Sample, layer: int | str = LAST_LAYER) -> np.ndarray | None:
        """Predicted probabilities ``[P, Npatch]`` of one layer (None without a model)."""
        if self.predictor is None:
            return None
        return select_layer(self.predictor(sample), layer)

    def iou_table(self, sample: Sample, layer: int | str = LAST_LAYER, threshold: float = 0.5) -> pd.DataFrame:
        """Per-image IoU: rows = parts + mean, columns = the comparisons available for this image."""
        probs, pseudo, truth = self.probabilities(sample, layer), self.pseudo_masks(sample), self.truth(sample)
        truth_masks = None if truth is None else truth[0]
        columns = {}
        if probs is not None and pseudo is not None:
            columns[IOU_COLUMNS["pred_pseudo"]] = part_iou(probs, pseudo, threshold)
        if probs is not None and truth_masks is not None:
            columns[IOU_COLUMNS["pred_truth"]] = part_iou(probs, truth_masks, threshold)
        if pseudo is not None and truth_masks is not None:
            columns[IOU_COLUMNS["pseudo_truth"]] = part_iou(pseudo, truth_masks, 0.5)
        table = pd.DataFrame(columns, index=list(self.parts), dtype=float)
        if columns and len(self.parts) > 1:
            table.loc["mean"] = table.mean(skipna=True)
        return table

    def view(self, state: ExplorerState | None = None) -> MaskView:
        """Everything shown for ``state`` (default: the current state)."""
        state = self.check(state or self.state)
        sample = self.sample(state.split, state.index)
        probs, pseudo, truth = self.probabilities(sample, state.layer), self.pseudo_masks(sample), self.truth(sample)
        shown = lambda m: None if m is None else select_parts(m, state.part, self.parts)[1]  # noqa: E731
        names = select_parts(np.zeros((len(self.parts), 1)), state.part, self.parts)[0]
        boxes = None if truth is None else {p: truth[1].get(p) for p in names}
        layer = None if self.predictor is None else (self.n_layers if state.layer == LAST_LAYER else int(state.layer))
        return MaskView(state=state, sample=sample, image=self.image(sample), grid=self.grid, parts=names, layer=layer,
                        n_layers=self.n_layers, predicted=shown(probs), pseudo=shown(pseudo),
                        truth=None if truth is None else shown(truth[0]), truth_boxes=boxes,
                        iou=self.iou_table(sample, state.layer, state.threshold))

    def render(self, state: ExplorerState | None = None) -> Figure:
        return render_view(self.view(state))

    def render_png(self, state: ExplorerState | None = None, dpi: int = 100) -> bytes:
        return figure_png(self.render(state), dpi=dpi)

    # ------------------------------------------------------------------ widgets
    def widget(self, state: ExplorerState | None = None):
        """Controls (split, image, layer, part, threshold, mode) above the rendered PNG and the IoU table;
        the controls are kept in ``self.controls``, the image in ``self.image_widget``.

        The box (an ``ipywidgets.VBox``) displays with the image shown as a static ``image/png`` beside the
        widget view: a live, trusted notebook shows the widget; an executed copy (papermill's output is not
        trusted, and JupyterLab renders no widget in an untrusted output) shows the PNG instead of
        ``VBox(children=...)``."""
        import ipywidgets as W

        self.state = self.check(state or self.state)
        s = self.state
        split = W.Dropdown(options=[(f"{k} ({len(v)} images)", k) for k, v in self.splits.items()], value=s.split,
                           description="split")
        index = W.IntSlider(value=s.index, min=0, max=len(self.splits[s.split]) - 1, description="image",
                            continuous_update=False)
        layer = W.Dropdown(options=[(f"last ({self.n_layers})" if c == LAST_LAYER else str(c), c)
                                    for c in self.layer_choices], value=s.layer, description="layer",
                           disabled=not self.has_model)
        part = W.ToggleButtons(options=self.part_choices, value=s.part, description="part")
        threshold = W.FloatSlider(value=s.threshold, min=0.0, max=1.0, step=0.01, description="threshold",
                                  readout_format=".2f", disabled=not self.has_model)
        mode = W.ToggleButtons(options=list(MODES), value=s.mode, description="display", disabled=not self.has_model)
        threshold.add_class("muva-explorer-threshold")
        self.controls = {"split": split, "index": index, "layer": layer, "part": part, "threshold": threshold,
                         "mode": mode}
        self.image_widget = W.Image(format="png")
        self.image_widget.add_class("muva-explorer-image")
        self.caption_widget = W.HTML()
        self.iou_widget = W.HTML()
        busy = [False]

        def refresh(_=None) -> None:
            if busy[0]:
                return
            self.state = ExplorerState(split=split.value, index=index.value, layer=layer.value, part=part.value,
                                       threshold=float(threshold.value), mode=mode.value)
            view = self.view(self.state)
            self.image_widget.value = figure_png(render_view(view))
            self.caption_widget.value = (f"<b>{html.escape(view.sample.key)}</b> &nbsp; "
                                         f"{html.escape(identity_caption(view.sample))} &nbsp; "
                                         f"<i>source: {html.escape(self.source)}</i>")
            self.iou_widget.value = ("<b>IoU (this image)</b>" + view.iou.to_html(float_format=_fmt_iou, na_rep="n/a")
                                     if len(view.iou.columns) else "<i>no IoU: nothing to compare for this image</i>")

        def on_split(change) -> None:
            busy[0] = True
            try:
                index.value = 0
                index.max = len(self.splits[change["new"]]) - 1
            finally:
                busy[0] = False
            refresh()

        split.observe(on_split, "value")
        for control in (index, layer, part, threshold, mode):
            control.observe(refresh, "value")
        refresh()
        controls = W.VBox([split, index, layer, part, mode, threshold])
        body = W.HBox([self.image_widget, self.iou_widget], layout=W.Layout(flex_flow="row wrap",
                                                                             align_items="flex-start"))
        box = static_png_box_class()([controls, self.caption_widget, body])
        box.static_png = lambda: bytes(self.image_widget.value)
        box.static_text = lambda: (f"part-mask explorer: {self.state.split} image {self.state.index} "
                                   f"({self.sample(self.state.split, self.state.index).key}); interactive in a "
                                   "trusted notebook with a running kernel")
        return box


@lru_cache(maxsize=None)
def static_png_box_class():
    """An ``ipywidgets.VBox`` whose display bundle adds the explorer's current image as ``image/png`` (the
    widget view stays the preferred form wherever widgets render)."""
    import base64

    import ipywidgets as W

    class ExplorerBox(W.VBox):
        static_png = None
        static_text = None

        def _repr_mimebundle_(self, **kwargs):
            bundle = super()._repr_mimebundle_(**kwargs) or {}
            png = self.static_png() if callable(self.static_png) else None
            if png:
                bundle["image/png"] = base64.b64encode(png).decode("ascii")
            if callable(self.static_text):
                bundle["text/plain"] = self.static_text()
            return bundle

    return ExplorerBox
