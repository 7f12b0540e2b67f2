"""Backbone (open_clip, pos-embed resize, frozen conv1) and the MUVA image encoder."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from muva_core.data.samples import PARTS
from muva_core.model import (
    BackboneConfig,
    MUVAConfig,
    MUVAEncoder,
    build_clip,
    parts_from_code,
    stripe_part_masks,
)

B = 2


@pytest.fixture(scope="module")
def tiny_clip():
    clip, tok = build_clip(BackboneConfig(name="tiny", seed=0))
    return clip


@pytest.fixture
def visual(tiny_clip):
    return copy.deepcopy(tiny_clip.visual)


@pytest.fixture(scope="module")
def images():
    return torch.randn(B, 3, 256, 128, generator=torch.Generator().manual_seed(0))


def _train_step(enc: MUVAEncoder, images: torch.Tensor, **kw) -> None:
    """One forward + backward with a feature loss and (if present) a mask loss; all finite."""
    enc.train()
    out = enc(images, **kw)
    loss = out.bn_features.pow(2).mean()
    if out.mask_logits:
        target = torch.zeros_like(out.stacked_mask_logits)
        loss = loss + F.binary_cross_entropy_with_logits(out.stacked_mask_logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in enc.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------- backbone
@pytest.mark.parametrize("name,width,embed", [("tiny", 64, 64), ("small", 192, 128)])
def test_named_configs_build_with_16x8_grid(name, width, embed, images):
    clip, tok = build_clip(BackboneConfig(name=name))
    v = clip.visual
    assert tuple(v.grid_size) == (16, 8)
    assert v.positional_embedding.shape == (1 + 128, width)
    assert v.proj.shape == (width, embed)
    assert not v.conv1.weight.requires_grad
    assert tok.context_length == clip.context_length == 77
    enc = MUVAEncoder(v).eval()
    with torch.no_grad():
        out = enc(images)
    L = len(v.transformer.resblocks)
    assert out.features.shape == out.bn_features.shape == (B, 4 * embed)
    assert out.granularity_features.shape == (B, 4, embed)
    assert len(out.mask_logits) == L and out.stacked_mask_logits.shape == (L, B, 3, 128)


def test_vit_b_16_architecture_random_weights():
    clip, _ = build_clip(BackboneConfig(name="vit-b-16", pretrained=None))
    v = clip.visual
    assert tuple(v.grid_size) == (16, 8) and v.positional_embedding.shape == (129, 768)
    assert len(v.transformer.resblocks) == 12 and v.transformer.resblocks[0].attn.num_heads == 12
    enc = MUVAEncoder(v, MUVAConfig(rmp_heads=8)).eval()
    assert enc.feat_dim == 2048 and len(enc.rmp) == 12 and enc.rmp[0].heads == 8
    assert not v.conv1.weight.requires_grad


def _bilinear_reference(grid: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Independent bilinear resize (half-pixel centres, edge clamp) of grid [h, w, C]."""
    h, w, _ = grid.shape
    out = torch.empty(out_h, out_w, grid.shape[-1])
    for i in range(out_h):
        y = min(max((i + 0.5) * h / out_h - 0.5, 0.0), h - 1)
        y0 = int(y)
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(out_w):
            x = min(max((j + 0.5) * w / out_w - 0.5, 0.0), w - 1)
            x0 = int(x)
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = grid[y0, x0] * (1 - fx) + grid[y0, x1] * fx
            bot = grid[y1, x0] * (1 - fx) + grid[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bot * fy
    return out


def test_checkpoint_pos_embed_resized_bilinear_class_kept(tmp_path):
    src, _ = build_clip(BackboneConfig(name="tiny", image_size=(224, 224), seed=5))
    assert tuple(src.visual.grid_size) == (14, 14)
    path = tmp_path / "clip_tiny_224.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))

    clip, _ = build_clip(BackboneConfig(name="tiny", checkpoint_path=str(path), seed=99))
    old = src.visual.positional_embedding.detach()
    new = clip.visual.positional_embedding.detach()
    assert new.shape == (1 + 16 * 8, old.shape[1])
    assert torch.equal(new[0], old[0])                                  # class position kept
    old_grid = old[1:].view(14, 14, -1)
    new_grid = new[1:].view(16, 8, -1)
    # corners by hand: 14 -> 16 rows clamps to row 0 / 13; 14 -> 8 cols samples x = 0.375 / 12.625
    assert torch.allclose(new_grid[0, 0], 0.625 * old_grid[0, 0] + 0.375 * old_grid[0, 1], atol=1e-6)
    assert torch.allclose(new_grid[15, 7], 0.375 * old_grid[13, 12] + 0.625 * old_grid[13, 13], atol=1e-6)
    assert torch.allclose(new_grid, _bilinear_reference(old_grid, 16, 8), atol=1e-5)
    # everything else loaded unchanged
    assert torch.equal(clip.visual.conv1.weight, src.visual.conv1.weight)
    assert torch.equal(clip.token_embedding.weight, src.token_embedding.weight)


def test_checkpoint_missing_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "clip.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_clip(BackboneConfig(name="tiny", checkpoint_path=str(missing)))


def test_checkpoint_of_other_architecture_is_a_clear_error(tmp_path):
    src, _ = build_clip(BackboneConfig(name="tiny"))
    state = {k: v.contiguous() for k, v in src.state_dict().items() if not k.startswith("ln_final")}
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(RuntimeError, match="broken.safetensors"):
        build_clip(BackboneConfig(name="tiny", checkpoint_path=str(path)))


def _openai_torchscript_archive(state: dict[str, torch.Tensor], path) -> None:
    """A TorchScript archive laid out like OpenAI's original ViT-B-16.pt: a scripted module tree whose
    state dict is ``state`` (OpenAI key layout = open_clip's) in half precision, plus OpenAI's
    ``input_resolution`` / ``context_length`` / ``vocab_size`` entries."""
    class Node(torch.nn.Module):
        def forward(self) -> int:
            return 0

    root = Node()
    for key, t in state.items():
        *path_, leaf = key.split(".")
        m = root
        for name in path_:
            if name not in m._modules:
                m.add_module(name, Node())
            m = m._modules[name]
        value = t.detach().clone().half() if t.is_floating_point() else t.detach().clone()
        m.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    for key, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(key, torch.tensor(value))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(root), str(path))


