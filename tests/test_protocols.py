"""Protocol registry (paper's 12 + 4, synthetic), slugs, and protocol data assembly on tiny trees."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from muva_core.data.protocols import (
    DATASET_CODES,
    build_protocol_data,
    get_protocol,
    list_protocols,
    protocol_slug,
    register_protocol,
)

from conftest import SYNTH_TRAIN_IDS

CODES = ["MA", "D", "MS", "C3"]


def test_paper_single_source_protocols():
    single_real = list_protocols("real-single")
    assert len(single_real) == 12
    for a, b in itertools.permutations(CODES, 2):
        p = get_protocol(f"{a}2{b}")
        assert p.sources == (DATASET_CODES[a],) and p.target == DATASET_CODES[b]
        assert p.kind == "single" and not p.synthetic
        assert p.name in single_real
    assert get_protocol("MA2C3").target == "cuhk03_np"  # C3 = detected


@pytest.mark.parametrize(
    "name, sources, target",
    [
        ("D+MS+C3->MA", ("dukemtmcreid", "msmt17", "cuhk03_np"), "market1501"),
        ("MA+MS+C3->D", ("market1501", "msmt17", "cuhk03_np"), "dukemtmcreid"),
        ("MA+D+C3->MS", ("market1501", "dukemtmcreid", "cuhk03_np"), "msmt17"),
        ("MA+D+MS->C3", ("market1501", "dukemtmcreid", "msmt17"), "cuhk03_np"),
    ],
)
def test_paper_multi_source_protocols(name, sources, target):
    p = get_protocol(name)
    assert p.sources == sources and p.target == target and p.kind == "multi"
    assert name in list_protocols("multi") and name in list_protocols("real")


def test_synthetic_protocols():
    syn = list_protocols("synthetic")
    assert len(syn) == 12 + 4
    assert len(list_protocols("synthetic-single")) == 12 and len(list_protocols("synthetic-multi")) == 4
    p = get_protocol("synth:A2B")
    assert p.sources == ("synth_A",) and p.target == "synth_B" and p.synthetic
    q = get_protocol("synth:B+C+D->A")
    assert q.sources == ("synth_B", "synth_C", "synth_D") and q.target == "synth_A"
    assert set(list_protocols()) == set(list_protocols("real")) | set(syn)
    assert len(list_protocols("real")) == 16


def test_slugs_are_folder_safe_and_accepted():
    assert protocol_slug("synth:A2B") == "synth_A2B"
    assert protocol_slug("D+MS+C3->MA") == "D+MS+C3_to_MA"
    assert protocol_slug("synth:B+C+D->A") == "synth_B+C+D_to_A"
    slugs = [protocol_slug(n) for n in list_protocols()]
    assert len(set(slugs)) == len(slugs)
    assert all(not set(s) & set(':/\\<>|"?* ') for s in slugs)
    assert get_protocol("D+MS+C3_to_MA").name == "D+MS+C3->MA"
    assert get_protocol("synth_A2B").name == "synth:A2B"
    assert get_protocol("ma2d").name == "MA2D"


def test_unknown_protocol_suggests_close_matches():
    with pytest.raises(ValueError) as err:
        get_protocol("MA2DD")
    assert "MA2D" in str(err.value) and "did you mean" in str(err.value)
    # the closest canonical name (never a slug), each protocol listed once, and a command that exists
    with pytest.raises(ValueError) as err:
        get_protocol("synth_A2Bx")
    msg = str(err.value)
    assert "did you mean 'synth:A2B'?" in msg
    for name in list_protocols():
        assert msg.count(name) == 1 + (name == "synth:A2B"), name
    assert "synth_A2C" not in msg and "D+MS+C3_to_MA," not in msg  # no file-slug aliases repeated
    assert "list_protocols()" not in msg and "`muva protocols`" in msg
    from muva_core.cli import build_parser

    assert build_parser().parse_args(["protocols"]).func.__name__ == "cmd_protocols"  # the command is real
    with pytest.raises(ValueError, match="unknown protocol kind"):
        list_protocols("sideways")


def test_register_protocol_validation():
    with pytest.raises(ValueError, match="already registered"):
        register_protocol("MA2D", ["MA"], "D")
    with pytest.raises(ValueError, match="also a source"):
        register_protocol("bad_proto_xyz", ["MA", "D"], "market")
    with pytest.raises(ValueError, match="unknown dataset"):
        register_protocol("bad_proto_xyz", ["nope"], "D")


def test_build_single_source(market_root: Path, duke_root: Path):
    data = build_protocol_data("MA2D", {"MA": market_root.parent, "duke": duke_root})
    assert data.protocol.name == "MA2D"
    assert len(data.train) == 7 and data.num_classes == 3
    assert {s.domain for s in data.train} == {"market1501"}
    assert {s.domain for s in data.query + data.gallery} == {"dukemtmcreid"}
    assert (len(data.query), len(data.gallery)) == (2, 3)
    assert data.sources["market1501"].pid_offset == 0
    table = data.summary()
    assert list(table["role"]) == ["source", "target", "target"]


def test_build_multi_source_leave_one_out(market_root: Path, duke_root: Path, msmt_v1_root: Path, cuhk03_root: Path):
    data = build_protocol_data("D+MS+C3->MA", market_root.parent)  # one parent holds them all
    assert list(data.sources) == ["dukemtmcreid", "msmt17", "cuhk03_np"]
    assert data.num_classes == 2 + 3 + 2
    assert sorted({s.pid for s in data.train}) == list(range(7))
    assert [data.sources[n].pid_offset for n in data.sources] == [0, 2, 5]
    assert {s.domain for s in data.query} == {"market1501"} and len(data.gallery) == 6
    assert data.num_cams == 8 + 15 + 2


def test_build_synthetic_with_single_synth_root(synth_root: Path):
    data = build_protocol_data("synth:B+C+D->A", {"synth": synth_root})
    n = SYNTH_TRAIN_IDS
    assert data.num_classes == n["B"] + n["C"] + n["D"]
    assert {s.domain for s in data.train} == {"synth_B", "synth_C", "synth_D"}
    assert {s.domain for s in data.gallery} == {"synth_A"}
    one = build_protocol_data("synth_A2B", {"synth": synth_root})
    assert one.num_classes == n["A"] and {s.domain for s in one.query} == {"synth_B"}


def test_build_missing_root_names_dataset(market_root: Path):
    with pytest.raises(ValueError) as err:
        build_protocol_data("MA2D", {"MA": market_root})
    assert "dukemtmcreid" in str(err.value)
