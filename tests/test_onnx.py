"""ONNX export of the MUVA image encoder (muva_core.export): parity with PyTorch under ONNX Runtime."""
from __future__ import annotations

import copy
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from muva_core import export as mexport  # noqa: E402
from muva_core.data.transforms import CLIP_MEAN, CLIP_STD  # noqa: E402
from muva_core.export import (  # noqa: E402
    OnnxParityError,
    check_onnx_parity,
    export_onnx,
    onnx_session,
    read_onnx_metadata,
    run_onnx,
)
from muva_core.model import BackboneConfig, MUVAConfig, MUVAEncoder, build_clip  # noqa: E402

ATOL = 1e-4
EXPORT_BATCH = mexport._EXAMPLE_BATCH   # the batch the dynamic export is traced with
RUN_BATCH = 3                           # a different batch size at run time


@pytest.fixture(scope="module")
def tiny_visual():
    clip, _ = build_clip(BackboneConfig(name="tiny", seed=0))
    return clip.visual


@pytest.fixture(scope="module")
def images():
    return torch.randn(RUN_BATCH, 3, 256, 128, generator=torch.Generator().manual_seed(2))


def make_encoder(visual, **cfg) -> MUVAEncoder:
    enc = MUVAEncoder(copy.deepcopy(visual), MUVAConfig(**cfg))
    with torch.no_grad():   # non-trivial BN statistics, so the neck is not the identity
        enc.bottleneck.running_mean.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        enc.bottleneck.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(3))
    return enc.eval()


def op_counts(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def assert_clear_of_threshold(enc: MUVAEncoder, images: torch.Tensor, margin: float = 1e-5) -> None:
    """No predicted mask logit sits within ``margin`` of the gate (a float-rounding flip in ORT
    would change a whole attention mask; float32 logits agree to ~1e-7), so that parity
    failures mean export bugs, not rounding luck."""
    with torch.no_grad():
        out = enc(images)
    for logits in out.mask_logits:
        assert logits.abs().min() > margin, "test images put a mask logit on the gate; pick another seed"


# ------------------------------------------------------------------ parity
def test_predicted_masks_export_with_dynamic_batch(tiny_visual, images, tmp_path):
    enc = make_encoder(tiny_visual)
    path = export_onnx(enc, tmp_path / "muva.onnx")
    assert path == tmp_path / "muva.onnx" and path.is_file()

    sess = onnx_session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.shape == ["batch", 3, 256, 128] and out.shape == ["batch", enc.feat_dim]
    # the per-image masks are computed in the graph: one gate (Greater on the sigmoid) per layer,
    # scattered into the attention mask, used as Where(mask, 0, -inf) before the Softmax
    ops = op_counts(path)
    assert ops["Greater"] == len(enc.rmp) == 2 and ops["ScatterND"] > 0 and ops["IsNaN"] > 0

    with torch.no_grad():
        masks = enc(images).part_masks
    assert len(masks) == 2 and not torch.equal(masks[-1][0], masks[-1][1])   # masks differ per image
    assert_clear_of_threshold(enc, images)
    assert RUN_BATCH != EXPORT_BATCH
    assert check_onnx_parity(enc, path, images, atol=ATOL, session=sess) < ATOL
    assert check_onnx_parity(enc, path, images[:1], atol=ATOL, session=sess) < ATOL   # batch 1

    feats = run_onnx(sess, images)
    assert feats.shape == (RUN_BATCH, enc.feat_dim) == (RUN_BATCH, 4 * 64)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "cfg,feat_dim,has_mask",
    [(dict(parts="G"), 64, False), (dict(mask_mode="stripe"), 256, True)],
    ids=["G-only", "stripe"],
)
def test_g_only_and_stripe_export(tiny_visual, images, tmp_path, cfg, feat_dim, has_mask):
    enc = make_encoder(tiny_visual, **cfg)
    path = export_onnx(enc, tmp_path / "m.onnx")
    assert read_onnx_metadata(path)["feature_dim"] == enc.feat_dim == feat_dim
    ops = op_counts(path)
    assert ops["Greater"] == 0                       # no RMP, no gating in the graph
    assert (ops["ScatterND"] > 0) == has_mask        # stripe: fixed part masks; G-only: no mask
    assert check_onnx_parity(enc, path, images, atol=ATOL) < ATOL


