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
    and the group list is empty). :func:`plan_all_spatial_groups` plans every sample at once.
    """
    return plan_all_spatial_groups(ctx)[b]


def plan_all_spatial_groups(ctx: ReduceContext) -> list[tuple[Tensor, list[Tensor], int]]:
    """:func:`plan_spatial_groups` for every sample of the batch, reading the device once in all.

    Tokens are sorted on the device (stably, so each group keeps its members in position order) by
    their group, and by kind (protected, grouped, newline filler); one ``.tolist()`` brings the counts
    that cut the sorted indices into per-sample pieces.
    """
    _, length = ctx.valid.shape
    device = ctx.valid.device
    inside = torch.arange(length, device=device) < ctx.valid.sum(1, keepdim=True)  # the first n of each sample
    protected = ctx.protected & inside
    newline = ctx.layout.newline & inside if ctx.layout is not None else torch.zeros_like(inside)
    candidate = inside & ~protected & ~newline
    filler = inside & ~protected & newline
    key, by_group = _group_key(ctx, candidate).sort(dim=1, stable=True)
    starts = candidate.gather(1, by_group)
    starts[:, 1:] &= key[:, 1:] != key[:, :-1]
    group = (starts.cumsum(1) - 1).clamp(min=0)
    sizes = torch.zeros_like(group).scatter_add_(1, group, candidate.gather(1, by_group).long())
    kind = torch.where(protected, 0, torch.where(candidate, 1, torch.where(filler, 2, 3)))
    by_kind = kind.sort(dim=1, stable=True).indices
    free = ctx.budget.to(device) - protected.sum(1)
    head = torch.stack([free, protected.sum(1), candidate.sum(1), filler.sum(1)], 1)
    table = torch.cat([head, sizes], 1).tolist()
    return [_sample_plan(row, by_kind[b], by_group[b]) for b, row in enumerate(table)]


def _group_key(ctx: ReduceContext, candidate: Tensor) -> Tensor:
    """``(B, N)`` long: each candidate's ``(video, image, view, frame)`` as one number, in that
    lexicographic order; the largest long for every other token (they sort last)."""
    key = torch.zeros(candidate.shape, dtype=torch.long, device=candidate.device)
    if ctx.layout is not None:
        lay = ctx.layout
        for part in (lay.video.long(), lay.image.long(), lay.view.long(), lay.frame.long()):
            low = part.min()
            key = key * (part.max() - low + 1) + (part - low)
    return key.masked_fill(~candidate, torch.iinfo(torch.long).max)


def _sample_plan(row: list[int], by_kind: Tensor, by_group: Tensor) -> tuple[Tensor, list[Tensor], int]:
    """One sample's plan from its row of counts (free, protected, candidates, fillers, group sizes)."""
    free, protected, members, fillers = row[:4]
    always = by_kind[:protected]
    if free >= members:
        grouped = by_kind[protected : protected + members]
        filled = by_kind[protected + members : protected + members + fillers][: free - members]
        return torch.cat([always, grouped, filled]), [], 0
    sizes = [size for size in row[4:] if size]
    return always, list(by_group[:members].split(sizes)) if members else [], free


def spatial_quotas(ctx: ReduceContext, b: int) -> tuple[Tensor, list[tuple[Tensor, int]]]:
    """For sample ``b``: the indices always kept, and each spatial group that must choose with its quota.

    :func:`plan_spatial_groups` followed by :func:`split_budget`, leaving out groups whose quota is 0:
    a spatial reducer keeps ``always`` plus, from each ``(members, quota)``, its ``quota`` best members.
    :func:`all_spatial_quotas` gives every sample's at once.
    """
    return all_spatial_quotas(ctx)[b]


def all_spatial_quotas(ctx: ReduceContext) -> list[tuple[Tensor, list[tuple[Tensor, int]]]]:
    """:func:`spatial_quotas` for every sample of the batch, reading the device once in all."""
    out = []
    for always, groups, free in plan_all_spatial_groups(ctx):
        quotas = split_budget(free, [int(m.numel()) for m in groups])
        out.append((always, [(members, quota) for members, quota in zip(groups, quotas, strict=True) if quota]))
    return out
