"""`muva doctor`: datasets against their published counts, layout versions, masks, checkpoint, config vs the paper."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import paper_trees
from muva_core.cli import main
from muva_core.config import resolve_config
from muva_core.report.doctor import PUBLISHED, config_vs_paper, doctor_report, format_report, short_report


def _cli_json(args, capsys) -> dict:
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def _names(pids: list[int], count: int, cams: int, tag: str) -> list[str]:
    """``count`` Market-style file names spread over ``pids`` (every pid at least once), cameras 1..cams."""
    return [f"{pids[i % len(pids)]:04d}_c{i % cams + 1}s1_{i:06d}_{tag}.jpg" for i in range(count)]


def market_with_published_counts(root: Path) -> Path:
    """A Market-1501 tree with the published numbers of images and identities per split (empty files: the
    parser reads names only), plus junk images (-1) that every split drops."""
    folder = root / "Market-1501-v15.09.15"
    (train_n, train_ids), (query_n, query_ids), (gallery_n, gallery_ids) = (PUBLISHED["market1501"][s] for s in
                                                                            ("train", "query", "gallery"))
    test_pids = list(range(1000, 1000 + query_ids))
    splits = {"bounding_box_train": _names(list(range(1, train_ids + 1)), train_n, 6, "00"),
              "query": _names(test_pids, query_n, 6, "01"),
              # the 750 test identities and the 0000 distractors: 751 identities
              "bounding_box_test": _names([0] + test_pids, gallery_n, 6, "02")}
    for split, names in splits.items():
        (folder / split).mkdir(parents=True)
        for name in names + [f"-1_c1s1_{i:06d}_09.jpg" for i in range(3)]:
            (folder / split / name).touch()
    return folder


@pytest.mark.slow
def test_doctor_json_reports_every_market_split_against_the_published_counts(tmp_path, capsys):
    root = tmp_path / "data"
    folder = market_with_published_counts(root)
    args = ["doctor", "--protocol", "MS2MA", "--data-root", str(root), "--json", "--no-estimate",
            "-p", f"cache_dir={tmp_path / 'cache'}"]
    report = _cli_json(args, capsys)
    assert set(report) >= {"environment", "datasets", "masks", "checkpoint", "config_vs_paper", "estimate"}
    market = report["datasets"]["market1501"]
    assert market["found"] and market["role"] == "target"
    for split in ("train", "query", "gallery"):
        row = market["splits"][split]
        assert row["match"] is True, (split, row)
        assert (row["images"], row["ids"]) == (row["published_images"], row["published_ids"]) == PUBLISHED["market1501"][split]
    msmt = report["datasets"]["msmt17"]
    assert not msmt["found"] and any("MSMT17_V1" in t for t in msmt["tried"])    # every folder tried, named

    first_query = sorted((folder / "query").glob("1*.jpg"))[0]
    first_query.unlink()
    report = _cli_json(args, capsys)
    query = report["datasets"]["market1501"]["splits"]["query"]
    assert query["match"] is False and query["images"] == 3367 and query["published_images"] == 3368
    assert report["datasets"]["market1501"]["splits"]["train"]["match"] is True
    text = format_report(doctor_report(resolve_config("MS2MA", overrides={"data_root": str(root)}), run_estimate=False))
    assert "query 3367/750 (published 3368/750: DIFFERS)" in text and "train 12936/751 ok" in text


def test_msmt17_layouts_and_cuhk03_subsets_are_named(tmp_path, msmt_v2_root, cuhk03_root):
    from muva_core.report.doctor import dataset_report

    v1 = tmp_path / "v1"
    paper_trees.msmt17_v1(v1)
    r = dataset_report("msmt17", v1, "source")
    assert r["version"] == "V1" and any("list_train.txt + list_val.txt = 16 images" in n for n in r["notes"])
    assert any("list_train.txt alone: 12 images" in n for n in r["notes"])

    v2 = tmp_path / "v2"
    paper_trees.msmt17_v1(v2)
    (v2 / "MSMT17_V1" / "train").rename(v2 / "MSMT17_V1" / "mask_train_v2")
    (v2 / "MSMT17_V1" / "test").rename(v2 / "MSMT17_V1" / "mask_test_v2")
    (v2 / "MSMT17_V1").rename(v2 / "MSMT17_V2")
    r = dataset_report("msmt17", v2, "source")
    assert r["version"] == "V2" and r["dir"].endswith("MSMT17_V2") and "mask_train_v2" in r["notes"][0]

    r = dataset_report("msmt17", msmt_v2_root.parent, "source")           # the conftest's market-style conversion
    assert r["version"].startswith("market-style conversion")

    r = dataset_report("cuhk03_np", cuhk03_root.parent, "target")
    assert r["version"] == "detected" and "subsets present: detected, labeled" in r["notes"][0]
    r = dataset_report("cuhk03_np_labeled", cuhk03_root.parent, "target")
    assert r["version"] == "labeled" and r["splits"]["train"]["published_images"] == 7368


def test_checkpoint_masks_and_config_against_the_paper(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from muva_core.model.backbone import BackboneConfig, build_clip

    root = tmp_path / "data"
    paper_trees.msmt17_v1(root)
    paper_trees.market1501(root)
    clip, _ = build_clip(BackboneConfig(name="tiny", pretrained=None, image_size=(256, 128)))
    good = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(good))
    bad = tmp_path / "bad.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(bad))
    base = {"data_root": str(root), "backbone": "tiny", "cache_dir": str(tmp_path / "cache")}

    report = doctor_report(resolve_config("MS2MA", overrides={**base, "checkpoint_path": str(good)}), run_estimate=False)
    assert report["checkpoint"]["status"] == "recognised" and "a state dict of the tiny CLIP" in report["checkpoint"]["note"]
    from test_model import _openai_torchscript_archive

    archive = tmp_path / "ViT-tiny.pt"                     # laid out as OpenAI's ViT-B-16.pt (a 224 x 224 grid)
    _openai_torchscript_archive(build_clip(BackboneConfig(name="tiny", pretrained=None, image_size=(224, 224)))[0]
                                .state_dict(), archive)
    report = doctor_report(resolve_config("MS2MA", overrides={**base, "checkpoint_path": str(archive)}),
                           run_estimate=False)
    assert report["checkpoint"]["status"] == "recognised" and report["checkpoint"]["kind"] == "OpenAI's TorchScript archive"
    report = doctor_report(resolve_config("MS2MA", overrides={**base, "checkpoint_path": str(bad)}), run_estimate=False)
    assert report["checkpoint"]["status"] == "not recognised"
    report = doctor_report(resolve_config("MS2MA", overrides={**base, "checkpoint_path": str(tmp_path / "x.pt")}),
                           run_estimate=False)
    assert report["checkpoint"]["status"] == "missing"
    assert report["masks"]["msmt17"]["coverage"] == 0.0 and "cogvlm" in report["masks"]["msmt17"]["source"]
    assert "GPU-hours" in report["masks"]["msmt17"]["source"]

    names = [p.name for p in (root / "MSMT17_V1" / "train").rglob("*.jpg")]
    pkl = paper_trees.authors_pickle(tmp_path / "ms.pkl", names[:8])
    assert main(["import-masks", "--authors", str(pkl), "--dataset", "msmt17", "--root", str(root),
                 "--out", str(tmp_path / "ms.safetensors")]) == 0
    cfg = resolve_config("MS2MA", overrides={**base, "masks_file": str(tmp_path / "ms.safetensors")})
    report = doctor_report(cfg, run_estimate=False)
    assert report["masks"]["msmt17"]["coverage"] == 0.5 and "the authors' file" in report["masks"]["msmt17"]["source"]

    paper = config_vs_paper(resolve_config("MS2MA"))                       # as shipped: recipe reference
    assert paper["recipe"] == "reference"
    assert [d["key"] for d in paper["differs"]] == ["local_pos_embed"]     # the reference's own positional rows
    assert "the paper's single-GPU setting" in paper["notes"][0]
    paper = config_vs_paper(resolve_config("MA2MS", overrides={"batch_size": 128, "rmp_heads": 8}))
    assert {d["key"] for d in paper["differs"]} >= {"batch_size", "rmp_heads"}   # MA2MS: 2 heads in the paper
    assert any("linear scaling rule" in n and "stage2_lr 1e-05" in n for n in paper["notes"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    paper = config_vs_paper(resolve_config("MS2MA"))
    assert paper["processes"] == 4 and "batch_size / 4 = 16 images a step" in paper["notes"][0]
    monkeypatch.setenv("WORLD_SIZE", "32")
    assert any("not a multiple of num_instances" in n for n in config_vs_paper(resolve_config("MS2MA"))["notes"])


@pytest.mark.slow
def test_doctor_measures_a_few_steps_and_extrapolates_the_run(tmp_path, capsys):
    root = tmp_path / "data"
    paper_trees.msmt17_v1(root)
    paper_trees.market1501(root)
    args = ["doctor", "--protocol", "MS2MA", "--data-root", str(root), "--steps", "2",
            "-p", "backbone=tiny", "-p", "pretrained=none", "-p", "batch_size=8", "-p", "device=cpu"]
    report = _cli_json(args + ["--json"], capsys)
    est = report["estimate"]
    assert est["steps"] == 2 and est["batch_size"] == 8
    for key in ("inference_batch", "stage1_step", "stage2_step"):
        assert est[f"{key}_seconds"] > 0 and est[f"{key}_peak_GB"] >= 0
    assert est["counts"] == {"train": 16, "ids": 16, "test": 12}
    # stage 2: 60 epochs x (16 // 8 steps + 2 VPM-2 batches)
    expect = 60 * (2 * est["stage2_step_seconds"] + 2 * est["inference_batch_seconds"]) / 3600
    assert est["stage2_hours"] == pytest.approx(expect)
    assert est["total_hours"] == pytest.approx(est["stage1_hours"] + est["stage2_hours"] + est["evaluation_hours"])
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "stage-2 step:" in text and "whole run (16 training images of 16 identities, 12 test images)" in text


def test_short_form_is_a_few_lines(tmp_path):
    root = tmp_path / "data"
    paper_trees.msmt17_v1(root)
    paper_trees.market1501(root)
    text = short_report(resolve_config("MS2MA", overrides={"data_root": str(root), "cache_dir": str(tmp_path / "c")}))
    assert text.startswith("muva doctor: MS2MA") and len(text.splitlines()) <= 10
    assert "msmt17 (source) V1" in text and "precision on cpu" in text and "muva doctor --protocol 'MS2MA'" in text
