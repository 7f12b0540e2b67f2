"""Multi-grained prompt learner: templates, placeholder positions, EOT, frozen text tower, PAP/DSP."""
from __future__ import annotations

import pytest
import torch

from muva_core.data.samples import PARTS
from muva_core.model import BackboneConfig, PromptConfig, PromptLearner, build_clip

NUM_IDS = 5


@pytest.fixture(scope="module")
def clip_tok():
    clip, tok = build_clip(BackboneConfig(name="tiny", seed=1))
    return clip, tok


@pytest.fixture
def learner(clip_tok):
    clip, tok = clip_tok
    return PromptLearner(NUM_IDS, PARTS, clip, tok)


def test_templates_are_the_papers(learner):
    assert learner.granularities == ("global", "head", "upper", "legs")
    assert [t[0] for t in learner.template_texts] == [
        "A photo of a X X X X person.",
        "A photo of a X X X X head of a person.",
        "A photo of a X X X X upper body of a person.",
        "A photo of X X X X legs of a person.",
    ]


def test_placeholder_and_eot_positions(learner, clip_tok):
    _, tok = clip_tok
    x_id = tok.encode("X")[0]
    for g in range(4):
        ids = learner.template_ids[g, 0]
        # independent search: the X positions in the ids; the EOT position
        assert learner.ctx_positions[g, 0].tolist() == (ids == x_id).nonzero().flatten().tolist()
        assert int(learner.eot_index[g, 0]) == (ids == tok.eot_token_id).nonzero().item()
        assert int(ids[0]) == tok.sot_token_id
    assert learner.ctx_positions[0, 0].tolist() == [5, 6, 7, 8]      # SOT a photo of a X X X X
    assert learner.ctx_positions[3, 0].tolist() == [4, 5, 6, 7]      # SOT a photo of X X X X legs


def test_prompt_embeddings_hold_the_learnable_vectors(learner, clip_tok):
    clip, _ = clip_tok
    pids = torch.tensor([3, 0, 3])
    for g in range(4):
        emb, eot = learner.build_prompts(pids, g)
        assert emb.shape == (3, 77, 64)
        pos = learner.ctx_positions[g, 0]
        assert torch.equal(emb[:, pos], learner.ctx[pids, g])
        others = torch.ones(77, dtype=torch.bool)
        others[pos] = False
        words = clip.token_embedding(learner.template_ids[g, 0])
        assert torch.equal(emb[0, others], words[others])
        assert torch.equal(eot, learner.eot_index[g, 0].expand(3))


def test_text_encoder_reproduces_clip_encode_text(learner, clip_tok):
    """With the vectors set to the word 'X', the learner's feature is CLIP's own text feature."""
    clip, tok = clip_tok
    x_vec = clip.token_embedding.weight[tok.encode("X")[0]].detach()
    with torch.no_grad():
        learner.ctx.copy_(x_vec.expand_as(learner.ctx))
        feats = learner(torch.tensor([1]), None).view(4, -1)
        ref = clip.encode_text(tok(learner.granularity_texts()))
    assert torch.allclose(feats, ref, atol=1e-5)


def test_shapes_and_concatenation(learner):
    pids = torch.tensor([4, 2])
    all_g = learner(pids)
    assert all_g.shape == (2, 4 * 64)
    per = torch.cat([learner(pids, g) for g in learner.granularities], dim=1)
    assert torch.allclose(all_g, per, atol=1e-5)
    assert torch.allclose(learner(pids, "legs"), learner(pids, 3))
    protos = learner.text_features_all(batch_size=2)
    assert protos.shape == (NUM_IDS, 4 * 64)
    assert torch.allclose(protos[[4, 2]], all_g, atol=1e-5)
    with pytest.raises(IndexError):
        learner(torch.tensor([NUM_IDS]))
    with pytest.raises(ValueError, match="granularity"):
        learner(pids, "arms")


def test_text_tower_frozen_prompt_grads_flow(learner):
    feats = learner(torch.tensor([1, 3]), "upper")
    feats.square().sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in learner.text_encoder.parameters())
    grad = learner.ctx.grad
    assert grad.abs()[[1, 3], 2].sum() > 0                   # used ids, upper-body vectors
    assert grad[[0, 2, 4]].abs().sum() == 0                  # unused ids
    assert grad[:, [0, 1, 3]].abs().sum() == 0               # other granularities
    assert set(learner.learnable_state_dict()) == {"ctx"}
    assert learner.learnable_parameters() == [learner.ctx]
    assert {id(p) for p in learner.parameters() if p.requires_grad} == {id(learner.ctx)}