class PartBias(nn.Module):
    """Adds a per-part constant to the RMP MLP's output logits ``[B, P, N]``."""

    def __init__(self, bias: list[float]) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tensor(bias).view(1, -1, 1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.bias


def test_empty_part_masks_export_without_nan(tiny_visual, tmp_path):
    """``upper`` is empty in every layer for every image (a -1e4 bias after each RMP MLP); ``legs``
    is empty in the last layer for some images only (a bias between the per-image maxima)."""
    enc = make_encoder(tiny_visual)
    imgs = torch.randn(4, 3, 256, 128, generator=torch.Generator().manual_seed(5))
    for rmp in enc.rmp:
        rmp.mlp = nn.Sequential(*rmp.mlp, PartBias([0.0, -1e4, 0.0]))
    with torch.no_grad():
        peak = enc(imgs).mask_logits[-1][:, 2].amax(-1).sort().values     # legs, last layer, per image
    cut = float(peak[1] + peak[2]) / 2                                     # 2 images above, 2 below
    assert float(peak[2] - peak[1]) / 2 > 1e-4
    enc.rmp[-1].mlp[-1].bias[0, 2, 0] = -cut

    with torch.no_grad():
        out = enc(imgs)
    upper = torch.stack([m[:, 1] for m in out.part_masks])                  # [L, B, N]
    legs_empty = ~out.part_masks[-1][:, 2].any(-1)
    assert not upper.any()
    assert legs_empty.sum() == 2 and (~legs_empty).sum() == 2
    assert out.part_masks[-1][:, 0].any(-1).all()                           # head untouched
    assert_clear_of_threshold(enc, imgs)

    path = export_onnx(enc, tmp_path / "empty.onnx")
    feats = run_onnx(path, imgs[:3])      # a batch size other than the export's
    assert np.isfinite(feats).all()
    assert check_onnx_parity(enc, path, imgs, atol=ATOL) < ATOL


def test_parity_check_fails_when_weights_change(tiny_visual, images, tmp_path):
    enc = make_encoder(tiny_visual, parts="G")
    path = export_onnx(enc, tmp_path / "m.onnx")
    with torch.no_grad():
        enc.visual.proj.add_(0.1 * torch.randn(enc.visual.proj.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(OnnxParityError, match="differ by"):
        check_onnx_parity(enc, path, images, atol=ATOL)
    assert check_onnx_parity(enc, path, images, atol=None) > ATOL     # report only


# ------------------------------------------------------------------ options and metadata
def test_metadata_fixed_batch_unnormalised_and_modes_restored(tiny_visual, images, tmp_path):
    enc = make_encoder(tiny_visual)
    enc.train()
    enc.bottleneck.eval()           # a mixed state, restored exactly
    path = export_onnx(enc, tmp_path / "sub" / "fixed.onnx", batch_size=RUN_BATCH, normalize=False,
                       extra_metadata={"backbone_name": "tiny", "checkpoint": {"epoch": 3}})
    assert enc.training and not enc.bottleneck.training and enc.visual.training

    meta = read_onnx_metadata(path)
    assert meta["image_size"] == [256, 128]
    assert meta["mean"] == pytest.approx(list(CLIP_MEAN)) and meta["std"] == pytest.approx(list(CLIP_STD))
    assert meta["feature_dim"] == enc.feat_dim and meta["normalized"] is False
    assert meta["model_config"]["parts"] == ["head", "upper", "legs"]
    assert meta["model_config"]["mask_mode"] == "predicted" and meta["model_config"]["threshold"] == 0.5
    assert meta["backbone"] == {"width": 64, "layers": 2, "heads": 2, "patch_size": [16, 16],
                                "grid": [16, 8], "embed_dim": 64}
    assert meta["granularities"] == ["global", "head", "upper", "legs"]
    assert meta["exporter"] == "torchscript" and meta["opset"] == 17
    assert meta["backbone_name"] == "tiny" and meta["checkpoint"] == {"epoch": 3}
    assert onnx.load(str(path)).opset_import[0].version == 17

    sess = onnx_session(path)
    assert sess.get_modelmeta().custom_metadata_map["feature_dim"] == str(enc.feat_dim)
    assert sess.get_inputs()[0].shape == [RUN_BATCH, 3, 256, 128]
    feats = run_onnx(sess, images)
    assert not np.allclose(np.linalg.norm(feats, axis=1), 1.0)      # BN-neck feature, not normalised
    assert check_onnx_parity(enc, path, images, atol=ATOL, session=sess) < ATOL
    assert enc.training and not enc.bottleneck.training


def test_bad_arguments(tiny_visual, tmp_path):
    enc = make_encoder(tiny_visual, parts="G")
    with pytest.raises(ValueError, match="does not match the encoder's input size"):
        export_onnx(enc, tmp_path / "a.onnx", image_size=(224, 224))
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(enc, tmp_path / "a.onnx", exporter="tflite")
    with pytest.raises(ValueError, match="norm"):
        export_onnx(enc, tmp_path / "a.onnx", norm="imagenet")
    with pytest.raises(ValueError, match="clashes"):
        export_onnx(enc, tmp_path / "a.onnx", extra_metadata={"feature_dim": 1})
    with pytest.raises(ValueError, match="pseudo"):
        export_onnx(make_encoder(tiny_visual, mask_mode="pseudo"), tmp_path / "a.onnx")
    with pytest.raises(TypeError, match="MUVAEncoder"):
        export_onnx(nn.Linear(2, 2), tmp_path / "a.onnx")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ atomic write, missing packages
def test_failed_export_leaves_no_file(tiny_visual, tmp_path, monkeypatch):
    enc = make_encoder(tiny_visual, parts="G")
    real_export = torch.onnx.export

    def export_then_fail(*args, **kwargs):
        real_export(*args, **kwargs)          # a complete temporary file exists now
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.onnx, "export", export_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(enc, tmp_path / "new.onnx")
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old.onnx"
    old.write_bytes(b"previous model")
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(enc, old)
    assert old.read_bytes() == b"previous model" and list(tmp_path.iterdir()) == [old]


def test_missing_packages_give_clear_errors(tiny_visual, images, tmp_path, monkeypatch):
    enc = make_encoder(tiny_visual, parts="G")
    path = export_onnx(enc, tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)      # import onnxruntime -> ImportError
    with pytest.raises(ImportError, match=r"needs the 'onnxruntime' package.*pip install onnxruntime"):
        check_onnx_parity(enc, path, images)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"'onnxscript'.*pip install onnxscript"):
        export_onnx(enc, tmp_path / "d.onnx", exporter="dynamo")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"export_onnx needs the 'onnx' package"):
        export_onnx(enc, tmp_path / "e.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_dynamo_exporter_parity(tiny_visual, images, tmp_path):
    pytest.importorskip("onnxscript")
    enc = make_encoder(tiny_visual)
    path = export_onnx(enc, tmp_path / "dyn.onnx", exporter="dynamo")
    assert read_onnx_metadata(path)["opset"] == 18
    assert onnx_session(path).get_inputs()[0].shape[0] == "batch"
    assert check_onnx_parity(enc, path, images, atol=ATOL) < ATOL