def test_torchscript_archive_checkpoint_is_read_with_jit_load(tmp_path, monkeypatch):
    """OpenAI's original .pt (a TorchScript archive, what CLIP-ReID loads with torch.jit.load) loads
    like any other CLIP checkpoint; the weights equal the source's (half precision, as OpenAI's)."""
    import zipfile

    from open_clip.model import build_model_from_openai_state_dict

    from muva_core.model.backbone import is_torchscript_archive, read_clip_state_dict

    src, _ = build_clip(BackboneConfig(name="tiny", image_size=(224, 224), seed=5))
    path = tmp_path / "ViT-tiny.pt"
    _openai_torchscript_archive(src.state_dict(), path)
    assert is_torchscript_archive(path)
    with pytest.raises(RuntimeError, match="TorchScript"), pytest.warns(UserWarning):   # weights_only=True refuses it
        torch.load(path, weights_only=True)

    state = read_clip_state_dict(path)
    assert set(state) == set(src.state_dict())                        # export metadata dropped, keys as open_clip's
    # open_clip's own OpenAI conversion builds a CLIP from the same state dict (a 224 grid, the source's shapes)
    oc = build_model_from_openai_state_dict(dict(state), quick_gelu=True, cast_dtype=torch.float32)
    assert set(oc.state_dict()) >= set(state)

    clip, _ = build_clip(BackboneConfig(name="tiny", checkpoint_path=str(path), image_size=(224, 224), seed=99))
    for key, value in src.state_dict().items():
        expected = value.half().to(value.dtype) if value.is_floating_point() else value
        assert torch.equal(clip.state_dict()[key], expected), key
        assert torch.equal(oc.state_dict()[key].to(value.dtype), expected), key
    # at the 256 x 128 input the positional grid is resized as for any checkpoint
    tall, _ = build_clip(BackboneConfig(name="tiny", checkpoint_path=str(path), seed=99))
    assert tall.visual.positional_embedding.shape[0] == 1 + 16 * 8
    assert torch.equal(tall.visual.conv1.weight, src.visual.conv1.weight.half().float())
    # the user's path: -p checkpoint_path=<the archive> through the run configuration
    from muva_core.config import RunConfig
    from muva_core.model.factory import build_muva

    cfg = RunConfig().update({"backbone": "tiny", "pretrained": "none", "checkpoint_path": str(path)})
    built = build_muva(cfg, num_classes=3)
    assert torch.equal(built.clip.token_embedding.weight, src.token_embedding.weight.half().float())
    assert torch.equal(built.model.encoder.visual.proj, src.visual.proj.half().float())

    # a plain torch.save zip is not TorchScript: it still goes through torch.load(weights_only=True)
    plain = tmp_path / "plain.pt"
    torch.save(src.state_dict(), plain)
    assert zipfile.is_zipfile(plain) and not is_torchscript_archive(plain)
    calls = []
    real_load, real_jit = torch.load, torch.jit.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or real_load(*a, **kw))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **kw: calls.append("jit") or real_jit(*a, **kw))
    loaded, _ = build_clip(BackboneConfig(name="tiny", checkpoint_path=str(plain), image_size=(224, 224), seed=99))
    assert calls == [True]
    assert torch.equal(loaded.visual.conv1.weight, src.visual.conv1.weight)
    calls.clear()
    read_clip_state_dict(path)
    assert calls == ["jit"]


def test_unreadable_checkpoint_names_the_path(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="garbage.pt"):
        build_clip(BackboneConfig(name="tiny", checkpoint_path=str(bad)))


def test_backbone_config_validation():
    assert BackboneConfig(name="tiny").pretrained is None
    assert BackboneConfig(name="vit-b-16").pretrained == "openai"
    with pytest.raises(ValueError, match="no pretrained"):
        BackboneConfig(name="tiny", pretrained="openai")
    with pytest.raises(ValueError, match="unknown backbone"):
        BackboneConfig(name="vit-h")


def test_backbone_seeded_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _ = build_clip(BackboneConfig(name="tiny", seed=7))
    after = torch.rand(1)
    assert torch.equal(before, after)
    b, _ = build_clip(BackboneConfig(name="tiny", seed=7))
    c, _ = build_clip(BackboneConfig(name="tiny", seed=8))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.visual.positional_embedding, c.visual.positional_embedding)


# ---------------------------------------------------------------- encoder
def test_no_local_tokens_equals_open_clip_visual(visual, images):
    enc = MUVAEncoder(visual, MUVAConfig(parts=())).eval()
    with torch.no_grad():
        out = enc(images)
        ref = visual(images)
    assert out.features.shape == (B, visual.proj.shape[1])
    assert torch.allclose(out.granularity_features[:, 0], ref, atol=1e-5)
    assert out.mask_logits == () and enc.rmp is None


def test_local_tokens_after_cls_with_cls_position(visual, images):
    enc = MUVAEncoder(visual)
    assert enc.local_tokens.shape == (3, 64)
    x = enc.embed(images)
    assert x.shape == (B, 1 + 3 + 128, 64)
    pos0 = visual.positional_embedding[0]
    expected = visual.ln_pre(enc.local_tokens + pos0)
    assert torch.allclose(x[0, 1:4], expected, atol=1e-6)
    assert torch.allclose(x[0, 0], visual.ln_pre(visual.class_embedding + pos0), atol=1e-6)
    # N(0, 0.02) init (a 3 x 768 draw would be tighter; 192 values still pin the scale)
    std = MUVAEncoder(copy.deepcopy(visual), MUVAConfig(seed=1)).local_tokens.std().item()
    assert 0.014 < std < 0.026
    with pytest.raises(ValueError, match="images must be"):
        enc.embed(torch.randn(1, 3, 224, 224))


def test_conv1_frozen_and_bn_bias_frozen(visual, images):
    enc = MUVAEncoder(visual)
    _train_step(enc, images)
    assert visual.conv1.weight.grad is None
    assert enc.bottleneck.bias.grad is None and not enc.bottleneck.bias.requires_grad
    assert enc.local_tokens.grad is not None and enc.local_tokens.grad.abs().sum() > 0
    assert visual.transformer.resblocks[0].attn.in_proj_weight.grad is not None
    rmp_ids = {id(p) for p in enc.rmp_parameters()}
    assert rmp_ids and all(id(p) not in rmp_ids for p in enc.base_parameters())
    n_trainable = sum(1 for p in enc.parameters() if p.requires_grad)
    assert len(rmp_ids) + sum(1 for _ in enc.base_parameters()) == n_trainable


