"""The ``prumerge`` reducer: LLaVA-PruMerge's adaptive selection by the [CLS] attention's outliers (and PruMerge+).

LLaVA-PruMerge (Shang, Cai, Xu, Lee, Yan, *LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models*, ICCV 2025, https://arxiv.org/abs/2403.15388; official code
https://github.com/42Shawn/LLaVA-PruMerge, ``llava/model/multimodal_encoder/clip_encoder.py``,
``token_prune_merge_advanced`` and ``token_prune_merge_advanced_plus``) keeps, per image, the patches whose
[CLS] attention at the vision tower's last layer is an outlier (above ``Q3 + 1.5 IQR``): the count adapts to
the image. PruMerge+ adds a spatially uniform sample of the other patches. The official code then merges,
before the projector, each kept patch with its 32 most key-similar patches (weighted by their attention) and
appends one token summing the pruned patches; tokenprune's reductions are selections or size-weighted
partitions after the projector, so this reducer performs the selection only (the departure is on its docs
page). Packaged as a third-party plugin: this module is the entry point ``prumerge`` of the ``tokenprune``
group.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import (
    Capabilities,
    ReduceContext,
    ReducerParams,
    Requirements,
    Selection,
    TokenReducer,
    VisionAttentionRequest,
)
from tokenprune.budget import split_budget
from tokenprune.errors import ReducerInputError
from tokenprune.reducer import VisionAttentionParams


class PruMerge(TokenReducer):
    """Keep each image's [CLS]-attention outliers (and, with ``plus``, a spatial sample), up to the budget.

    Per sample and spatial group (each ``(image, view)`` of the layout: LLaVA-1.5's one 24x24 grid) of ``n``
    patch tokens with scores ``a`` (``ctx.vision_attention``):

    1. ``k`` = the number of ``a`` above ``Q3 + 1.5 (Q3 - Q1)`` (linear quartiles, as ``numpy.percentile``);
       the ``int(n * (k / n))`` tokens of highest ``a`` are kept (at least one; the official code keeps none
       when no score is an outlier);
    2. ``plus``: with ``s = int(int(1 / r) / 3)`` for ``r = k / n``, also the tokens at group positions
       ``0, s, 2s, ... < n - 1`` (none when ``s`` is 0, where the official ``arange`` fails).

    The count adapts to each image (``deterministic_count`` is False); the stage's budget caps it (``keep:
    1.0`` for the official count), a group's share of the cap going to its highest ``a``. Protected tokens are
    kept; tokens built from no patch (unprotected newlines) are dropped. Ties go to the lower index.
    """

    name = "prumerge"
    capabilities = Capabilities(
        insertion_points=frozenset({"post_projector"}),
        vision_attention=frozenset({"cls", "mean"}),
        deterministic_count=False,
    )

    class Params(VisionAttentionParams):
        layer: int | None = Field(
            default=-1,
            description="Vision-encoder layer whose attention ranks the patches: the official code's layers[23], the "
            "last of CLIP ViT-L (-1); null: the layer the model takes its features from.",
        )
        plus: bool = Field(
            default=False,
            description="PruMerge+: also keep a spatially uniform sample of the other patches (the official "
            "token_prune_merge_advanced_plus).",
        )

    @classmethod
    def requirements(cls, params: ReducerParams) -> Requirements:
        p: VisionAttentionParams = params  # type: ignore[assignment]
        return Requirements(vision_attention=VisionAttentionRequest(p.attention, p.layer))

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Select per sample and group (batch-independent); ``tokens`` is ``(B, N, D)`` and not read."""
        if ctx.vision_attention is None or ctx.vision_valid is None:
            raise ReducerInputError(
                f"reducer {self.name!r} needs ctx.vision_attention; run it at post_projector through tokenprune.apply"
            )
        keep = ctx.protected & ctx.valid
        for b in range(ctx.batch_size):
            groups = _groups(ctx, b)
            free = int(ctx.budget[b]) - int(keep[b].sum())
            quotas = split_budget(max(free, 0), [int(g.numel()) for g in groups])
            for members, quota in zip(groups, quotas, strict=True):
                scores = ctx.vision_attention[b, members].float()
                picked = prumerge_pick(scores, self.params.plus)
                if int(picked.numel()) > quota:
                    picked = picked[scores[picked].argsort(descending=True, stable=True)[:quota]]
                keep[b, members[picked]] = True
        return Selection.from_mask(keep)


def prumerge_pick(scores: Tensor, plus: bool) -> Tensor:
    """The positions (into ``scores``, ``(n,)``) PruMerge keeps of one image: its outliers, then PruMerge+'s sample."""
    n = int(scores.numel())
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=scores.dtype, device=scores.device)).tolist()
    outliers = int((scores > q3 + 1.5 * (q3 - q1)).sum())
    ratio = outliers / n
    top = scores.argsort(descending=True, stable=True)[: max(1, int(n * ratio))]
    if not plus or ratio == 0 or int(int(1 / ratio) / 3) == 0:
        return top.sort().values
    sample = torch.arange(0, n - 1, int(int(1 / ratio) / 3), device=scores.device)
    return torch.cat([top, sample[~torch.isin(sample, top)]]).sort().values


def _groups(ctx: ReduceContext, b: int) -> list[Tensor]:
    """Sample ``b``'s candidate tokens (patch tokens, not protected) per ``(image, view)``, in sequence order."""
    candidate = ctx.valid[b] & ~ctx.protected[b] & ctx.vision_valid[b]
    members = candidate.nonzero().squeeze(1)
    if ctx.layout is None or not members.numel():
        return [members] if members.numel() else []
    key = ctx.layout.image[b, members] * 1_000_003 + ctx.layout.view[b, members]
    return [members[key == k] for k in key.unique().tolist()]


@tokenprune.hookimpl
def tokenprune_register_reducers(registry: tokenprune.plugins.ReducerRegistry) -> None:
    registry.add(PruMerge)


@tokenprune.hookimpl
def tokenprune_register_pipelines(registry: tokenprune.plugins.PipelineRegistry) -> None:
    paper = "LLaVA-PruMerge (Shang et al., ICCV 2025), https://arxiv.org/abs/2403.15388"
    for name, plus, what in (("prumerge", False, "PruMerge"), ("prumerge-plus", True, "PruMerge+")):
        registry.add(
            name,
            {"stages": [{"at": "post_projector", "reducer": "prumerge", "keep": 1.0, "params": {"plus": plus}}]},
            paper=paper,
            table=f"the {what} rows on LLaVA-1.5-7B (adaptive count: about 32 tokens for PruMerge and 144 for "
            "PruMerge+ on average); the selection only, without the official merge (see the reducer's page)",
            description=f"{what}'s adaptive selection by the [CLS] attention's outliers, uncapped",
        )
