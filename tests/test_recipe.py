"""The training recipes (issue 11).

``recipe: reference`` is checked item by item against values computed here, independently, from the
formulas of the authors' code (RikoLi/MUVA @ 8965263; file names in each test); ``recipe: workbook`` (the
default) is checked to give the numbers it gave before the recipes existed (pinned from commit 89b3a1b).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import tiny_run_config
from muva_core.config import RECIPES, RECIPE_KEYS, ConfigError, RunConfig, resolve_config
from muva_core.data.protocols import get_protocol, list_protocols
from muva_core.model.ammsa import QuickGELU, ResidualMaskPredictor
from muva_core.model.factory import build_muva
from muva_core.model.muva import MUVAOutput
from muva_core.model.prompts import PromptLearner, PromptConfig
from muva_core.train.memory import PrototypeMemory
from muva_core.train.stage1 import (
    amp_settings,
    build_stage1_optimizer,
    grad_scaler,
    stage1_centroids,
    stage1_loss,
    train_stage1,
)
from muva_core.train.stage2 import build_optimizer, stage2_losses

ROOT = Path(__file__).resolve().parents[1]
TINY = {"backbone": "tiny", "pretrained": "none", "device": "cpu"}


def reference_cfg(**overrides) -> RunConfig:
    return RunConfig().update({"recipe": "reference", **TINY, **overrides})


def workbook_cfg(**overrides) -> RunConfig:
    return RunConfig().update({**TINY, **overrides})


# ---- hand-written reference formulas ------------------------------------------------------------
def ref_label_smooth_ce(logits: torch.Tensor, y: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """losses/ce_loss.py CrossEntropyLabelSmooth: (-((1-eps) onehot + eps/C) * log_softmax).mean(0).sum()."""
    C = logits.shape[1]
    log_p = logits.double().log_softmax(1)
    q = torch.full_like(log_p, eps / C)
    q[torch.arange(len(y)), y] += 1 - eps
    return (-q * log_p).mean(0).sum()


def ref_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = logits.double()
    return (logits.logsumexp(1) - logits[torch.arange(len(y)), y]).mean()


def ref_cluster_centroids(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """engine/utils.py compute_cluster_centroids: per-class mean of the raw features, L2-normalised as one vector."""
    C = int(labels.max()) + 1
    out = torch.zeros(C, features.shape[1], dtype=torch.float64)
    for i in range(C):
        out[i] = features[labels == i].double().mean(0)
    return out / out.norm(dim=1, keepdim=True)


def ref_dice(prob: torch.Tensor, gt: torch.Tensor, smooth: float = 1e-6, scale: float = 1000.0) -> torch.Tensor:
    """losses/mask_loss.py DiceLoss: prob [L, B, R, N], gt [B, R, N] in {0, 1} (inside = 1)."""
    L = prob.shape[-1]
    p = prob.double().reshape(-1, L)
    g = gt.double().unsqueeze(0).expand(prob.shape[0], -1, -1, -1).reshape(-1, L)
    inter = p * g / scale
    union = (p / scale).sum(1) + (g / scale).sum(1)
    return 1 - ((2 * inter.sum(1) + smooth) / (union + smooth)).mean()


def ref_bce(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """BCEMaskLoss: mean over layers, samples, parts, patches of -(g log s + (1 - g) log(1 - s))."""
    x = logits.double()
    g = gt.double().unsqueeze(0).expand_as(x)
    return (-(g * F.logsigmoid(x) + (1 - g) * F.logsigmoid(-x))).mean()


class RefCrossAttention(nn.Module):
    """model/utils.py CrossAttention: q/k/v without bias, out with bias, heads of contiguous channels."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, y):
        h = self.heads
        q, k, v = self.to_q(x), self.to_k(y), self.to_v(y)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], h, -1).permute(0, 2, 1, 3)  # b n (h d) -> b h n d
        q, k, v = split(q), split(k), split(v)
        attn = (torch.einsum("bhid,bhjd->bhij", q, k) * self.scale).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
        return self.to_out(out)


