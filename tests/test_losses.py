"""Losses of muva_core.train.losses against values worked out by hand on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from muva_core.train.losses import (
    MUVALoss,
    cmp_loss,
    cross_entropy_label_smooth,
    i2tce_loss,
    imp_loss,
    mask_loss,
)
from muva_core.train.memory import PrototypeMemory

LN2, LN3 = math.log(2.0), math.log(3.0)


def close(value: torch.Tensor, expected: float, tol: float = 1e-6) -> bool:
    return abs(float(torch.as_tensor(value).detach()) - expected) < tol


# ---- L_id: label-smoothed cross-entropy ----------------------------------------------------
def test_label_smooth_by_hand():
    # 2 classes, logits [0, ln 3] -> softmax [1/4, 3/4]; eps 0.1 -> q = [0.05, 0.95] for target 1
    # loss = -(0.05 ln 1/4 + 0.95 ln 3/4) = 0.05 ln 4 + 0.95 ln 4/3
    logits = torch.tensor([[0.0, LN3]])
    expected = 0.05 * math.log(4) + 0.95 * math.log(4 / 3)
    assert close(cross_entropy_label_smooth(logits, torch.tensor([1]), 0.1), expected)
    # target 0: q = [0.95, 0.05] -> 0.95 ln 4 + 0.05 ln 4/3
    expected0 = 0.95 * math.log(4) + 0.05 * math.log(4 / 3)
    assert close(cross_entropy_label_smooth(logits, torch.tensor([0]), 0.1), expected0)
    # batch mean of the two
    both = cross_entropy_label_smooth(logits.repeat(2, 1), torch.tensor([1, 0]), 0.1)
    assert close(both, (expected + expected0) / 2)


def test_label_smooth_matches_torch_and_eps0_is_ce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.allclose(cross_entropy_label_smooth(logits, y, 0.1), F.cross_entropy(logits, y, label_smoothing=0.1))
    assert torch.allclose(cross_entropy_label_smooth(logits, y, 0.0), F.cross_entropy(logits, y))


def test_label_smooth_rejects_bad_targets():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cross_entropy_label_smooth(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        cross_entropy_label_smooth(torch.zeros(2, 3), torch.tensor([0]))


# ---- L_cmp (eq. 1) ---------------------------------------------------------------------------
def test_cmp_by_hand():
    # centroids are normalised inside: [3, 0] -> [1, 0], [0, 0.5] -> [0, 1]
    centroids = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    # text [2, 0] (id 0): cos = [1, 0] -> -log(e / (e + 1)) = log(1 + e^-1)
    assert close(cmp_loss(torch.tensor([[2.0, 0.0]]), centroids, torch.tensor([0])), math.log(1 + math.exp(-1)))
    # text [1, 1] (id 1): cos = [1/sqrt2, 1/sqrt2] -> log 2
    assert close(cmp_loss(torch.tensor([[1.0, 1.0]]), centroids, torch.tensor([1])), LN2)
    # temperature 0.5 doubles the logits: log(1 + e^-2)
    t = cmp_loss(torch.tensor([[2.0, 0.0]]), centroids, torch.tensor([0]), temperature=0.5)
    assert close(t, math.log(1 + math.exp(-2)))


def test_cmp_gradient_reaches_text_only():
    text = torch.tensor([[1.0, 0.5]], requires_grad=True)
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    cmp_loss(text, centroids, torch.tensor([0])).backward()
    assert text.grad is not None and text.grad.abs().sum() > 0
    assert centroids.grad is None


# ---- L_imp (eq. 2) ---------------------------------------------------------------------------
def test_imp_by_hand():
    memory = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    v = torch.tensor([[5.0, 0.0]])  # normalised -> [1, 0]; cos = [1, 0.6]
    # tau 0.1: logits [10, 6] -> target 0: log(1 + e^-4); target 1: 4 + log(1 + e^-4)
    assert close(imp_loss(v, memory, torch.tensor([0]), temperature=0.1), math.log(1 + math.exp(-4)))
    assert close(imp_loss(v, memory, torch.tensor([1]), temperature=0.1), 4 + math.log(1 + math.exp(-4)), 1e-5)
    # default tau 0.01: v = [0.8, 0.6] vs memory eye -> logits [80, 60]; target 1 -> 20 + log(1 + e^-20)
    eye = torch.eye(2)
    assert close(imp_loss(torch.tensor([[0.8, 0.6]]), eye, torch.tensor([1])), 20 + math.log1p(math.exp(-20)), 1e-4)


# ---- L_i2tce (eq. 4) -------------------------------------------------------------------------
def test_i2tce_by_hand():
    v = torch.tensor([[1.0, 0.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0])
    # cosine logits [1, 0]: log p = [1 - ln(1+e), -ln(1+e)], q = [0.95, 0.05]
    # loss = 0.95 (ln(1+e) - 1) + 0.05 ln(1+e) = ln(1+e) - 0.95
    assert close(i2tce_loss(v, text, y), math.log(1 + math.e) - 0.95)
    # raw dot product (reference code): logits [2, 0] -> ln(1+e^2) - 0.95 * 2
    assert close(i2tce_loss(v, text, y, normalize=False), math.log(1 + math.exp(2)) - 1.9)
    # cosine x logit_scale 2 gives the same logits [2, 0]
    assert close(i2tce_loss(v, text, y, logit_scale=2.0), math.log(1 + math.exp(2)) - 1.9)


def test_i2tce_eps0_is_plain_ce_of_cosines():
    g = torch.Generator().manual_seed(1)
    v, text = torch.randn(5, 8, generator=g), torch.randn(4, 8, generator=g)
    y = torch.tensor([0, 1, 2, 3, 1])
    cos = F.normalize(v, dim=1) @ F.normalize(text, dim=1).t()
    assert torch.allclose(i2tce_loss(v, text, y, epsilon=0.0), F.cross_entropy(cos, y), atol=1e-6)


def test_i2tce_text_prototypes_frozen():
    v = torch.randn(3, 4, requires_grad=True)
    text = torch.randn(2, 4, requires_grad=True)
    i2tce_loss(v, text, torch.tensor([0, 1, 1])).backward()
    assert v.grad is not None and text.grad is None


# ---- L_mask (eq. 8-9) ------------------------------------------------------------------------
def test_mask_literal_elementwise_and_soft_by_hand():
    # one layer, one sample, one part, two patches: M = sigmoid([0, ln 3]) = [0.5, 0.75], G = [1, 0]
    logits = torch.tensor([[[[0.0, LN3]]]])  # [L=1, B=1, P=1, N=2]
    g = torch.tensor([[[1.0, 0.0]]])
    total, bce, dice = mask_loss(logits, g, dice="elementwise")
    # BCE: (-ln 0.5 - ln(1 - 0.75)) / 2 = (ln 2 + ln 4) / 2 = 1.5 ln 2
    assert close(bce, 1.5 * LN2)
    # element-wise Dice: patch 1: 1 - 2*0.5*1/(0.5+1) = 1/3; patch 2 (G=0): 1 -> mean 2/3
    assert close(dice, 2 / 3, 1e-5)
    assert close(total, 1.5 * LN2 + 2 / 3, 1e-5)
    # soft Dice (smooth 1): 1 - (2*0.5 + 1) / (1.25 + 1 + 1) = 1 - 2/3.25
    _, bce_s, dice_s = mask_loss(logits, g)
    assert close(bce_s, 1.5 * LN2)
    assert close(dice_s, 1 - 2 / 3.25)


def test_mask_soft_dice_is_per_sample_part_mean():
    # sample 0 as above (1 - 2/3.25); sample 1: G = [0, 0], M = [0.5, 0.5]: 1 - 1/(1 + 0 + 1) = 0.5
    logits = torch.tensor([[[[0.0, LN3]], [[0.0, 0.0]]]])  # [1, 2, 1, 2]
    g = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    _, _, dice = mask_loss(logits, g)
    assert close(dice, ((1 - 2 / 3.25) + 0.5) / 2)


def test_mask_perfect_logits_near_zero():
    g = torch.zeros(2, 3, 16)
    g[:, 0, :5] = 1
    g[:, 1, 5:11] = 1
    g[:, 2, 11:] = 1
    logits = [30.0 * (2 * g - 1)] * 3
    total, bce, dice = mask_loss(logits, g)
    assert float(dice) < 1e-6 and float(bce) < 1e-6 and float(total) < 1e-6


def test_mask_empty_target():
    g = torch.zeros(1, 1, 4)
    # soft: confident-empty prediction -> ~0; uninformed (M = 0.5 x 4) -> 1 - 1/(2 + 1) = 2/3
    assert float(mask_loss(torch.full((1, 1, 1, 4), -30.0), g)[2]) < 1e-6
    assert close(mask_loss(torch.zeros(1, 1, 1, 4), g)[2], 2 / 3)
    # literal element-wise form: 1 wherever G = 0, even for a perfect prediction, and no gradient
    logits = torch.full((1, 1, 1, 4), -30.0, requires_grad=True)
    _, _, dice = mask_loss(logits, g, dice="elementwise")
    assert close(dice, 1.0)
    (grad,) = torch.autograd.grad(dice, logits)
    assert torch.count_nonzero(grad) == 0
    # soft Dice does give a gradient on an empty target
    logits0 = torch.zeros(1, 1, 1, 4, requires_grad=True)
    (grad0,) = torch.autograd.grad(mask_loss(logits0, g)[2], logits0)
    assert bool((grad0 > 0).all())


def test_mask_averages_over_layers_and_accepts_list_or_tensor():
    g = (torch.rand(2, 3, 8, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    for mode in ("soft", "elementwise"):
        both = mask_loss([a, b], g, dice=mode)
        sep = [mask_loss([x], g, dice=mode) for x in (a, b)]
        stacked = mask_loss(torch.stack([a, b]), g, dice=mode)
        for i in range(3):
            assert torch.allclose(both[i], (sep[0][i] + sep[1][i]) / 2, atol=1e-6)
            assert torch.allclose(both[i], stacked[i])
    # bool targets work, weights apply
    total, bce, dice = mask_loss([a, b], g.bool(), bce_weight=2.0, dice_weight=0.5)
    assert torch.allclose(total, 2 * bce + 0.5 * dice)


def test_mask_shape_errors():
    with pytest.raises(ValueError, match="do not match"):
        mask_loss(torch.zeros(2, 1, 3, 8), torch.zeros(1, 3, 7))
    with pytest.raises(ValueError, match="dice"):
        mask_loss(torch.zeros(1, 1, 3, 8), torch.zeros(1, 3, 8), dice="hard")


# ---- MUVALoss (eq. 11) -----------------------------------------------------------------------
def _stage2_inputs():
    gen = torch.Generator().manual_seed(4)
    b, c, d = 6, 3, 8
    return dict(
        targets=torch.tensor([0, 0, 1, 1, 2, 2]),
        id_logits=torch.randn(b, c, generator=gen),
        features=torch.randn(b, d, generator=gen),
        bn_features=torch.randn(b, d, generator=gen),
        memory=F.normalize(torch.randn(c, d, generator=gen), dim=1),
        text_prototypes=torch.randn(c, d, generator=gen),
        mask_logits=torch.randn(2, b, 3, 5, generator=gen),
        mask_targets=(torch.rand(b, 3, 5, generator=gen) > 0.5).float(),
    )


def test_muva_loss_terms_and_weights():
    x = _stage2_inputs()
    out = MUVALoss(weights={"imp": 0.5, "mask": 2.0})(**x)
    assert set(out) == {"id", "imp", "i2tce", "mask_bce", "mask_dice", "total"}
    y = x["targets"]
    assert torch.allclose(out["id"], cross_entropy_label_smooth(x["id_logits"], y, 0.1))
    assert torch.allclose(out["imp"], imp_loss(x["bn_features"], x["memory"], y, 0.01))
    assert torch.allclose(out["i2tce"], i2tce_loss(x["features"], x["text_prototypes"], y))
    _, bce, dice = mask_loss(x["mask_logits"], x["mask_targets"])
    assert torch.allclose(out["mask_bce"], bce) and torch.allclose(out["mask_dice"], dice)
    expected = out["id"] + 0.5 * out["imp"] + out["i2tce"] + 2.0 * (bce + dice)
    assert torch.allclose(out["total"], expected)


def test_muva_loss_vision_only_and_memory_module():
    x = _stage2_inputs()
    mem = PrototypeMemory(3, 8, temperature=0.01)
    mem.build(x["memory"], torch.arange(3))  # one normalised feature per id: the centroids are those rows
    out = MUVALoss(use_i2tce=False)(**{**x, "memory": mem, "text_prototypes": None})
    assert "i2tce" not in out
    assert torch.allclose(mem.centroids, x["memory"], atol=1e-6)
    assert torch.allclose(out["imp"], imp_loss(x["bn_features"], x["memory"], x["targets"], 0.01), atol=1e-5)
    assert torch.allclose(out["total"], out["id"] + out["imp"] + out["mask_bce"] + out["mask_dice"])


def test_muva_loss_errors():
    x = _stage2_inputs()
    with pytest.raises(ValueError, match="use_i2tce=False"):
        MUVALoss()(**{**x, "text_prototypes": None})
    with pytest.raises(ValueError, match="unknown loss weight"):
        MUVALoss(weights={"triplet": 1.0})


def test_losses_under_autocast_are_float32():
    gen = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(8, 8)
    x, text = torch.randn(4, 8, generator=gen), torch.randn(3, 8, generator=gen)
    y = torch.tensor([0, 1, 2, 0])
    ref = i2tce_loss(lin(x), text, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = lin(x)
        assert feats.dtype == torch.bfloat16
        value = i2tce_loss(feats, text, y)
        total, _, _ = mask_loss(feats.reshape(1, 4, 1, 8), (x > 0).reshape(4, 1, 8))
    assert value.dtype == torch.float32 and total.dtype == torch.float32
    assert abs(float(value.detach()) - float(ref.detach())) < 2e-2
