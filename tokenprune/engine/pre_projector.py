"""``pre_projector`` stages: reduce the vision tower's selected features before the model's own projector.

A forward pre-hook on the adapter's per-token projector (:meth:`~tokenprune.adapters.base.ModelAdapter.projector`)
runs every ``pre_projector`` stage on the projector's input, ``(M, P, Dv)``: one row per tower sequence (an image,
an anyres crop), ``P`` patches each (the [CLS] token already dropped where the model drops it). The reducer sees
the ``M`` rows as its batch, so budgets are per image or crop (VisionZip's official counts on LLaVA-NeXT). A
:class:`~tokenprune.Merge` writes each group's combined features into its root's row, so the projector computes
exactly the official ``projector(merged feature)`` at the kept places; the number of rows is unchanged, so every
layout step after the projector (LLaVA-NeXT's unpadding and newlines) runs as in the stock model.

At the language model's input (:meth:`PreProjector.apply`), the dropped rows are mapped to the sequence's visual
columns through the adapter's :meth:`~tokenprune.adapters.base.ModelAdapter.map_vision_patches` (the mapping the
vision probe uses) and removed as a ``post_projector`` stage removes tokens; newline tokens, built from no patch,
stay. A language-model token built from several patches of which some were dropped (a bilinearly downscaled
anyres grid) is refused: its pre-projector reduction has no single meaning.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, ModelAdapter, VisionTower
from tokenprune.engine import positions as P
from tokenprune.engine.feature_calls import FeatureCalls
from tokenprune.engine.hooks import HookSet
from tokenprune.engine.packed_stages import PackedCut, PackedUnitCapture
from tokenprune.engine.run_stats import StageStats
from tokenprune.engine.sequence import TokenSequence, gather_kept_rows, right_aligned_columns
from tokenprune.engine.stage import StagePlan
from tokenprune.engine.valid_first import ValidFirst
from tokenprune.engine.vision_layer import TowerCut, VisionLayerStages
from tokenprune.engine.vision_probe import VisionProbe, resolve_layer
from tokenprune.errors import TokenpruneError
from tokenprune.layout import TokenLayout
from tokenprune.reducer import Merge, ReduceContext, Selection
from tokenprune.validation import check_reduction


@dataclass
class ProjectorRun:
    """What the stages did to one projector call.

    Attributes:
        masks: ``len(plans) + 1`` ``(M, P)`` bool masks: the rows valid before each stage, then after the last.
        sizes: ``(M, P)`` float, how many patches each row stands for after the stages.
        seconds: Per stage, the wall time of its reducer.
        macs: Per stage, its declared overhead plus the vision probe's cost it read first.
        tokens: A packed tower's ``(M, W)`` bool, the rows' places that hold a unit (one image token each, in order);
            ``None``: the rows map to the tokens through ``map_vision_patches``.
        layout: A packed tower's rows' layout (``None``: a square grid where the rows' length is a square).
    """

    masks: list[Tensor]
    sizes: Tensor
    seconds: list[float] = field(default_factory=list)
    macs: list[int] = field(default_factory=list)
    tokens: Tensor | None = None
    layout: TokenLayout | None = None

    @property
    def changed(self) -> bool:
        """Some row was dropped or merged (padding places of a packed tower's rows are not rows)."""
        return not torch.equal(self.masks[-1], self.masks[0]) or bool((self.sizes != 1).any())


@dataclass(eq=False)
class PreProjector:
    """The ``pre_projector`` stages of one applied pipeline.

    Args:
        plans: The ``pre_projector`` stage plans, in pipeline order.
        adapter: The model family's adapter.
        calls: The engine's feature-call recorder (a projector call inside a video call is left alone).
        vision: The ``vision_layer`` stages, whose surviving tokens are put back on the patch grid here.
    """

    plans: list[StagePlan]
    adapter: ModelAdapter
    calls: FeatureCalls
    vision: VisionLayerStages | None = None
    vision_probe: VisionProbe | None = field(default=None, init=False)
    last: ProjectorRun | None = field(default=None, init=False)
    _tower: VisionTower | None = field(default=None, init=False, repr=False)
    _capture: PackedUnitCapture | None = field(default=None, init=False, repr=False)  # a packed tower's (Qwen2-VL)

    @property
    def all_plans(self) -> list[StagePlan]:
        """The ``vision_layer`` stages, then the ``pre_projector`` ones: the stages whose tokens leave here."""
        return (self.vision.plans if self.vision is not None else []) + self.plans

    def install(self, hooks: HookSet, vision_probe: VisionProbe | None) -> None:
        """Check the family serves ``pre_projector`` stages and hook its projector.

        Raises:
            TokenpruneError: the adapter names no per-token projector (naming the family and why), or
                does not map the tower's patches to the language model's tokens.
        """
        first = self.all_plans[0]
        where = f"stage {first.index} ({first.stage.reducer}) runs at {first.stage.point}"
        projector = self.adapter.projector()
        if projector is None:
            raise TokenpruneError(
                f"{where}, which the {_model_type(self.adapter)!r} family (adapter {self.adapter.name!r}) cannot "
                f"serve: {self.adapter.pre_projector_refusal}; put the stage at post_projector"
            )
        self._tower = self.adapter.vision_tower()
        if self._tower is None:
            raise TokenpruneError(f"{where}, but the {self.adapter.name!r} adapter does not describe its vision tower")
        self.vision_probe = vision_probe
        packed = self.adapter.packed_tower()
        if packed is not None:
            own = self.vision.packed if self.vision is not None else None
            self._capture = own.capture if own is not None else PackedUnitCapture(packed, self.calls)
            if own is None:
                self._capture.install(hooks)
        hooks.pre(projector, self._before_projector)

    def clear(self) -> None:
        """Forget the last projector call's reduction (and the tower's cut)."""
        self.last = None
        if self.vision is not None:
            self.vision.take()

    # --- the projector's input ------------------------------------------------------------------

    def _before_projector(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.calls.in_video:
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        if self._capture is not None:
            return self._before_packed(x, args, kwargs)
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise TokenpruneError(
                f"pre_projector: the {self.adapter.name!r} projector received "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}, not (tower sequences, patches, dim)"
            )
        cut = self.vision.take() if self.vision is not None else None
        run = _projector_run(x, cut)
        if cut is not None:
            x = cut.expand(x)[0]
        x = self._run_all(x, run)
        if not run.changed and cut is None:
            return None
        return _with_input(args, kwargs, x)

    def _before_packed(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A packed tower's ``(N, Dv)`` merger input: the stages run on the frames' rows of whole units."""
        units = self._capture.units if self._capture is not None else None
        if units is None:
            raise TokenpruneError(f"pre_projector: the {self.adapter.name!r} merger ran before its tower call was seen")
        cut = self.vision.take() if self.vision is not None else None
        if cut is not None and not isinstance(cut, PackedCut):
            raise TokenpruneError("pre_projector: a packed tower's stages left a per-token cut")
        alive = cut.alive if cut is not None else torch.ones_like(units.frame, dtype=torch.bool)
        rows, valid = units.to_rows(x, alive)
        index = units.rows
        masks = [valid] if cut is None else list(cut.masks)
        run = ProjectorRun(masks, rows.new_ones(valid.shape, dtype=torch.float32), tokens=index >= 0)
        if cut is not None:
            run.seconds, run.macs = list(cut.seconds), list(cut.macs)
        run.layout = units.layout(index)
        rows = self._run_all(rows, run)
        if not run.changed and cut is None:
            return None
        return _with_input(args, kwargs, units.from_rows(rows).to(x.dtype))

    def _run_all(self, x: Tensor, run: ProjectorRun) -> Tensor:
        """Every stage in pipeline order on the ``(rows, patches, D)`` rows ``x``; ``run`` becomes :attr:`last`."""
        counted: set[tuple[Any, ...]] = set()
        with torch.no_grad():
            for plan in self.plans:
                x = self._run(plan, x, run, counted)
        self.last = run
        return x

    def _run(self, plan: StagePlan, x: Tensor, run: ProjectorRun, counted: set[tuple[Any, ...]]) -> Tensor:
        """One stage on the rows still valid; returns ``x`` with merged rows written at their roots."""
        ctx, macs = self._context(plan, x, run, counted)
        valid, start = ctx.valid, time.perf_counter()
        first = ValidFirst.of(valid)  # a later stage's rows keep the removed tokens in place
        tokens, ctx = first.rows(x), first.context(ctx)
        result = plan.reducer.reduce(tokens, ctx)
        selection = check_reduction(result, tokens, ctx, who=plan.who, capabilities=type(plan.reducer).capabilities)
        if isinstance(result, Merge):
            merged, sizes, selection = result.apply(tokens, ctx.sizes, ctx.valid)
        kept = first.selection(selection)  # in the rows' own columns
        if isinstance(result, Merge):
            x, run.sizes = _write_rows(x, run.sizes, kept, merged, sizes)
        run.masks.append(kept.to_mask(x.shape[1]) & valid)
        run.seconds.append(time.perf_counter() - start)
        run.macs.append(plan.reducer.overhead_macs(tokens, ctx) + macs)
        return x

    def _context(
        self, plan: StagePlan, x: Tensor, run: ProjectorRun, counted: set[tuple[Any, ...]]
    ) -> tuple[ReduceContext, int]:
        rows, patches, _ = x.shape
        valid = run.masks[-1]
        side = math.isqrt(patches)
        layout = TokenLayout.grid(side, side, batch=rows).to(x.device) if side * side == patches else None
        layout = run.layout if run.layout is not None else layout
        ctx = plan.tower_context(valid, run.sizes, layout)
        request = plan.needs.vision_attention
        if request is None:
            return ctx, 0
        scores, keys, features, also, macs = self._vision(plan, rows, patches)
        key = (resolve_layer(self._tower, request.layer), request.also_at, request.kind)  # type: ignore[arg-type]
        macs, _ = (0 if key in counted else macs), counted.add(key)
        ok = valid.clone()
        ctx = replace(
            ctx,
            vision_attention=scores.to(x.device).masked_fill(~ok, float("-inf")),
            vision_valid=ok,
            vision_keys=None if keys is None else keys.to(x.device),
            vision_features=None if features is None else features.to(x.device),
            vision_attention_at={k: v.to(x.device).masked_fill(~ok, float("-inf")) for k, v in also.items()},
        )
        return ctx, macs

    def _vision(
        self, plan: StagePlan, rows: int, patches: int
    ) -> tuple[Tensor, Tensor | None, Tensor | None, dict[int, Tensor], int]:
        """The probe's records for ``plan``'s request as ``(M, P)`` rows aligned with the projector's input (a
        tower sequence one position longer than a row: its [CLS] token, which the model dropped, left out)."""
        request, probe, tower = plan.needs.vision_attention, self.vision_probe, self._tower
        if request is None or probe is None or tower is None:
            raise TokenpruneError(f"stage {plan.index} ({plan.stage.reducer}): no vision probe serves this stage")
        if self._capture is not None:
            return _packed_vision(plan, probe, tower, self._capture, self.adapter)
        offset = 1 if tower.has_cls else 0

        def rows_of(layer: int | None, kind: str) -> tuple[Tensor, Any]:
            nonlocal offset
            rec = probe.records.get(resolve_layer(tower, layer))
            if rec is not None and kind in rec.scores and rec.scores[kind]:
                offset = int(rec.scores[kind][0].shape[0]) - patches
            if rec is None or kind not in rec.scores:
                raise TokenpruneError(
                    f"stage {plan.index} ({plan.stage.reducer}): the vision probe recorded nothing for the projector's "
                    "input; is the attention implementation overridden elsewhere?"
                )
            if len(rec.scores[kind]) != rows or offset not in (0, 1):
                raise TokenpruneError(
                    f"stage {plan.index} ({plan.stage.reducer}) at pre_projector: the {tower.name} ran "
                    f"{len(rec.scores[kind])} sequences of {int(rec.scores[kind][0].shape[0])} positions, but the "
                    f"projector received {rows} rows of {patches}; the {self.adapter.name!r} family's tower output "
                    "is not the projector's input token for token"
                )
            return torch.stack(rec.scores[kind])[:, offset:], rec

        scores, rec = rows_of(request.layer, request.kind)
        keys = torch.stack(rec.keys)[:, offset:] if request.keys else None
        features = torch.stack(rec.features)[:, offset:] if request.features else None
        also = {at: rows_of(at, request.kind)[0] for at in request.also_at}
        macs = rec.macs.get(request.kind, 0)
        return scores, keys, features, also, macs

    # --- the language model's input -------------------------------------------------------------

    def apply(
        self, hidden: Tensor, seq: TokenSequence, call: ImageCall | None, image: Tensor, *, compact: bool
    ) -> tuple[Tensor, TokenSequence, Tensor | None, list[StageStats]]:
        """Remove the dropped rows' tokens from the language model's input ``hidden`` (``(B, L, D)``).

        Args:
            hidden: The language model's input embeddings.
            seq: Its sequence (columns of the caller's input).
            call: The recorded image call whose projector input the stages reduced.
            image: ``(B, L)`` bool, the image tokens (video tokens are not reduced before the projector).
            compact: Renumber the kept tokens' positions.

        Returns:
            ``(hidden, seq, kept_columns, stats)``: ``kept_columns`` ``(B, L')`` the input columns kept
            (``None``: nothing changed), and one :class:`StageStats` per stage.

        Raises:
            TokenpruneError: the stages ran on no image call, or a token is built from kept and dropped patches.
        """
        run, self.last = self.last, None
        if call is None or run is None:
            if not bool(image.any()):
                return hidden, seq, None, []
            raise TokenpruneError("pre_projector stages: the model's projector was not called for this batch's images")
        channels = self._map(run, call, image)  # (B, L, stages + 2): masks, sizes; newline tokens: 1
        stats = self._stats(run, channels, image)
        if not run.changed:
            return hidden, seq, None, stats
        kept = image & (channels[..., len(self.all_plans)] > 0.5)
        keep = seq.valid & (~image | kept)
        sizes = torch.where(image, channels[..., -1].to(seq.sizes.dtype), seq.sizes)
        idx = right_aligned_columns(keep)
        new = replace(seq, sizes=sizes).gather(idx)
        if compact:
            new.positions, freed = P.compact(seq.positions, idx, seq.input_column >= 0)
            new.freed_positions = seq.freed_positions + freed
        return gather_kept_rows(hidden, idx), new, idx, stats

    def _map(self, run: ProjectorRun, call: ImageCall, image: Tensor) -> Tensor:
        """The run's masks and sizes on the ``(B, L)`` image columns, through ``map_vision_patches``."""
        masks = torch.stack([m.float() for m in run.masks], -1)  # (M, P, S + 1)
        cover = torch.ones_like(masks[..., :1])
        values = torch.cat([masks, run.sizes.float()[..., None], cover], -1)
        flat = self._mapped(values, call, int(image.sum()), run.tokens)
        cov = flat[:, -1:]
        ratio = flat[:, :-1] / cov.clamp(min=1e-6)
        partial = (cov[:, 0] > 1e-6) & ((ratio[:, :-1] - ratio[:, :-1].round()).abs() > 1e-4).any(-1)
        if bool(partial.any()):
            raise TokenpruneError(
                f"pre_projector: {int(partial.sum())} of the {self.adapter.name!r} model's image tokens are built from "
                "several patches of which only some were kept (an anyres grid the model downscales by interpolation); "
                "reduce such images at post_projector"
            )
        out = torch.ones(*image.shape, flat.shape[-1] - 1, device=image.device)  # newlines: kept, size 1
        out[image] = torch.where(cov > 1e-6, ratio, torch.ones_like(ratio)).to(image.device)
        return out

    def _mapped(self, values: Tensor, call: ImageCall, count: int, run_tokens: Tensor | None = None) -> Tensor:
        """``(count, C)``: the projector rows' ``(M, P, C)`` values mapped to the image tokens, the rows placed in the
        tower's sequences after a [CLS] position where the model dropped one (the mapping that fits ``count``)."""
        if run_tokens is not None:
            flat = values[run_tokens].float()
            if flat.shape[0] != count:
                raise TokenpruneError(
                    f"pre_projector: the {self.adapter.name!r} tower's merge units are {flat.shape[0]} tokens, but the "
                    f"language model's input holds {count} image tokens"
                )
            return flat
        got: list[int | None] = []
        for offset in (1, 0) if self._tower is not None and self._tower.has_cls else (0,):
            padded = torch.cat([values.new_zeros(values.shape[0], offset, values.shape[-1]), values], 1)
            mapped = self.adapter.map_vision_patches(call, list(padded.unbind(0)))
            flat = None if mapped is None else torch.cat([m.float() for m in mapped]) if mapped else padded[0, :0]
            if flat is not None and flat.shape[0] == count:
                return flat
            got.append(None if flat is None else int(flat.shape[0]))
        raise TokenpruneError(
            f"pre_projector: the {self.adapter.name!r} adapter's map_vision_patches() gave {got} tokens for the "
            f"{count} image tokens of the language model's input"
        )

    def _stats(self, run: ProjectorRun, channels: Tensor, image: Tensor) -> list[StageStats]:
        """One :class:`StageStats` per stage, counted on the language model's image tokens of each sample."""
        out = []
        for i, plan in enumerate(self.all_plans):
            entering = image & (channels[..., i] > 0.5)
            leaving = image & (channels[..., i + 1] > 0.5)
            order = entering.long().cumsum(1) - 1
            kept = [order[b][leaving[b]].tolist() for b in range(image.shape[0])]
            out.append(
                StageStats(
                    stage=plan.index,
                    at=str(plan.stage.point),
                    reducer=plan.stage.reducer,
                    entering=entering.sum(1).tolist(),
                    leaving=leaving.sum(1).tolist(),
                    kept=kept,
                    layout=None,
                    seconds=run.seconds[i],
                    overhead_macs=run.macs[i],
                )
            )
        return out


def _packed_vision(
    plan: StagePlan, probe: VisionProbe, tower: VisionTower, capture: PackedUnitCapture, adapter: ModelAdapter
) -> tuple[Tensor, Tensor | None, Tensor | None, dict[int, Tensor], int]:
    """A packed tower's probe records as ``(M, W)`` rows of units: each unit the mean of its patches' values, as
    ``map_vision_patches`` maps them to the merged tokens (Qwen2.5-VL's window order undone there)."""
    request = plan.needs.vision_attention
    units = capture.units if capture is not None else None
    if request is None or units is None or capture is None:
        raise TokenpruneError(f"stage {plan.index} ({plan.stage.reducer}): the packed tower's call was not seen")
    call = ImageCall((), {"image_grid_thw": capture.grid}, None)
    index = units.rows

    def rows_of(values: list[Tensor]) -> Tensor:
        mapped = adapter.map_vision_patches(call, [v if v.dim() == 2 else v[:, None] for v in values])
        if mapped is None:
            raise TokenpruneError(f"pre_projector: the {adapter.name!r} adapter maps no tower patches")
        flat = torch.cat(mapped)
        out = flat[index.clamp(min=0)] * (index >= 0).unsqueeze(-1)
        return out if values[0].dim() == 2 else out[..., 0]

    def record(layer: int | None) -> Any:
        rec = probe.records.get(resolve_layer(tower, layer))
        if rec is None or request.kind not in rec.scores:
            raise TokenpruneError(
                f"stage {plan.index} ({plan.stage.reducer}): the vision probe recorded nothing for the merger's "
                "input; is the attention implementation overridden elsewhere?"
            )
        return rec

    rec = record(request.layer)
    keys = rows_of(rec.keys) if request.keys else None
    features = rows_of(rec.features) if request.features else None
    also = {at: rows_of(record(at).scores[request.kind]) for at in request.also_at}
    return rows_of(rec.scores[request.kind]), keys, features, also, rec.macs.get(request.kind, 0)


def _projector_run(x: Tensor, cut: TowerCut | None) -> ProjectorRun:
    """The run of one projector call, starting from what the ``vision_layer`` stages left (``cut``), if any."""
    if cut is None:
        rows, patches = int(x.shape[0]), int(x.shape[1])
        return ProjectorRun([torch.ones(rows, patches, dtype=torch.bool, device=x.device)], x.new_ones(rows, patches))
    _, keep, sizes = cut.expand(x)
    extra = keep.shape[1] - cut.patches
    masks = [torch.cat([keep[:, :extra], m], 1) for m in cut.masks]
    return ProjectorRun(masks, sizes.to(x.dtype), list(cut.seconds), list(cut.macs))


def _model_type(adapter: ModelAdapter) -> str:
    return str(getattr(getattr(adapter.model, "config", None), "model_type", adapter.name))


def _write_rows(
    x: Tensor, sizes: Tensor, selection: Selection, merged: Tensor, merged_sizes: Tensor
) -> tuple[Tensor, Tensor]:
    """Write a merge's ``(M, K, D)`` rows and sizes at its ``(M, K)`` roots of ``x`` (``(M, P, D)``)."""
    rows, patches, dim = x.shape
    cols = torch.where(selection.indices >= 0, selection.indices, torch.full_like(selection.indices, patches))
    padded = torch.cat([x, x.new_zeros(rows, 1, dim)], 1)
    padded = padded.scatter(1, cols.unsqueeze(-1).expand(-1, -1, dim), merged.to(x.dtype))
    padded_sizes = torch.cat([sizes, sizes.new_zeros(rows, 1)], 1).scatter(1, cols, merged_sizes.to(sizes.dtype))
    return padded[:, :patches], padded_sizes[:, :patches]


def _with_input(args: tuple[Any, ...], kwargs: dict[str, Any], x: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The projector call's ``(args, kwargs)`` with its first input (positional or keyword) replaced by ``x``."""
    return ((x, *args[1:]), kwargs) if args else ((), {**kwargs, next(iter(kwargs)): x})
