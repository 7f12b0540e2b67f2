"""The colour-histogram baselines (muva_core.eval.baselines): shapes, normalisation, stripes, file errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from muva_core.data.datasets import ImageReadError
from muva_core.data.samples import Sample
from muva_core.eval.baselines import colour_histogram, extract_histograms


def _two_tone(top=(255, 0, 0), bottom=(0, 0, 255), size=(256, 128)) -> Image.Image:
    """An image whose top half is one colour and bottom half another, (height, width) = ``size``: the
    histograms' own size, so the resize blends no colours at the boundary."""
    a = np.zeros((*size, 3), dtype=np.uint8)
    a[: size[0] // 2] = top
    a[size[0] // 2:] = bottom
    return Image.fromarray(a)


def test_global_histogram_is_unit_norm_and_mixes_the_halves():
    f = colour_histogram(_two_tone(), bins=8, stripes=1)
    assert f.shape == (3 * 8,) and f.dtype == np.float32
    assert np.linalg.norm(f) == pytest.approx(1.0, abs=1e-6)
    hue = f[:8]
    assert np.count_nonzero(hue) == 2  # red and blue hues, half the pixels each
    assert hue[hue > 0][0] == pytest.approx(hue[hue > 0][1])


def test_stripes_separate_the_halves_and_one_colour_gives_the_global_histogram_per_stripe():
    f = colour_histogram(_two_tone(), bins=4, stripes=2)
    assert f.shape == (2 * 3 * 4,)
    top, bottom = f[:12], f[12:]
    assert np.count_nonzero(top[:4]) == 1 and np.count_nonzero(bottom[:4]) == 1
    assert np.argmax(top[:4]) != np.argmax(bottom[:4])  # red and blue fall in different hue bins
    plain = _two_tone(top=(0, 200, 0), bottom=(0, 200, 0))
    one, three = colour_histogram(plain, bins=4, stripes=1), colour_histogram(plain, bins=4, stripes=3)
    np.testing.assert_allclose(three, np.tile(one, 3) / np.sqrt(3), atol=1e-6)


def test_extract_histograms_stacks_per_sample_and_names_an_unreadable_file(tmp_path):
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        p = tmp_path / f"000{i}_c1s1_000001_00.jpg"
        _two_tone(top=colour, bottom=colour).save(p)
        paths.append(p)
    samples = [Sample(str(p), i, 0, "toy", p.name) for i, p in enumerate(paths)]
    feats = extract_histograms(samples, bins=8, stripes=3, progress=False)
    assert feats.shape == (3, 3 * 8 * 3) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(feats[0], feats[1])
    assert extract_histograms([], bins=8, stripes=2, progress=False).shape == (0, 48)
    missing = Sample(str(tmp_path / "gone.jpg"), 0, 0, "toy", "gone.jpg")
    with pytest.raises(ImageReadError, match="gone.jpg"):
        extract_histograms([missing], progress=False)


def test_clip_start_baseline_is_the_start_clips_image_embedding(small_synth_root, tmp_path):
    """`clip-start`: the image embedding of the CLIP a run starts from (here the tiny random-weight CLIP the run
    would build), ranked like any feature; no row while the `muva pretrain-clip` CLIP a config names is not made."""
    import torch

    from muva_core.config import resolve_config
    from muva_core.data.protocols import load_protocol
    from muva_core.eval.baselines import clip_image_features, evaluate_clip_start
    from muva_core.eval.features import test_loader
    from muva_core.eval.metrics import evaluate_features
    from muva_core.model.factory import start_clip

    cfg = resolve_config("synth:A2B", overrides={"synth_root": str(small_synth_root), "synth_scale": "small",
                                                 "backbone": "tiny", "pretrained": "none", "device": "cpu"})
    data = load_protocol(cfg, progress=False)
    row = evaluate_clip_start(data.query, data.gallery, cfg, progress=False)
    clip, _ = start_clip(cfg)                      # the same weights: built from the run's seed
    images = next(iter(test_loader(data.query[:4], cfg)))["image"]
    with torch.no_grad():
        direct = torch.nn.functional.normalize(clip.visual.eval()(images), dim=-1).numpy()
    qf = clip_image_features(clip.visual, data.query, cfg, torch.device("cpu"), progress=False)
    np.testing.assert_allclose(qf[:4], direct, atol=1e-5)
    gf = clip_image_features(clip.visual, data.gallery, cfg, torch.device("cpu"), progress=False)
    expected = evaluate_features(qf, gf, np.array([s.pid for s in data.query]), np.array([s.pid for s in data.gallery]),
                                 np.array([s.camid for s in data.query]), np.array([s.camid for s in data.gallery]))
    assert row["mAP"] == pytest.approx(expected.as_dict()["mAP"]) and row["num_valid_queries"] == len(data.query)

    missing = resolve_config("synth:A2B", overrides={"synth_root": str(small_synth_root), "synth_scale": "small",
                                                     "backbone": "tiny", "pretrained": "pretrain-clip",
                                                     "data_root": str(tmp_path)})
    assert evaluate_clip_start(data.query, data.gallery, missing, progress=False) is None
