"""The ``sparsevlm`` reducer: one stage of SparseVLM, text-guided pruning with token recycling.

SparseVLM (Zhang et al., ICML 2025, https://arxiv.org/abs/2410.04417; official code
https://github.com/Gumpest/SparseVLMs, v1 at commit 91fb6d9). The paper's schedule is a pipeline of
several ``sparsevlm`` stages (the official layers 2, 6, 15 and 19, i.e. ``{layer: 3}``, ``7``, ``16``
and ``20``). Packaged exactly as a third-party plugin: this module is the entry point ``sparsevlm`` of
the ``tokenprune`` group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, Merge, ReduceContext, ReducerParams, TokenReducer
from tokenprune.errors import ReducerInputError
from tokenprune.reducer import InputEmbeddings

_EPS32 = float(torch.finfo(torch.float32).eps)


def choose_raters(embeds: InputEmbeddings, text_valid: Tensor) -> Tensor:
    """SparseVLM's text raters, chosen on the language model's input embeddings.

    The candidates are the text tokens after the sample's last visual token (all its text tokens if
    none follow the image). ``P = softmax_t(V Tᵀ)`` over the candidates, averaged over the visual
    tokens; candidates scoring above the candidates' mean are raters (all candidates if none is).

    Args:
        embeds: ``visual`` ``(B, N0, D)``, ``text`` ``(B, T, D)`` and their columns.
        text_valid: ``(B, T)`` bool, the real text rows.

    Returns:
        ``(B, T)`` bool.
    """
    last_visual = embeds.visual_columns.masked_fill(~embeds.visual_valid, -1).max(1, keepdim=True).values
    after = text_valid & (embeds.text_columns > last_visual)
    candidates = torch.where(after.any(1, keepdim=True), after, text_valid)
    logits = embeds.visual.float() @ embeds.text.float().transpose(1, 2)  # (B, N0, T)
    probs = logits.masked_fill(~candidates[:, None, :], float("-inf")).softmax(-1)
    vis = embeds.visual_valid.float()
    relevance = (probs.nan_to_num(0.0) * vis[..., None]).sum(1) / vis.sum(1, keepdim=True).clamp(min=1.0)
    mean = (relevance * candidates).sum(1, keepdim=True) / candidates.sum(1, keepdim=True).clamp(min=1)
    raters = candidates & (relevance > mean)
    return torch.where(raters.any(1, keepdim=True), raters, candidates)


def attention_rank(relation: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``torch.linalg.matrix_rank`` of each sample's raters x visual matrix, independent of the padding.

    ``relation`` is ``(B, T, N)`` with zeros outside each sample's ``rows x cols`` block (``(B,)``
    long each). Zero rows and columns leave the singular values unchanged, but ``matrix_rank``'s
    default tolerance (``eps · max(rows, cols) · s_max``) depends on the shape, so it is applied per
    sample.
    """
    sv = torch.linalg.svdvals(relation.float())  # (B, min(T, N))
    tol = sv.max(-1).values * _EPS32 * torch.maximum(rows, cols).float()
    return (sv > tol[:, None]).sum(-1)