def test_residual_logits_gating_and_detached_threshold(visual, images):
    enc = MUVAEncoder(visual)
    captured = []
    hooks = [m.register_forward_hook(lambda m, a, o: captured.append((m, a, o))) for m in enc.rmp]
    out = enc(images)
    for h in hooks:
        h.remove()
    assert len(captured) == len(out.mask_logits) == 2
    prev = None
    for (m, args, o), logits, parts in zip(captured, out.mask_logits, out.part_masks):
        local, patches, prev_in = args
        assert (prev_in is None) == (prev is None)
        own = m(local, patches, None)
        expected = own if prev is None else own + prev
        assert torch.allclose(logits, expected, atol=1e-5)     # layer l = previous sum + its own
        assert torch.equal(parts, torch.sigmoid(logits.detach()) > 0.5)
        prev = logits
    assert out.final_mask_logits is out.mask_logits[-1]
    # the gate is not differentiable: a feature-only loss gives the RMP no gradient
    out.bn_features.pow(2).mean().backward()
    assert all(p.grad is None for p in enc.rmp_parameters())


def test_empty_predicted_masks_no_nan(visual, images):
    enc = MUVAEncoder(visual)
    with torch.no_grad():
        for rmp in enc.rmp:  # logits -20 everywhere: every part mask empty in every layer
            rmp.mlp[-1].weight.zero_()
            rmp.mlp[-1].bias.fill_(-10.0)
    out = enc(images)
    assert all(not p.any() for p in out.part_masks)
    assert torch.isfinite(out.bn_features).all()
    _train_step(enc, images)


def test_pseudo_mode_masks(visual, images):
    enc = MUVAEncoder(visual, MUVAConfig(mask_mode="pseudo")).eval()
    g = torch.zeros(B, 3, 128)
    g[:, 0, :16] = 1.0
    g[:, 2, 64:] = 1.0          # upper body empty
    with torch.no_grad():
        out = enc(images, part_masks=g)
    assert out.mask_logits == () and out.final_mask_logits is None
    assert all(torch.equal(p, g > 0.5) for p in out.part_masks)
    assert torch.isfinite(out.features).all()
    with pytest.raises(ValueError, match="needs part_masks"):
        enc(images)
    with pytest.raises(ValueError, match="only used with"):
        enc(images, part_masks=g, mask_mode="predicted")
    # a predicted-mode model can compute pseudo-masked features per call (memories)
    enc2 = MUVAEncoder(copy.deepcopy(visual), MUVAConfig(parts=("legs",))).eval()
    with torch.no_grad():
        o3 = enc2(images, part_masks=g, mask_mode="pseudo")            # 3-channel masks: legs picked
        o1 = enc2(images, part_masks=g[:, 2:], mask_mode="pseudo")
    assert torch.equal(o3.part_masks[0], g[:, 2:] > 0.5)
    assert torch.allclose(o3.features, o1.features)


def test_stripe_mode(visual, images):
    enc = MUVAEncoder(visual, MUVAConfig(mask_mode="stripe"))
    assert enc.rmp is None
    with torch.no_grad():
        out = enc.eval()(images)
    stripes = stripe_part_masks((16, 8))
    assert len(out.part_masks) == 2 and all(torch.equal(p, stripes.expand(B, -1, -1)) for p in out.part_masks)
    assert out.mask_logits == ()
    with pytest.raises(ValueError, match="no RMP"):
        enc(images, mask_mode="predicted")
    _train_step(enc, images)


GRANULARITY_CODES = ["G", "G+H", "G+U", "G+L", "G+H+U", "G+H+L", "G+U+L", "G+H+U+L"]


