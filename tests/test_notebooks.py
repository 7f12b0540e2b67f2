"""Every numbered notebook: parameters cell first and made of config keys; each runs under papermill.

Like Microsoft's recommenders repo: the notebooks run with tiny parameters and the values they
record (``<run_dir>/metrics/<step>.json``) are read back and checked.
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_are_config_keys_with_config_defaults(path):
    params = _parameters(path)
    defaults = RunConfig().to_flat()
    unknown = sorted(set(params) - set(defaults))
    assert not unknown, f"{path.name}: parameters that are not config keys: {unknown}"
    for key, value in params.items():
        assert value == defaults[key], f"{path.name}: {key} = {value!r} differs from the config default {defaults[key]!r}"


def _run(path: Path, tmp: Path, params: dict) -> Path:
    import papermill as pm

    out = tmp / path.name
    pm.execute_notebook(str(path), str(out), parameters=params, progress_bar=False, cwd=str(ROOT), kernel_name="python3")
    return out


@pytest.mark.slow
def test_grounding_notebooks_run_and_record(tmp_path, small_synth_root):
    params = {"synth_root": str(small_synth_root), "synth_scale": "small", "cache_dir": str(tmp_path / "cache"),
              "run_dir": str(tmp_path / "run")}
    for name in ("01_grounding", "02_calibration", "03_mask_voting"):
        _run(ROOT / "notebooks" / f"{name}.ipynb", tmp_path, params)
    run = tmp_path / "run"
    g = read_record(run, "01_grounding")["datasets"]["synth_A"]
    assert g["images"] > 30 and g["seconds_per_image"] >= 0
    cal = read_record(run, "02_calibration")
    iou = cal["iou"]["synth_A"]
    assert iou["calibrated"]["all"] > iou["raw"]["all"], "calibration must improve the mean IoU with ground truth"
    assert sum(cal["reports"]["synth_A"]["rows"].values()) == 3 * g["images"]
    votes = read_record(run, "03_mask_voting")
    assert Path(votes["mask_files"]["synth_A"]).is_file()
    stats = votes["statistics"]["synth_A"]
    assert 0 < stats["coverage"]["head"] < stats["coverage"]["legs"]
    for fig in ("01_part_boxes", "02_box_height_hist", "03_mask_voting"):
        assert (run / "figures" / f"{fig}.png").stat().st_size > 5000
        assert (run / "figures" / f"{fig}.svg").is_file()
