"""The paper's configurations as shipped, on tiny trees of the real layouts with the authors' masks imported.

``test_ms2ma_as_shipped_with_vit_b16``: `muva run --protocol MS2MA` with configs/MS2MA.yaml unchanged but for
data_root, checkpoint_path (a random-weight ViT-B/16 written with open_clip), masks_file (the authors'-format
pickle imported by `muva import-masks`) and one epoch per stage: notebooks 01-07 with ViT-B/16 at 256x128 and
the reference recipe, in the precision this CPU runs natively (muva_core/precision.py); on the GPU with
``MUVA_TEST_DEVICE=cuda`` (tools/gpu_check.sh), float16 autocast + GradScaler as the reference runs it.

``test_float16_loss_scale_survives_a_kill``: the same protocol with the tiny backbone and ``cpu_amp: always``
(float16 autocast + GradScaler('cpu') whatever the CPU): a run killed after its first stage-2 epoch resumes with
the loss scale it had, and ends as the uninterrupted run does.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import paper_trees
from muva_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("MUVA_TEST_DEVICE", "cpu")
"""The device of the as-shipped run: cpu here and in CI; ``cuda`` on a lent GPU (tools/gpu_check.sh)."""


def _trees(tmp_path: Path, ids: int) -> tuple[Path, Path]:
    """data/ with MSMT17_V1 (``ids`` training identities) and Market-1501; the authors' masks imported."""
    data = tmp_path / "data"
    paper_trees.msmt17_v1(data, ids=ids)
    paper_trees.market1501(data)
    names = sorted(p.name for p in (data / "MSMT17_V1" / "train").rglob("*.jpg"))
    pkl = paper_trees.authors_pickle(tmp_path / "blobs" / "msmt17_patch_grounding_mask_calibrated.pkl", names)
    masks = data / "masks" / "msmt17-authors.safetensors"
    assert main(["import-masks", "--authors", str(pkl), "--dataset", "msmt17", "--root", str(data),
                 "--out", str(masks)]) == 0
    return data, masks


def _params(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("-p", f"{k}={v}")]


