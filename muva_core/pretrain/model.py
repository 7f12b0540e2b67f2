"""The CLIP being pretrained: built with random weights and a :class:`TokenSelect` in place of the patch dropout
(FLIP-style token dropping), its AdamW optimiser, and a text encoding that stops at the batch's last EOT token."""
from __future__ import annotations

import torch
from torch import nn

from .config import PretrainConfig

__all__ = ["TokenSelect", "build_pretrain_clip", "make_optimizer", "encode_text"]


class TokenSelect(nn.Module):
    """Keeps the class token and the patch tokens ``index`` ``[B, K]`` (set per batch); identity when
    ``index`` is None. Takes the place of open_clip's ``visual.patch_dropout`` (no parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.index: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return x
        idx = self.index.to(x.device)
        if idx.shape[0] != x.shape[0]:
            raise ValueError(f"token index for {idx.shape[0]} images, batch of {x.shape[0]}")
        patches = torch.gather(x[:, 1:], 1, idx[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], patches], dim=1)


def build_pretrain_clip(cfg: PretrainConfig):
    """The CLIP to pretrain (random weights seeded by ``cfg.seed``, patch embedding trainable, a
    :class:`TokenSelect` in place of the patch dropout) and its tokenizer."""
    from ..model.backbone import BackboneConfig, build_clip

    model, tokenizer = build_clip(BackboneConfig(name=cfg.backbone, pretrained=None, image_size=cfg.image_size,
                                                 freeze_patch_embed=False, seed=cfg.seed))
    model.visual.patch_dropout = TokenSelect()
    return model, tokenizer


def make_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings (token, positional, class) and the logit scale."""
    from ..train.schedulers import make_param_groups

    groups = make_param_groups(model, cfg.lr, cfg.weight_decay, lr_scale_patterns={},
                               weight_decay_patterns={r"embedding|logit_scale": 0.0}, no_decay_bias_norm=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98), eps=1e-6,
                             fused=True)  # fused: ~10x faster than the per-tensor loop on CPU


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (open_clip, argmax pooling at the EOT token) over the positions up to the batch's
    last EOT only: the text attention is causal, so the padding after it never changes what the EOT reads, and a
    caption of ~20 tokens costs a quarter of the 77-token context."""
    n = int(tokens.argmax(dim=-1).max()) + 1
    if n >= tokens.shape[1] or getattr(model, "text_pool_type", "argmax") != "argmax":
        return model.encode_text(tokens)
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :n]).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0], device=x.device), tokens[:, :n].argmax(dim=-1)]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj

