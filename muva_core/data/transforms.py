"""Image + part-mask transforms for 256x128 Re-ID inputs, and the image dataset.

A part mask is ``[3, Gh*Gw]`` (head, upper, legs) over the ViT patch grid of the *network
input* (256x128 with 16-pixel patches -> Gh x Gw = 16 x 8 = 128), flattened row-wise. Resizing
the image therefore leaves the mask as it is; a horizontal flip flips the columns of the grid.

Train pipeline (reference order): resize -> horizontal flip (image and mask together) ->
[pad + random crop] -> to-tensor -> [photometric jitter] -> normalise -> [random erasing]. Random
crop and random erasing are off by default (the paper's Table 11 ablation switches them on); so is
the photometric jitter (``augment: ...+color``, see :func:`photometric_jitter`), which the paper does
not use and the synthetic demo does (its target domain is a dark, warm-lit night street).

Random crop with a mask: the image is shifted by (dy, dx) pixels, |dy|, |dx| <= padding; the
mask is shifted by ``round(dy / patch), round(dx / patch)`` grid cells, vacated cells set to 0.
With the default padding 10 < 16 the mask moves by at most one cell, so it stays aligned to
within half a patch (8 px) - approximately, not exactly. Random erasing does not change the
mask (an erased part is occluded, not absent).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from muva_core.data.datasets import read_image
from muva_core.data.samples import DatasetError, Sample

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "NORMALIZATIONS",
    "flip_patch_mask",
    "shift_patch_mask",
    "PHOTOMETRIC_RANGES",
    "WIDE_PHOTOMETRIC_RANGES",
    "JITTER_RANGES",
    "photometric_jitter",
    "ReIDTransform",
    "build_train_transform",
    "build_test_transform",
    "ReIDImageDataset",
    "preload_images",
    "CACHE_IMAGES",
    "PRELOAD_AUTO_BYTES",
    "preload_wanted",
]

CACHE_IMAGES = ("auto", "always", "never")
"""Values of ``data.cache_images``: preload the training images (:func:`preload_images`) when they fit
:data:`PRELOAD_AUTO_BYTES`, always, or never (read and resize every image every epoch)."""

PRELOAD_AUTO_BYTES = 2 * 1024**3
"""``cache_images: auto`` preloads when the images take at most this much memory (each process of a torchrun holds
its own copy)."""

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),       # the reference code's PIXEL_MEAN = PIXEL_STD = 0.5 (config `norm: half`)
    "reference": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # the same, older name
}
"""Input normalisations by name (the config key ``norm``). Resizing is bicubic (PIL, as the reference's
``T.Resize(size, interpolation=3)`` for training) unless ``interpolation`` says otherwise; the reference
resizes its test and feature-extraction images with ``T.Resize``'s default, bilinear."""

MaskLike = Any  # torch.Tensor or np.ndarray, shape [..., Gh*Gw]


def _check_grid(mask: MaskLike, grid_hw: tuple[int, int]) -> None:
    gh, gw = grid_hw
    if mask.shape[-1] != gh * gw:
        raise ValueError(f"part mask has {mask.shape[-1]} patches in its last dim, expected {gh}x{gw}={gh * gw}")


def flip_patch_mask(mask: MaskLike, grid_hw: tuple[int, int]) -> MaskLike:
    """Mirror a row-wise flattened patch mask ``[..., Gh*Gw]`` left-right (flip the grid columns)."""
    _check_grid(mask, grid_hw)
    gh, gw = grid_hw
    shape = mask.shape
    if isinstance(mask, torch.Tensor):
        return mask.reshape(*shape[:-1], gh, gw).flip(-1).reshape(shape)
    return np.ascontiguousarray(np.flip(np.asarray(mask).reshape(*shape[:-1], gh, gw), axis=-1)).reshape(shape)


def shift_patch_mask(mask: MaskLike, grid_hw: tuple[int, int], dy: int, dx: int, fill: float = 0) -> MaskLike:
    """Shift a flattened patch mask by ``dy`` rows and ``dx`` columns of the grid; vacated cells get ``fill``."""
    _check_grid(mask, grid_hw)
    gh, gw = grid_hw
    if dy == 0 and dx == 0:
        return mask
    shape = mask.shape
    is_t = isinstance(mask, torch.Tensor)
    grid = mask.reshape(*shape[:-1], gh, gw)
    out = torch.full_like(grid, fill) if is_t else np.full_like(grid, fill)
    src_y = slice(max(0, -dy), gh - max(0, dy))
    dst_y = slice(max(0, dy), gh - max(0, -dy))
    src_x = slice(max(0, -dx), gw - max(0, dx))
    dst_x = slice(max(0, dx), gw - max(0, -dx))
    if abs(dy) < gh and abs(dx) < gw:
        out[..., dst_y, dst_x] = grid[..., src_y, src_x]
    return out.reshape(shape)


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


PHOTOMETRIC_RANGES: dict[str, tuple[float, float]] = {
    "gain": (0.9, 1.1),          # per colour channel (a colour cast)
    "brightness": (0.45, 1.3),   # multiplies every channel
    "gamma": (0.7, 1.5),         # x ** gamma
    "contrast": (0.65, 1.35),    # blend with the image's mean grey
    "saturation": (0.8, 1.2),    # blend with the image's grey version
    "noise": (0.0, 0.04),        # std of additive Gaussian noise (image in [0, 1])
}
"""Uniform ranges of :func:`photometric_jitter`'s factors: wide enough to cover lighting and camera changes
from a bright indoor hall to a dim, warm-lit street (the synthetic domains' styles span gain 0.68-1.2,
brightness 0.72-1.04, gamma 0.88-1.25, contrast 0.82-1.6, saturation 0.72-1.3; the colour cast is the one factor
this range does not span)."""

WIDE_PHOTOMETRIC_RANGES: dict[str, tuple[float, float]] = {
    "lowres": (1.0, 3.0),        # downscale by this factor and back up (bilinear): low resolution and blur
    "gain": (0.65, 1.35),        # per colour channel: casts as strong as a sodium-lit night street's
    "brightness": (0.45, 1.3),
    "gamma": (0.7, 1.5),
    "contrast": (0.6, 1.7),
    "saturation": (0.6, 1.4),
    "noise": (0.0, 0.06),
}
"""The ranges of a wider world of looks (the CLIP's pretraining, ``muva pretrain-clip --color-jitter wide``): a
web-scale CLIP has seen night streets, colour casts and low-resolution cameras, a CLIP pretrained on three
daylight domains has not. Every synthetic domain's base style lies inside them (casts 0.68-1.2, low resolution
up to 2.8, contrast up to 1.6, noise up to 14 / 255)."""

JITTER_RANGES: dict[str, dict[str, tuple[float, float]]] = {"reid": PHOTOMETRIC_RANGES, "wide": WIDE_PHOTOMETRIC_RANGES}
"""The named ranges :func:`photometric_jitter` draws from (``reid``: the Re-ID training's; ``wide``)."""


