"""The MUVA model: CLIP backbone, AM-MSA, multi-grained prompts, image encoder (paper 3.1, 3.2)."""
from .ammsa import (
    MaskGating,
    ResidualMaskPredictor,
    additive_attention_mask,
    attention_template,
    build_attention_mask,
    stripe_part_masks,
)
from .backbone import NAMED_CONFIGS, BackboneConfig, build_clip, load_clip_weights, patch_grid
from .muva import (
    GRANULARITIES,
    MASK_MODES,
    MUVAConfig,
    MUVAEncoder,
    MUVAOutput,
    block_attention_weights,
    masked_block_forward,
    parts_from_code,
)
from .prompts import TEMPLATES, PromptConfig, PromptLearner, TextEncoder, placeholder_positions

__all__ = [
    "BackboneConfig", "NAMED_CONFIGS", "build_clip", "load_clip_weights", "patch_grid",
    "ResidualMaskPredictor", "MaskGating", "build_attention_mask", "additive_attention_mask",
    "attention_template", "stripe_part_masks",
    "GRANULARITIES", "MASK_MODES", "MUVAConfig", "MUVAEncoder", "MUVAOutput",
    "masked_block_forward", "block_attention_weights", "parts_from_code",
    "TEMPLATES", "PromptConfig", "PromptLearner", "TextEncoder", "placeholder_positions",
]
