"""``vision_layer`` stages on a packed tower (Qwen2-VL, Qwen2.5-VL, PaddleOCR-VL, ...), reducing whole merge units.

The tower runs every frame's patches as one packed sequence (see :mod:`tokenprune.adapters.packed`). A pre-hook on
the tower records the call's :class:`~tokenprune.adapters.packed.PackedUnits`; a pre-hook on block ``k`` hands the
frames' units (``(M, W, G * D)``, raster order) to the stages at ``{vision_layer: k}`` and keeps the patches of the
units they keep, in the tower's own order (PaddleOCR-VL's raster order of patches too), so the remaining blocks run on
fewer patches. What each block reads per patch follows the kept units: the rotary ``position_embeddings`` are
gathered (each patch keeps its own 2-D rotary position), and ``cu_seqlens`` / ``max_seqlen`` are recomputed from the
kept units, per frame for the full-attention blocks and per attention window for Qwen2.5-VL's windowed blocks (a
window left empty is dropped). Before the merger (:mod:`tokenprune.engine.pre_projector`) the removed units come back
as zero patches marked dropped, so the model's merger and its window-order reversal run on their usual shapes, and
the dropped units' tokens leave at the language model's input.

Merges are refused here: ToMe's proportional attention adds ``log(size)`` through an attention mask, and the packed
tower's attention takes none (its chunks are called with ``attention_mask=None``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.adapters.packed import PackedTower, PackedUnits
from tokenprune.engine.feature_calls import FeatureCalls
from tokenprune.engine.hooks import HookSet
from tokenprune.engine.stage import StagePlan
from tokenprune.engine.valid_first import ValidFirst
from tokenprune.errors import TokenpruneError
from tokenprune.reducer import Merge, ReduceContext
from tokenprune.validation import check_reduction


@dataclass
class PackedCut:
    """What the ``vision_layer`` stages did to one packed tower call.

    Attributes:
        units: The call's unit bookkeeping.
        alive: ``(U,)`` bool, the units remaining, in the tower's (window) order.
        masks: ``(M, W)`` bool over the frames' rows: the units before the first stage, then after each.
        seconds: Per stage, the wall time of its reducer.
        macs: Per stage, its declared overhead.
    """

    units: PackedUnits
    alive: Tensor
    masks: list[Tensor] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    macs: list[int] = field(default_factory=list)
    blocks: dict[bool, tuple[Tensor, int]] = field(default_factory=dict)  # per windowed-or-not: cu_seqlens, max
    keep: Tensor | None = None  # (N,) bool over the tower's original patches (in its order); None: all kept
    rotary: tuple[Tensor, Tensor] | None = None  # the kept patches' rotary embeddings, gathered once per cut


class PackedUnitCapture:
    """Records each (non-video) packed tower call's :class:`PackedUnits` from its ``grid_thw``."""

    def __init__(self, packed: PackedTower, calls: FeatureCalls) -> None:
        self.packed = packed
        self.calls = calls
        self.units: PackedUnits | None = None
        self.grid: Tensor | None = None

    def install(self, hooks: HookSet) -> None:
        hooks.pre(self.packed.module, self._before_tower)

    def _before_tower(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.calls.in_video:
            return
        grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
        if not isinstance(grid, Tensor):
            raise TokenpruneError(f"the packed {type(module).__name__} was called without grid_thw")
        self.grid = grid
        self.units = self.packed.units(grid)


class PackedTowerStages:
    """The ``vision_layer`` stages of one applied pipeline on a packed tower.

    Args:
        plans: The ``vision_layer`` stage plans, in pipeline order.
        calls: The engine's feature-call recorder (a tower call inside a video call is left alone).
        packed: The tower's description.
        layers: The tower's blocks.
    """

    def __init__(self, plans: list[StagePlan], calls: FeatureCalls, packed: PackedTower, layers: tuple) -> None:
        self.plans = plans
        self.calls = calls
        self.packed = packed
        self.layers = layers
        self.capture = PackedUnitCapture(packed, calls)
        self.cut: PackedCut | None = None

    def install(self, hooks: HookSet, first: int) -> None:
        """Hook the tower (its units) and its blocks from ``first`` on."""
        self.capture.install(hooks)
        stage_layers = {int(p.stage.point.layer) for p in self.plans}  # type: ignore[arg-type]
        for i in range(first, len(self.layers)):
            hooks.pre(self.layers[i], self._block_hook(i, i in stage_layers, i == first))

    def take(self) -> PackedCut | None:
        """The last tower call's cut (forgotten here)."""
        cut, self.cut = self.cut, None
        return cut

    def _block_hook(self, index: int, stages: bool, first: bool) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self.calls.in_video:
                return None
            if first:
                self._start()
            hidden = args[0] if args else kwargs["hidden_states"]
            if stages:
                hidden = self._run_stages(index, hidden)
            cut = self.cut
            if cut is None or cut.keep is None:
                return None
            return self._block_args(index, args, kwargs, hidden, cut)

        return hook

    def _start(self) -> None:
        units = self.capture.units
        if units is None:
            raise TokenpruneError("vision_layer: the packed tower's blocks ran before its call was seen")
        alive = torch.ones(units.window_index.shape[0], dtype=torch.bool, device=units.window_index.device)
        valid = units.rows >= 0
        self.cut = PackedCut(units, alive, [valid])

    def _run_stages(self, k: int, hidden: Tensor) -> Tensor:
        cut = self.cut
        if cut is None:
            raise TokenpruneError(f"vision layer {k}: the tower's earlier blocks were not seen in this call")
        for plan in (p for p in self.plans if p.stage.point.layer == k):
            rows, valid = cut.units.to_rows(hidden, cut.alive)
            first = ValidFirst.of(valid)  # after an earlier cut, the removed units keep their places in the rows
            rows, ctx = first.rows(rows), first.context(_context(plan, rows, valid, cut.units))
            start = time.perf_counter()
            result = plan.reducer.reduce(rows, ctx)
            selection = check_reduction(result, rows, ctx, who=plan.who, capabilities=type(plan.reducer).capabilities)
            if isinstance(result, Merge):
                raise TokenpruneError(
                    f"stage {plan.index} ({plan.who}) merges tokens at vision layer {k}, but the "
                    f"{type(self.packed.module).__name__}"
                    " tower's attention takes no attention mask for ToMe's proportional attention (log(size) on the "
                    "keys); use a reducer that removes tokens there, or merge at pre_projector"
                )
            keep = first.selection(selection).to_mask(rows.shape[1]) & valid
            alive = cut.units.alive_of(keep)
            patches = cut.units.patch_mask(alive)
            hidden = hidden[patches if cut.keep is None else patches[cut.keep]]
            cut.alive, cut.keep = alive, patches
            cut.masks.append(keep)
            cut.seconds.append(time.perf_counter() - start)
            cut.macs.append(plan.reducer.overhead_macs(rows, ctx))
            cut.blocks, cut.rotary = {}, None
        return hidden

    def _block_args(
        self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any], hidden: Tensor, cut: PackedCut
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The block's arguments on the kept patches: hidden states, rotary embeddings, segment lengths."""
        windowed = self.packed.window is not None and index not in self.packed.full_blocks
        if windowed not in cut.blocks:
            cut.blocks[windowed] = cut.units.seqlens(cut.alive, windowed)
        cu, longest = cut.blocks[windowed]
        out = dict(kwargs)
        if cut.rotary is None:
            cos, sin = out["position_embeddings"]
            cut.rotary = (cos[cut.keep], sin[cut.keep])
        out["position_embeddings"] = cut.rotary
        out["cu_seqlens"] = cu.to(hidden.device)
        if "max_seqlen" in out:
            out["max_seqlen"] = longest
        if args:
            return (hidden, *args[1:]), out
        return (), {**out, "hidden_states": hidden}


def _context(plan: StagePlan, rows: Tensor, valid: Tensor, units: PackedUnits) -> ReduceContext:
    return plan.tower_context(valid, torch.ones(valid.shape, device=rows.device), units.layout(units.rows))
