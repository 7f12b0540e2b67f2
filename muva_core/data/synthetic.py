"""The synthetic multi-domain person dataset: procedurally drawn pedestrians in four camera domains.

This is the embedded default dataset of the workbook (no downloads) and the ground truth that
later steps are measured against (part-box pseudo labels, mask IoU, domain generalisation).

* An identity is a set of part attributes: head (skin, hair colour and length, hat), upper body
  (garment colour, pattern, sleeves, bag) and legs (trousers/shorts/skirt, colour, shoes).
* Identities come in *families* that share everything except one part (only the shoes, only the
  hair, only the shirt pattern, ...): global features confuse them, part features separate them.
* Four domains with different camera styles (``DOMAIN_STYLES``): A bright indoor (6 cameras),
  B dark warm night street (2), C low-resolution blurry cool campus (4), D high-contrast noisy
  urban (3). Each camera varies its domain's style; identities and pids are disjoint across domains.
* Three more domains, ``P``, ``Q``, ``R`` (``PRETRAIN_DOMAIN_STYLES``, scale ``pretrain``), exist only
  for the CLIP language pretraining of :mod:`muva_core.pretrain`; no Re-ID protocol uses them.
* Written in the Market-1501 layout: ``<out>/synth_A/{bounding_box_train,query,bounding_box_test}/``
  with names ``PPPP_cCsS_FFFFFF_NN.jpg``, distractors ``0000_...`` and junk ``-1_...`` in the
  gallery only. Ground truth: ``synth_X/part_boxes.parquet`` (one row per image and part:
  head, upper, legs, person), ``synth_X/attributes.json``; ``<out>/manifest.json`` last.

Usage::

    root = generate_synthetic("data/synthetic", seed=0, scale="default")   # ~4k images
    ds = load_dataset("synth_A", root)                                       # muva_core.data.datasets
    boxes = load_part_boxes(root / "synth_A")

Deterministic: every image has its own generator seeded from (seed, domain, role, id, index)
with :class:`numpy.random.SeedSequence`, so the same seed gives byte-identical files with any
number of workers.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..io import write_json, write_parquet
from ._draw import IMAGE_SIZE, GTBox, apply_camera_style, render_person, sample_pose
from .samples import PARTS, DatasetError

__all__ = [
    "GENERATOR_VERSION",
    "SCALES",
    "DOMAIN_STYLES",
    "PRETRAIN_DOMAIN_STYLES",
    "PRETRAIN_DOMAINS",
    "IMAGE_SIZE",
    "JPEG_QUALITY",
    "PALETTES",
    "GTBox",
    "generate_synthetic",
    "render_person",
    "sample_pose",
    "sample_identity",
    "camera_styles",
    "apply_camera_style",
    "load_part_boxes",
    "load_attributes",
    "read_manifest",
    "market_name",
]

GENERATOR_VERSION = "1.0"
"""Bumped whenever the drawing or the planning changes what is written for a given seed."""
GENERATOR = "muva_core.data.synthetic"
JPEG_QUALITY = 90
BOX_PARTS: tuple[str, ...] = (*PARTS, "person")
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
PART_BOX_COLUMNS = ("relpath", "part", "x0", "y0", "x1", "y1", "visible", "img_w", "img_h")

SCALES: dict[str, dict[str, Any]] = {
    "small": {
        "description": "tiny, for tests: 12 ids per domain, 5-7 images each (~350 images in all)",
        "ids_per_domain": 12, "images_per_id": [5, 7],
        "distractor_frac": 0.08, "junk_frac": 0.05, "min_distractors": 2, "min_junk": 2,
    },
    "default": {
        "description": "the demo set: per domain about 50 training ids (8-12 images each, as before) and 310 test "
                       "ids (4-7 images each): >= 300 queries on every target (one per test id on the 2-camera "
                       "domain B, 1-3 on the others) and ~4.5 gallery images per query (Market-1501: 4.7); "
                       "~9.4k images in all",
        "ids_per_domain": 360, "train_ids": 50, "images_per_id": [8, 12], "test_images_per_id": [4, 7],
        "distractor_frac": 0.06, "junk_frac": 0.04, "min_distractors": 4, "min_junk": 4,
    },
    "evidence": {
        "description": "the evidence study (muva evidence): the same identities and images as the default "
                       "(kept as its own name and folder, data/synthetic-evidence)",
        "ids_per_domain": 360, "train_ids": 50, "images_per_id": [8, 12], "test_images_per_id": [4, 7],
        "distractor_frac": 0.06, "junk_frac": 0.04, "min_distractors": 4, "min_junk": 4,
    },
    "reid": {
        "description": "Re-ID sized (issue 18; the demo and evidence scales once their schedule is chosen): per domain about 700 training ids (4-5 images each, ~3.1k "
                       "images; Market-1501 has 751 ids) and 310 test ids (4-7 images each): >= 300 queries on "
                       "every target (one per test id on the 2-camera domain B, 1-3 on the others) and ~4.5 gallery "
                       "images per query (Market-1501: 4.7); ~4.9k images per domain",
        "ids_per_domain": 1010, "train_ids": 700, "images_per_id": [4, 5], "test_images_per_id": [4, 7],
        "distractor_frac": 0.06, "junk_frac": 0.04, "min_distractors": 4, "min_junk": 4, "pid_block": 10000,
    },
    "large": {
        "description": "longer experiments: 500 ids per domain, 10-16 images each (~27k images in all)",
        "ids_per_domain": 500, "images_per_id": [10, 16],
        "distractor_frac": 0.06, "junk_frac": 0.04, "min_distractors": 4, "min_junk": 4,
    },
    "pretrain": {
        "description": "CLIP language pretraining (domains P, Q, R): 600 ids per domain, 3/4 of them train, "
                       "2-4 images each, no distractors or junk (~5.4k images in all)",
        "ids_per_domain": 600, "images_per_id": [2, 3], "train_frac": 0.75,
        "distractor_frac": 0.0, "junk_frac": 0.0, "min_distractors": 0, "min_junk": 0,
    },
    "pretrain-wide": {
        "description": "CLIP language pretraining at 4x the people (domains P, Q, R): 2,400 ids per domain, 3/4 of "
                       "them train, 2-4 images each (~21.6k images in all)",
        "ids_per_domain": 2400, "images_per_id": [2, 3], "train_frac": 0.75, "pid_block": 10000,
        "distractor_frac": 0.0, "junk_frac": 0.0, "min_distractors": 0, "min_junk": 0,
    },
}
"""Dataset sizes. ``ids_per_domain`` is split half train, half test (by whole families), or ``train_frac`` train,
or ``train_ids`` train (families are added to the training split until it holds at least that many ids).
``pid_block`` (default 1000): domain i owns pids ``i * pid_block + 1 ..``; Re-ID sized scales need more than 999.
``images_per_id`` = [lo, hi] images of a training id (and of a test id unless ``test_images_per_id`` is given);
a test id has at least one image in each of its cameras and one query per camera for 1-3 of them."""

_SUMMER = {"short_sleeves": 0.6, "shorts": 0.3, "skirt": 0.12, "hat": 0.12, "bag": 0.45,
           "long_hair": 0.35, "bald": 0.06, "dark_clothes": 0.25}
_WINTER = {"short_sleeves": 0.1, "shorts": 0.03, "skirt": 0.08, "hat": 0.4, "bag": 0.5,
           "long_hair": 0.3, "bald": 0.06, "dark_clothes": 0.65}
_MIXED = {"short_sleeves": 0.35, "shorts": 0.15, "skirt": 0.12, "hat": 0.2, "bag": 0.55,
          "long_hair": 0.35, "bald": 0.08, "dark_clothes": 0.4}

DOMAIN_STYLES: dict[str, dict[str, Any]] = {
    "A": {
        "description": "bright indoor (mall / station hall), neutral white balance, sharp, 6 cameras",
        "n_cams": 6, "background": "indoor",
        "walls": [[226, 221, 210], [205, 211, 216], [231, 216, 192], [214, 206, 200]],
        "grounds": [[186, 176, 160], [162, 162, 168], [201, 195, 185]],
        "accents": [[170, 120, 80], [90, 110, 150], [180, 60, 60], [80, 140, 110], [200, 170, 80]],
        "horizon": [0.55, 0.68], "brightness": 1.04, "contrast": 1.0, "saturation": 1.05, "gamma": 0.88,
        "cast": [1.0, 1.0, 1.0], "blur": 0.0, "lowres": 1.0, "noise": 2.0, "vignette": 0.0,
        "occlusion": 0.12, "clutter": 1.2, "wardrobe": _SUMMER,
    },
    "B": {
        "description": "dark outdoor night street, warm sodium light, soft, noisy, 2 cameras",
        "n_cams": 2, "background": "street_night",
        "walls": [[72, 62, 56], [56, 57, 68], [82, 66, 50]],
        "grounds": [[62, 60, 57], [52, 52, 55]],
        "accents": [[255, 190, 100], [200, 120, 60], [120, 90, 70]],
        "horizon": [0.52, 0.64], "brightness": 0.72, "contrast": 0.9, "saturation": 0.8, "gamma": 1.25,
        "cast": [1.2, 1.0, 0.68], "blur": 0.5, "lowres": 1.0, "noise": 7.0, "vignette": 0.35,
        "occlusion": 0.2, "clutter": 1.0, "wardrobe": _WINTER,
    },
    "C": {
        "description": "low-resolution, blurry, cool cast, washed-out campus scenes, 4 cameras",
        "n_cams": 4, "background": "campus",
        "walls": [[192, 186, 176], [172, 176, 182], [185, 178, 165]],
        "grounds": [[176, 176, 170], [160, 165, 166]],
        "accents": [[70, 120, 60], [60, 100, 70], [100, 130, 60]],
        "horizon": [0.5, 0.62], "brightness": 1.0, "contrast": 0.82, "saturation": 0.72, "gamma": 1.0,
        "cast": [0.86, 0.98, 1.2], "blur": 0.7, "lowres": 2.8, "noise": 2.5, "vignette": 0.1,
        "occlusion": 0.1, "clutter": 1.5, "wardrobe": _MIXED,
    },
    "D": {
        "description": "high-contrast, saturated, noisy urban street with shop fronts, 3 cameras",
        "n_cams": 3, "background": "urban",
        "walls": [[150, 82, 62], [122, 112, 102], [140, 120, 90]],
        "grounds": [[96, 96, 100], [82, 83, 86]],
        "accents": [[200, 40, 40], [40, 90, 180], [230, 180, 40], [40, 140, 80], [150, 60, 150]],
        "horizon": [0.55, 0.66], "brightness": 1.0, "contrast": 1.6, "saturation": 1.3, "gamma": 1.0,
        "cast": [0.96, 1.06, 0.94], "blur": 0.0, "lowres": 1.0, "noise": 14.0, "vignette": 0.2,
        "occlusion": 0.15, "clutter": 1.8, "wardrobe": _MIXED,
    },
}
"""Per-domain camera style: the base of every camera's style (each camera jitters it, see
:func:`camera_styles`), the background type and palette, and the wardrobe (attribute priors)."""

_PRETRAIN_WARDROBE = {"short_sleeves": 0.4, "shorts": 0.15, "skirt": 0.12, "hat": 0.25, "bag": 0.5,
                      "long_hair": 0.35, "bald": 0.06, "dark_clothes": 0.3}

PRETRAIN_DOMAIN_STYLES: dict[str, dict[str, Any]] = {
    "P": {
        "description": "CLIP pretraining only: neutral daylight park paths, mild blur, 4 cameras",
        "n_cams": 4, "background": "campus",
        "walls": [[200, 196, 184], [182, 190, 178], [206, 192, 170]],
        "grounds": [[168, 160, 146], [150, 156, 140]],
        "accents": [[90, 130, 70], [120, 100, 80], [70, 110, 90]],
        "horizon": [0.5, 0.64], "brightness": 1.02, "contrast": 0.95, "saturation": 1.0, "gamma": 0.95,
        "cast": [1.02, 1.0, 0.97], "blur": 0.25, "lowres": 1.0, "noise": 3.0, "vignette": 0.05,
        "occlusion": 0.08, "clutter": 1.0, "wardrobe": _PRETRAIN_WARDROBE,
    },
    "Q": {
        "description": "CLIP pretraining only: overcast grey city street, slightly cool, sharp, 4 cameras",
        "n_cams": 4, "background": "urban",
        "walls": [[140, 138, 136], [116, 120, 128], [150, 136, 120]],
        "grounds": [[110, 110, 112], [96, 98, 102]],
        "accents": [[60, 110, 160], [170, 150, 60], [120, 70, 120], [60, 130, 110]],
        "horizon": [0.55, 0.66], "brightness": 0.96, "contrast": 1.12, "saturation": 1.05, "gamma": 1.0,
        "cast": [0.97, 1.0, 1.05], "blur": 0.0, "lowres": 1.0, "noise": 5.0, "vignette": 0.12,
        "occlusion": 0.1, "clutter": 1.3, "wardrobe": _PRETRAIN_WARDROBE,
    },
    "R": {
        "description": "CLIP pretraining only: warm-lit indoor corridor, slight low resolution, 4 cameras",
        "n_cams": 4, "background": "indoor",
        "walls": [[218, 206, 186], [196, 200, 204], [222, 210, 178]],
        "grounds": [[150, 132, 112], [176, 170, 160]],
        "accents": [[150, 90, 60], [60, 90, 140], [140, 140, 70], [100, 60, 110]],
        "horizon": [0.56, 0.68], "brightness": 1.0, "contrast": 1.0, "saturation": 0.95, "gamma": 0.95,
        "cast": [1.06, 1.0, 0.92], "blur": 0.1, "lowres": 1.5, "noise": 2.5, "vignette": 0.08,
        "occlusion": 0.1, "clutter": 1.1, "wardrobe": _PRETRAIN_WARDROBE,
    },
}
"""Camera styles of the domains used only for CLIP language pretraining (:mod:`muva_core.pretrain`):
no Re-ID protocol uses them, and their pids (4001 and up) are disjoint from those of A-D."""

PRETRAIN_DOMAINS: tuple[str, ...] = tuple(PRETRAIN_DOMAIN_STYLES)

_ALL_STYLES: dict[str, dict[str, Any]] = {**DOMAIN_STYLES, **PRETRAIN_DOMAIN_STYLES}
_DOMAIN_INDEX = {d: i for i, d in enumerate(sorted(_ALL_STYLES))}  # A-D keep 0-3
_PID_BLOCK = 1000  # default pid block: domain i owns pids i*1000+1 .. i*1000+999 (SCALES "pid_block")

# seed roles: the second element of every spawn key
_ROLE_IMAGE, _ROLE_DISTRACTOR, _ROLE_JUNK, _ROLE_CAMERA, _ROLE_IDENTITIES, _ROLE_PLAN, _ROLE_EXTRA = range(7)

PALETTES: dict[str, dict[str, tuple[int, int, int]]] = {
    "skin": {"light": (241, 206, 182), "fair": (226, 182, 150), "medium": (198, 146, 106),
             "olive": (176, 132, 88), "brown": (136, 92, 62), "dark": (92, 62, 42)},
    "hair": {"black": (26, 22, 22), "dark_brown": (62, 41, 28), "brown": (108, 72, 42), "blonde": (216, 182, 112),
             "auburn": (142, 62, 32), "grey": (152, 152, 150), "white": (226, 226, 220)},
    "garment": {"black": (32, 32, 34), "white": (236, 236, 234), "grey": (132, 132, 136), "navy": (32, 42, 92),
                "blue": (42, 92, 192), "light_blue": (132, 182, 232), "red": (202, 36, 42), "maroon": (112, 26, 36),
                "green": (42, 142, 62), "olive": (102, 112, 52), "yellow": (236, 206, 52), "orange": (236, 122, 32),
                "pink": (236, 142, 176), "purple": (112, 52, 142), "beige": (212, 192, 152), "brown": (112, 72, 42)},
    "lower": {"jeans": (52, 72, 122), "black": (32, 32, 34), "grey": (112, 112, 116), "beige": (192, 172, 132),
              "brown": (102, 66, 42), "navy": (32, 36, 72), "olive": (86, 96, 52), "white": (226, 226, 220),
              "red": (172, 36, 42), "light_blue": (122, 162, 212)},
    "shoes": {"black": (26, 26, 26), "white": (242, 242, 242), "brown": (112, 66, 36), "red": (202, 32, 36),
              "blue": (42, 82, 192), "grey": (142, 142, 142), "yellow": (232, 202, 42)},
    "bag": {"black": (30, 30, 32), "brown": (110, 70, 40), "navy": (34, 40, 86), "grey": (120, 120, 124),
            "red": (180, 40, 40), "olive": (96, 104, 52), "beige": (200, 180, 140)},
}
"""Named colours of every attribute; an identity's RGB is its colour plus a small personal jitter."""

