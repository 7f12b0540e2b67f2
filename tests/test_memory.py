"""PrototypeMemory (VPM-2): build, hardest-sample momentum update (eq. 3), loss (eq. 2), DDP gather."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from muva_core.train.losses import imp_loss
from muva_core.train.memory import PrototypeMemory, all_gather_variable


def _unit(x, y):
    n = math.hypot(x, y)
    return [x / n, y / n]


def _built_memory(momentum=0.2):
    # centroids: id0 -> [1, 0], id1 -> [0, 1], id2 -> [1, 1]/sqrt2
    mem = PrototypeMemory(3, 2, momentum=momentum)
    mem.build(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]), torch.tensor([0, 1, 2]))
    return mem


# batch: sims to the centroid written per row; the hardest of id0 is row 2, of id1 row 3
BATCH = torch.tensor(
    [
        [1.0, 0.1],   # id0, cos 0.995
        [0.0, 2.0],   # id1, cos 1
        [0.2, 1.0],   # id0, cos 0.196  <- hardest id0
        [1.0, -0.1],  # id1, cos -0.0995 <- hardest id1
        [1.0, 1.0],   # id0, cos 0.707
        [0.5, 1.0],   # id1, cos 0.894
    ]
)
LABELS = torch.tensor([0, 1, 0, 1, 0, 1])


def test_build_is_normalised_mean_of_normalised_features():
    mem = PrototypeMemory(2, 2)
    feats = torch.tensor([[3.0, 4.0], [0.0, 1.0], [2.0, 0.0]])
    mem.build(feats, torch.tensor([0, 0, 1]))
    # id0: mean([0.6, 0.8], [0, 1]) = [0.3, 0.9] -> / sqrt(0.9); id1: [1, 0]
    n = math.sqrt(0.9)
    expected = torch.tensor([[0.3 / n, 0.9 / n], [1.0, 0.0]])
    assert torch.allclose(mem.centroids, expected, atol=1e-6)
    assert bool(mem.built)


def test_build_rejects_ids_without_samples_and_bad_labels():
    mem = PrototypeMemory(4, 2)
    with pytest.raises(ValueError, match=r"2 of 4 identities have no sample \(ids \[1, 3\]"):
        mem.build(torch.ones(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        mem.build(torch.ones(2, 2), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        mem.build(torch.ones(2, 3), torch.tensor([0, 1]))


def test_hardest_sample_per_id():
    ids, idx = _built_memory().hardest(BATCH, LABELS)
    assert ids.tolist() == [0, 1]
    assert idx.tolist() == [2, 3]


def test_update_applies_momentum_rule_exactly():
    mem = _built_memory(momentum=0.2)
    before = mem.centroids.clone()
    updated = mem.update(BATCH, LABELS)
    assert updated.tolist() == [0, 1]
    # id0: M = normalise(0.2 * [1, 0] + 0.8 * normalise([0.2, 1]))
    v0 = _unit(0.2, 1.0)
    m0 = _unit(0.2 * 1.0 + 0.8 * v0[0], 0.2 * 0.0 + 0.8 * v0[1])
    # id1: M = normalise(0.2 * [0, 1] + 0.8 * normalise([1, -0.1]))
    v1 = _unit(1.0, -0.1)
    m1 = _unit(0.2 * 0.0 + 0.8 * v1[0], 0.2 * 1.0 + 0.8 * v1[1])
    assert torch.allclose(mem.centroids[0], torch.tensor(m0), atol=1e-6)
    assert torch.allclose(mem.centroids[1], torch.tensor(m1), atol=1e-6)
    assert torch.equal(mem.centroids[2], before[2])  # id2 absent from the batch: untouched
    # gamma = 0.2 weighs the OLD centroid: the new one sits much closer to the hard sample
    assert float(mem.centroids[0] @ torch.tensor(v0)) > 0.95
    assert torch.allclose(mem.centroids.norm(dim=1), torch.ones(3))


def test_update_extreme_momenta():
    keep = _built_memory(momentum=1.0)
    before = keep.centroids.clone()
    keep.update(BATCH, LABELS)
    assert torch.allclose(keep.centroids, before)
    replace = _built_memory(momentum=0.0)
    replace.update(BATCH, LABELS)
    assert torch.allclose(replace.centroids[0], torch.tensor(_unit(0.2, 1.0)), atol=1e-6)


def test_loss_equals_formula():
    gen = torch.Generator().manual_seed(0)
    mem = PrototypeMemory(4, 5, temperature=0.05)
    mem.build(torch.randn(12, 5, generator=gen), torch.arange(12) % 4)
    feats = torch.randn(6, 5, generator=gen)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    m = mem.centroids
    expected = 0.0
    for f, label in zip(feats, y):
        sims = [float(F.normalize(f, dim=0) @ m[j]) / 0.05 for j in range(4)]
        expected += -sims[int(label)] + math.log(sum(math.exp(s) for s in sims))
    assert abs(float(mem.loss(feats, y)) - expected / 6) < 1e-4
    assert torch.allclose(mem(feats, y), imp_loss(feats, m, y, 0.05))


def test_update_before_backward_is_safe_and_uses_old_centroids():
    mem = _built_memory()
    feats = BATCH.clone().requires_grad_(True)
    old = mem.centroids.clone()
    loss = mem.loss(feats, LABELS)
    mem.update(feats, LABELS)  # in place, before backward
    loss.backward()
    ref = BATCH.clone().requires_grad_(True)
    imp_loss(ref, old, LABELS, mem.temperature).backward()
    assert torch.allclose(feats.grad, ref.grad)
    assert not torch.equal(mem.centroids, old)


def test_empty_memory_and_state_dict():
    mem = PrototypeMemory(3, 2)
    with pytest.raises(RuntimeError, match="build"):
        mem.loss(torch.ones(1, 2), torch.tensor([0]))
    src = _built_memory()
    src.update(BATCH, LABELS)
    sd = src.state_dict()
    assert set(sd) == {"centroids", "built"}
    fresh = PrototypeMemory(3, 2)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.centroids, src.centroids)
    assert torch.allclose(fresh.loss(BATCH, LABELS), src.loss(BATCH, LABELS))


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2)
    assert all_gather_variable(x) is x


# ---- DDP: two gloo processes with different batch sizes ------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [1.0, 0.5], [0.3, 1.0]])
        train_y = torch.tensor([0, 1, 2, 0, 1])
        shard = slice(0, 2) if rank == 0 else slice(2, 5)  # unequal shards
        mem = PrototypeMemory(3, 2)
        mem.build(train[shard], train_y[shard], gather=True)
        built = mem.centroids.clone()
        part = slice(0, 2) if rank == 0 else slice(2, 6)  # unequal batches
        mem.update(BATCH[part], LABELS[part], gather=True)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), built=built.numpy(), updated=mem.centroids.numpy())
    finally:
        dist.destroy_process_group()


def test_ddp_gather_build_and_update(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ref = PrototypeMemory(3, 2)
    ref.build(
        torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [1.0, 0.5], [0.3, 1.0]]), torch.tensor([0, 1, 2, 0, 1])
    )
    built = ref.centroids.clone()
    ref.update(BATCH, LABELS)  # the whole global batch in one process
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as z:
            assert np.allclose(z["built"], built.numpy(), atol=1e-6)
            assert np.allclose(z["updated"], ref.centroids.numpy(), atol=1e-6)
