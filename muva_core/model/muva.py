"""The MUVA image encoder: CLIP ViT + local visual tokens + AM-MSA + BN neck (paper 3.1, 3.2, 4.2).

Token sequence ``[CLS, local_1 .. local_P, patch_1 .. patch_N]``: the local tokens (head, upper
body, legs, or a subset for Table 5) sit right after CLS and share its positional embedding
(``local_pos_embed="cls"``), or, as the reference code does, get their own positional rows, copies of
the CLS row made when the encoder is built and trained separately (``"separate"``).
Every open_clip block runs with the AM-MSA mask of its layer (own block forward reusing the
block's weights, :func:`masked_block_forward`). The feature is CLS + local tokens after
``ln_post``, each projected with CLIP's visual projection, concatenated (4 x 512 = 2048-d for
ViT-B/16), then a BN neck whose bias is frozen (CLIP-ReID).

Mask modes (:class:`MUVAConfig.mask_mode`):
  ``predicted``  the RMP of each layer predicts the part masks, gated at ``threshold`` (the model);
  ``stripe``     fixed equal horizontal windows, no RMP (Table 8 "stripe-like");
  ``pseudo``     given part masks (the grounding expert's pseudo labels) at every layer, the RMP
                 is not run (stage-1 centroids, VPM-2 with expert masks).
``forward(..., mask_mode=...)`` overrides the mode per call (e.g. a ``predicted`` model
computing pseudo-masked features for the memories).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.samples import PARTS
from .ammsa import (
    MaskGating,
    ResidualMaskPredictor,
    additive_attention_mask,
    attention_template,
    build_attention_mask,
    stripe_part_masks,
)

__all__ = [
    "GRANULARITIES",
    "MASK_MODES",
    "MUVAConfig",
    "MUVAOutput",
    "MUVAEncoder",
    "parts_from_code",
    "masked_block_forward",
    "block_attention_weights",
]

GRANULARITIES: tuple[str, ...] = ("global",) + PARTS
"""Global + the three parts, in feature order."""

MASK_MODES: tuple[str, ...] = ("predicted", "stripe", "pseudo")

_CODE = {"H": "head", "U": "upper", "L": "legs"}


def parts_from_code(code: str) -> tuple[str, ...]:
    """Table 5 granularity codes -> parts: ``"G"`` -> (), ``"G+H+L"`` -> ("head", "legs")."""
    items = [c.strip().upper() for c in code.split("+") if c.strip()]
    if not items or items[0] != "G" or any(c not in _CODE for c in items[1:]) or len(set(items)) != len(items):
        raise ValueError(f"granularity code must be 'G' plus any of +H +U +L (e.g. 'G+H+U+L'), got {code!r}")
    chosen = {_CODE[c] for c in items[1:]}
    return tuple(p for p in PARTS if p in chosen)


@dataclass
class MUVAConfig:
    """Every switch of the image encoder (the paper's ablations in brackets).

    parts:         local tokens that exist, a subset of PARTS in PARTS order (Table 5)
    mask_mode:     ``predicted`` | ``stripe`` (Table 8) | ``pseudo`` (given masks)
    rmp_heads:     cross-attention heads of the RMP (Table 12; 2, or 8 for MS / multi-source)
    rmp_layernorm: LayerNorms in the RMP (Table 10 "LN")
    rmp_residual:  residual shortcut around the RMP cross-attention (Table 10 "RC")
    threshold:     mask-gating threshold t (eq. 6)
    local_token_std: init std of the local visual tokens (N(0, 0.02))
    local_pos_embed: ``cls`` (the local tokens add the CLS positional row) | ``separate`` (own trained
                   copies of it, the reference code)
    rmp_activation, rmp_qkv_bias, rmp_init: the RMP's details (see :class:`ResidualMaskPredictor`)
    seed:          seed of the new parameters' initialisation (global RNG left untouched)
    """

    parts: tuple[str, ...] = PARTS
    mask_mode: str = "predicted"
    rmp_heads: int = 2
    rmp_layernorm: bool = True
    rmp_residual: bool = True
    threshold: float = 0.5
    local_token_std: float = 0.02
    local_pos_embed: str = "cls"
    rmp_activation: str = "gelu"
    rmp_qkv_bias: bool = True
    rmp_init: str = "xavier"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.parts, str):
            self.parts = (self.parts,) if self.parts in PARTS else parts_from_code(self.parts)
        parts = tuple(self.parts)
        unknown = [p for p in parts if p not in PARTS]
        if unknown or len(set(parts)) != len(parts):
            raise ValueError(f"parts must be distinct names from {PARTS}, got {parts}")
        self.parts = tuple(p for p in PARTS if p in parts)   # canonical order
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if self.rmp_heads < 1:
            raise ValueError(f"rmp_heads must be >= 1, got {self.rmp_heads}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.local_pos_embed not in ("cls", "separate"):
            raise ValueError(f"local_pos_embed must be 'cls' or 'separate', got {self.local_pos_embed!r}")

    @property
    def granularities(self) -> tuple[str, ...]:
        return ("global",) + self.parts


@dataclass
class MUVAOutput:
    """What the encoder returns.

    features:             ``[B, (1+P) E]`` concatenated projected tokens, before the BN neck
    bn_features:          ``[B, (1+P) E]`` after the BN neck (classifier input; test feature
                          after L2 normalisation)
    granularity_features: ``[B, 1+P, E]`` per granularity (global first, then parts), before BN
    mask_logits:          per layer, the residual mask scores ``M_l [B, P, N]`` (each layer's
                          prediction plus the sum of the previous ones; eq. 5); empty unless the
                          RMP ran. ``sigmoid`` of them is what the mask loss supervises.
    final_mask_logits:    ``M_L``, the logits summed over all layers (None unless the RMP ran)
    part_masks:           per layer, the boolean part masks ``[B, P, N]`` used in the attention
    """

    features: torch.Tensor
    bn_features: torch.Tensor
    granularity_features: torch.Tensor
    mask_logits: tuple[torch.Tensor, ...] = ()
    final_mask_logits: torch.Tensor | None = None
    part_masks: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    @property
    def stacked_mask_logits(self) -> torch.Tensor:
        """``[L, B, P, N]`` (raises when the RMP did not run)."""
        if not self.mask_logits:
            raise ValueError("no mask logits: the RMP did not run (mask_mode stripe/pseudo or no parts)")
        return torch.stack(self.mask_logits)


def _split_qkv(block: ResidualAttentionBlock, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    attn = block.attn
    B, T, D = x.shape
    H = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    return qkv.view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)   # 3 x [B, H, T, dh]


def masked_block_forward(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One open_clip residual block on ``x [B, T, D]`` with an attention mask (bool, True =
    attend, or additive float), broadcast over heads; uses the block's own weights (ln_1,
    attn.in_proj/out_proj, ln_2, mlp, layer scales) and ``F.scaled_dot_product_attention``."""
    B, T, D = x.shape
    q, k, v = _split_qkv(block, x)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    o = o.transpose(1, 2).reshape(B, T, D)
    x = x + block.ls_1(block.attn.out_proj(o))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def block_attention_weights(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention probabilities ``[B, H, T, T]`` that :func:`masked_block_forward` uses
    (explicit softmax; for tests and visualisation)."""
    q, k, _ = _split_qkv(block, x)
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = additive_attention_mask(attn_mask, torch.float32)
        scores = scores + attn_mask.float()
    return scores.softmax(-1)


class MUVAEncoder(nn.Module):
    """The MUVA image encoder around an open_clip ``VisionTransformer`` (``clip.visual``).

    The visual tower is registered as ``self.visual`` (its weights are reused, not copied).
    New parameters: ``local_tokens [P, D]``, ``local_pos_embed [P, D]`` (``separate`` only), one
    :class:`ResidualMaskPredictor` per layer (``rmp``, absent in stripe mode or without parts), the BN
    neck ``bottleneck``.
    """

    def __init__(self, visual: VisionTransformer, cfg: MUVAConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or MUVAConfig()
        self._check_visual(visual)
        self.cfg = cfg
        self.visual = visual
        self.parts = cfg.parts
        self.n_parts = len(cfg.parts)
        self.grid = tuple(visual.grid_size)
        self.n_patches = self.grid[0] * self.grid[1]
        self.width = visual.conv1.out_channels
        self.embed_dim = visual.proj.shape[1]
        self.feat_dim = (1 + self.n_parts) * self.embed_dim
        self.grad_checkpointing = False
        blocks = visual.transformer.resblocks

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if self.n_parts:
                self.local_tokens = nn.Parameter(torch.randn(self.n_parts, self.width) * cfg.local_token_std)
            else:
                self.register_parameter("local_tokens", None)
            if self.n_parts and cfg.mask_mode != "stripe":
                self.rmp = nn.ModuleList(
                    ResidualMaskPredictor(
                        self.width, self.n_patches, self.n_parts, heads=cfg.rmp_heads,
                        layernorm=cfg.rmp_layernorm, residual=cfg.rmp_residual,
                        activation=cfg.rmp_activation, qkv_bias=cfg.rmp_qkv_bias, init=cfg.rmp_init,
                    )
                    for _ in blocks
                )
            else:
                self.rmp = None
        if self.n_parts and cfg.local_pos_embed == "separate":
            row = visual.positional_embedding.detach()[:1]
            self.local_pos_embed = nn.Parameter(row.clone().repeat(self.n_parts, 1))
        else:
            self.register_parameter("local_pos_embed", None)
        self.gating = MaskGating(cfg.threshold)
        self.register_buffer(
            "stripe_masks", stripe_part_masks(self.grid, self.parts), persistent=False
        )
        self.register_buffer(
            "attn_template", attention_template(self.n_parts, self.n_patches).clone(), persistent=False
        )
        self.bottleneck = nn.BatchNorm1d(self.feat_dim)
        nn.init.ones_(self.bottleneck.weight)
        nn.init.zeros_(self.bottleneck.bias)
        self.bottleneck.bias.requires_grad_(False)

    @staticmethod
    def _check_visual(visual: nn.Module) -> None:
        if not isinstance(visual, VisionTransformer):
            raise TypeError(f"MUVAEncoder needs an open_clip VisionTransformer, got {type(visual).__name__}")
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise ValueError("MUVAEncoder supports CLS-token pooling only (no attentional pool)")
        if visual.proj is None:
            raise ValueError("the visual tower has no projection (proj is None)")
        if not isinstance(visual.patch_dropout, nn.Identity):
            raise ValueError("patch dropout is not supported (it would drop the local tokens' patches)")
        for blk in visual.transformer.resblocks:
            if not isinstance(blk, ResidualAttentionBlock) or not isinstance(blk.attn, nn.MultiheadAttention):
                raise ValueError(f"unsupported transformer block {type(blk).__name__}")

    # ------------------------------------------------------------------ parameters
    def rmp_parameters(self) -> Iterator[nn.Parameter]:
        """RMP parameters (trained at 10x the learning rate in stage 2)."""
        return iter(()) if self.rmp is None else self.rmp.parameters()

    def base_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters other than the RMP (backbone, local tokens, BN neck)."""
        rmp_ids = {id(p) for p in self.rmp_parameters()}
        return (p for p in self.parameters() if p.requires_grad and id(p) not in rmp_ids)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in the backward pass (saves activation memory)."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ forward
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> token sequence ``[B, 1+P+N, D]`` after ``ln_pre``."""
        v = self.visual
        if tuple(images.shape[-2:]) != tuple(v.image_size):
            raise ValueError(f"images must be {tuple(v.image_size)} (H, W), got {tuple(images.shape[-2:])}")
        x = v.conv1(images.to(v.conv1.weight.dtype))          # [B, D, gh, gw]
        x = x.flatten(2).transpose(1, 2)                       # [B, N, D], row-wise
        B, dt = x.shape[0], x.dtype
        pos = v.positional_embedding.to(dt)
        tokens = [(v.class_embedding.to(dt) + pos[0]).expand(B, 1, -1)]
        if self.n_parts:
            local_pos = pos[0] if self.local_pos_embed is None else self.local_pos_embed.to(dt)
            tokens.append((self.local_tokens.to(dt) + local_pos).expand(B, -1, -1))
        tokens.append(x + pos[1:])
        return v.ln_pre(torch.cat(tokens, dim=1))

    def _run_block(self, blk: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(masked_block_forward, blk, x, mask, use_reentrant=False)
        return masked_block_forward(blk, x, mask)

    def _given_masks(self, part_masks: torch.Tensor, batch: int) -> torch.Tensor:
        if part_masks.dim() != 3 or part_masks.shape[0] != batch or part_masks.shape[2] != self.n_patches:
            raise ValueError(
                f"part masks must be [B={batch}, P, N={self.n_patches}], got {tuple(part_masks.shape)}"
            )
        if part_masks.shape[1] == len(PARTS) and self.n_parts != len(PARTS):
            part_masks = part_masks[:, [PARTS.index(p) for p in self.parts]]
        elif part_masks.shape[1] != self.n_parts:
            raise ValueError(
                f"part masks have {part_masks.shape[1]} parts; expected {self.n_parts} ({self.parts}) "
                f"or {len(PARTS)} ({PARTS})"
            )
        return part_masks if part_masks.dtype == torch.bool else part_masks > 0.5

    def forward(
        self,
        images: torch.Tensor,
        part_masks: torch.Tensor | None = None,
        mask_mode: str | None = None,
    ) -> MUVAOutput:
        """Encode images ``[B, 3, H, W]``.

        part_masks: ``[B, P or 3, N]`` pseudo masks, required in (and only in) ``pseudo`` mode;
                    with 3 channels and fewer parts configured the configured parts are picked.
        mask_mode:  per-call override of ``cfg.mask_mode``.
        """
        mode = mask_mode or self.cfg.mask_mode
        if mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mode!r}")
        if mode == "pseudo" and part_masks is None and self.n_parts:
            raise ValueError("mask_mode='pseudo' needs part_masks [B, P, N]")
        if mode != "pseudo" and part_masks is not None:
            raise ValueError(f"part_masks are only used with mask_mode='pseudo' (mode is {mode!r})")
        if mode == "predicted" and self.n_parts and self.rmp is None:
            raise ValueError("this encoder has no RMP (built with mask_mode='stripe'); use 'stripe' or 'pseudo'")

        x = self.embed(images)
        B, P = x.shape[0], self.n_parts
        logits: torch.Tensor | None = None
        all_logits: list[torch.Tensor] = []
        used: list[torch.Tensor] = []
        fixed_mask = fixed_parts = None
        if P and mode == "stripe":
            fixed_parts = self.stripe_masks.unsqueeze(0).expand(B, -1, -1)
        elif P and mode == "pseudo":
            fixed_parts = self._given_masks(part_masks.to(x.device), B)
        if fixed_parts is not None:
            fixed_mask = build_attention_mask(fixed_parts, self.attn_template)

        for i, blk in enumerate(self.visual.transformer.resblocks):
            mask = fixed_mask
            if P and mode == "predicted":
                logits = self.rmp[i](x[:, 1:1 + P], x[:, 1 + P:], logits)
                all_logits.append(logits)
                parts = self.gating(logits)
                used.append(parts)
                mask = build_attention_mask(parts, self.attn_template)
            elif fixed_parts is not None:
                used.append(fixed_parts)
            x = self._run_block(blk, x, mask)

        tokens = self.visual.ln_post(x[:, : 1 + P])                 # [B, 1+P, D]
        gran = tokens @ self.visual.proj.to(tokens.dtype)           # [B, 1+P, E]
        feats = gran.reshape(B, -1)
        bn = self.bottleneck(feats)
        return MUVAOutput(
            features=feats,
            bn_features=bn,
            granularity_features=gran,
            mask_logits=tuple(all_logits),
            final_mask_logits=logits,
            part_masks=tuple(used),
        )

    @torch.no_grad()
    def inference_features(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Test feature (reference code): BN-neck output, L2-normalised. Call in ``eval()`` mode."""
        feats = self(images).bn_features.float()
        return F.normalize(feats, dim=-1) if normalize else feats
