"""``vision_layer`` stages: reduce the patch tokens between two layers of the vision tower (ToMe's own place).

A forward pre-hook on tower layer ``k`` hands each tower sequence's patch tokens (the [CLS] token kept aside) to the
stages at ``{vision_layer: k}``; the reducer's batch is the tower's sequences (images, anyres crops), every one of
which must keep the same count (the tower runs them as one dense batch). The kept and merged tokens run through
the tower's remaining layers; once a merge made some token stand for several patches, every later layer's attention
adds ``log(size)`` to the keys' scores (ToMe's proportional attention, as an additive attention mask).

Before the projector (:mod:`tokenprune.engine.pre_projector`) the surviving tokens are put back at their patches'
places, the others left as zero rows marked dropped, so the model's own layout code runs on its usual shapes and
the dropped tokens leave at the language model's input as a ``pre_projector`` stage's do. The tower's position
embeddings are added before its first layer, so they follow the tokens. A packed tower (Qwen2-VL, Qwen2.5-VL: per-patch
rotary positions, ``cu_seqlens``, windows) is served by :mod:`tokenprune.engine.packed_stages`, on whole merge units;
every other family whose projector is not per token is refused.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ModelAdapter, VisionTower
from tokenprune.engine.feature_calls import FeatureCalls
from tokenprune.engine.hooks import HookSet
from tokenprune.engine.packed_stages import PackedCut, PackedTowerStages
from tokenprune.engine.stage import StagePlan
from tokenprune.errors import TokenpruneError
from tokenprune.layout import TokenLayout
from tokenprune.reducer import Merge, ReduceContext
from tokenprune.validation import check_reduction


@dataclass
class TowerCut:
    """What the ``vision_layer`` stages did to one image call's tower sequences.

    Attributes:
        patches: ``P``, the patch tokens of each sequence before the stages.
        index: ``(M, K)`` long, the patch each remaining token sits at (its root's, for a merge).
        sizes: ``(M, K)`` float, how many patches each remaining token stands for.
        masks: ``(M, P)`` bool, the patches remaining before the first stage, then after each.
        seconds: Per stage, the wall time of its reducer.
        macs: Per stage, its declared overhead.
    """

    patches: int
    index: Tensor
    sizes: Tensor
    masks: list[Tensor] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    macs: list[int] = field(default_factory=list)

    def expand(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The projector's input ``(M, K + c, D)`` (``c``: a [CLS] row first, where the model keeps it) back on the
        ``(M, P + c, D)`` patch grid: ``(features, remaining mask, sizes)``, zero rows where no token remains."""
        rows, width, dim = x.shape
        extra = width - self.index.shape[1]
        if extra not in (0, 1):
            raise TokenpruneError(
                f"vision_layer: the projector received {width} tokens per sequence, but {self.index.shape[1]} patch "
                "tokens left the tower's stages"
            )
        full = x.new_zeros(rows, self.patches + extra, dim)
        full[:, :extra] = x[:, :extra]
        index = (self.index + extra).unsqueeze(-1).expand(-1, -1, dim)
        full = full.scatter(1, index, x[:, extra:])
        keep = torch.ones(rows, self.patches + extra, dtype=torch.bool, device=x.device)
        keep[:, extra:] = self.masks[-1]
        sizes = x.new_ones(rows, self.patches + extra, dtype=torch.float32)
        sizes[:, extra:] = torch.zeros_like(sizes[:, extra:]).scatter(1, self.index, self.sizes.float())
        return full, keep, sizes.masked_fill(~keep, 1.0)


class VisionLayerStages:
    """The ``vision_layer`` stages of one applied pipeline.

    Args:
        plans: The ``vision_layer`` stage plans, in pipeline order.
        adapter: The model family's adapter.
        calls: The engine's feature-call recorder (a tower call inside a video call is left alone).
    """

    def __init__(self, plans: list[StagePlan], adapter: ModelAdapter, calls: FeatureCalls) -> None:
        self.plans = plans
        self.adapter = adapter
        self.calls = calls
        self.cut: TowerCut | None = None
        self.packed: PackedTowerStages | None = None  # a packed tower's stages (Qwen2-VL), which do the work
        self._tower: VisionTower | None = None
        self._first = min(int(p.stage.point.layer) for p in plans)  # type: ignore[arg-type]

    def install(self, hooks: HookSet, reading_vision: list[StagePlan]) -> None:
        """Check the family and the stages' layers, then hook the tower's layers from the first stage's on.

        Raises:
            TokenpruneError: the family's projector is not per token, the tower is not described, a stage's layer
                is not before the layer the features come from, or another stage reads vision attention.
        """
        first = self.plans[0]
        where = f"stage {first.index} ({first.stage.reducer}) runs at {first.stage.point}"
        if self.adapter.projector() is None:
            raise TokenpruneError(
                f"{where}, which the {self.adapter.name!r} adapter cannot serve: {self.adapter.pre_projector_refusal}"
            )
        tower = self.adapter.vision_tower()
        if tower is None:
            raise TokenpruneError(f"{where}, but the {self.adapter.name!r} adapter does not describe its vision tower")
        packed = self.adapter.packed_tower()
        last = len(tower.layers) - 1 if packed is not None else tower.feature_layer  # a packed tower: its last block
        for plan in self.plans:
            k = int(plan.stage.point.layer)  # type: ignore[arg-type]
            if k > last:
                raise TokenpruneError(
                    f"stage {plan.index} ({plan.stage.reducer}) runs at vision layer {k}, but the model takes its "
                    f"features from the output of layer {last} of its {tower.name}; use k <= {last}"
                )
        if reading_vision:
            p = reading_vision[0]
            raise TokenpruneError(
                f"stage {p.index} ({p.stage.reducer}) reads vision-encoder attention, which does not follow the tokens "
                "a vision_layer stage removes; combine them in separate runs"
            )
        self._tower = tower
        if packed is not None:
            self.packed = PackedTowerStages(self.plans, self.calls, packed, tower.layers)
            self.packed.install(hooks, self._first)
            return
        layers = sorted({int(p.stage.point.layer) for p in self.plans})  # type: ignore[arg-type]
        for i in range(self._first, len(tower.layers)):
            hooks.pre(tower.layers[i], self._layer_hook(i, i in layers))

    def take(self) -> TowerCut | PackedCut | None:
        """The last image call's cut (forgotten here)."""
        if self.packed is not None:
            return self.packed.take()
        cut, self.cut = self.cut, None
        return cut

    def _layer_hook(self, index: int, stages: bool) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self.calls.in_video:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == self._first:
                self._start(hidden)
            if stages:
                hidden = self._run_stages(index, hidden)
            args, kwargs = _with_hidden(args, kwargs, hidden)
            return _with_size_bias(args, kwargs, self.cut, self._offset(), hidden)

        return hook

    def _offset(self) -> int:
        return 1 if self._tower is not None and self._tower.has_cls else 0

    def _start(self, hidden: Tensor) -> None:
        rows, length = int(hidden.shape[0]), int(hidden.shape[1])
        patches = length - self._offset()
        index = torch.arange(patches, device=hidden.device).expand(rows, -1)
        ones = torch.ones(rows, patches, dtype=torch.bool, device=hidden.device)
        self.cut = TowerCut(patches, index, torch.ones(rows, patches, device=hidden.device), [ones])

    def _run_stages(self, k: int, hidden: Tensor) -> Tensor:
        cut, offset = self.cut, self._offset()
        if cut is None:
            raise TokenpruneError(f"vision layer {k}: the tower's earlier layers were not seen in this call")
        for plan in (p for p in self.plans if p.stage.point.layer == k):
            tokens = hidden[:, offset:]
            ctx = self._context(plan, tokens, cut)
            start = time.perf_counter()
            result = plan.reducer.reduce(tokens, ctx)
            selection = check_reduction(result, tokens, ctx, who=plan.who, capabilities=type(plan.reducer).capabilities)
            if isinstance(result, Merge):
                kept, sizes, selection = result.apply(tokens, ctx.sizes, ctx.valid)
            else:
                safe = selection.indices.clamp(min=0)
                kept = tokens.gather(1, safe.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
                sizes = ctx.sizes.gather(1, safe)
            if bool((selection.counts != selection.counts[0]).any()):
                raise TokenpruneError(
                    f"stage {plan.index} ({plan.who}) at vision layer {k} kept {selection.counts.tolist()} tokens "
                    "in the tower's sequences; the tower runs them as one batch, so every sequence must keep the "
                    "same count"
                )
            cut.index = cut.index.gather(1, selection.indices)
            cut.sizes = sizes.float()
            cut.masks.append(torch.zeros_like(cut.masks[0]).scatter(1, cut.index, True))
            cut.seconds.append(time.perf_counter() - start)
            cut.macs.append(plan.reducer.overhead_macs(tokens, ctx))
            hidden = torch.cat([hidden[:, :offset], kept.to(hidden.dtype)], 1)
        return hidden

    def _context(self, plan: StagePlan, tokens: Tensor, cut: TowerCut) -> ReduceContext:
        rows, n = int(tokens.shape[0]), int(tokens.shape[1])
        valid = torch.ones(rows, n, dtype=torch.bool, device=tokens.device)
        side = math.isqrt(cut.patches)
        layout = None
        if side * side == cut.patches:
            grid = TokenLayout.grid(side, side, batch=rows).to(tokens.device)
            layout = grid.gather(cut.index)
        return plan.tower_context(valid, cut.sizes.to(tokens.device), layout)


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: Tensor) -> tuple[tuple[Any, ...], dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _with_size_bias(
    args: tuple[Any, ...], kwargs: dict[str, Any], cut: TowerCut | None, offset: int, hidden: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The layer's arguments with ToMe's proportional attention, ``log(size)`` added to every key's score, as an
    additive attention mask (none while every token stands for one patch, so a keep-all run is the stock model's)."""
    if cut is None or not bool((cut.sizes != 1).any()):
        return args, kwargs
    if (len(args) > 1 and args[1] is not None) or kwargs.get("attention_mask") is not None:
        raise TokenpruneError("vision_layer: the tower's layers received an attention mask; merges cannot add theirs")
    bias = torch.zeros(int(hidden.shape[0]), int(hidden.shape[1]), device=hidden.device, dtype=hidden.dtype)
    bias[:, offset:] = cut.sizes.log().to(hidden.dtype)
    mask = bias[:, None, None, :]
    if len(args) > 1:
        return (args[0], mask, *args[2:]), kwargs
    return args, {**kwargs, "attention_mask": mask}
