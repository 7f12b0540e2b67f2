"""The demo (issue 13): it starts from the language-pretrained CLIP (made by the checks before a run when missing,
keyed by its settings, refused when they differ), reports the chance level and the colour histograms beside the
model, and copies its Figure 7 to a fixed path. The full-size demo itself is not run here (minutes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from muva_core.config import RunConfig, resolve_config

ROOT = Path(__file__).resolve().parents[1]
SYNTH_CONFIGS = sorted((ROOT / "configs").glob("synth_*.yaml"))


@pytest.fixture(scope="module")
def pretrain_root(tmp_path_factory):
    from muva_core.data import synthetic as syn

    return syn.generate_synthetic(tmp_path_factory.mktemp("pretrain") / "synthetic-pretrain", seed=0, scale="small",
                                  domains=syn.PRETRAIN_DOMAINS, progress=False)


@pytest.fixture
def small_clip(monkeypatch, pretrain_root):
    """``pretrained: pretrain-clip`` pretrains the tiny CLIP on the small pretraining set for 2 epochs (seconds)."""
    import muva_core.pretrain as pretrain

    # one dict (muva_core.pretrain.provision's, re-exported by the package): its items are patched, not the name
    for key, value in {"scale": "small", "epochs": 2, "synth_root": str(pretrain_root), "eval_images": 20}.items():
        monkeypatch.setitem(pretrain.CONFIG_CLIP_OPTIONS, key, value)
    return pretrain


def test_every_synthetic_config_starts_from_the_language_pretrained_clip_and_the_generator_agrees():
    assert len(SYNTH_CONFIGS) == 16
    for path in SYNTH_CONFIGS:
        cfg = RunConfig.from_yaml(path)
        assert cfg.model.pretrained == "pretrain-clip" and not cfg.model.checkpoint_path, path.name
        assert cfg.model.backbone == "small" and cfg.data.synth_scale == "default", path.name
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "tools/make_configs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # the demo's CLIP is the file `muva pretrain-clip --out data/clip --backbone small --seed 0` writes
    from muva_core.pretrain import config_clip_path, config_clip_spec, uses_pretrain_clip

    demo = resolve_config("synth:A2B")
    assert uses_pretrain_clip(demo) and config_clip_path(demo) == ROOT / "data" / "clip" / "clip-small-seed0.safetensors"
    assert config_clip_spec(demo)["seed"] == 0
    # the random-weight start stays one override away (and so does a checkpoint of one's own)
    assert not uses_pretrain_clip(resolve_config("synth:A2B", overrides={"pretrained": "none"}))
    assert not uses_pretrain_clip(resolve_config("synth:A2B", overrides={"checkpoint_path": "x.safetensors"}))


def test_opening_a_run_makes_the_clip_once_reuses_it_and_refuses_other_settings(small_synth_root, tmp_path,
                                                                             small_clip):
    from muva_core.model.factory import build_muva
    from muva_core.pretrain.provision import ensure_pretrained_clip
    from muva_core.runs import open_run

    cfg = RunConfig().update({"protocol": "synth:A2B", "synth_root": str(small_synth_root), "synth_scale": "small",
                              "data_root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"),
                              "backbone": "tiny", "pretrained": "pretrain-clip", "batch_size": 16,
                              "run_dir": str(tmp_path / "run")})
    path = tmp_path / "data" / "clip" / "clip-tiny-seed0.safetensors"
    assert small_clip.config_clip_path(cfg) == path and not path.exists()
    data = open_run(cfg, progress=False, keep_lock=False).data   # made after the checks, before the run claims
    assert path.is_file() and data.num_classes > 0
    info = small_clip.read_pretrain_info(path)
    assert info["settings"]["epochs"] == 2 and info["settings"]["seed"] == 0 and info["backbone"] == "tiny"
    mtime = path.stat().st_mtime_ns
    assert ensure_pretrained_clip(cfg, progress=False) == path and path.stat().st_mtime_ns == mtime   # reused
    # the model starts from it: the run's CLIP weights are the file's
    saved = load_file(str(path))
    built = build_muva(cfg, num_classes=data.num_classes)
    assert torch.equal(built.clip.token_embedding.weight, saved["token_embedding.weight"])
    assert torch.equal(built.clip.visual.conv1.weight, saved["visual.conv1.weight"])
    # another version's settings: refused, naming what differs and the ways out; the file is kept
    small_clip.CONFIG_CLIP_OPTIONS["epochs"] = 3
    with pytest.raises(small_clip.CheckpointExistsError, match=r"epochs: 2 -> 3.*move it away.*pretrained=none"):
        open_run(cfg, progress=False, keep_lock=False)
    assert path.stat().st_mtime_ns == mtime
    # configurations that start from other weights make nothing
    other = RunConfig().update({"data_root": str(tmp_path / "elsewhere"), "backbone": "tiny", "pretrained": "none"})
    assert ensure_pretrained_clip(other, progress=False) is None and not (tmp_path / "elsewhere").exists()


def _fake_run(folder: Path, cfg: RunConfig, with_baselines: bool = True) -> None:
    folder.mkdir(parents=True)
    cfg.to_yaml(folder / "config.yaml")
    rec = {"protocol": cfg.data.protocol, "mask_iou_truth": {"head": 0.45, "upper": 0.71, "legs": 0.66},
           "metrics": {"mAP": 12.34, "Rank-1": 20.0, "Rank-5": 40.0, "Rank-10": 50.0, "mINP": 3.0,
                       "num_valid_queries": 309, "num_skipped_queries": 0}}
    if with_baselines:
        rec["chance_level"] = {"mAP": 1.1, "Rank-1": 0.4, "Rank-5": 2.0, "Rank-10": 4.0, "mINP": 0.6}
        rec["baselines"] = {"hist-global": {"mAP": 2.2, "Rank-1": 3.3}, "hist-3stripes": {"mAP": 2.5, "Rank-1": 3.9}}
    (folder / "metrics").mkdir()
    (folder / "metrics" / "06_evaluate.json").write_text(json.dumps(rec))


def test_metrics_json_and_the_results_table_report_chance_and_colour_histograms_beside_the_model(tmp_path):
    from muva_core.experiments.runner import summarise_run
    from muva_core.report.index import results_table

    cfg = resolve_config("synth:A2B")
    folder = tmp_path / "reports" / "synth_A2B" / "run-x"
    _fake_run(folder, cfg)
    summary = summarise_run(folder, cfg, {"06_evaluate": {"seconds": 2.0}})
    assert summary["chance_level"]["mAP"] == 1.1 and set(summary["baselines"]) == {"hist-global", "hist-3stripes"}
    assert summary["mAP_over_chance"] == round(12.34 / 1.1, 2) and summary["metrics"]["num_valid_queries"] == 309
    assert summary["clip_start"] == "language-pretrained: muva pretrain-clip"
    (folder / "metrics.json").write_text(json.dumps({**summary, "command": "make demo"}))
    random = tmp_path / "reports" / "synth_A2B" / "run-y"
    _fake_run(random, resolve_config("synth:A2B", overrides={"pretrained": "none"}), with_baselines=False)
    (random / "metrics.json").write_text(json.dumps({**summarise_run(random, cfg, {}), "command": "c"}))
    table = results_table(tmp_path / "reports").splitlines()
    assert table[0].startswith("| protocol | model | mAP | Rank-1 |") and "chance mAP / R-1" in table[0]
    assert ("| synth:A2B | small CLIP (language-pretrained: muva pretrain-clip), G+H+U+L, predicted masks | 12.3 | 20.0 "
            "| 40.0 | 3.0 | - | 309 | 1.1 / 0.4 | 2.2 / 3.3 | 0.45 / 0.71 / 0.66 | 2 s | `make demo` |") in table
    assert any(r.startswith("| synth:A2B | small CLIP (random init)") and "| 309 | - | - |" in r for r in table)


def test_the_demo_copies_its_figure_7_and_ranked_lists_to_the_committed_paths(tmp_path, monkeypatch, capsys):
    """`muva demo` (no -p, no --config): after the run, Figure 7 of the run goes to reports/demo-part-masks.png and
    its ranked lists (notebook 06) to reports/demo-ranked-lists.png (the README shows the first; the second once a full demo has made it); a demo with overrides
    leaves those files alone."""
    import muva_core.cli as cli
    from muva_core.runs import run_folder

    monkeypatch.setenv("MUVA_HOME", str(tmp_path))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "synth_A2B.yaml").write_text((ROOT / "configs" / "synth_A2B.yaml").read_text())
    (tmp_path / "pyproject.toml").write_text("")
    ran = []

    def fake_run(args):
        cfg = cli._resolved(args)
        folder = run_folder(cfg)
        _fake_run(folder, cfg)
        from muva_core.experiments.runner import summarise_run

        (folder / "metrics.json").write_text(json.dumps(summarise_run(folder, cfg, {})))
        (folder / "figures").mkdir()
        (folder / "figures" / "07_figure7_predicted_masks.png").write_bytes(f"png of {folder.name}".encode())
        (folder / "figures" / "06_ranked_lists.png").write_bytes(f"ranked lists of {folder.name}".encode())
        ran.append(args.command_line)
        return 0

    monkeypatch.setattr(cli, "cmd_run", fake_run)
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    figure = tmp_path / "reports" / "demo-part-masks.png"
    ranked = tmp_path / "reports" / "demo-ranked-lists.png"
    assert figure.read_bytes() == f"png of {run_folder(resolve_config('synth:A2B')).name}".encode()
    assert ranked.read_bytes() == f"ranked lists of {run_folder(resolve_config('synth:A2B')).name}".encode()
    assert str(ranked) in out and "ranked lists (best, median, worst target query by AP)" in out
    assert "random features mAP 1.1" in out and "colour histograms mAP 2.2" in out and str(figure) in out
    assert ran == ["make demo"]
    assert cli.main(["demo", "-p", "stage2_epochs=2"]) == 0
    assert figure.read_bytes() == f"png of {run_folder(resolve_config('synth:A2B')).name}".encode()
    assert ranked.read_bytes() == f"ranked lists of {run_folder(resolve_config('synth:A2B')).name}".encode()
    assert ran[-1] is None   # the command line as typed goes into that run's metrics.json
