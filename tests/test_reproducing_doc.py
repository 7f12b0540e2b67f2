"""Every command of docs/reproducing-the-paper.md, run as written with its paths moved to the test's folders.

``DOC_COMMANDS`` names the test that runs each command of the page's shell blocks; a command added to the page
without a test here fails :func:`test_every_doc_command_is_run_by_a_test`. :func:`as_written` turns a command into
CLI arguments with ``data/...`` and ``blobs/...`` under the test's folders and nothing else changed.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

import paper_trees
from muva_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reproducing-the-paper.md"

IMPORT_ONE = ("muva import-masks --authors blobs/msmt17_patch_grounding_mask_calibrated.pkl --dataset msmt17 --root data "
              "--out data/masks/msmt17-authors.safetensors")
IMPORT_MULTI = ("muva import-masks --authors blobs/ma+d+ms+c3.pkl --dataset market1501 --dataset dukemtmcreid "
                "--dataset msmt17 --dataset cuhk03_np --root data --out data/masks/multi-authors.safetensors")
DOCTOR = ("muva doctor --protocol MS2MA --data-root data -p checkpoint_path=data/clip/ViT-B-16.pt "
          "-p masks_file=data/masks/msmt17-authors.safetensors")
RUN = "muva run --protocol MS2MA -p checkpoint_path=data/clip/ViT-B-16.pt -p masks_file=data/masks/msmt17-authors.safetensors"

DOC_COMMANDS = {
    IMPORT_ONE: "test_import_masks_commands",
    IMPORT_MULTI: "test_import_masks_commands",
    DOCTOR: "test_doctor_command",
    RUN: "tests/test_paper_configs.py::test_ms2ma_as_shipped_with_vit_b16",
}


def doc_commands() -> list[str]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S):
        out += [line.split(" #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
    return out


def as_written(command: str, data: Path, blobs: Path) -> list[str]:
    """The command's arguments after ``muva``, with ``data`` / ``data/...`` / ``blobs/...`` under the given folders."""
    args = shlex.split(command)
    assert args[0] == "muva"
    out = []
    for arg in args[1:]:
        if arg == "data":
            arg = str(data)
        arg = re.sub(r"(^|=)data/", lambda m: f"{m.group(1)}{data}/", arg)
        arg = re.sub(r"(^|=)blobs/", lambda m: f"{m.group(1)}{blobs}/", arg)
        out.append(arg)
    return out


def test_every_doc_command_is_run_by_a_test():
    commands = doc_commands()
    assert commands, "no shell block in the page"
    missing = [c for c in commands if c not in DOC_COMMANDS]
    assert not missing, f"commands of {DOC.name} that no test runs (add them to DOC_COMMANDS): {missing}"
    for command, where in DOC_COMMANDS.items():
        assert command in commands, f"DOC_COMMANDS lists a command the page no longer has: {command}"
        file, _, name = where.rpartition("::")
        source = (ROOT / file).read_text() if file else Path(__file__).read_text()
        assert f"def {name}(" in source, where
    readme = (ROOT / "README.md").read_text()
    assert "(docs/reproducing-the-paper.md)" in readme


def test_import_masks_commands(tmp_path, data_root, market_root, duke_root, msmt_v1_root, cuhk03_root, capsys):
    blobs = tmp_path / "blobs"
    msmt = sorted(p.name for p in (msmt_v1_root / "train").rglob("*.jpg"))
    paper_trees.authors_pickle(blobs / "msmt17_patch_grounding_mask_calibrated.pkl", msmt)
    assert main(as_written(IMPORT_ONE, data_root, blobs)) == 0
    out = capsys.readouterr().out
    assert "msmt17 train: 5 of 5 images have a mask" in out
    assert (data_root / "masks" / "msmt17-authors.safetensors").is_file()

    every = [p.name for folder in (market_root / "bounding_box_train", duke_root / "bounding_box_train",
                                   cuhk03_root / "detected" / "bounding_box_train") for p in folder.iterdir()]
    paper_trees.authors_pickle(blobs / "ma+d+ms+c3.pkl", every + msmt)
    assert main(as_written(IMPORT_MULTI, data_root, blobs)) == 0
    out = capsys.readouterr().out
    for name, n in (("market1501", 7), ("dukemtmcreid", 4), ("msmt17", 5), ("cuhk03_np", 4)):
        assert f"{name} train: {n} of {n} images have a mask" in out, out
    from muva_core.grounding.voting import load_masks

    store = load_masks(data_root / "masks" / "multi-authors.safetensors")
    assert {k.split("/")[0] for k in store.keys} == {"market1501", "dukemtmcreid", "msmt17", "cuhk03_np"}


@pytest.mark.slow
def test_doctor_command(tmp_path, capsys):
    import open_clip
    import torch

    data = tmp_path / "data"
    paper_trees.msmt17_v1(data)
    paper_trees.market1501(data)
    blobs = tmp_path / "blobs"
    names = sorted(p.name for p in (data / "MSMT17_V1" / "train").rglob("*.jpg"))
    paper_trees.authors_pickle(blobs / "msmt17_patch_grounding_mask_calibrated.pkl", names)
    assert main(as_written(IMPORT_ONE, data, blobs)) == 0
    clip = data / "clip" / "ViT-B-16.pt"
    clip.parent.mkdir(parents=True)
    torch.save({k: v.half() for k, v in open_clip.create_model("ViT-B-16", pretrained=None).state_dict().items()}, clip)
    capsys.readouterr()
    # the measured estimate times ViT-B/16 at batch 64 (minutes a step on a CPU): tests/test_doctor.py times it
    # with the tiny backbone; here the rest of the report
    assert main(as_written(DOCTOR, data, blobs) + ["--no-estimate"]) == 0
    out = capsys.readouterr().out
    assert "msmt17 (source) V1" in out and "market1501 (target)" in out
    assert "masks msmt17: 100.0% of the training images; the authors' file" in out
    assert "checkpoint: recognised: a state dict of the vit-b-16 CLIP" in out
    assert "config vs the paper (section 4.2): recipe reference; differs: local_pos_embed separate (paper cls)" in out
    assert main(as_written(DOCTOR, data, blobs) + ["--no-estimate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["datasets"]["msmt17"]["version"] == "V1" and report["checkpoint"]["status"] == "recognised"
