"""`muva run`: the numbered notebooks under papermill into a run folder, with skipping and clear failures."""
from __future__ import annotations

import pytest

from muva_core.config import ConfigError
from muva_core.config import resolve_config
from muva_core.experiments.runner import parse_steps, run_notebooks


def tiny_overrides(synth_root, tmp_path) -> dict:
    return {"synth_root": str(synth_root), "synth_scale": "small", "backbone": "tiny", "pretrained": "none",
            "cache_dir": str(tmp_path / "cache"), "reports_dir": str(tmp_path / "reports"), "stage1_epochs": 2,
            "stage2_epochs": 2, "lr_milestones": [1], "warmup_epochs": 0, "batch_size": 16, "num_workers": 0,
            "device": "cpu"}


def test_parse_steps():
    assert parse_steps("01-03") == ["01_grounding", "02_calibration", "03_mask_voting"]
    assert parse_steps("01,05") == ["01_grounding", "05_stage2_reid"]
    assert parse_steps(None)[-1] == "07_figures"
    with pytest.raises(ValueError, match="--steps"):
        parse_steps("one")


def test_protocol_config_files_are_found_and_unknown_keys_fail(tmp_path):
    cfg = resolve_config("synth:A2B")
    assert cfg.model.backbone == "small"             # from configs/synth_A2B.yaml
    assert resolve_config("MS2MA").model.rmp_heads == 8  # the paper: 8 heads when training on MS
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stage2_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml \[train\]: unknown config key 'stage2_epoch'; did you mean stage2_epochs"):
        resolve_config("synth:A2B", bad)
    with pytest.raises(ValueError, match="synth:A2Q"):
        resolve_config("synth:A2Q")


@pytest.mark.slow
def test_a_failing_notebook_stops_the_run_with_cell_and_error(small_synth_root, tmp_path, capsys):
    overrides = tiny_overrides(small_synth_root, tmp_path)
    cfg = resolve_config("synth:A2B", overrides=overrides)
    folder = run_notebooks(cfg, steps=parse_steps("01"), progress=False)
    [boxes] = (tmp_path / "cache" / "synth_A").glob("boxes-*.parquet")
    boxes.write_bytes(b"not a parquet file")        # the grounding cache is damaged after step 01
    with pytest.raises(RuntimeError, match=r"02_calibration failed in cell \d+: \w+"):
        run_notebooks(cfg, steps=parse_steps("02-03"), run_id=folder.name, progress=False)
    assert (folder / "notebooks" / "01_grounding.ipynb").is_file()   # earlier outputs stay
