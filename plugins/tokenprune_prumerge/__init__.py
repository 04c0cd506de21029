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
from tokenprune import Capabilities, ReduceContext, Selection, TokenReducer
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

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Select per sample and group (batch-independent); ``tokens`` is ``(B, N, D)`` and not read."""
        if ctx.vision_attention is None or ctx.vision_valid is None:
            raise ReducerInputError(
                f"reducer {self.name!r} needs ctx.vision_attention; run it at post_projector through tokenprune.apply"
            )
        keep = ctx.protected & ctx.valid
        for b, (free, groups) in enumerate(_groups(ctx, keep)):
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
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=scores.dtype, device=scores.device)).double()
    outliers = int((scores > q3 + 1.5 * (q3 - q1)).sum())  # float64 as on the host: the one read
    ratio = outliers / n
    top = scores.argsort(descending=True, stable=True)[: max(1, int(n * ratio))]
    if not plus or ratio == 0 or int(int(1 / ratio) / 3) == 0:
        return top.sort().values
    sample = torch.arange(0, n - 1, int(int(1 / ratio) / 3), device=scores.device)
    return torch.cat([top, sample[~torch.isin(sample, top)]]).sort().values


def _groups(ctx: ReduceContext, kept: Tensor) -> list[tuple[int, list[Tensor]]]:
    """Per sample, its budget beyond the ``(B, N)`` ``kept`` tokens, and its candidate tokens (patch
    tokens, not protected) per ``(image, view)`` in sequence order; one host read for the batch."""
    candidate = ctx.valid & ~ctx.protected & ctx.vision_valid
    key = torch.zeros(candidate.shape, dtype=torch.long, device=candidate.device)
    if ctx.layout is not None:
        key = ctx.layout.image.long() * 1_000_003 + ctx.layout.view.long()
    key, order = key.masked_fill(~candidate, torch.iinfo(torch.long).max).sort(dim=1, stable=True)
    starts = candidate.gather(1, order)
    starts[:, 1:] &= key[:, 1:] != key[:, :-1]
    group = (starts.cumsum(1) - 1).clamp(min=0)
    sizes = torch.zeros_like(group).scatter_add_(1, group, candidate.gather(1, order).long())
    free = ctx.budget.to(kept.device) - kept.sum(1)
    rows = torch.cat([free[:, None], candidate.sum(1, keepdim=True), sizes], 1).tolist()
    return [
        (row[0], list(order[b, : row[1]].split([size for size in row[2:] if size])) if row[1] else [])
        for b, row in enumerate(rows)
    ]


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(PruMerge)


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
