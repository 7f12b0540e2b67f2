"""The part-mask explorer: pure functions, hand-made data, a trained tiny model, the widgets, notebook 08."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_run_config
import torch

from muva_core.config import RunConfig
from muva_core.data.datasets import read_image
from muva_core.data.samples import PARTS, Sample
from muva_core.eval.masks import mask_iou
from muva_core.grounding.voting import MaskStore, truth_patch_masks
from muva_core.notebook import part_mask_explorer
from muva_core.viz.explorer import (
    ExplorerState,
    PartMaskExplorer,
    blend_parts,
    file_identity,
    identity_caption,
    layer_probabilities,
    part_iou,
    render_view,
    select_layer,
    select_parts,
    threshold_masks,
)

ROOT = Path(__file__).resolve().parents[1]
GRID = (16, 8)
N = GRID[0] * GRID[1]


def rows_mask(first: int, last: int) -> np.ndarray:
    """A [Npatch] mask of whole patch rows first..last (inclusive) of the 16 x 8 grid."""
    m = np.zeros(GRID, dtype=np.uint8)
    m[first:last + 1] = 1
    return m.reshape(-1)


# ---------------------------------------------------------------------------- pure functions
def test_select_layer_is_one_based_with_last():
    probs = np.arange(3 * 2 * 4, dtype=float).reshape(3, 2, 4)
    np.testing.assert_array_equal(select_layer(probs, 1), probs[0])
    np.testing.assert_array_equal(select_layer(probs, 2), probs[1])
    np.testing.assert_array_equal(select_layer(probs, "last"), probs[2])
    np.testing.assert_array_equal(select_layer(probs, 3), probs[2])
    for bad in (0, 4, "first", True, 1.5):
        with pytest.raises(ValueError, match="layer must be 1..3"):
            select_layer(probs, bad)
    with pytest.raises(ValueError, match=r"\[L, P, Npatch\]"):
        select_layer(probs[0], 1)


def test_select_parts_one_or_all_and_subsets():
    masks = np.arange(12).reshape(3, 4)
    names, m = select_parts(masks, "upper")
    assert names == ("upper",) and m.tolist() == [[4, 5, 6, 7]]
    names, m = select_parts(masks, "all")
    assert names == PARTS and m.shape == (3, 4)
    names, m = select_parts(masks[[0, 2]], "legs", parts=("head", "legs"))
    assert names == ("legs",) and m.tolist() == [[8, 9, 10, 11]]
    with pytest.raises(ValueError, match="part must be one of"):
        select_parts(masks[[0, 2]], "upper", parts=("head", "legs"))
    with pytest.raises(ValueError, match="masks must be"):
        select_parts(masks, "head", parts=("head", "legs"))


def test_threshold_is_strictly_greater_and_moves_the_mask():
    p = np.array([0.2, 0.5, 0.7])
    assert threshold_masks(p, 0.5).tolist() == [False, False, True]
    assert threshold_masks(p, 0.1).tolist() == [True, True, True]
    assert threshold_masks(p, 0.7).tolist() == [False, False, False]
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        threshold_masks(p, 1.5)


def test_part_iou_on_hand_made_masks():
    pred = np.array([[0.9, 0.9, 0.1, 0.1],     # {0, 1} vs {1, 2}: 1 / 3
                     [0.9, 0.9, 0.9, 0.1],     # identical: 1
                     [0.1, 0.1, 0.1, 0.1],     # both empty: NaN
                     [0.9, 0.1, 0.1, 0.1]])    # disjoint: 0
    target = np.array([[0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    iou = part_iou(pred, target, 0.5)
    np.testing.assert_allclose(iou[[0, 1, 3]], [1 / 3, 1.0, 0.0], atol=1e-6)
    assert np.isnan(iou[2])
    # the same numbers as the training-time metric where the union is non-empty
    batch = mask_iou(torch.tensor(pred)[None], torch.tensor(target)[None], 0.5).numpy()
    np.testing.assert_allclose(iou[[0, 1, 3]], batch[[0, 1, 3]], atol=1e-6)
    # a lower threshold grows the first mask to {0, 1, 2, 3}: 2 / 4
    assert part_iou(pred, target, 0.05)[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must both be"):
        part_iou(pred, target[:2], 0.5)


def test_blend_parts_colours_only_the_masked_patches():
    image = np.full((256, 128, 3), 100, dtype=np.uint8)
    assert (blend_parts(image, np.zeros((1, N)), ("legs",), GRID) == image).all()
    out = blend_parts(image, rows_mask(0, 0)[None], ("legs",), GRID, alpha=1.0)
    assert tuple(out[0, 0]) == (0xD6, 0x27, 0x28)           # PART_COLOURS["legs"]
    assert (out[16:] == 100).all()


# ---------------------------------------------------------------------------- hand-made explorer
def _write_png(path: Path, size=(128, 256)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def toy_explorer(tmp_path) -> PartMaskExplorer:
    """Two images: one with pseudo labels and ground truth (train), one with ground truth only (query)."""
    a = Sample(str(_write_png(tmp_path / "toy/train/a.png")), 1, 0, "toy", "train/a.png")
    b = Sample(str(_write_png(tmp_path / "toy/query/b.png", (64, 128))), 2, 1, "toy", "query/b.png")
    pseudo = np.stack([rows_mask(0, 1), rows_mask(2, 7), rows_mask(8, 15)])[None]
    store = MaskStore([a.key], pseudo, {"grid": list(GRID)})
    nan = float("nan")
    truth = pd.DataFrame([
        # a: head rows 0-2 (patch centres 8, 24, 40 px), upper rows 3-7, legs not visible
        dict(key=a.key, part="head", x0=0, y0=0, x1=128, y1=48, img_w=128, img_h=256),
        dict(key=a.key, part="upper", x0=0, y0=48, x1=128, y1=128, img_w=128, img_h=256),
        dict(key=a.key, part="legs", x0=nan, y0=nan, x1=nan, y1=nan, img_w=128, img_h=256),
        # b: drawn at half the input size
        dict(key=b.key, part="head", x0=0, y0=0, x1=64, y1=24, img_w=64, img_h=128),
    ])
    return PartMaskExplorer({"toy/train": [a], "toy/query": [b], "toy/empty": []}, masks=store, truth=truth)


def test_mask_file_only_explorer_on_hand_made_masks(toy_explorer):
    ex = toy_explorer
    assert not ex.has_model and ex.n_layers == 0 and ex.layer_choices == ["last"]
    assert list(ex.splits) == ["toy/train", "toy/query"]            # empty splits dropped
    assert ex.part_choices == ["head", "upper", "legs", "all"]
    view = ex.view(ExplorerState("toy/train"))
    assert view.predicted is None and view.pseudo.shape == (3, N) and view.truth.shape == (3, N)
    assert list(view.iou.columns) == ["pseudo vs truth"]
    iou = view.iou["pseudo vs truth"]
    # head 16 of 24 truth patches; upper 40 truth patches inside 48; legs: 64 pseudo patches, no truth
    np.testing.assert_allclose(iou[["head", "upper", "legs", "mean"]], [16 / 24, 40 / 48, 0.0, 0.5], atol=1e-6)
    legs = ex.view(ExplorerState("toy/train", part="legs"))
    assert legs.parts == ("legs",) and legs.pseudo.shape == (1, N) and legs.truth_boxes == {"legs": None}
    assert legs.shown_iou("pseudo vs truth") == pytest.approx(0.0)
    fig = render_view(view)
    assert len(fig.axes) == 2                                         # pseudo label, ground truth
    # the query image: ground truth only, its box scaled from 64 x 128 to the 128 x 256 input
    q = ex.view(ExplorerState("toy/query", part="head"))
    assert q.pseudo is None and q.truth_boxes == {"head": (0.0, 0.0, 128.0, 48.0)}
    assert q.truth[0].sum() == 24 and q.iou.columns.empty
    assert len(render_view(q).axes) == 1


def test_state_is_validated(toy_explorer):
    ex = toy_explorer
    for bad, match in ((ExplorerState("nope"), "unknown split"), (ExplorerState("toy/train", layer=1), "layer"),
                       (ExplorerState("toy/train", part="arms"), "part"),
                       (ExplorerState("toy/train", threshold=2.0), "threshold"),
                       (ExplorerState("toy/train", mode="fancy"), "mode")):
        with pytest.raises(ValueError, match=match):
            ex.view(bad)
    with pytest.raises(IndexError, match="out of range"):
        ex.view(ExplorerState("toy/train", index=1))
    with pytest.raises(ValueError, match="needs a trained model, a pseudo-label mask file, or both"):
        PartMaskExplorer({"toy/train": ex.splits["toy/train"]})


def test_a_model_with_fewer_parts_shows_only_those(toy_explorer):
    from muva_core.data.transforms import build_test_transform
    from muva_core.model.factory import build_muva
    from muva_core.viz.explorer import PredictedMasks

    cfg = RunConfig().update({"backbone": "tiny", "pretrained": "none", "granularity": "G+H+L", "vision_only": True})
    encoder = build_muva(cfg, num_classes=3).model.encoder
    ex = PartMaskExplorer(toy_explorer.splits, predictor=PredictedMasks(encoder, build_test_transform()),
                          masks=toy_explorer.masks, truth=toy_explorer._truth.reset_index(drop=True))
    assert ex.parts == ("head", "legs") and ex.part_choices == ["head", "legs", "all"]
    assert ex.n_layers == 2 and ex.layer_choices == ["last", 1, 2]
    view = ex.view(ExplorerState("toy/train", layer=1))
    assert view.parts == ("head", "legs") and view.predicted.shape == (2, N)
    np.testing.assert_array_equal(view.pseudo, toy_explorer.masks.masks[0, [0, 2]])     # head and legs channels
    assert list(view.iou.index) == ["head", "legs", "mean"]
    np.testing.assert_allclose(view.iou.loc[["head", "legs"], "pseudo vs truth"], [16 / 24, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="part must be one of"):
        ex.view(ExplorerState("toy/train", part="upper"))
    assert len(render_view(view).axes) == 3


def _drawn_texts(fig) -> list:
    """The text artists a render draws: figure title, legends, panel titles, texts, and the tick labels
    of axes that are shown (the explorer's panels have their axes off)."""
    fig.canvas.draw()
    texts = [fig._suptitle] + list(fig.texts)
    for legend in fig.legends:
        texts += [legend.get_title(), *legend.get_texts()]
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        if ax.axison:
            texts += ax.get_xticklabels() + ax.get_yticklabels() + [ax.xaxis.label, ax.yaxis.label]
    return [t for t in texts if t is not None and t.get_visible() and t.get_text().strip()]


def test_render_has_a_part_colour_legend_and_is_readable_at_100_percent(toy_explorer):
    from matplotlib.colors import to_hex
    from PIL import Image

    from muva_core.viz.explorer import figure_png
    from muva_core.viz.plots import PART_COLOURS

    for state in (ExplorerState("toy/train"), ExplorerState("toy/train", part="legs"),
                  ExplorerState("toy/query", part="head")):
        view = toy_explorer.view(state)
        fig = render_view(view)
        assert len(fig.legends) == 1
        legend = fig.legends[0]
        assert [t.get_text() for t in legend.get_texts()] == list(view.parts)
        assert [to_hex(h.get_facecolor(), keep_alpha=False) for h in legend.legend_handles] == \
            [PART_COLOURS[p] for p in view.parts]
        texts = _drawn_texts(fig)
        assert len(texts) >= 1 + len(fig.axes)                       # title, panel titles, legend
        assert min(t.get_fontsize() for t in texts) >= 10, [(t.get_text(), t.get_fontsize()) for t in texts]
        # at 100 dpi (the widget's PNG): a panel at least 250 x 500 pixels for the 128 x 256 input
        width, height = Image.open(__import__("io").BytesIO(figure_png(fig))).size
        assert height >= 600 and width >= 250 * len(fig.axes)


def test_file_identity_reads_the_file_names_ids():
    market = Sample("/d/Market-1501-v15.09.15/bounding_box_train/0002_c3s1_000451_03.jpg", 0, 2, "market1501",
                    "bounding_box_train/0002_c3s1_000451_03.jpg")
    assert file_identity(market) == (2, 3)
    assert identity_caption(market) == "pid 2, camera 3"
    duke = Sample("/d/x.jpg", 5, 1, "dukemtmcreid", "query/0005_c2_f0046985.jpg")
    assert file_identity(duke) == (5, 2)
    msmt = Sample("/d/MSMT17_V1/train/0011/0011_013_05_0303noon_1000_0.jpg", 3, 4, "msmt17",
                  "train/0011/0011_013_05_0303noon_1000_0.jpg")
    assert file_identity(msmt) == (11, 5)
    cuhk = Sample("/d/cuhk03-np/detected/bounding_box_train/0001_c2_6.png", 0, 1, "cuhk03_np",
                  "detected/bounding_box_train/0001_c2_6.png")
    assert file_identity(cuhk) == (1, 2)
    synth = Sample("/d/synth_A/bounding_box_train/0007_c4s1_000012_00.jpg", 6, 3, "synth_A",
                   "bounding_box_train/0007_c4s1_000012_00.jpg")
    assert file_identity(synth) == (7, 4)
    unknown = Sample("/d/toy/train/a.png", 1, 0, "toy", "train/a.png")
    assert file_identity(unknown) is None
    assert identity_caption(unknown) == "label pid 1, camid 0 (no ids in the file name)"


def test_widget_displays_with_a_static_png(toy_explorer):
    """The executed copy of the notebook is not trusted, so JupyterLab renders no widget in it (the widget
    renderer is not 'safe'): the display bundle carries the image as image/png beside the widget view."""
    import base64

    from IPython.core.formatters import DisplayFormatter

    box = toy_explorer.widget(ExplorerState("toy/train"))
    bundle, _ = DisplayFormatter().format(box)
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == box.model_id
    png = base64.b64decode(bundle["image/png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == bytes(toy_explorer.image_widget.value)
    assert "VBox(" not in bundle["text/plain"] and "toy/train/a.png" in bundle["text/plain"]
    toy_explorer.controls["part"].value = "legs"                       # the PNG follows the controls
    assert base64.b64decode(DisplayFormatter().format(box)[0]["image/png"]) == bytes(toy_explorer.image_widget.value)
    assert base64.b64decode(DisplayFormatter().format(box)[0]["image/png"]) != png


# ---------------------------------------------------------------------------- a trained tiny model
def tiny_cfg(synth_root: Path, folder: Path, cache: Path) -> RunConfig:
    return tiny_run_config(synth_root, folder, cache, stage1_epochs=1, stage1_warmup_epochs=0,
                           stage2_epochs=1, warmup_epochs=0)


@pytest.fixture(scope="module")
def trained(small_synth_root, tmp_path_factory) -> RunConfig:
    from muva_core.runs import train_protocol

    tmp = tmp_path_factory.mktemp("explorer")
    cfg = tiny_cfg(small_synth_root, tmp / "run", tmp / "cache")
    train_protocol(cfg, progress=False)
    return cfg


@pytest.fixture(scope="module")
def explorer(trained) -> PartMaskExplorer:
    return PartMaskExplorer.from_run(trained.run_dir, device="cpu")


def test_from_run_probabilities_match_the_evaluation_path(trained, explorer):
    from muva_core.eval.features import extract_features

    ex = explorer
    assert ex.has_model and ex.n_layers == 2 and ex.parts == PARTS and ex.layer_choices == ["last", 1, 2]
    assert {"synth_A/train", "synth_B/query", "synth_B/gallery"} <= set(ex.splits)
    assert ex.state.split == "synth_A/train"                       # the first split with pseudo labels
    query = ex.splits["synth_B/query"][:3]
    encoder = ex.predictor.encoder
    _, probs = extract_features(encoder, query, trained, torch.device("cpu"), return_masks=True, progress=False)
    for i, s in enumerate(query):
        np.testing.assert_allclose(ex.probabilities(s, "last"), probs[i].numpy(), atol=1e-5)
    # layer 1 is the first residual mask predictor's own scores (before the running sum of layer 2)
    image = ex.predictor.transform(read_image(query[0].path))[0]
    with torch.no_grad():
        out = encoder(image[None], mask_mode="predicted")
    np.testing.assert_allclose(ex.probabilities(query[0], 1), out.mask_logits[0][0].sigmoid().numpy(), atol=1e-5)
    assert not np.allclose(ex.probabilities(query[0], 1), ex.probabilities(query[0], "last"))
    np.testing.assert_allclose(layer_probabilities(encoder, image[None])[0, 1], ex.probabilities(query[0]), atol=1e-6)


def test_probabilities_are_cached_per_image(explorer):
    ex = explorer
    a, b = ex.splits["synth_A/train"][5], ex.splits["synth_A/train"][6]
    ex.view(ExplorerState("synth_A/train", index=5))
    before = ex.predictor.computed
    for state in (ExplorerState("synth_A/train", index=5, layer=1, part="legs", threshold=0.2),
                  ExplorerState("synth_A/train", index=5, mode="soft")):
        ex.view(state)
    assert ex.predictor.computed == before
    ex.probabilities(b)
    assert ex.predictor.computed == before + 1 and a.key != b.key


def test_iou_table_against_pseudo_labels_and_ground_truth(trained, explorer):
    from muva_core.grounding.simulated import load_truth

    ex = explorer
    s = ex.splits["synth_A/train"][0]
    table = ex.iou_table(s, "last", 0.5)
    assert list(table.columns) == ["predicted vs pseudo", "predicted vs truth", "pseudo vs truth"]
    assert list(table.index) == ["head", "upper", "legs", "mean"]
    probs = ex.probabilities(s)
    np.testing.assert_allclose(table.loc[list(PARTS), "predicted vs pseudo"], part_iou(probs, ex.masks[s.key], 0.5))
    truth = truth_patch_masks(load_truth(Path(trained.data.synth_root) / "synth_A"), [s.key], (256, 128), 16)[0]
    np.testing.assert_allclose(table.loc[list(PARTS), "predicted vs truth"], part_iou(probs, truth, 0.5))
    assert table.loc["mean", "pseudo vs truth"] == pytest.approx(np.nanmean(part_iou(ex.masks[s.key], truth)))
    assert np.nanmin(table.to_numpy()) >= 0 and np.nanmax(table.to_numpy()) <= 1
    # target images have ground truth but no pseudo labels
    q = ex.splits["synth_B/query"][0]
    assert list(ex.iou_table(q).columns) == ["predicted vs truth"]
    assert len(ex.render(ExplorerState("synth_B/query")).axes) == 2
    assert len(ex.render(ExplorerState("synth_A/train")).axes) == 3


def test_threshold_layer_and_part_change_the_render(explorer):
    ex = explorer
    state = ExplorerState("synth_A/train", index=1, part="legs")
    png = ex.render_png(state)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == ex.render_png(state)      # deterministic bytes
    median = float(np.median(ex.probabilities(ex.splits["synth_A/train"][1])[2]))
    moved = state.replace(threshold=round(median, 3))
    assert not np.array_equal(threshold_masks(ex.view(state).predicted, 0.5),
                              threshold_masks(ex.view(moved).predicted, moved.threshold))
    assert ex.render_png(moved) != png
    assert ex.render_png(state.replace(layer=1)) != png
    assert ex.render_png(state.replace(part="head")) != png
    assert ex.render_png(state.replace(mode="soft")) != png


def test_widget_slider_changes_the_png(explorer):
    import ipywidgets as widgets

    ex = explorer
    box = ex.widget(ExplorerState("synth_A/train", index=2, part="all"))
    assert isinstance(box, widgets.VBox)
    c = ex.controls
    assert set(c) == {"split", "index", "layer", "part", "threshold", "mode"}
    assert isinstance(ex.image_widget, widgets.Image) and ex.image_widget.format == "png"
    first = bytes(ex.image_widget.value)
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and "predicted vs pseudo" in ex.iou_widget.value
    probs = ex.probabilities(ex.splits["synth_A/train"][2])
    c["threshold"].value = round(float(np.median(probs)), 2)
    assert ex.state.threshold == c["threshold"].value
    assert bytes(ex.image_widget.value) != first
    c["threshold"].value = 0.5
    assert bytes(ex.image_widget.value) == first
    c["layer"].value = 1
    assert ex.state.layer == 1 and bytes(ex.image_widget.value) != first
    c["split"].value = "synth_B/query"
    assert c["index"].value == 0 and c["index"].max == len(ex.splits["synth_B/query"]) - 1
    assert ex.state.split == "synth_B/query"
    assert "predicted vs truth" in ex.iou_widget.value and "predicted vs pseudo" not in ex.iou_widget.value
    c["index"].value = 1
    assert ex.splits["synth_B/query"][1].key in ex.caption_widget.value


def test_caption_and_title_show_the_files_own_pid_and_camera(explorer):
    """Not the 0-based training label: the identity and camera the file name gives."""
    import re

    ex = explorer
    ex.widget(ExplorerState("synth_A/train"))
    train = ex.splits["synth_A/train"]
    index = next(i for i, s in enumerate(train) if int(Path(s.relpath).name[:4]) != s.pid)
    sample = train[index]
    match = re.match(r"^(\d+)_c(\d+)", Path(sample.relpath).name)
    pid, camera = int(match.group(1)), int(match.group(2))
    assert (pid, camera) != (sample.pid, sample.camid)
    ex.controls["index"].value = index
    caption = ex.caption_widget.value
    assert f"pid {pid}, camera {camera}" in caption and sample.key in caption
    assert f"pid {sample.pid}," not in caption
    fig = ex.render(ExplorerState("synth_A/train", index=index))
    assert f"pid {pid}, camera {camera}" in fig._suptitle.get_text()
    assert Path(sample.relpath).name in fig._suptitle.get_text()
    # a query image (original ids on the sample already): the same ids, camera 1-based as in the name
    q = ex.splits["synth_B/query"][0]
    qid = re.match(r"^(\d+)_c(\d+)", Path(q.relpath).name)
    assert file_identity(q) == (int(qid.group(1)), int(qid.group(2))) == (q.pid, q.camid + 1)


def test_from_masks_and_from_config(trained, tmp_path):
    ex = PartMaskExplorer.from_masks(trained)
    assert not ex.has_model and ex.source.startswith("pseudo labels")
    s = ex.splits["synth_A/train"][3]
    view = ex.view(ExplorerState("synth_A/train", index=3))
    np.testing.assert_array_equal(view.pseudo, ex.masks[s.key])
    assert list(view.iou.columns) == ["pseudo vs truth"]
    ex.widget()
    assert ex.controls["threshold"].disabled and ex.image_widget.value[:4] == b"\x89PNG"
    assert part_mask_explorer(trained).has_model
    other = RunConfig().update({**trained.to_flat(), "run_dir": str(tmp_path / "no-model")})
    with pytest.raises(FileNotFoundError, match="run folder not found"):     # a run_dir given must exist
        part_mask_explorer(other)
    (tmp_path / "no-model").mkdir()                                          # a run folder of notebooks 01-03
    assert not part_mask_explorer(other).has_model
    with pytest.raises(FileNotFoundError, match="no pseudo-label mask file for synth_A"):
        PartMaskExplorer.from_masks(RunConfig().update({**other.to_flat(), "cache_dir": str(tmp_path / "empty")}))
    with pytest.raises(FileNotFoundError, match="no trained model"):
        PartMaskExplorer.from_run(tmp_path)


@pytest.mark.slow
def test_notebook_runs_under_papermill(trained, tmp_path):
    import nbformat
    import papermill as pm

    from muva_core.notebook import read_record

    out = tmp_path / "08.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "08_part_mask_explorer.ipynb"), str(out),
                        parameters={"run_dir": trained.run_dir, "device": "cpu"}, progress_bar=False, cwd=str(ROOT),
                        kernel_name="python3")
    rec = read_record(trained.run_dir, "08_part_mask_explorer")
    assert rec["source"] == "model" and rec["layers"] == 2 and rec["image"].startswith("synth_A/")
    assert set(rec["iou"]) == {"predicted vs pseudo", "predicted vs truth", "pseudo vs truth"}
    assert rec["splits"]["synth_B/query"] > 0
    assert (Path(trained.run_dir) / "figures" / "08_part_mask_explorer.png").stat().st_size > 5000
    nb = nbformat.read(str(out), as_version=4)
    mimes = {k for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) for k in o.get("data", {})}
    assert "application/vnd.jupyter.widget-view+json" in mimes and "image/png" in mimes
    _assert_executed_copy_shows_the_explorer(nb)


def _assert_executed_copy_shows_the_explorer(nb) -> None:
    """An executed copy (untrusted: JupyterLab renders no widget there) still shows the explorer: the
    widget's output carries the rendered figure as image/png, and the widgets' state is saved."""
    import base64

    widget_outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                      if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widget_outputs, "no widget output in the executed notebook"
    for o in widget_outputs:
        assert "image/png" in o["data"], f"the widget output has only {sorted(o['data'])}"
        png = base64.b64decode(o["data"]["image/png"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert not o["data"]["text/plain"].startswith("VBox(")
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any(m["model_name"] == "ImageModel" for m in state.values())
