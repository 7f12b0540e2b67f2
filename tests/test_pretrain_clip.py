"""CLIP language pretraining: data disjoint from the Re-ID domains, batches, loss, checkpoint, reuse, zero-shot."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from muva_core.data import synthetic as syn
from muva_core.data.captions import PART_NOUNS, ZERO_SHOT_ATTRIBUTES
from muva_core.data.samples import PARTS
from muva_core.model.backbone import BackboneConfig, build_clip
from muva_core.pretrain import (
    CheckpointExistsError,
    PretrainConfig,
    build_pretrain_clip,
    checkpoint_file,
    contrastive_step,
    evaluate_zero_shot,
    load_pretrain_images,
    make_batch,
    make_optimizer,
    pretrain_clip,
    read_pretrain_info,
    report_file,
    zero_shot_accuracy,
)

# a tiny run: tiny CLIP, the "small" synthetic scale of the pretraining domains (~110 training images, so
# two steps of 64), otherwise the defaults, as `muva pretrain-clip --backbone tiny --scale small --epochs 2`
TINY = dict(backbone="tiny", seed=0, epochs=2, scale="small", progress=False)


@pytest.fixture(scope="module")
def pt_root(tmp_path_factory):
    return syn.generate_synthetic(tmp_path_factory.mktemp("pretrain") / "synthetic-pretrain", seed=0, scale="small",
                                  domains=syn.PRETRAIN_DOMAINS, progress=False)


@pytest.fixture(scope="module")
def train_data(pt_root):
    return load_pretrain_images(pt_root, "train")


@pytest.fixture(scope="module")
def tiny_ckpt(pt_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    return pretrain_clip(out, synth_root=pt_root, **TINY)


def test_pretraining_domains_and_identities_are_disjoint_from_synth_a_to_d(pt_root, train_data):
    assert set(syn.PRETRAIN_DOMAINS).isdisjoint(syn.DOMAIN_STYLES)
    reid_pids = {p for scale in ("small", "default") for d in syn.DOMAIN_STYLES
                 for p in syn._plan_domain(0, d, scale)["identities"]}
    pre_pids = {p for scale in ("small", "pretrain") for d in syn.PRETRAIN_DOMAINS
                for p in syn._plan_domain(0, d, scale)["identities"]}
    assert reid_pids and pre_pids and reid_pids.isdisjoint(pre_pids)
    assert min(pre_pids) > 4000 > max(reid_pids)
    # generated files: only the pretraining domains, pids from their own blocks, other camera styles
    assert sorted(p.name for p in pt_root.glob("synth_*")) == [f"synth_{d}" for d in syn.PRETRAIN_DOMAINS]
    assert set(train_data.domains) == set(syn.PRETRAIN_DOMAINS) and train_data.pids.min() > 4000
    assert syn.camera_styles(0, "P") != syn.camera_styles(0, "A")
    # held-out identities (zero-shot report) are never trained on
    held = load_pretrain_images(pt_root, "test")
    assert set(held.pids.tolist()).isdisjoint(train_data.pids.tolist()) and len(held) > 0
    assert train_data.images.shape[1:] == (3, 256, 128) and train_data.images.dtype == torch.uint8
    with pytest.raises(ValueError, match="unknown domain"):
        syn.generate_synthetic(pt_root.parent / "x", domains=["Z"], progress=False)


def test_make_batch_pairs_part_captions_with_the_part_and_its_tokens(train_data):
    cfg = PretrainConfig(backbone="tiny", p_global=0.0, min_part_visible=0.0, keep_tokens=56)
    idx = list(range(12))
    b = make_batch(train_data, idx, np.random.default_rng(0), cfg)
    assert b.images.shape == (12, 3, 256, 128) and len(b.texts) == len(b.granularities) == 12
    assert set(b.granularities) <= set(PARTS)
    for t, g in zip(b.texts, b.granularities):
        assert f"{PART_NOUNS[g]} of a person" in t
    zero = (b.images == 0).all(dim=1)  # [B, H, W]: pixels outside the part box (plus padding)
    assert float(zero.float().mean()) > 0.3
    # 56 of the 16x8 patch tokens per image; the patches showing the part (<= 48 here) are all among them
    assert b.keep.shape == (12, 56) and int(b.keep.max()) < 128
    assert all(len(set(row.tolist())) == 56 for row in b.keep)
    tiles = (~zero).reshape(12, 16, 16, 8, 16).permute(0, 1, 3, 2, 4).reshape(12, 128, 256)
    for i in range(12):
        shown = set(torch.nonzero(tiles[i].float().mean(dim=1) > 0.5).flatten().tolist())
        assert shown <= set(b.keep[i].tolist()), f"image {i}: part patches {shown - set(b.keep[i].tolist())} dropped"
    # p_global=1: whole images, global captions, no masking; deterministic for the same rng seed
    cfg_g = PretrainConfig(backbone="tiny", p_global=1.0, keep_tokens=0)
    b1 = make_batch(train_data, idx, np.random.default_rng(5), cfg_g)
    b2 = make_batch(train_data, idx, np.random.default_rng(5), cfg_g)
    assert set(b1.granularities) == {"global"} and b1.texts == b2.texts and torch.equal(b1.images, b2.images)
    assert b1.keep is None and float((b1.images == 0).all(dim=1).float().mean()) < 0.01


def test_color_jitter_changes_the_images_not_the_captions_and_enters_the_key_only_when_on(train_data):
    idx = list(range(8))
    plain = PretrainConfig(backbone="tiny", p_global=1.0, keep_tokens=0)
    jitter = PretrainConfig(backbone="tiny", p_global=1.0, keep_tokens=0, color_jitter=True)
    a = make_batch(train_data, idx, np.random.default_rng(3), plain)
    b = make_batch(train_data, idx, np.random.default_rng(3), jitter)
    c = make_batch(train_data, idx, np.random.default_rng(3), jitter)
    assert torch.equal(b.images, c.images) and b.texts == c.texts          # seeded by the batch's rng
    changed = [not torch.allclose(a.images[i], b.images[i]) for i in idx]
    assert 3 <= sum(changed) <= 8                                           # p = 0.8 per image
    assert "color_jitter" not in plain.settings() and jitter.settings()["color_jitter"] is True


def test_wide_jitter_draws_stronger_looks_and_enters_the_key_only_when_asked(train_data):
    """``jitter_ranges="wide"`` (``--color-jitter wide``): the Re-ID ranges draw exactly as before, the wide ones
    give other images from the same batch rng (casts, low resolution), the key names them, and a wide jitter
    without the jitter on, or unknown ranges, is refused with the key named."""
    from muva_core.data.transforms import PHOTOMETRIC_RANGES, WIDE_PHOTOMETRIC_RANGES, photometric_jitter

    x = torch.rand(3, 48, 24, generator=torch.Generator().manual_seed(0))
    assert torch.equal(photometric_jitter(x, torch.Generator().manual_seed(1), p=1.0),
                       photometric_jitter(x, torch.Generator().manual_seed(1), p=1.0, ranges=PHOTOMETRIC_RANGES))
    # the resolution drop alone (every other factor at identity): pixel noise is smoothed away, the mean kept
    only_lowres = {**{k: (1.0, 1.0) for k in ("gain", "brightness", "gamma", "contrast", "saturation")},
                   "noise": (0.0, 0.0), "lowres": (3.0, 3.0)}
    smooth = photometric_jitter(x, torch.Generator().manual_seed(1), p=1.0, ranges=only_lowres)
    assert smooth.shape == x.shape and float(smooth.std()) < 0.6 * float(x.std())
    assert abs(float(smooth.mean() - x.mean())) < 0.02
    assert WIDE_PHOTOMETRIC_RANGES["gain"][0] <= 0.68 and WIDE_PHOTOMETRIC_RANGES["gain"][1] >= 1.2

    idx = list(range(8))
    reid = PretrainConfig(backbone="tiny", p_global=1.0, keep_tokens=0, color_jitter=True)
    wide = PretrainConfig(backbone="tiny", p_global=1.0, keep_tokens=0, color_jitter=True, jitter_ranges="wide")
    a = make_batch(train_data, idx, np.random.default_rng(3), reid)
    b = make_batch(train_data, idx, np.random.default_rng(3), wide)
    c = make_batch(train_data, idx, np.random.default_rng(3), wide)
    assert torch.equal(b.images, c.images) and a.texts == b.texts
    assert not torch.equal(a.images, b.images)
    assert "jitter_ranges" not in reid.settings() and wide.settings()["jitter_ranges"] == "wide"
    with pytest.raises(ValueError, match="jitter_ranges='wide' needs color_jitter"):
        PretrainConfig(backbone="tiny", jitter_ranges="wide")
    with pytest.raises(ValueError, match="jitter_ranges must be one of"):
        PretrainConfig(backbone="tiny", color_jitter=True, jitter_ranges="huge")


def test_pretraining_loss_decreases_over_a_few_steps(train_data):
    cfg = PretrainConfig(backbone="tiny", lr=2e-3, weight_decay=0.0)
    torch.manual_seed(0)
    model, tok = build_pretrain_clip(cfg)
    assert model.visual.conv1.weight.requires_grad, "the patch embedding is pretrained too"
    opt = make_optimizer(model, cfg)
    b = make_batch(train_data, list(range(0, 32, 2)), np.random.default_rng(0), cfg)
    assert b.keep is not None and b.keep.shape == (16, cfg.keep_tokens)
    losses = [contrastive_step(model, tok, b.images, b.texts, opt, keep=b.keep) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.3, losses
    assert contrastive_step(model, tok, b.images, b.texts, None, keep=b.keep) < losses[0]
    assert model.visual.patch_dropout.index is None, "the token selection is cleared after a step"
    # every token again outside the step: the image features do not depend on a stale selection
    with torch.no_grad():
        assert model.encode_image(b.images[:2]).shape == (2, 64)


def test_zero_shot_accuracy_on_hand_made_embeddings():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])        # three values
    image = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-1.0, 0.2], [0.9, 1.0], [5.0, 5.0]])
    # nearest values: 0, 1, 2, 1 (cos 0.74 vs 0.67), 0 or 1 (tie -> first) ; the last label is skipped
    labels = torch.tensor([0, 1, 0, 0, -1])
    assert zero_shot_accuracy(image, text, labels) == pytest.approx(2 / 4)
    assert zero_shot_accuracy(image * 7.0, text * 0.1, labels) == pytest.approx(2 / 4), "cosine, not dot product"
    assert zero_shot_accuracy(image, text, torch.tensor([0, 1, 2, 1, 0])) == pytest.approx(1.0)
    assert np.isnan(zero_shot_accuracy(image, text, torch.full((5,), -1)))
    # balanced: value 0 gets 1 of 3 right, value 1 gets 1 of 1 -> (1/3 + 1) / 2
    assert zero_shot_accuracy(image, text, labels, balanced=True) == pytest.approx((1 / 3 + 1) / 2)
    # a classifier that always answers value 0 scores 1 / values present, however skewed the labels
    const = torch.tensor([[1.0, 0.0]] * 6)
    skewed = torch.tensor([0, 0, 0, 0, 0, 1])
    assert zero_shot_accuracy(const, text, skewed) == pytest.approx(5 / 6)
    assert zero_shot_accuracy(const, text, skewed, balanced=True) == pytest.approx(1 / 2)


def test_evaluate_zero_shot_reports_every_attribute_against_chance(pt_root):
    held = load_pretrain_images(pt_root, "test", limit=20, seed=0)
    assert len(held) == 20
    model, tok = build_pretrain_clip(PretrainConfig(backbone="tiny"))
    res = evaluate_zero_shot(model, tok, held)
    assert set(res) == {"global", "part", "mean"}
    for mode in ("global", "part"):
        assert set(res[mode]) == set(ZERO_SHOT_ATTRIBUTES)
        for name, r in res[mode].items():
            assert r["chance"] == pytest.approx(1 / len(ZERO_SHOT_ATTRIBUTES[name].values))
            assert 0 <= r["accuracy"] <= 1 or np.isnan(r["accuracy"])
            assert r["majority"] >= r["chance"] or r["n"] == 0
            assert r["balanced_chance"] >= r["chance"] or r["n"] == 0
    assert res["global"]["upper_color"]["n"] == 20


def test_checkpoint_round_trips_into_build_clip_and_muva(tiny_ckpt, tmp_path):
    path = tiny_ckpt
    assert path.name == "clip-tiny-seed0.safetensors" and path.is_file()
    saved = load_file(str(path))
    model, _ = build_clip(BackboneConfig(name="tiny", checkpoint_path=str(path), pretrained=None))
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    fresh = build_clip(BackboneConfig(name="tiny", pretrained=None))[0].state_dict()
    assert not torch.equal(fresh["visual.conv1.weight"], saved["visual.conv1.weight"]), "weights were trained"
    assert saved["visual.positional_embedding"].shape[0] == 16 * 8 + 1, "MUVA's 16x8 grid, no resize needed"
    # the MUVA factory loads it from the run configuration keys
    from muva_core.config import RunConfig
    from muva_core.model.factory import build_muva

    cfg = RunConfig().update({"backbone": "tiny", "pretrained": "none", "checkpoint_path": str(path)})
    built = build_muva(cfg, num_classes=5)
    assert torch.equal(built.clip.token_embedding.weight, saved["token_embedding.weight"])
    assert torch.equal(built.clip.visual.positional_embedding, saved["visual.positional_embedding"])
    # metadata and report
    info = read_pretrain_info(path)
    assert info["backbone"] == "tiny" and info["settings"]["epochs"] == 2 and info["settings"]["scale"] == "small"
    report = json.loads(report_file(path).read_text())
    assert set(report["zero_shot"]) == {"random", "pretrained"}
    assert report["data"]["train_identities"] > 0 and report["steps"] >= 1
    assert report["timings"]["train"]["cpu_s"] >= 0


def test_checkpoint_is_reused_and_other_settings_are_refused(tiny_ckpt, pt_root):
    out = tiny_ckpt.parent
    before = tiny_ckpt.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = pretrain_clip(out, synth_root=pt_root, **TINY)
    assert again == tiny_ckpt and tiny_ckpt.stat().st_mtime_ns == before
    assert time.perf_counter() - t0 < 5.0
    with pytest.raises(CheckpointExistsError, match="epochs: 2 -> 3"):
        pretrain_clip(out, synth_root=pt_root, **{**TINY, "epochs": 3})
    assert checkpoint_file(out, "tiny", 0) == tiny_ckpt


def test_cli_pretrain_clip_reuses_and_prints_accuracies(tiny_ckpt, pt_root, capsys):
    from muva_core.cli import main

    rc = main(["pretrain-clip", "--out", str(tiny_ckpt.parent), "--backbone", "tiny", "--seed", "0", "--epochs", "2",
               "--scale", "small", "--synth-root", str(pt_root), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "upper_color" in out and str(tiny_ckpt) in out and "checkpoint_path=" in out


def test_resized_images_scale_their_part_boxes(train_data):
    small = train_data.subset(range(4)).resized((128, 64))
    assert small.images.shape[1:] == (3, 128, 64) and small.images.dtype == torch.uint8
    np.testing.assert_allclose(small.boxes[..., :4], train_data.boxes[:4, :, :4] / 2, rtol=1e-6)
    np.testing.assert_array_equal(small.boxes[..., 4], train_data.boxes[:4, :, 4])  # visibility unchanged
    # a mean over a 2x2 block, so the overall brightness is kept
    assert abs(small.images.float().mean() - train_data.images[:4].float().mean()) < 1.0
    assert train_data.resized(tuple(train_data.images.shape[-2:])) is train_data


def test_checkpoint_name_carries_a_non_default_input_size(tmp_path):
    assert checkpoint_file(tmp_path, "small", 0).name == "clip-small-seed0.safetensors"
    assert checkpoint_file(tmp_path, "small", 1, (128, 64)).name == "clip-small-128x64-seed1.safetensors"


def test_the_model_factory_and_the_provisioning_name_the_same_file(tmp_path, monkeypatch):
    """The factory loads ``model.checkpoints.config_clip_path``; ``ensure_pretrained_clip`` makes the file the spec
    names: the same one, and options cannot rename it. ``muva pretrain-clip`` says when the run configs use it."""
    from muva_core.config import RunConfig
    from muva_core.model.checkpoints import config_clip_path
    from muva_core.pretrain import provision

    cfg = RunConfig().update({"backbone": "tiny", "pretrained": "pretrain-clip", "data_root": str(tmp_path),
                              "height": 128, "width": 64})
    spec = provision.config_clip_spec(cfg)
    named = checkpoint_file(spec["out_dir"], spec["backbone"], spec["seed"], spec["image_size"])
    assert named == config_clip_path(cfg) == tmp_path / "clip" / "clip-tiny-128x64-seed0.safetensors"
    monkeypatch.setitem(provision.CONFIG_CLIP_OPTIONS, "seed", 1)
    with pytest.raises(ValueError, match=r"CONFIG_CLIP_OPTIONS may not set \['seed'\]"):
        provision.config_clip_spec(cfg)
    monkeypatch.delitem(provision.CONFIG_CLIP_OPTIONS, "seed")
    default = config_clip_path(RunConfig().update({"backbone": "tiny"}))
    text = provision.pretrain_clip_summary(default, "tiny", (256, 128))
    assert text.splitlines()[0] == f"checkpoint: {default}"        # no report beside it: no zero-shot lines
    assert "(the synthetic ones) start from it" in text
    assert "start from it" not in provision.pretrain_clip_summary(named, "tiny", (128, 64))


# ---- resumable, keyed, refused when the settings differ (issue 13) ---------------------------------

def test_an_interrupted_pretraining_resumes_at_its_last_epoch_and_ends_with_the_same_weights(
        tiny_ckpt, pt_root, tmp_path, monkeypatch):
    """Interrupted in its second epoch: the first epoch's state is on disk (``.partial``), the rerun continues from
    it (the first epoch is not trained again) and writes the same weights as the uninterrupted ``tiny_ckpt``."""
    import muva_core.pretrain as pretrain
    from muva_core.pretrain import loop

    real = loop.contrastive_step
    calls = {"n": 0}
    steps_per_epoch = json.loads(report_file(tiny_ckpt).read_text())["steps"] // TINY["epochs"]

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > steps_per_epoch:            # the first step of epoch 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "contrastive_step", interrupted)     # the name pretrain_clip calls
    out = tmp_path / "clip"
    with pytest.raises(KeyboardInterrupt):
        pretrain_clip(out, synth_root=pt_root, **TINY)
    path = checkpoint_file(out, "tiny", 0)
    partial = pretrain.partial_file(path)
    assert not path.exists() and partial.is_file() and partial.name == "clip-tiny-seed0.partial.safetensors"
    from muva_core.train.checkpoint import read_checkpoint_info

    assert read_checkpoint_info(partial)["epoch"] == 1
    calls["n"] = -10**9                              # no more interruptions; count the steps trained now
    assert pretrain_clip(out, synth_root=pt_root, **TINY) == path
    assert calls["n"] + 10**9 == steps_per_epoch, "only the second epoch was trained again"
    assert not partial.exists(), "the resume state goes once the checkpoint is written"
    resumed, whole = load_file(str(path)), load_file(str(tiny_ckpt))
    assert set(resumed) == set(whole) and all(torch.equal(resumed[k], whole[k]) for k in whole)
    report = json.loads(report_file(path).read_text())
    assert report["resumed_from_epoch"] == 1 and set(report["zero_shot"]) == {"random", "pretrained"}
    assert report["loss"]["per_epoch"] == json.loads(report_file(tiny_ckpt).read_text())["loss"]["per_epoch"]


def test_a_resume_state_with_other_settings_is_refused_unless_overwritten(pt_root, tmp_path):
    from muva_core.pretrain import partial_file
    from muva_core.train.checkpoint import save_checkpoint

    out = tmp_path / "clip"
    partial = partial_file(checkpoint_file(out, "tiny", 0))
    other = PretrainConfig(backbone="tiny", epochs=5, scale="small").settings()
    model, _ = build_pretrain_clip(PretrainConfig(backbone="tiny"))
    save_checkpoint(partial, model=model, epoch=1, config=other, rng=False)
    with pytest.raises(CheckpointExistsError, match=r"interrupted pretraining with other settings \(epochs: 5 -> 2\)"):
        pretrain_clip(out, synth_root=pt_root, **TINY)
    assert partial.is_file()
    path = pretrain_clip(out, synth_root=pt_root, overwrite=True, **TINY)
    assert path.is_file() and not partial.exists()
    assert json.loads(report_file(path).read_text())["resumed_from_epoch"] == 0


def test_multi_positive_batches_mark_every_caption_true_of_an_image(train_data):
    from muva_core.data.captions import facts_true_of
    from muva_core.pretrain.loop import multi_positive_loss

    idx = list(range(48))
    clip = make_batch(train_data, idx, np.random.default_rng(4), PretrainConfig(backbone="tiny"))
    multi_cfg = PretrainConfig(backbone="tiny", loss="multi_positive")
    multi = make_batch(train_data, idx, np.random.default_rng(4), multi_cfg)
    assert clip.texts == multi.texts and torch.equal(clip.images, multi.images)   # the same batch, only targets
    assert clip.positives is None and multi.positives.shape == (48, 48)
    pos = multi.positives
    assert bool(pos.diagonal().all())                        # a caption is true of its own image
    assert int(pos.sum()) > 48, "some caption of the batch is true of another image too"
    for i, j in zip(*torch.nonzero(pos & ~torch.eye(48, dtype=torch.bool), as_tuple=True)):
        assert multi.granularities[i] == multi.granularities[j]
    assert "loss" not in PretrainConfig().settings() and multi_cfg.settings()["loss"] == "multi_positive"
    with pytest.raises(ValueError, match="loss must be one of"):
        PretrainConfig(loss="triplet")
    # the loss: equal to ClipLoss with only the diagonal, and it pulls a second true caption in
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    eye = torch.eye(6, dtype=torch.bool)
    assert torch.allclose(multi_positive_loss(img, txt, scale, eye), ClipLoss()(img, txt, scale), atol=1e-6)
    both = eye.clone()
    both[0, 1] = True
    txt2 = txt.clone()
    txt2[1] = img[0]                                          # caption 1 is true of image 0 and lies on it
    assert multi_positive_loss(img, txt2, scale, both) < multi_positive_loss(img, txt2, scale, eye)
    assert facts_true_of(frozenset(), train_data.attrs[0], train_data.attrs[1])   # no facts: true of anyone


def test_caption_facts_name_what_the_caption_rests_on():
    from muva_core.data.captions import caption, caption_facts, facts_true_of

    rng = np.random.default_rng(0)
    people = [syn.sample_identity(rng) for _ in range(100)]
    for g in ("global", "head", "upper", "legs"):
        for seed in range(20):
            text, facts = caption_facts(people[seed], g, np.random.default_rng(seed))
            assert text == caption(people[seed], g, np.random.default_rng(seed))   # same draws, same text
            assert facts_true_of(facts, people[seed], people[seed])
            if facts and g != "global":
                assert {p for p, _ in facts} == {g}, (text, facts)                # a part caption reads its part
            # every identity it is true of has the same values where it looked
            for other in people:
                if facts_true_of(facts, people[seed], other):
                    assert all(people[seed][p].get(k) == other[p].get(k) for p, k in facts)
    # "The legs of a person wearing shoes." rests on nothing: true of everyone
    assert facts_true_of(caption_facts(people[1], "legs", np.random.default_rng(1))[1], people[1], people[50])
    # "a person in a red shirt" is true of every person in a red shirt whatever else they wear
    red = [p for p in people if p["upper"]["garment"] == "red"]
    if len(red) >= 2:
        assert facts_true_of(frozenset({("upper", "garment")}), red[0], red[1])


def test_hard_negatives_change_one_named_attribute_and_are_false_of_the_image():
    """NegCLIP-style negatives: the same sentence with one attribute the caption names changed; never true of the
    person; the caption itself is the one caption_facts draws with the same generator."""
    from muva_core.data.captions import HARD_NEGATIVE_SWAPS, caption_facts, hard_negative_caption

    rng = np.random.default_rng(1)
    people = [syn.sample_identity(rng) for _ in range(60)]
    made = 0
    for n, person in enumerate(people):
        for g in ("global", "head", "upper", "legs"):
            text, facts, negs = hard_negative_caption(person, g, np.random.default_rng(n), count=2)
            assert (text, facts) == caption_facts(person, g, np.random.default_rng(n))
            assert len(negs) <= 2 and len(set(negs)) == len(negs) and text not in negs
            for neg in negs:
                made += 1
                a, b = text.rstrip(".").split(), neg.rstrip(".").split()
                # one attribute changed: the sentences share their start and their end around one short change
                head = next(i for i, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)
                tail = next(i for i, (x, y) in enumerate(zip(a[::-1] + [None], b[::-1] + [None])) if x != y)
                assert max(len(a), len(b)) - head - tail <= 6, (text, neg)
    assert made > 300
    # a negative is false of its person: "red shoes" for a person in white shoes
    import re

    person = next(p for p in people if p["legs"]["shoes"] == "white")
    shoe_edits = []
    for seed in range(60):
        text, facts, negs = hard_negative_caption(person, "legs", np.random.default_rng(seed), count=3)
        if "white shoes" in text:
            some = re.sub(r"\w+ shoes", "X shoes", text)
            shoe_edits += [n for n in negs if re.sub(r"\w+ shoes", "X shoes", n) == some]
    assert shoe_edits and not any("white shoes" in n for n in shoe_edits)
    assert ("legs", "shoes") in HARD_NEGATIVE_SWAPS


def test_hard_negatives_enter_the_batch_the_loss_and_the_key(train_data):
    from open_clip.loss import ClipLoss

    from muva_core.pretrain.loop import multi_positive_loss

    idx = list(range(32))
    cfg = PretrainConfig(backbone="tiny", hard_negatives=2)
    plain = make_batch(train_data, idx, np.random.default_rng(3), PretrainConfig(backbone="tiny"))
    hard = make_batch(train_data, idx, np.random.default_rng(3), cfg)
    assert plain.negatives is None and 32 < len(hard.negatives) <= 64
    assert not set(hard.negatives) & set(hard.texts[:1])
    assert "hard_negatives" not in PretrainConfig().settings() and cfg.settings()["hard_negatives"] == 2
    with pytest.raises(ValueError, match="hard_negatives must be in 0..8"):
        PretrainConfig(hard_negatives=-1)
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    assert torch.allclose(multi_positive_loss(img, txt, scale), ClipLoss()(img, txt, scale), atol=1e-6)
    far = -img[:2]                                        # negatives far from every image cost almost nothing
    near = img[:2] * 0.999 + 0.001 * txt[:2]              # negatives on images 0 and 1 cost more
    base = multi_positive_loss(img, txt, scale)
    assert multi_positive_loss(img, txt, scale, negatives=near) > multi_positive_loss(img, txt, scale, negatives=far)
    assert multi_positive_loss(img, txt, scale, negatives=far) >= base
    # a step with negatives runs and learns: the loss of the same batch falls
    torch.manual_seed(0)
    model, tok = build_pretrain_clip(cfg)
    opt = make_optimizer(model, cfg)
    first = contrastive_step(model, tok, hard.images, hard.texts, opt, keep=hard.keep, negatives=hard.negatives)
    for _ in range(3):
        last = contrastive_step(model, tok, hard.images, hard.texts, opt, keep=hard.keep, negatives=hard.negatives)
    assert last < first


def test_cli_passes_the_pretraining_options_through(monkeypatch, tmp_path):
    """`muva pretrain-clip --scale pretrain-wide --color-jitter --loss multi_positive` reaches pretrain_clip as
    settings (which then enter the reuse key), and a loss it does not know is refused by the parser."""
    from muva_core.cli import main
    from muva_core.pretrain import loop, provision

    seen = {}

    def fake(out_dir, **kwargs):
        seen.update(kwargs)
        return tmp_path / "clip.safetensors"

    monkeypatch.setattr(loop, "pretrain_clip", fake)
    monkeypatch.setattr(provision, "pretrain_clip_summary", lambda *a, **k: "summary")
    assert main(["pretrain-clip", "--out", str(tmp_path), "--backbone", "tiny", "--scale", "pretrain-wide",
                 "--color-jitter", "--loss", "multi_positive", "--hard-negatives", "2", "--batch-granularity", "one",
                 "--threads", "1", "--quiet"]) == 0
    assert seen["scale"] == "pretrain-wide" and seen["color_jitter"] is True and seen["loss"] == "multi_positive"
    assert seen["threads"] == 1
    assert seen["hard_negatives"] == 2 and seen["batch_granularity"] == "one" and "jitter_ranges" not in seen
    assert main(["pretrain-clip", "--out", str(tmp_path), "--color-jitter", "wide", "--quiet"]) == 0
    assert seen["color_jitter"] is True and seen["jitter_ranges"] == "wide" and seen["threads"] is None
    assert syn.SCALES["pretrain-wide"]["ids_per_domain"] == 4 * syn.SCALES["pretrain"]["ids_per_domain"]
    with pytest.raises(SystemExit):
        main(["pretrain-clip", "--out", str(tmp_path), "--loss", "triplet"])
    with pytest.raises(SystemExit):
        main(["pretrain-clip", "--out", str(tmp_path), "--color-jitter", "huge"])
    monkeypatch.undo()
    with pytest.raises(ValueError, match="threads: expected a positive number of CPU threads, got 0"):
        loop.pretrain_clip(tmp_path / "none", backbone="tiny", threads=0)   # refused before any work
    assert not (tmp_path / "none").exists()


def test_linear_probe_reads_what_the_features_hold_and_the_tool_loads_checkpoints(tiny_ckpt, pt_root, train_data):
    """linear_probe_accuracy: ~1 on features that carry the label, ~chance on noise; load_pretrained_clip gives the
    model the checkpoint was saved from; probe_attributes scores every zero-shot attribute."""
    from muva_core.pretrain.files import load_pretrained_clip
    from muva_core.pretrain.zeroshot import linear_probe_accuracy, probe_attributes

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    informative = torch.nn.functional.one_hot(y, 4).float() * 3 + torch.randn(400, 16, generator=g)[:, :4]
    noise = torch.randn(400, 16, generator=g)
    y[:5] = -1                                                 # skipped
    assert linear_probe_accuracy(informative[:300], y[:300], informative[300:], y[300:], 4) > 0.9
    assert linear_probe_accuracy(noise[:300], y[:300], noise[300:], y[300:], 4) < 0.45

    model, tokenizer, cfg = load_pretrained_clip(tiny_ckpt)
    saved = load_file(str(tiny_ckpt))
    assert cfg.backbone == "tiny" and not model.training
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    held = load_pretrain_images(pt_root, "test", limit=40)
    acc = probe_attributes(model, train_data, held)
    assert set(acc) == set(ZERO_SHOT_ATTRIBUTES) | {"mean"}
    assert all(np.isnan(v) or 0.0 <= v <= 1.0 for v in acc.values())


def test_probe_tool_as_docs_pretraining_writes_it(tiny_ckpt, pt_root, capsys):
    """`python tools/probe_clip.py --root DIR random CKPT` (docs/pretraining.md), on the tiny set and checkpoint."""
    import runpy
    from pathlib import Path

    tool = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "probe_clip.py"))
    assert tool["main"](["--root", str(pt_root), "random", str(tiny_ckpt), "--backbone", "tiny", "--image-size",
                         "256x128", "--train", "80", "--test", "40"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("random: linear probe balanced accuracy hair_color")
    assert out[1].startswith(f"{tiny_ckpt}: linear probe") and "mean" in out[1]


def test_pretraining_sets_of_two_scales_never_share_the_default_folder(tmp_path):
    """After make demo (data/synthetic-pretrain at the `pretrain` scale), `--out data/clip-wide --scale pretrain-wide`
    generates its set beside it, not over it."""
    from muva_core.pretrain.files import pretrain_data_root

    assert pretrain_data_root(tmp_path / "clip") == (tmp_path / "synthetic-pretrain").resolve()
    assert pretrain_data_root(tmp_path / "clip2", "pretrain-wide") == (tmp_path / "synthetic-pretrain-wide").resolve()
    assert pretrain_data_root(tmp_path / "clip2", "small") != pretrain_data_root(tmp_path / "clip2")


def test_supervised_ceiling_learns_from_labels_deterministically_and_the_tool_runs(pt_root, train_data, tmp_path):
    """supervised_attribute_ceiling: every attribute scored in [0, 1] with its chance, the training loss falls, the
    same seed gives the same numbers and leaves the global RNG alone; mismatched sizes are refused; the tool of
    docs/pretraining.md writes its JSON."""
    import json
    import runpy
    from pathlib import Path

    from muva_core.pretrain.zeroshot import supervised_attribute_ceiling

    train = train_data.subset(range(96))
    held = load_pretrain_images(pt_root, "test", limit=30)
    state = torch.random.get_rng_state()
    a = supervised_attribute_ceiling(train, held, backbone="tiny", epochs=4, batch_size=16, lr=2e-3)
    assert torch.equal(state, torch.random.get_rng_state())
    b = supervised_attribute_ceiling(train, held, backbone="tiny", epochs=4, batch_size=16, lr=2e-3)
    assert a == b
    assert set(a["balanced_accuracy"]) == set(ZERO_SHOT_ATTRIBUTES) | {"mean"}
    assert all(np.isnan(v) or 0.0 <= v <= 1.0 for v in a["balanced_accuracy"].values())
    assert all(0.0 < a["chance"][k] <= 1.0 for k in ZERO_SHOT_ATTRIBUTES)
    assert a["steps"] == 4 * 6 and len(a["loss"]) == 4 and a["loss"][-1] < a["loss"][0]
    with pytest.raises(ValueError, match="resize both"):
        supervised_attribute_ceiling(train, held.resized((128, 64)), backbone="tiny", batch_size=16)
    with pytest.raises(ValueError, match="mode must be"):
        supervised_attribute_ceiling(train, held, backbone="tiny", mode="legs", batch_size=16)
    whole = supervised_attribute_ceiling(train, held, backbone="tiny", mode="global", epochs=2, batch_size=16)
    assert set(whole["balanced_accuracy"]) == set(a["balanced_accuracy"]) and whole["steps"] == 2 * 6

    tool = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "attribute_ceiling.py"))
    out = tmp_path / "ceiling.json"
    assert tool["main"](["--root", str(pt_root), "--backbone", "tiny", "--image-size", "256x128", "--epochs", "1",
                         "--mode", "global", "--train", "64", "--test", "20", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["settings"]["train_images"] == 64 and saved["settings"]["mode"] == "global" and set(saved["balanced_accuracy"]) >= set(ZERO_SHOT_ATTRIBUTES)


def test_one_granularity_batches_caption_every_image_at_the_batch_granularity(train_data):
    """batch_granularity="one": every image of a batch is captioned at one granularity (global only where its part
    is hidden), and over batches each granularity comes up; "mixed" (the default) draws as before and stays out of
    the reuse key; an unknown value is refused."""
    idx = list(range(24))
    cfg = PretrainConfig(backbone="tiny", batch_granularity="one", min_part_visible=0.5)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(12):
        b = make_batch(train_data, idx, rng, cfg)
        parts = set(b.granularities) - {"global"}
        assert len(parts) <= 1
        seen |= set(b.granularities)
        for i, g in zip(idx, b.granularities):
            if parts and g == "global":       # fell back: the batch's part is hidden in this image
                assert train_data.boxes[i, PARTS.index(next(iter(parts))), 4] < 0.5
    assert seen == {"global", *PARTS}
    mixed = make_batch(train_data, idx, np.random.default_rng(0), PretrainConfig(backbone="tiny"))
    assert len(set(mixed.granularities)) > 2
    assert "batch_granularity" not in PretrainConfig().settings() and cfg.settings()["batch_granularity"] == "one"
    with pytest.raises(ValueError, match="batch_granularity must be one of"):
        PretrainConfig(batch_granularity="legs")


def test_resizing_in_chunks_gives_the_images_of_one_pass(train_data):
    """PretrainImages.resized holds only ``chunk`` images as floats at a time (the wide set at once was ~7 GB of
    floats, most of a 17.6 GB peak); the result is the same bytes as one pass over all images."""
    sub = train_data.subset(range(40))
    one = sub.resized((192, 96), chunk=len(sub))
    small = sub.resized((192, 96), chunk=7)
    assert torch.equal(one.images, small.images) and one.images.dtype == torch.uint8
    assert one.images.shape == (40, 3, 192, 96) and np.array_equal(one.boxes, small.boxes)


def test_a_run_records_the_clip_file_it_started_from_by_its_weights_digest(tiny_ckpt, small_synth_root, tmp_path):
    """``metrics/train.json`` names the CLIP file a run started from and the SHA-256 of its weights (a CLIP made
    again on another machine keeps its name; the digest tells the builds apart); the digest is of the tensors, not
    of the file's metadata (the build's report, written in no fixed order); random weights record None."""
    import hashlib

    from safetensors.torch import save_file

    from conftest import tiny_run_config
    from muva_core.config import RunConfig
    from muva_core.model.checkpoints import config_clip_path, start_record, weights_sha256
    from muva_core.runs import train_protocol

    cfg = tiny_run_config(small_synth_root, tmp_path / "run", tmp_path / "cache", checkpoint_path=str(tiny_ckpt),
                          stage1_epochs=1, stage2_epochs=1, lr_milestones=[1])
    result = train_protocol(cfg, progress=False)
    record = json.loads((result.run_dir / "metrics" / "train.json").read_text())
    digest = weights_sha256(tiny_ckpt)
    assert record["start_checkpoint"] == {"path": str(tiny_ckpt), "weights_sha256": digest}
    # the same tensors under other metadata: another file, the same weights
    tensors = load_file(str(tiny_ckpt))
    same = tmp_path / "same" / tiny_ckpt.name
    same.parent.mkdir()
    save_file(tensors, str(same), metadata={"note": "written again"})
    assert hashlib.sha256(same.read_bytes()).digest() != hashlib.sha256(tiny_ckpt.read_bytes()).digest()
    assert weights_sha256(same) == digest
    # one weight changed in its last bit: another build under the same name
    name = sorted(tensors)[0]
    bits = tensors[name].clone().view(-1).view(torch.int32) if tensors[name].dtype == torch.float32 else None
    assert bits is not None, tensors[name].dtype
    bits[0] ^= 1
    other = tmp_path / "other" / tiny_ckpt.name
    other.parent.mkdir()
    save_file({**tensors, name: bits.view(torch.float32).view(tensors[name].shape)}, str(other))
    assert start_record(RunConfig().update({"checkpoint_path": str(other)}))["weights_sha256"] != digest
    # `pretrained: pretrain-clip` names the file of the pretraining (no digest while it is not made)
    made = RunConfig().update({"pretrained": "pretrain-clip", "data_root": str(tmp_path / "data"), "backbone": "tiny"})
    assert start_record(made) == {"path": str(config_clip_path(made)), "weights_sha256": None}
    assert start_record(RunConfig().update({"pretrained": "none"})) is None
