"""Learning-rate schedules at given epochs and the RMP parameter groups."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from muva_core.train.schedulers import WarmupCosineLR, WarmupMultiStepLR, make_param_groups


def _lrs(scheduler, optimizer, epochs):
    """Learning rate of each group during epochs 0..epochs-1 (step after each epoch)."""
    out = []
    for _ in range(epochs):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def _opt(lrs=(1.0,)):
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def test_warmup_multistep_reference_schedule():
    opt = _opt((5e-6, 5e-5))  # base and RMP (10x)
    sched = WarmupMultiStepLR(opt, milestones=(30, 50), gamma=0.1, warmup_factor=0.1, warmup_epochs=10)
    lrs = _lrs(sched, opt, 60)
    expected = {
        0: 0.1,                     # warm-up start
        5: 0.1 * 0.5 + 0.5,         # linear: factor (1 - 5/10) + 5/10 = 0.55
        9: 0.1 * 0.1 + 0.9,         # 0.91
        10: 1.0, 29: 1.0,
        30: 0.1, 49: 0.1,
        50: 0.01, 59: 0.01,
    }
    for epoch, factor in expected.items():
        assert math.isclose(lrs[epoch][0], 5e-6 * factor, rel_tol=1e-9), epoch
        assert math.isclose(lrs[epoch][1], 5e-5 * factor, rel_tol=1e-9), epoch
    assert sched.factor(30) == pytest.approx(0.1)


def test_warmup_multistep_constant_warmup():
    opt = _opt()
    sched = WarmupMultiStepLR(opt, milestones=(3,), warmup_factor=0.01, warmup_epochs=2, warmup_method="constant")
    assert [round(x[0], 12) for x in _lrs(sched, opt, 4)] == [0.01, 0.01, 1.0, 0.1]


def test_warmup_cosine_reference_schedule():
    base = 3.5e-4
    opt = _opt((base,))
    sched = WarmupCosineLR(opt, max_epochs=120, warmup_epochs=5, eta_min=1e-6, warmup_lr_init=1e-5)
    lrs = [x[0] for x in _lrs(sched, opt, 120)]
    assert math.isclose(lrs[0], 1e-5)
    assert math.isclose(lrs[4], 1e-5 + (base - 1e-5) * 4 / 5)
    assert math.isclose(lrs[5], base)
    # half-way through the cosine part (epoch 5 + 57.5 is not an integer: check 62 by formula)
    t = (62 - 5) / 115
    assert math.isclose(lrs[62], 1e-6 + (base - 1e-6) * 0.5 * (1 + math.cos(math.pi * t)))
    assert 1e-6 < lrs[119] < 1.1e-6  # last epoch just above eta_min
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))  # monotone after warm-up


def test_warmup_cosine_from_zero_is_timms_cosine():
    """timm's CosineLRScheduler (warmup_prefix=False, cycle_limit=1), as the reference stage 1 builds it."""
    opt = _opt((3.5e-4,))
    sched = WarmupCosineLR(opt, max_epochs=120, warmup_epochs=5, warmup_lr_init=1e-5, eta_min=1e-6,
                           cosine_from_zero=True)
    for e in (0, 3, 5, 60, 119, 120, 130):
        expected = (1e-5 + e * (3.5e-4 - 1e-5) / 5 if e < 5 else 1e-6 if e >= 120 else
                    1e-6 + 0.5 * (3.5e-4 - 1e-6) * (1 + math.cos(math.pi * e / 120)))
        assert sched.lr_at(3.5e-4, e) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("schedule", ["workbook", "reference"])
def test_step_helpers_run_epoch_n_at_factor_n_minus_1_or_n(schedule):
    from muva_core.train.schedulers import step_after_epoch, step_before_epoch

    opt = _opt((1.0,))
    sched = WarmupMultiStepLR(opt, milestones=(3,), gamma=0.1, warmup_factor=0.1, warmup_epochs=2)
    used = []
    for _ in range(5):
        step_before_epoch(sched, schedule)
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        step_after_epoch(sched, schedule)
        assert sched.last_epoch == len(used)           # epochs finished, either way (checkpoints resume)
    factors = [0.1, 0.55, 1.0, 0.1, 0.1]                # factor(e), e = 0..4
    offset = 1 if schedule == "reference" else 0
    expected = [sched.factor(e + offset) for e in range(5)]
    assert used == pytest.approx(expected) and expected[:4 - offset] == pytest.approx(factors[offset:4])
    with pytest.raises(ValueError, match="lr_schedule"):
        step_after_epoch(sched, "paper")


def test_warmup_cosine_relative_start():
    opt = _opt((2.0,))
    sched = WarmupCosineLR(opt, max_epochs=10, warmup_epochs=2, eta_min=0.0, warmup_factor=0.1, warmup_lr_init=None)
    lrs = [x[0] for x in _lrs(sched, opt, 3)]
    assert lrs == pytest.approx([0.2, 1.1, 2.0])


@pytest.mark.parametrize("cls", [WarmupMultiStepLR, WarmupCosineLR])
def test_state_dict_round_trip_is_json(cls):
    opt = _opt((1.0, 10.0))
    sched = cls(opt)
    _lrs(sched, opt, 7)
    state = json.loads(json.dumps(sched.state_dict()))
    opt2 = _opt((1.0, 10.0))
    sched2 = cls(opt2)
    sched2.load_state_dict(state)
    for g2, g in zip(opt2.param_groups, opt.param_groups):  # the lr lives in the optimiser state
        g2["lr"] = g["lr"]
    assert _lrs(sched2, opt2, 20) == _lrs(sched, opt, 20)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": nn.Linear(4, 4), "rmp": nn.Linear(4, 4)}) for _ in range(2)])
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.conv1.requires_grad_(False)  # frozen patch projection


def test_param_groups_rmp_at_10x_and_frozen_skipped():
    model = _Toy()
    groups = make_param_groups(model, base_lr=5e-6, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"default", "lr_x10"}
    assert by_name["lr_x10"]["lr"] == pytest.approx(5e-5)
    assert by_name["default"]["lr"] == pytest.approx(5e-6)
    rmp_ids = {id(p) for blk in model.blocks for p in blk["rmp"].parameters()}
    assert {id(p) for p in by_name["lr_x10"]["params"]} == rmp_ids
    all_ids = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in all_ids for p in model.conv1.parameters())
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(all_ids) == n_trainable
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    torch.optim.Adam(groups)  # the extra "name" key is accepted


def test_param_groups_weight_decay_options():
    model = _Toy()
    groups = make_param_groups(
        model, 1.0, 1e-4, weight_decay_patterns={"rmp": 0.0}, no_decay_bias_norm=True
    )
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"default", "no_decay", "lr_x10_no_decay"}
    no_decay = {id(p) for p in by_name["no_decay"]["params"]}
    for mod in (model.norm, model.bn):
        assert {id(p) for p in mod.parameters()} <= no_decay
    assert id(model.blocks[0]["attn"].bias) in no_decay
    assert id(model.blocks[0]["attn"].weight) in {id(p) for p in by_name["default"]["params"]}
    assert by_name["lr_x10_no_decay"]["weight_decay"] == 0.0


def test_param_groups_wrapped_and_errors():
    model = _Toy()
    groups = make_param_groups(nn.DataParallel(model), 1.0, 0.0)
    assert {g["name"] for g in groups} == {"default", "lr_x10"}
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        make_param_groups(model, 1.0, 0.0)
