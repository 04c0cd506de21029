"""The ``visionzip`` reducer: dominant tokens by [CLS] attention, the rest merged into a few contextual tokens.

VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025,
https://arxiv.org/abs/2412.04467; official code github.com/dvlab-research/VisionZip, ``visionzip/clip_encoder.py``
``CLIPVisionTower_VisionZip.forward``, ``visionzip/utils.py`` ``CLIPAttention_forward``, ``visionzip/main.py``):
at the vision layer the features come from, the [CLS] attention summed over heads picks the *dominant* tokens; the
remaining tokens, in index order, supply ``contextual`` *target* tokens at a fixed stride; every other remaining
token joins the target whose head-averaged key is most similar (cosine), and each target becomes one
*contextual* token. ``visionzip(model, dominant=54, contextual=10)`` gives LLaVA-1.5 its 64 tokens.

The reducer returns a :class:`~tokenprune.Merge`: the dominant tokens and the targets are its roots, each remaining
token's destination is its target. In its official place, ``at: pre_projector``, it runs on the tower's features
of every image or crop, and each contextual token is the official ``target + mean(assigned)``
(``combine: official``), which the model's own projector then projects. At ``post_projector`` it merges the
projected tokens into the mean of each group (``combine: mean``). The remaining departures ([CLS] token, order)
are listed on the docs page, ``docs/reducers/visionzip.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, Merge, ReduceContext, TokenReducer
from tokenprune.reducer import Share, VisionAttentionParams, VisionAttentionRequest
from tokenprune.similarity import unit_rows
from tokenprune.validation import attention_and_metric

PAPER = "VisionZip (Yang et al., CVPR 2025), https://arxiv.org/abs/2412.04467"

CONTEXTUAL_RATIO = 10 / 64
"""The paper's share of contextual tokens: 10 of 64, 20 of 128, 30 of 192 (LLaVA-1.5), exactly ``5/32``."""

PRESETS = {192: (162, 30), 128: (108, 20), 64: (54, 10)}
"""LLaVA-1.5 budgets of the paper's Table 1 and their (dominant, contextual) split."""


