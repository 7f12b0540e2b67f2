"""AM-MSA: attention-mask structure, masked attention semantics, RMP, gating, stripes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from muva_core.model import (
    BackboneConfig,
    MaskGating,
    ResidualMaskPredictor,
    additive_attention_mask,
    block_attention_weights,
    build_attention_mask,
    build_clip,
    masked_block_forward,
    stripe_part_masks,
)


@pytest.fixture(scope="module")
def tiny_visual():
    clip, _ = build_clip(BackboneConfig(name="tiny", seed=3))
    return clip.visual.eval()


def _expected_allowed(part_masks: torch.Tensor) -> torch.Tensor:
    """The AM-MSA rules written out element by element."""
    B, P, N = part_masks.shape
    T = 1 + P + N
    out = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                if i == 0 or j == 0:
                    ok = True
                elif i <= P and j <= P:
                    ok = i == j
                elif i <= P:
                    ok = bool(part_masks[b, i - 1, j - 1 - P])
                elif j <= P:
                    ok = bool(part_masks[b, j - 1, i - 1 - P])
                else:
                    ok = True
                out[b, i, j] = ok
    return out


def test_attention_mask_structure_matches_rules():
    g = torch.Generator().manual_seed(0)
    part = torch.rand(2, 3, 6, generator=g) > 0.5
    part[1, 2] = False  # one empty part
    mask = build_attention_mask(part)
    assert mask.shape == (2, 1, 10, 10) and mask.dtype == torch.bool
    assert torch.equal(mask[:, 0], _expected_allowed(part))
    # float masks (pseudo labels as 0/1 floats) give the same
    assert torch.equal(build_attention_mask(part.float()), mask)
    # every row has at least one allowed entry, even with all parts empty
    empty = build_attention_mask(torch.zeros(2, 3, 6, dtype=torch.bool))
    assert bool(empty.any(-1).all())
    assert torch.equal(empty[0, 0, 1:4, 1:4], torch.eye(3, dtype=torch.bool))


def test_attention_mask_rows_are_aligned():
    mask = build_attention_mask(torch.ones(2, 3, 128, dtype=torch.bool))
    assert mask.shape[-1] == 132
    assert mask.stride(-2) % 8 == 0  # padded rows for the fused SDPA kernels


def test_additive_mask_values():
    part = torch.tensor([[[True, False]]])
    add = additive_attention_mask(build_attention_mask(part), torch.float32)
    # tokens: CLS, local, patch0, patch1
    assert add[0, 0, 1].tolist() == [0.0, 0.0, 0.0, float("-inf")]
    assert add[0, 0, 3].tolist() == [0.0, float("-inf"), 0.0, 0.0]
    assert add[0, 0, 0].tolist() == [0.0] * 4


def _tokens(visual, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = visual.grid_size[0] * visual.grid_size[1]
    return torch.randn(batch, 1 + 3 + n, visual.conv1.out_channels, generator=g)


def test_masked_attention_semantics_in_one_block(tiny_visual):
    blk = tiny_visual.transformer.resblocks[0]
    x = _tokens(tiny_visual)
    N = x.shape[1] - 4
    part = torch.zeros(2, 3, N, dtype=torch.bool)
    part[:, 0, :10] = True          # head: first 10 patches
    part[:, 1, 40:80] = True        # upper
    part[0, 2, 100:] = True         # legs of image 0; image 1 has an empty legs mask
    mask = build_attention_mask(part)
    w = block_attention_weights(blk, x, mask)               # [B, H, T, T]
    # local head token (row 1): masked patch -> exactly 0; unmasked patch -> > 0
    assert bool((w[:, :, 1, 4 + 10:] == 0).all())
    assert bool((w[:, :, 1, 4:4 + 10] > 0).all())
    # local tokens never attend to the other local tokens
    assert bool((w[:, :, 1, 2:4] == 0).all())
    # CLS attends to everything
    assert bool((w[:, :, 0] > 0).all())
    # patch -> local follows the part mask (patch 5 is head-only)
    assert bool((w[:, :, 4 + 5, 1] > 0).all()) and bool((w[:, :, 4 + 5, 2:4] == 0).all())
    # the empty part: its token attends only to CLS and itself, rows still sum to 1
    assert bool((w[1, :, 3, 4:] == 0).all()) and bool((w[1, :, 3, [0, 3]] > 0).all())
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))

    # the SDPA block forward agrees: perturbing a masked patch leaves the head token unchanged,
    # perturbing one of its patches changes it
    with torch.no_grad():
        y = masked_block_forward(blk, x, mask)
        noise = torch.randn(2, x.shape[-1], generator=torch.Generator().manual_seed(9)) * 3
        x_out = x.clone()
        x_out[:, 4 + 20] += noise   # not a constant shift: ln_1 would remove that
        x_in = x.clone()
        x_in[:, 4 + 3] += noise
        y_out = masked_block_forward(blk, x_out, mask)
        y_in = masked_block_forward(blk, x_in, mask)
    assert torch.allclose(y_out[:, 1], y[:, 1], atol=1e-6)
    assert not torch.allclose(y_in[:, 1], y[:, 1], atol=1e-3)
    assert not torch.allclose(y_out[:, 0], y[:, 0], atol=1e-3)  # CLS sees every patch


def test_block_forward_bool_equals_additive_and_explicit(tiny_visual):
    blk = tiny_visual.transformer.resblocks[1]
    x = _tokens(tiny_visual, seed=1)
    part = torch.rand(2, 3, x.shape[1] - 4, generator=torch.Generator().manual_seed(2)) > 0.5
    mask = build_attention_mask(part)
    with torch.no_grad():
        y_bool = masked_block_forward(blk, x, mask)
        y_add = masked_block_forward(blk, x, additive_attention_mask(mask))
        # explicit: weights @ v, out_proj, mlp
        w = block_attention_weights(blk, x, mask)
        B, T, D = x.shape
        H = blk.attn.num_heads
        v = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)[..., 2 * D:]
        v = v.view(B, T, H, D // H).transpose(1, 2)
        o = (w @ v).transpose(1, 2).reshape(B, T, D)
        ref = x + blk.attn.out_proj(o)
        ref = ref + blk.mlp(blk.ln_2(ref))
    assert torch.allclose(y_bool, y_add, atol=1e-5)
    assert torch.allclose(y_bool, ref, atol=1e-4)
    # without a mask it is exactly open_clip's own block
    with torch.no_grad():
        assert torch.allclose(masked_block_forward(blk, x), blk(x), atol=1e-5)


def test_empty_masks_no_nan_in_output_and_grads(tiny_visual):
    blk = tiny_visual.transformer.resblocks[0]
    x = _tokens(tiny_visual).requires_grad_(True)
    mask = build_attention_mask(torch.zeros(2, 3, x.shape[1] - 4, dtype=torch.bool))
    y = masked_block_forward(blk, x, mask)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_rmp_fused_cross_attention_equals_reference(heads):
    torch.manual_seed(heads)
    rmp = ResidualMaskPredictor(width=64, n_patches=24, n_parts=3, heads=heads)
    with torch.no_grad():  # non-zero biases: the key bias must cancel, the value bias carry over
        rmp.in_proj_bias.normal_()
        rmp.out_proj.bias.normal_()
    q, kv = torch.randn(3, 3, 64), torch.randn(3, 24, 64)
    fused = rmp.cross_attention(q, kv)
    ref = rmp.cross_attention_reference(q, kv)
    assert fused.shape == (3, 3, 64)
    assert torch.allclose(fused, ref, atol=1e-5)
    # the gradients agree as well
    g1 = torch.autograd.grad(fused.square().sum(), [rmp.in_proj_weight, rmp.in_proj_bias])
    g2 = torch.autograd.grad(rmp.cross_attention_reference(q, kv).square().sum(),
                             [rmp.in_proj_weight, rmp.in_proj_bias])
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g1, g2))


@pytest.mark.parametrize("heads", [2, 8])
def test_rmp_without_qkv_bias_equals_reference(heads):
    """The reference RMP (q/k/v without bias, QuickGELU, trunc-normal init): same fused computation."""
    torch.manual_seed(heads)
    rmp = ResidualMaskPredictor(width=64, n_patches=24, n_parts=3, heads=heads, activation="quickgelu",
                                qkv_bias=False, init="trunc_normal")
    assert rmp.in_proj_bias is None and "in_proj_bias" not in rmp.state_dict()
    q, kv = torch.randn(3, 3, 64), torch.randn(3, 24, 64)
    torch.testing.assert_close(rmp.cross_attention(q, kv), rmp.cross_attention_reference(q, kv), rtol=1e-5, atol=1e-6)
    assert rmp(q, kv).shape == (3, 3, 24)


def test_rmp_rejects_unknown_activation_and_init():
    with pytest.raises(ValueError, match="activation"):
        ResidualMaskPredictor(width=64, n_patches=24, n_parts=3, activation="relu")
    with pytest.raises(ValueError, match="init"):
        ResidualMaskPredictor(width=64, n_patches=24, n_parts=3, init="kaiming")


@pytest.mark.parametrize("layernorm,residual", [(True, True), (True, False), (False, True), (False, False)])
def test_rmp_structure_switches(layernorm, residual):
    torch.manual_seed(0)
    rmp = ResidualMaskPredictor(32, 16, 3, heads=2, layernorm=layernorm, residual=residual)
    assert isinstance(rmp.ln_q, torch.nn.LayerNorm) == layernorm
    r, f = torch.randn(2, 3, 32), torch.randn(2, 16, 32)
    ln = (lambda m, t: F.layer_norm(t, (32,), m.weight, m.bias)) if layernorm else (lambda m, t: t)
    ca = rmp.cross_attention_reference(ln(rmp.ln_q, r), ln(rmp.ln_kv, f))
    if residual:
        ca = ca + r
    expected = rmp.mlp(ln(rmp.ln_out, ca))
    out = rmp(r, f)
    assert out.shape == (2, 3, 16)
    assert torch.allclose(out, expected, atol=1e-5)
    prev = torch.randn(2, 3, 16)
    assert torch.allclose(rmp(r, f, prev), out + prev, atol=1e-6)   # residual across layers


def test_rmp_rejects_bad_heads_and_shapes():
    with pytest.raises(ValueError, match="heads"):
        ResidualMaskPredictor(30, 16, 3, heads=4)
    rmp = ResidualMaskPredictor(32, 16, 3)
    with pytest.raises(ValueError, match="RMP expects"):
        rmp(torch.randn(1, 3, 32), torch.randn(1, 15, 32))


def test_mask_gating_threshold_semantics():
    logits = torch.tensor([[[-3.0, -1e-4, 0.0, 1e-3, 1.0, math.log(4.0) + 1e-3]]], requires_grad=True)
    gate = MaskGating(0.5)
    out = gate(logits)
    assert out.dtype == torch.bool and not out.requires_grad
    assert out[0, 0].tolist() == [False, False, False, True, True, True]    # strictly above t
    # t = 0.8 <=> logit > log(4)
    assert MaskGating(0.8)(logits)[0, 0].tolist() == [False, False, False, False, False, True]
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="threshold"):
            MaskGating(bad)


def test_stripe_masks():
    s = stripe_part_masks((16, 8))
    assert s.shape == (3, 128) and s.dtype == torch.bool
    assert torch.equal(s.sum(0), torch.ones(128, dtype=torch.long))     # a partition
    rows = s.view(3, 16, 8)[:, :, 0]
    # equal thirds of the height by patch centre: rows 0-4 head, 5-10 upper, 11-15 legs
    assert rows[0].nonzero().flatten().tolist() == list(range(0, 5))
    assert rows[1].nonzero().flatten().tolist() == list(range(5, 11))
    assert rows[2].nonzero().flatten().tolist() == list(range(11, 16))
    assert bool(s.view(3, 16, 8).all(-1).eq(s.view(3, 16, 8).any(-1)).all())  # whole rows
    # a subset keeps each part's own window
    legs = stripe_part_masks((12, 4), parts=("legs",))
    assert legs.view(12, 4)[:, 0].nonzero().flatten().tolist() == list(range(8, 12))
    with pytest.raises(ValueError, match="unknown part"):
        stripe_part_masks((16, 8), parts=("arms",))