class RefMaskPredictor(nn.Module):
    """model/ammsa.py MaskPredictor with LN and the inner shortcut (the full-model configs)."""

    def __init__(self, dim: int, heads: int, n_patches: int) -> None:
        super().__init__()
        self.cross_attn = RefCrossAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, n_patches), QuickGELU(), nn.Linear(n_patches, n_patches))
        self.ln_attn1, self.ln_attn2, self.ln_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x_part, x_patch):
        out = self.cross_attn(self.ln_attn1(x_part), self.ln_attn2(x_patch)) + x_part
        return self.mlp(self.ln_mlp(out))

    @classmethod
    def from_rmp(cls, rmp: ResidualMaskPredictor) -> "RefMaskPredictor":
        """The same weights, copied into the reference layout."""
        ref = cls(rmp.width, rmp.heads, rmp.n_patches)
        wq, wk, wv = rmp.in_proj_weight.detach().chunk(3)
        with torch.no_grad():
            ref.cross_attn.to_q.weight.copy_(wq)
            ref.cross_attn.to_k.weight.copy_(wk)
            ref.cross_attn.to_v.weight.copy_(wv)
            ref.cross_attn.to_out.load_state_dict(rmp.out_proj.state_dict())
            ref.mlp.load_state_dict(rmp.mlp.state_dict())
            ref.ln_attn1.load_state_dict(rmp.ln_q.state_dict())
            ref.ln_attn2.load_state_dict(rmp.ln_kv.state_dict())
            ref.ln_mlp.load_state_dict(rmp.ln_out.state_dict())
        return ref


class FakePrompts(nn.Module):
    """A stand-in prompt learner: one learnable text feature per identity (stage-1 loop tests)."""

    granularities = ("global", "head", "upper", "legs")

    def __init__(self, num_ids: int, dim: int = 32) -> None:
        super().__init__()
        self.ctx = nn.Parameter(torch.randn(num_ids, dim, generator=torch.Generator().manual_seed(0)))

    def forward(self, pids):
        return self.ctx[pids] * 1.0

    def learnable_parameters(self):
        return [self.ctx]


def record_lrs(optimizer) -> list[float]:
    """The learning rate of every optimiser step (a pre-step hook)."""
    lrs: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    return lrs


def workbook_stage1_lrs(cfg, num_ids: int = 50) -> list[float]:
    """The learning rate of every optimiser step of stage 1 on fake prompts against random centroids."""
    prompts = FakePrompts(num_ids)
    optimizer, scheduler = build_stage1_optimizer(prompts, cfg)
    lrs = record_lrs(optimizer)
    train_stage1(prompts, F.normalize(torch.randn(num_ids, 32), dim=1), cfg, torch.device("cpu"), logit_scale=100.0,
                 optimizer=optimizer, scheduler=scheduler, progress=False)
    return lrs