class VisionZip(TokenReducer):
    """Keep the dominant tokens by vision-encoder attention; merge the rest into evenly spaced contextual tokens.

    Per sample, over its valid unprotected tokens (protected ones are kept, never merged, and count in the
    budget), with ``T`` the free budget and ``n`` the candidates; if ``T >= n`` every token is kept. Else:

    1. ``C = floor(T * contextual_ratio + 0.5)`` contextual and ``D = T - C`` dominant tokens;
    2. dominant: the ``D`` tokens with the highest ``ctx.vision_attention`` (ties to the lower index; tokens
       built from no patch rank last);
    3. the ``R = n - D`` remaining tokens, in index order: with ``step = max(1, R // C)``, the tokens at
       positions ``0, step, ..., (C - 1) * step`` among them are the targets;
    4. every other remaining token is merged into the target with the highest cosine similarity of the
       metric (``ctx.vision_keys``, the layer's keys averaged over heads, as the official code; or the
       post-projector tokens with ``similarity: projected``); ties go to the earlier target;
    5. ``C = 0`` (a budget too small for a contextual token, or ``contextual_ratio: 0``): the remaining
       tokens are dropped.

    The result is a :class:`~tokenprune.Merge`: the ``D + C = T`` roots are the dominant tokens and the
    targets; the engine replaces each target by the mean of its group (itself and the tokens merged into it).
    """

    name = "visionzip"
    capabilities = Capabilities(
        insertion_points=frozenset({"pre_projector", "post_projector"}),
        merges=True,
        vision_attention=frozenset({"cls", "mean"}),
    )

    class Params(VisionAttentionParams):
        contextual_ratio: Share = Field(
            default=CONTEXTUAL_RATIO,
            description="Share of the budget given to contextual (merged) tokens, floor(T * ratio + 0.5); the "
            "default 10/64 = 0.15625 gives the paper's 54+10, 108+20 and 162+30 on LLaVA-1.5.",
        )
        similarity: Literal["keys", "projected"] = Field(
            default="keys",
            description="Metric the remaining tokens are assigned to targets by: the vision layer's keys "
            "averaged over heads ('keys', the official code's) or the stage's own tokens ('projected').",
        )
        combine: Literal["auto", "official", "mean"] = Field(
            default="auto",
            description="How a contextual token combines its group: 'official', the target plus the mean of the "
            "tokens assigned to it (the official code's); 'mean', the group's mean (sizes carried to later stages); "
            "'auto': 'official' at pre_projector, 'mean' at post_projector.",
        )

        def vision_request(self, **more: Any) -> VisionAttentionRequest:
            """The attention at :attr:`layer`, and the layer's keys where :attr:`similarity` is ``keys``."""
            return super().vision_request(keys=self.similarity == "keys", **more)

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Merge:
        """Dominant and contextual tokens of every sample at once; see the class docstring.

        Args:
            tokens: ``(B, N, D)`` post-projector tokens (read only with ``similarity: projected``).
            ctx: ``vision_attention`` ``(B, N)``, ``vision_keys`` ``(B, N, hd)`` (``similarity: keys``),
                budget, validity and protected tokens.

        Returns:
            A :class:`~tokenprune.Merge` with ``(B, N)`` destinations: dominant tokens, targets, protected
            tokens and padding map to themselves, merged tokens to their target, dropped ones to ``-1``.
        """
        scores, metric = self._inputs(tokens, ctx)
        plan = visionzip_plan(scores, ctx, self.params.contextual_ratio)  # type: ignore[attr-defined]
        combine = self.params.combine  # type: ignore[attr-defined]
        official = combine == "official" or (combine == "auto" and ctx.at.kind == "pre_projector")
        return Merge(visionzip_destination(plan, metric), "root_plus_mean" if official else "mean")

    def overhead_macs(self, tokens: Tensor, ctx: ReduceContext) -> int:
        """The merged-by-target cosine product: ``B · M · C · d`` (``M``, ``C``: the batch's most merged tokens
        and targets of a sample; ``d`` the metric's width); ``(R - C) · C · d`` for one sample, as the official
        ``bmm``."""
        if ctx.vision_attention is None:
            return 0
        metric = tokens if self.params.similarity == "projected" else ctx.vision_keys  # type: ignore[attr-defined]
        dim = 0 if metric is None else int(metric.shape[-1])
        plan = visionzip_plan(ctx.vision_attention, ctx, self.params.contextual_ratio)  # type: ignore[attr-defined]
        return plan.batch_size * plan.max_merged * plan.max_targets * dim

    def _inputs(self, tokens: Tensor, ctx: ReduceContext) -> tuple[Tensor, Tensor]:
        """``(B, N)`` attention and the ``(B, N, d)`` metric the remaining tokens are assigned by."""
        return attention_and_metric(tokens, ctx, self.name, self.params.similarity, "keys")  # type: ignore[attr-defined]


@dataclass(frozen=True)
class VisionZipPlan:
    """The split of every sample's tokens, before any similarity is computed (all ``(B, N)`` bool).

    Attributes:
        dominant: The dominant tokens.
        target: The contextual targets (roots of the merged groups).
        merged: Remaining tokens that join a target.
        dropped: Remaining tokens of samples with no contextual token.
    """

    dominant: Tensor
    target: Tensor
    merged: Tensor
    dropped: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.dominant.shape[0])

    @property
    def max_targets(self) -> int:
        return int(self.target.sum(1).max()) if self.batch_size else 0

    @property
    def max_merged(self) -> int:
        return int(self.merged.sum(1).max()) if self.batch_size else 0


def split_budget(quota: Tensor, contextual_ratio: float) -> tuple[Tensor, Tensor]:
    """``(dominant, contextual)`` counts of a ``(B,)`` free budget: ``C = floor(T * ratio + 0.5)``, ``D = T - C``.

    With the default ratio 10/64 (exact in binary): 64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30.
    """
    quota = quota.clamp(min=0)
    contextual = torch.floor(quota.double() * contextual_ratio + 0.5).long().clamp(max=quota)
    return quota - contextual, contextual


