"""Multi-grained prompt learner (paper 3.1.1, Table 7).

Each identity c gets N (=4) learnable word vectors per granularity, written into a fixed template
(CLIP-ReID style)::

    global: "A photo of a X X X X person."
    head:   "A photo of a X X X X head of a person."
    upper:  "A photo of a X X X X upper body of a person."
    legs:   "A photo of X X X X legs of a person."

(``template="paper"``). The reference code (``model/visual_language_encoder.py`` 50-79) writes them
without the final period and with "A photo of a X X X X legs of a person", and its part-agnostic
prompt is "A photo of a X X X X" (``template="reference"``, :data:`TEMPLATE_SETS`).

The template is tokenised with open_clip's BPE tokenizer, the ``X`` placeholder positions are
found in the token ids (never hard-coded), their embeddings are replaced by the learnable
vectors (init N(0, 0.002), dim = text width, 512 for ViT-B/16), and the frozen CLIP text
encoder reads the feature at the EOT token (``argmax`` of the ids, as CLIP does).

Table 7 switches (:class:`PromptConfig`):
  ``part_words=False``       PAP, part-agnostic prompt: the part names are removed from the
                             templates (every granularity uses the global wording; each
                             granularity keeps its own learnable vectors), as in the paper;
  ``shared_part_tokens``     one set of learnable vectors per identity shared by all
                             granularities (the templates keep their part words);
  ``domain_specific``        DSP: ``n_domain_ctx`` learnable vectors per source domain,
                             prepended to every prompt (right after the start token), plus an
                             optional fixed per-domain description appended to the sentence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from open_clip.model import CLIP
from torch import nn
from tqdm.auto import tqdm

from ..data.samples import PARTS

__all__ = ["TEMPLATES", "TEMPLATE_SETS", "PromptConfig", "TextEncoder", "PromptLearner", "placeholder_positions"]

TEMPLATES: dict[str, str] = {
    "global": "A photo of a {ctx} person.",
    "head": "A photo of a {ctx} head of a person.",
    "upper": "A photo of a {ctx} upper body of a person.",
    "legs": "A photo of {ctx} legs of a person.",
}
"""The paper's multi-grained templates; ``{ctx}`` becomes N placeholder words."""

TEMPLATE_SETS: dict[str, dict[str, str]] = {
    "paper": {**TEMPLATES, "agnostic": TEMPLATES["global"]},
    "reference": {
        "global": "A photo of a {ctx} person",
        "head": "A photo of a {ctx} head of a person",
        "upper": "A photo of a {ctx} upper body of a person",
        "legs": "A photo of a {ctx} legs of a person",
        "agnostic": "A photo of a {ctx}",     # TEMPLATE_TYPE part-agnostic: the prefix alone
    },
}
"""Template wordings by name (config ``prompt_template``); ``agnostic`` is the part-agnostic prompt (PAP)."""

CTX_WORD = "X"
DOMAIN_WORD = "Z"


@dataclass
class PromptConfig:
    """Prompt-learner switches (defaults = the paper's model).

    n_ctx:              learnable vectors per identity per granularity (N = 4)
    init_std:           their init std (0.002)
    part_words:         keep the part names in the templates (False = PAP, Table 7)
    shared_part_tokens: one set of vectors per identity for all granularities
    domain_specific:    DSP (Table 7): learnable per-domain vectors prepended to the prompt
    n_domain_ctx:       DSP vectors per domain
    domain_descriptions: optional fixed text per domain appended to the prompt (DSP only),
                        e.g. "captured outdoors in daylight"
    template:           the wording, a key of :data:`TEMPLATE_SETS` (``paper`` | ``reference``)
    seed:               seed of the initialisation (global RNG left untouched)
    """

    n_ctx: int = 4
    init_std: float = 0.002
    part_words: bool = True
    shared_part_tokens: bool = False
    domain_specific: bool = False
    n_domain_ctx: int = 4
    domain_descriptions: tuple[str, ...] | None = None
    template: str = "paper"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx}")
        if self.template not in TEMPLATE_SETS:
            raise ValueError(f"template must be one of {sorted(TEMPLATE_SETS)}, got {self.template!r}")
        if self.domain_specific and self.n_domain_ctx < 1:
            raise ValueError(f"n_domain_ctx must be >= 1 with domain_specific, got {self.n_domain_ctx}")
        if self.domain_descriptions is not None:
            if not self.domain_specific:
                raise ValueError("domain_descriptions need domain_specific=True")
            self.domain_descriptions = tuple(self.domain_descriptions)


