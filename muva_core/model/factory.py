"""Build the whole MUVA Re-ID model from a run configuration.

:class:`MUVAReID` holds what stage 2 trains and inference needs: the image encoder (CLIP visual
tower + local tokens + AM-MSA + BN neck), the bias-free identity classifier on the BN feature,
and the frozen text prototypes (TPM) produced by stage 1, kept as a buffer so a checkpoint is
self-contained (the raw, un-normalised text features of every identity; each recipe normalises them as
its L_i2tce needs). The prompt learner (stage 1) wraps the frozen CLIP text tower.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..paths import resolve
from ..data.samples import PARTS
from .backbone import BackboneConfig, build_clip
from .checkpoints import PRETRAINED_TAG, config_clip_path
from .muva import MUVAConfig, MUVAEncoder, parts_from_code
from .prompts import PromptConfig, PromptLearner


class MUVAReID(nn.Module):
    """Encoder + classifier + text prototypes. ``forward(images) -> (MUVAOutput, id_logits)``."""

    def __init__(self, encoder: MUVAEncoder, num_classes: int, logit_scale: float = 1.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.feat_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        self.register_buffer("text_prototypes", torch.zeros(num_classes, encoder.feat_dim))
        self.register_buffer("clip_logit_scale", torch.tensor(float(logit_scale)))

    @property
    def parts(self) -> tuple[str, ...]:
        return self.encoder.parts

    def forward(self, images: torch.Tensor, part_masks: torch.Tensor | None = None, mask_mode: str | None = None):
        out = self.encoder(images, part_masks=part_masks, mask_mode=mask_mode)
        return out, self.classifier(out.bn_features)


@dataclass
class BuiltModel:
    model: MUVAReID
    prompts: PromptLearner | None
    clip: nn.Module


def part_indices(parts: tuple[str, ...]) -> list[int]:
    """Channels of the 3-part pseudo masks that belong to the configured parts."""
    return [PARTS.index(p) for p in parts]


def start_clip(cfg):
    """``(clip, tokenizer)``: the CLIP a run of ``cfg`` starts from (named config / pretrained tag / local
    checkpoint / the language-pretrained CLIP of ``muva pretrain-clip``), at the run's input size."""
    m = cfg.model
    pretrained = None if m.pretrained in ("none", "", None) else m.pretrained
    checkpoint = str(resolve(m.checkpoint_path)) if m.checkpoint_path else None
    if pretrained == PRETRAINED_TAG:  # the language-pretrained CLIP of `muva pretrain-clip` (muva_core.pretrain)
        pretrained, checkpoint = None, checkpoint or str(config_clip_path(cfg))
    return build_clip(BackboneConfig(
        name=m.backbone, pretrained=pretrained, checkpoint_path=checkpoint,
        image_size=(cfg.data.height, cfg.data.width), seed=cfg.seed,
    ))


def build_muva(cfg, num_classes: int, id_domains: torch.Tensor | None = None) -> BuiltModel:
    """CLIP backbone (:func:`start_clip`), encoder, classifier, prompts."""
    m = cfg.model
    clip, tokenizer = start_clip(cfg)
    parts = parts_from_code(m.granularity)
    encoder = MUVAEncoder(clip.visual, MUVAConfig(
        parts=parts, mask_mode=m.mask_mode, rmp_heads=m.rmp_heads, rmp_layernorm=m.rmp_layernorm,
        rmp_residual=m.rmp_residual, threshold=m.mask_threshold, local_pos_embed=m.local_pos_embed,
        rmp_activation=m.rmp_activation, rmp_qkv_bias=m.rmp_qkv_bias, rmp_init=m.rmp_init, seed=cfg.seed,
    ))
    logit_scale = float(clip.logit_scale.detach().exp()) if hasattr(clip, "logit_scale") else 1.0
    model = MUVAReID(encoder, num_classes, logit_scale=logit_scale)
    prompts = None
    if not cfg.train.vision_only:
        prompts = PromptLearner(num_classes, parts, clip, tokenizer, PromptConfig(
            n_ctx=m.n_ctx, part_words=not m.part_agnostic_prompts, domain_specific=m.domain_specific_prompts,
            template=m.prompt_template, seed=cfg.seed,
        ), id_domains=id_domains if m.domain_specific_prompts else None)
    return BuiltModel(model=model, prompts=prompts, clip=clip)
