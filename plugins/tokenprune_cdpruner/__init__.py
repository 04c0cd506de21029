"""The ``cdpruner`` reducer: CDPruner, instruction-conditioned DPP selection of the visual tokens.

CDPruner (Zhang et al., 2025, https://arxiv.org/abs/2506.10967; official code
https://github.com/Theia-4869/CDPruner, ``llava/model/llava_arch.py``, ``encode_images``). Packaged
exactly as a third-party plugin: this module is the entry point ``cdpruner`` of the ``tokenprune``
group, and registers its reducer through the hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ReducerInputError, ReducerParams, Selection, TokenReducer
from tokenprune.budget import plan_all_spatial_groups, split_budget
from tokenprune.similarity import cosine_similarity, cosine_similarity_macs, unit_rows
from tokenprune.validation import check_finite_tokens

SPANNED = 1e-4
"""A token whose remaining DPP gain is at most this fraction of its own kernel entry is spanned by the
tokens chosen so far (more picks than the features' rank); spanned tokens are picked last, by relevance."""


@dataclass(frozen=True)
class Group:
    """One conditional DPP: sample ``sample`` picks ``quota`` of the token indices ``members``."""

    sample: int
    members: Tensor
    quota: int


class CDPruner(TokenReducer):
    """Keep a relevant and diverse set: greedy MAP inference of a DPP conditioned on the instruction.

    For a sample with visual tokens ``x_i`` and text tokens ``t_m`` (``ctx.text``: the embeddings of
    the prompt's own text tokens at the insertion point), in float32:

    1. relevance ``q_i = -mean_m cos(x_i, t_m)``, min-max scaled over the sample's candidate tokens as
       ``r_i = (q_i - min q + 1e-6) / (max q - min q)`` (the official code's sign and scaling);
    2. kernel ``L = diag(r) S diag(r)`` with ``S_ij = cos(x_i, x_j)``;
    3. fast greedy MAP (Chen et al. 2018, incremental Cholesky): repeatedly pick the token with the
       largest remaining gain ``d_j²``, for exactly the quota (no early stop). Ties to the lower index.

    With ``split: tile`` (default), each crop is its own DPP, as in the official code: the base view,
    and each base-view-sized tile of the high-resolution grid (LLaVA-NeXT's anyres crops, cut from
    the unpadded grid); ``view``: one DPP per ``(image, view)``; ``sample``: one per sample. The free
    budget (``budget`` minus protected tokens) is split over the DPPs in proportion to their sizes.
    Row-end newline tokens never enter a DPP (the official code keeps them all); unprotected ones
    only fill a budget larger than the grid tokens.

    The picks are sequential, each a few operations vectorised over the tokens and over all DPPs of
    the batch. Cost per DPP of ``n`` tokens and ``K`` picks: ``O(n² D)`` for ``S``, ``O(K² n)`` for the
    greedy inference, ``O(n² + K n)`` memory.
    """

    name = "cdpruner"
    capabilities = Capabilities(insertion_points=frozenset({"post_projector", "layer"}), needs_text=True)

    class Params(ReducerParams):
        split: Literal["tile", "view", "sample"] = Field(
            default="tile",
            description="One DPP per crop ('tile': the base view and each base-view-sized tile of a "
            "high-resolution grid, the official per-crop selection), per (image, view) ('view'), or per "
            "sample ('sample'); the budget is split by size.",
        )

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Select per sample; see the class docstring. ``tokens`` is ``(B, N, D)``."""
        x = tokens.detach()
        check_finite_tokens(x, ctx, self.name)
        text = self._text_direction(ctx)
        keep = torch.zeros(ctx.valid.shape, dtype=torch.bool, device=x.device)
        relevance = torch.zeros(ctx.valid.shape, dtype=torch.float32, device=x.device)
        groups: list[Group] = []
        for b, (always, sample_groups) in enumerate(self._plans(ctx)):
            keep[b, always] = True
            if any(g.quota for g in sample_groups):  # relevance is scaled over all of the sample's candidates
                members = torch.cat([g.members for g in sample_groups])
                relevance[b, members] = scaled_relevance(x[b, members], text[b])
            groups += [g for g in sample_groups if g.quota]
        if not groups:
            return Selection.from_mask(keep)
        kernel, valid, quota = padded_kernels(x, relevance, groups)
        picks = dpp_greedy_picks(kernel, valid, quota, relevance=_padded(relevance, groups))
        for g, group in enumerate(groups):
            keep[group.sample, group.members[picks[g, : group.quota]]] = True
        return Selection.from_mask(keep)

    def overhead_macs(self, tokens: Tensor, ctx: ReduceContext) -> int:
        """Relevance ``n D`` per sample, ``S`` about ``n² D / 2`` per DPP, greedy ``G n_max (K-1)(K-2) / 2``."""
        dim = int(tokens.shape[-1])
        macs, groups = 0, []
        for _, sample_groups in self._plans(ctx):
            if any(g.quota for g in sample_groups):
                macs += sum(int(g.members.numel()) for g in sample_groups) * dim  # relevance
                groups += [g for g in sample_groups if g.quota]
        if not groups:
            return 0
        sizes = [int(g.members.numel()) for g in groups]
        k = max(g.quota for g in groups)
        macs += sum(cosine_similarity_macs(n, dim) for n in sizes)
        return macs + len(groups) * max(sizes) * (k - 1) * (k - 2) // 2

    def _plans(self, ctx: ReduceContext) -> list[tuple[Tensor, list[Group]]]:
        """Each sample's always-kept tokens and its DPPs (with their quotas, possibly 0)."""
        return [self._plan(ctx, b, *plan) for b, plan in enumerate(plan_all_spatial_groups(ctx))]

    def _plan(
        self, ctx: ReduceContext, b: int, always: Tensor, groups: list[Tensor], free: int
    ) -> tuple[Tensor, list[Group]]:
        """Sample ``b``'s always-kept tokens and its DPPs (with their quotas, possibly 0), from its spatial plan."""
        if self.params.split == "sample" and len(groups) > 1:
            groups = [torch.cat(groups).sort().values]
        elif self.params.split == "tile" and ctx.layout is not None:
            groups = [tile for members in groups for tile in crop_tiles(members, ctx, b)]
        quotas = split_budget(free, [int(m.numel()) for m in groups])
        return always, [Group(b, m, q) for m, q in zip(groups, quotas, strict=True)]

    def _text_direction(self, ctx: ReduceContext) -> Tensor:
        """``(B, D)`` mean of each sample's unit-norm text tokens (zero for a sample without text)."""
        if ctx.text is None:
            raise ReducerInputError(
                f"reducer {self.name!r} needs the text tokens (ctx.text) to rank the visual tokens by relevance; "
                "the engine provides them because the reducer declares needs_text"
            )
        text = ctx.text.detach()
        if ctx.text_valid is None:
            text_valid = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        else:
            text_valid = ctx.text_valid.to(text.device)
        finite = torch.isfinite(text).all(-1) | ~text_valid
        if not bool(finite.all()):
            sample, token = (int(v) for v in (~finite).nonzero()[0])
            raise ReducerInputError(f"reducer {self.name!r}: text token {token} of sample {sample} is NaN or infinite")
        b, t, d = text.shape
        unit = unit_rows(text.reshape(b * t, d)).reshape(b, t, d) * text_valid.unsqueeze(-1)
        return unit.sum(1) / text_valid.sum(1, keepdim=True).clamp(min=1)


def crop_tiles(members: Tensor, ctx: ReduceContext, b: int) -> list[Tensor]:
    """``members`` (one ``(image, view)`` group of sample ``b``) cut into crops of the base view's size.

    The base view (view 0), and any image without one (Qwen2-VL), is one crop. A high-resolution
    grid is cut into the anyres crops the official code selects from (e.g. 24x24 tokens for LLaVA-NeXT
    at 336 px): by the layout's ``crop`` where the adapter gives it (located on the padded grid, so a
    crop keeps its place when unpadding removed rows or columns at the top or left; an edge crop may
    be partly cut away), else at multiples of the base-view grid counted from the unpadded grid's corner.
    """
    layout = ctx.layout
    if layout is None:
        return [members]
    crop, order = layout.crop[b, members].sort(stable=True)  # by crop, in position order within one
    first = torch.cat([crop.new_ones(1), crop[1:] != crop[:-1]]).cumsum(0) - 1
    sizes = torch.zeros_like(crop).scatter_add_(0, first, torch.ones_like(crop))
    flags = torch.cat([layout.view[b, members[:1]] == 0, crop[:1] >= 0]).to(sizes.dtype)  # [:1]: no read
    read = torch.cat([flags, sizes]).tolist()  # the one host read of a crop layout
    if read[0]:
        return [members]
    if read[1]:
        return list(members[order].split([size for size in read[2:] if size]))
    n = int(ctx.valid[b].sum())
    image = layout.image[b, :n]
    base = (image == layout.image[b, members[0]]) & (layout.view[b, :n] == 0) & ~layout.newline[b, :n]
    if not bool(base.any()):
        return [members]
    tile_rows = int(layout.row[b, :n][base].max()) + 1
    tile_cols = int(layout.col[b, :n][base].max()) + 1
    row, col = layout.row[b, members] // tile_rows, layout.col[b, members] // tile_cols
    _, inverse = torch.unique(row * (int(col.max()) + 1) + col, return_inverse=True)
    return [members[inverse == t] for t in range(int(inverse.max()) + 1)]


def scaled_relevance(x: Tensor, text: Tensor) -> Tensor:
    """CDPruner's relevance of ``n`` tokens ``x`` (``(n, D)``) to a text direction ``text`` (``(D,)``).

    ``text`` is the mean of the unit text vectors, so ``x̂ · text`` is the mean cosine to the text
    tokens. Returns ``(n,)`` float32 ``(q - min q + 1e-6) / (max q - min q)`` with ``q = -x̂ · text``;
    all ones where ``q`` is constant up to ``1e-6`` (the official code divides by zero, or ranks by rounding
    noise, there).
    """
    q = -(unit_rows(x) @ text.float().unsqueeze(-1)).squeeze(-1)
    spread = q.max() - q.min()
    if float(spread) <= 1e-6:
        return torch.ones_like(q)
    return (q - q.min() + 1e-6) / spread


def padded_kernels(x: Tensor, relevance: Tensor, groups: list[Group]) -> tuple[Tensor, Tensor, Tensor]:
    """``(G, n, n)`` kernels ``diag(r) S diag(r)`` of the groups (zero-padded), ``(G, n)`` validity, ``(G,)`` quotas."""
    n = max(int(g.members.numel()) for g in groups)
    kernel = torch.zeros(len(groups), n, n, dtype=torch.float32, device=x.device)
    valid = torch.zeros(len(groups), n, dtype=torch.bool, device=x.device)
    for i, g in enumerate(groups):
        m = int(g.members.numel())
        r = relevance[g.sample, g.members]
        kernel[i, :m, :m] = cosine_similarity(x[g.sample, g.members]).mul_(r.unsqueeze(0)).mul_(r.unsqueeze(1))
        valid[i, :m] = True
    quota = torch.tensor([g.quota for g in groups], dtype=torch.long, device=x.device)
    return kernel, valid, quota


def _padded(values: Tensor, groups: list[Group]) -> Tensor:
    """``(G, n)``: ``values[g.sample, g.members]`` per group, zero-padded."""
    n = max(int(g.members.numel()) for g in groups)
    out = torch.zeros(len(groups), n, dtype=values.dtype, device=values.device)
    for i, g in enumerate(groups):
        out[i, : g.members.numel()] = values[g.sample, g.members]
    return out


def dpp_greedy_picks(kernel: Tensor, valid: Tensor, quota: Tensor, *, relevance: Tensor | None = None) -> Tensor:
    """Fast greedy MAP inference of DPPs (Chen et al. 2018), vectorised over the batch of kernels.

    Args:
        kernel: ``(G, n, n)`` positive semi-definite kernels (zero at padding).
        valid: ``(G, n)`` bool, the entries that may be picked.
        quota: ``(G,)`` long picks per kernel (at most its valid entries); exactly that many are made.
        relevance: ``(G, n)`` order of the entries picked once every remaining gain is spanned (see
            :data:`SPANNED`); default: index order.

    Returns:
        ``(G, K)`` long, ``K = quota.max()``: the picks in order, ``-1`` after ``quota[g]``. Each pick
        maximises the remaining gain ``d_j² = L_jj - ||c_j||²``; ties go to the lower index.
    """
    g, n = valid.shape
    k = int(quota.max()) if g else 0
    picks = torch.full((g, k), -1, dtype=torch.long, device=kernel.device)
    rows = torch.arange(g, device=kernel.device)
    diag = kernel.diagonal(dim1=1, dim2=2)
    floor = diag * SPANNED
    gain = diag.masked_fill(~valid, float("-inf"))  # d_j², the remaining gain of every entry
    fallback = (torch.zeros_like(gain) if relevance is None else relevance.float()) - 2.0  # below every real gain
    fallback = fallback.masked_fill(~valid, float("-inf"))
    cis = torch.zeros(g, max(k - 1, 0), n, dtype=torch.float32, device=kernel.device)
    for i in range(k):
        j = torch.where(gain > floor, gain, fallback).argmax(1)
        picks[:, i] = j
        if i + 1 == k:
            break
        dj = gain[rows, j]
        e = kernel[rows, j]
        if i:
            e = e - torch.bmm(cis[rows, :i, j].unsqueeze(1), cis[:, :i]).squeeze(1)
        e = e / dj.clamp(min=torch.finfo(torch.float32).tiny).sqrt().unsqueeze(1)
        e = e.masked_fill(~(dj > floor[rows, j]).unsqueeze(1), 0.0)  # a spanned pick changes no gain
        cis[:, i] = e
        gain = gain - e * e
        gain[rows, j] = float("-inf")
        fallback[rows, j] = float("-inf")
    return picks.masked_fill(torch.arange(k, device=picks.device) >= quota.unsqueeze(1), -1)


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(CDPruner)