_DARK = ("black", "grey", "navy", "maroon", "olive", "brown")

# how a family member may differ from the others: part -> {attribute group: weight}
FAMILY_VARIATIONS: dict[str, dict[str, float]] = {
    "head": {"hair": 0.4, "hat": 0.35, "hair_length": 0.25},
    "upper": {"pattern": 0.45, "garment": 0.35, "bag": 0.2},
    "legs": {"shoes": 0.45, "lower_color": 0.3, "lower": 0.25},
}
_GROUP_FIELDS = {
    "hair": ("hair",), "hat": ("hat", "hat_color"), "hair_length": ("hair_length",),
    "pattern": ("pattern", "pattern_color", "logo_shape"), "garment": ("garment",), "bag": ("bag", "bag_color"),
    "shoes": ("shoes",), "lower_color": ("lower_color",), "lower": ("lower",),
}


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


# ---------------------------------------------------------------------------------------------
# identities and families

def _color(rng: np.random.Generator, palette: str, name: str, jitter: float = 7.0) -> list[int]:
    base = np.asarray(PALETTES[palette][name], np.float64)
    return [int(v) for v in np.clip(np.round(base + rng.normal(0.0, jitter, 3)), 0, 255)]


def _pick(rng: np.random.Generator, options: Sequence[str], exclude: Iterable[str] = ()) -> str:
    ex = set(exclude)
    opts = [o for o in options if o not in ex] or list(options)
    return str(opts[int(rng.integers(len(opts)))])


