"""Answer parsing and box sanitising shared by the grounding backends (muva_core.grounding.boxes)."""
from __future__ import annotations

import math

import pytest

from muva_core.grounding.base import PartBox
from muva_core.grounding.boxes import (
    STRIPE_WINDOWS,
    choose_box,
    join_status,
    parse_cogvlm_boxes,
    parse_florence_locations,
    rel1000_to_pixels,
    sanitize_box,
    stripe_box,
)

W, H = 64, 128


# ----------------------------------------------------------------------------- sanitize_box
def test_sanitize_valid_box_is_unchanged():
    assert sanitize_box((1, 2, 30, 100), W, H) == ((1.0, 2.0, 30.0, 100.0), "ok")


def test_sanitize_swaps_inverted_corners():
    box, status = sanitize_box((30, 100, 1, 2), W, H)
    assert box == (1.0, 2.0, 30.0, 100.0)
    assert status == "inverted"
    box, status = sanitize_box((1, 100, 30, 2), W, H)  # only y inverted
    assert box == (1.0, 2.0, 30.0, 100.0) and status == "inverted"


def test_sanitize_clips_to_image():
    box, status = sanitize_box((-5, -1, 70, 200), W, H)
    assert box == (0.0, 0.0, float(W), float(H))
    assert status == "clipped"


def test_sanitize_inverted_and_clipped_flags_combine():
    box, status = sanitize_box((70, 10, 10, -3), W, H)
    assert box == (10.0, 0.0, float(W), 10.0)
    assert status == "inverted+clipped"


@pytest.mark.parametrize(
    "bad, expected",
    [
        ((5, 5, 5, 50), "degenerate"),  # zero width
        ((5, 5, 50, 5.5), "degenerate"),  # thinner than one pixel
        ((100, 10, 120, 50), "clipped+degenerate"),  # entirely right of the image
    ],
)
def test_sanitize_degenerate_boxes_are_dropped(bad, expected):
    assert sanitize_box(bad, W, H) == (None, expected)


@pytest.mark.parametrize("bad", [None, (1, 2, 3), (1, 2, 3, 4, 5), ("a", 1, 2, 3), (0, 0, math.nan, 5), 17])
def test_sanitize_non_boxes_are_parse_errors(bad):
    assert sanitize_box(bad, W, H) == (None, "parse_error")


def test_join_status_drops_ok_and_repeats():
    assert join_status("ok", "multiple", "clipped+multiple", "") == "multiple+clipped"
    assert join_status("ok", "") == "ok"


# ------------------------------------------------------------------------------- choose_box
def test_choose_box_no_candidates_is_missing():
    pb = choose_box("head", [], W, H)
    assert isinstance(pb, PartBox) and pb.box is None and pb.status == "missing" and pb.score == 0.0


def test_choose_box_single_candidate():
    pb = choose_box("legs", [(0, 60, 64, 128)], W, H, raw="x")
    assert pb.box == (0.0, 60.0, 64.0, 128.0) and pb.status == "ok" and pb.raw == "x" and pb.score == 1.0


def test_choose_box_highest_score_wins():
    cands = [(0, 0, 60, 120), (10, 10, 20, 20)]
    pb = choose_box("head", cands, W, H, scores=[0.2, 0.9])
    assert pb.box == (10.0, 10.0, 20.0, 20.0)
    assert pb.score == pytest.approx(0.9)
    assert pb.status == "multiple"
    assert len(pb.candidates) == 2


def test_choose_box_score_ties_go_to_the_largest_area():
    cands = [(10, 10, 20, 20), (0, 0, 40, 40), (5, 5, 30, 30)]
    assert choose_box("upper", cands, W, H, scores=[0.5, 0.5, 0.5]).box == (0.0, 0.0, 40.0, 40.0)
    assert choose_box("upper", cands, W, H).box == (0.0, 0.0, 40.0, 40.0)  # no scores: largest


def test_choose_box_skips_unusable_candidates_and_keeps_the_chosen_flags():
    cands = [(5, 5, 5, 5), (50, 10, 10, 300)]  # degenerate, then inverted + clipped
    pb = choose_box("legs", cands, W, H, scores=[0.99, 0.1])
    assert pb.box == (10.0, 10.0, 50.0, float(H))
    assert pb.status == "multiple+inverted+clipped"
    assert pb.score == pytest.approx(0.1)


