"""Two-stage training on the small synthetic set with the tiny random-weight CLIP."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from muva_core.config import RunConfig
from muva_core import runs as runs_module
from muva_core.train import run as run_module
from muva_core.train import stage2 as stage2_module
from conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]


tiny_cfg = tiny_run_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_full_pipeline_records_metrics_and_histories(small_synth_root, cache, tmp_path):
    result = runs_module.train_protocol(tiny_cfg(small_synth_root, tmp_path / "run", cache), progress=False)
    assert set(result.metrics) >= {"mAP", "Rank-1", "Rank-5", "Rank-10", "mINP"}
    assert 0 <= result.metrics["mAP"] <= 100
    assert set(result.mask_iou_truth) == {"head", "upper", "legs"}
    assert list(result.history_stage1["epoch"]) == [1, 2, 3]
    assert list(result.history_stage2["epoch"]) == [1, 2, 3]
    h2 = result.history_stage2
    assert {"loss_id", "loss_imp", "loss_i2tce", "loss_mask_bce", "loss_mask_dice", "mask_iou_legs"} <= set(h2.columns)
    # the mask loss is what the RMP is trained on: it must go down over three epochs
    assert h2["loss_mask_bce"].iloc[-1] < h2["loss_mask_bce"].iloc[0]
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "metrics" / "train.json").is_file()
    # the saved model reloads and gives the same metrics
    from muva_core.data.protocols import load_protocol

    saved_cfg = RunConfig.from_yaml(result.run_dir / "config.yaml")
    data = load_protocol(saved_cfg, progress=False)
    model = run_module.load_trained(saved_cfg, result.run_dir / "model.safetensors", data.num_classes)
    again, _ = run_module.evaluate_model(saved_cfg, model, data, torch.device("cpu"), progress=False)
    assert again == result.metrics


def test_resumed_run_ends_with_the_same_metrics(small_synth_root, cache, tmp_path, monkeypatch):
    short = {"stage1_epochs": 2, "stage2_epochs": 2}
    whole = runs_module.train_protocol(tiny_cfg(small_synth_root, tmp_path / "whole", cache, **short), progress=False)

    original = stage2_module.rebuild_memory
    calls = {"n": 0}

    def killed_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(stage2_module, "rebuild_memory", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        runs_module.train_protocol(tiny_cfg(small_synth_root, tmp_path / "resumed", cache, **short), progress=False)
    assert len(pd.read_csv(tmp_path / "resumed" / "history_stage2.csv")) == 1
    monkeypatch.setattr(stage2_module, "rebuild_memory", original)
    resumed = runs_module.train_protocol(tiny_cfg(small_synth_root, tmp_path / "resumed", cache, **short),
                                        progress=False)
    assert resumed.metrics == whole.metrics
    timing = ["seconds", "rebuild_seconds"]
    pd.testing.assert_frame_equal(resumed.history_stage2.drop(columns=timing),
                                  whole.history_stage2.drop(columns=timing))


@pytest.mark.parametrize("overrides", [
    {"vision_only": True},
    {"mask_mode": "stripe"},
    {"granularity": "G"},
    {"granularity": "G+L"},
    {"part_agnostic_prompts": True},
    {"domain_specific_prompts": True},
    {"augment": "flip+crop+erase"},
    {"calibrate": False},
    {"rmp_heads": 1, "rmp_layernorm": False, "rmp_residual": False},
    {"protocol": "synth:B+C+D->A", "rmp_heads": 8},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_ablation_switch_trains_one_epoch(small_synth_root, cache, tmp_path, overrides):
    cfg = tiny_cfg(small_synth_root, tmp_path / "run", cache, stage1_epochs=2, stage2_epochs=1, **overrides)
    result = runs_module.train_protocol(cfg, progress=False)
    assert result.metrics["mAP"] > 0
    h2 = result.history_stage2
    assert ("loss_i2tce" in h2) == (not cfg.train.vision_only)
    has_rmp = cfg.model.mask_mode == "predicted" and cfg.model.granularity != "G"
    assert ("loss_mask_bce" in h2) == has_rmp
    assert result.history_stage1.empty == cfg.train.vision_only


def test_missing_masks_fail_fast_with_the_mask_file(small_synth_root, cache, tmp_path, monkeypatch):
    from muva_core.grounding import steps
    from muva_core.grounding.voting import MissingMasksError, MaskStore

    real = steps.load_protocol_masks

    def partial(paths):
        store = real(paths)
        return MaskStore(store.keys[:5], store.masks[:5], store.meta, path=next(iter(paths.values())))

    monkeypatch.setattr(steps, "load_protocol_masks", partial)
    with pytest.raises(MissingMasksError, match="masks-"):
        runs_module.train_protocol(tiny_cfg(small_synth_root, tmp_path / "run", cache), progress=False)


def test_unknown_protocol_fails_fast(small_synth_root, cache, tmp_path):
    with pytest.raises(ValueError, match="synth:A2Z"):
        runs_module.train_protocol(tiny_cfg(small_synth_root, tmp_path / "run", cache, protocol="synth:A2Z"), progress=False)


def test_missing_clip_checkpoint_names_the_path(small_synth_root, cache, tmp_path):
    missing = tmp_path / "nowhere" / "clip.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        runs_module.train_protocol(tiny_cfg(small_synth_root, tmp_path / "run", cache, checkpoint_path=str(missing)),
                                  progress=False)


@pytest.mark.slow
def test_ddp_two_processes_gloo(small_synth_root, cache, tmp_path):
    """torchrun with 2 CPU processes (gloo): stage 2 under DistributedDataParallel, rank 0 evaluates."""
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import sys\n"
        "from muva_core.config import RunConfig\n"
        "from muva_core.runs import train_protocol\n"
        "cfg = RunConfig.from_yaml(sys.argv[1])\n"
        "train_protocol(cfg, progress=False)\n"
    )
    cfg = tiny_cfg(small_synth_root, tmp_path / "run", cache, stage1_epochs=2, stage2_epochs=2)
    cfg_path = tmp_path / "cfg.yaml"
    cfg.to_yaml(cfg_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(cfg_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from muva_core.notebook import read_record

    rec = read_record(tmp_path / "run", "train")
    assert rec["metrics"]["mAP"] > 0
    assert len(pd.read_csv(tmp_path / "run" / "history_stage2.csv")) == 2