def _lum(rgb: Sequence[int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _draw_group(rng: np.random.Generator, part: dict, group: str, w: dict) -> None:
    """(Re)draw one attribute group of a part dict in place."""
    if group == "hair":
        part["hair"] = _pick(rng, list(PALETTES["hair"]))
        part["hair_rgb"] = _color(rng, "hair", part["hair"])
    elif group == "hair_length":
        r = rng.random()
        part["hair_length"] = "long" if r < w["long_hair"] else "bald" if r < w["long_hair"] + w["bald"] else "short"
    elif group == "hat":
        if rng.random() < w["hat"]:
            part["hat"] = "cap" if rng.random() < 0.5 else "beanie"
            part["hat_color"] = _pick(rng, list(PALETTES["garment"]))
            part["hat_rgb"] = _color(rng, "garment", part["hat_color"])
        else:
            part["hat"], part["hat_color"], part["hat_rgb"] = "none", None, None
    elif group == "garment":
        names = list(_DARK) if rng.random() < w["dark_clothes"] else list(PALETTES["garment"])
        part["garment"] = _pick(rng, names)
        part["garment_rgb"] = _color(rng, "garment", part["garment"])
        if part.get("pattern_color"):  # keep a pattern readable on the new colour
            _draw_group(rng, part, "pattern_color_only", w)
    elif group in ("pattern", "pattern_color_only"):
        if group == "pattern":
            part["pattern"] = str(rng.choice(["plain", "stripes", "checks", "logo"], p=[0.4, 0.22, 0.16, 0.22]))
        if part["pattern"] == "plain":
            part["pattern_color"], part["pattern_rgb"], part["logo_shape"] = None, None, None
            return
        g = part["garment_rgb"]
        cands = [n for n, c in PALETTES["garment"].items() if abs(_lum(c) - _lum(g)) > 70] or ["white", "black"]
        part["pattern_color"] = _pick(rng, cands)
        part["pattern_rgb"] = _color(rng, "garment", part["pattern_color"])
        if group == "pattern" or part.get("logo_shape") is None:
            part["logo_shape"] = str(rng.choice(["circle", "triangle", "star"])) if part["pattern"] == "logo" else None
    elif group == "bag":
        r = rng.random()
        if r < w["bag"]:
            part["bag"] = "backpack" if rng.random() < 0.55 else "shoulder_bag"
            part["bag_color"] = _pick(rng, list(PALETTES["bag"]))
            part["bag_rgb"] = _color(rng, "bag", part["bag_color"])
        else:
            part["bag"], part["bag_color"], part["bag_rgb"] = "none", None, None
        part["bag_side"] = "left" if rng.random() < 0.5 else "right"
    elif group == "sleeves":
        part["sleeves"] = "short" if rng.random() < w["short_sleeves"] else "long"
    elif group == "skin":
        part["skin"] = _pick(rng, list(PALETTES["skin"]))
        part["skin_rgb"] = _color(rng, "skin", part["skin"], 5.0)
    elif group == "lower":
        r = rng.random()
        part["lower"] = "shorts" if r < w["shorts"] else "skirt" if r < w["shorts"] + w["skirt"] else "trousers"
    elif group == "lower_color":
        names = [n for n in PALETTES["lower"] if n in _DARK or n in ("jeans",)] if rng.random() < w["dark_clothes"] \
            else list(PALETTES["lower"])
        part["lower_color"] = _pick(rng, names)
        part["lower_rgb"] = _color(rng, "lower", part["lower_color"])
    elif group == "shoes":
        part["shoes"] = _pick(rng, list(PALETTES["shoes"]))
        part["shoes_rgb"] = _color(rng, "shoes", part["shoes"])
    else:
        raise ValueError(f"unknown attribute group {group!r}")


def sample_identity(rng: np.random.Generator, wardrobe: dict | None = None) -> dict:
    """Draw one identity: ``{"head": {...}, "upper": {...}, "legs": {...}, "body": {...}}``.

    Every colour attribute ``X`` has its name in ``X`` / ``X_color`` and its RGB in ``X_rgb``.
    ``wardrobe`` holds the attribute priors (see ``DOMAIN_STYLES[d]["wardrobe"]``).
    """
    w = dict(_MIXED, **(wardrobe or {}))
    head: dict[str, Any] = {}
    for g in ("skin", "hair", "hair_length", "hat"):
        _draw_group(rng, head, g, w)
    upper: dict[str, Any] = {}
    for g in ("garment", "pattern", "sleeves", "bag"):
        _draw_group(rng, upper, g, w)
    legs: dict[str, Any] = {}
    for g in ("lower", "lower_color", "shoes"):
        _draw_group(rng, legs, g, w)
    body = {"height": round(float(rng.uniform(0.95, 1.04)), 3), "width": round(float(rng.uniform(0.9, 1.1)), 3),
            "head": round(float(rng.uniform(0.94, 1.06)), 3)}
    return {"head": head, "upper": upper, "legs": legs, "body": body}


def _signature(part: dict, group: str) -> tuple:
    return tuple(part.get(f) for f in _GROUP_FIELDS[group])


def _make_family(rng: np.random.Generator, size: int, wardrobe: dict) -> tuple[list[dict], str, str]:
    """``size`` identities that share everything but one attribute group of one part."""
    w = dict(_MIXED, **wardrobe)
    base = sample_identity(rng, w)
    part = str(rng.choice(PARTS))
    groups = list(FAMILY_VARIATIONS[part])
    probs = np.asarray([FAMILY_VARIATIONS[part][g] for g in groups])
    first = int(rng.choice(len(groups), p=probs / probs.sum()))
    for group in [groups[first]] + [g for i, g in enumerate(groups) if i != first]:
        members = _vary(rng, base, part, group, size, w)
        if members is not None:
            return members, part, group
    raise RuntimeError(f"could not vary the {part} for a family of {size}")  # pragma: no cover


def _vary(rng: np.random.Generator, base: dict, part: str, group: str, size: int, w: dict) -> list[dict] | None:
    # a group with a rare "on" state (hat, bag) is forced to vary visibly: favour the "on" state
    wv = dict(w, hat=0.7, bag=0.8, long_hair=0.4, bald=0.3) if group in ("hat", "bag", "hair_length") else w
    members = [base]
    seen = {_signature(base[part], group)}
    for _ in range(size - 1):
        for _attempt in range(100):
            m = json.loads(json.dumps(base))
            _draw_group(rng, m[part], group, wv)
            sig = _signature(m[part], group)
            if sig not in seen:
                break
        else:
            return None
        seen.add(sig)
        members.append(m)
    return members


# ---------------------------------------------------------------------------------------------
# cameras

def camera_styles(seed: int, domain: str) -> list[dict]:
    """The resolved style of every camera of ``domain`` (the domain style, jittered per camera)."""
    base = _ALL_STYLES[domain]
    di = _DOMAIN_INDEX[domain]
    out = []
    for c in range(int(base["n_cams"])):
        r = _rng(seed, di, _ROLE_CAMERA, c)
        cast = [round(float(v * np.exp(r.normal(0.0, 0.045))), 4) for v in base["cast"]]
        walls, grounds = base["walls"], base["grounds"]
        st = {
            "camera": c + 1,
            "background": base["background"],
            "wall_rgb": [int(np.clip(v + r.normal(0, 8), 0, 255)) for v in walls[int(r.integers(len(walls)))]],
            "ground_rgb": [int(np.clip(v + r.normal(0, 6), 0, 255)) for v in grounds[int(r.integers(len(grounds)))]],
            "accents_rgb": [list(a) for a in base["accents"]],
            "horizon": round(float(r.uniform(*base["horizon"])), 4),
            "layout_seed": int(r.integers(2**31 - 1)),
            "brightness": round(float(base["brightness"] * np.exp(r.normal(0.0, 0.07))), 4),
            "contrast": round(float(base["contrast"] * np.exp(r.normal(0.0, 0.05))), 4),
            "saturation": round(float(base["saturation"] * np.exp(r.normal(0.0, 0.06))), 4),
            "gamma": round(float(base["gamma"] * np.exp(r.normal(0.0, 0.04))), 4),
            "cast": cast,
            "blur": round(float(max(0.0, base["blur"] + r.uniform(-0.1, 0.3))), 4),
            "lowres": round(float(max(1.0, base["lowres"] * r.uniform(0.85, 1.15))) if base["lowres"] > 1 else 1.0, 4),
            "noise": round(float(base["noise"] * r.uniform(0.75, 1.25)), 4),
            "vignette": round(float(base["vignette"] * r.uniform(0.7, 1.3)), 4),
            "light": round(float(r.uniform(-1.0, 1.0)), 4),
            "person_scale": round(float(r.uniform(0.95, 1.03)), 4),
            "occlusion": base["occlusion"],
            "clutter": base["clutter"],
        }
        out.append(st)
    return out


# ---------------------------------------------------------------------------------------------
# planning: identities, splits, cameras, file names

def market_name(pid: int, cam: int, frame: int, nn: int, seq: int = 1) -> str:
    """Market-1501 file name: ``0002_c1s1_000451_03.jpg``; junk (pid -1) is ``-1_c1s1_...``."""
    p = "-1" if pid < 0 else f"{pid:04d}"
    return f"{p}_c{cam}s{seq}_{frame:06d}_{nn:02d}.jpg"


def _plan_domain(seed: int, domain: str, scale: str) -> dict:
    spec = SCALES[scale]
    base = _ALL_STYLES[domain]
    di = _DOMAIN_INDEX[domain]
    n_cams = int(base["n_cams"])
    n_ids = int(spec["ids_per_domain"])
    block = int(spec.get("pid_block", _PID_BLOCK))
    if not 2 <= n_ids < block:
        raise ValueError(f"ids_per_domain must be in 2..{block - 1} (pid_block {block}), got {n_ids}")

    # families of 2-4 identities, all in one split
    rng = _rng(seed, di, _ROLE_IDENTITIES)
    sizes: list[int] = []
    while sum(sizes) < n_ids:
        sizes.append(int(rng.choice([2, 3, 4], p=[0.5, 0.35, 0.15])))
    excess = sum(sizes) - n_ids
    while excess > 0:  # trim, never below 2 members
        for i in range(len(sizes) - 1, -1, -1):
            if excess and sizes[i] > 2:
                sizes[i] -= 1
                excess -= 1
        if excess and all(s == 2 for s in sizes):
            sizes.pop()
            excess -= 2
    if excess < 0:  # odd leftovers: grow the last family
        sizes[-1] -= excess
    families = []
    for f, size in enumerate(sizes):
        members, part, group = _make_family(rng, size, base["wardrobe"])
        families.append({"family": f"{domain}-f{f:03d}", "varied_part": part, "varied_attr": group, "members": members})

    pr = _rng(seed, di, _ROLE_PLAN)
    pid_pool = [int(p) for p in di * block + 1 + pr.permutation(n_ids)]
    fam_order = [int(i) for i in pr.permutation(len(families))]
    identities: dict[int, dict] = {}
    n_train = 0
    k = 0
    if "train_ids" in spec:
        n_train_ids = int(spec["train_ids"])
    else:
        n_train_ids = round(n_ids * spec["train_frac"]) if "train_frac" in spec else n_ids // 2
    for fi in fam_order:
        fam = families[fi]
        split = "train" if n_train < n_train_ids else "test"
        for m in fam["members"]:
            pid = pid_pool[k]
            k += 1
            identities[pid] = {"pid": pid, "family": fam["family"], "varied_part": fam["varied_part"],
                               "varied_attr": fam["varied_attr"], "split": split, "attrs": m}
            n_train += split == "train"

    # images: each id in >= 2 cameras; test ids give one query per camera for a subset of cameras
    per_id = {"train": spec["images_per_id"], "test": spec.get("test_images_per_id", spec["images_per_id"])}
    images: list[dict] = []
    for pid in sorted(identities):
        ident = identities[pid]
        lo, hi = per_id[ident["split"]]
        n_c = int(pr.integers(2, n_cams + 1))
        cams = sorted(int(c) + 1 for c in pr.choice(n_cams, n_c, replace=False))
        n_img = max(int(pr.integers(lo, hi + 1)), n_c)
        cam_of = cams + [int(c) for c in pr.choice(cams, n_img - n_c)]
        ident["cameras"] = cams
        splits = ["train"] * n_img if ident["split"] == "train" else ["gallery"] * n_img
        if ident["split"] == "test":
            n_q = int(pr.integers(1, min(3, n_c - 1) + 1))
            for qc in pr.choice(cams, n_q, replace=False):
                idx = [j for j, c in enumerate(cam_of) if c == int(qc)]
                splits[idx[int(pr.integers(len(idx)))]] = "query"
        for j, (c, s) in enumerate(zip(cam_of, splits)):
            images.append({"pid": pid, "cam": c, "split": s, "kind": "normal", "key": (di, _ROLE_IMAGE, pid, j)})

    n_gallery = sum(im["split"] == "gallery" for im in images)
    n_dis = max(int(spec["min_distractors"]), int(round(spec["distractor_frac"] * n_gallery)))
    n_junk = max(int(spec["min_junk"]), int(round(spec["junk_frac"] * n_gallery)))
    xr = _rng(seed, di, _ROLE_EXTRA)
    test_pids = sorted(p for p, v in identities.items() if v["split"] == "test")
    for j in range(n_dis):  # somebody else: a fresh identity seen once
        images.append({"pid": 0, "cam": int(xr.integers(1, n_cams + 1)), "split": "gallery", "kind": "distractor",
                       "attrs": sample_identity(xr, base["wardrobe"]), "key": (di, _ROLE_DISTRACTOR, j, 0)})
    for j in range(n_junk):  # a bad crop of a test identity, ignored by the evaluation
        src = test_pids[int(xr.integers(len(test_pids)))]
        images.append({"pid": -1, "cam": int(xr.integers(1, n_cams + 1)), "split": "gallery", "kind": "junk",
                       "source_pid": src, "key": (di, _ROLE_JUNK, j, 0)})

    # frame numbers increase per camera in a shuffled order (unique names per camera)
    order = [int(i) for i in pr.permutation(len(images))]
    frame = {c: int(pr.integers(1, 400)) for c in range(1, n_cams + 1)}
    for i in order:
        im = images[i]
        frame[im["cam"]] += int(pr.integers(3, 60))
        name = market_name(im["pid"], im["cam"], frame[im["cam"]], int(pr.integers(1, 4)))
        im["relpath"] = f"{SPLIT_DIRS[im['split']]}/{name}"
    images.sort(key=lambda im: im["relpath"])
    return {"domain": domain, "identities": identities, "families": families, "images": images,
            "cameras": camera_styles(seed, domain)}


def _counts(plan: dict) -> dict[str, int]:
    ims, ids = plan["images"], plan["identities"]
    return {
        "identities": len(ids),
        "families": len(plan["families"]),
        "train_ids": sum(v["split"] == "train" for v in ids.values()),
        "test_ids": sum(v["split"] == "test" for v in ids.values()),
        "train_images": sum(im["split"] == "train" for im in ims),
        "query_images": sum(im["split"] == "query" for im in ims),
        "gallery_images": sum(im["split"] == "gallery" for im in ims),
        "distractors": sum(im["kind"] == "distractor" for im in ims),
        "junk": sum(im["kind"] == "junk" for im in ims),
        "images": len(ims),
    }


# ---------------------------------------------------------------------------------------------
# rendering jobs (run in worker processes)

def _render_job(job: dict) -> list[tuple]:
    rng = np.random.default_rng(np.random.SeedSequence(job["seed"], spawn_key=tuple(job["key"])))
    style = job["style"]
    pose = sample_pose(rng, job["kind"], style)
    img, gt = render_person(job["attrs"], pose, style, rng, tuple(job["size"]))
    path = Path(job["dir"]) / job["relpath"]
    img.save(path, "JPEG", quality=JPEG_QUALITY)
    h, w = int(job["size"][0]), int(job["size"][1])
    return [(job["relpath"], p, *gt[p].box, gt[p].visible, w, h) for p in BOX_PARTS]


def _jobs(plan: dict, seed: int, out_dir: Path) -> list[dict]:
    jobs = []
    for im in plan["images"]:
        if im["kind"] == "normal":
            attrs = plan["identities"][im["pid"]]["attrs"]
        elif im["kind"] == "junk":
            attrs = plan["identities"][im["source_pid"]]["attrs"]
        else:
            attrs = im["attrs"]
        jobs.append({"seed": seed, "key": im["key"], "kind": im["kind"], "attrs": attrs,
                     "style": plan["cameras"][im["cam"] - 1], "size": list(IMAGE_SIZE),
                     "dir": str(out_dir), "relpath": im["relpath"]})
    return jobs


def _run_jobs(jobs: list[dict], workers: int, progress: bool) -> list[list[tuple]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="synthetic images", unit="img", disable=not progress)
    results: list[list[tuple]] = []
    try:
        if workers <= 1 or len(jobs) < 64:
            for j in jobs:
                results.append(_render_job(j))
                bar.update(1)
        else:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(workers) as pool:
                for r in pool.imap(_render_job, jobs, chunksize=16):
                    results.append(r)
                    bar.update(1)
    finally:
        bar.close()
    return results


# ---------------------------------------------------------------------------------------------
# the public entry point

def read_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of a generated root, or None when there is none."""
    p = Path(root) / "manifest.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p}: not valid JSON ({e})") from e


def _scale_params(scale: str | dict) -> dict:
    """``SCALES[scale]`` (or a manifest's ``scale_params``) as JSON, without the description: what tells a
    changed definition of a scale."""
    params = SCALES[scale] if isinstance(scale, str) else scale
    return {k: v for k, v in json.loads(json.dumps(params)).items() if k != "description"}


def _is_ours(domain_dir: Path) -> bool:
    try:
        return json.loads((domain_dir / "attributes.json").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def generate_synthetic(out: str | os.PathLike, seed: int = 0, scale: str = "default",
                       domains: Sequence[str] = ("A", "B", "C", "D"), overwrite: bool = False,
                       workers: int | None = None, progress: bool = True) -> Path:
    """Generate the synthetic domains under ``out`` (``out/synth_A`` ...) and return ``out``.

    Skips the work when ``out/manifest.json`` already describes the same seed, scale and
    generator version and holds the requested domains (adds the missing ones when it holds only
    some); raises :class:`FileExistsError` when it describes another seed, scale or version,
    unless ``overwrite=True`` (which replaces the whole dataset). Everything is written into a hidden
    temporary folder inside ``out`` first and moved into place at the end; the manifest is
    written last, so an interrupted run never looks complete.

    workers: processes for rendering (default ``min(2, cpu_count)``); the output does not depend on it.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    domains = list(dict.fromkeys(str(d).upper().removeprefix("SYNTH_") for d in domains))
    bad = [d for d in domains if d not in _ALL_STYLES]
    if bad or not domains:
        raise ValueError(f"unknown domain(s) {bad or domains}; expected some of {sorted(_ALL_STYLES)}")
    seed = int(seed)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    old = read_manifest(root)
    keep: dict[str, Any] = {}  # domains of the existing dataset that stay (same seed, scale and version)
    if old is not None:
        same = (old.get("seed") == seed and old.get("scale") == scale and old.get("version") == GENERATOR_VERSION
                and _scale_params(old.get("scale_params", scale)) == _scale_params(scale))
        have = {d for d in old.get("domains", {}) if (root / f"synth_{d}").is_dir()}
        if same and set(domains) <= have:
            return root
        if same and not overwrite:  # add the missing domains next to the existing ones
            keep = {d: v for d, v in old["domains"].items() if d in have}
            domains = [d for d in domains if d not in have]
        elif not overwrite:
            raise FileExistsError(
                f"{root / 'manifest.json'}: a synthetic dataset with seed={old.get('seed')}, "
                f"scale={old.get('scale')!r}, version={old.get('version')!r}, domains={sorted(have)} already exists; "
                f"requested seed={seed}, scale={scale!r}, version={GENERATOR_VERSION!r}, domains={domains}"
                + ("" if _scale_params(old.get("scale_params", scale)) == _scale_params(scale) else
                   f" (the scale {scale!r} is now defined otherwise: {_scale_params(scale)})")
                + ". Pass overwrite=True to replace it (muva synth --overwrite; delete the grounding cache made from "
                  "it too), or choose another output folder.")
    else:
        for d in domains:
            p = root / f"synth_{d}"
            if p.exists() and not overwrite and not _is_ours(p):
                raise FileExistsError(f"{p}: exists but was not written by {GENERATOR}; "
                                      f"pass overwrite=True to replace it, or choose another output folder")

    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".synth-tmp-", dir=root))
    try:
        manifest: dict[str, Any] = {
            "generator": GENERATOR, "version": GENERATOR_VERSION, "seed": seed, "scale": scale,
            "scale_params": SCALES[scale], "image_size": list(IMAGE_SIZE), "jpeg_quality": JPEG_QUALITY,
            "layout": "market1501", "parts": list(BOX_PARTS), "domains": dict(keep),
        }
        plans, jobs = [], []
        for d in domains:
            plan = _plan_domain(seed, d, scale)
            ddir = tmp / f"synth_{d}"
            for sub in SPLIT_DIRS.values():
                (ddir / sub).mkdir(parents=True, exist_ok=True)
            plans.append((d, plan, ddir, len(jobs)))
            jobs.extend(_jobs(plan, seed, ddir))
        results = _run_jobs(jobs, workers, progress)

        import pandas as pd

        for d, plan, ddir, start in plans:
            rows = [r for res in results[start:start + len(plan["images"])] for r in res]
            frame = pd.DataFrame(rows, columns=list(PART_BOX_COLUMNS))
            frame = frame.astype({"x0": "float64", "y0": "float64", "x1": "float64", "y1": "float64",
                                  "visible": "float64", "img_w": "int32", "img_h": "int32"})
            write_parquet(ddir / "part_boxes.parquet", frame)
            write_json(ddir / "attributes.json", _attributes_doc(plan, seed, scale))
            style = {k: v for k, v in _ALL_STYLES[d].items()}
            manifest["domains"][d] = {"dataset": f"synth_{d}", "style": style, "cameras": plan["cameras"],
                                      "counts": _counts(plan)}

        # move into place: first drop the old completeness marker, then swap the folders
        (root / "manifest.json").unlink(missing_ok=True)
        stale = (set(old.get("domains", {})) - set(keep)) if old else set()
        for d in sorted(stale | set(domains)):
            target = root / f"synth_{d}"
            if target.exists():
                shutil.rmtree(target)
        for d, _plan, ddir, _ in plans:
            os.replace(ddir, root / f"synth_{d}")
        manifest["domains"] = {d: manifest["domains"][d] for d in sorted(manifest["domains"])}
        write_json(root / "manifest.json", manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        n = len(jobs)
        dt = time.perf_counter() - t0
        print(f"synthetic: {n} images in {dt:.1f} s ({n / max(dt, 1e-9):.0f} img/s, {workers} worker(s)) -> {root}")
    return root


def _attributes_doc(plan: dict, seed: int, scale: str) -> dict:
    ids = plan["identities"]
    return {
        "generator": GENERATOR, "version": GENERATOR_VERSION, "seed": seed, "scale": scale,
        "domain": plan["domain"], "dataset": f"synth_{plan['domain']}",
        "identities": {f"{pid:04d}": {k: ids[pid][k] for k in
                                      ("family", "varied_part", "varied_attr", "split", "cameras", "attrs")}
                       for pid in sorted(ids)},
        "families": {f["family"]: {"varied_part": f["varied_part"], "varied_attr": f["varied_attr"],
                                   "pids": sorted(p for p, v in ids.items() if v["family"] == f["family"])}
                     for f in plan["families"]},
    }


# ---------------------------------------------------------------------------------------------
# readers

def load_part_boxes(domain_root: str | os.PathLike):
    """The ground-truth part boxes of one generated domain (``<out>/synth_X``) as a DataFrame.

    Columns: relpath, part (head | upper | legs | person), x0, y0, x1, y1 (pixels, x1/y1 exclusive),
    visible (fraction of the part in the frame and not occluded), img_w, img_h.
    """
    import pandas as pd

    p = Path(domain_root) / "part_boxes.parquet"
    if not p.is_file():
        raise DatasetError(f"{p}: no part-box table (generate it with generate_synthetic)")
    frame = pd.read_parquet(p)
    missing = [c for c in PART_BOX_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(f"{p}: missing columns {missing}")
    return frame


def load_attributes(domain_root: str | os.PathLike) -> dict:
    """The identities (pid -> family, split, cameras, attributes) and families of one generated domain."""
    p = Path(domain_root) / "attributes.json"
    if not p.is_file():
        raise DatasetError(f"{p}: no attributes file (generate it with generate_synthetic)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p}: not valid JSON ({e})") from e
