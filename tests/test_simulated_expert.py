"""The simulated grounding expert: failure modes at their rates, determinism, raw records, errors."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from muva_core.data.samples import PARTS, DatasetError
from muva_core.grounding import get_backend
from muva_core.grounding.simulated import DEFAULT_RATES, FAILURE_MODES, SimulatedExpert, UnknownKeyError, failure_mode
from conftest import make_truth


@pytest.fixture(scope="module")
def truth():
    return make_truth(3000, seed=0)


@pytest.fixture(scope="module")
def expert(truth):
    return SimulatedExpert(truth, seed=7, domain="synth_A")


@pytest.fixture(scope="module")
def answers(expert):
    keys = expert.keys
    return keys, expert.ground(None, keys)


def test_failure_rates_within_tolerance(expert, answers):
    keys, res = answers
    n = len(keys)
    for j, part in enumerate(PARTS):
        modes = pd.Series([failure_mode(r[j].raw) for r in res])
        assert set(modes) <= {"ok", *FAILURE_MODES}
        for mode in FAILURE_MODES:
            p = DEFAULT_RATES[mode][part]
            tol = 4 * np.sqrt(max(p, 0.01) * (1 - p) / n)
            assert abs((modes == mode).mean() - p) < tol, (part, mode, (modes == mode).mean(), p)
        assert abs((modes == "ok").mean() - (1 - sum(DEFAULT_RATES[m][part] for m in FAILURE_MODES))) < 0.03


def test_failure_modes_visible_in_boxes(expert, answers):
    keys, res = answers
    H = 256
    seen = set()
    for key, boxes in zip(keys[:600], res[:600]):
        for pb in boxes:
            raw = json.loads(pb.raw)
            mode, src = raw["mode"], raw["source"]
            seen.add((pb.part, mode))
            truth = np.array(expert.truth_box(key, pb.part))
            if mode == "missing":
                assert pb.box is None and pb.missing and pb.status == "missing"
                continue
            box = np.array(pb.box)
            assert 0 <= box[0] < box[2] <= 128 and 0 <= box[1] < box[3] <= H
            if mode == "whole_person":
                person = np.array(expert.truth_box(key, "person"))
                assert src == "person"
                assert abs((box[3] - box[1]) - (person[3] - person[1])) < 0.25 * (person[3] - person[1])
                assert box[3] - box[1] > 0.6 * H
            elif mode == "oversplit":
                assert box[3] - box[1] <= 0.36 * (truth[3] - truth[1]) + 1e-6
                assert box[0] >= truth[0] - 1e-6 and box[2] <= truth[2] + 1e-6
            elif mode == "wrong_part" and src != "shift":
                assert src != pb.part and src in PARTS
                other = np.array(expert.truth_box(key, src))
                assert abs((box[1] + box[3]) / 2 - (other[1] + other[3]) / 2) < 0.2 * (other[3] - other[1]) + 3
            elif mode == "ok":
                assert np.abs(box - truth).max() < 0.3 * (truth[3] - truth[1])
    assert {("legs", "whole_person"), ("upper", "whole_person"), ("legs", "oversplit"), ("head", "wrong_part")} <= seen
    assert ("head", "whole_person") not in seen  # default rate 0


def test_leg_height_histogram_has_figure5_peaks(answers):
    _, res = answers
    legs = np.array([(b[2].box[3] - b[2].box[1]) / 256 if b[2].box else np.nan for b in res])
    legs = legs[np.isfinite(legs)]
    hist, _ = np.histogram(legs, bins=20, range=(0, 1))
    # the true leg heights are 0.37..0.49: mass near the full height and at tiny heights are the failure peaks
    assert hist[15:].sum() / len(legs) > 0.09
    assert hist[:3].sum() / len(legs) > 0.04
    assert hist[15:].max() > hist[12:14].max()  # a separate peak near the full height, not a tail


def test_deterministic_regardless_of_batch_order(expert, truth):
    keys = expert.keys[:50]
    a = expert.ground(None, keys)
    b = expert.ground(None, keys[::-1])[::-1]
    c = [expert.ground(None, [k])[0] for k in keys]
    again = SimulatedExpert(truth, seed=7, domain="synth_A").ground(None, keys)
    for x in (b, c, again):
        assert [[(p.box, p.raw, p.score, p.status) for p in r] for r in a] == [
            [(p.box, p.raw, p.score, p.status) for p in r] for r in x
        ]
    other = SimulatedExpert(truth, seed=8, domain="synth_A").ground(None, keys)
    assert [r[2].box for r in a] != [r[2].box for r in other]
    # a single part asked alone answers like the part in the full query
    legs_only = expert.ground(None, keys, parts=("legs",))
    assert [r[0].raw for r in legs_only] == [r[2].raw for r in a]


def test_boxes_in_pixels_of_the_image_given(expert):
    key = expert.keys[3]
    full = expert.ground([Image.new("RGB", (128, 256))], [key])[0]
    half = expert.ground([Image.new("RGB", (64, 128))], [key])[0]
    for f, h in zip(full, half):
        if f.box is not None:
            np.testing.assert_allclose(np.array(h.box), np.array(f.box) / 2, atol=1e-9)


def test_unknown_key_and_bad_arguments(expert, truth):
    with pytest.raises(UnknownKeyError, match="synth_A/nope.jpg"):
        expert.ground(None, ["synth_A/nope.jpg"])
    with pytest.raises(ValueError, match="keys"):
        expert.ground([Image.new("RGB", (128, 256))])
    with pytest.raises(ValueError, match="sum to <= 1"):
        SimulatedExpert(truth, domain="synth_A", rates={"missing": 0.6, "oversplit": 0.6})
    with pytest.raises(ValueError, match="unknown failure mode"):
        SimulatedExpert(truth, domain="synth_A", rates={"hallucinate": 0.1})
    with pytest.raises(DatasetError, match="domain"):
        SimulatedExpert(truth)  # a bare table needs to know its domain


def test_configurable_rates_and_hidden_parts():
    truth = make_truth(800, seed=3)
    truth.loc[truth["part"] == "head", "visible"] = 0.0
    ex = SimulatedExpert(truth, seed=1, domain="synth_A", rates={"missing": 0.0, "whole_person": {"legs": 0.5}})
    res = ex.ground(None, ex.keys)
    assert all(failure_mode(r[0].raw) == "not_visible" for r in res if r[0].box is None)
    assert 0.4 < np.mean([failure_mode(r[0].raw) == "not_visible" for r in res]) < 0.6  # hidden_miss = 0.5
    legs = pd.Series([failure_mode(r[2].raw) for r in res])
    assert abs((legs == "whole_person").mean() - 0.5) < 0.07
    assert (legs == "missing").sum() == 0


def test_loads_synthetic_root_and_registry(tmp_path):
    for dom, seed in (("synth_A", 0), ("synth_B", 1)):
        (tmp_path / dom).mkdir()
        make_truth(5, seed=seed).to_parquet(tmp_path / dom / "part_boxes.parquet")
    ex = get_backend("synthetic", truth=str(tmp_path), seed=0)
    assert isinstance(ex, SimulatedExpert) and ex.name == "synthetic"
    assert len(ex.keys) == 10 and {k.split("/")[0] for k in ex.keys} == {"synth_A", "synth_B"}
    assert ex.keys[0].startswith("synth_A/bounding_box_train/")
    one = SimulatedExpert(tmp_path / "synth_B", seed=0)  # a domain folder alone
    assert all(k.startswith("synth_B/") for k in one.keys)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no part_boxes.parquet"):
        SimulatedExpert(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no such"):
        SimulatedExpert(tmp_path / "nothing")
