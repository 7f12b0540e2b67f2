"""MUVA training losses (paper sections 3.1.2, 3.2.3, 3.3; equations 1-4 and 8-11).

Stage 1:  L_stage1 = L_cmp                                  (eq. 1, 10)
Stage 2:  L_stage2 = L_id + L_imp + L_i2tce + L_mask        (eq. 2, 4, 9, 11)

Every function takes raw (un-normalised) features and logits and computes in float32, so it
can be called inside ``torch.autocast``. Memories and prototypes (VPM-1, VPM-2, TPM) are
treated as constants: no gradient flows into them.

Choices where the paper and the authors' reference code (RikoLi/MUVA) differ, or the paper's
formula is degenerate, are parameters; the defaults follow the paper unless noted:

* ``i2tce_loss``: eq. 4 uses cosine similarities (``normalize=True``, ``logit_scale=1``). With
  logits confined to [-1, 1] the softmax over C identities stays nearly uniform, so the loss
  sits close to log C and its gradient is weak. The reference code's default
  (``MODEL.NORM_I2TCE=False``, ``I2TCE_TAU=1``) and CLIP-ReID use the raw dot product of the
  un-normalised projected image feature and text feature instead: ``normalize=False``.
  ``logit_scale`` multiplies the logits (``= 1 / I2TCE_TAU``), e.g. CLIP's 100 for cosines.
* ``mask_loss``: the paper writes the Dice term element-wise, ``1 - 2MG / (M + G)``, which is
  exactly 1 wherever G = 0 (any M > 0) and therefore gives background patches no gradient
  and a floor equal to the background fraction. The default is the standard soft Dice
  (Milletari et al., the paper's reference [44], and the reference code) computed per
  (layer, sample, part) over the patches: ``1 - (2 sum MG + s) / (sum M + sum G + s)``.
  The literal form stays available as ``dice="elementwise"``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "cross_entropy_label_smooth",
    "cmp_loss",
    "imp_loss",
    "i2tce_loss",
    "mask_loss",
    "MUVALoss",
    "STAGE2_TERMS",
]

STAGE2_TERMS: tuple[str, ...] = ("id", "imp", "i2tce", "mask")
"""The four stage-2 terms of eq. 11, in order (``mask`` = ``mask_bce`` + ``mask_dice``)."""


def _check_targets(logits: Tensor, targets: Tensor, what: str) -> Tensor:
    if logits.dim() != 2:
        raise ValueError(f"{what}: expected 2-d logits [B, C], got shape {tuple(logits.shape)}")
    targets = torch.as_tensor(targets, device=logits.device).long()
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"{what}: targets of shape {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    # range check on CPU only: on CUDA it would cost a device sync per call (the kernels assert there)
    if targets.device.type == "cpu" and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise ValueError(
            f"{what}: targets must lie in [0, {logits.shape[1]}), got range "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )
    return targets


def cross_entropy_label_smooth(logits: Tensor, targets: Tensor, epsilon: float = 0.1) -> Tensor:
    """Label-smoothed cross-entropy, averaged over the batch (CLIP-ReID's ``CrossEntropyLabelSmooth``).

    ``q = (1 - epsilon) * onehot(y) + epsilon / C``; ``loss = mean_i sum_c -q_c log softmax(logits_i)_c``.
    Used for L_id (eq. 2, logits of the bias-free classifier on the BN-neck feature) and, through
    :func:`i2tce_loss`, for L_i2tce. Equal to ``F.cross_entropy(..., label_smoothing=epsilon)``.
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    targets = _check_targets(logits, targets, "cross_entropy_label_smooth")
    log_probs = F.log_softmax(logits.float(), dim=1)
    num_classes = logits.shape[1]
    q = torch.full_like(log_probs, epsilon / num_classes)
    q.scatter_(1, targets.unsqueeze(1), 1.0 - epsilon + epsilon / num_classes)
    return (-q * log_probs).sum(dim=1).mean()


def _cosine_logits(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity matrix ``[len(a), len(b)]`` in float32; ``b`` is treated as a constant."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected features [B, d] and prototypes [C, d], got {tuple(a.shape)} and {tuple(b.shape)}")
    return F.normalize(a.float(), dim=1) @ F.normalize(b.detach().float(), dim=1).t()


def cmp_loss(text_feats: Tensor, centroids: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """L_cmp (eq. 1): cross-modal prototypical contrast of text features against VPM-1.

    text_feats: ``[B, d]`` multi-grained text features t_c of the identities ``targets``
    (the reference code draws P x K batches of ids); centroids: VPM-1 ``[C, d]``, the per-id
    centroids of image features (constant). Both are L2-normalised here;
    ``loss = CE(cos(t, M1) / temperature, targets)``; temperature 1 as in the paper and the
    reference code (``PCL.CLUSTER_NCE_TEMP = 1``).
    """
    logits = _cosine_logits(text_feats, centroids) / temperature
    return F.cross_entropy(logits, _check_targets(logits, targets, "cmp_loss"))


def imp_loss(image_feats: Tensor, memory: Tensor, targets: Tensor, temperature: float = 0.01) -> Tensor:
    """L_imp (eq. 2): intra-modal prototypical contrast of image features against VPM-2.

    image_feats ``[B, d]`` (the reference code uses the BN-neck feature), memory ``[C, d]``
    (constant); ``loss = CE(cos(v, M2) / temperature, targets)``, temperature 0.01.
    """
    logits = _cosine_logits(image_feats, memory) / temperature
    return F.cross_entropy(logits, _check_targets(logits, targets, "imp_loss"))


def i2tce_loss(
    image_feats: Tensor,
    text_prototypes: Tensor,
    targets: Tensor,
    epsilon: float = 0.1,
    logit_scale: float = 1.0,
    normalize: bool = True,
) -> Tensor:
    """L_i2tce (eq. 4): label-smoothed CE of image features against the frozen text prototypes TPM.

    ``logits = logit_scale * sim(v, T)`` with ``sim`` the cosine similarity (``normalize=True``,
    the paper) or the raw dot product (``normalize=False``, the reference code's default and
    CLIP-ReID: un-normalised projected image feature vs un-normalised text feature). The
    defaults (cosine, scale 1, epsilon 0.1) are eq. 4 as written; see the module docstring on
    why the scale matters. ``text_prototypes`` ``[C, d]`` is detached (TPM is frozen in stage 2).
    """
    if normalize:
        logits = _cosine_logits(image_feats, text_prototypes)
    else:
        if image_feats.dim() != 2 or text_prototypes.dim() != 2 or image_feats.shape[1] != text_prototypes.shape[1]:
            raise ValueError(
                f"i2tce_loss: expected [B, d] and [C, d], got {tuple(image_feats.shape)} and {tuple(text_prototypes.shape)}"
            )
        logits = image_feats.float() @ text_prototypes.detach().float().t()
    return cross_entropy_label_smooth(logits * logit_scale, targets, epsilon)


def _stack_layers(logits_per_layer: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(logits_per_layer, Tensor):
        if logits_per_layer.dim() == 3:  # a single layer [B, P, N]
            return logits_per_layer.unsqueeze(0)
        return logits_per_layer
    if len(logits_per_layer) == 0:
        raise ValueError("mask_loss: got an empty list of per-layer logits")
    return torch.stack(list(logits_per_layer), dim=0)


def mask_loss(
    logits_per_layer: Tensor | Sequence[Tensor],
    targets: Tensor,
    *,
    dice: str = "soft",
    smooth: float = 1.0,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """L_mask = L_bce + L_dice (eq. 8-9) over all layers, parts and patches; returns ``(total, bce, dice)``.

    logits_per_layer: the RMP's part-mask logits M_l (before the sigmoid; the residual sum over
        layers already applied), a list of L tensors ``[B, P, N]`` or one tensor ``[L, B, P, N]``.
    targets: pseudo-label masks G ``[B, P, N]`` in {0, 1} (bool or float; soft values allowed),
        shared by every layer.
    dice: ``"soft"`` (default): per (layer, sample, part) ``1 - (2 sum_i M G + smooth) /
        (sum_i M + sum_i G + smooth)`` over patches i, averaged; an empty target with an empty
        prediction scores ~0, with ``smooth=1`` an empty target costs ``sum M / (sum M + 1)``.
        (The reference code's Dice is the same with an effective ``smooth`` of 1e-3.)
        ``"elementwise"``: the paper's literal form, mean over all elements of
        ``1 - 2 M G / (M + G + eps)`` (1 wherever G = 0; see the module docstring).
    BCE is ``binary_cross_entropy_with_logits`` (stable for large logits) averaged over all
    elements, i.e. eq. 8 averaged over the batch. ``total = bce_weight * bce + dice_weight * dice``.
    """
    logits = _stack_layers(logits_per_layer).float()
    if logits.dim() != 4:
        raise ValueError(f"mask_loss: expected logits [L, B, P, N], got shape {tuple(logits.shape)}")
    targets = torch.as_tensor(targets, device=logits.device)
    if targets.shape != logits.shape[1:]:
        raise ValueError(
            f"mask_loss: targets of shape {tuple(targets.shape)} do not match per-layer logits {tuple(logits.shape[1:])}"
        )
    g = targets.to(torch.float32).unsqueeze(0).expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, g)
    m = torch.sigmoid(logits)
    if dice == "soft":
        inter = (m * g).sum(dim=-1)
        denom = m.sum(dim=-1) + g.sum(dim=-1)
        dice_loss = (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()
    elif dice == "elementwise":
        dice_loss = (1.0 - 2.0 * m * g / (m + g + eps)).mean()
    else:
        raise ValueError(f"mask_loss: dice must be 'soft' or 'elementwise', got {dice!r}")
    total = bce_weight * bce + dice_weight * dice_loss
    return total, bce, dice_loss


class MUVALoss(nn.Module):
    """The stage-2 objective (eq. 11) as weighted named terms for logging.

    ``forward`` returns a dict with the *unweighted* value of every enabled term, among
    ``id``, ``imp``, ``i2tce``, ``mask_bce``, ``mask_dice``, plus ``total`` = the weighted sum
    (the ``mask`` weight applies to both mask terms, as in the reference code). Disabled terms
    are absent from the dict (not zero), so a log never shows a term that was not computed.

    Switches drop terms for ablations, e.g. ``use_i2tce=False`` for the vision-only model.
    Weights default to 1 (eq. 11 and the reference configs).

    The VPM-2 memory is not updated here: the training loop calls ``memory.update(...)`` after
    the optimiser step (Algorithm 1, line 21).
    """

    def __init__(
        self,
        *,
        use_id: bool = True,
        use_imp: bool = True,
        use_i2tce: bool = True,
        use_mask: bool = True,
        weights: Mapping[str, float] | None = None,
        id_epsilon: float = 0.1,
        imp_temperature: float = 0.01,
        i2tce_epsilon: float = 0.1,
        i2tce_logit_scale: float = 1.0,
        i2tce_normalize: bool = True,
        mask_dice: str = "soft",
        mask_smooth: float = 1.0,
    ) -> None:
        super().__init__()
        self.enabled = {"id": use_id, "imp": use_imp, "i2tce": use_i2tce, "mask": use_mask}
        weights = dict(weights or {})
        unknown = set(weights) - set(STAGE2_TERMS)
        if unknown:
            raise ValueError(f"MUVALoss: unknown loss weight(s) {sorted(unknown)}; terms are {list(STAGE2_TERMS)}")
        self.weights = {t: float(weights.get(t, 1.0)) for t in STAGE2_TERMS}
        if not any(self.enabled.values()):
            raise ValueError("MUVALoss: every term is disabled")
        if mask_dice not in ("soft", "elementwise"):
            raise ValueError(f"MUVALoss: mask_dice must be 'soft' or 'elementwise', got {mask_dice!r}")
        self.id_epsilon = id_epsilon
        self.imp_temperature = imp_temperature
        self.i2tce_epsilon = i2tce_epsilon
        self.i2tce_logit_scale = i2tce_logit_scale
        self.i2tce_normalize = i2tce_normalize
        self.mask_dice = mask_dice
        self.mask_smooth = mask_smooth

    def extra_repr(self) -> str:
        on = [t for t in STAGE2_TERMS if self.enabled[t]]
        return f"terms={on}, weights={ {t: self.weights[t] for t in on} }"

    @staticmethod
    def _need(term: str, **inputs: Any) -> None:
        missing = [k for k, v in inputs.items() if v is None]
        if missing:
            raise ValueError(f"MUVALoss: term {term!r} needs {missing}; pass them or set use_{term}=False")

    def forward(
        self,
        targets: Tensor,
        *,
        id_logits: Tensor | None = None,
        features: Tensor | None = None,
        bn_features: Tensor | None = None,
        memory: Any = None,
        text_prototypes: Tensor | None = None,
        mask_logits: Tensor | Sequence[Tensor] | None = None,
        mask_targets: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the enabled terms.

        targets: identity labels ``[B]``. id_logits: classifier logits ``[B, C]``.
        features: the image feature v^mg before the BN neck (used by i2tce, as in the reference code).
        bn_features: the BN-neck feature (used by imp; falls back to ``features``).
        memory: VPM-2, a ``PrototypeMemory`` (its own temperature is used) or a ``[C, d]`` tensor
        (``imp_temperature`` is used). text_prototypes: TPM ``[C, d]``.
        mask_logits / mask_targets: see :func:`mask_loss`.
        """
        terms: dict[str, Tensor] = {}
        total: Tensor | None = None

        def add(name: str, value: Tensor, weight: float) -> None:
            nonlocal total
            terms[name] = value
            total = weight * value if total is None else total + weight * value

        if self.enabled["id"]:
            self._need("id", id_logits=id_logits)
            add("id", cross_entropy_label_smooth(id_logits, targets, self.id_epsilon), self.weights["id"])
        if self.enabled["imp"]:
            feats = bn_features if bn_features is not None else features
            self._need("imp", bn_features=feats, memory=memory)
            if isinstance(memory, Tensor):
                value = imp_loss(feats, memory, targets, self.imp_temperature)
            else:
                value = memory.loss(feats, targets)
            add("imp", value, self.weights["imp"])
        if self.enabled["i2tce"]:
            self._need("i2tce", features=features, text_prototypes=text_prototypes)
            value = i2tce_loss(
                features, text_prototypes, targets, self.i2tce_epsilon, self.i2tce_logit_scale, self.i2tce_normalize
            )
            add("i2tce", value, self.weights["i2tce"])
        if self.enabled["mask"]:
            self._need("mask", mask_logits=mask_logits, mask_targets=mask_targets)
            _, bce, dice = mask_loss(mask_logits, mask_targets, dice=self.mask_dice, smooth=self.mask_smooth)
            add("mask_bce", bce, self.weights["mask"])
            add("mask_dice", dice, self.weights["mask"])
        assert total is not None
        terms["total"] = total
        return terms


def normalize_per_granularity(features: Tensor, granularities: int) -> Tensor:
    """L2-normalise each granularity's chunk of a concatenated multi-grained feature ``[B, G*E]``
    and rescale by ``1/sqrt(G)``, so the whole vector is unit-norm and the cosine of two such
    vectors is the mean of the per-granularity cosines (every granularity weighs the same)."""
    B, D = features.shape
    chunks = F.normalize(features.float().view(B, granularities, D // granularities), dim=-1)
    return chunks.reshape(B, D) / granularities ** 0.5
