"""Shared fixtures: tiny fake Re-ID dataset trees (real folder layouts, tiny valid images) in tmp_path.

Each dataset fixture writes ``tmp_path / "data" / <conventional folder name>`` and returns that
dataset folder (its ``.parent`` is a valid parent root for every dataset of the test).
"""
from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pytest

# The suite's numbers are the same on every machine: float32 on CPU even where the CPU has native bfloat16 (the
# default of `cpu_amp: auto`, muva_core.precision); tests of the bfloat16 path set it themselves. Subprocesses
# (the CLI, papermill kernels) inherit it.
os.environ.setdefault("MUVA_CPU_AMP", "0")

# Under pytest-xdist (`make test` runs one worker per core) the workers share the cores: each computes on
# cores // workers threads, since workers of a whole machine's threads each would oversubscribe it. Subprocesses
# (the CLI, papermill kernels) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _threads = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)
    import torch

    torch.set_num_threads(_threads)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist the end-to-end tests (marked slow: up to minutes each) are handed out first, so the
    longest of them does not start when the other workers are nearly done. A plain run keeps the file order."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@lru_cache(maxsize=None)
def _image_bytes(fmt: str, color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 16), color).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, color: tuple[int, int, int] = (120, 60, 30)) -> Path:
    """Write a tiny valid 8x16 image (JPEG or PNG by suffix) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    path.write_bytes(_image_bytes(fmt, color))
    return path


def write_images(folder: Path, names: Iterable[str]) -> None:
    for name in names:
        write_image(folder / name)


# Market-1501: train pids 2, 7, 10 (relabelled 0, 1, 2), a junk image in every split,
# a distractor (0000) in query (must be dropped) and two in the gallery (kept), a Thumbs.db.
MARKET_FILES = {
    "bounding_box_train": [
        "0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg",
        "0007_c3s1_000101_01.jpg", "0007_c1s2_000201_02.jpg", "0007_c2s1_000211_01.jpg",
        "0010_c6s1_000011_01.jpg", "0010_c5s1_000021_01.jpg",
        "-1_c1s1_000401_03.jpg",
    ],
    "query": [
        "0002_c1s1_001051_00.jpg", "0007_c2s1_000151_00.jpg", "0010_c3s1_000151_00.jpg",
        "0000_c1s1_000001_00.jpg", "-1_c4s1_000001_00.jpg",
    ],
    "bounding_box_test": [
        "0002_c4s1_000076_01.jpg", "0007_c5s1_000076_01.jpg", "0010_c6s2_000076_01.jpg",
        "0011_c2s1_000076_01.jpg",
        "0000_c1s1_000002_01.jpg", "0000_c3s1_000003_01.jpg",
        "-1_c2s1_000004_01.jpg", "-1_c3s1_000005_01.jpg",
    ],
}

DUKE_FILES = {
    "bounding_box_train": ["0005_c2_f0046985.jpg", "0005_c3_f0047000.jpg", "0009_c8_f0001000.jpg", "0009_c1_f0001100.jpg"],
    "query": ["0005_c1_f0050000.jpg", "0009_c7_f0002000.jpg"],
    "bounding_box_test": ["0005_c5_f0060000.jpg", "0009_c4_f0003000.jpg", "0012_c6_f0004000.jpg"],
}

# MSMT17 V1 list layout: "relpath pid" lines; camera = 3rd '_' field of the name, 1-based.
MSMT_V1_LISTS = {
    ("train", "list_train.txt"): [
        ("0000/0000_000_01_0303morning_0008_0.jpg", 0),
        ("0000/0000_001_05_0303morning_0009_0.jpg", 0),
        ("0001/0001_000_15_0303noon_0010_0.jpg", 1),
    ],
    ("train", "list_val.txt"): [
        ("0001/0001_001_02_0303noon_0011_0.jpg", 1),
        ("0002/0002_000_03_0303afternoon_0012_0.jpg", 2),
    ],
    ("test", "list_query.txt"): [
        ("0000/0000_000_04_0303morning_0100_0.jpg", 0),
        ("0001/0001_000_06_0303morning_0101_0.jpg", 1),
    ],
    ("test", "list_gallery.txt"): [
        ("0000/0000_001_07_0303morning_0200_0.jpg", 0),
        ("0001/0001_001_08_0303morning_0201_0.jpg", 1),
        ("0002/0002_001_09_0303morning_0202_0.jpg", 2),
    ],
}

# MSMT17 market-style conversion; pid 0 is a real identity here (kept in train and query).
MSMT_V2_FILES = {
    "bounding_box_train": ["0000_c1_0008.jpg", "0000_c14_0009.jpg", "0003_c15_0010.jpg"],
    "query": ["0000_c2_0100.jpg", "0003_c4_0101.jpg"],
    "bounding_box_test": ["0000_c5_0200.jpg", "0003_c6_0201.jpg", "0004_c7_0202.jpg"],
}

CUHK_FILES = {
    "detected": {
        "bounding_box_train": ["0001_c1_1.png", "0001_c2_6.png", "0003_c1_2.png", "0003_c2_7.png"],
        "query": ["0002_c1_1.png"],
        "bounding_box_test": ["0002_c2_6.png", "0004_c2_6.png"],
    },
    "labeled": {
        "bounding_box_train": ["0001_c1_1.png", "0001_c2_6.png"],
        "query": ["0002_c1_1.png", "0004_c1_1.png"],
        "bounding_box_test": ["0002_c2_6.png", "0004_c2_7.png", "0005_c2_8.png"],
    },
}

# A synthetic domain: Market naming; each domain gets a different number of train ids.
SYNTH_TRAIN_IDS = {"A": 3, "B": 4, "C": 5, "D": 6}


def synth_files(letter: str) -> dict[str, list[str]]:
    n = SYNTH_TRAIN_IDS[letter]
    train = [f"{pid:04d}_c{cam}s1_{pid:03d}{cam}_00.jpg" for pid in range(1, n + 1) for cam in (1, 2)]
    query = [f"{pid:04d}_c1s1_9{pid:03d}_00.jpg" for pid in range(101, 103)]
    gallery = [f"{pid:04d}_c2s1_9{pid:03d}_00.jpg" for pid in range(101, 104)] + ["0000_c3s1_000000_00.jpg"]
    return {"bounding_box_train": train, "query": query, "bounding_box_test": gallery}


def _write_market_style(folder: Path, files: dict[str, list[str]]) -> Path:
    for split, names in files.items():
        write_images(folder / split, names)
    return folder


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture
def market_root(data_root: Path) -> Path:
    folder = _write_market_style(data_root / "Market-1501-v15.09.15", MARKET_FILES)
    (folder / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")
    return folder


@pytest.fixture
def duke_root(data_root: Path) -> Path:
    return _write_market_style(data_root / "DukeMTMC-reID", DUKE_FILES)


@pytest.fixture
def msmt_v1_root(data_root: Path) -> Path:
    folder = data_root / "MSMT17_V1"
    for (img_dir, list_name), entries in MSMT_V1_LISTS.items():
        for rel, _ in entries:
            write_image(folder / img_dir / rel)
        (folder / list_name).write_text("".join(f"{rel} {pid}\n" for rel, pid in entries))
    return folder


@pytest.fixture
def msmt_v2_root(data_root: Path) -> Path:
    return _write_market_style(data_root / "MSMT17_V2", MSMT_V2_FILES)


@pytest.fixture
def cuhk03_root(data_root: Path) -> Path:
    folder = data_root / "cuhk03-np"
    for subset, files in CUHK_FILES.items():
        _write_market_style(folder / subset, files)
    return folder


@pytest.fixture
def synth_root(data_root: Path) -> Path:
    """Parent folder holding synth_A .. synth_D (Market layout each)."""
    parent = data_root / "synth"
    for letter in SYNTH_TRAIN_IDS:
        _write_market_style(parent / f"synth_{letter}", synth_files(letter))
    return parent


@pytest.fixture(scope="session")
def small_synth_root(tmp_path_factory) -> Path:
    """The real synthetic generator at ``scale="small"`` (seed 0), shared by the whole session."""
    from muva_core.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("synthetic") / "synth", seed=0, scale="small", progress=False)


def make_truth(n: int, seed: int = 0, img_size=(256, 128)) -> pd.DataFrame:
    """Plausible true part boxes for person crops of ``img_size=(H, W)``, varied scale and offset."""
    H, W = img_size
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rel = f"bounding_box_train/{i // 4:04d}_c{i % 3 + 1}s1_{i:06d}_00.jpg"
        ph = rng.uniform(0.75, 0.98) * H
        top = rng.uniform(0, H - ph)
        pw = min(ph * rng.uniform(0.32, 0.45), 0.95 * W)
        c = float(np.clip(W / 2 + rng.uniform(-0.12, 0.12) * W, pw / 2, W - pw / 2))
        for part, (f0, f1, fw) in {"head": (0, 0.16, 0.45), "upper": (0.13, 0.55, 0.95), "legs": (0.5, 1.0, 0.75),
                                   "person": (0, 1, 1)}.items():
            rows.append(dict(relpath=rel, part=part, x0=c - fw * pw / 2, y0=top + f0 * ph, x1=c + fw * pw / 2,
                             y1=top + f1 * ph, visible=1.0, img_w=W, img_h=H))
    return pd.DataFrame(rows)


def tiny_run_config(synth_root: Path, folder: Path, cache: Path, **overrides):
    """A training run on the small synthetic set with the tiny random CLIP (seconds on a CPU)."""
    from muva_core.config import RunConfig

    values = {
        "protocol": "synth:A2B", "synth_root": str(synth_root), "synth_scale": "small", "cache_dir": str(cache),
        "run_dir": str(folder), "backbone": "tiny", "pretrained": "none", "stage1_epochs": 3,
        "stage1_warmup_epochs": 1, "stage1_batch_ids": 4, "stage2_epochs": 3, "warmup_epochs": 1,
        "lr_milestones": [2], "stage2_lr": 3e-4, "batch_size": 16, "num_workers": 0, "device": "cpu",
    }
    values.update(overrides)
    return RunConfig().update(values)
