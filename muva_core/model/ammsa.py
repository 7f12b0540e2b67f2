"""AM-MSA: residual mask prediction (RMP), mask gating (MG) and the attention-mask builder.

Paper section 3.2. Token order everywhere: ``[CLS, local_1 .. local_P, patch_1 .. patch_N]``.

* :class:`ResidualMaskPredictor` (one per transformer layer, eq. 5): the local tokens query the
  patch tokens with a multi-head cross-attention, an MLP ``D -> N -> N`` turns the result into
  part-mask logits, and the logits of the previous layer are added (residual across layers).
* :class:`MaskGating` (eq. 6): ``sigmoid(logits) > t`` on the detached logits -> boolean part masks.
* :func:`build_attention_mask`: part masks ``[B, P, N]`` -> boolean attention mask
  ``[B, 1, T, T]`` (True = may attend) for :func:`torch.nn.functional.scaled_dot_product_attention`;
  :func:`additive_attention_mask` gives the 0 / -inf float form of eq. 7.

Cost. The RMP's key/value projection of all N patch tokens (``2 D^2`` MACs per patch per
layer, ~16% of a ViT-B layer) is never computed: with only P (<= 3) queries the key projection
is folded into the queries (``q_h . (W_k,h x + b_k,h) = (W_k,h^T q_h) . x + const``, the
constant cancels in the softmax) and the value projection is applied after the attention
(``sum_j a_j (W_v x_j + b_v) = W_v (sum_j a_j x_j) + b_v`` since the weights sum to 1). The
result is exactly a standard multi-head cross-attention with its own q/k/v/out projections
(same parameters, same layout as ``nn.MultiheadAttention``), at ``2 H P D`` MACs per patch
instead of ``2 D^2``. All parts and heads run in one SDPA call per layer.

Two styles of the RMP's details (config keys ``rmp_activation``, ``rmp_qkv_bias``, ``rmp_init``; the
recipes set them): the workbook's (GELU, q/k/v biases, xavier-uniform q/k/v, PyTorch's default init
elsewhere, zero output bias) and the reference code's (``model/ammsa.py``, ``model/utils.py``
``CrossAttention``: QuickGELU, q/k/v without bias, the output projection with bias, the cross-attention's
and the MLP's weights truncated-normal std 0.02, the MLP's biases 0, the output bias PyTorch's default).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.samples import PARTS

__all__ = [
    "QuickGELU",
    "RMP_ACTIVATIONS",
    "RMP_INITS",
    "ResidualMaskPredictor",
    "MaskGating",
    "build_attention_mask",
    "additive_attention_mask",
    "stripe_part_masks",
    "attention_template",
]


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` (OpenAI CLIP's activation; the reference RMP's MLP uses it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


RMP_ACTIVATIONS = {"gelu": nn.GELU, "quickgelu": QuickGELU}
RMP_INITS = ("xavier", "trunc_normal")


class ResidualMaskPredictor(nn.Module):
    """One layer's RMP (eq. 5): ``r' = CrossAttn(LN(r), LN(F)) + r``; ``M_l = MLP(LN(r')) + M_{l-1}``.

    width:      token width D of the image encoder
    n_patches:  N, the number of patch tokens (the MLP's hidden and output size)
    n_parts:    P, the number of local tokens (only used for shape checks)
    heads:      cross-attention heads (Table 12: 2 default, 8 for MS / multi-source)
    layernorm:  the three LayerNorms of eq. 5 (Table 10 "LN")
    residual:   the shortcut from the cross-attention input to its output (Table 10 "RC")
    activation: the MLP's activation, ``gelu`` | ``quickgelu`` (the reference)
    qkv_bias:   biases on the q/k/v projections (the reference has none; the output projection has one)
    init:       ``xavier`` (q/k/v xavier-uniform, out/MLP PyTorch's default, out bias 0) |
                ``trunc_normal`` (the reference: q/k/v/out and MLP weights trunc-normal std 0.02, MLP
                biases 0, the output bias PyTorch's default)
    """

    def __init__(
        self,
        width: int,
        n_patches: int,
        n_parts: int,
        heads: int = 2,
        layernorm: bool = True,
        residual: bool = True,
        activation: str = "gelu",
        qkv_bias: bool = True,
        init: str = "xavier",
    ) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"RMP heads must divide the width: width={width}, heads={heads}")
        if activation not in RMP_ACTIVATIONS:
            raise ValueError(f"RMP activation must be one of {sorted(RMP_ACTIVATIONS)}, got {activation!r}")
        if init not in RMP_INITS:
            raise ValueError(f"RMP init must be one of {RMP_INITS}, got {init!r}")
        self.width, self.n_patches, self.n_parts, self.heads = width, n_patches, n_parts, heads
        self.head_dim = width // heads
        self.layernorm, self.residual = layernorm, residual
        self.ln_q = nn.LayerNorm(width) if layernorm else nn.Identity()
        self.ln_kv = nn.LayerNorm(width) if layernorm else nn.Identity()
        self.ln_out = nn.LayerNorm(width) if layernorm else nn.Identity()
        # cross-attention parameters in nn.MultiheadAttention's layout: rows [q; k; v]
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        if qkv_bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, n_patches),
            RMP_ACTIVATIONS[activation](),
            nn.Linear(n_patches, n_patches),
        )
        if init == "xavier":
            nn.init.xavier_uniform_(self.in_proj_weight)
            nn.init.zeros_(self.out_proj.bias)
        else:
            for w in (self.in_proj_weight, self.out_proj.weight, self.mlp[0].weight, self.mlp[2].weight):
                nn.init.trunc_normal_(w, std=0.02)
            nn.init.zeros_(self.mlp[0].bias)
            nn.init.zeros_(self.mlp[2].bias)

    def cross_attention(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Multi-head cross-attention ``[B, P, D] x [B, N, D] -> [B, P, D]`` (keys = values),
        computed with the key/value projections folded into the small side (see module doc)."""
        B, P, D = queries.shape
        H, dh = self.heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        # the key bias is constant over keys: it cancels in the softmax
        b_q, _, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(queries, w_q, b_q)                                 # [B, P, D]
        q = q.view(B * P, H, dh).transpose(0, 1)                        # [H, B*P, dh]
        q = torch.bmm(q, w_k.view(H, dh, D).to(q.dtype))                # [H, B*P, D]   q_h W_k,h
        q = q.view(H, B, P, D).permute(1, 0, 2, 3).reshape(B, 1, H * P, D)
        kv = keys.unsqueeze(1).to(q.dtype)                              # [B, 1, N, D]
        ctx = F.scaled_dot_product_attention(q, kv, kv, scale=1.0 / math.sqrt(dh))  # [B,1,H*P,D]
        ctx = ctx.view(B, H, P, D).permute(1, 0, 2, 3).reshape(H, B * P, D)
        out = torch.bmm(ctx, w_v.view(H, dh, D).transpose(1, 2).to(ctx.dtype))  # [H, B*P, dh]
        out = out.transpose(0, 1).reshape(B, P, D)
        if b_v is not None:
            out = out + b_v.to(out.dtype)
        return self.out_proj(out)

    def cross_attention_reference(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The textbook computation (project all keys/values); for tests and comparison."""
        out, _ = F.multi_head_attention_forward(
            queries.transpose(0, 1), keys.transpose(0, 1), keys.transpose(0, 1),
            self.width, self.heads, self.in_proj_weight, self.in_proj_bias,
            None, None, False, 0.0, self.out_proj.weight, self.out_proj.bias,
            training=False, need_weights=False,
        )
        return out.transpose(0, 1)

    def forward(
        self,
        local_tokens: torch.Tensor,
        patch_tokens: torch.Tensor,
        prev_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, P, D]``, ``[B, N, D]``, ``[B, P, N] | None`` -> residual mask logits ``M_l [B, P, N]``."""
        if local_tokens.shape[-1] != self.width or patch_tokens.shape[1] != self.n_patches:
            raise ValueError(
                f"RMP expects local [B, P, {self.width}] and patches [B, {self.n_patches}, {self.width}], "
                f"got {tuple(local_tokens.shape)} and {tuple(patch_tokens.shape)}"
            )
        r = self.cross_attention(self.ln_q(local_tokens), self.ln_kv(patch_tokens))
        if self.residual:
            r = r + local_tokens
        logits = self.mlp(self.ln_out(r))
        if prev_logits is not None:
            logits = logits + prev_logits
        return logits


class MaskGating(nn.Module):
    """Eq. 6: a patch belongs to part p where ``sigmoid(M) > t`` (strictly); no gradient flows."""

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"mask threshold must be in (0, 1), got {threshold}")
        self.threshold = float(threshold)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, P, N]`` logits -> boolean part masks ``[B, P, N]`` (True = inside the part)."""
        with torch.no_grad():
            return torch.sigmoid(logits.detach().float()) > self.threshold

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


_TEMPLATES: dict[tuple[int, int, str], torch.Tensor] = {}


def _padded(t: int, multiple: int = 8) -> int:
    return (t + multiple - 1) // multiple * multiple


def attention_template(n_parts: int, n_patches: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The mask-independent part of the AM-MSA mask, boolean ``[T, Tpad]`` (True = may attend).

    CLS <-> everything; local <-> local only itself; patch <-> patch; local <-> patch False
    (filled per image from the part masks). Columns beyond T are padding (memory alignment
    for the fused attention kernels); slice ``[:, :T]``.
    """
    device = torch.device(device)
    key = (n_parts, n_patches, str(device))
    tpl = _TEMPLATES.get(key)
    if tpl is None:
        P, N = n_parts, n_patches
        T = 1 + P + N
        tpl = torch.zeros(T, _padded(T), dtype=torch.bool)
        tpl[0, :T] = True                      # CLS row
        tpl[:T, 0] = True                      # CLS column
        idx = torch.arange(1, 1 + P)
        tpl[idx, idx] = True                   # each local token sees itself
        tpl[1 + P:T, 1 + P:T] = True           # patch <-> patch
        tpl = tpl.to(device)
        _TEMPLATES[key] = tpl
    return tpl


def build_attention_mask(part_masks: torch.Tensor, template: torch.Tensor | None = None) -> torch.Tensor:
    """Part masks ``[B, P, N]`` (bool, or float > 0.5) -> attention mask ``[B, 1, T, T]`` (bool).

    True = may attend. Local token p sees CLS, itself and the patches of part p; a patch sees
    CLS, every patch and the local tokens of the parts it belongs to. No row is ever empty (every
    token sees CLS), so an empty part mask cannot make the softmax produce NaN. The result is a
    slice of a buffer whose last dimension is padded to a multiple of 8 (aligned rows for the
    fused SDPA kernels). ``template``: :func:`attention_template` for (P, N) on the masks' device
    (looked up, and cached, when None; modules pass their own buffer, which keeps
    ``torch.compile`` free of global-state guards).
    """
    if part_masks.dim() != 3:
        raise ValueError(f"part masks must be [B, P, N], got {tuple(part_masks.shape)}")
    if part_masks.dtype != torch.bool:
        part_masks = part_masks > 0.5
    B, P, N = part_masks.shape
    T = 1 + P + N
    tpl = attention_template(P, N, part_masks.device) if template is None else template
    if tpl.shape[0] != T:
        raise ValueError(f"attention template is for {tpl.shape[0]} tokens, the masks need {T}")
    mask = tpl.unsqueeze(0).expand(B, -1, -1).clone()       # [B, T, Tpad]
    mask[:, 1:1 + P, 1 + P:T] = part_masks                   # local -> patch
    mask[:, 1 + P:T, 1:1 + P] = part_masks.transpose(1, 2)   # patch -> local
    return mask[:, None, :, :T]


def additive_attention_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean attention mask -> the additive form of eq. 7 (0 where allowed, -inf elsewhere)."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, float("-inf"))


def stripe_part_masks(
    grid: tuple[int, int],
    parts: Sequence[str] = PARTS,
    n_stripes: int = len(PARTS),
) -> torch.Tensor:
    """Fixed stripe-like part masks (Table 8), boolean ``[len(parts), rows * cols]``.

    The image height is cut into ``n_stripes`` equal horizontal windows (head = top, upper body
    = middle, legs = bottom); a patch belongs to the window holding its centre. Flattened
    row-wise like the pseudo labels.
    """
    rows, cols = grid
    centres = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows          # in (0, 1)
    stripe_of_row = torch.clamp((centres * n_stripes).floor().long(), max=n_stripes - 1)
    out = torch.zeros(len(parts), rows, cols, dtype=torch.bool)
    for i, part in enumerate(parts):
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; parts are {PARTS}")
        out[i] = (stripe_of_row == PARTS.index(part))[:, None].expand(rows, cols)
    return out.reshape(len(parts), rows * cols)