def test_init_std_and_seed(clip_tok):
    clip, tok = clip_tok
    a = PromptLearner(40, PARTS, clip, tok, PromptConfig(seed=3))
    b = PromptLearner(40, PARTS, clip, tok, PromptConfig(seed=3))
    c = PromptLearner(40, PARTS, clip, tok, PromptConfig(seed=4))
    assert a.ctx.shape == (40, 4, 4, 64)
    assert 0.0018 < a.ctx.std().item() < 0.0022
    assert torch.equal(a.ctx, b.ctx) and not torch.equal(a.ctx, c.ctx)
    assert torch.equal(a(torch.tensor([7])), b(torch.tensor([7])))


def test_part_subset(clip_tok):
    clip, tok = clip_tok
    pl = PromptLearner(3, ("legs", "head"), clip, tok)
    assert pl.granularities == ("global", "head", "legs")
    assert pl(torch.tensor([0, 2])).shape == (2, 3 * 64)


def test_part_agnostic_prompts(clip_tok):
    clip, tok = clip_tok
    pl = PromptLearner(3, PARTS, clip, tok, PromptConfig(part_words=False))
    texts = [t[0] for t in pl.template_texts]
    assert texts == ["A photo of a X X X X person."] * 4
    assert not any(w in " ".join(texts) for w in ("head", "upper", "legs"))
    assert pl.ctx.shape[1] == 4                        # still one set of vectors per granularity
    feats = pl(torch.tensor([0])).view(4, -1)
    assert not torch.allclose(feats[0], feats[1])      # granularities differ through the vectors


def test_shared_part_tokens(clip_tok):
    clip, tok = clip_tok
    pl = PromptLearner(3, PARTS, clip, tok, PromptConfig(shared_part_tokens=True))
    assert pl.ctx.shape == (3, 1, 4, 64)
    emb_g, _ = pl.build_prompts(torch.tensor([2]), 0)
    emb_l, _ = pl.build_prompts(torch.tensor([2]), 3)
    assert torch.equal(emb_g[0, 5:9], emb_l[0, 4:8])  # same vectors, different template
    pl(torch.tensor([2]), "head").sum().backward()
    assert pl.ctx.grad[2].abs().sum() > 0


def test_domain_specific_prompts(clip_tok):
    clip, tok = clip_tok
    cfg = PromptConfig(domain_specific=True, n_domain_ctx=2)
    pl = PromptLearner(4, ("legs",), clip, tok, cfg, id_domains=[0, 1, 1, 0])
    assert pl.domain_ctx.shape == (2, 2, 64)
    assert pl.template_texts[0][0] == "Z Z A photo of a X X X X person."
    assert pl.domain_positions[0, 0].tolist() == [1, 2]          # prepended right after SOT
    assert pl.ctx_positions[0, 0].tolist() == [7, 8, 9, 10]
    emb, _ = pl.build_prompts(torch.tensor([0, 1]), 1)
    assert torch.equal(emb[0, 1:3], pl.domain_ctx[0]) and torch.equal(emb[1, 1:3], pl.domain_ctx[1])
    pl(torch.tensor([1, 2])).sum().backward()                   # ids of domain 1 only
    assert pl.domain_ctx.grad[1].abs().sum() > 0 and pl.domain_ctx.grad[0].abs().sum() == 0
    assert set(pl.learnable_state_dict()) == {"ctx", "domain_ctx"}

    described = PromptLearner(
        2, (), clip, tok,
        PromptConfig(domain_specific=True, domain_descriptions=("in low light", "at low resolution")),
        id_domains=[1, 0],
    )
    assert described.template_texts[0] == [
        "Z Z Z Z A photo of a X X X X person, in low light.",
        "Z Z Z Z A photo of a X X X X person, at low resolution.",
    ]
    # each id uses its own domain's sentence (EOT positions differ)
    _, eot = described.build_prompts(torch.tensor([0, 1]), 0)
    assert eot.tolist() == [described.eot_index[0, 1].item(), described.eot_index[0, 0].item()]


def test_prompt_config_errors(clip_tok):
    clip, tok = clip_tok
    with pytest.raises(ValueError, match="domain_specific"):
        PromptConfig(domain_descriptions=("x",))
    with pytest.raises(ValueError, match="placeholder"):
        PromptLearner(2, (), clip, tok, PromptConfig(domain_specific=True, domain_descriptions=("X rays",)))
    with pytest.raises(ValueError, match="unknown parts"):
        PromptLearner(2, ("arms",), clip, tok)