def recycle_sizes(dropped: Tensor, ratio: float, per_cluster: int) -> tuple[Tensor, Tensor]:
    """Official recycling sizes for ``dropped`` tokens (long, any shape; 0: nothing to recycle).

    Returns ``(selected, clusters)``: ``int(m · ratio) + 1`` of the dropped tokens are clustered into
    ``selected // per_cluster + 1`` tokens (``0`` and ``0`` where ``m = 0``).
    """
    selected = torch.minimum((dropped.double() * ratio).floor().long() + 1, dropped)
    clusters = torch.minimum(selected // per_cluster + 1, selected)
    return selected.masked_fill(dropped <= 0, 0), clusters.masked_fill(dropped <= 0, 0)


@dataclass
class _Plan:
    """Per sample: how many visual tokens stay, and how many dropped ones are recycled into how many."""

    kept: Tensor
    selected: Tensor
    clusters: Tensor


def dpc_knn(x: Tensor, valid: Tensor, clusters: Tensor) -> tuple[Tensor, Tensor]:
    """DPC-KNN clustering as in the official ``cluster_and_merge``, batched over padded samples.

    Density: ``exp(-mean d²)`` over each token's ``c`` nearest tokens (itself included), distances
    divided by ``sqrt(D)``; a token's parent distance is to its nearest denser token (the sample's
    largest distance for the densest); the ``c`` tokens with the highest ``density · distance`` are
    the centers (in that order), every other token joins its nearest center (ties: earlier center).
    Equal densities are broken by the token order (earlier counts as denser), where the official code
    adds ``1e-6`` random noise.

    Args:
        x: ``(B, M, D)`` tokens to cluster.
        valid: ``(B, M)`` bool, each sample's first ``m_b`` rows.
        clusters: ``(B,)`` long, ``c_b <= m_b`` (``0`` for a sample with nothing to cluster).

    Returns:
        ``(assign, centers)``: ``(B, M)`` long, each token's center as an index into ``M`` (``-1`` at
        padding); ``(B, C)`` long, the centers (``-1`` past ``c_b``).
    """
    b, m, d = x.shape
    x = x.float().masked_fill(~valid[..., None], 0.0)
    sq = (x * x).sum(-1)
    dist = (sq[:, :, None] + sq[:, None, :] - 2.0 * (x @ x.transpose(1, 2))).clamp(min=0.0)
    dist = dist.diagonal_scatter(torch.zeros(b, m, device=x.device), dim1=1, dim2=2).sqrt() / d**0.5
    pair = valid[:, :, None] & valid[:, None, :]
    c_max = max(int(clusters.max()), 1) if b else 1
    near = dist.masked_fill(~pair, float("inf")).topk(min(c_max, m), dim=-1, largest=False).values
    k = clusters.clamp(min=1)[:, None, None].expand(b, m, 1)
    mean_sq = (near**2).nan_to_num(posinf=0.0).cumsum(-1).gather(2, k - 1).squeeze(-1) / k[..., 0]
    density = torch.exp(-mean_sq)
    index = torch.arange(m, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (index[None, None, :] < index[None, :, None])
    )
    dist_max = dist.masked_fill(~pair, 0.0).flatten(1).max(1).values[:, None, None]
    parent = torch.where(denser & pair, dist, dist_max).min(-1).values
    score = (parent * density).masked_fill(~valid, float("-inf"))
    order = score.argsort(dim=1, descending=True, stable=True)[:, :c_max]
    real_center = torch.arange(order.shape[1], device=x.device)[None, :] < clusters[:, None]
    centers = order.masked_fill(~real_center, -1)
    to_center = dist.gather(1, order[..., None].expand(-1, -1, m)).masked_fill(~real_center[..., None], float("inf"))
    assign = order.gather(1, to_center.argmin(1))
    assign = torch.where(real_center.any(1, keepdim=True), assign, -1).masked_fill(~valid, -1)
    return _centers_to_self(assign, centers), centers


def _centers_to_self(assign: Tensor, centers: Tensor) -> Tensor:
    """``assign`` with every real center mapped to itself."""
    b, m = assign.shape
    real = centers >= 0
    slot = torch.where(real, centers, m)
    padded = torch.cat([assign, assign.new_full((b, 1), -1)], 1)
    return padded.scatter(1, slot, torch.where(real, centers, -1))[:, :m]


class SparseVLM(TokenReducer):
    """Text-guided pruning with recycling: one SparseVLM stage (v1, rank-adaptive counts).

    Runs at ``{layer: k}`` only (the official "layer ``k - 1``", whose own attention it reads and
    whose output it prunes). Raters: the text tokens after the image most relevant to it, chosen on
    the language model's input embeddings (:func:`choose_raters`). Each visual token's score is the
    attention the raters pay to it at layer ``k - 1`` (heads averaged, raters averaged). The stage
    keeps ``min(int(rank · scale + bias), n - 1)`` tokens, ``rank`` that of the raters x visual
    attention matrix (all ``n`` if it has full rank), capped by the stage's budget. The top
    ``recycle_ratio`` (+1) of the dropped tokens by score are clustered (:func:`dpc_knn`) into one
    token per ``tokens_per_cluster`` (+1): each cluster merges into its center (a :class:`Merge`),
    so the center carries the cluster's mean; the other dropped tokens are dropped.

    Cost: ``O(N0 T D)`` for the raters, an SVD of the ``T x N`` attention, ``O(M² D)`` for the
    clustering of ``M`` recycled tokens; the engine adds layer ``k - 1``'s attention for the ``T``
    text rows (``O(H T L hd)``).
    """

    name = "sparsevlm"
    capabilities = Capabilities(
        insertion_points=frozenset({"layer"}),
        signals=frozenset({"text_attention", "input_embeddings"}),
        needs_text=True,
        deterministic_count=False,
        merges=True,
    )

    class Params(ReducerParams):
        scale: float = Field(
            default=13.5,
            description="Kept tokens per unit of attention rank, int(rank * scale + bias) (official default 13.5).",
        )
        bias: float = Field(default=0.0, description="Added to rank * scale before truncation (official default 0).")
        counts: Literal["rank", "budget"] = Field(
            default="rank",
            description=(
                "'rank': the rank-adaptive count of v1, capped by the stage's budget; 'budget': exactly the "
                "stage's budget (kept plus recycled tokens), the fixed per-layer counts of the current code."
            ),
        )
        recycle: bool = Field(default=True, description="Recycle dropped tokens into merged ones (the official v1).")
        recycle_ratio: float = Field(
            default=0.3, gt=0.0, le=1.0, description="Fraction of the dropped tokens recycled, int(m * ratio) + 1."
        )
        tokens_per_cluster: int = Field(
            default=10, ge=1, description="Recycled tokens per merged token: selected // this + 1 clusters."
        )

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Merge:
        """A :class:`Merge`: kept tokens map to themselves, recycled ones to their cluster's center, the rest ``-1``."""
        scores, rank = self._scores(ctx)
        plan = self._plan(rank, ctx)
        n = ctx.valid.shape[1]
        index = torch.arange(n, device=tokens.device).expand_as(ctx.valid)
        ranked = scores.masked_fill(~ctx.valid, float("-inf")).masked_fill(ctx.protected & ctx.valid, float("inf"))
        order = ranked.argsort(dim=1, descending=True, stable=True)
        position = torch.empty_like(order).scatter_(1, order, index)  # each token's rank
        kept = (position < plan.kept[:, None]) & ctx.valid
        destination = torch.where(kept, index, -1)
        recycled = (position >= plan.kept[:, None]) & (position < (plan.kept + plan.selected)[:, None]) & ctx.valid
        if bool(recycled.any()):
            destination = self._recycle(tokens, ctx, order, plan, destination)
        self._macs = (id(tokens), id(ctx), self._count_macs(tokens, ctx, plan))
        return Merge(destination=destination)

    def _scores(self, ctx: ReduceContext) -> tuple[Tensor, Tensor]:
        """``(B, N)`` the raters' mean attention to each visual token, and ``(B,)`` the rank of their matrix."""
        hint = "SparseVLM runs at a layer stage through tokenprune.apply, which fills these signals"
        if ctx.text_attention is None or ctx.input_embeddings is None or ctx.text_valid is None:
            raise ReducerInputError(f"reducer {self.name!r} needs ctx.text_attention and ctx.input_embeddings; {hint}")
        attention = ctx.text_attention.float()
        if not bool(torch.isfinite(attention).all()):
            raise ReducerInputError(f"reducer {self.name!r}: the text tokens' attention has NaN or infinite values")
        raters = choose_raters(ctx.input_embeddings, ctx.text_valid)
        relation = attention * (raters[..., None] & ctx.valid[:, None, :])
        scores = relation.sum(1) / raters.sum(1, keepdim=True).clamp(min=1)
        return scores, attention_rank(relation, raters.sum(1), ctx.num_valid)

    def _plan(self, rank: Tensor, ctx: ReduceContext) -> _Plan:
        """Kept, recycled and merged counts per sample (vectorised over the candidate kept counts)."""
        n, budget = ctx.num_valid, ctx.budget
        protected = (ctx.protected & ctx.valid).sum(1)
        if self.params.counts == "rank":
            wanted = (rank.double() * self.params.scale + self.params.bias).trunc().long()
            wanted = torch.where(rank >= n, n, torch.minimum(wanted, n - 1))
        else:
            wanted = budget
        j = torch.arange(int(ctx.valid.shape[1]) + 1, device=n.device).expand(n.shape[0], -1)  # candidate kept counts
        selected, clusters = recycle_sizes(n[:, None] - j, self.params.recycle_ratio, self.params.tokens_per_cluster)
        if not self.params.recycle:
            selected, clusters = torch.zeros_like(selected), torch.zeros_like(clusters)
        ok = (j <= wanted[:, None]) & (j >= protected[:, None]) & (j + clusters <= budget[:, None]) & (j <= n[:, None])
        best = torch.where(ok, j, -1).max(1).values
        fallback = torch.maximum(torch.minimum(wanted, budget), protected)
        kept = torch.where(best >= 0, best, fallback)
        pick = kept.clamp(max=j.shape[1] - 1)[:, None]
        feasible = (best >= 0)[:, None]
        selected = torch.where(feasible, selected.gather(1, pick), 0).squeeze(1)
        clusters = torch.where(feasible, clusters.gather(1, pick), 0).squeeze(1)
        return _Plan(kept=kept, selected=selected, clusters=clusters)

    def _recycle(self, tokens: Tensor, ctx: ReduceContext, order: Tensor, plan: _Plan, destination: Tensor) -> Tensor:
        """``destination`` with the recycled tokens (ranks ``kept .. kept + selected - 1``) mapped to their centers."""
        b = tokens.shape[0]
        width = int(plan.selected.max())
        slot = torch.arange(width, device=tokens.device)[None, :]
        real = slot < plan.selected[:, None]
        source = order.gather(1, (plan.kept[:, None] + slot).clamp(max=order.shape[1] - 1))  # (B, M) token indices
        x = tokens.gather(1, source[..., None].expand(-1, -1, tokens.shape[-1]))
        bad = ~torch.isfinite(x).all(-1) & real  # only the recycled tokens' features are read
        if bool(bad.any()):
            sample, slot = (int(v) for v in bad.nonzero()[0])
            raise ReducerInputError(
                f"reducer {self.name!r}: token {int(source[sample, slot])} of sample {sample}, chosen for recycling, "
                "has NaN or infinite features; check the hidden states entering the stage"
            )
        assign, _ = dpc_knn(x, real, plan.clusters)
        target = torch.where(assign >= 0, source.gather(1, assign.clamp(min=0)), -1)
        cols = torch.where(real, source, destination.shape[1])
        padded = torch.cat([destination, destination.new_full((b, 1), -1)], 1)
        return padded.scatter(1, cols, torch.where(real, target, -1))[:, :-1]

    def _count_macs(self, tokens: Tensor, ctx: ReduceContext, plan: _Plan) -> int:
        """The matrix products of :meth:`reduce`: the raters' ``V Tᵀ`` and the clustering's ``X Xᵀ``."""
        embeds = ctx.input_embeddings
        macs = 0
        if embeds is not None:
            b, n0, d = embeds.visual.shape
            macs += b * n0 * int(embeds.text.shape[1]) * d
        width = int(plan.selected.max()) if plan.selected.numel() else 0
        if width > 0:
            macs += tokens.shape[0] * width * width * int(tokens.shape[-1])
        return int(macs)

    def overhead_macs(self, tokens: Tensor, ctx: ReduceContext) -> int:
        """Multiply-accumulates of the last :meth:`reduce` on these inputs (recomputed if it ran on others)."""
        last = getattr(self, "_macs", None)
        if last is not None and last[0] == id(tokens) and last[1] == id(ctx):
            return int(last[2])
        _, rank = self._scores(ctx)
        return self._count_macs(tokens, ctx, self._plan(rank, ctx))


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(SparseVLM)


FIXED_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
"""The official per-layer counts (``sparse_token_dict``) at the official layers 2, 6 and 15."""


@tokenprune.hookimpl
def tokenprune_register_pipelines(registry: tokenprune.plugins.PipelineRegistry) -> None:
    for tokens, counts in FIXED_COUNTS.items():
        stages = [
            {"at": {"layer": layer + 1}, "reducer": "sparsevlm", "keep": count, "params": {"counts": "budget"}}
            for layer, count in zip((2, 6, 15), counts, strict=True)
        ]
        registry.add(
            f"sparsevlm-{tokens}",
            {"positions": "compact", "protect_newlines": False, "stages": stages},
            paper="SparseVLM (Zhang et al., ICML 2025), https://arxiv.org/abs/2410.04417",
            table=f"Table 1, LLaVA-1.5-7B at {tokens} tokens (the official code's per-layer counts "
            f"{'/'.join(map(str, counts))} at its layers 2/6/15)",
            description=f"SparseVLM, {tokens} visual tokens on average over a 32-layer LLM, with recycling",
        )
