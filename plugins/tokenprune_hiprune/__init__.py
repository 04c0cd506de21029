"""The ``hiprune`` reducer: HiPrune's anchor, buffer and register tokens from the vision encoder's attention.

HiPrune (Liu et al., *HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in
Vision-Language Models*, https://arxiv.org/abs/2508.00553; official code
https://github.com/Danielement321/HiPrune, ``LLaVA/llava/model/llava_arch.py`` ``encode_images`` and
``Qwen2_5_VL/qwen2_5_vl_HiPrune.py``) reads the vision tower's attention at two depths: a middle
("object") layer attends to the objects, the last layers to patches that gather global context. It
keeps *anchors* (the most attended tokens of the object layer), their four spatial neighbours
(*buffers*), and fills the rest of the budget with *registers* (the most attended tokens of the features
layer). No [CLS] token is needed: the attention is the one each patch receives, averaged over heads and
query rows. It is a selection, so on a per-token projector (LLaVA's MLP) selecting after the projector
is exactly selecting before it, as the official code does. Packaged as a third-party plugin: this module
is the entry point ``hiprune`` of the ``tokenprune`` group.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, Selection, TokenReducer
from tokenprune.budget import all_spatial_quotas, split_budget
from tokenprune.errors import ReducerInputError
from tokenprune.reducer import VisionAttentionKind, VisionAttentionParams, VisionAttentionRequest


class HiPrune(TokenReducer):
    """Keep each crop's anchors, their neighbours and the registers, within the crop's share of the budget.

    Per sample, the free budget (the stage's budget less the protected tokens) is split over its spatial
    groups by size (each ``(image, view)``; each anyres crop of LLaVA-NeXT's grid through the layout's
    ``crop``). A group of ``n`` tokens on a ``R x W`` grid with quota ``q``, shallow scores ``s`` (the
    ``object_layer``) and deep scores ``d`` (``layer``, default the features layer), keeps

    1. anchors: the ``round(q * alpha / 5)`` tokens of highest ``s``;
    2. buffers: each anchor's raster neighbours ``p - 1, p + 1, p - W, p + W`` (clamped to the grid, as the
       official index arithmetic, so ``p - 1`` of a row's first token is the previous row's last);
    3. registers: the ``q - |anchors and buffers|`` other tokens of highest ``d``.

    Ties go to the lower index. Protected and newline tokens are kept. The result is a :class:`Selection`
    of exactly the budget. Cost: sorting only (the probe's attention is counted by the engine).
    """

    name = "hiprune"
    capabilities = Capabilities(
        insertion_points=frozenset({"post_projector"}), vision_attention=frozenset({"mean", "cls"})
    )

    class Params(VisionAttentionParams):
        attention: VisionAttentionKind = Field(
            default="mean",
            description="Vision attention to rank by: 'mean', the attention each patch receives averaged over heads "
            "and query rows (the official 'global attention'), or the [CLS] query's row ('cls', towers with CLS).",
        )
        object_layer: int = Field(
            default=9,
            ge=1,
            description="The object layer, counted from 1 as the official HIPRUNE_OBJECT_LAYER (9 for LLaVA's "
            "CLIP ViT-L, 16 for Qwen2.5-VL): its attention picks the anchors.",
        )
        alpha: float = Field(
            default=0.1,
            gt=0.0,
            le=1.0,
            description="Share of the budget for anchors and their buffers (the official HIPRUNE_ALPHA): "
            "round(budget * alpha / 5) anchors, each with up to four neighbours.",
        )

        def vision_request(self, **more: Any) -> VisionAttentionRequest:
            """The attention at :attr:`layer` and at the object layer's (``object_layer - 1``, counted from 0)."""
            return super().vision_request(also_at=(self.object_layer - 1,), **more)

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Select per sample and group (batch-independent); ``tokens`` is ``(B, N, D)`` and not read."""
        shallow = ctx.vision_attention_at.get(self.params.object_layer - 1)
        if ctx.vision_attention is None or shallow is None:
            raise ReducerInputError(
                f"reducer {self.name!r} needs ctx.vision_attention and ctx.vision_attention_at"
                f"[{self.params.object_layer - 1}]; run it at post_projector through tokenprune.apply"
            )
        keep = torch.zeros_like(ctx.valid)
        groups = []
        for b, (always, quotas) in enumerate(all_spatial_quotas(ctx)):
            keep[b, always] = True
            groups += [(b, members, quota) for members, quota in quotas]
        for b, crop, share in _crops(ctx, groups):
            rows, cols = _grid(ctx, b, crop)
            deep = ctx.vision_attention[b, crop]
            keep[b, crop] |= hiprune_pick(shallow[b, crop], deep, rows, cols, share, self.params.alpha)
        return Selection.from_mask(keep)


def hiprune_pick(shallow: Tensor, deep: Tensor, rows: Tensor, cols: Tensor, quota: int, alpha: float) -> Tensor:
    """``(n,)`` bool: HiPrune's ``quota`` tokens of one grid's ``n`` tokens at ``rows``/``cols`` (from 0).

    ``shallow``/``deep`` are ``(n,)`` scores (``-inf`` ranks last). See :class:`HiPrune` for the rule.
    """
    n = int(shallow.numel())
    width = cols.max() + 1  # the grid's size stays on the device: no host read per crop
    cells = (rows.max() + 1) * width
    raster = rows * width + cols
    ordered, index = raster.sort()
    anchors = _top(shallow.float(), round(quota * alpha / 5))
    near = torch.cat([raster[anchors] + d for d in (0, -1, 1, -width, width)])
    near = torch.minimum(near.clamp(min=0), cells - 1)
    slot = torch.searchsorted(ordered, near).clamp(max=n - 1)
    found = torch.where(ordered[slot] == near, index[slot], n)  # n: a neighbour off the grid (no member)
    chosen = torch.zeros(n + 1, dtype=torch.bool, device=shallow.device)
    chosen[found] = True
    chosen = chosen[:n]
    # only with a large alpha can the buffers overflow the quota (the official code would fail, a negative
    # top-k): then the anchors and the most attended buffers; chosen on the device, without reading the count
    order = shallow.float().masked_fill(~chosen, float("-inf"))
    order[anchors] = float("inf")
    chosen = torch.where(chosen.sum() > quota, _rank(order) < quota, chosen)
    rest = quota - chosen.sum()
    return chosen | (_rank(deep.float().masked_fill(chosen, float("-inf"))) < rest)


def _top(scores: Tensor, k: int) -> Tensor:
    """The indices of the ``k`` highest ``scores``, ties to the lower index."""
    return scores.argsort(descending=True, stable=True)[: max(k, 0)]


def _rank(scores: Tensor) -> Tensor:
    """Each of ``scores``' place in :func:`_top`'s order (0 for the highest; ties to the lower index)."""
    order = scores.argsort(descending=True, stable=True)
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _crops(ctx: ReduceContext, groups: list[tuple[int, Tensor, int]]) -> list[tuple[int, Tensor, int]]:
    """Each ``(sample, members, quota)`` spatial group cut into its anyres crops (the layout's ``crop``),
    as ``(sample, crop members, share of quota)``; one host read for all the groups' crop sizes."""
    if ctx.layout is None:
        return groups
    groups = [(b, members, quota) for b, members, quota in groups if members.numel()]
    sorted_, read = [], []
    for b, members, _ in groups:
        crop, order = ctx.layout.crop[b, members].sort(stable=True)  # by crop, in position order within one
        first = torch.cat([crop.new_zeros(1), (crop[1:] != crop[:-1]).long()]).cumsum(0)
        sizes = torch.zeros_like(crop).scatter_add_(0, first, torch.ones_like(crop))
        read.append(torch.cat([(crop >= 0).all().reshape(1).to(sizes.dtype), sizes]))
        sorted_.append(members[order])
    table = torch.cat(read).tolist() if read else []  # the one host read of the crops
    out, start = [], 0
    for (b, members, quota), ordered in zip(groups, sorted_, strict=True):
        row, start = table[start : start + 1 + members.numel()], start + 1 + members.numel()
        if not row[0]:
            out.append((b, members, quota))
            continue
        parts = list(ordered.split([size for size in row[1:] if size]))
        shares = split_budget(quota, [int(p.numel()) for p in parts])
        out += [(b, p, s) for p, s in zip(parts, shares, strict=True) if s]
    return out


def _grid(ctx: ReduceContext, b: int, members: Tensor) -> tuple[Tensor, Tensor]:
    """Rows and columns of ``members`` counted from their group's top-left (a square raster without a layout)."""
    n = int(members.numel())
    side = math.isqrt(n)
    width = side if side * side == n else n
    index = torch.arange(n, device=members.device)
    if ctx.layout is None:
        return index // width, index % width
    rows, cols = ctx.layout.row[b, members], ctx.layout.col[b, members]
    unknown = (rows < 0).any()  # chosen on the device: no host read per crop
    rows = torch.where(unknown, index // width, rows - rows.min())
    return rows, torch.where(unknown, index % width, cols - cols.min())


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(HiPrune)


_PAPER = "HiPrune (Liu et al., 2025), https://arxiv.org/abs/2508.00553"


@tokenprune.hookimpl
def tokenprune_register_pipelines(registry: tokenprune.plugins.PipelineRegistry) -> None:
    for tokens in (192, 128, 64):
        _preset(
            registry,
            f"hiprune-{tokens}",
            tokens,
            f"the main table's LLaVA-1.5-7B results at {tokens} tokens (the README's "
            f"HIPRUNE_RETENTION={tokens}, ALPHA=0.1, OBJECT_LAYER=9)",
            f"HiPrune at {tokens} visual tokens (LLaVA-1.5)",
        )
    for tokens in (640, 320, 160):
        _preset(
            registry,
            f"hiprune-next-{tokens}",
            tokens,
            f"LLaVA-NeXT-7B at {tokens} tokens (the README's HIPRUNE_RETENTION={tokens}, ALPHA=0.1, "
            "OBJECT_LAYER=9; split over the crops by size)",
            f"HiPrune at {tokens} visual tokens (LLaVA-NeXT)",
        )
    for ratio in (0.334, 0.223, 0.112):
        _preset(
            registry,
            f"hiprune-qwen-{round(ratio * 100)}",
            ratio,
            f"Qwen2.5-VL-7B keeping {ratio:.1%} of the tokens (the README's HIPRUNE_QWEN_RETENTION={ratio}, "
            "ALPHA=0.1, OBJECT_LAYER=16)",
            f"HiPrune keeping {ratio:.1%} of the visual tokens (Qwen2.5-VL)",
            {"object_layer": 16},
        )


def _preset(
    registry: tokenprune.plugins.PipelineRegistry,
    name: str,
    keep: float | int,
    table: str,
    description: str,
    params: dict[str, Any] | None = None,
) -> None:
    """Register a one-stage HiPrune preset after the projector."""
    stage: dict[str, Any] = {"at": "post_projector", "reducer": "hiprune", "keep": keep}
    if params:
        stage["params"] = params
    registry.add(name, {"stages": [stage]}, paper=_PAPER, table=table, description=description)
