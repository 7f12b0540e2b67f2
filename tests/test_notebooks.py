"""Every numbered notebook: parameters cell first and made of config keys; each runs under papermill.

Like Microsoft's recommenders repo: the notebooks run with tiny parameters and the values they
record (``<run folder>/metrics/<step>.json``) are read back and checked. They run the way JupyterLab
runs them: the kernel's working directory is ``notebooks/``, and nothing may be written there.
"""
from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

from muva_core.config import RunConfig
from muva_core.notebook import read_record

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _parameters(path: Path) -> dict:
    nb = nbformat.read(str(path), as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", []), \
        f"{path.name}: the first cell must be a code cell tagged 'parameters'"
    values = {}
    for node in ast.parse(first.source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, f"{path.name}: parameters cell holds assignments only"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def test_there_are_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS][:3] == ["01", "02", "03"]


def test_there_are_nine_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, 10)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_are_config_keys_defaulting_to_the_protocol_config(path):
    params = _parameters(path)
    defaults = RunConfig().to_flat()
    unknown = sorted(set(params) - set(defaults))
    assert not unknown, f"{path.name}: parameters that are not config keys: {unknown}"
    assert list(params)[:2] == ["protocol", "run_dir"], f"{path.name}: protocol and run_dir come first"
    # None = "as in configs/<protocol>.yaml": with its defaults a notebook uses `muva run`'s configuration
    assert all(v is None for v in params.values()), f"{path.name}: defaults other than None: {params}"


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}


def _run(path: Path, tmp: Path, params: dict) -> Path:
    """Execute a notebook as JupyterLab does: the kernel's working directory is notebooks/."""
    import papermill as pm

    out = tmp / path.name
    pm.execute_notebook(str(path), str(out), parameters=params, progress_bar=False, cwd=str(ROOT / "notebooks"),
                        kernel_name="python3")
    return out


@pytest.mark.slow
def test_notebooks_01_to_09_from_the_notebooks_folder_share_one_run_folder(tmp_path, small_synth_root):
    """Default parameters plus small-scale overrides only; no run_dir: every notebook finds the run folder
    the earlier ones wrote (reports/<protocol>/run-<config hash>), and nothing is written under notebooks/.
    Each records what it measured (``metrics/<step>.json``), read back and checked here."""
    from muva_core.config import resolve_config
    from muva_core.runs import run_folder

    small = {"synth_root": str(small_synth_root), "synth_scale": "small", "cache_dir": str(tmp_path / "cache"),
             "reports_dir": str(tmp_path / "reports"), "backbone": "tiny", "pretrained": "none",
             "stage1_epochs": 1, "stage1_warmup_epochs": 0, "stage1_batch_ids": 4, "stage2_epochs": 1,
             "warmup_epochs": 0, "lr_milestones": [1], "batch_size": 16, "num_workers": 0, "device": "cpu",
             "num_examples": 2}
    before = _tree(ROOT / "notebooks")
    for path in NOTEBOOKS:
        _run(path, tmp_path, small)
    assert _tree(ROOT / "notebooks") == before, "a notebook wrote under notebooks/"
    folder = run_folder(resolve_config(overrides=small))
    assert folder.parent == tmp_path / "reports" / "synth_A2B" and folder.name.startswith("run-")
    for step in ("01_grounding", "02_calibration", "03_mask_voting", "04_stage1", "05_stage2", "06_evaluate",
                 "07_figures", "08_part_mask_explorer", "09_retrieval_explorer"):
        assert (folder / "metrics" / f"{step}.json").is_file(), step
    # 01-03: grounding, calibration and voting on the source
    g = read_record(folder, "01_grounding")["datasets"]["synth_A"]
    assert g["images"] > 30 and g["seconds_per_image"] >= 0
    cal = read_record(folder, "02_calibration")
    iou = cal["iou"]["synth_A"]
    assert iou["calibrated"]["all"] > iou["raw"]["all"], "calibration must improve the mean IoU with ground truth"
    assert sum(cal["reports"]["synth_A"]["rows"].values()) == 3 * g["images"]
    votes = read_record(folder, "03_mask_voting")
    assert Path(votes["mask_files"]["synth_A"]).is_file()
    stats = votes["statistics"]["synth_A"]
    assert 0 < stats["coverage"]["head"] < stats["coverage"]["legs"]
    for fig in ("01_part_boxes", "02_box_height_hist", "03_mask_voting"):
        assert (folder / "figures" / f"{fig}.png").stat().st_size > 5000
        assert (folder / "figures" / f"{fig}.svg").is_file()
    evaluation = read_record(folder, "06_evaluate")
    assert evaluation["metrics"] == read_record(folder, "05_stage2")["metrics"]
    explorer = read_record(folder, "08_part_mask_explorer")
    assert explorer["source"] == "model" and "pseudo" in " ".join(explorer["iou"]), explorer["iou"]
    # the ranked lists: best >= median >= worst AP, the same queries in 06 and 09, whose mean AP is the mAP
    ranked = evaluation["ranked_lists"]
    assert ranked["best"]["AP"] >= ranked["median"]["AP"] >= ranked["worst"]["AP"]
    retrieval = read_record(folder, "09_retrieval_explorer")
    assert {k: v["query"] for k, v in retrieval["picked"].items()} == {k: v["query"] for k, v in ranked.items()}
    assert abs(retrieval["mAP"] - evaluation["metrics"]["mAP"]) < 1e-6
    assert retrieval["shown"]["query"] == ranked["worst"]["query"] and len(retrieval["shown"]["top"]) == \
        min(10, retrieval["gallery"])
    for fig in ("06_ranked_lists", "09_retrieval_explorer"):
        assert (folder / "figures" / f"{fig}.png").stat().st_size > 20000, fig


@pytest.mark.slow
def test_a_mistyped_parameter_fails_naming_the_closest_key(tmp_path):
    import nbformat
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    nb = nbformat.read(str(ROOT / "notebooks" / "01_grounding.ipynb"), as_version=4)
    nb.cells[0].source += "\nsynth_scael = 'small'"
    typo = tmp_path / "01_typo.ipynb"
    nbformat.write(nb, str(typo))
    with pytest.raises(PapermillExecutionError, match=r"unknown config key 'synth_scael'; did you mean synth_scale"):
        pm.execute_notebook(str(typo), str(tmp_path / "out.ipynb"), progress_bar=False,
                            cwd=str(ROOT / "notebooks"), kernel_name="python3")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_reads_every_parameter_line(path, caplog):
    """papermill infers the parameters from the cell's lines ('Unable to parse line ...' otherwise)."""
    import logging

    import papermill as pm

    with caplog.at_level(logging.WARNING):
        inferred = pm.inspect_notebook(str(path))
    assert not [r for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert list(inferred) == list(_parameters(path))
