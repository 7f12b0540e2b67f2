"""docs/own-images.md, run as a user does: every command of the page in a workbook folder made like a clone's
(``$MUVA_HOME``, the working directory), the page's YAML files written as the page shows them, on images made
here from the small synthetic set; then each bad input's message.

The workbook's trained run is the page's own example: ``muva train --config configs/street_to_B.yaml``, a
protocol whose source is a dataset declared in YAML (a copy of synthetic domain A), tested on synthetic B.
``run-XXXX`` in the page's commands is that run's folder.
"""
from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from muva_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "own-images.md"
RUN_PLACEHOLDER = "reports/synth_A2B/run-XXXX"
TINY = {"synth_scale": "small", "backbone": "tiny", "pretrained": "none", "stage1_epochs": 1,
        "stage1_warmup_epochs": 0, "stage1_batch_ids": 4, "stage2_epochs": 1, "warmup_epochs": 0,
        "lr_milestones": [1], "batch_size": 16, "num_workers": 0, "device": "cpu", "num_examples": 2}


def page_commands(text: str | None = None) -> list[str]:
    """The command lines of the page's ```bash blocks."""
    text = PAGE.read_text() if text is None else text
    return [line.split(" #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
            for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def page_files() -> dict[str, str]:
    """The page's ```yaml blocks whose first line names their file (``# configs/datasets/mine.yaml``)."""
    out = {}
    for block in re.findall(r"```yaml\n(.*?)```", PAGE.read_text(), re.S):
        first = block.splitlines()[0]
        if first.startswith("# ") and first.endswith((".yaml", ".yml")):
            out[first[2:].strip()] = block
    return out


def _params(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("-p", f"{k}={json.dumps(v) if isinstance(v, list) else v}")]


def _run(command: str, capsys, extra: list[str] | None = None, expect: int = 0) -> str:
    args = shlex.split(command)
    assert args[0] == "muva", command
    code = main(args[1:] + list(extra or []))
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == expect, f"{command}: exit {code}\n{text[-3000:]}"
    return text


class Workbook:
    """The folder the page's commands run in, and what the test made there."""

    def __init__(self, home: Path, synth: Path, run: Path, tiny: dict) -> None:
        self.home, self.synth, self.run, self.tiny = home, synth, run, tiny

    def command(self, line: str) -> str:
        return line.replace(RUN_PLACEHOLDER, str(self.run))


def _write_csv_dataset(folder: Path, samples) -> None:
    """The target's query and gallery, copied under arbitrary names (img_00000.jpg ...), listed in a CSV."""
    rows = []
    order = np.random.default_rng(0).permutation(len(samples))    # listed in another order than the built-in set
    for i, j in enumerate(order):
        s, split = samples[j]
        name = f"img/img_{i:05d}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s.path, folder / name)
        rows.append((name, s.pid, s.camid, split))
    with open(folder / "list.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "pid", "camid", "split"])
        w.writerows(rows)


@pytest.fixture(scope="module")
def workbook(small_synth_root, tmp_path_factory):
    """A workbook folder with the page's files, the images its commands read, and the page's trained run."""
    from muva_core.data.datasets import load_dataset

    home = tmp_path_factory.mktemp("own") / "workbook"
    (home / "notebooks").mkdir(parents=True)
    (home / "configs").mkdir()
    (home / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for nb in (ROOT / "notebooks").glob("01_*.ipynb"):
        shutil.copyfile(nb, home / "notebooks" / nb.name)
    for rel, text in page_files().items():
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text(text)
    # data/street: a copy of synthetic domain A (Market names, with its true part boxes)
    shutil.copytree(small_synth_root / "synth_A", home / "data" / "street")
    target = load_dataset("synth_B", small_synth_root)
    _write_csv_dataset(home / "data" / "mine", [(s, "query") for s in target.query]
                       + [(s, "gallery") for s in target.gallery])
    # crops/: the target's gallery (Market names), two more in a sub-folder; probe.jpg (a query) hidden among them
    (home / "crops" / "more").mkdir(parents=True)
    for s in target.gallery:
        shutil.copyfile(s.path, home / "crops" / Path(s.path).name)
    for s in target.query[:2]:
        shutil.copyfile(s.path, home / "crops" / "more" / f"x{Path(s.path).name}")
    shutil.copyfile(target.query[2].path, home / "probe.jpg")
    shutil.copyfile(target.query[2].path, home / "crops" / "zz_hidden.jpg")
    (home / "probes").mkdir()
    for s in target.query[:3]:
        shutil.copyfile(s.path, home / "probes" / Path(s.path).name)

    tiny = {**TINY, "synth_root": str(small_synth_root), "cache_dir": str(home / "cache")}
    mp = pytest.MonkeyPatch()
    mp.setenv("MUVA_HOME", str(home))
    mp.chdir(home)
    try:
        assert main(["train", "--config", "configs/street_to_B.yaml", "--quiet", *_params(tiny)]) == 0
        runs = list((home / "reports" / "street_to_synth_B").glob("run-*"))
        assert len(runs) == 1 and (runs[0] / "model.safetensors").is_file()
        yield Workbook(home, small_synth_root, runs[0], tiny)
    finally:
        mp.undo()


@pytest.fixture
def inside(workbook, monkeypatch):
    monkeypatch.setenv("MUVA_HOME", str(workbook.home))
    monkeypatch.chdir(workbook.home)
    return workbook


def _features(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


@pytest.mark.slow
def test_own_images_page_commands(inside, capsys):
    """Every command of docs/own-images.md, in order, as written (run-XXXX = the page's trained run)."""
    from muva_core.data.datasets import load_dataset
    from muva_core.eval.features import extract_features
    from muva_core.inference.embed import read_features
    from muva_core.inference.runs import load_run_model

    wb, home = inside, inside.home
    crops = sorted(p for p in (home / "crops").rglob("*.jpg"))
    cfg, model = load_run_model(wb.run, device="cpu")
    dim = int(model.encoder.feat_dim)
    checked = []

    def embed_parquet(out):
        table = _features(home / "crops.parquet")
        assert list(table.columns) == ["path", "feature", "pid", "camid"] and len(table) == len(crops) == 30
        assert {len(f) for f in table["feature"]} == {dim} and table["feature"][0].dtype == np.float32
        assert sorted(table["path"]) == [str(p) for p in crops]
        assert set(table.loc[table["pid"].isna(), "path"]) == {str(home / "crops" / "zz_hidden.jpg")} | {
            str(p) for p in crops if p.name.startswith("x")}   # names without ids
        assert "30 images x" in out
        # the evaluation feature: what evaluate_model computes for the same images of the built-in target
        target = {Path(s.path).name: s for s in load_dataset("synth_B", wb.synth).gallery}
        names = [Path(p).name for p in table["path"] if Path(p).name in target]
        ref = extract_features(model.encoder, [target[n] for n in names], cfg, torch.device("cpu"),
                               progress=False).numpy()
        got = np.stack([f for p, f in zip(table["path"], table["feature"]) if Path(p).name in target])
        assert len(names) == 27 and np.abs(got - ref).max() < 1e-5
        row = table[table["path"] == str(home / "crops" / names[0])].iloc[0]
        assert (row["pid"], row["camid"]) == (target[names[0]].pid, target[names[0]].camid)

    def embed_npz(out):
        npz, parquet = read_features(home / "crops.npz"), read_features(home / "crops.parquet")
        assert len(npz) == 28 and not any("/more/" in p for p in npz.paths)     # the glob: top level only
        by_path = dict(zip(parquet.paths, parquet.features))
        assert np.abs(np.stack([by_path[p] for p in npz.paths]) - npz.features).max() < 1e-6
        assert npz.meta["feature_dim"] == dim and npz.meta["kind"] == "torch"

    def export(out):
        assert "ONNX Runtime vs PyTorch max abs difference" in out and (home / "muva.onnx").is_file()

    def embed_onnx(out):
        onnx, torch_ = read_features(home / "crops-onnx.parquet"), read_features(home / "crops.parquet")
        assert onnx.paths == torch_.paths and onnx.meta["kind"] == "onnx"
        assert np.abs(onnx.features - torch_.features).max() < 1e-4      # ONNX Runtime = PyTorch to 1e-4

    def search_probe(out):
        ranks = pd.read_csv(home / "search" / "ranks.csv")
        assert list(ranks.columns) == ["query", "rank", "gallery", "distance"] and len(ranks) == 10
        assert ranks["rank"].tolist() == list(range(1, 11)) and ranks["distance"].is_monotonic_increasing
        assert Path(ranks["gallery"][0]).name == "zz_hidden.jpg"     # the exact copy of the query, first
        assert ranks["distance"][0] < 1e-4 < ranks["distance"][1]
        pngs = sorted((home / "search").glob("*.png"))
        assert len(pngs) == 1 and pngs[0].stat().st_size > 20000
        assert f'href="{pngs[0].name}"' in (home / "search" / "index.html").read_text()
        assert "30 embedded, 0 from the cache" in out
        # the same search again embeds nothing: every gallery feature comes from the cache
        again = _run(wb.command(command), capsys, ["--quiet"])
        assert "0 embedded, 30 from the cache" in again
        assert pd.read_csv(home / "search" / "ranks.csv").equals(ranks)

    def search_features(out):
        ranks = pd.read_csv(home / "search-probes" / "ranks.csv")
        assert len(ranks) == 3 * 5 and ranks.groupby("query")["rank"].max().tolist() == [5, 5, 5]
        assert set(ranks["gallery"]) <= set(read_features(home / "crops.parquet").paths)
        assert len(list((home / "search-probes").glob("q*.png"))) == 3
        assert "0 embedded, 30 from the cache or the feature file" in out

    def datasets_csv(out):
        assert "declared in" in out and str(home / "configs" / "datasets" / "mine.yaml") in out
        assert "every query image has a gallery match" in out
        target = load_dataset("synth_B", wb.synth)
        assert f"query   |       {len({s.pid for s in target.query})} |         {len(target.query)} |" in out

    def datasets_folders(out):
        assert "street" in out and "images decode" in out

    def eval_dataset(out):
        declared = _run(wb.command(command) + " --json --quiet", capsys)
        builtin = _run(f"muva eval --run {wb.run} --json --quiet", capsys)
        a, b = (json.loads(t.strip().splitlines()[-1])["metrics"] for t in (declared, builtin))
        assert out.startswith("mine: mAP") or "\nmine: mAP" in out
        assert abs(a["mAP"] - b["mAP"]) < 0.01 and abs(a["Rank-1"] - b["Rank-1"]) < 0.01, (a, b)
        assert a["num_valid_queries"] == b["num_valid_queries"] > 0

    def train(out):
        assert f"run folder: {wb.run}" in out and "configs/datasets/street.yaml->synth_B: mAP" in out
        assert "stage 2 finished earlier" in out or "mAP" in out

    def run_notebooks(out):
        grounded = json.loads((wb.run / "metrics" / "01_grounding.json").read_text())["datasets"]
        assert set(grounded) == {"street"} and grounded["street"]["images"] > 30
        assert (wb.run / "notebooks" / "01_grounding.ipynb").is_file()

    checks = {
        "muva embed --run reports/synth_A2B/run-XXXX --images crops/ --out crops.parquet": embed_parquet,
        "muva embed --run reports/synth_A2B/run-XXXX --images 'crops/*.jpg' --out crops.npz": embed_npz,
        "muva export-onnx --run reports/synth_A2B/run-XXXX --out muva.onnx": export,
        "muva embed --onnx muva.onnx --images crops/ --out crops-onnx.parquet": embed_onnx,
        "muva search --run reports/synth_A2B/run-XXXX --query probe.jpg --gallery crops/ --top 10 --out search/":
            search_probe,
        "muva search --run reports/synth_A2B/run-XXXX --query probes/ --gallery crops.parquet --top 5 "
        "--out search-probes/ --masks": search_features,
        "muva datasets configs/datasets/mine.yaml": datasets_csv,
        "muva datasets configs/datasets/street.yaml --scan-images": datasets_folders,
        "muva eval --run reports/synth_A2B/run-XXXX --dataset configs/datasets/mine.yaml": eval_dataset,
        "muva train --config configs/street_to_B.yaml": train,
        "muva run --config configs/street_to_B.yaml --steps 01": run_notebooks,
    }
    extra = {"muva train --config configs/street_to_B.yaml": _params(wb.tiny) + ["--quiet"],
             "muva run --config configs/street_to_B.yaml --steps 01": _params(wb.tiny) + ["--quiet"]}
    commands = page_commands()
    assert sorted(commands) == sorted(checks), "a command of docs/own-images.md without a check here (or gone)"
    for command in commands:
        out = _run(wb.command(command), capsys, extra.get(command, ["--quiet"] if command.split()[1] in
                                                               ("embed", "search", "eval") else []))
        checks[command](out)
        checked.append(command)
    assert checked == commands
    # the README's section shows commands of this page (so they run here)
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Your own images and datasets", 1)[1].split("\n## ", 1)[0]
    assert set(page_commands(section)) <= set(commands) and page_commands(section)
    assert "docs/own-images.md" in section


@pytest.mark.slow
def test_embed_and_search_bad_inputs_fail_before_any_work(inside, capsys):
    from muva_core.inference.embed import FeatureTable, image_samples, write_features

    wb, home = inside, inside.home
    run = f"--run {wb.run}"
    out = _run(f"muva embed {run} --images crops/ --out crops.txt", capsys, expect=2)
    assert "--out crops.txt: the feature file must end in .parquet or .npz" in out
    out = _run(f"muva embed {run} --images nowhere/ --out x.parquet", capsys, expect=2)
    assert "--images nowhere/: no such file or folder" in out
    (home / "empty").mkdir(exist_ok=True)
    out = _run(f"muva embed {run} --images empty --out x.parquet", capsys, expect=2)
    assert "--images empty: no images found" in out
    out = _run("muva embed --images crops/ --out x.parquet", capsys, expect=2)
    assert "give the trained run (--run RUN) or an exported model (--onnx MODEL.onnx)" in out
    # unreadable images: every one named in one message, nothing written
    bad = home / "bad"
    bad.mkdir(exist_ok=True)
    shutil.copyfile(home / "probe.jpg", bad / "ok.jpg")
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "cut.jpg").write_bytes((home / "probe.jpg").read_bytes()[:300])
    out = _run(f"muva embed {run} --images bad --out bad.parquet --quiet", capsys, expect=2)
    assert "2 of 3 images of --images bad cannot be read" in out
    assert str(bad / "zero.jpg") in out and str(bad / "cut.jpg") in out and not (home / "bad.parquet").exists()
    out = _run(f"muva search {run} --query bad --gallery crops/ --out s --quiet", capsys, expect=2)
    assert "2 of 33 images of --query bad and --gallery crops/ cannot be read" in out and not (home / "s").exists()

    out = _run(f"muva search {run} --query probe.jpg --gallery crops/ --top 0 --out s", capsys, expect=2)
    assert "--top must be a whole number >= 1, got 0" in out
    other = write_features(home / "other.npz", FeatureTable.of(image_samples([home / "probe.jpg"]),
                                                               np.ones((1, 3), np.float32), {"feature_dim": 3}))
    out = _run(f"muva search {run} --query probe.jpg --gallery {other.name} --out s", capsys, expect=2)
    assert f"--gallery {other.name}: 3-d features, but the model gives" in out
    _run(f"muva export-onnx {run} --out m.onnx", capsys)
    out = _run("muva search --onnx m.onnx --query probe.jpg --gallery crops/ --out s --masks", capsys, expect=2)
    assert "--masks: the run's model predicts no part masks" not in out and "--masks needs the run (--run)" in out
    (home / "afile").write_text("x")
    out = _run(f"muva search {run} --query probe.jpg --gallery crops/ --out afile", capsys, expect=2)
    assert "--out afile: exists and is not a folder" in out
    out = _run(f"muva eval {run} --protocol synth:A2C --dataset configs/datasets/mine.yaml", capsys, expect=2)
    assert "give --protocol or --dataset, not both" in out