def visionzip_plan(scores: Tensor, ctx: ReduceContext, contextual_ratio: float) -> VisionZipPlan:
    """Which tokens are dominant, targets, merged or dropped, for the whole batch at once.

    Args:
        scores: ``(B, N)`` vision attention (``-inf`` at tokens built from no patch: ranked last).
        ctx: ``budget``, ``valid`` and ``protected``.
        contextual_ratio: See :func:`split_budget`.
    """
    b, n = ctx.valid.shape
    device = ctx.valid.device
    candidates = ctx.valid & ~ctx.protected
    count = candidates.sum(1)
    quota = ctx.budget.to(device) - (ctx.protected & ctx.valid).sum(1)
    dominant_n, contextual_n = split_budget(quota, contextual_ratio)
    keep_all = quota >= count
    dominant_n = torch.where(keep_all, count, dominant_n)
    contextual_n = torch.where(keep_all, torch.zeros_like(contextual_n), contextual_n)
    # Rank: candidates first, by descending score (stable: ties and -inf scores in index order).
    by_score = scores.detach().float().argsort(dim=1, descending=True, stable=True)
    order = by_score.gather(1, (~candidates.gather(1, by_score)).long().argsort(dim=1, stable=True))
    positions = torch.arange(n, device=device).expand(b, n)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    dominant = candidates & (rank < dominant_n[:, None])
    rest = candidates & ~dominant
    # The remaining tokens in index order; targets at a fixed stride over them (arange(0, R, step)[:C]).
    place = rest.long().cumsum(1) - 1
    step = (rest.sum(1) // contextual_n.clamp(min=1)).clamp(min=1)[:, None]
    has_context = (contextual_n > 0)[:, None]
    target = rest & has_context & (place % step == 0) & (place < contextual_n[:, None] * step)
    return VisionZipPlan(dominant, target, rest & has_context & ~target, rest & ~has_context)


def _packed(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, K)`` increasing indices of the True entries of a ``(B, N)`` mask (``K`` the most per row), and their
    ``(B, K)`` validity (False at a row's padding slots, whose index is ``N``)."""
    b, n = mask.shape
    positions = torch.arange(n, device=mask.device).expand(b, n)
    k = int(mask.sum(1).max()) if b else 0
    packed = torch.where(mask, positions, positions + n).sort(dim=1).values[:, :k]
    valid = packed < n
    return packed.masked_fill(~valid, n), valid


def visionzip_destination(plan: VisionZipPlan, metric: Tensor) -> Tensor:
    """``(B, N)`` long destinations of a plan: each merged token to its most similar target (cosine of ``metric``).

    Args:
        plan: From :func:`visionzip_plan`.
        metric: ``(B, N, d)`` features the similarity is measured on (zero rows: similarity 0 to every target,
            so they join the first target).

    The similarity is one batched product of the merged tokens' unit rows with the targets' (``B x M x C``),
    padded targets masked to ``-inf``; ``argmax`` takes the first of equal maxima, as the official code's.
    """
    b, n = plan.dominant.shape
    device = plan.dominant.device
    destination = torch.arange(n, device=device).expand(b, n).clone()
    destination[plan.dropped] = -1
    if plan.max_targets == 0 or plan.max_merged == 0:
        return destination
    targets, target_valid = _packed(plan.target)
    merged, merged_valid = _packed(plan.merged)
    padded = torch.cat([metric.detach(), metric.new_zeros(b, 1, metric.shape[-1])], 1)  # row N: padding slots

    def rows(idx: Tensor) -> Tensor:
        return unit_rows(padded.gather(1, idx[..., None].expand(-1, -1, padded.shape[-1])))

    similarity = torch.bmm(rows(merged), rows(targets).transpose(1, 2))  # (B, M, C)
    best = similarity.masked_fill(~target_valid[:, None, :], float("-inf")).argmax(-1)
    assigned = targets.gather(1, best)
    wide = torch.cat([destination, destination.new_zeros(b, 1)], 1)
    wide.scatter_(1, merged, torch.where(merged_valid, assigned, n))  # padding slots write column N
    return wide[:, :n]


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(VisionZip)


@tokenprune.hookimpl
def tokenprune_register_pipelines(registry: tokenprune.plugins.PipelineRegistry) -> None:
    for tokens, (dominant, contextual) in PRESETS.items():
        registry.add(
            f"visionzip-{tokens}",
            {"stages": [{"at": "pre_projector", "reducer": "visionzip", "keep": tokens}]},
            paper=PAPER,
            table=f"Table 1, LLaVA-1.5-7B at {tokens} tokens (the official code's dominant={dominant}, "
            f"contextual={contextual}; the default contextual_ratio 10/64 splits {tokens} the same way)",
            description=f"VisionZip before the projector, per image or crop: {dominant} dominant + {contextual} "
            "contextual tokens (target + mean of its group, as the official code)",
        )
