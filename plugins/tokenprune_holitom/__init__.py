"""HoliTom: holistic token merging for video LLMs, its two stages as the ``holitom`` and ``holitom_merge`` reducers.

HoliTom (Shao et al., *HoliTom: Holistic Token Merging for Fast Video Large Language Models*, NeurIPS 2025,
https://arxiv.org/abs/2505.21334; official code https://github.com/cokeshao/HoliTom) reduces a video twice:

* outside the LLM (``holitom``, ``at: post_projector``, video tokens): a dynamic program splits the frames into
  segments that maximise the temporally static tokens; a segment's static tokens become their frames' mean,
  clustered by density (DPC-KNN), and each frame's dynamic tokens keep the top by the vision tower's attention
  (:mod:`tokenprune_holitom.algorithm`);
* inside the LLM (``holitom_merge``, ``at: {layer: K}``): the visual tokens the last token attends to most at
  layer ``K - 1`` stay, each other one is averaged into its most similar kept token.

The preset ``holitom-15`` composes both, as the official README's LLaVA-OneVision command. Packaged as a
third-party plugin: this module is the entry point ``holitom`` of the ``tokenprune`` group.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, Merge, ReduceContext, TokenReducer
from tokenprune.layout import TokenLayout
from tokenprune.reducer import ReducerParams, Requirements, VisionAttentionRequest, top_k_selection
from tokenprune.validation import required_attention
from tokenprune.video_reducer import VideoMergeReducer
from tokenprune_holitom.algorithm import HoliTomParams, video_merge

PAPER = "HoliTom (Shao et al., NeurIPS 2025), https://arxiv.org/abs/2505.21334"


class HoliTom(VideoMergeReducer):
    """HoliTom's pre-LLM stage: temporal segments, static tokens merged over time and space, dynamic ones by attention.

    Per sample and video, with ``F`` frames of ``T`` tokens (the layout's ``frame``), features ``x`` (float32) and
    the vision tower's attention received by each token (``mean``: over heads and patch queries, at the features
    layer; mapped through the model's pooling as its tokens are) and ``r = keep``:

    1. ``s_f``: each token's cosine similarity to its place in the next frame; the dynamic program of
       :func:`~tokenprune_holitom.algorithm.static_windows` cuts the frames into segments (``tau``, ``max_window``)
       saving ``S`` tokens; ``r' = min(1, r F T / (F T - S))``;
    2. in a segment of ``w > 1`` frames, the places whose similarity exceeds ``tau`` throughout are static: their
       ``w`` tokens' mean, then DPC-KNN (``k``) picks ``round(n_static r')`` centers, each center's token
       ``beta * center + (1 - beta) * mean(members)``, placed at the center's place in the segment's first frame;
    3. each frame's other (dynamic) tokens: ``ceil(n r') (1 - contextual)`` (rounded) of highest attention stay,
       the rest of ``ceil(n r')`` are DPC-KNN centers of the remaining tokens, merged as in 2.

    A :class:`~tokenprune.Merge` with its own weights, so every merged token is the official combination. Image
    tokens, newlines and protected tokens are kept. The count depends on the video (``deterministic_count`` is
    false); the budget is the valid tokens, an upper bound.
    """

    name = "holitom"
    why_equal_frames = "HoliTom compares every token with its place in the next frame"

    class Params(HoliTomParams):
        layer: int | None = Field(
            default=None, description="Vision-tower layer of the attention; null: the features layer (official)."
        )

    @classmethod
    def requirements(cls, params: ReducerParams) -> Requirements:
        """The tower's ``mean`` attention at ``params.layer`` (the official reads the features layer's)."""
        return Requirements(vision_attention=VisionAttentionRequest("mean", params.layer))  # type: ignore[attr-defined]

    def stage_budget(self, keep: float | int, valid: Tensor, protected: Tensor, layout: TokenLayout | None) -> Tensor:
        """Every valid token: an upper bound (the count depends on the video's content)."""
        return valid.sum(1)

    def merge_video(self, x: Tensor, attention: Tensor, retain: float) -> tuple[Tensor, Tensor]:
        """Segments, static and dynamic tokens of one video (:func:`~tokenprune_holitom.algorithm.video_merge`);
        ``retain`` is the official ``RETAIN_RATIO``."""
        return video_merge(x, attention, retain, self.params)  # type: ignore[arg-type]


class HoliTomMerge(TokenReducer):
    """HoliTom's in-LLM merge at ``{layer: K}`` (the official ``HOLITOM_k``; its README uses 18).

    The visual tokens are ranked by the attention the last token pays them at layer ``K - 1`` (averaged over heads);
    the top ``round(n keep)`` stay (``keep = 1 - HOLITOM_r``, the official ``round(n (1 - r))``). Each other token
    goes, in index order, into its most cosine-similar kept token as the official loop does, ``t <- (t + x) / 2``:
    a kept token with members ``x_1 .. x_m`` becomes ``2^-m t + sum_j 2^-(m - j + 1) x_j``, a :class:`Merge` with
    those weights. Positions stay the kept tokens' own (the official ``position_ids = keep_indexs``).
    """

    name = "holitom_merge"
    capabilities = Capabilities(insertion_points=frozenset({"layer"}), attention=frozenset({"last"}), merges=True)

    def stage_budget(self, keep: float | int, valid: Tensor, protected: Tensor, layout: TokenLayout | None) -> Tensor:
        """``round(n keep)`` of each sample's ``n`` tokens (Python's rounding, as the official), at least the
        protected ones; a count ``keep`` as given."""
        if isinstance(keep, int):
            return super().stage_budget(keep, valid, protected, layout)
        wanted = [min(int(n), max(1, round(int(n) * (1 - round(1.0 - keep, 12))))) for n in valid.sum(1).tolist()]
        return torch.maximum(torch.tensor(wanted, dtype=torch.long, device=valid.device), (protected & valid).sum(1))

    def overhead_macs(self, tokens: Tensor, ctx: ReduceContext) -> int:
        """The cosine-similarity products, ``B N^2 D``."""
        b, n, d = tokens.shape
        return b * n * n * d

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Merge:
        hint = "holitom_merge runs at a layer stage through tokenprune.apply, which computes layer K - 1's attention"
        attention = required_attention(ctx, "last", self.name, hint)
        kept = top_k_selection(attention.masked_fill(~ctx.valid, float("-inf")), ctx, reducer_name=self.name)
        roots = kept.to_mask(tokens.shape[1]) & ctx.valid
        return Merge(*halving_merge(tokens, roots, ctx.valid, ctx.protected))


def halving_merge(tokens: Tensor, roots: Tensor, valid: Tensor, protected: Tensor) -> tuple[Tensor, str, Tensor]:
    """The official in-place loop ``t <- (t + x) / 2`` over the non-kept tokens ``x`` in index order, as
    ``(destination, "mean", weights)`` for :class:`Merge` (``(B, N)`` each).

    Each non-kept valid token's destination is the kept, unprotected token of highest cosine similarity (dropped
    where there is none); in a group of ``m`` members the root weighs ``2^-m`` and the ``j``-th member (index
    order) ``2^-(m - j + 1)``.
    """
    b, n, _ = tokens.shape
    x = tokens.float()
    normed = x / x.norm(dim=-1, keepdim=True)
    targets = roots & ~protected
    similarity = (normed @ normed.transpose(1, 2)).masked_fill(~targets[:, None, :], float("-inf"))
    own = torch.arange(n, device=tokens.device).expand(b, n)
    member = valid & ~roots & targets.any(1, keepdim=True)
    dest = torch.where(member, similarity.argmax(-1), own)
    key = torch.where(member, dest, torch.full_like(dest, n))  # members grouped by root, index order within
    order = key.argsort(dim=1, stable=True)
    ordered = key.gather(1, order)
    starts = torch.ones_like(member)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = torch.where(starts, own, torch.zeros_like(own)).cummax(1).values
    rank = torch.empty_like(own).scatter_(1, order, own - first + 1).float()  # j: the member's place in its group
    count = torch.zeros(b, n + 1, device=tokens.device).scatter_add_(1, key, member.float())[:, :n]
    count = count.gather(1, dest)  # m of the token's group
    weights = torch.where(member, torch.pow(2.0, -(count - rank + 1)), torch.pow(2.0, -count))
    return dest.masked_fill(valid & ~roots & ~member, -1), "mean", weights


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(HoliTom, HoliTomMerge)


@tokenprune.hookimpl
def tokenprune_register_pipelines(registry: tokenprune.plugins.PipelineRegistry) -> None:
    registry.add(
        "holitom-15",
        {
            "stages": [
                {"at": "post_projector", "tokens": "video", "reducer": "holitom", "keep": 0.15},
                {"at": {"layer": 18}, "tokens": "video", "reducer": "holitom_merge", "keep": 0.5},
            ]
        },
        paper=PAPER,
        table=(
            "the official README's LLaVA-OneVision-7B command (RETAIN_RATIO=0.15 T=0.80 HOLITOM_k=18 HOLITOM_r=0.5): "
            "15% of the video tokens before the LLM, half of those merged at layer 18"
        ),
        description="HoliTom: temporal segments and spatial merges before the LLM (15%), then half merged at layer 18",
    )
