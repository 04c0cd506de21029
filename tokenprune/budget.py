"""Turn a stage's ``keep`` into a per-sample token budget."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from tokenprune.reducer import ReduceContext


def tokens_to_keep(keep: float | int, present: int) -> int:
    """How many of ``present`` tokens a stage keeps.

    ``keep`` as a float in ``(0, 1]`` is a fraction, rounded down but at least 1 token (when any is
    present); as an int ``>= 1`` it is a count, capped at ``present``.

    >>> tokens_to_keep(0.25, 10), tokens_to_keep(0.01, 10), tokens_to_keep(64, 10), tokens_to_keep(1.0, 7)
    (2, 1, 10, 7)
    """
    if present <= 0:
        return 0
    if isinstance(keep, bool):
        raise TypeError("keep must be a float fraction or an int count, not a bool")
    if isinstance(keep, int):
        return min(keep, present)
    # 1e-9 absorbs binary representation error (0.29 * 100 == 28.999999999999996).
    return min(present, max(1, math.floor(keep * present + 1e-9)))


def budget_per_sample(keep: float | int, valid: Tensor, protected: Tensor) -> Tensor:
    """``(B,)`` long budget for ``(B, N)`` ``valid`` and ``protected`` masks.

    The budget counts protected tokens; a sample whose protected tokens exceed ``keep`` keeps all of
    them (and nothing else).
    """
    present = valid.sum(1).tolist()
    floor = (protected & valid).sum(1)
    wanted = torch.tensor([tokens_to_keep(keep, int(p)) for p in present], dtype=torch.long, device=valid.device)
    return torch.maximum(wanted, floor)


def split_budget(free: int, sizes: list[int]) -> list[int]:
    """Split ``free`` tokens over groups of ``sizes`` proportionally (largest remainder, ties to the first).

    Spatial reducers use it to give each view of an image its share of a stage's budget.

    >>> split_budget(5, [6, 3, 3])
    [3, 1, 1]
    """
    total = sum(sizes)
    if total == 0 or free >= total:
        return list(sizes)
    quotas = [free * s // total for s in sizes]
    remainders = [free * s % total for s in sizes]
    for g in sorted(range(len(sizes)), key=lambda g: (-remainders[g], g))[: free - sum(quotas)]:
        quotas[g] += 1
    return quotas


def plan_spatial_groups(ctx: ReduceContext, b: int) -> tuple[Tensor, list[Tensor], int]:
    """For sample ``b``: the indices always kept, the spatial groups (index tensors) and their free budget.

    Groups are the unprotected, non-newline tokens of each ``(image, view)`` of the layout (of each
    frame of a video), in layout order, or all unprotected tokens when there is no layout. Kept
    without condition: the protected tokens, and, when the budget exceeds the grouped tokens, the
    first unprotected newline tokens that make up the difference (then no group needs to choose,
    and the group list is empty).
    """
    n = int(ctx.valid[b].sum())
    device = ctx.valid.device
    protected = ctx.protected[b, :n]
    if ctx.layout is not None:
        newline = ctx.layout.newline[b, :n]
        image, view = ctx.layout.image[b, :n], ctx.layout.view[b, :n]
    else:
        newline = torch.zeros(n, dtype=torch.bool, device=device)
        image = view = torch.zeros(n, dtype=torch.long, device=device)
    candidate = ~protected & ~newline
    free = int(ctx.budget[b]) - int(protected.sum())
    always = protected.nonzero().squeeze(1)
    members = candidate.nonzero().squeeze(1)
    if free >= members.numel():
        fillers = (~protected & newline).nonzero().squeeze(1)[: free - members.numel()]
        return torch.cat([always, members, fillers]), [], 0
    if ctx.layout is not None:  # one group per (image or video, view, frame), in that order
        lay = ctx.layout
        key = torch.stack([lay.video[b, :n].long(), image, view, lay.frame[b, :n]])[:, members]
        _, inverse = torch.unique(key, dim=1, return_inverse=True)
    else:
        _, inverse = torch.unique(image[members] * 0, return_inverse=True)
    groups = [members[inverse == g] for g in range(int(inverse.max()) + 1)] if members.numel() else []
    return always, groups, free


def spatial_quotas(ctx: ReduceContext, b: int) -> tuple[Tensor, list[tuple[Tensor, int]]]:
    """For sample ``b``: the indices always kept, and each spatial group that must choose with its quota.

    :func:`plan_spatial_groups` followed by :func:`split_budget`, leaving out groups whose quota is 0:
    a spatial reducer keeps ``always`` plus, from each ``(members, quota)``, its ``quota`` best members.
    """
    always, groups, free = plan_spatial_groups(ctx, b)
    quotas = split_budget(free, [int(m.numel()) for m in groups])
    return always, [(members, quota) for members, quota in zip(groups, quotas, strict=True) if quota]
