"""Datasets declared in YAML (muva_core.data.declared): parsing, the rules, every bad input's message, and their
use as dataset names (muva datasets) and as protocol sources / targets (the sources / target config keys)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from muva_core.cli import main
from muva_core.config import ConfigError, RunConfig
from muva_core.data.declared import open_dataset, read_dataset_spec
from muva_core.data.samples import DatasetError

from conftest import MARKET_FILES, write_image


def _csv(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "pid", "camid", "split"])
        w.writerows(rows)
    return path


@pytest.fixture
def listed(tmp_path: Path) -> Path:
    """A CSV-declared dataset: arbitrary file names, train / query / gallery rows, a junk row."""
    root = tmp_path / "mine"
    rows = [("img/a.jpg", 17, 0, "train"), ("img/b.jpg", 17, 1, "train"), ("img/c.jpg", 40, 2, "train"),
            ("img/d.jpg", 5, 0, "query"), ("img/e.jpg", 6, 0, "query"),
            ("img/f.jpg", 5, 1, "gallery"), ("img/g.jpg", 6, 0, "gallery"), ("img/h.jpg", 9, 3, "gallery"),
            ("img/junk.jpg", -1, 2, "gallery")]
    for rel, *_ in rows:
        write_image(root / rel)
    _csv(root / "list.csv", rows)
    spec = tmp_path / "mine.yaml"
    spec.write_text("name: mine\nroot: mine\ncsv: list.csv\n")
    return spec


def test_a_csv_declared_dataset_follows_the_built_in_rules(listed):
    ds = open_dataset(listed)
    assert ds.name == "mine" and ds.spec.file == listed
    assert [s.relpath for s in ds.train] == ["img/a.jpg", "img/b.jpg", "img/c.jpg"]
    assert [s.pid for s in ds.train] == [0, 0, 1]                     # train pids relabelled 0..N-1
    assert [(s.pid, s.camid) for s in ds.query] == [(5, 0), (6, 0)]   # query / gallery keep theirs
    assert len(ds.gallery) == 3 and all(s.pid != -1 for s in ds.gallery)   # junk dropped
    assert ds.query[0].key == "mine/img/d.jpg" and Path(ds.query[0].path).is_file()
    # query 6 is seen by camera 0 only, in the gallery too: no match from another camera
    assert [s.relpath for s in ds.unmatched_queries()] == ["img/e.jpg"]


def test_muva_datasets_prints_the_summary_and_the_queries_without_a_match(listed, capsys):
    assert main(["datasets", str(listed)]) == 0
    out = capsys.readouterr().out
    assert "gallery |       3 |" in out.replace("  ", " ") or "gallery" in out
    assert f"declared in {listed}" in out
    assert "1 of 2 query images have no gallery image of the same identity from another camera" in out
    assert "img/e.jpg" in out


def test_a_pattern_declared_dataset_reads_split_folders_and_sub_folders(tmp_path):
    root = tmp_path / "street"
    for split, names in MARKET_FILES.items():
        for n in names:
            write_image(root / split / n)
    spec = tmp_path / "street.yaml"
    spec.write_text("name: street\nroot: street\ndistractor_pid: 0\n"
                    "splits: {train: bounding_box_train, query: query, gallery: bounding_box_test}\n")
    ds = open_dataset(spec)
    assert len(ds.train) == 7 and len(ds.query) == 3 and len(ds.gallery) == 6    # as the Market parser
    assert {s.camid for s in ds.train} == {1, 2, 3, 5, 6}                          # camera numbers as given
    # a <pid>/<file> layout with a pattern over the path inside the split folder
    for rel in ("0001/c1_a.png", "0001/c2_b.png", "0002/c1_c.png"):
        write_image(tmp_path / "ids" / "train" / rel)
    nested = tmp_path / "ids.yaml"
    nested.write_text("name: ids\nroot: ids\npattern: '^(?P<pid>\\d+)/c(?P<camid>\\d+)_'\nsplits: {train: train}\n")
    ids = open_dataset(nested)
    assert [(s.relpath, s.pid, s.camid) for s in ids.train] == [("train/0001/c1_a.png", 0, 1),
                                                                ("train/0001/c2_b.png", 0, 2),
                                                                ("train/0002/c1_c.png", 1, 1)]
    assert ids.query == [] and ids.gallery == []


@pytest.mark.parametrize("text, expected", [
    ("name: mine\nroot: mine\ncsv: list.csv\nsplts: {}\n", "unknown key 'splts'; did you mean 'splits'?"),
    ("name: mine\ncsv: list.csv\n", "key 'root' is required"),
    ("name: mine\nroot: nowhere\ncsv: list.csv\n", "key 'root': folder does not exist"),
    ("name: mine\nroot: mine\ncsv: other.csv\n", "key 'csv': file does not exist"),
    ("name: mine\nroot: mine\n", "give either `csv: <file>`"),
    ("name: mine\nroot: mine\ncsv: list.csv\nsplits: {train: img}\n", "not both"),
    ("name: mine\nroot: mine\nsplits: {train: img, test: img}\n", "key 'splits': unknown split 'test'"),
    ("name: mine\nroot: mine\nsplits: {train: missing}\n", "key 'splits.train': folder does not exist"),
    ("name: mine\nroot: mine\npattern: '^(?P<pid>\\d+)'\nsplits: {train: img}\n",
     "key 'pattern' needs the named groups (?P<pid>...) and (?P<camid>...)"),
    ("name: mine\nroot: mine\npattern: '(unclosed'\nsplits: {train: img}\n", "key 'pattern': not a valid regular"),
    ("name: market\nroot: mine\ncsv: list.csv\n", "key 'name': 'market' is a built-in dataset (market1501)"),
    ("name: 'my set'\nroot: mine\ncsv: list.csv\n", "key 'name': 'my set' must start with a letter"),
    ("- name\n", "expected a mapping"),
])
def test_a_bad_dataset_file_is_refused_naming_the_file_and_the_key(listed, text, expected):
    listed.write_text(text)
    with pytest.raises(DatasetError) as err:
        read_dataset_spec(listed)
    assert str(err.value).startswith(f"{listed}: ") and expected in str(err.value)


def test_csv_rows_that_do_not_parse_are_named_all_at_once(listed, capsys):
    root = listed.parent / "mine"
    _csv(root / "list.csv", [("img/a.jpg", 1, 0, "train"), ("img/b.jpg", "x7", 0, "train"),
                             ("img/c.jpg", 2, "cam3", "query"), ("img/d.jpg", 2, 1, "val"),
                             ("img/e.jpg", -4, 1, "gallery")])
    assert main(["datasets", str(listed)]) == 2
    err = capsys.readouterr().err
    assert f"4 row(s) that do not parse in {root / 'list.csv'}" in err
    assert "row 3 (img/b.jpg): pid 'x7' is not an integer" in err
    assert "row 4 (img/c.jpg): camid 'cam3' is not an integer >= 0" in err
    assert "row 5: unknown split 'val' (split is train, query or gallery)" in err
    assert "row 6 (img/e.jpg): pid -4 is below -1" in err and "Traceback" not in err
    _csv(root / "list.csv", [("img/a.jpg", 1, 0, "train"), ("img/gone.jpg", 1, 1, "train")])
    assert main(["datasets", str(listed)]) == 2
    assert f"1 listed image(s) that do not exist in {root / 'list.csv'}:\n  row 3: {root / 'img/gone.jpg'}" in \
        capsys.readouterr().err
    (root / "list.csv").write_text("file,pid\nimg/a.jpg,1\n")
    assert main(["datasets", str(listed)]) == 2
    assert f"mine ({listed}): {root / 'list.csv'} lacks the column(s) path, camid, split" in capsys.readouterr().err


def test_file_names_the_pattern_does_not_parse_are_named(tmp_path, capsys):
    for name in ("0001_c1_a.jpg", "0002_c1_b.jpg", "person7.jpg", "0003_cX_c.jpg"):
        write_image(tmp_path / "d" / "train" / name)
    spec = tmp_path / "d.yaml"
    spec.write_text("name: dd\nroot: d\nsplits: {train: train}\n")
    assert main(["datasets", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "2 file name(s) whose pid or camid does not parse" in err and f"{spec}, key 'pattern'" in err
    assert "person7.jpg: does not match the pattern" in err and "0003_cX_c.jpg: does not match" in err


def test_unreadable_images_are_reported_all_at_once(listed, capsys):
    root = listed.parent / "mine"
    (root / "img" / "b.jpg").write_bytes(b"not a jpeg")
    (root / "img" / "f.jpg").write_bytes((root / "img" / "a.jpg").read_bytes()[:40])
    assert main(["datasets", str(listed), "--scan-images"]) == 2
    err = capsys.readouterr().err
    assert "2 of 9 images of mine (train, query, gallery) cannot be read" in err or "2 of 8" in err
    assert str(root / "img" / "b.jpg") in err and str(root / "img" / "f.jpg") in err


def test_sources_and_target_keys_name_the_protocol(listed, tmp_path, monkeypatch):
    from muva_core.data.protocols import get_protocol
    from muva_core.config import identity

    (tmp_path / "home").mkdir()
    monkeypatch.setenv("MUVA_HOME", str(tmp_path / "home"))
    cfg = RunConfig().update({"data": {"sources": [str(listed)], "target": "synth_B"}})
    assert cfg.data.protocol == f"{listed}->synth_B" and cfg.data.sources == [str(listed)]
    proto = get_protocol(cfg.data.protocol)
    assert proto.name == "mine->synth_B" and proto.sources == ("mine",) and proto.target == "synth_B"
    assert proto.slug == "mine_to_synth_B" and proto.synthetic
    # stored relative to the project root when the file is inside it (config.yaml reopens from anywhere)
    monkeypatch.setenv("MUVA_HOME", str(tmp_path))
    inside = RunConfig().update({"sources": "mine.yaml", "target": "synth_C"})
    assert inside.data.protocol == "mine.yaml->synth_C"
    # the half not given comes from the protocol; a protocol given alone clears them
    half = RunConfig().update({"target": "synth_D"})
    assert half.data.protocol == "synth_A->synth_D"
    assert RunConfig().update({"target": "synth_D"}).update({"protocol": "synth:B2C"}).data.sources == []
    # the keys are spelled in `protocol`: run folders named before them keep their names
    assert "sources" not in identity(RunConfig()) and "target" not in identity(RunConfig())
    assert get_protocol(f"{listed}+synth_C->synth_B").sources == ("mine", "synth_C")


def test_bad_sources_and_targets_fail_before_any_work(listed, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"key sources and target: .*missing.yaml: dataset file not found"):
        RunConfig().update({"sources": [str(tmp_path / "missing.yaml")], "target": "synth_B"})
    with pytest.raises(ConfigError, match=r"key target: .*unknown dataset 'synth_Q'"):
        RunConfig().update({"target": "synth_Q"})
    with pytest.raises(ConfigError, match=r"target 'synth_A' is also a source"):
        RunConfig().update({"target": "synth_A"})
    # a declared set without query / gallery cannot be a target (the file named)
    root = listed.parent / "mine"
    _csv(root / "list.csv", [("img/a.jpg", 1, 0, "train"), ("img/b.jpg", 1, 1, "train")])
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  sources: [synth_A]\n  target: {listed}\n  synth_root: {tmp_path / 'synth'}\n"
                      "  synth_scale: small\n")
    assert main(["train", "--config", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"mine ({listed}) has no query and no gallery split, so it cannot be the target of synth_A->mine" in err
    assert not (tmp_path / "reports").exists() and not (tmp_path / "synth").exists()   # checked before any work


def test_a_dataset_file_is_a_dataset_name_for_muva_ground(listed, tmp_path, capsys):
    """`muva ground --dataset FILE.yaml` (no --root): the simulated expert needs true part boxes, and says so."""
    assert main(["ground", "--dataset", str(listed), "--out", str(tmp_path / "b.parquet"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "dataset mine has none" in err and "part_boxes.parquet does not exist" in err
    assert main(["datasets", "market1501"]) == 2
    assert "needs its root folder (--root DIR)" in capsys.readouterr().err
