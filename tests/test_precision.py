"""Mixed precision on CPU and GPU, the GradScaler in checkpoints, overflow-skipped steps, and the reference's
second BN-neck call."""
from __future__ import annotations

import pytest
import torch

from muva_core.config import RunConfig
from muva_core.progress import epoch_line
from muva_core import precision
from muva_core.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from muva_core.precision import CPU_AMP, make_scaler, precision_plan, scaler_step


def _caps(fp16=False, bf16=False, autocast16=True):
    return lambda: {"capability": "TEST", "float16_native": fp16, "bfloat16_native": bf16,
                    "float16_autocast": autocast16}


@pytest.mark.parametrize("caps, cpu_amp, amp_dtype, expect", [
    (_caps(fp16=True, bf16=True), "native", "float16", (True, torch.float16, True)),
    (_caps(bf16=True), "native", "float16", (True, torch.bfloat16, False)),
    (_caps(), "native", "float16", (False, torch.float32, False)),
    (_caps(bf16=True), "native", "bfloat16", (True, torch.bfloat16, False)),
    (_caps(), "always", "float16", (True, torch.float16, True)),
    (_caps(autocast16=False), "always", "float16", (True, torch.bfloat16, False)),
    (_caps(fp16=True, bf16=True), "never", "float16", (False, torch.float32, False)),
])
def test_cpu_precision_follows_cpu_amp_and_what_the_cpu_computes(monkeypatch, caps, cpu_amp, amp_dtype, expect):
    monkeypatch.setattr(precision, "cpu_capabilities", caps)
    monkeypatch.delenv(precision.CPU_AMP_ENV, raising=False)    # the suite's float32 switch (conftest) is off here
    cfg = RunConfig().update({"cpu_amp": cpu_amp, "amp_dtype": amp_dtype})
    plan = precision_plan("cpu", cfg)
    assert (plan.autocast, plan.dtype, plan.scaler) == expect
    assert plan.note                                     # what runs and why, printed once by every run
    if expect == (False, torch.float32, False) and cpu_amp == "native":
        assert "no native float16 arithmetic" in plan.note and "cpu_amp: always" in plan.note
    if caps()["float16_autocast"] is False:
        assert "does not run float16" in plan.note
    scaler = make_scaler("cpu", plan)
    assert (scaler is not None) == expect[2]
    from muva_core.config import CHOICES

    assert set(CHOICES["cpu_amp"]) == set(CPU_AMP)


def test_gpu_precision_is_amp_dtype_with_a_scaler_for_float16():
    plan = precision_plan("cuda", RunConfig().update({"recipe": "reference"}))
    assert (plan.autocast, plan.dtype, plan.scaler) == (True, torch.float16, True)
    plan = precision_plan("cuda", RunConfig())
    assert (plan.autocast, plan.dtype, plan.scaler) == (True, torch.bfloat16, False)
    assert not precision_plan("cuda", RunConfig().update({"amp": False})).autocast


def test_cpu_amp_is_operational_and_does_not_rename_runs():
    from muva_core.config import config_hash

    assert config_hash(RunConfig().update({"cpu_amp": "always"})) == config_hash(RunConfig())
    assert config_hash(RunConfig().update({"masks_file": "x.safetensors"})) != config_hash(RunConfig())


def _overflowing_step(scaler):
    """One float16-style step whose gradient is inf: the scaler skips it and halves its scale."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    loss = (w * torch.tensor([float("inf"), 1.0, 1.0])).sum()
    stepped = scaler_step(loss, opt, scaler)
    return stepped, w


def test_an_overflow_skips_the_step_and_is_counted_in_the_epoch_line(tmp_path):
    scaler = torch.amp.GradScaler("cpu")
    stepped, w = _overflowing_step(scaler)
    assert not stepped and torch.equal(w.detach(), torch.ones(3)) and scaler.get_scale() == 32768.0
    w2 = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w2], lr=0.1)
    assert scaler_step(w2.sum(), opt, scaler) and not torch.equal(w2.detach(), torch.ones(2))

    from muva_core.train.stage1 import scaler_fields

    row = {"epoch": 1, "loss_total": 1.5, "lr": 1e-4, "seconds": 2.0, **scaler_fields(scaler, 1)}
    line = epoch_line("stage 2", 1, 3, row)
    assert "loss scale 32768, 1 step skipped (float16 overflow)" in line
    assert "grad_scale" not in line and "loss 1.500" in line
    assert scaler_fields(None, 0) == {}


def test_the_scaler_state_is_saved_and_restored(tmp_path):
    scaler = torch.amp.GradScaler("cpu", growth_interval=3)
    _overflowing_step(scaler)
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler_step(w.sum(), opt, scaler)                    # growth tracker 1
    path = save_checkpoint(tmp_path / "c.safetensors", model=torch.nn.Linear(2, 2), scaler=scaler, epoch=1, config={})
    fresh = torch.amp.GradScaler("cpu", growth_interval=3)
    assert fresh.get_scale() == 65536.0
    load_checkpoint(path, scaler=fresh, restore_rng=False)
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 32768.0
    plain = save_checkpoint(tmp_path / "p.safetensors", model=torch.nn.Linear(2, 2), epoch=1, config={})
    with pytest.raises(CheckpointError, match="has no scaler state"):
        load_checkpoint(plain, scaler=torch.amp.GradScaler("cpu"))


def test_reference_recipe_calls_the_bn_neck_twice_per_step_as_the_reference_formula_says():
    """coop_trainers.py: ``model(img)`` (BN neck -> classifier) then ``model.bnneck(proj_feat)`` for the memory loss:
    in training mode each call moves the running statistics by momentum m towards the batch statistics."""
    import copy

    from muva_core.model.factory import build_muva
    from muva_core.train.stage2 import second_bn_neck_call

    torch.manual_seed(0)
    for recipe, calls in (("reference", 2), ("workbook", 1)):
        cfg = RunConfig().update({"backbone": "tiny", "pretrained": "none", "recipe": recipe})
        model = build_muva(cfg, num_classes=4).model.train()
        bn = model.encoder.bottleneck
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        r_mean, r_var = bn.running_mean.clone(), bn.running_var.clone()
        images = torch.randn(6, 3, 256, 128)
        out, logits = model(images)
        first = out.bn_features.detach().clone()
        out = second_bn_neck_call(model, out, copy.deepcopy(cfg))
        x = out.features.detach()
        m = bn.momentum
        keep = (1 - m) ** calls                            # the reference formula, applied once per call
        expect_mean = keep * r_mean + (1 - keep) * x.mean(0)
        expect_var = keep * r_var + (1 - keep) * x.var(0, unbiased=True)
        torch.testing.assert_close(bn.running_mean, expect_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, expect_var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == calls
        torch.testing.assert_close(out.bn_features.detach(), first)   # training mode: the same values both calls
        assert out.bn_features.requires_grad
