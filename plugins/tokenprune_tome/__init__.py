"""The ``tome`` reducer: Token Merging by bipartite soft matching, repeated until the budget is met.

ToMe (Bolya et al., ICLR 2023, https://arxiv.org/abs/2210.09461; official code
https://github.com/facebookresearch/ToMe, ``tome/merge.py``), applied one-shot to the visual tokens
of a VLM. Packaged exactly as a third-party plugin: this module is the entry point ``tome`` of the
``tokenprune`` group, and registers its reducer through the hook.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, Merge, ReduceContext, ReducerParams, TokenReducer
from tokenprune.validation import check_finite_tokens


class ToMe(TokenReducer):
    """Merge similar tokens, in rounds of bipartite soft matching, until each sample has its budget.

    Per sample, the mergeable tokens are the valid, unprotected ones; protected tokens never merge
    and nothing merges into them. Each token starts with its size from ``ctx.sizes`` (1, or what an
    earlier merging stage left). One round over the ``t`` current mergeable tokens, in index order:

    1. metric = the size-weighted mean feature of each current token, L2-normalised (features at
       ``post_projector``, hidden states at a layer; keys are not available at an insertion point);
    2. set A = even positions, set B = odd positions; each A token finds its most similar B token
       (cosine; ties to the lower index);
    3. the ``r = min(t - target, t // 2)`` A tokens with the best matches merge into their B
       matches (ties to the lower index); sizes and feature sums add up.

    Between rounds, ``order: index`` (default) puts the remaining tokens back in index order;
    ``order: official`` keeps the official ``merge.py`` output order, ``[unmerged A, B]`` with the
    unmerged A tokens by decreasing match score, so the next round alternates over that order.

    Rounds repeat until ``target = budget - protected`` tokens remain, so the count is exact. The
    result is a :class:`Merge` whose destinations are always roots (rounds are composed); the engine
    replaces each group by its size-weighted mean and carries the summed sizes to later stages.

    If a sample's budget leaves no room beyond its protected tokens, its other tokens have nothing
    to merge into: they are dropped (destination ``-1``) and the sample keeps its protected tokens.

    Cost: ``O(t² D / 4)`` per round, with ``t`` halving at most per round (``O(N² D)`` in all);
    ``O(N²)`` memory.
    """

    name = "tome"
    capabilities = Capabilities(insertion_points=frozenset({"vision_layer", "post_projector", "layer"}), merges=True)

    class Params(ReducerParams):
        order: Literal["index", "official"] = Field(
            default="index",
            description=(
                "Token order between rounds: 'index' (sequence order) or 'official', the official merge.py "
                "output [unmerged A by decreasing match score, B], over which the next round alternates."
            ),
        )

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Merge:
        """Merge per sample; see the class docstring. ``tokens`` is ``(B, N, D)``."""
        x = tokens.detach()
        check_finite_tokens(x, ctx, self.name)
        b, n = ctx.valid.shape
        destination = torch.arange(n, device=x.device).expand(b, n).clone()
        for s in range(b):
            count = int(ctx.valid[s].sum())
            mergeable = (~ctx.protected[s, :count]).nonzero().squeeze(1)
            target = int(ctx.budget[s]) - (count - int(mergeable.numel()))
            if target >= mergeable.numel():
                continue
            if target <= 0:
                destination[s, mergeable] = -1
                continue
            destination[s, :count] = bipartite_merge(
                x[s, :count], ctx.sizes[s, :count], mergeable, target, official_order=self.params.order == "official"
            )
        return Merge(destination=destination)

    def overhead_macs(self, tokens: Tensor, ctx: ReduceContext) -> int:
        """``|A| · |B| · D`` per matching round (the ``A x B`` similarity product)."""
        total = 0
        dim = int(tokens.shape[-1])
        for s in range(ctx.batch_size):
            count = int(ctx.valid[s].sum())
            t = count - int(ctx.protected[s, :count].sum())
            target = int(ctx.budget[s]) - (count - t)
            if target <= 0:
                continue
            while t > target:
                total += ((t + 1) // 2) * (t // 2) * dim
                t -= min(t - target, t // 2)
        return total


def bipartite_merge(
    x: Tensor, sizes: Tensor, mergeable: Tensor, target: int, *, official_order: bool = False
) -> Tensor:
    """Destinations after rounds of bipartite soft matching among ``mergeable`` tokens.

    Args:
        x: ``(n, D)`` features of one sample.
        sizes: ``(n,)`` initial sizes (weights of the means).
        mergeable: ``(m,)`` increasing indices of the tokens that may merge.
        target: How many of them must remain, ``1 <= target <= m``.
        official_order: After each round, order the remaining tokens as the official ``merge.py``
            outputs them (unmerged A tokens by decreasing score, then B) instead of by index; A and
            B of the next round alternate over that order, and ties go to the earlier position.

    Returns:
        ``(n,)`` long: each token's root (roots and non-mergeable tokens map to themselves).
    """
    n = x.shape[0]
    sums = x.float() * sizes.float().unsqueeze(-1)  # (n, D) size-weighted feature sums
    mass = sizes.float().clone()  # (n,)
    destination = torch.arange(n, device=x.device)
    alive = mergeable.clone()
    while alive.numel() > target:
        t = int(alive.numel())
        r = min(t - target, t // 2)
        means = sums[alive] / mass[alive].clamp(min=1e-12).unsqueeze(-1)
        metric = torch.nn.functional.normalize(means / means.abs().amax(-1, keepdim=True).clamp(min=1e-30), dim=-1)
        a, b = alive[0::2], alive[1::2]
        best, match = (metric[0::2] @ metric[1::2].T).max(dim=-1)
        ranked = torch.argsort(best, descending=True, stable=True)
        order = ranked[:r]
        src, dst = a[order], b[match[order]]
        sums.index_add_(0, dst, sums[src])
        mass.index_add_(0, dst, mass[src])
        remap = torch.arange(n, device=x.device)
        remap[src] = dst
        destination = remap[destination]
        if official_order:
            alive = torch.cat([a[ranked[r:]], b])
            continue
        survives = torch.ones(t, dtype=torch.bool, device=x.device)
        survives[2 * order] = False
        alive = alive[survives]
    return destination


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(ToMe)
