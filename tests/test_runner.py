"""`muva run`: the numbered notebooks under papermill into a run folder, with skipping and clear failures."""
from __future__ import annotations

import json

import pytest

from muva_core.cli import main
from muva_core.config import ConfigError
from muva_core.config import resolve_config
from muva_core.experiments.runner import parse_steps, run_notebooks


def tiny_overrides(synth_root, tmp_path) -> dict:
    return {"synth_root": str(synth_root), "synth_scale": "small", "backbone": "tiny", "pretrained": "none",
            "cache_dir": str(tmp_path / "cache"), "reports_dir": str(tmp_path / "reports"), "stage1_epochs": 2,
            "stage2_epochs": 2, "lr_milestones": [1], "warmup_epochs": 0, "batch_size": 16, "num_workers": 0,
            "device": "cpu", "rmp_layernorm": False}


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
def test_run_executes_every_notebook_then_skips_unchanged_steps(small_synth_root, tmp_path, capsys):
    cfg = resolve_config("synth:A2B", overrides=tiny_overrides(small_synth_root, tmp_path))
    folder = run_notebooks(cfg, progress=False)
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["metrics"]["mAP"] > 0 and set(summary["steps"]) == set(parse_steps(None))
    assert set(summary["mask_iou_truth"]) == {"head", "upper", "legs"}
    for nb in parse_steps(None):
        assert (folder / "notebooks" / f"{nb}.ipynb").is_file()
    assert (folder / "figures" / "05_stage2_losses.png").is_file()
    # a key that no parameters cell declares still reaches the kernel (stage 2 builds the RMP from it)
    assert "rmp_layernorm = False" in (folder / "notebooks" / "05_stage2_reid.ipynb").read_text()
    figures = json.loads((folder / "metrics" / "07_figures.json").read_text())
    assert {"07_figure5_box_heights.png", "07_figure7_predicted_masks.png"} <= set(figures["figures"])
    assert set(figures["cost"]) == {"MUVA", "MUVA (w/o AM-MSA)"}
    assert figures["cost"]["MUVA"]["params_infer_M"] > figures["cost"]["MUVA (w/o AM-MSA)"]["params_infer_M"]
    from muva_core.report.index import results_table, update_readme_results

    table = results_table(tmp_path / "reports")
    rr = summary["metrics_reranked"]   # notebook 06's k-reciprocal re-ranked metrics beside the paper's protocol
    assert rr["num_valid_queries"] == summary["metrics"]["num_valid_queries"]
    assert f"| {rr['mAP']:.1f} / {rr['Rank-1']:.1f} |" in table
    assert f"| synth:A2B | tiny CLIP (random init), G+H+U+L, predicted masks | {summary['metrics']['mAP']:.1f} |" in table
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nrest\n")
    assert update_readme_results(readme, tmp_path / "reports")
    assert table in readme.read_text() and readme.read_text().endswith("rest\n")
    index = (tmp_path / "reports" / "README.md").read_text()
    assert f"{summary['metrics']['mAP']:.1f}" in index and folder.name in index
    # same configuration again: every step skipped, through the CLI
    args = ["run", "--protocol", "synth:A2B"] + [a for k, v in tiny_overrides(small_synth_root, tmp_path).items()
                                                 for a in ("-p", f"{k}={json.dumps(v) if isinstance(v, list) else v}")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == len(parse_steps(None))


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
