"""The ``vispruner`` reducer: important tokens by [CLS] attention, then diverse tokens by removing duplicates.

VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning
in VLMs", ICCV 2025, https://arxiv.org/abs/2412.01818; official code github.com/Theia-4869/VisPruner,
``llava/model/llava_arch.py`` ``encode_images`` and ``multimodal_encoder/clip_encoder.py``
``feature_select``): the vision tower's [CLS] attention picks ``int(T * important_ratio)`` important
tokens; the rest, in attention order, is de-duplicated on the pre-projector features by repeated
even/odd matching, dropping up to 8 tokens a round, until the remaining ``T - important`` diverse
tokens are left.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ReducerParams, Selection, TokenReducer, VisionAttentionRequest
from tokenprune.errors import ReducerInputError
from tokenprune.reducer import Requirements, VisionAttentionParams
from tokenprune.similarity import unit_rows
from tokenprune.validation import check_finite_tokens

DROP_PER_ROUND = 8
"""Most near-duplicates one matching round removes (the official code's ``min(8, R - T_div)``)."""


class VisPruner(TokenReducer):
    """Keep important tokens by vision-encoder attention, then diverse ones among the rest.

    Per sample, over its valid unprotected tokens (protected tokens are kept and count in the budget),
    with ``T`` the free budget:

    1. rank the tokens by ``ctx.vision_attention`` (descending, ties to the lower index); the first
       ``int(T * important_ratio)`` are the important tokens;
    2. the rest, still in that order, is de-duplicated: split it into the even and the odd positions,
       give each even token its highest cosine similarity to any odd one, drop the (up to 8) most
       similar even tokens, put the remaining even tokens (by descending similarity) before the odd
       ones, and repeat until ``T - important`` tokens are left.

    The similarity is that of the pre-projector features (``ctx.vision_features``, the tower layer's
    output, as the official code) or, with ``similarity: projected``, of the post-projector tokens.
    """

    name = "vispruner"
    capabilities = Capabilities(
        insertion_points=frozenset({"post_projector"}), vision_attention=frozenset({"cls", "mean"})
    )

    class Params(VisionAttentionParams):
        important_ratio: float = Field(
            default=0.5,
            ge=0.0,
            le=1.0,
            description="Share of the budget taken by the important tokens, int(T * ratio) (the official default "
            "0.5; its README's 64-token example uses 0.75).",
        )
        similarity: Literal["vision", "projected"] = Field(
            default="vision",
            description="Features the duplicates are found on: the vision tower's output at that layer ('vision', "
            "pre-projector, the official code's) or the post-projector tokens ('projected').",
        )

    @classmethod
    def requirements(cls, params: ReducerParams) -> Requirements:
        p: VisPruner.Params = params  # type: ignore[assignment]
        return Requirements(
            vision_attention=VisionAttentionRequest(p.attention, p.layer, features=p.similarity == "vision")
        )

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Select per sample; see the class docstring. ``tokens`` is ``(B, N, D)``."""
        scores, features = self._inputs(tokens, ctx)
        protected = ctx.protected & ctx.valid
        candidates = ctx.valid & ~protected
        quota = (ctx.budget - protected.sum(1)).tolist()
        keep = protected.clone()
        for b in range(ctx.batch_size):
            members = candidates[b].nonzero().flatten()
            if quota[b] >= members.numel():
                keep[b, members] = True
            elif quota[b] > 0:
                picked = vispruner_picks(
                    scores[b, members], features[b, members], quota[b], self.params.important_ratio
                )  # type: ignore[attr-defined]
                keep[b, members[picked]] = True
        return Selection.from_mask(keep)

    def overhead_macs(self, tokens: Tensor, ctx: ReduceContext) -> int:
        """The cosine matrix of each sample's residual tokens: ``R² D`` (``R`` tokens left after the important ones)."""
        feats = ctx.vision_features if self.params.similarity == "vision" else tokens  # type: ignore[attr-defined]
        dim = 0 if feats is None else int(feats.shape[-1])
        protected = ctx.protected & ctx.valid
        candidates = (ctx.valid & ~protected).sum(1).tolist()
        total = 0
        for n, q in zip(candidates, (ctx.budget - protected.sum(1)).tolist(), strict=True):
            important = int(q * self.params.important_ratio)  # type: ignore[attr-defined]
            if 0 < q < n and q > important:
                total += (n - important) ** 2 * dim
        return total

    def _inputs(self, tokens: Tensor, ctx: ReduceContext) -> tuple[Tensor, Tensor]:
        """``(B, N)`` attention and ``(B, N, D)`` features the duplicates are found on."""
        if ctx.vision_attention is None:
            raise ReducerInputError(
                f"reducer {self.name!r} needs ctx.vision_attention; run it at post_projector through tokenprune.apply"
            )
        if self.params.similarity == "projected":  # type: ignore[attr-defined]
            check_finite_tokens(tokens.detach(), ctx, self.name)
            return ctx.vision_attention, tokens.detach()
        if ctx.vision_features is None:
            raise ReducerInputError(
                f"reducer {self.name!r} with similarity 'vision' needs ctx.vision_features (the engine serves them "
                "when the stage's vision request sets features); or set similarity: projected"
            )
        return ctx.vision_attention, ctx.vision_features


def vispruner_picks(scores: Tensor, features: Tensor, quota: int, important_ratio: float) -> Tensor:
    """VisPruner's choice of ``quota`` of ``n`` tokens, as indices into them (important first, then diverse).

    Args:
        scores: ``(n,)`` attention (``-inf``: ranked last).
        features: ``(n, D)`` features the duplicates are found on (zero rows: similarity 0).
        quota: Tokens to keep, ``0 < quota < n``.
        important_ratio: The important tokens are the first ``int(quota * important_ratio)`` by attention.

    The similarity matrix of the residual tokens is computed once; each round reads its even-by-odd block,
    which equals the official per-round product of the same unit rows.
    """
    order = scores.float().argsort(descending=True, stable=True)
    important = int(quota * important_ratio)
    diverse = quota - important
    residual = order[important:]
    if diverse == 0:
        return order[:important]
    unit = unit_rows(features[residual])
    sim = unit @ unit.T
    rest = torch.arange(residual.numel(), device=scores.device)
    while (drop := min(DROP_PER_ROUND, rest.numel() - diverse)) > 0:
        even, odd = rest[0::2], rest[1::2]
        best = sim.index_select(0, even).index_select(1, odd).amax(1)
        distinct = best.argsort(descending=True, stable=True)[drop:]
        rest = torch.cat([even[distinct], odd])
    return torch.cat([order[:important], residual[rest]])


@tokenprune.hookimpl
def tokenprune_register_reducers(registry: tokenprune.plugins.ReducerRegistry) -> None:
    registry.add(VisPruner)