def placeholder_positions(ids: torch.Tensor, token_id: int, count: int, what: str) -> torch.Tensor:
    """Positions of ``count`` consecutive ``token_id`` tokens in one tokenised template ``[L]``."""
    pos = (ids == token_id).nonzero().flatten()
    if pos.numel() != count or (count > 1 and not bool((pos.diff() == 1).all())):
        raise ValueError(
            f"{what}: expected {count} consecutive placeholder tokens (id {token_id}), found positions "
            f"{pos.tolist()} in {ids.tolist()}"
        )
    return pos


class TextEncoder(nn.Module):
    """CLIP's text tower on prompt *embeddings* (not token ids); reads the EOT position."""

    def __init__(self, clip_model: CLIP) -> None:
        super().__init__()
        if not hasattr(clip_model, "token_embedding") or getattr(clip_model, "text_pool_type", "argmax") != "argmax":
            raise TypeError("TextEncoder needs an open_clip CLIP with the built-in text tower (argmax pooling)")
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    def forward(self, prompts: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """``[B, L, W]`` prompt embeddings, ``[B]`` EOT positions -> text features ``[B, E]``.

        Only the positions up to the last EOT are encoded: the attention is causal, so what a position reads never
        depends on the padding after it (a prompt of ~20 tokens costs a quarter of the 77-token context)."""
        dt = self.transformer.get_cast_dtype()
        n = int(eot_index.max()) + 1 if eot_index.numel() else prompts.shape[1]
        x = prompts[:, :n].to(dt) + self.positional_embedding[:n].to(dt)
        mask = self.attn_mask[:n, :n] if self.attn_mask is not None else None
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]
        proj = self.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class PromptLearner(nn.Module):
    """Learnable multi-grained prompts for ``num_ids`` identities, encoded by the frozen text tower.

    parts:      local granularities (a subset of PARTS); the global one always exists, first
    id_domains: DSP only: ``[num_ids]`` domain index of every identity (default: all domain 0)

    ``forward(pids, granularity)`` -> ``[B, E]`` for one granularity (name or index), or, with
    ``granularity=None``, the multi-grained text token ``t^mg`` = all granularities concatenated
    ``[B, G*E]`` (the order of ``self.granularities``, matching the image feature).
    """

    def __init__(
        self,
        num_ids: int,
        parts: Sequence[str],
        clip_model: CLIP,
        tokenizer,
        cfg: PromptConfig | None = None,
        id_domains: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        cfg = cfg or PromptConfig()
        if num_ids < 1:
            raise ValueError(f"num_ids must be >= 1, got {num_ids}")
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown parts {unknown}; parts are {PARTS}")
        self.cfg = cfg
        self.num_ids = num_ids
        self.granularities: tuple[str, ...] = ("global",) + tuple(p for p in PARTS if p in set(parts))
        self.text_encoder = TextEncoder(clip_model)
        for p in self.text_encoder.parameters():
            p.requires_grad_(False)
        width = self.text_encoder.width
        self.context_length = int(clip_model.context_length)

        # domains (DSP)
        if id_domains is None:
            id_domains = torch.zeros(num_ids, dtype=torch.long)
        id_domains = torch.as_tensor(id_domains, dtype=torch.long)
        if id_domains.shape != (num_ids,) or (id_domains < 0).any():
            raise ValueError(f"id_domains must be [num_ids={num_ids}] non-negative ints, got {tuple(id_domains.shape)}")
        n_domains = int(id_domains.max()) + 1
        if cfg.domain_descriptions is not None:
            if len(cfg.domain_descriptions) < n_domains:
                raise ValueError(
                    f"{len(cfg.domain_descriptions)} domain descriptions for {n_domains} domains in id_domains"
                )
            n_domains = len(cfg.domain_descriptions)
        self.n_domains = n_domains
        self.register_buffer("id_domains", id_domains, persistent=False)

        # templates: ids [G, Dv, L] (Dv = per-domain variants when descriptions are given, else 1)
        x_id = self._single_token(tokenizer, CTX_WORD)
        z_id = self._single_token(tokenizer, DOMAIN_WORD)
        variants = list(cfg.domain_descriptions) if cfg.domain_descriptions is not None else [None]
        ids, x_pos, z_pos = [], [], []
        self.template_texts: list[list[str]] = []
        for g in self.granularities:
            g_ids, g_x, g_z, g_txt = [], [], [], []
            for desc in variants:
                text = self.template_text(g, desc)
                tok = tokenizer([text])[0]
                if tok.shape[0] != self.context_length:
                    raise ValueError(f"tokenizer context {tok.shape[0]} != text context {self.context_length}")
                g_ids.append(tok)
                g_x.append(placeholder_positions(tok, x_id, cfg.n_ctx, f"template {text!r}"))
                if cfg.domain_specific:
                    g_z.append(placeholder_positions(tok, z_id, cfg.n_domain_ctx, f"template {text!r}"))
                g_txt.append(text)
            ids.append(torch.stack(g_ids))
            x_pos.append(torch.stack(g_x))
            if cfg.domain_specific:
                z_pos.append(torch.stack(g_z))
            self.template_texts.append(g_txt)
        ids_t = torch.stack(ids)                                   # [G, Dv, L]
        self.register_buffer("template_ids", ids_t, persistent=False)
        self.register_buffer("ctx_positions", torch.stack(x_pos), persistent=False)   # [G, Dv, n_ctx]
        self.register_buffer("eot_index", ids_t.argmax(-1), persistent=False)         # [G, Dv]
        if cfg.domain_specific:
            self.register_buffer("domain_positions", torch.stack(z_pos), persistent=False)

        n_sets = 1 if cfg.shared_part_tokens else len(self.granularities)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.ctx = nn.Parameter(torch.randn(num_ids, n_sets, cfg.n_ctx, width) * cfg.init_std)
            if cfg.domain_specific:
                self.domain_ctx = nn.Parameter(torch.randn(n_domains, cfg.n_domain_ctx, width) * cfg.init_std)
            else:
                self.register_parameter("domain_ctx", None)

    # ------------------------------------------------------------------ templates
    @staticmethod
    def _single_token(tokenizer, word: str) -> int:
        ids = tokenizer.encode(word)
        if len(ids) != 1:
            raise ValueError(f"placeholder {word!r} must be one BPE token, got {ids}")
        return int(ids[0])

    def template_text(self, granularity: str, description: str | None = None) -> str:
        """The sentence (with placeholders) used for ``granularity``."""
        cfg = self.cfg
        wording = TEMPLATE_SETS[cfg.template]
        base = wording[granularity if cfg.part_words else "agnostic"]
        text = base.format(ctx=" ".join([CTX_WORD] * cfg.n_ctx))
        if cfg.domain_specific:
            text = " ".join([DOMAIN_WORD] * cfg.n_domain_ctx) + " " + text
            if description:
                end = "." if text.endswith(".") else ""
                text = text.rstrip(".") + f", {description.strip().rstrip('.')}{end}"
        return text

    def granularity_texts(self, variant: int = 0) -> list[str]:
        """The template sentences (with placeholders) of every granularity, in feature order."""
        return [texts[variant] for texts in self.template_texts]

    def granularity_index(self, granularity: str | int) -> int:
        if isinstance(granularity, int):
            if not 0 <= granularity < len(self.granularities):
                raise IndexError(f"granularity index {granularity} out of range for {self.granularities}")
            return granularity
        if granularity not in self.granularities:
            raise ValueError(f"granularity {granularity!r} not in {self.granularities}")
        return self.granularities.index(granularity)

    # ------------------------------------------------------------------ prompts
    def build_prompts(self, pids: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings ``[B, L, W]`` and EOT indices ``[B]`` for identities ``pids``, granularity ``g``."""
        pids = pids.to(self.ctx.device).long()
        if pids.numel() and (pids.min() < 0 or pids.max() >= self.num_ids):
            raise IndexError(f"pids must be in [0, {self.num_ids}), got range [{int(pids.min())}, {int(pids.max())}]")
        dom = self.id_domains[pids]
        variant = dom if self.template_ids.shape[1] > 1 else torch.zeros_like(dom)
        ids = self.template_ids[g][variant]                                     # [B, L]
        with torch.no_grad():
            emb = self.text_encoder.token_embedding(ids)
        emb = emb.to(self.ctx.dtype)
        W = emb.shape[-1]
        ctx = self.ctx[pids, 0 if self.cfg.shared_part_tokens else g]          # [B, n_ctx, W]
        pos = self.ctx_positions[g][variant]                                    # [B, n_ctx]
        emb = emb.scatter(1, pos.unsqueeze(-1).expand(-1, -1, W), ctx)
        if self.domain_ctx is not None:
            dpos = self.domain_positions[g][variant]
            emb = emb.scatter(1, dpos.unsqueeze(-1).expand(-1, -1, W), self.domain_ctx[dom])
        return emb, self.eot_index[g][variant]

    def forward(self, pids: torch.Tensor, granularity: str | int | None = None) -> torch.Tensor:
        """Text features: ``[B, E]`` for one granularity, or ``[B, G*E]`` (t^mg) when None."""
        if granularity is not None:
            emb, eot = self.build_prompts(pids, self.granularity_index(granularity))
            return self.text_encoder(emb, eot)
        parts = [self.build_prompts(pids, g) for g in range(len(self.granularities))]
        emb = torch.cat([p[0] for p in parts])                                  # [G*B, L, W]
        eot = torch.cat([p[1] for p in parts])
        feats = self.text_encoder(emb, eot)                                     # [G*B, E]
        G, B = len(self.granularities), pids.shape[0]
        return feats.view(G, B, -1).transpose(0, 1).reshape(B, -1)

    @torch.no_grad()
    def text_features_all(self, batch_size: int = 128, progress: bool = False) -> torch.Tensor:
        """The multi-grained text token of every identity, ``[num_ids, G*E]`` (no grad; e.g. TPM)."""
        out = []
        starts = range(0, self.num_ids, batch_size)
        for s in tqdm(starts, desc="text prototypes", disable=not progress):
            pids = torch.arange(s, min(s + batch_size, self.num_ids), device=self.ctx.device)
            out.append(self(pids).float())
        return torch.cat(out)

    def learnable_parameters(self) -> list[nn.Parameter]:
        """The parameters stage 1 optimises (the prompt vectors; the text tower is frozen)."""
        return [p for p in (self.ctx, self.domain_ctx) if p is not None]

    def learnable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the learned prompt vectors (the frozen text tower is part of CLIP)."""
        return {k: v for k, v in self.state_dict().items() if k in ("ctx", "domain_ctx")}

    def train(self, mode: bool = True) -> "PromptLearner":
        super().train(mode)
        self.text_encoder.eval()   # frozen tower: no dropout / stat updates
        return self
