"""The ``divprune`` reducer: DivPrune, max-min diversity selection of the visual tokens.

DivPrune (Alvar et al., CVPR 2025, https://arxiv.org/abs/2503.02175; official code
https://github.com/vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``, ``DivPrune``). Packaged exactly
as a third-party plugin: this module is the entry point ``divprune`` of the ``tokenprune`` group, and
registers its reducer through the hook.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ReducerParams, Selection, TokenReducer
from tokenprune.similarity import cosine_distance, cosine_similarity_macs
from tokenprune.validation import check_finite_tokens


class DivPrune(TokenReducer):
    """Keep the most diverse tokens: greedy max-min selection under the cosine distance.

    Per sample, over its valid unprotected tokens (protected tokens are kept and take no part), with
    ``d(i, j) = 1 - cos(x_i, x_j)`` computed in float32:

    1. the first pick is the token whose nearest neighbour is farthest, ``argmax_j min_{i != j} d(i, j)``;
    2. every further pick is the token farthest from the chosen set, ``argmax_j min_{i in chosen} d(i, j)``,

    until the stage's free budget (``budget`` minus protected tokens) is filled. Ties go to the lower
    index. As in the official code, a sample's tokens are one set: all views of an image, and on
    LLaVA-NeXT the row-end newline tokens too when the pipeline does not protect them.

    The picks are sequential, but each pick is a few vectorised operations over the tokens and the
    batch: the minimum distance to the chosen set is updated with the new pick's row only (on the CPU
    through NumPy views of the same memory: a tenth of torch's per-operation overhead, the same values).
    Cost per sample of ``n`` tokens: ``O(n² D)`` for the distances, ``O(K n)`` for ``K`` picks,
    ``O(n²)`` memory.
    """

    name = "divprune"
    capabilities = Capabilities(insertion_points=frozenset({"post_projector", "layer"}))

    class Params(ReducerParams):
        """DivPrune has no parameters besides the stage's ``keep``."""

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Select per sample; see the class docstring. ``tokens`` is ``(B, N, D)``."""
        x = tokens.detach()
        check_finite_tokens(x, ctx, self.name)
        protected = ctx.protected & ctx.valid
        candidates = ctx.valid & ~protected
        quota = ctx.budget - protected.sum(1)
        members = Selection.from_mask(candidates).indices  # (B, M), -1 after each sample's candidates
        distance = pairwise_cosine_distance(x, members, choosing=(quota > 0) & (quota < candidates.sum(1)))
        picks = max_min_picks(distance, members >= 0, quota)
        return Selection.from_mask(protected | picked_mask(members, picks, x.shape[1]))

    def overhead_macs(self, tokens: Tensor, ctx: ReduceContext) -> int:
        """The distance matrix of the ``n`` unprotected tokens of each sample that must choose: about ``n² D / 2``."""
        candidates = (ctx.valid & ~ctx.protected).sum(1)
        quota = ctx.budget - (ctx.valid & ctx.protected).sum(1)
        choosing = ((quota > 0) & (quota < candidates)).tolist()
        dim = int(tokens.shape[-1])
        return sum(cosine_similarity_macs(int(n), dim) for n, c in zip(candidates.tolist(), choosing, strict=True) if c)


def pairwise_cosine_distance(x: Tensor, members: Tensor, choosing: Tensor | None = None) -> Tensor:
    """``1 - cos`` between the tokens of each sample listed in ``members``.

    Args:
        x: ``(B, N, D)`` features (any float dtype; computed in float32).
        members: ``(B, M)`` long token indices per sample, ``-1`` after the last.
        choosing: ``(B,)`` bool, the samples that need their matrix (default: all); the others'
            stay ``inf``, which makes :func:`max_min_picks` take their tokens in index order.

    Returns:
        ``(B, M, M)`` float32 distances; rows and columns of ``-1`` entries hold ``inf``. Each sample's
        matrix is computed on its own tokens only, so it does not depend on the rest of the batch.
        Zero vectors are at distance 1 from everything (the official code divides by their zero norm).
    """
    b, m = members.shape
    needed = [True] * b if choosing is None else choosing.tolist()
    matrices = []
    for s, n in enumerate((members >= 0).sum(1).tolist()):
        if n and needed[s]:
            distance = cosine_distance(x[s, members[s, :n]])
            padding = (0, m - n, 0, m - n)
            matrices.append(torch.nn.functional.pad(distance, padding, value=float("inf")) if n < m else distance)
        else:
            matrices.append(torch.full((m, m), float("inf"), dtype=torch.float32, device=x.device))
    if len(matrices) == 1:
        return matrices[0].unsqueeze(0)  # no copy for the usual single sample
    return torch.stack(matrices) if matrices else torch.empty(0, m, m, dtype=torch.float32, device=x.device)


def picked_mask(members: Tensor, picks: Tensor, num_tokens: int) -> Tensor:
    """``(B, N)`` bool mask of the tokens ``members[b, picks[b]]`` (``-1`` picks are ignored)."""
    b = members.shape[0]
    tokens = members.gather(1, picks.clamp(min=0))
    tokens = torch.where((picks >= 0) & (tokens >= 0), tokens, num_tokens)  # -1: a dummy column
    mask = torch.zeros(b, num_tokens + 1, dtype=torch.bool, device=members.device)
    return mask.scatter_(1, tokens, True)[:, :num_tokens]


def max_min_picks(distance: Tensor, valid: Tensor, quota: Tensor) -> Tensor:
    """Greedy max-min diversity picks, vectorised over the batch.

    Args:
        distance: ``(B, M, M)`` contiguous float distances (``inf`` at invalid rows and columns); its
            diagonal is overwritten (the distance of an entry to itself takes no part).
        valid: ``(B, M)`` bool, the entries that may be picked.
        quota: ``(B,)`` long, picks per sample (at most its valid entries).

    Returns:
        ``(B, K)`` long, ``K = quota.max()``: the picks in the order they were made, ``-1`` after
        ``quota[b]``. First pick: the entry whose nearest other entry is farthest; then the entry
        farthest from the picked ones (by its minimum distance to them). Ties to the lower index.
    """
    b, m = valid.shape
    k = int(quota.max()) if b else 0
    if k == 0:
        return torch.full((b, 0), -1, dtype=torch.long, device=distance.device)
    diagonal = distance.diagonal(dim1=1, dim2=2)
    diagonal.fill_(float("inf"))
    nearest = distance.amin(1)  # (B, M): column-wise, as the official code
    diagonal.fill_(float("-inf"))  # from here on, picking an entry removes it: min(gap, its row) is -inf there
    rows = distance.view(b * m, m)
    offsets = torch.arange(b, device=distance.device) * m
    j = nearest.masked_fill_(~valid, float("-inf")).argmax(1)
    gap = rows.index_select(0, offsets + j).masked_fill_(~valid, float("-inf"))  # min distance to the chosen set
    greedy = _greedy_numpy if distance.device.type == "cpu" else _greedy_torch
    chosen = torch.cat([j.unsqueeze(1), greedy(rows, gap, k - 1)], 1)
    return chosen.masked_fill_(torch.arange(k, device=chosen.device) >= quota.unsqueeze(1), -1)


def _greedy_torch(rows: Tensor, gap: Tensor, picks: int) -> Tensor:
    """``picks`` further max-min picks: ``(B, picks)``; ``rows`` is ``(B * M, M)``, ``gap`` ``(B, M)`` (updated)."""
    b, m = gap.shape
    offsets = torch.arange(b, device=gap.device) * m
    chosen = []
    for _ in range(picks):
        j = gap.argmax(1)
        chosen.append(j)
        torch.minimum(gap, rows.index_select(0, offsets + j), out=gap)
    return torch.stack(chosen, 1) if chosen else gap.new_empty(b, 0, dtype=torch.long)


def _greedy_numpy(rows: Tensor, gap: Tensor, picks: int) -> Tensor:
    """:func:`_greedy_torch` on NumPy views of CPU tensors: the same operations (argmax takes the first
    maximum in both), without torch's per-call overhead, which dominates at one row per pick."""
    b, m = gap.shape
    table, current = rows.numpy(), gap.numpy()
    offsets = np.arange(b) * m
    chosen = np.empty((b, picks), dtype=np.int64)
    for p in range(picks):
        j = current.argmax(1)
        chosen[:, p] = j
        np.minimum(current, table[offsets + j], out=current)
    return torch.from_numpy(chosen)


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(DivPrune)