@pytest.mark.parametrize("code", GRANULARITY_CODES)
def test_granularity_subsets_forward_backward(code, visual, images):
    parts = parts_from_code(code)
    enc = MUVAEncoder(visual, MUVAConfig(parts=parts))
    assert enc.n_parts == len(code.split("+")) - 1
    out = enc(images)
    assert out.granularity_features.shape == (B, 1 + len(parts), 64)
    assert out.bn_features.shape == (B, (1 + len(parts)) * 64)
    if parts:
        assert out.stacked_mask_logits.shape == (2, B, len(parts), 128)
    _train_step(enc, images)


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_rmp_heads_forward_backward(heads, visual, images):
    enc = MUVAEncoder(visual, MUVAConfig(rmp_heads=heads))
    assert all(m.heads == heads for m in enc.rmp)
    _train_step(enc, images)
    assert all(p.grad is not None for p in enc.rmp_parameters())


@pytest.mark.parametrize("ln,rc", [(True, True), (True, False), (False, True), (False, False)])
def test_rmp_ln_rc_switches_forward_backward(ln, rc, visual, images):
    enc = MUVAEncoder(visual, MUVAConfig(rmp_layernorm=ln, rmp_residual=rc))
    assert all(isinstance(m.ln_q, torch.nn.LayerNorm) == ln and m.residual == rc for m in enc.rmp)
    _train_step(enc, images)


def test_config_validation_and_codes():
    assert parts_from_code("G") == ()
    assert parts_from_code("g+l+h") == ("head", "legs")
    assert MUVAConfig(parts=("legs", "head")).parts == ("head", "legs")   # canonical order
    assert MUVAConfig(parts="G+U").parts == ("upper",)
    assert MUVAConfig(parts="legs").parts == ("legs",)
    assert MUVAConfig().granularities == ("global",) + PARTS
    for bad in ("H+U", "G+X", "G+H+H"):
        with pytest.raises(ValueError):
            parts_from_code(bad)
    with pytest.raises(ValueError, match="mask_mode"):
        MUVAConfig(mask_mode="boxes")
    with pytest.raises(ValueError, match="parts"):
        MUVAConfig(parts=("arms",))
    with pytest.raises(ValueError, match="threshold"):
        MUVAConfig(threshold=1.0)


def test_determinism_for_a_seed(tiny_clip, images):
    a = MUVAEncoder(copy.deepcopy(tiny_clip.visual), MUVAConfig(seed=4)).eval()
    b = MUVAEncoder(copy.deepcopy(tiny_clip.visual), MUVAConfig(seed=4)).eval()
    c = MUVAEncoder(copy.deepcopy(tiny_clip.visual), MUVAConfig(seed=5)).eval()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.local_tokens, c.local_tokens)
    with torch.no_grad():
        assert torch.equal(a(images).bn_features, b(images).bn_features)


def test_grad_checkpointing_same_gradients(tiny_clip, images):
    grads = []
    for ckpt in (False, True):
        enc = MUVAEncoder(copy.deepcopy(tiny_clip.visual), MUVAConfig(seed=2))
        enc.set_grad_checkpointing(ckpt)
        _train_step(enc, images)
        grads.append([p.grad.clone() for p in enc.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_inference_features_normalised(visual, images):
    enc = MUVAEncoder(visual).eval()
    f = enc.inference_features(images)
    assert f.shape == (B, 4 * 64)
    assert torch.allclose(f.norm(dim=-1), torch.ones(B), atol=1e-5)


def test_the_model_package_imports_nothing_above_it():
    """``muva_core/model`` imports only ``config``, ``paths``, ``io`` and ``data`` of the project (and itself), counting
    imports inside functions: the pretrained CLIP's file name lives in ``model/checkpoints.py`` (issue 21)."""
    import ast
    from pathlib import Path

    import muva_core.model

    allowed = {"config", "paths", "io", "data", "model"}
    bad = []
    for path in sorted(Path(muva_core.model.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:                 # from .x: inside model/
                    continue
                if node.level == 2:                 # from ..x import y / from .. import y
                    tops = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
                elif (node.module or "").startswith("muva_core"):
                    tops = [(node.module.split(".") + [""])[1] or a.name for a in node.names]
                else:
                    continue
            elif isinstance(node, ast.Import):
                tops = [a.name.split(".")[1] for a in node.names if a.name.startswith("muva_core.")]
            else:
                continue
            bad += [f"{path.name}:{node.lineno}: {t}" for t in tops if t not in allowed]
    assert not bad, bad