def test_choose_box_all_unusable_is_missing_with_reason():
    pb = choose_box("head", [(5, 5, 5, 5)], W, H)
    assert pb.box is None and pb.status == "degenerate"
    pb = choose_box("head", [(1, 2, 3)], W, H)
    assert pb.box is None and pb.status == "parse_error"


def test_choose_box_union_and_first_rules():
    cands = [(0, 70, 20, 128), (30, 72, 60, 126)]  # two legs
    assert choose_box("legs", cands, W, H, rule="union").box == (0.0, 70.0, 60.0, 128.0)
    assert choose_box("legs", cands, W, H, rule="first").box == (0.0, 70.0, 20.0, 128.0)


@pytest.mark.parametrize("scores", [[0.1], ["x", 0.2], None])
def test_choose_box_never_raises_on_bad_scores(scores):
    pb = choose_box("head", [(0, 0, 10, 10), (0, 0, 20, 20)], W, H, scores=scores)
    assert pb.box == (0.0, 0.0, 20.0, 20.0)  # scores ignored -> largest


def test_choose_box_never_raises_on_junk_candidates():
    pb = choose_box("head", [None, "abc", (0, 0, 10, 10)], W, H)
    assert pb.box == (0.0, 0.0, 10.0, 10.0) and "multiple" in pb.status


# ------------------------------------------------------------------------- CogVLM answers
@pytest.mark.parametrize(
    "text, expected",
    [
        ("[[302,113,508,289]]", [[(302, 113, 508, 289)]]),
        ("the head of the person[[302,113,508,289]]", [[(302, 113, 508, 289)]]),
        ("[[1,2,3,4;5,6,7,8]]", [[(1, 2, 3, 4), (5, 6, 7, 8)]]),
        ("a [[001,002,003,004]] b [[010,020,030,040]] c", [[(1, 2, 3, 4)], [(10, 20, 30, 40)]]),
        ("[[ 1 , 2 , 3 , 4 ]]", [[(1, 2, 3, 4)]]),
        ("[[1,2,3,4],[5,6,7,8]]", [[(1, 2, 3, 4), (5, 6, 7, 8)]]),
        ("[[1,2,3;5,6,7,8]]", [[(5, 6, 7, 8)]]),  # malformed box skipped
        ("[[1,2,3]] and [[4,5,6,7]]", [[(4, 5, 6, 7)]]),  # malformed group dropped
        ("[[1,2,3,1200]]", [[(1, 2, 3, 1200)]]),  # no range check here
        ("", []),
        ("no boxes here", []),
        ("[[a,b,c,d]]", []),
        ("[302,113,508,289]", []),  # single brackets are not the format
        (None, []),
    ],
)
def test_parse_cogvlm_boxes(text, expected):
    assert parse_cogvlm_boxes(text) == expected


def test_rel1000_to_pixels():
    assert rel1000_to_pixels((0, 500, 999, 1000), 64, 128) == pytest.approx((0.0, 64.0, 63.936, 128.0))


# ------------------------------------------------------------------------- Florence-2 answers
def test_parse_florence_locations_bins_to_centres():
    boxes = parse_florence_locations("</s><s>head<loc_0><loc_0><loc_999><loc_499></s>", 100, 200)
    assert boxes == [pytest.approx((0.05, 0.1, 99.95, 99.9))]


def test_parse_florence_locations_several_boxes_and_leftovers():
    text = "legs<loc_10><loc_500><loc_400><loc_990><loc_600><loc_500><loc_900><loc_990><loc_1><loc_2>"
    boxes = parse_florence_locations(text, 1000, 1000)
    assert boxes == [pytest.approx((10.5, 500.5, 400.5, 990.5)), pytest.approx((600.5, 500.5, 900.5, 990.5))]
    assert parse_florence_locations("no locations", 10, 10) == []
    assert parse_florence_locations(None, 10, 10) == []


# ------------------------------------------------------------------------------- stripes
def test_stripe_windows_cover_top_middle_bottom():
    head, upper, legs = (stripe_box(p, W, H) for p in ("head", "upper", "legs"))
    assert head[1] == 0.0 and legs[3] == float(H)
    assert head[1] < upper[1] < legs[1] and head[3] < upper[3] < legs[3]
    assert all(b[0] == 0.0 and b[2] == float(W) for b in (head, upper, legs))
    assert set(STRIPE_WINDOWS) == {"head", "upper", "legs"}
    with pytest.raises(ValueError, match="stripe window"):
        stripe_box("arms", W, H)
