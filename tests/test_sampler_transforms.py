"""P x K sampler (batches, determinism, epochs, distributed shares) and image + mask transforms."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from muva_core.data.datasets import load_dataset
from muva_core.data.samples import DatasetError, Sample
from muva_core.data.sampler import RandomIdentitySampler
from muva_core.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    ReIDImageDataset,
    ReIDTransform,
    build_test_transform,
    build_train_transform,
    PHOTOMETRIC_RANGES,
    flip_patch_mask,
    photometric_jitter,
    preload_images,
    preload_wanted,
    shift_patch_mask,
)

# ---------------------------------------------------------------- sampler


def uneven_pids(n_ids: int = 40, seed: int = 0) -> list[int]:
    """Identities with 1..12 images each, shuffled (so indices of one id are not contiguous)."""
    rng = np.random.default_rng(seed)
    pids = [pid for pid in range(n_ids) for _ in range(int(rng.integers(1, 13)))]
    return [int(p) for p in rng.permutation(pids)]


def check_batches(sampler: RandomIdentitySampler, pids: list[int]) -> list[list[int]]:
    flat = list(iter(sampler))
    assert len(flat) == len(sampler) and len(flat) % sampler.batch_size == 0
    batches = [flat[i : i + sampler.batch_size] for i in range(0, len(flat), sampler.batch_size)]
    for b in batches:
        counts = Counter(pids[i] for i in b)
        assert len(counts) == sampler.num_pids_per_batch  # P distinct identities
        assert set(counts.values()) == {sampler.num_instances}  # K images each
    return batches


def test_sampler_p_by_k_batches_default_16x4():
    pids = uneven_pids()
    s = RandomIdentitySampler(pids, seed=3)
    assert (s.num_pids_per_batch, s.num_instances, s.batch_size) == (16, 4, 64)
    batches = check_batches(s, pids)
    assert len(batches) >= 3
    # identities with fewer than K images are sampled with replacement up to K
    small = {p for p, c in Counter(pids).items() if c < 4}
    flat = [i for b in batches for i in b]
    used_small = {pids[i] for i in flat} & small
    assert used_small, "small identities should be used"
    for p in used_small:
        assert sum(pids[i] == p for i in flat) == 4


def test_sampler_uses_every_image_when_balanced():
    pids = [p for p in range(32) for _ in range(8)]  # 32 ids x 8 images, P=16, K=4 -> 4 batches
    s = RandomIdentitySampler(pids, num_instances=4, batch_size=64, seed=0)
    assert len(s) == 256
    assert sorted(iter(s)) == list(range(256))


def test_sampler_determinism_and_set_epoch():
    pids = uneven_pids()
    a = RandomIdentitySampler(pids, num_instances=4, batch_size=32, seed=7)
    b = RandomIdentitySampler(pids, num_instances=4, batch_size=32, seed=7)
    first = list(a)
    assert first == list(b) == list(a)  # same seed + epoch -> same order, repeatable
    a.set_epoch(1)
    second = list(a)
    assert second != first and len(second) == len(first)
    check_batches(a, pids)
    a.set_epoch(0)
    assert list(a) == first
    assert list(RandomIdentitySampler(pids, num_instances=4, batch_size=32, seed=8)) != first


def test_sampler_accepts_samples_and_dataloader():
    samples = [Sample(f"/x/{i}.jpg", pid, 0, "toy", f"{i}.jpg") for i, pid in enumerate(uneven_pids(20, seed=1))]
    s = RandomIdentitySampler(samples, num_instances=2, batch_size=8, seed=0)
    loader = DataLoader(list(range(len(samples))), batch_size=8, sampler=s)
    n = 0
    for batch in loader:
        counts = Counter(samples[int(i)].pid for i in batch)
        assert len(counts) == 4 and set(counts.values()) == {2}
        n += 1
    assert n == len(s) // 8


def test_sampler_distributed_shares_disjoint():
    pids = uneven_pids(60, seed=2)
    ranks = [RandomIdentitySampler(pids, num_instances=4, batch_size=16, seed=5, rank=r, world_size=3) for r in range(3)]
    for r in ranks:
        r.set_epoch(2)
    lists = [list(r) for r in ranks]
    assert len({len(x) for x in lists}) == 1 and all(len(x) == len(r) for x, r in zip(lists, ranks))
    for x, r in zip(lists, ranks):
        check_batches(r, pids)
    # every image appears at most once per epoch across all ranks
    sets = [set(x) for x in lists]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    single = RandomIdentitySampler(pids, num_instances=4, batch_size=16, seed=5)
    single.set_epoch(2)
    glob = single.global_batches()
    assert ranks[1].batches() == glob[1 : 3 * ranks[1].num_batches : 3]


def test_sampler_errors():
    with pytest.raises(ValueError, match="multiple"):
        RandomIdentitySampler([0, 1, 2], num_instances=4, batch_size=10)
    with pytest.raises(ValueError, match="distinct identities"):
        RandomIdentitySampler([0, 0, 1, 1], num_instances=2, batch_size=8)
    with pytest.raises(ValueError, match="rank"):
        RandomIdentitySampler([0, 1], num_instances=1, batch_size=2, rank=2, world_size=2)


# ---------------------------------------------------------------- masks


def test_flip_patch_mask_numpy_and_torch():
    grid = (3, 4)
    m = np.zeros((3, 12), dtype=np.float32)
    m[0].reshape(3, 4)[:, 0] = 1  # head part on the leftmost column
    m[2, 5] = 1  # legs: row 1, col 1
    f = flip_patch_mask(m, grid)
    assert f[0].reshape(3, 4)[:, 3].tolist() == [1, 1, 1] and f[0].sum() == 3
    assert f[2, 1 * 4 + 2] == 1 and f[2].sum() == 1
    np.testing.assert_array_equal(flip_patch_mask(f, grid), m)
    t = torch.from_numpy(m)
    assert torch.equal(flip_patch_mask(t, grid), torch.from_numpy(f))
    with pytest.raises(ValueError, match="expected 3x5=15"):
        flip_patch_mask(m, (3, 5))


def test_shift_patch_mask():
    m = torch.arange(12, dtype=torch.float32).reshape(1, 12) + 1  # 3x4 grid, values 1..12
    s = shift_patch_mask(m, (3, 4), dy=1, dx=-1)
    g = s.reshape(3, 4)
    assert g[0].tolist() == [0, 0, 0, 0]  # vacated top row
    assert g[:, 3].tolist() == [0, 0, 0]  # vacated right column
    assert g[1, 0] == 2 and g[2, 2] == 8  # (0,1)->(1,0), (1,3)->(2,2)
    assert torch.equal(shift_patch_mask(m, (3, 4), 0, 0), m)


# ---------------------------------------------------------------- transforms


def half_image(h: int = 256, w: int = 128) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0)  # left half red
    arr[:, w // 2 :] = (0, 0, 255)  # right half blue
    return Image.fromarray(arr)


def left_mask(grid=(16, 8)) -> torch.Tensor:
    m = torch.zeros(3, grid[0] * grid[1])
    m[0].view(*grid)[:, : grid[1] // 2] = 1  # part 0 on the left columns
    m[1].view(*grid)[:4, 0] = 1  # part 1: top-left column cells only
    return m


def test_flip_moves_image_and_mask_together():
    img, mask = half_image(), left_mask()
    t = build_train_transform(flip_prob=1.0)
    out, m = t(img, mask)
    assert out.shape == (3, 256, 128) and m.shape == (3, 128)
    red_norm = (1 - CLIP_MEAN[0]) / CLIP_STD[0]
    # after the flip the red half is on the right, and the mask's part 0 too
    assert out[0, :, 70:].mean() == pytest.approx(red_norm, abs=1e-4)
    assert out[0, :, :58].mean() < 0
    grid = m.view(3, 16, 8)
    assert grid[0, :, 4:].sum() == 64 and grid[0, :, :4].sum() == 0
    assert grid[1, :4, 7].sum() == 4 and grid[1].sum() == 4
    # without the flip nothing moves (test transform, or train with flip_prob=0)
    for t0 in (build_test_transform(), build_train_transform(flip_prob=0.0)):
        out0, m0 = t0(img, mask)
        assert out0[0, :, :58].mean() == pytest.approx(red_norm, abs=1e-4)
        assert torch.equal(m0, mask)


def test_flip_is_random_but_consistent():
    img, mask = half_image(), left_mask()
    t = build_train_transform()  # flip_prob 0.5
    flips = 0
    for seed in range(20):
        out, m = t(img, mask, generator=torch.Generator().manual_seed(seed))
        image_flipped = bool(out[0, :, :58].mean() < 0)
        mask_flipped = bool(m[0].view(16, 8)[:, 4:].sum() > 0)
        assert image_flipped == mask_flipped
        flips += image_flipped
    assert 3 <= flips <= 17


def test_normalisation_values():
    white = Image.fromarray(np.full((256, 128, 3), 255, dtype=np.uint8))
    black = Image.fromarray(np.zeros((256, 128, 3), dtype=np.uint8))
    out, m = build_test_transform()(white)
    assert m is None
    expected = torch.tensor([(1 - mu) / sd for mu, sd in zip(CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    out_b, _ = build_test_transform()(black)
    assert torch.allclose(out_b.mean(dim=(1, 2)), torch.tensor([-mu / sd for mu, sd in zip(CLIP_MEAN, CLIP_STD)]), atol=1e-5)
    ref_w, _ = build_test_transform(norm="reference")(white)
    ref_b, _ = build_test_transform(norm="reference")(np.zeros((256, 128, 3), dtype=np.uint8))
    assert torch.allclose(ref_w, torch.ones_like(ref_w)) and torch.allclose(ref_b, -torch.ones_like(ref_b))
    custom, _ = build_test_transform(mean=(0, 0, 0), std=(1, 1, 1))(white)
    assert torch.allclose(custom, torch.ones_like(custom))
    with pytest.raises(ValueError, match="normalisation"):
        build_test_transform(norm="imagenet-ish")


def test_configurable_size_and_mask_validation():
    t = build_train_transform(size=(384, 128), flip_prob=1.0)
    assert t.grid_hw == (24, 8)
    out, m = t(half_image(100, 50), torch.zeros(3, 24 * 8))
    assert out.shape == (3, 384, 128) and m.shape == (3, 192)
    with pytest.raises(ValueError, match="expected 24x8=192"):
        t(half_image(), torch.zeros(3, 128))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ReIDTransform(size=(250, 128))


def test_defaults_have_crop_and_erasing_off():
    t = build_train_transform()
    assert not t.random_crop and not t.random_erasing and t.mean == CLIP_MEAN and t.std == CLIP_STD
    assert not build_test_transform(size=(256, 128)).train


def test_random_crop_keeps_mask_aligned_on_patch_grid():
    arr = np.zeros((256, 128, 3), dtype=np.uint8)
    arr[5 * 16 : 6 * 16, 3 * 16 : 4 * 16] = 255  # one white patch at grid cell (5, 3)
    mask = torch.zeros(3, 128)
    mask[0, 5 * 8 + 3] = 1
    t = build_train_transform(flip_prob=0.0, random_crop=True, crop_padding=16, norm="reference")
    moved = 0
    for seed in range(25):
        out, m = t(Image.fromarray(arr), mask, generator=torch.Generator().manual_seed(seed))
        cells = out[0].view(16, 16, 8, 16).mean(dim=(1, 3))  # per-patch mean brightness [16, 8]
        assert m[0].sum() == 1
        cell = int(m[0].argmax())
        # the mask's cell holds at least half of the white patch (= the brightest cell, up to ties)
        assert cells.view(-1)[cell] >= cells.max() - 1e-5
        moved += cell != 5 * 8 + 3
    assert moved > 0


def test_random_erasing_changes_pixels_not_mask():
    img, mask = half_image(), left_mask()
    t = build_train_transform(flip_prob=0.0, random_erasing=True, erasing_prob=1.0)
    out, m = t(img, mask, generator=torch.Generator().manual_seed(0))
    ref, _ = build_test_transform()(img, mask)
    changed = (out != ref).any(dim=0).float().mean()
    assert 0.01 < changed < 0.5
    assert torch.equal(m, mask)


def test_photometric_jitter_factors_in_order():
    """Each factor alone, on a known image, gives the hand-computed result; a draw outside p changes nothing."""
    x = torch.tensor([0.2, 0.5, 0.8])[:, None, None].expand(3, 2, 2).clone()
    fixed = lambda **kw: {k: kw.get(k, (1.0, 1.0)) for k in PHOTOMETRIC_RANGES} | {"noise": (0.0, 0.0)}
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(photometric_jitter(x, g, ranges=fixed()), x)
    assert torch.allclose(photometric_jitter(x, g, ranges=fixed(brightness=(0.5, 0.5))), x * 0.5)
    assert torch.allclose(photometric_jitter(x, g, ranges=fixed(gamma=(2.0, 2.0))), x ** 2)
    grey = 0.299 * 0.2 + 0.587 * 0.5 + 0.114 * 0.8
    assert torch.allclose(photometric_jitter(x, g, ranges=fixed(contrast=(0.5, 0.5))), grey + 0.5 * (x - grey))
    assert torch.allclose(photometric_jitter(x, g, ranges=fixed(saturation=(0.0, 0.0))),
                          torch.full_like(x, grey))
    assert torch.equal(photometric_jitter(x, g, p=0.0), x)
    y = photometric_jitter(x, torch.Generator().manual_seed(1), p=1.0)
    assert y.min() >= 0 and y.max() <= 1 and not torch.allclose(y, x)
    assert torch.equal(y, photometric_jitter(x, torch.Generator().manual_seed(1), p=1.0))   # seeded


def test_color_jitter_augment_keeps_the_mask_and_is_train_only():
    img, mask = half_image(), left_mask()
    t = build_train_transform(flip_prob=0.0, color_jitter=True)
    outs = [t(img, mask, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    ref, _ = build_test_transform()(img, mask)
    assert sum(not torch.allclose(o, ref) for o, _ in outs) >= 3
    assert all(torch.equal(m, mask) for _, m in outs)
    assert not build_train_transform().color_jitter
    assert not ReIDTransform(train=False, color_jitter=True).color_jitter


def test_augment_key_builds_the_named_steps():
    from muva_core.config import resolve_config
    from muva_core.train.stage2 import train_loader

    samples = [Sample("x.jpg", pid, 0, "synth_A", f"{pid}_{i}.jpg") for pid in range(4) for i in range(4)]
    for augment, steps in [("flip", set()), ("flip+color", {"color"}), ("flip+crop+erase", {"crop", "erase"}),
                           ("flip+crop+erase+color", {"crop", "erase", "color"})]:
        cfg = resolve_config("synth:A2B", overrides={"augment": augment, "batch_size": 8, "num_instances": 2,
                                                     "num_workers": 0, "cache_images": "never"})
        t = train_loader(samples, None, cfg)[0].dataset.transform
        assert {k for k, on in [("crop", t.random_crop), ("erase", t.random_erasing),
                                ("color", t.color_jitter)] if on} == steps, augment


# ---------------------------------------------------------------- torch dataset


def test_reid_image_dataset_with_masks(market_root: Path):
    ds = load_dataset("market", market_root)
    masks = {s.key: left_mask() for s in ds.train}
    data = ReIDImageDataset(ds.train, build_train_transform(flip_prob=1.0), masks=masks)
    item = data[1]
    assert set(item) == {"image", "pid", "camid", "index", "mask"}
    assert item["image"].shape == (3, 256, 128) and item["index"] == 1 and item["pid"] == ds.train[1].pid
    assert item["mask"].view(3, 16, 8)[0, :, 4:].sum() == 64  # flipped with the image
    batch = next(iter(DataLoader(data, batch_size=4)))
    assert batch["image"].shape == (4, 3, 256, 128) and batch["mask"].shape == (4, 3, 128)
    assert batch["pid"].tolist() == [s.pid for s in ds.train[:4]]
    aligned = ReIDImageDataset(ds.train, build_test_transform(), masks=torch.zeros(len(ds.train), 3, 128))
    assert aligned[0]["mask"].shape == (3, 128)
    plain = ReIDImageDataset(ds.query)
    assert set(plain[0]) == {"image", "pid", "camid", "index"}


def test_reid_image_dataset_errors(market_root: Path):
    ds = load_dataset("market", market_root)
    data = ReIDImageDataset(ds.train, build_train_transform(), masks={})
    with pytest.raises(DatasetError) as err:
        data[0]
    assert ds.train[0].key in str(err.value)
    with pytest.raises(TypeError, match="does not take a mask"):
        ReIDImageDataset(ds.train, lambda im: im, masks={})
    Path(ds.query[0].path).write_bytes(b"broken")
    with pytest.raises(DatasetError) as err:
        ReIDImageDataset(ds.query)[0]
    assert ds.query[0].path in str(err.value)


@pytest.mark.parametrize("augment", [dict(color_jitter=True), dict(random_crop=True, random_erasing=True)])
def test_preloaded_images_give_the_same_batches_as_reading_them(market_root: Path, augment):
    """data.cache_images: the images decoded and resized once give the same tensors and masks, draw for draw,
    as reading and resizing them every time (flip, jitter; crop and erasing through the PIL path)."""
    ds = load_dataset("market", market_root)
    samples = ds.train
    n = len(samples)
    assert n >= 6
    masks = {s.key: left_mask() for s in samples}
    transform = build_train_transform(**augment)
    images = preload_images(samples, transform)
    assert images.shape == (n, 256, 128, 3) and images.dtype == torch.uint8
    read = ReIDImageDataset(samples, transform, masks=masks)
    pre = ReIDImageDataset(samples, transform, masks=masks, images=images)
    for seed in range(3):
        torch.manual_seed(seed)
        a = [read[i] for i in range(n)]
        torch.manual_seed(seed)
        b = [pre[i] for i in range(n)]
        assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"]) for x, y in zip(a, b))
    with pytest.raises(ValueError, match=f"{n} preloaded images for {n - 1} samples"):
        ReIDImageDataset(samples[:-1], transform, masks=masks, images=images)
    with pytest.raises(ValueError, match="preloaded image of 256x128 for a transform of 128x64"):
        build_train_transform((128, 64))(images[0], resized=True)
    Path(samples[3].path).write_bytes(b"broken")
    with pytest.raises(DatasetError, match=str(samples[3].path)):
        preload_images(samples, transform)


def test_cache_images_auto_preloads_what_fits_in_memory():
    from muva_core.config import CHOICES
    from muva_core.data.transforms import CACHE_IMAGES, PRELOAD_AUTO_BYTES

    assert set(CHOICES["cache_images"]) == set(CACHE_IMAGES)
    assert preload_wanted("auto", 12_936, (256, 128))          # Market-1501's training split: 1.3 GB
    assert not preload_wanted("auto", 32_621, (256, 128))      # MSMT17's: 3.2 GB
    assert preload_wanted("always", 32_621, (256, 128)) and not preload_wanted("never", 10, (256, 128))
    assert preload_wanted("auto", PRELOAD_AUTO_BYTES // (256 * 128 * 3), (256, 128))
    with pytest.raises(ValueError, match="cache_images: expected one of auto, always, never"):
        preload_wanted("yes", 10, (256, 128))
