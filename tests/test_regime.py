"""Issue 18: the benchmark in the paper's regime, what the training loop needs for it.

The VPM-2 rebuild from the epoch's own training features, the training-identity accuracy and the held-out /
target diagnostics in the history, bfloat16 autocast on CPU, and the shorter text context of stage 1.
"""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from muva_core import precision
from muva_core.config import ConfigError, RunConfig, parse_overrides
from muva_core import runs as runs_module
from muva_core.train.memory import PrototypeMemory
from conftest import tiny_run_config

TIMING = ["seconds", "rebuild_seconds"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# ---- VPM-2 from the epoch's training features ----------------------------------------------------------------

def test_rebuild_from_accumulated_features_is_build_over_the_same_features():
    torch.manual_seed(0)
    C, d = 5, 8
    feats, labels = torch.randn(40, d), torch.arange(40) % C
    labels[labels == 4] = 3                           # identity 4 is never seen in the epoch
    start = F.normalize(torch.randn(C, d), dim=1)
    mem = PrototypeMemory(C, d)
    mem.build(start, torch.arange(C), gather=False)
    for chunk in range(0, 40, 8):
        mem.accumulate(feats[chunk:chunk + 8] * (chunk + 1), labels[chunk:chunk + 8])   # scale does not matter
    mem.rebuild_from_accumulated(gather=False)
    seen = torch.tensor([0, 1, 2, 3])
    ref = PrototypeMemory(4, d).build(feats, labels, gather=False)
    torch.testing.assert_close(mem.centroids[seen], ref.centroids)
    torch.testing.assert_close(mem.centroids[4], start[4])          # kept
    again = mem.centroids.clone()
    mem.rebuild_from_accumulated(gather=False)                     # the sums were cleared: nothing to do
    torch.testing.assert_close(mem.centroids, again)


def test_rebuild_from_accumulated_needs_a_built_memory():
    mem = PrototypeMemory(3, 4)
    mem.accumulate(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="empty"):
        mem.rebuild_from_accumulated(gather=False)


def test_train_pass_run_records_accuracy_and_resumes_to_the_same_model(small_synth_root, cache, tmp_path,
                                                                      monkeypatch):
    short = {"stage1_epochs": 2, "stage2_epochs": 3, "memory_rebuild": "train_pass", "lr_milestones": [3]}
    whole = runs_module.train_protocol(tiny_run_config(small_synth_root, tmp_path / "whole", cache, **short),
                                      progress=False)
    h = whole.history_stage2
    assert h["train_id_acc"].between(0, 1).all()
    # only the first epoch pays for a feature pass over the training set
    assert h["rebuild_seconds"].iloc[0] > 5 * h["rebuild_seconds"].iloc[1:].max()

    original = PrototypeMemory.rebuild_from_accumulated
    calls = {"n": 0}

    def killed_at_the_end_of_epoch_2(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PrototypeMemory, "rebuild_from_accumulated", killed_at_the_end_of_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        runs_module.train_protocol(tiny_run_config(small_synth_root, tmp_path / "resumed", cache, **short),
                                  progress=False)
    assert len(pd.read_csv(tmp_path / "resumed" / "history_stage2.csv")) == 1
    monkeypatch.setattr(PrototypeMemory, "rebuild_from_accumulated", original)
    resumed = runs_module.train_protocol(tiny_run_config(small_synth_root, tmp_path / "resumed", cache, **short),
                                        progress=False)
    assert resumed.metrics == whole.metrics
    pd.testing.assert_frame_equal(resumed.history_stage2.drop(columns=TIMING), h.drop(columns=TIMING))


def test_diagnostics_leave_the_training_alone_and_match_the_final_evaluation(small_synth_root, cache, tmp_path):
    short = {"stage1_epochs": 2, "stage2_epochs": 3, "lr_milestones": [3]}
    plain = runs_module.train_protocol(tiny_run_config(small_synth_root, tmp_path / "plain", cache, **short),
                                      progress=False)
    diag = runs_module.train_protocol(
        tiny_run_config(small_synth_root, tmp_path / "diag", cache, eval_every=2, **short), progress=False)
    h = diag.history_stage2
    # epochs 2 and 3 (every 2nd, and the last) carry the target and the held-out source metrics
    assert h["target_mAP"].notna().tolist() == [False, True, True]
    assert h["heldout_mAP"].notna().tolist() == [False, True, True]
    assert {"target_rank1", "heldout_rank1", "target_mask_iou_head"} <= set(h.columns)
    assert h["target_mAP"].iloc[-1] == pytest.approx(diag.metrics["mAP"])
    # the same training as without them (same losses, same model, same metrics)
    losses = [c for c in plain.history_stage2.columns if c.startswith("loss_") or c == "train_id_acc"]
    pd.testing.assert_frame_equal(h[losses], plain.history_stage2[losses])
    assert diag.metrics == plain.metrics
    # the final record holds the held-out source split too
    from muva_core.notebook import read_record

    rec = read_record(tmp_path / "diag", "train")
    held = rec["heldout_source"]["synth_A"]
    assert held["metrics"]["mAP"] == pytest.approx(h["heldout_mAP"].iloc[-1])
    assert set(held["mask_iou_truth"]) == {"head", "upper", "legs"}
    assert rec["precision"].startswith("float32")


def test_eval_every_is_not_part_of_the_run_identity():
    from muva_core.config import config_hash

    a = RunConfig().update({"protocol": "synth:A2B"})
    b = RunConfig().update({"protocol": "synth:A2B", "eval_every": 3})
    c = RunConfig().update({"protocol": "synth:A2B", "memory_rebuild": "train_pass"})
    assert config_hash(a) == config_hash(b) != config_hash(c)


# ---- precision ---------------------------------------------------------------------------------------------

def test_cpu_precision_follows_cpu_amp_and_the_environment(monkeypatch):
    cfg = RunConfig()
    caps = {"capability": "AVX512", "float16_native": False, "bfloat16_native": True, "float16_autocast": True}
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: caps)
    monkeypatch.delenv(precision.CPU_AMP_ENV, raising=False)
    plan = precision.precision_plan("cpu", cfg)
    assert (plan.autocast, plan.dtype) == (True, torch.bfloat16)
    monkeypatch.setenv(precision.CPU_AMP_ENV, "0")                 # the test suite's setting
    plan = precision.precision_plan("cpu", cfg)
    assert (plan.autocast, plan.note) == (False, "float32 on the CPU (MUVA_CPU_AMP=0)")
    cfg.train.cpu_amp = "always"                                    # an explicit choice wins over it
    assert precision.precision_plan("cpu", cfg).autocast
    monkeypatch.setenv(precision.CPU_AMP_ENV, "yes")
    with pytest.raises(ValueError, match="MUVA_CPU_AMP='yes'"):
        precision.precision_plan("cpu", RunConfig())
    monkeypatch.delenv(precision.CPU_AMP_ENV)
    caps["bfloat16_native"] = False
    plan = precision.precision_plan("cpu", RunConfig())
    assert not plan.autocast and "no native bfloat16" in plan.note


def test_bad_cpu_amp_value_names_the_key():
    with pytest.raises(ConfigError, match="cpu_amp"):
        RunConfig().update({"cpu_amp": "fast"}).validate()


def test_bfloat16_steps_follow_float32(small_synth_root, cache, tmp_path):
    """A few stage-2 steps of the same model under bfloat16 autocast and in float32: the losses agree to the
    precision of bfloat16 (L_imp divides cosines by tau = 0.01, which scales bfloat16's ~0.4 % rounding up to a few
    per cent of the total)."""
    from muva_core.train.stage2 import stage2_losses, build_optimizer
    from muva_core.model.factory import build_muva

    cfg = tiny_run_config(small_synth_root, tmp_path / "run", cache)
    torch.manual_seed(0)
    images = torch.randn(8, 3, cfg.data.height, cfg.data.width)
    pids = torch.arange(8) // 2
    masks = (torch.rand(8, 3, (cfg.data.height // 16) * (cfg.data.width // 16)) > 0.5).float()
    runs = {}
    for name, on in (("float32", False), ("bfloat16", True)):
        torch.manual_seed(1)
        built = build_muva(cfg, 4)
        model = built.model.train()
        model.text_prototypes = torch.nn.functional.normalize(torch.randn(4, model.encoder.feat_dim), dim=1)
        mem = PrototypeMemory(4, model.encoder.feat_dim).build(torch.randn(4, model.encoder.feat_dim),
                                                               torch.arange(4), gather=False)
        opt, _ = build_optimizer(model, cfg)
        losses = []
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
                out, logits = model(images)
            terms = stage2_losses(out, logits, pids, mem, model.text_prototypes, masks, cfg, logit_scale=10.0)
            opt.zero_grad()
            terms["total"].backward()
            opt.step()
            losses.append(terms["total"].item())
        runs[name] = losses
    assert runs["bfloat16"] == pytest.approx(runs["float32"], rel=0.06)   # step by step, after each update


# ---- configuration and text context --------------------------------------------------------------------------

def test_float_keys_accept_exponents_without_a_dot():
    cfg = RunConfig().update(parse_overrides(["stage2_lr=5e-4", "weight_decay=1e-5"]))
    assert cfg.train.stage2_lr == 5e-4 and isinstance(cfg.train.stage2_lr, float)
    with pytest.raises(ConfigError, match="stage2_lr"):
        RunConfig().update(parse_overrides(["stage2_lr=fast"]))


def test_text_encoder_reads_only_up_to_the_last_eot():
    from muva_core.model.backbone import BackboneConfig, build_clip
    from muva_core.model.muva import parts_from_code
    from muva_core.model.prompts import PromptConfig, PromptLearner

    clip, tok = build_clip(BackboneConfig(name="tiny", pretrained=None, seed=0))
    pl = PromptLearner(6, parts_from_code("G+H+U+L"), clip, tok, PromptConfig())
    emb, eot = pl.build_prompts(torch.arange(6), 2)
    te = pl.text_encoder
    x = emb + te.positional_embedding
    x = te.ln_final(te.transformer(x, attn_mask=te.attn_mask))[torch.arange(6), eot] @ te.text_projection
    assert int(eot.max()) + 1 < emb.shape[1]          # the shortcut is taken
    torch.testing.assert_close(te(emb, eot), x, atol=1e-5, rtol=1e-5)


def test_train_throughput_benchmark_runs_and_reports_its_ratios(small_synth_root, cache, capsys):
    """benchmarks/train_throughput.py on the tiny model and the small set: it prints the bare step, the loop, their
    ratio and the rebuild's share, and its exit status is its PASS/FAIL (not asserted: timings on a shared CPU)."""
    import importlib.util

    from muva_core.paths import project_root

    spec = importlib.util.spec_from_file_location("train_throughput",
                                                  project_root() / "benchmarks" / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["-p", f"synth_root={small_synth_root}", "-p", "synth_scale=small", "-p", f"cache_dir={cache}",
                       "-p", "backbone=tiny", "-p", "batch_size=8", "-p", "num_workers=0",
                       "--ids", "6", "--epochs", "2", "--steps", "1", "--bf16-steps", "1"])
    out = capsys.readouterr().out
    assert code in (0, 1)
    for line in ("bare step float32", "bare step bfloat16", "training loop", "loop / bare step", "VPM-2 rebuild share"):
        assert line in out, out
    share = float(out.split("train_pass ")[1].split("%")[0])
    full = float(out.split("full ")[1].split("%")[0])
    assert share < full          # the epoch's own features cost less than a feature pass over the training set
