"""Checkpoints (safetensors, atomic, no pickle), exact resumption, run directories, seeding."""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import muva_core.train.checkpoint as ckpt_mod
from muva_core.seeding import rng_state, seed_everything, seeded_generator, set_rng_state, worker_init_fn
from muva_core.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)
from muva_core.train.memory import PrototypeMemory
from muva_core.train.schedulers import WarmupMultiStepLR, make_param_groups

CONFIG = {"seed": 0, "lr": 5e-6, "milestones": (30, 50), "protocol": "synth:A2B", "nested": {"a": [1, 2]}}


class Net(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3))
        self.rmp = nn.Linear(8, 8)
        self.head = nn.Linear(8, num_classes, bias=False)

    def forward(self, x):
        h = self.body(x)
        h = h + self.rmp(h)
        return h, self.head(h)


class Prompts(nn.Module):
    def __init__(self):
        super().__init__()
        self.ctx = nn.Parameter(torch.randn(3, 2, 4) * 0.02)


def _make(seed: int):
    torch.manual_seed(seed)
    model, prompts = Net(), Prompts()
    opt = torch.optim.Adam(make_param_groups(model, 1e-2, 1e-4), lr=1e-2)
    sched = WarmupMultiStepLR(opt, milestones=(3,), warmup_epochs=2)
    memory = PrototypeMemory(3, 8)
    return model, prompts, opt, sched, memory


def _train_step(model, opt, sched, memory):
    """One step whose randomness draws on torch (data, dropout), numpy and python generators."""
    x = torch.randn(6, 4) + float(np.random.rand()) + random.random()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    model.train()
    feats, logits = model(x)
    if not bool(memory.built):
        memory.build(feats.detach(), y)
    loss = nn.functional.cross_entropy(logits, y) + memory.loss(feats, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    memory.update(feats.detach(), y)
    sched.step()


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_round_trip_resumes_exactly(tmp_path):
    model, prompts, opt, sched, memory = _make(0)
    for _ in range(3):
        _train_step(model, opt, sched, memory)
    path = save_checkpoint(
        tmp_path / "ck.safetensors", model=model, prompts=prompts, optimizer=opt, scheduler=sched,
        memory=memory, epoch=3, step=3, config=CONFIG, extra={"mAP": 0.5},
    )
    saved_lr = [g["lr"] for g in opt.param_groups]
    for _ in range(2):  # continue the original
        _train_step(model, opt, sched, memory)
    after_original = _params(model)

    model2, prompts2, opt2, sched2, memory2 = _make(123)  # different init
    info = load_checkpoint(path, model=model2, prompts=prompts2, optimizer=opt2, scheduler=sched2, memory=memory2)
    assert info["epoch"] == 3 and info["step"] == 3
    assert info["config"] == CONFIG  # tuples come back as tuples
    assert info["extra"] == {"mAP": 0.5}
    assert [g["lr"] for g in opt2.param_groups] == saved_lr
    assert [g["name"] for g in opt2.param_groups] == ["default", "lr_x10"]
    assert torch.equal(prompts2.ctx, prompts.ctx)
    assert sched2.last_epoch == 3
    for _ in range(2):  # continue the restored copy: same data, dropout, memory, lr
        _train_step(model2, opt2, sched2, memory2)
    after_restored = _params(model2)
    assert after_original.keys() == after_restored.keys()
    for k in after_original:
        assert torch.equal(after_original[k], after_restored[k]), k
    assert torch.equal(memory.centroids, memory2.centroids)
    assert sched.state_dict() == sched2.state_dict()


def test_file_is_plain_safetensors_without_pickle(tmp_path):
    model, prompts, opt, sched, memory = _make(0)
    _train_step(model, opt, sched, memory)
    path = save_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=opt, scheduler=sched,
                           memory=memory, epoch=1, config=CONFIG)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__")
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["format"] == "muva-checkpoint"
    # the tensors' byte ranges tile the data section exactly: nothing else is in the file
    spans = sorted(tuple(t["data_offsets"]) for t in header.values())
    assert spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert 8 + n + spans[-1][1] == len(raw)
    names = set(header)
    assert {"model.body.1.running_mean", "model.body.1.num_batches_tracked", "memory.centroids", "rng.torch"} <= names
    assert any(k.startswith("optim.state.") and k.endswith(".exp_avg") for k in names)
    assert header["rng.torch"]["dtype"] == "U8"
    # and the module itself never pickles
    src = Path(ckpt_mod.__file__).read_text()
    for forbidden in ("import pickle", "torch.save(", "torch.load("):
        assert forbidden not in src


def test_atomic_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    model = Net()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model=model, epoch=1, config=CONFIG)
    before = path.read_bytes()

    def exploding_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", exploding_save)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, epoch=2, config=CONFIG)
    assert path.read_bytes() == before
    assert read_checkpoint_info(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]  # no temp file left


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointNotFoundError, match="nope.safetensors"):
        load_checkpoint(missing)
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\xff" * 100)
    with pytest.raises(CheckpointError, match=str(junk)):
        load_checkpoint(junk, model=Net())
    good = save_checkpoint(tmp_path / "good.safetensors", model=Net(), epoch=1, config=CONFIG)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=str(truncated)):
        load_checkpoint(truncated, model=Net())
    # a safetensors file that is not a checkpoint
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a MUVA checkpoint"):
        load_checkpoint(other)


