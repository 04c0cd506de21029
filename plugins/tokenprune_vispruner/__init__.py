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

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, Selection, TokenReducer
from tokenprune.reducer import Share, VisionAttentionParams, VisionAttentionRequest
from tokenprune.similarity import unit_rows
from tokenprune.validation import attention_and_metric

DROP_PER_ROUND = 8
"""Most near-duplicates one matching round removes (the official code's ``min(8, R - T_div)``)."""
NEIGHBOURS = 32
"""Most similar tokens each residual token keeps a list of: a round finds an even token's best odd match there."""
FALLBACK_ROWS = 8
"""Even tokens per round whose best odd match is read from the whole block (the lowest-ranked ones, where the
tokens whose list holds no odd token rank)."""


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
        important_ratio: Share = Field(
            default=0.5,
            description="Share of the budget taken by the important tokens, int(T * ratio) (the official default "
            "0.5; its README's 64-token example uses 0.75).",
        )
        similarity: Literal["vision", "projected"] = Field(
            default="vision",
            description="Features the duplicates are found on: the vision tower's output at that layer ('vision', "
            "pre-projector, the official code's) or the post-projector tokens ('projected').",
        )

        def vision_request(self, **more: Any) -> VisionAttentionRequest:
            """The attention at :attr:`layer`, and the layer's output where :attr:`similarity` is ``vision``."""
            return super().vision_request(features=self.similarity == "vision", **more)

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Select per sample; see the class docstring. ``tokens`` is ``(B, N, D)``.

        Three host reads whatever the batch size: the per-sample quotas and candidate counts, then
        whether any sample's fast rounds must be redone (:func:`vispruner_picks`).
        """
        scores, features = self._inputs(tokens, ctx)
        protected = ctx.protected & ctx.valid
        candidates = ctx.valid & ~protected
        quota, counts = torch.stack([ctx.budget - protected.sum(1), candidates.sum(1)]).tolist()
        n = candidates.shape[1]
        position = torch.arange(n, device=candidates.device).expand_as(candidates)
        first = torch.where(candidates, position, position + n).argsort(1)  # each row's candidates first, in order
        keep, picks = protected.clone(), []
        for b in range(ctx.batch_size):
            members = first[b, : counts[b]]
            if quota[b] >= counts[b]:
                keep[b, members] = True
            elif quota[b] > 0:
                args = (scores[b, members], features[b, members], quota[b], self.params.important_ratio)  # type: ignore[attr-defined]
                picks.append((b, members, args, *_picks(*args)))
        redo = torch.stack([missed for *_, missed in picks]).tolist() if picks else []
        for (b, members, args, picked, _), again in zip(picks, redo, strict=True):
            keep[b, members[vispruner_picks(*args, exact=True) if again else picked]] = True
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
        return attention_and_metric(tokens, ctx, self.name, self.params.similarity, "features")  # type: ignore[attr-defined]


def vispruner_picks(
    scores: Tensor, features: Tensor, quota: int, important_ratio: float, *, exact: bool = False
) -> Tensor:
    """VisPruner's choice of ``quota`` of ``n`` tokens, as indices into them (important first, then diverse).

    Args:
        scores: ``(n,)`` attention (``-inf``: ranked last).
        features: ``(n, D)`` features the duplicates are found on (zero rows: similarity 0).
        quota: Tokens to keep, ``0 < quota < n``.
        important_ratio: The important tokens are the first ``int(quota * important_ratio)`` by attention.
        exact: Run every round on the full even-by-odd block (the reference the fast rounds must equal).

    The similarity matrix of the residual tokens is computed once. Each round needs every even token's
    highest similarity to an odd one: the fast rounds (:func:`_deduplicate`) read it from each token's
    :data:`NEIGHBOURS` most similar tokens instead of the whole block; where a list holds no odd token
    they fall back to the block, and where that would take more than :data:`FALLBACK_ROWS` rows in a
    round the exact rounds run instead (one host read at the end). The picks are the same either way.
    """
    picked, missed = _picks(scores, features, quota, important_ratio, exact=exact)
    if not exact and bool(missed):
        picked, _ = _picks(scores, features, quota, important_ratio, exact=True)
    return picked


def _picks(
    scores: Tensor, features: Tensor, quota: int, important_ratio: float, *, exact: bool = False
) -> tuple[Tensor, Tensor]:
    """:func:`vispruner_picks` without its host read: the picks and whether the fast rounds missed (``()`` bool)."""
    order = scores.float().argsort(descending=True, stable=True)
    important = int(quota * important_ratio)
    diverse = quota - important
    residual = order[important:]
    missed = torch.zeros((), dtype=torch.bool, device=scores.device)
    if diverse == 0:
        return order[:important], missed
    unit = unit_rows(features[residual])
    sim = unit @ unit.T
    rest, missed = _deduplicate_exact(sim, diverse) if exact else _deduplicate(sim, diverse)
    return torch.cat([order[:important], residual[rest]]), missed


def _deduplicate_exact(sim: Tensor, diverse: int) -> tuple[Tensor, Tensor]:
    """The official rounds over the ``(R, R)`` similarity matrix: each reads the even-by-odd block."""
    rest = torch.arange(sim.shape[0], device=sim.device)
    while (drop := min(DROP_PER_ROUND, rest.numel() - diverse)) > 0:
        even, odd = rest[0::2], rest[1::2]
        best = sim.index_select(0, even).index_select(1, odd).amax(1)
        distinct = best.argsort(descending=True, stable=True)[drop:]
        rest = torch.cat([even[distinct], odd])
    return rest, torch.zeros((), dtype=torch.bool, device=sim.device)


def _deduplicate(sim: Tensor, diverse: int) -> tuple[Tensor, Tensor]:
    """The same rounds, each even token's best odd match read from its nearest neighbours.

    Returns the ``diverse`` remaining indices into ``sim`` and a ``()`` bool: some round had more than
    :data:`FALLBACK_ROWS` even tokens without an odd one among their neighbours (then the result is not
    to be used). The lists are rebuilt among the remaining tokens whenever half of them are gone.
    """
    n, device = sim.shape[0], sim.device
    rest = torch.arange(n, device=device)
    missed = torch.zeros((), dtype=torch.bool, device=device)
    odd_only = torch.empty(n, dtype=sim.dtype, device=device)  # 0 at this round's odd tokens, -inf elsewhere
    near, near_sim, listed = _neighbours(sim, rest)
    while (drop := min(DROP_PER_ROUND, rest.numel() - diverse)) > 0:
        if 2 * rest.numel() <= listed:
            near, near_sim, listed = _neighbours(sim, rest)
        even, odd = rest[0::2], rest[1::2]
        odd_only.fill_(float("-inf")).index_fill_(0, odd, 0.0)
        rows = near.index_select(0, even)
        best = (near_sim.index_select(0, even) + odd_only.take(rows)).amax(1)  # -inf: no odd neighbour listed
        order = best.argsort(descending=True, stable=True)
        if near.shape[1] < listed:  # incomplete lists: an even token may have no odd neighbour in them
            best, lost = _fallback(sim, best, order[max(order.numel() - FALLBACK_ROWS, 0) :], even, odd)
            missed |= lost
            order = best.argsort(descending=True, stable=True)
        rest = torch.cat([even.index_select(0, order[drop:]), odd])
    return rest, missed


def _neighbours(sim: Tensor, rest: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per token of ``rest``: its ``K`` most similar tokens of ``rest`` (``(n, K)`` indices into ``sim``, at
    the rows of ``rest``) and their similarities, and ``rest``'s size (``K = min(NEIGHBOURS, size)``)."""
    n, size = sim.shape[0], rest.numel()
    block = sim if size == n else sim.index_select(0, rest).index_select(1, rest)  # all of them: no copy
    values, columns = block.topk(min(NEIGHBOURS, size), dim=1, sorted=False)
    near = torch.zeros(n, values.shape[1], dtype=torch.long, device=sim.device)
    near_sim = torch.zeros(n, values.shape[1], dtype=values.dtype, device=sim.device)
    near[rest], near_sim[rest] = rest[columns], values
    return near, near_sim, size


def _fallback(sim: Tensor, best: Tensor, lowest: Tensor, even: Tensor, odd: Tensor) -> tuple[Tensor, Tensor]:
    """``best`` with the exact values of its ``lowest`` entries (where every row without a listed odd
    neighbour, ``-inf``, sorts), and whether some row without one was left out of them."""
    rows = even.index_select(0, lowest)
    exact = sim.index_select(0, rows).index_select(1, odd).amax(1)
    best = best.index_copy(0, lowest, exact)
    unlisted = best == float("-inf")  # rows that got no exact value and found no odd neighbour
    return best, unlisted.any()


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(VisPruner)