def photometric_jitter(image: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.8,
                       ranges: Mapping[str, tuple[float, float]] = PHOTOMETRIC_RANGES) -> torch.Tensor:
    """With probability ``p``, a random colour cast, brightness, gamma, contrast, saturation and sensor noise
    (in that order) on ``image [3, H, W]`` in [0, 1]; returns a new tensor in [0, 1]. Geometry is unchanged, so
    the part mask is too. Every factor is drawn from ``ranges`` with ``generator``; where ``ranges`` has
    ``lowres``, the image is first scaled down by a factor drawn from it and back up (bilinear)."""
    if _rand(generator) >= p:
        return image

    def draw(name: str) -> float:
        low, high = ranges[name]
        return low + (high - low) * _rand(generator)

    if "lowres" in ranges:
        factor = draw("lowres")
        h, w = image.shape[-2:]
        small = (max(1, round(h / factor)), max(1, round(w / factor)))
        if small != (h, w):
            down = torch.nn.functional.interpolate(image[None], size=small, mode="bilinear", antialias=True,
                                                   align_corners=False)
            image = torch.nn.functional.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)[0]
    # in place on one new tensor (the same operations in the same order as the out-of-place formulas)
    gain = torch.tensor([draw("gain") for _ in range(3)], dtype=image.dtype)[:, None, None]
    x = (image * gain).mul_(draw("brightness")).clamp_(0.0, 1.0).pow_(draw("gamma"))
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    mean = grey.mean()
    x.sub_(mean).mul_(draw("contrast")).add_(mean)              # mean + c * (x - mean)
    x.sub_(grey).mul_(draw("saturation")).add_(grey)            # grey + s * (x - grey)
    sigma = draw("noise")
    if sigma > 0:
        x.add_(torch.randn(x.shape, generator=generator, dtype=x.dtype).mul_(sigma))
    return x.clamp_(0.0, 1.0)


class ReIDTransform:
    """Transform an image and (optionally) its part mask together.

    ``__call__(image, mask=None, generator=None) -> (tensor [3, H, W], mask or None)``; the
    image may be a PIL image or an HxWx3 uint8 array; the mask a tensor/array ``[3, Gh*Gw]``
    (returned as a tensor of the same dtype). ``generator`` makes the random choices
    reproducible (default: torch's global RNG, seeded per DataLoader worker).
    """

    accepts_mask = True

    def __init__(
        self,
        size: tuple[int, int] = (256, 128),
        patch_size: int = 16,
        train: bool = False,
        flip_prob: float = 0.5,
        random_crop: bool = False,
        crop_padding: int = 10,
        random_erasing: bool = False,
        erasing_prob: float = 0.5,
        norm: str = "clip",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str = "bicubic",
        color_jitter: bool = False,
    ) -> None:
        h, w = size
        if h % patch_size or w % patch_size:
            raise ValueError(f"input size {size} is not a multiple of the patch size {patch_size}")
        if norm not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {norm!r}; use one of {sorted(NORMALIZATIONS)} or mean=/std=")
        self.size = (int(h), int(w))
        self.patch_size = patch_size
        self.grid_hw = (h // patch_size, w // patch_size)
        self.train = train
        self.flip_prob = flip_prob if train else 0.0
        self.random_crop = random_crop and train
        self.crop_padding = crop_padding
        self.random_erasing = random_erasing and train
        self.erasing_prob = erasing_prob
        self.color_jitter = color_jitter and train
        self.mean = tuple(float(m) for m in (mean if mean is not None else NORMALIZATIONS[norm][0]))
        self.std = tuple(float(s) for s in (std if std is not None else NORMALIZATIONS[norm][1]))
        self.interpolation = InterpolationMode(interpolation)

    def resize(self, image):
        """The transform's first step: ``image`` (PIL) resized to ``size``, the same for every call; what
        :func:`preload_images` stores so that epochs skip decoding and resizing."""
        return TF.resize(image, list(self.size), interpolation=self.interpolation, antialias=True)

    def __call__(self, image, mask: MaskLike | None = None, generator: torch.Generator | None = None,
                 resized: bool = False):
        """resized: ``image`` is already :meth:`resize`'s output (from :func:`preload_images`)."""
        if mask is not None:
            mask = torch.from_numpy(np.array(mask)) if not isinstance(mask, torch.Tensor) else mask
            _check_grid(mask, self.grid_hw)
        if resized and tuple(np.shape(image)[:2]) != self.size:
            raise ValueError(f"a preloaded image of {np.shape(image)[0]}x{np.shape(image)[1]} for a transform of "
                             f"{self.size[0]}x{self.size[1]}")
        if resized and not self.random_crop:   # uint8 H x W x 3 -> the same tensor as the PIL path, without PIL
            tensor = torch.as_tensor(image).permute(2, 0, 1)
            if self.flip_prob > 0 and _rand(generator) < self.flip_prob:
                tensor = tensor.flip(-1)
                if mask is not None:
                    mask = flip_patch_mask(mask, self.grid_hw)
            return self._finish(tensor.float().div_(255.0), mask, generator)
        if isinstance(image, (np.ndarray, torch.Tensor)):
            from PIL import Image

            image = Image.fromarray(np.asarray(image))
        if not resized:
            image = self.resize(image)
        if self.flip_prob > 0 and _rand(generator) < self.flip_prob:
            image = TF.hflip(image)
            if mask is not None:
                mask = flip_patch_mask(mask, self.grid_hw)
        if self.random_crop:
            p = self.crop_padding
            image = TF.pad(image, [p, p, p, p], fill=0)
            top, left = _randint(0, 2 * p, generator), _randint(0, 2 * p, generator)
            image = TF.crop(image, top, left, *self.size)
            if mask is not None:  # content moved by (p - top, p - left) pixels
                dy = round((p - top) / self.patch_size)
                dx = round((p - left) / self.patch_size)
                mask = shift_patch_mask(mask, self.grid_hw, dy, dx)
        return self._finish(TF.to_tensor(image), mask, generator)

    def _finish(self, tensor: torch.Tensor, mask, generator):
        """jitter, normalise, erase: the steps after the geometry, on ``[3, H, W]`` in [0, 1]."""
        if self.color_jitter:
            tensor = photometric_jitter(tensor, generator)
        tensor = TF.normalize(tensor, self.mean, self.std)
        if self.random_erasing and _rand(generator) < self.erasing_prob:
            tensor = self._erase(tensor, generator)
        return tensor, mask

    @staticmethod
    def _erase(img: torch.Tensor, generator: torch.Generator | None, scale=(0.02, 0.33), ratio=(0.3, 3.3)):
        """Random erasing (Zhong et al.) with per-pixel normal noise (timm's 'pixel' mode), one box."""
        _, h, w = img.shape
        area = h * w
        log_r = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target = area * (scale[0] + (scale[1] - scale[0]) * _rand(generator))
            aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * _rand(generator))
            eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < eh < h and 0 < ew < w:
                y, x = _randint(0, h - eh, generator), _randint(0, w - ew, generator)
                img = img.clone()
                img[:, y : y + eh, x : x + ew] = torch.randn((img.shape[0], eh, ew), generator=generator)
                return img
        return img

    def __repr__(self) -> str:
        parts = [f"size={self.size}", f"train={self.train}"]
        if self.train:
            parts += [f"flip_prob={self.flip_prob}", f"random_crop={self.random_crop}",
                      f"random_erasing={self.random_erasing}", f"color_jitter={self.color_jitter}"]
        parts += [f"mean={self.mean}", f"std={self.std}"]
        return f"ReIDTransform({', '.join(parts)})"