def test_mismatched_keys_are_listed(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", model=Net(3), epoch=1, config=CONFIG)

    class Other(Net):
        def __init__(self):
            super().__init__(5)  # head shape differs
            self.extra = nn.Linear(2, 2)

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, model=Other())
    msg = str(err.value)
    assert str(path) in msg and "extra.weight" in msg and "head.weight" in msg and "missing" in msg
    # non-strict: load what fits, report the rest
    other = Other()
    info = load_checkpoint(path, model=other, strict=False)
    rep = info["report"]["model"]
    assert set(rep["missing"]) == {"extra.weight", "extra.bias"}
    assert rep["shape_mismatch"] and rep["shape_mismatch"][0].startswith("head.weight")
    # asking for a section the file lacks
    with pytest.raises(CheckpointError, match="has no optimizer state"):
        load_checkpoint(path, optimizer=torch.optim.Adam(Net().parameters()))
    assert load_checkpoint(path, optimizer=torch.optim.Adam(Net().parameters()), strict=False)["report"]["skipped"] == [
        "optimizer"
    ]


def test_optimizer_class_mismatch(tmp_path):
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    path = save_checkpoint(tmp_path / "c.safetensors", optimizer=opt, epoch=0, config={})
    with pytest.raises(CheckpointError, match="Adam"):
        load_checkpoint(path, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_wrapped_models_and_shared_tensors(tmp_path):
    model = Net()
    model.tied = nn.Linear(8, 3, bias=False)
    model.tied.weight = model.head.weight  # shared storage: plain safetensors refuses this
    path = save_checkpoint(tmp_path / "c.safetensors", model=nn.DataParallel(model), epoch=1, config=CONFIG)
    keys = set(read_checkpoint_info(path)["sections"])
    assert keys == {"model", "rng"}
    fresh = Net()
    fresh.tied = nn.Linear(8, 3, bias=False)
    fresh.tied.weight = fresh.head.weight
    load_checkpoint(path, model=nn.DataParallel(fresh))  # load into a wrapped model too
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert fresh.tied.weight is fresh.head.weight
    # a DDP-style state dict ("module." on every key) is stored without the prefix
    sd = {f"module.{k}": v for k, v in Net().state_dict().items()}
    p2 = save_checkpoint(tmp_path / "d.safetensors", model=sd, epoch=0, config={})
    load_checkpoint(p2, model=Net())


def test_rng_restored(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    path = save_checkpoint(tmp_path / "c.safetensors", epoch=0, config={})
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    load_checkpoint(path)
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1])
    assert [random.random() for _ in range(3)] == draws[2]
    torch.rand(1)
    load_checkpoint(path, restore_rng=False)
    assert not torch.equal(torch.rand(3), draws[0])


def test_latest_checkpoint_and_manager(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() is None and manager.resume(model=Net()) is None
    model = Net()
    for epoch in range(1, 5):
        with torch.no_grad():
            model.head.weight.fill_(float(epoch))
        manager.save(epoch=epoch, model=model, config=CONFIG)
    assert [p.name for p in manager.checkpoints()] == ["ckpt-epoch-0003.safetensors", "ckpt-epoch-0004.safetensors"]
    assert latest_checkpoint(tmp_path).name == "ckpt-epoch-0004.safetensors"
    fresh = Net()
    info = manager.resume(model=fresh)
    assert info["epoch"] == 4 and bool((fresh.head.weight == 4.0).all())
    # a mid-epoch last.safetensors further on wins; an older one does not
    manager.save_last(epoch=4, step=120, model=model, config=CONFIG)
    assert latest_checkpoint(tmp_path).name == "last.safetensors"
    manager.save_last(epoch=3, step=999, model=model, config=CONFIG)
    assert latest_checkpoint(tmp_path).name == "ckpt-epoch-0004.safetensors"
    # an unreadable candidate is skipped with a warning
    (tmp_path / "ckpt-epoch-0009.safetensors").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="ckpt-epoch-0009"):
        assert latest_checkpoint(tmp_path).name == "ckpt-epoch-0004.safetensors"


# ---- seeding ---------------------------------------------------------------------------------
@pytest.fixture
def restore_torch_flags(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    det = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def test_seed_everything_reproducible(restore_torch_flags):
    def draw():
        return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]

    seed_everything(7)
    first = draw()
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    seed_everything(7, deterministic=False)
    assert draw() == first
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ValueError):
        seed_everything(-1)


def test_rng_state_round_trip_is_json_compatible():
    state = rng_state()
    json.dumps({"python": state["python"], "numpy": state["numpy"]})
    assert state["torch"].dtype == torch.uint8
    a = (torch.rand(2), np.random.rand(2), random.random())
    set_rng_state(state)
    b = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_worker_init_fn_seeds_numpy_per_worker():
    torch.manual_seed(11)
    worker_init_fn(0)
    x = np.random.rand()
    torch.manual_seed(12)
    worker_init_fn(0)
    assert np.random.rand() != x
    g1, g2 = seeded_generator(3), seeded_generator(3)
    assert torch.equal(torch.rand(2, generator=g1), torch.rand(2, generator=g2))