@pytest.mark.slow
def test_float16_loss_scale_survives_a_kill(tmp_path, capsys):
    from safetensors import safe_open

    from muva_core.train.checkpoint import load_checkpoint, read_checkpoint_info

    data, masks = _trees(tmp_path, ids=8)
    common = {"data_root": data, "masks_file": masks, "backbone": "tiny", "pretrained": "none", "cpu_amp": "always",
              "stage1_epochs": 1, "stage2_epochs": 2, "batch_size": 8, "num_instances": 2, "num_workers": 0,
              "device": "cpu", "cache_dir": tmp_path / "cache", "reports_dir": tmp_path / "reports"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    assert main(["train", "--protocol", "MS2MA", *_params({**common, "run_dir": whole})]) == 0
    out = capsys.readouterr().out
    assert "precision: float16 autocast + GradScaler('cpu') on the CPU (cpu_amp: always)" in out
    reference = pd.read_csv(whole / "history_stage2.csv")
    assert reference["overflow_skipped"].iloc[0] >= 1, "precondition: the first epoch lowers the loss scale"
    assert reference["grad_scale"].iloc[0] < 65536.0
    n = int(reference["overflow_skipped"].iloc[0])
    assert f"loss scale {reference['grad_scale'].iloc[0]:g}, {n} step{'s' if n > 1 else ''} skipped (float16 overflow)" in out

    ckpt = killed / "checkpoints" / "stage2-last.safetensors"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "muva_core.cli", "train", "--protocol", "MS2MA", "--quiet",
                             *_params({**common, "run_dir": killed})], cwd=str(ROOT), stdout=log, stderr=log,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MUVA_LOCK_TIMEOUT": "3"})  # its lock goes stale fast
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and read_checkpoint_info(ckpt)["epoch"] == 1:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{(tmp_path / 'killed.log').read_text()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert len(pd.read_csv(killed / "history_stage2.csv")) == 1
    import torch

    saved = torch.amp.GradScaler("cpu")
    load_checkpoint(ckpt, scaler=saved, restore_rng=False)
    assert saved.get_scale() == reference["grad_scale"].iloc[0] != 65536.0

    # the killed process's lock (issue 22) is stale once its 3 s heartbeat timeout has passed: --wait breaks it
    assert main(["train", "--protocol", "MS2MA", "--wait", *_params({**common, "run_dir": killed})]) == 0
    out = capsys.readouterr().out
    assert "resuming stage 2 from epoch 1" in out
    assert f"loss scale {saved.get_scale():g} restored from stage2-last.safetensors" in out
    resumed = pd.read_csv(killed / "history_stage2.csv")
    assert resumed["grad_scale"].tolist() == reference["grad_scale"].tolist()
    assert resumed["overflow_skipped"].tolist() == reference["overflow_skipped"].tolist()
    pd.testing.assert_series_equal(resumed["loss_total"], reference["loss_total"], rtol=1e-4)

    # recipe: reference calls the BN neck twice a step: 2 epochs x 2 steps (8 identities / 4 a batch) x 2 calls
    with safe_open(str(killed / "model.safetensors"), framework="pt") as f:
        assert int(f.get_tensor("model.encoder.bottleneck.num_batches_tracked")) == 8


@pytest.mark.slow
def test_ms2ma_as_shipped_with_vit_b16(tmp_path, capsys):
    """configs/MS2MA.yaml as shipped (ViT-B/16 at 256x128, batch 64, recipe reference, backend cogvlm) with the
    authors' masks: the grounding steps skip, stages 1 and 2 run one epoch each, notebooks 01-07 run through."""
    import json

    import open_clip
    import torch

    from muva_core.config import resolve_config
    from muva_core.config import config_differences
    from muva_core.runs import run_folder
    from muva_core.precision import precision_plan

    data, masks = _trees(tmp_path, ids=16)
    clip = data / "clip" / "ViT-B-16.pt"
    clip.parent.mkdir(parents=True)
    model = open_clip.create_model("ViT-B-16", pretrained=None)        # random weights, OpenAI's architecture
    torch.save({k: v.half() for k, v in model.state_dict().items()}, clip)
    del model

    from test_reproducing_doc import RUN, as_written

    shipped = {"data_root": data, "checkpoint_path": clip, "masks_file": masks, "stage1_epochs": 1, "stage2_epochs": 1}
    operational = {"reports_dir": tmp_path / "reports", "cache_dir": tmp_path / "cache", "num_workers": 0,
                   "device": DEVICE}
    t0 = time.perf_counter()          # docs/reproducing-the-paper.md's command, one epoch per stage, on the tiny tree
    code = main(as_written(RUN, data, tmp_path / "blobs") + _params({"data_root": data, "stage1_epochs": 1,
                                                                      "stage2_epochs": 1, **operational}))
    seconds = time.perf_counter() - t0
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 0, text[-4000:]
    print(f"as-shipped MS2MA with ViT-B/16 on {DEVICE}: {seconds:.0f} s")

    cfg = resolve_config("MS2MA", overrides={k: str(v) if isinstance(v, Path) else v
                                             for k, v in {**shipped, **operational}.items()})
    # what differs from configs/MS2MA.yaml as shipped (cache_dir: where this test keeps its image-scan cache)
    assert set(config_differences(resolve_config("MS2MA"), cfg)) == {"data_root", "checkpoint_path", "masks_file",
                                                                      "stage1_epochs", "stage2_epochs", "cache_dir"}
    assert cfg.model.backbone == "vit-b-16" and cfg.recipe == "reference" and cfg.data.batch_size == 64
    assert cfg.train.amp_dtype == "float16" and cfg.grounding.backend == "cogvlm"
    plan = precision_plan(DEVICE, cfg)
    assert f"precision: {plan.note}" in text                 # float16 + GradScaler where the CPU has it, else said
    assert "muva doctor: MS2MA" in text and "masks msmt17: 100.0% of the training images; the authors' file" in text
    assert "checkpoint: recognised: a state dict of the vit-b-16 CLIP" in text

    folder = run_folder(cfg)
    summary = json.loads((folder / "metrics.json").read_text())
    assert len(summary["steps"]) == 7 and 0 <= summary["metrics"]["mAP"] <= 100
    for nb in ("01_grounding", "02_calibration", "03_mask_voting"):
        assert "grounding (cogvlm), calibration and voting do not run" in (folder / "notebooks" / f"{nb}.ipynb").read_text()
    assert not any((tmp_path / "cache").glob("msmt17/*"))       # no grounding output
    history = pd.read_csv(folder / "history_stage2.csv")
    assert len(history) == 1 and ("grad_scale" in history) == plan.scaler
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:   # 1 step, the BN neck called twice
        assert int(f.get_tensor("model.encoder.bottleneck.num_batches_tracked")) == 2