def build_train_transform(
    size: tuple[int, int] = (256, 128),
    patch_size: int = 16,
    flip_prob: float = 0.5,
    random_crop: bool = False,
    crop_padding: int = 10,
    random_erasing: bool = False,
    erasing_prob: float = 0.5,
    norm: str = "clip",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str = "bicubic",
    color_jitter: bool = False,
) -> ReIDTransform:
    """Train transform: resize, flip (image + mask), optional crop / jitter / erasing, to-tensor, normalise."""
    return ReIDTransform(size, patch_size, True, flip_prob, random_crop, crop_padding, random_erasing,
                         erasing_prob, norm, mean, std, interpolation, color_jitter)


def build_test_transform(
    size: tuple[int, int] = (256, 128),
    patch_size: int = 16,
    norm: str = "clip",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str = "bicubic",
) -> ReIDTransform:
    """Test transform: resize, to-tensor, normalise (the mask passes through unchanged)."""
    return ReIDTransform(size, patch_size, False, norm=norm, mean=mean, std=std, interpolation=interpolation)


class ReIDImageDataset(Dataset):
    """Torch dataset over :class:`Sample` lists: ``dict(image, pid, camid, index[, mask])``.

    ``masks``: None, a mapping ``Sample.key -> [3, Gh*Gw]`` (e.g. a loaded mask store), or a
    tensor / array / sequence aligned with ``samples``. With masks the transform must accept them
    (a :class:`ReIDTransform`), so that a flip moves the mask with the image.
    Images are opened with :func:`read_image`: an unreadable file raises :class:`ImageReadError` naming it,
    also from a DataLoader worker (its message then carries no worker traceback). Scan a split first with
    :func:`muva_core.data.scan.require_readable` to hear of every bad file at once.
    """

    def __init__(self, samples: Sequence[Sample], transform=None, masks: Mapping[str, MaskLike] | Sequence | None = None,
                 images: torch.Tensor | None = None):
        self.samples = list(samples)
        self.transform = transform if transform is not None else build_test_transform()
        self.masks = masks
        self.images = images
        if images is not None and len(images) != len(self.samples):
            raise ValueError(f"images: {len(images)} preloaded images for {len(self.samples)} samples")
        if images is not None and not hasattr(self.transform, "resize"):
            raise ValueError("images: preloaded images need a transform with resize() (a ReIDTransform)")
        if masks is not None:
            if not getattr(self.transform, "accepts_mask", False):
                raise TypeError(
                    "masks were given but the transform does not take a mask (use ReIDTransform / "
                    "build_train_transform so the mask is flipped with the image)"
                )
            if not isinstance(masks, Mapping) and len(masks) != len(self.samples):
                raise ValueError(f"masks has {len(masks)} entries for {len(self.samples)} samples")

    def __len__(self) -> int:
        return len(self.samples)

    def _mask(self, index: int) -> MaskLike:
        if isinstance(self.masks, Mapping):
            s = self.samples[index]
            try:
                return self.masks[s.key]
            except KeyError:
                raise DatasetError(f"no part mask for {s.key!r} (image {s.path})") from None
        return self.masks[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        pre = self.images is not None
        image = self.images[index] if pre else read_image(s.path)
        kw = {"resized": True} if pre else {}
        item: dict[str, Any] = {"pid": s.pid, "camid": s.camid, "index": index}
        if self.masks is None:
            out = self.transform(image, **kw)
            item["image"] = out[0] if isinstance(out, tuple) else out
        else:
            item["image"], item["mask"] = self.transform(image, self._mask(index), **kw)
        return item


def preload_wanted(setting: str, count: int, size: Sequence[int]) -> bool:
    """Whether ``data.cache_images`` = ``setting`` preloads ``count`` images of ``size`` (H, W)."""
    if setting not in CACHE_IMAGES:
        raise ValueError(f"cache_images: expected one of {', '.join(CACHE_IMAGES)}, got {setting!r}")
    return setting == "always" or (setting == "auto" and count * int(size[0]) * int(size[1]) * 3 <= PRELOAD_AUTO_BYTES)


def preload_images(samples: Sequence[Sample], transform: ReIDTransform, progress: bool = False,
                   desc: str = "preload images") -> torch.Tensor:
    """Every sample's image decoded and resized as ``transform`` does first (:meth:`ReIDTransform.resize`):
    uint8 ``[N, H, W, 3]`` (H * W * 3 bytes an image, 98 KB at 256x128). Given to :class:`ReIDImageDataset`
    (``images=``), epochs skip decoding and resizing and see the same pixels; DataLoader workers share the
    tensor. An unreadable file raises :class:`ImageReadError` naming it."""
    from tqdm.auto import tqdm

    h, w = transform.size
    out = torch.empty((len(samples), h, w, 3), dtype=torch.uint8)
    for i, s in enumerate(tqdm(samples, desc=desc, disable=not progress, leave=False)):
        out[i] = torch.from_numpy(np.array(transform.resize(read_image(s.path)), dtype=np.uint8))
    return out
