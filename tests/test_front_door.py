"""The user's own paths (issue 10): paths from any working directory, keyed run folders and safe resumes,
progress, checks before work, the commands as a user types them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from muva_core.cli import main
from muva_core.config import ConfigError, RunConfig, resolve_config
from muva_core.runs import RunFolderError, claim_run_folder, run_folder
from muva_core.config import config_hash
from muva_core.paths import portable, project_root, resolve
from conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]


def _cli_params(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += ["-p", f"{k}={json.dumps(v) if isinstance(v, list) else v}"]
    return out


def tiny_values(synth_root: Path, tmp_path: Path, **extra) -> dict:
    """Small-scale overrides of configs/synth_A2B.yaml (run folder keyed by the config, under tmp_path)."""
    values = {"synth_root": str(synth_root), "synth_scale": "small", "cache_dir": str(tmp_path / "cache"),
              "reports_dir": str(tmp_path / "reports"), "backbone": "tiny", "pretrained": "none",
              "stage1_epochs": 2, "stage1_warmup_epochs": 0, "stage1_batch_ids": 4, "stage2_epochs": 2,
              "warmup_epochs": 0, "lr_milestones": [1], "batch_size": 16, "num_workers": 0, "device": "cpu"}
    values.update(extra)
    return values


# ---- 1. paths: the project root, wherever the process runs ----------------------------------------
def test_relative_config_paths_resolve_against_the_project_root_from_any_working_directory(tmp_path, monkeypatch):
    cfg = resolve_config("synth:A2B")
    expected = run_folder(cfg)
    for cwd in (ROOT, ROOT / "notebooks", ROOT / "muva_core" / "train"):
        monkeypatch.chdir(cwd)
        assert project_root() == ROOT
        assert resolve(cfg.data.synth_root) == ROOT / "data" / "synthetic"
        assert resolve(cfg.grounding.cache_dir) == ROOT / "data" / "cache"
        assert run_folder(resolve_config("synth:A2B")) == expected
    assert expected.parent == ROOT / "reports" / "synth_A2B" and expected.name == f"run-{config_hash(cfg)}"
    # an explicit MUVA_HOME wins; a missing one is an error naming it
    monkeypatch.setenv("MUVA_HOME", str(tmp_path))
    assert resolve("data") == tmp_path / "data"
    monkeypatch.setenv("MUVA_HOME", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="MUVA_HOME"):
        project_root()


def test_portable_paths_and_the_config_hash_do_not_depend_on_how_a_path_is_spelled():
    a = resolve_config("synth:A2B")
    b = resolve_config("synth:A2B", overrides={"synth_root": str(ROOT / "data" / "synthetic"),
                                                 "cache_dir": "./data/cache/", "num_workers": 0, "device": "cpu"})
    assert config_hash(a) == config_hash(b)              # same data, workers and device do not change training
    assert portable(ROOT / "data" / "x") == "data/x" and portable("/elsewhere/x") == "/elsewhere/x"
    assert config_hash(resolve_config("synth:A2B", overrides={"stage2_epochs": 3})) != config_hash(a)


# ---- 3. run folders keyed by configuration; changed-settings resumes refused ---------------------------
def test_reusing_a_run_folder_with_other_settings_is_refused_before_it_is_touched(tmp_path):
    folder = tmp_path / "run"
    cfg = RunConfig().update({"run_dir": str(folder)})
    claim_run_folder(cfg, folder)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "stage2-last.safetensors").write_bytes(b"x")
    saved = (folder / "config.yaml").read_text()
    other = RunConfig().update({"run_dir": str(folder), "stage2_epochs": 3, "stage2_lr": 0.01})
    with pytest.raises(RunFolderError) as err:
        claim_run_folder(other, folder)
    message = str(err.value)
    assert "stage2_epochs: 60 in the folder, 3 now" in message and "stage2_lr" in message
    assert "-p run_dir=" in message and "-p resume=false" in message
    assert (folder / "config.yaml").read_text() == saved           # nothing rewritten
    # operational and evaluation keys do not count
    claim_run_folder(RunConfig().update({"run_dir": str(folder), "num_workers": 0, "metric": "cosine"}), folder)
    # resume=false starts the folder afresh under the new settings
    other.train.resume = False
    claim_run_folder(other, folder)
    assert not (folder / "checkpoints").exists()
    assert RunConfig.from_yaml(folder / "config.yaml").train.stage2_epochs == 3


@pytest.mark.slow
def test_muva_train_keys_folders_by_config_refuses_changed_resumes_and_says_where_it_resumes(
        small_synth_root, tmp_path, capsys):
    values = tiny_values(small_synth_root, tmp_path)
    assert main(["train", "--protocol", "synth:A2B", *_cli_params(values)]) == 0
    first = capsys.readouterr().out
    folder = run_folder(resolve_config("synth:A2B", overrides=values))
    assert f"run folder: {folder}" in first and (folder / "model.safetensors").is_file()
    metrics = json.loads((folder / "metrics" / "train.json").read_text())["metrics"]

    # the same command again resumes: nothing is trained, the metrics are the same
    assert main(["train", "--protocol", "synth:A2B", *_cli_params(values)]) == 0
    again = capsys.readouterr().out
    assert "stage 1 finished earlier" in again and "stage 2 finished earlier (2 epochs)" in again
    assert json.loads((folder / "metrics" / "train.json").read_text())["metrics"] == metrics

    # other settings without run_dir: another folder
    changed = {**values, "stage2_epochs": 3}
    assert run_folder(resolve_config("synth:A2B", overrides=changed)) != folder
    # other settings into the same folder: refused, naming the keys; the folder's config is unchanged
    saved = (folder / "config.yaml").read_text()
    code = main(["train", "--protocol", "synth:A2B", *_cli_params({**changed, "stage2_lr": 0.01,
                                                                      "run_dir": str(folder)})])
    err = capsys.readouterr().err
    assert code == 2 and "stage2_epochs: 2 in the folder, 3 now" in err and "stage2_lr" in err
    assert (folder / "config.yaml").read_text() == saved
    # a longer stage 2 in the same folder, afresh: it trains again
    code = main(["train", "--protocol", "synth:A2B", *_cli_params({**changed, "run_dir": str(folder),
                                                                      "resume": False})])
    assert code == 0
    assert len((folder / "history_stage2.csv").read_text().strip().splitlines()) == 1 + 3


@pytest.mark.slow
def test_an_interrupted_training_resumes_and_says_from_which_epoch(small_synth_root, tmp_path, monkeypatch, capsys):
    from muva_core import runs as runs_module
    from muva_core.train import stage2 as stage2_module

    cfg = tiny_run_config(small_synth_root, tmp_path / "run", tmp_path / "cache", stage1_epochs=1,
                          stage2_epochs=2)
    original, calls = stage2_module.rebuild_memory, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(stage2_module, "rebuild_memory", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runs_module.train_protocol(cfg, progress=True)
    monkeypatch.setattr(stage2_module, "rebuild_memory", original)
    capsys.readouterr()
    runs_module.train_protocol(tiny_run_config(small_synth_root, tmp_path / "run", tmp_path / "cache",
                                              stage1_epochs=1, stage2_epochs=2), progress=True)
    out = capsys.readouterr().out
    assert "resuming stage 2 from epoch 1" in out and "stage 2 epoch 2/2" in out


# ---- 5. bad values fail at once, naming the key --------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["-p", "stage2_epochs=-1"], "key 'stage2_epochs' must be >= 1, got -1"),
    (["-p", "mask_threshold=2"], "key 'mask_threshold' must be in (0.0, 1.0), got 2.0"),
    (["-p", "backbone=vit-b16"], "key 'backbone' must be one of vit-b-16, small, mini, tiny, got 'vit-b16'; did you mean 'vit-b-16'?"),
    (["-p", "stage2_epoch=3"], "unknown config key 'stage2_epoch'; did you mean stage2_epochs"),
    (["-p", "batch_size=30"], "batch_size (30) must be a multiple of num_instances (4)"),
    (["--steps", "99"], "--steps 99: no notebook matches"),
])
def test_bad_values_fail_before_any_work_naming_the_key(tmp_path, capsys, args, expected):
    code = main(["run", "--protocol", "synth:A2B", "-p", f"reports_dir={tmp_path / 'reports'}", *args])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("text, expected", [
    ("", "the config file is empty"),
    ("train:\n  stage2_epochs: 3\n", "the config names no protocol"),
])
def test_empty_and_protocol_less_configs_are_errors(tmp_path, capsys, text, expected):
    path = tmp_path / "my.yaml"
    path.write_text(text)
    assert main(["run", "--config", str(path), "-p", f"reports_dir={tmp_path / 'reports'}"]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err
    assert not (tmp_path / "reports").exists()


def test_an_impossible_batch_plan_is_refused_before_grounding(small_synth_root, tmp_path, capsys):
    values = {"synth_root": str(small_synth_root), "synth_scale": "small", "cache_dir": str(tmp_path / "cache"),
              "reports_dir": str(tmp_path / "reports")}      # configs/synth_A2B.yaml's batch of 8 x 4 on the small set
    assert main(["run", "--protocol", "synth:A2B", *_cli_params(values)]) == 2
    err = capsys.readouterr().err
    assert "batch_size=32 with num_instances=4" in err and "identities" in err and "lower batch_size" in err
    assert not list((tmp_path / "cache").glob("*/boxes-*")), "grounding ran before the check"
    assert not (tmp_path / "reports").exists()


def test_a_protocol_whose_datasets_are_missing_fails_before_any_kernel_naming_every_path(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    code = main(["run", "--protocol", "MS2MA", "-p", f"data_root={data}", "-p", f"reports_dir={tmp_path / 'reports'}"])
    err = capsys.readouterr().err
    assert code == 2
    for expected in ("msmt17: not found", "market1501: not found", str(data / "MSMT17_V1"),
                     str(data / "Market-1501-v15.09.15"), "bounding_box_train", "list_train.txt", "-p data_root="):
        assert expected in err, expected
    assert not (tmp_path / "reports").exists(), "a run folder was left behind"


def test_checkpoint_path_that_does_not_exist_is_named(tmp_path, capsys):
    code = main(["run", "--protocol", "synth:A2B", "-p", "checkpoint_path=data/clip/nope.safetensors",
                 "-p", f"reports_dir={tmp_path / 'reports'}", "-p", "synth_scale=small",
                 "-p", f"synth_root={tmp_path / 'synth'}"])
    assert code == 2 and "checkpoint_path=data/clip/nope.safetensors: no such file" in capsys.readouterr().err


# ---- 2 + 8. reopening a run from anywhere: eval, export-onnx, the explorer ------------------------------
@pytest.fixture(scope="module")
def trained_tiny(small_synth_root, tmp_path_factory):
    from muva_core.runs import train_protocol

    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_run_config(small_synth_root, tmp / "run", tmp / "cache", stage1_epochs=1, stage1_warmup_epochs=0,
                          stage2_epochs=1, warmup_epochs=0)
    return train_protocol(cfg, progress=False).run_dir


def test_export_onnx_command_on_a_trained_run(trained_tiny, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from muva_core.export import read_onnx_metadata

    out = tmp_path / "muva.onnx"
    assert main(["export-onnx", "--run", str(trained_tiny), "--out", str(out)]) == 0
    assert "ONNX Runtime vs PyTorch max abs difference" in capsys.readouterr().out
    meta = read_onnx_metadata(out)
    assert meta["backbone_name"] == "tiny" and meta["protocol"] == "synth:A2B" and "width" in meta["backbone"]


def test_eval_command_on_a_run_folder_from_another_working_directory(trained_tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--run", str(trained_tiny), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recorded = json.loads((trained_tiny / "metrics" / "train.json").read_text())
    assert result["metrics"] == recorded["metrics"]


def test_eval_with_k_reciprocal_re_ranking(trained_tiny, capsys):
    assert main(["eval", "--run", str(trained_tiny), "--rerank", "k-reciprocal", "--json", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "k-reciprocal re-ranking: k1=20, k2=6, lambda=0.3" in out
    reranked = json.loads(out.strip().splitlines()[-1])["metrics"]
    plain = json.loads((trained_tiny / "metrics" / "train.json").read_text())["metrics"]
    assert reranked["num_valid_queries"] == plain["num_valid_queries"] and reranked != plain


def test_a_missing_run_folder_is_named_as_such(tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    from muva_core.notebook import part_mask_explorer

    with pytest.raises(FileNotFoundError, match="run_dir=reports/synth_A2B/run-typo: run folder not found"):
        part_mask_explorer(resolve_config("synth:A2B", overrides={"run_dir": "reports/synth_A2B/run-typo"}))


def test_the_explorer_reopens_a_run_with_relative_cache_paths_from_the_notebooks_folder(
        trained_tiny, tmp_path, monkeypatch):
    """The run's config.yaml holds paths relative to the project root; the kernel of notebook 08 runs in
    notebooks/: the pseudo-label panel must still be found."""
    from muva_core.notebook import config_from_namespace, part_mask_explorer

    monkeypatch.chdir(ROOT / "notebooks")
    cfg = config_from_namespace({"run_dir": str(trained_tiny), "device": "cpu"})
    assert cfg.data.synth_scale == "small"            # the run folder's own configuration
    explorer = part_mask_explorer(cfg)
    view = explorer.view(explorer.default_state())
    assert explorer.has_model and view.pseudo is not None
    assert any("pseudo" in c for c in view.iou.columns)


# ---- the notebook helpers ------------------------------------------------------------------------------
def test_notebook_parameters_come_from_the_parameters_cells_not_from_later_variables():
    from muva_core.notebook import config_from_namespace

    history = ["", 'protocol = None\nrun_dir = None\nstage2_epochs = None\ndevice = None',
               '# Parameters\nstage2_epochs = 3\n', "import torch\ndevice = torch.device('cpu')", "cfg = ..."]
    cfg = config_from_namespace({"In": history, "device": object(), "stage2_epochs": 3})
    assert cfg.train.stage2_epochs == 3 and cfg.model.backbone == "small"   # configs/synth_A2B.yaml + the parameter
    with pytest.raises(ConfigError, match="unknown config key 'stage2_epoch'; did you mean stage2_epochs"):
        config_from_namespace({"In": ["", "stage2_epoch = 3", "cfg = ..."]})


def test_record_shows_a_short_line_as_a_cells_last_value(tmp_path):
    from muva_core.notebook import record

    rec = record(RunConfig().update({"run_dir": str(tmp_path)}), "x", {"a": 1})
    assert repr(rec).startswith("recorded: ") and Path(rec).is_file()


# ---- 10. the README says how to open the workbook and what `muva run` runs ----------------------------
def test_readme_lists_every_notebook_make_lab_and_the_steps_of_muva_run():
    from muva_core.experiments.runner import PIPELINE

    readme = (ROOT / "README.md").read_text()
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"`{nb.stem}`" in readme, f"README's notebook table misses {nb.stem}"
    assert "make lab" in readme
    assert f"`muva run` executes {PIPELINE[0][:2]}-{PIPELINE[-1][:2]}" in readme


def test_make_lab_serves_the_project_root_and_opens_notebooks():
    from muva_core.cli import lab_command

    makefile = (ROOT / "Makefile").read_text()
    assert "\nlab: install\n\t$(BIN)/muva lab\n" in makefile
    cmd = lab_command(8899)
    assert f"--ServerApp.root_dir={ROOT}" in cmd and "--LabApp.default_url=/lab/tree/notebooks" in cmd
    assert cmd[0] == os.fspath(Path(__import__("sys").executable)) and "--port=8899" in cmd


# ---- 7. bad data is reported whole ----------------------------------------------------------------------
def test_eval_reports_every_unreadable_target_image_in_one_message(trained_tiny, small_synth_root, tmp_path, capsys):
    import shutil

    copy = tmp_path / "synth"
    shutil.copytree(small_synth_root, copy)
    query = sorted((copy / "synth_B" / "query").glob("*.jpg"))
    query[0].write_bytes(b"not a jpeg")
    query[1].write_bytes(query[1].read_bytes()[:200])             # truncated
    code = main(["eval", "--run", str(trained_tiny), "-p", f"synth_root={copy}", "-p", f"cache_dir={tmp_path / 'c'}",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert query[0].name in err and query[1].name in err and "2 of" in err


def test_mask_placement_tool_on_a_trained_run(trained_tiny, capsys):
    """`python tools/mask_placement.py RUN` (reports/evidence-regime-notes.md): on every image its IoU at the
    0.5 threshold is the one the run recorded; the placement table has a row per part, for target and held-out."""
    import runpy

    tool = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "mask_placement.py"))
    assert tool["main"]([str(trained_tiny), "--images", "100000", "--thresholds", "0.5"]) == 0
    out = capsys.readouterr().out
    recorded = json.loads((trained_tiny / "metrics" / "train.json").read_text())["mask_iou_truth"]
    target = out.split("(held-out)")[0]
    assert "## synth_B (target)" in target and "## synth_A (held-out)" in out
    assert "0.5: " + " / ".join(f"{recorded[p]:.3f}" for p in ("head", "upper", "legs")) in target
    assert target.count("top-k precision") == 1 and all(f"| {p} " in target for p in ("head", "upper", "legs"))
    with pytest.raises(SystemExit):
        tool["main"]([str(trained_tiny), "--images", "0"])
    assert "--images must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool["main"]([str(trained_tiny.parent / "run-none")])
    assert "run folder not found" in capsys.readouterr().err
