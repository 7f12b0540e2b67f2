"""`muva sweep`: ablation variants x seeds, read back when finished, one comparison table."""
from __future__ import annotations

import pandas as pd
import pytest

from muva_core.config import RunConfig
from muva_core.report import sweep as sweep_module
from muva_core.report.paper import ABLATIONS
from muva_core.report.sweep import VARIANTS, run_sweep, sweep_dir, variant_slug


def test_every_table_has_variants_matching_the_paper_rows():
    for table, rows in ABLATIONS.items():
        assert list(VARIANTS[table]) == list(rows), table
    for table, variants in VARIANTS.items():
        for overrides in variants.values():
            RunConfig().update(overrides)  # every override is a real config key with a valid type
    assert variant_slug("vision-only, multi-grained") == "vision-only-multi-grained"


def test_unknown_table_or_variant_fails():
    with pytest.raises(ValueError, match="ablation tables"):
        run_sweep(RunConfig(), 4)
    with pytest.raises(ValueError, match="no variant"):
        run_sweep(RunConfig(), 8, variants=["diagonal"])


@pytest.mark.slow
def test_sweep_runs_variants_and_seeds_then_reads_them_back(small_synth_root, tmp_path, monkeypatch):
    cfg = RunConfig().update({
        "protocol": "synth:A2B", "synth_root": str(small_synth_root), "synth_scale": "small", "backbone": "tiny",
        "pretrained": "none", "cache_dir": str(tmp_path / "cache"), "reports_dir": str(tmp_path / "reports"),
        "stage1_epochs": 1, "stage2_epochs": 1, "warmup_epochs": 0, "lr_milestones": [1], "batch_size": 16,
        "num_workers": 0, "device": "cpu",
    })
    summary = run_sweep(cfg, 8, seeds=[0, 1], progress=False)
    assert list(summary.index) == ["stripe-like", "AM-MSA"]
    assert (summary["seeds"] == 2).all()
    assert summary["mAP std"].notna().all()
    assert summary.loc["AM-MSA", "paper MA2MS mAP"] == 27.6
    assert pd.isna(summary.loc["stripe-like", "mask IoU"])  # stripes predict no masks
    assert 0 <= summary.loc["AM-MSA", "mask IoU"] <= 1
    folder = sweep_dir(cfg, 8)
    assert (folder / "table8.md").read_text().startswith("# Table 8 on synth:A2B")
    runs = pd.read_csv(folder / "table8-runs.csv")
    assert len(runs) == 4

    def no_training(*args, **kwargs):
        raise AssertionError("finished runs must be read back, not retrained")

    monkeypatch.setattr("muva_core.train.run.train_protocol", no_training)
    again = sweep_module.run_sweep(cfg, 8, seeds=[0, 1], progress=False)
    pd.testing.assert_frame_equal(again, summary)
