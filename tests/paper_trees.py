"""Tiny trees of the paper's datasets in their real layouts, and the authors' mask pickle, for end-to-end tests.

``msmt17_v1(root, ids)``  MSMT17_V1/{train,test}/<pid>/... + list_{train,val,query,gallery}.txt (``ids`` training
                          identities, one image each: the P x K sampler fills K by repetition)
``market1501(root)``      Market-1501-v15.09.15 with a few query and gallery identities
``authors_pickle(path, names)``  ``pickle.dump`` of ``{basename: [3, 128] float32}`` with 0 inside each part's stripe
                          and -inf outside, the additive masks the authors' loader feeds to the attention
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from conftest import write_image

STRIPES = {0: (0, 3), 1: (2, 9), 2: (8, 16)}
"""Rows of the 16 x 8 patch grid each part covers in the masks written here (head, upper body, legs)."""


def msmt17_v1(root: Path, ids: int = 16, test_ids: int = 3) -> Path:
    folder = root / "MSMT17_V1"
    lists: dict[str, list[str]] = {"list_train.txt": [], "list_val.txt": [], "list_query.txt": [],
                                   "list_gallery.txt": []}
    for pid in range(ids):
        rel = f"{pid:04d}/{pid:04d}_{pid:03d}_{pid % 15 + 1:02d}_0303morning_{pid:04d}_0.jpg"
        write_image(folder / "train" / rel, color=(40 + 12 * pid % 200, 80, 120))
        lists["list_val.txt" if pid % 4 == 3 else "list_train.txt"].append(f"{rel} {pid}")
    for pid in range(test_ids):
        for j, split in enumerate(("list_query.txt", "list_gallery.txt", "list_gallery.txt")):
            rel = f"{pid:04d}/{pid:04d}_{j:03d}_{(pid + j) % 15 + 1:02d}_0303noon_{j:04d}_0.jpg"
            write_image(folder / "test" / rel, color=(200, 30 * pid % 255, 60))
            lists[split].append(f"{rel} {pid}")
    for name, lines in lists.items():
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def market1501(root: Path, ids: int = 4) -> Path:
    folder = root / "Market-1501-v15.09.15"
    for pid in range(1, ids + 1):
        write_image(folder / "bounding_box_train" / f"{pid:04d}_c1s1_{pid:06d}_00.jpg")
        write_image(folder / "query" / f"{pid:04d}_c1s1_{pid:06d}_01.jpg", color=(30 * pid, 90, 90))
        for cam in (2, 3):
            write_image(folder / "bounding_box_test" / f"{pid:04d}_c{cam}s1_{pid:06d}_02.jpg", color=(30 * pid, 90, 80))
    return folder


def part_mask(rows: int = 16, cols: int = 8) -> np.ndarray:
    """One ``[3, rows * cols]`` additive mask: 0 inside each part's stripe of rows, -inf elsewhere."""
    m = np.full((3, rows, cols), -np.inf, np.float32)
    for part, (r0, r1) in STRIPES.items():
        m[part, r0:r1] = 0.0
    return m.reshape(3, rows * cols)


def authors_pickle(path: Path, names, **extra) -> Path:
    """The authors' format: ``pickle.dump({basename: [3, 128] array})``."""
    masks = {name: part_mask() for name in names}
    masks.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(masks, fh)
    return path