def uneven_labels(n_ids: int, low: int, high: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    labels = [p for p in range(n_ids) for _ in range(int(rng.integers(low, high + 1)))]
    return torch.as_tensor(rng.permutation(labels))


# ---- the recipe key ---------------------------------------------------------------------------------
def test_workbook_is_the_default_and_the_dataclass_defaults():
    flat = RunConfig().to_flat()
    assert flat["recipe"] == "workbook"
    assert {k: flat[k] for k in RECIPE_KEYS} == RECIPES["workbook"]
    assert set(RECIPES["reference"]) == RECIPE_KEYS


def test_a_recipe_sets_the_keys_not_given_and_explicit_keys_win_in_any_order():
    a = RunConfig().update({"recipe": "reference", "norm": "clip"})
    b = RunConfig().update({"norm": "clip"}).update({"recipe": "reference"})
    assert a.to_flat() == b.to_flat()
    assert a.data.norm == "clip" and a.train.cmp_temperature == 1.0 and a.train.stage1_sampling == "images"
    back = RunConfig().update({"recipe": "reference"}).update({"recipe": "workbook"})
    assert back.to_flat() == RunConfig().to_flat()
    with pytest.raises(ConfigError, match="recipe"):
        RunConfig().update({"recipe": "paper"})


def test_two_spellings_of_a_recipe_name_the_same_run(tmp_path):
    from muva_core.config import config_hash

    plain = RunConfig().update({"recipe": "reference", "seed": 1})
    spelled = RunConfig().update({"seed": 1, "train": {"cmp_temperature": 1.0}, "recipe": "reference",
                                  "data": {"norm": "half"}})
    assert plain.to_flat() == spelled.to_flat() and config_hash(plain) == config_hash(spelled)
    path = tmp_path / "config.yaml"
    plain.to_yaml(path)
    again = RunConfig.from_yaml(path)
    assert again.to_flat() == plain.to_flat() and config_hash(again) == config_hash(plain)
    assert config_hash(plain) != config_hash(RunConfig().update({"seed": 1}))


def test_paper_protocol_configs_use_the_reference_recipe_and_synthetic_ones_the_workbook():
    import subprocess
    import sys

    for name in list_protocols():
        cfg = resolve_config(name)
        assert cfg.recipe == ("workbook" if get_protocol(name).synthetic else "reference"), name
    done = subprocess.run([sys.executable, "tools/make_configs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- 1. L_cmp ------------------------------------------------------------------------------------------
def test_item1_cmp_normalises_the_whole_vector_at_temperature_one():
    """engine/coop_trainers.py 102-106: F.normalize(t) @ centroids.T / CLUSTER_NCE_TEMP (1.0), CE."""
    gen = torch.Generator().manual_seed(1)
    raw = torch.randn(6, 4 * 8, generator=gen) * 3
    cents = F.normalize(torch.randn(5, 32, generator=gen), dim=1)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    t = raw.double() / raw.double().norm(dim=1, keepdim=True)
    expected = ref_ce(t @ cents.double().T / 1.0, y)
    got = stage1_loss(raw, cents, y, reference_cfg())
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_item1_workbook_cmp_is_per_granularity_at_clip_temperature():
    gen = torch.Generator().manual_seed(2)
    raw = torch.randn(6, 32, generator=gen)
    cents = torch.randn(5, 32, generator=gen)
    cents = torch.cat([F.normalize(c, dim=1) for c in cents.chunk(4, dim=1)], 1) / 2
    y = torch.tensor([0, 1, 2, 3, 4, 1])
    t = torch.cat([c / c.norm(dim=1, keepdim=True) for c in raw.double().chunk(4, dim=1)], 1) / 2
    expected = ref_ce((t @ cents.double().T) * 14.0, y)   # cosine of unit vectors, / (1 / logit scale)
    assert stage1_loss(raw, cents, y, workbook_cfg(), logit_scale=14.0).item() == pytest.approx(expected.item(), abs=1e-6)
    with pytest.raises(ValueError, match="logit_scale"):
        stage1_loss(raw, cents, y, workbook_cfg())


# ---- 2. VPM-1 ------------------------------------------------------------------------------------------
def test_item2_vpm1_is_the_mean_of_raw_features_normalised_as_one_vector():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(20, 32, generator=gen) * torch.linspace(0.1, 5, 32)
    labels = torch.arange(20) % 5
    got = stage1_centroids(feats, labels, 5, reference_cfg())
    torch.testing.assert_close(got.double(), ref_cluster_centroids(feats, labels), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no image"):
        stage1_centroids(feats, labels, 6, reference_cfg())


def test_item2_workbook_vpm1_averages_per_granularity_normalised_features():
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(12, 32, generator=gen)
    labels = torch.arange(12) % 3
    per_g = lambda x: torch.cat([c / c.norm(dim=1, keepdim=True) for c in x.double().chunk(4, dim=1)], 1) / 2
    x = per_g(feats)
    means = torch.stack([x[labels == i].mean(0) for i in range(3)])
    torch.testing.assert_close(stage1_centroids(feats, labels, 3, workbook_cfg()).double(), per_g(means),
                               rtol=1e-6, atol=1e-6)


# ---- 3. stage-1 batches --------------------------------------------------------------------------------
@pytest.mark.parametrize("low,high", [(8, 8), (2, 30)])
def test_item3_a_stage1_epoch_on_n_images_takes_about_n_over_64_steps(low, high):
    labels = uneven_labels(120, low, high)
    n = len(labels)
    cfg = reference_cfg(stage1_epochs=2, stage1_warmup_epochs=0)
    prompts = FakePrompts(120)
    cents = F.normalize(torch.randn(120, 32), dim=1)
    optimizer, scheduler = build_stage1_optimizer(prompts, cfg)
    batches = []
    optimizer.register_step_pre_hook(lambda opt, a, k: batches.append(1))
    seen_rows = []
    real_forward = prompts.forward
    prompts.forward = lambda ids: (seen_rows.append(len(ids)), real_forward(ids))[1]
    history = train_stage1(prompts, cents, cfg, torch.device("cpu"), logit_scale=100.0, optimizer=optimizer,
                           scheduler=scheduler, progress=False, labels=labels)
    steps = len(batches) / 2
    # pk_sampling: floor(n_i / 4) groups of 4 images per identity, 16 distinct identities a batch
    groups = sum(max(1, int((labels == i).sum()) // 4) for i in range(120))
    assert steps <= groups // 16 and steps >= 0.85 * n / 64
    assert abs(steps - n / 64) <= 0.15 * n / 64
    assert set(seen_rows) == {16}          # 16 identities through the text tower, 64 image rows
    assert list(history["epoch"]) == [1, 2]


def test_item3_workbook_stage1_steps_over_distinct_identities():
    cfg = workbook_cfg(stage1_epochs=1, stage1_warmup_epochs=0, stage1_batch_ids=16)
    lrs = workbook_stage1_lrs(cfg)
    assert len(lrs) == math.ceil(50 / 16)


# ---- 4. L_i2tce -----------------------------------------------------------------------------------------
def fake_output(B: int = 6, G: int = 4, E: int = 8, seed: int = 5) -> MUVAOutput:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, G * E, generator=gen) * 2
    return MUVAOutput(features=feats, bn_features=torch.randn(B, G * E, generator=gen),
                      granularity_features=feats.view(B, G, E))


def test_item4_i2tce_is_the_raw_dot_product_with_raw_text_prototypes():
    """coop_trainers.py 259-271: proj_feat @ text_features.T / I2TCE_TAU (1.0), label-smoothed CE."""
    out = fake_output()
    gen = torch.Generator().manual_seed(6)
    C = 5
    text = torch.randn(C, 32, generator=gen)
    memory = F.normalize(torch.randn(C, 32, generator=gen), dim=1)
    logits = torch.randn(6, C, generator=gen)
    y = torch.tensor([0, 1, 2, 3, 4, 2])
    terms = stage2_losses(out, logits, y, memory, text, None, reference_cfg())
    assert set(terms) == {"id", "imp", "i2tce", "total"}
    assert terms["i2tce"].item() == pytest.approx(ref_label_smooth_ce(out.features @ text.T / 1.0, y).item(), abs=1e-5)
    assert terms["id"].item() == pytest.approx(ref_label_smooth_ce(logits, y).item(), abs=1e-6)
    bn = out.bn_features.double() / out.bn_features.double().norm(dim=1, keepdim=True)
    assert terms["imp"].item() == pytest.approx(ref_ce(bn @ memory.double().T / 0.01, y).item(), rel=1e-5)
    # the workbook: mean per-granularity cosine x CLIP's logit scale
    wb = stage2_losses(out, logits, y, memory, text, None, workbook_cfg(), logit_scale=50.0)
    per_g = lambda x: torch.cat([c / c.norm(dim=1, keepdim=True) for c in x.double().chunk(4, dim=1)], 1) / 2
    expected = ref_label_smooth_ce(per_g(out.features) @ per_g(text).T * 50.0, y)
    assert wb["i2tce"].item() == pytest.approx(expected.item(), abs=1e-5)
    vision_only = stage2_losses(out, logits, y, memory, None, None, reference_cfg(vision_only=True))
    assert "i2tce" not in vision_only


# ---- 5. input -------------------------------------------------------------------------------------------
def test_item5_reference_input_is_bicubic_and_half_normalised(tmp_path):
    from muva_core.data.samples import Sample
    from muva_core.train.stage2 import train_loader

    rng = np.random.default_rng(0)
    path = tmp_path / "0001_c1s1_000001_00.png"
    Image.fromarray(rng.integers(0, 256, (70, 37, 3), dtype=np.uint8)).save(path)
    cfg = reference_cfg(height=32, width=16, batch_size=4, num_instances=4, num_workers=0)
    assert cfg.data.norm == "half"
    samples = [Sample(str(path), 0, 0, "d", f"x{i}.png") for i in range(4)]
    loader, _ = train_loader(samples, None, cfg)
    transform = loader.dataset.transform
    transform.flip_prob = 0.0
    got = transform(Image.open(path).convert("RGB"))[0]
    # T.Resize(size, interpolation=3) on a PIL image = PIL's bicubic resize; ToTensor; (x - 0.5) / 0.5
    img = np.asarray(Image.open(path).convert("RGB").resize((16, 32), Image.BICUBIC), dtype=np.float64) / 255.0
    expected = torch.from_numpy((img - 0.5) / 0.5).permute(2, 0, 1).float()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# ---- 6. RMP -------------------------------------------------------------------------------------------
def test_item6_reference_rmp_modules_activation_biases_and_init():
    torch.manual_seed(0)
    rmp = ResidualMaskPredictor(768, 128, 3, heads=8, activation="quickgelu", qkv_bias=False, init="trunc_normal")
    assert rmp.in_proj_bias is None and rmp.out_proj.bias is not None
    assert isinstance(rmp.mlp[1], QuickGELU)
    x = torch.linspace(-4, 4, 17)
    torch.testing.assert_close(rmp.mlp[1](x), x * torch.sigmoid(1.702 * x))
    for w in (rmp.in_proj_weight, rmp.out_proj.weight, rmp.mlp[0].weight, rmp.mlp[2].weight):
        w = w.detach()
        assert float(w.std()) == pytest.approx(0.02, rel=0.05) and float(w.abs().max()) <= 2.0
        assert abs(float(w.mean())) < 1e-3
    assert not rmp.mlp[0].bias.any() and not rmp.mlp[2].bias.any()
    bound = 1 / math.sqrt(768)  # nn.Linear's default bias init, kept for the output projection
    assert rmp.out_proj.bias.abs().max() <= bound and rmp.out_proj.bias.abs().max() > bound / 2
    wb = ResidualMaskPredictor(768, 128, 3, heads=8)
    assert isinstance(wb.mlp[1], nn.GELU) and wb.in_proj_bias is not None and not wb.out_proj.bias.any()


@pytest.mark.parametrize("recipe,wd", [("reference", 0.0), ("workbook", 1e-4)])
def test_item6_rmp_parameter_group_weight_decay_and_lr(recipe, wd):
    cfg = RunConfig().update({"recipe": recipe, **TINY})
    model = build_muva(cfg, 4).model
    optimizer, _ = build_optimizer(model, cfg)
    rmp_ids = {id(p) for p in model.encoder.rmp_parameters()}
    for group in optimizer.param_groups:
        is_rmp = {id(p) in rmp_ids for p in group["params"]}
        assert len(is_rmp) == 1
        if is_rmp == {True}:
            assert group["weight_decay"] == wd and group["initial_lr"] == pytest.approx(10 * cfg.train.stage2_lr)
        else:
            assert group["weight_decay"] == 1e-4 and group["initial_lr"] == pytest.approx(cfg.train.stage2_lr)


@pytest.mark.parametrize("protocol,heads", [("MA2MS", 2), ("MS2MA", 8)])
def test_item6_rmp_mask_logits_equal_the_reference_module_with_the_same_weights(protocol, heads):
    cfg = resolve_config(protocol, overrides=TINY)
    assert cfg.recipe == "reference" and cfg.model.rmp_heads == heads
    enc = build_muva(cfg, 4).model.encoder.eval()
    inputs = []   # each layer's input tokens as the encoder hands them to its RMP: x[:, 1:1+R], x[:, 1+R:]
    hooks = [r.register_forward_pre_hook(lambda m, args: inputs.append((args[0].detach(), args[1].detach())))
             for r in enc.rmp]
    images = torch.randn(3, 3, 256, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = enc(images)
        for h in hooks:
            h.remove()
        assert len(inputs) == len(enc.rmp) == len(out.mask_logits) == 2
        prev = None
        for i, (x_part, x_patch) in enumerate(inputs):
            ref = RefMaskPredictor.from_rmp(enc.rmp[i])
            logits = ref(x_part, x_patch) + (prev if prev is not None else 0)   # ResidualMaskPredictor.forward
            torch.testing.assert_close(out.mask_logits[i], logits, rtol=1e-5, atol=1e-5)
            prev = logits
    assert float(prev.abs().max()) > 1e-3


# ---- 7. Dice ----------------------------------------------------------------------------------------
def test_item7_dice_smoothing_is_one_thousandth():
    """losses/mask_loss.py 50-68: smooth 1e-6 with every sum / 1000, i.e. smoothing 1e-3."""
    gen = torch.Generator().manual_seed(8)
    L, B, P, N, C = 2, 4, 3, 16, 3
    logits = [torch.randn(B, P, N, generator=gen) * 3 for _ in range(L)]
    targets = (torch.rand(B, P, N, generator=gen) > 0.6).float()
    targets[0, 0] = 0                                   # an empty part: where the smoothing matters
    out = fake_output(B=B)
    out.mask_logits = tuple(logits)
    ids = torch.tensor([0, 1, 2, 0])
    memory = F.normalize(torch.randn(C, 32, generator=gen), dim=1)
    terms = stage2_losses(out, torch.randn(B, C, generator=gen), ids, memory, torch.randn(C, 32, generator=gen),
                          targets, reference_cfg())
    stacked = torch.stack(logits)
    assert terms["mask_dice"].item() == pytest.approx(ref_dice(stacked.sigmoid(), targets).item(), abs=1e-6)
    m, g = stacked.double().sigmoid(), targets.double().expand_as(stacked)
    by_hand = (1 - (2 * (m * g).sum(-1) + 1e-3) / (m.sum(-1) + g.sum(-1) + 1e-3)).mean()
    assert terms["mask_dice"].item() == pytest.approx(by_hand.item(), abs=1e-6)
    assert terms["mask_bce"].item() == pytest.approx(ref_bce(stacked, targets).item(), abs=1e-6)
    total = sum(terms[k] for k in ("id", "imp", "i2tce", "mask_bce", "mask_dice"))
    assert terms["total"].item() == pytest.approx(total.item(), abs=1e-5)


# ---- 8. schedules -------------------------------------------------------------------------------------
def timm_cosine(epoch: int, base=3.5e-4, epochs=8, warm=2, init=1e-5, floor=1e-6) -> float:
    """engine/solvers/schedulers.py CosineLRScheduler(t_initial=epochs, lr_min=floor, warmup_t=warm,
    warmup_lr_init=init, cycle_limit=1), stepped with the 1-based epoch."""
    if epoch < warm:
        return init + epoch * (base - init) / warm
    if epoch >= epochs:
        return floor
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * epoch / epochs))


def test_item8_stage1_runs_each_epoch_at_the_reference_lr_and_resumes_there():
    cfg = reference_cfg(stage1_epochs=8, stage1_warmup_epochs=2, stage1_sampling="identities", stage1_batch_ids=50)
    cents = F.normalize(torch.randn(50, 32), dim=1)
    prompts = FakePrompts(50)
    optimizer, scheduler = build_stage1_optimizer(prompts, cfg)
    lrs = record_lrs(optimizer)
    history = train_stage1(prompts, cents, cfg, torch.device("cpu"), logit_scale=100.0, optimizer=optimizer,
                           scheduler=scheduler, progress=False)
    expected = [timm_cosine(e) for e in range(1, 9)]    # the reference: scheduler.step(epoch) first, epoch from 1
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert list(history["lr"]) == pytest.approx(expected, rel=1e-12)
    # resumed after 3 epochs: the same learning rates
    prompts2 = FakePrompts(50)
    opt2, sched2 = build_stage1_optimizer(prompts2, cfg)
    states = {}
    train_stage1(prompts2, cents, cfg.update({}), torch.device("cpu"), logit_scale=100.0, optimizer=opt2,
                 scheduler=sched2, progress=False,
                 on_epoch_end=lambda e, row, o, s: states.setdefault(e, s.state_dict()) if e == 3 else None)
    opt3, sched3 = build_stage1_optimizer(FakePrompts(50), cfg)
    sched3.load_state_dict(states[3])
    for g in opt3.param_groups:
        g["lr"] = expected[2]
    lrs3 = record_lrs(opt3)
    train_stage1(FakePrompts(50), cents, cfg, torch.device("cpu"), logit_scale=100.0, optimizer=opt3, scheduler=sched3,
                 start_epoch=3, progress=False)
    # (opt3 steps a different module's parameters: only its learning rates matter here)
    assert lrs3 == pytest.approx(expected[3:], rel=1e-12)


def test_item8_workbook_stage1_schedule_is_unchanged():
    cfg = workbook_cfg(stage1_epochs=8, stage1_warmup_epochs=2, stage1_batch_ids=50)
    lrs = workbook_stage1_lrs(cfg)
    shifted = [1e-5 + (3.5e-4 - 1e-5) * e / 2 if e < 2 else
               1e-6 + 0.5 * (3.5e-4 - 1e-6) * (1 + math.cos(math.pi * (e - 2) / 6)) for e in range(8)]
    assert lrs == pytest.approx(shifted, rel=1e-12)


# ---- 9. small ones ------------------------------------------------------------------------------------
def test_item9_reference_templates():
    from muva_core.model.backbone import BackboneConfig, build_clip

    clip, tokenizer = build_clip(BackboneConfig(name="tiny", seed=1))
    ref = PromptLearner(3, ("head", "upper", "legs"), clip, tokenizer, PromptConfig(template="reference"))
    assert ref.granularity_texts() == ["A photo of a X X X X person", "A photo of a X X X X head of a person",
                                       "A photo of a X X X X upper body of a person",
                                       "A photo of a X X X X legs of a person"]
    assert (ref.ctx_positions[:, 0] == torch.arange(5, 9)).all()   # ctx_start_idx = len("A photo of a") + 1
    pap = PromptLearner(3, ("head",), clip, tokenizer, PromptConfig(template="reference", part_words=False))
    assert pap.granularity_texts() == ["A photo of a X X X X"] * 2
    paper = PromptLearner(3, ("legs",), clip, tokenizer, PromptConfig())
    assert paper.granularity_texts() == ["A photo of a X X X X person.", "A photo of X X X X legs of a person."]
    assert reference_cfg().model.prompt_template == "reference"


def test_item9_local_tokens_have_separately_trained_positional_rows():
    cfg = reference_cfg()
    model = build_muva(cfg, 4).model
    enc = model.encoder
    pos = enc.visual.positional_embedding
    assert enc.local_pos_embed.shape == (3, enc.width)
    torch.testing.assert_close(enc.local_pos_embed.detach(), pos.detach()[:1].expand(3, -1))
    optimizer, _ = build_optimizer(model, cfg)
    assert any(p is enc.local_pos_embed for g in optimizer.param_groups for p in g["params"])
    images = torch.randn(2, 3, 256, 128)
    before = enc.embed(images).detach()
    with torch.no_grad():
        pos[0] += 1.0                      # the CLS row moves: the local rows do not follow
    after = enc.embed(images).detach()
    assert not torch.allclose(after[:, 0], before[:, 0])
    torch.testing.assert_close(after[:, 1:], before[:, 1:], rtol=0, atol=1e-5)
    with torch.no_grad():
        pos[0] -= 1.0
        enc.local_pos_embed[1] += 1.0      # a local row moves: only its token changes
    moved = enc.embed(images).detach()
    torch.testing.assert_close(moved[:, [0, 1, 3]], before[:, [0, 1, 3]], rtol=0, atol=1e-5)
    assert not torch.allclose(moved[:, 2], before[:, 2])
    assert build_muva(workbook_cfg(), 4).model.encoder.local_pos_embed is None


def test_item9_float16_autocast_with_a_grad_scaler_on_gpu_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert amp_settings(cuda, reference_cfg()) == (True, torch.float16)
    assert amp_settings(cuda, workbook_cfg()) == (True, torch.bfloat16)
    assert amp_settings(cpu, reference_cfg())[0] is False and grad_scaler(cpu, reference_cfg()) is None
    assert grad_scaler(cuda, workbook_cfg()) is None
    if torch.cuda.is_available():
        assert grad_scaler(cuda, reference_cfg()) is not None


# ---- the paper protocols with a tiny backbone: the loss functions vs the reference formulas ---------------
@pytest.mark.parametrize("protocol", ["MA2MS", "MS2MA"])
def test_paper_protocol_losses_equal_the_reference_formulas(protocol):
    cfg = resolve_config(protocol, overrides=TINY)
    C, N = 4, 12
    built = build_muva(cfg, C)
    model, prompts = built.model, built.prompts
    gen = torch.Generator().manual_seed(9)
    images = torch.randn(N, 3, 256, 128, generator=gen)
    pids = torch.arange(N) % C
    masks = torch.rand(N, 3, 128, generator=gen) > 0.5
    # stage 1: VPM-1 from the frozen encoder's raw features (after_bn=False), then L_cmp
    model.eval()
    with torch.no_grad():
        raw = model.encoder(images, part_masks=masks, mask_mode="pseudo").features
    cents = stage1_centroids(raw, pids, C, cfg)
    ref_cents = ref_cluster_centroids(raw, pids)
    torch.testing.assert_close(cents.double(), ref_cents, rtol=1e-5, atol=1e-5)
    batch = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    text = prompts(batch)
    got = stage1_loss(text, cents, batch, cfg)
    t = text.detach().double()
    expected = ref_ce((t / t.norm(dim=1, keepdim=True)) @ ref_cents.T / 1.0, batch)
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    # stage 2: the model in training mode on predicted masks; TPM = raw text features of every identity
    tpm = prompts.text_features_all()
    model.train()
    out, logits = model(images[:8])
    y = pids[:8]
    memory = PrototypeMemory(C, raw.shape[1]).build(F.normalize(raw, dim=1), pids, gather=False)
    targets = masks[:8].float()
    terms = stage2_losses(out, logits, y, memory, tpm, targets, cfg)
    bn = out.bn_features.detach().double()
    ref = {
        "id": ref_label_smooth_ce(logits.detach(), y),
        "imp": ref_ce((bn / bn.norm(dim=1, keepdim=True)) @ memory.centroids.double().T / 0.01, y),
        "i2tce": ref_label_smooth_ce(out.features.detach().double() @ tpm.double().T / 1.0, y),
        "mask_bce": ref_bce(torch.stack(out.mask_logits).detach(), targets),
        "mask_dice": ref_dice(torch.stack(out.mask_logits).detach().sigmoid(), targets),
    }
    ref["total"] = sum(ref.values())
    assert set(terms) == set(ref)
    for k, v in ref.items():
        assert terms[k].item() == pytest.approx(v.item(), abs=1e-5, rel=1e-5), k
    terms["total"].backward()  # the terms are differentiable end to end


# ---- whole runs on the small synthetic set -----------------------------------------------------------
# tiny_run_config defaults, recorded at commit 89b3a1b (before the recipes; the histories are training numbers,
# the metrics also go through the evaluation code). On this machine the recipes' code reproduces them bit for bit.
WORKBOOK_TODAY = {
    "metrics": {"mAP": 22.27536570183629, "Rank-1": 0.0, "Rank-5": 40.0, "Rank-10": 80.0, "mINP": 22.721755368814193},
    "h1": {"loss_cmp": [1.9449325970241003, 1.9321342706680298, 1.8726191009793962],
           "text_to_centroid_acc": [0.14285714285714285, 0.42857142857142855, 0.42857142857142855],
           "lr": [0.00035, 0.00017549999999999998, 1e-06]},
    "h2": {"loss_id": [1.9455125331878662, 1.9448297023773193, 1.93096125125885],
           "loss_imp": [1.227754831314087, 2.428032159805298, 1.0634336471557617],
           "loss_i2tce": [1.9665274620056152, 1.9795304536819458, 1.902357816696167],
           "loss_mask_bce": [0.6984226703643799, 0.6916025280952454, 0.6413004994392395],
           "loss_mask_dice": [0.7292448878288269, 0.7343618273735046, 0.7306809425354004],
           "loss_total": [6.56746244430542, 7.778356552124023, 6.268733978271484],
           "lr": [0.0003, 2.9999999999999997e-05, 2.9999999999999997e-05],
           "mask_iou_head": [0.08222638815641403, 0.07126481831073761, 0.07081309705972672]},
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_workbook_recipe_gives_todays_numbers(small_synth_root, cache, tmp_path):
    from muva_core.runs import train_protocol

    cfg = tiny_run_config(small_synth_root, tmp_path / "run", cache, recipe="workbook")
    result = train_protocol(cfg, progress=False)
    for key, value in WORKBOOK_TODAY["metrics"].items():
        assert result.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-4), key
    for part, frame in (("h1", result.history_stage1), ("h2", result.history_stage2)):
        for column, values in WORKBOOK_TODAY[part].items():
            assert list(frame[column]) == pytest.approx(values, rel=1e-5), (part, column)


def test_reference_recipe_trains_with_raw_prototypes_and_its_schedules(small_synth_root, cache, tmp_path):
    from muva_core.runs import prepare_run
    from muva_core.train.run import finish_run, stage1, stage2

    cfg = tiny_run_config(small_synth_root, tmp_path / "run", cache, recipe="reference")
    ctx = prepare_run(cfg, progress=False)
    h1 = stage1(ctx, progress=False)
    torch.testing.assert_close(ctx.built.model.text_prototypes, ctx.built.prompts.text_features_all())
    h2 = stage2(ctx, progress=False)
    metrics, _ = finish_run(ctx, progress=False)
    assert metrics["mAP"] > 0
    assert list(h1["lr"]) == pytest.approx([timm_cosine(e, epochs=3, warm=1) for e in (1, 2, 3)], rel=1e-12)
    # stage 2: linear warm-up from 0.1 over 1 epoch, x0.1 at epoch 2, stepped with the 1-based epoch first
    assert list(h2["lr"]) == pytest.approx([3e-4, 3e-5, 3e-5], rel=1e-12)
    assert {"loss_id", "loss_imp", "loss_i2tce", "loss_mask_bce", "loss_mask_dice"} <= set(h2.columns)
