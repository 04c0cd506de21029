"""Running one pipeline stage: a pure function from the sequence and its hidden states to the kept ones."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from tokenprune.engine import positions as P
from tokenprune.engine.run_stats import StageStats
from tokenprune.engine.sequence import TokenSequence, gather_kept_rows, gather_tokens, right_aligned_columns
from tokenprune.engine.vision_probe import VisionSignal
from tokenprune.errors import TokenpruneError
from tokenprune.layout import TokenLayout
from tokenprune.pipeline import Stage
from tokenprune.reducer import InputEmbeddings, Merge, ReduceContext, Requirements, Selection, TokenReducer
from tokenprune.validation import check_reduction, check_stage_budget


@dataclass(frozen=True)
class StagePlan:
    """One stage of the applied pipeline, with its reducer built.

    Attributes:
        index: The stage's index in the pipeline.
        stage: The validated stage.
        reducer: Its reducer instance.
        who: How errors name the reducer's plugin (``'fastv' from tokenprune 0.1.0``).
        needs: What the reducer reads (:meth:`~tokenprune.TokenReducer.needs`), worked out once here;
            the engine's install plan and the FLOP count read it.
    """

    index: int
    stage: Stage
    reducer: TokenReducer
    who: str
    needs: Requirements = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.needs is None:
            object.__setattr__(self, "needs", self.reducer.needs())

    def budget(self, valid: Tensor, protected: Tensor, layout: TokenLayout | None) -> Tensor:
        """``(B,)`` long: the reducer's :meth:`~tokenprune.TokenReducer.stage_budget` for this stage's ``keep``
        over the ``(B, N)`` ``valid`` and ``protected`` tokens, checked (:func:`check_stage_budget`)."""
        budget = self.reducer.stage_budget(self.stage.keep, valid, protected, layout)
        return check_stage_budget(budget, valid, protected, who=self.who)

    def tower_context(self, valid: Tensor, sizes: Tensor, layout: TokenLayout | None) -> ReduceContext:
        """This stage's context on a vision tower's rows (``vision_layer`` and ``pre_projector`` stages).

        Args:
            valid: ``(R, P)`` bool, the rows' tokens still there.
            sizes: ``(R, P)`` patches each token stands for.
            layout: The tokens' grid, if known.

        Nothing is protected, and column ``j`` of every row is the row's token ``j``.
        """
        rows, patches = valid.shape
        protected = torch.zeros_like(valid)
        return ReduceContext(
            at=self.stage.point,
            budget=self.budget(valid, protected, layout),
            valid=valid,
            protected=protected,
            sizes=sizes,
            layout=layout,
            stage_index=self.index,
            keep=self.stage.keep,
            columns=torch.arange(patches, device=valid.device).expand(rows, -1),
        )


def plans_by_layer(plans: list[StagePlan]) -> dict[int, list[StagePlan]]:
    """The ``layer: k`` stages grouped by ``k``, each group in pipeline order."""
    out: dict[int, list[StagePlan]] = {}
    for p in plans:
        if p.stage.point.kind == "layer":
            out.setdefault(int(p.stage.point.layer), []).append(p)  # type: ignore[arg-type]
    return out


def own_attention_layers(layer_plans: dict[int, list[StagePlan]]) -> dict[int, frozenset[str]]:
    """Decoder layer ``k`` -> the own-attention sources the stages at ``layer: k`` read (only where any)."""
    own: dict[int, frozenset[str]] = {}
    for k, plans in layer_plans.items():
        sources = frozenset().union(*(p.needs.own_attention for p in plans))
        if sources:
            own[k] = sources
    return own


def key_layers(layer_plans: dict[int, list[StagePlan]]) -> frozenset[int]:
    """Decoder layers ``k - 1`` whose keys the stages at ``layer: k`` read."""
    return frozenset(k - 1 for k, plans in layer_plans.items() if any("keys" in p.needs.signals for p in plans))


def text_attention_layers(layer_plans: dict[int, list[StagePlan]]) -> frozenset[int]:
    """Decoder layers ``k - 1`` whose per-text-row attention the stages at ``layer: k`` read."""
    return frozenset(
        k - 1 for k, plans in layer_plans.items() if any("text_attention" in p.needs.signals for p in plans)
    )


@dataclass
class StageSignals:
    """Layer-stage inputs beyond the hidden states and the probe's attention, per column of the sequence.

    Attributes:
        own_attention: Per source, ``(B, L)`` attention of the stage's own layer on its input.
        keys: ``(B, L, Dk)`` keys of layer ``k - 1``.
        final_norm: The language model's final norm.
        seconds: Time the engine spent computing them for this stage (added to the stage's time).
        text_attention: ``(B, T, L)`` per-text-row attention of layer ``k - 1`` to each column
            (:attr:`tokenprune.engine.probe.AttentionProbe.text_scores`, followed to the current columns).
        input_embeds: ``(B, L0, D)`` the language model's input embeddings.
        input_sequence: Their :class:`TokenSequence`.
        vision: The vision-encoder attention (and features, keys) per column, for a ``post_projector`` stage
            that asks for it; its ``macs`` are added to the stage's overhead.
    """

    own_attention: Mapping[str, Tensor] | None = None
    keys: Tensor | None = None
    final_norm: Callable[[Tensor], Tensor] | None = None
    seconds: float = 0.0
    text_attention: Tensor | None = None
    input_embeds: Tensor | None = None
    input_sequence: TokenSequence | None = None
    vision: VisionSignal | None = None


def probed_layers(layer_plans: dict[int, list[StagePlan]]) -> dict[int, frozenset[str]]:
    """Decoder layer ``k - 1`` -> the attention-probe sources the stages at ``layer: k`` read (only where any)."""
    probed: dict[int, frozenset[str]] = {}
    for k, plans in layer_plans.items():
        sources = frozenset().union(*(p.needs.attention for p in plans))
        if sources:
            probed[k - 1] = sources
    return probed


@dataclass
class StageOutcome:
    """What :func:`run_stage` returns.

    Attributes:
        hidden: ``(B, L', D)`` hidden states of the kept tokens (``L' = L`` if nothing changed).
        sequence: The kept tokens' :class:`TokenSequence`.
        changed: Whether any token was dropped or merged.
        kept_columns: ``(B, L')`` columns of the input that were kept (``-1``: padding slot).
        stats: The stage's statistics for this forward.
    """

    hidden: Tensor
    sequence: TokenSequence
    changed: bool
    kept_columns: Tensor
    stats: StageStats


def run_stage(
    plan: StagePlan,
    hidden: Tensor,
    seq: TokenSequence,
    attention: Mapping[str, Tensor] | None,
    *,
    compact_positions: bool,
    protect_newlines: bool,
    signals: StageSignals | None = None,
) -> StageOutcome:
    """Run ``plan``'s reducer on the visual tokens of ``hidden`` (``(B, L, D)``) and keep what it keeps.

    Args:
        plan: The stage.
        hidden: The hidden states at the stage's insertion point.
        seq: Where each column of ``hidden`` came from.
        attention: Per probe source, ``(B, L)`` attention paid to each column (layer stages that read it).
        compact_positions: Renumber the kept tokens' positions (the ``compact`` policy).
        protect_newlines: Layout newline tokens always survive.
        signals: The other layer-stage inputs the reducer asked for.

    Raises:
        ReducerOutputError: the reducer returned an invalid selection or merge.
    """
    signals = signals or StageSignals()
    if not bool(stage_tokens(plan, seq).any()):  # e.g. `tokens: video` on a prompt without a video
        return _nothing_to_reduce(plan, hidden, seq)
    tokens, ctx, vis_idx = stage_context(plan, hidden, seq, attention, protect_newlines, signals)
    capabilities = type(plan.reducer).capabilities
    start = time.perf_counter()
    result = plan.reducer.reduce(tokens, ctx)
    selection = check_reduction(result, tokens, ctx, who=plan.who, capabilities=capabilities)
    merged = merged_sizes = None
    if isinstance(result, Merge):
        merged, merged_sizes, selection = result.apply(tokens, ctx.sizes, ctx.valid)
    seconds = time.perf_counter() - start + signals.seconds
    macs = plan.reducer.overhead_macs(tokens, ctx) + (signals.vision.macs if signals.vision else 0)
    stats = selection_stats(plan, selection, ctx.valid, ctx.layout, seconds, macs)
    batch, length = hidden.shape[:2]
    kept_visual = selection.to_mask(int(vis_idx.shape[1])) & ctx.valid
    sizes, channels = seq.sizes, seq.channels
    if merged is not None:
        channels = _merged_channels(seq, result, ctx, vis_idx, selection.indices)  # type: ignore[arg-type]
        hidden, sizes = _write_merged(hidden, sizes, vis_idx, selection.indices, merged, merged_sizes)
    if merged is None and bool((kept_visual == ctx.valid).all()):
        unchanged = torch.arange(length, device=hidden.device).expand(batch, -1)
        return StageOutcome(hidden, seq, False, unchanged, stats)
    keep = _keep_mask(seq, stage_tokens(plan, seq), vis_idx, kept_visual, ctx.valid)
    idx = right_aligned_columns(keep)
    new = replace(seq, sizes=sizes, channels=channels).gather(idx)
    if compact_positions:
        new.positions, freed = P.compact(seq.positions, idx, seq.input_column >= 0)
        new.freed_positions = seq.freed_positions + freed
    return StageOutcome(gather_kept_rows(hidden, idx), new, True, idx, stats)


def selection_stats(
    plan: StagePlan, selection: Selection, valid: Tensor, layout: TokenLayout | None, seconds: float, macs: int
) -> StageStats:
    """A stage's :class:`StageStats` from its checked ``selection`` of the ``(B, N)`` ``valid`` tokens.

    One host read for the counts, one for the kept indices.
    """
    entering, leaving = torch.stack([valid.sum(1), selection.counts.long()]).tolist()
    return StageStats(
        stage=plan.index,
        at=str(plan.stage.point),
        reducer=plan.stage.reducer,
        entering=entering,
        leaving=leaving,
        kept=[row[:c] for row, c in zip(selection.indices.tolist(), leaving, strict=True)],
        layout=layout,
        seconds=seconds,
        overhead_macs=macs,
    )


def _nothing_to_reduce(plan: StagePlan, hidden: Tensor, seq: TokenSequence) -> StageOutcome:
    """The unchanged outcome of a stage none of whose tokens is in the batch."""
    batch, length = int(hidden.shape[0]), int(hidden.shape[1])
    stats = StageStats(
        stage=plan.index,
        at=str(plan.stage.point),
        reducer=plan.stage.reducer,
        entering=[0] * batch,
        leaving=[0] * batch,
        kept=[[] for _ in range(batch)],
        layout=None,
        seconds=0.0,
        overhead_macs=0,
    )
    unchanged = torch.arange(length, device=hidden.device).expand(batch, -1)
    return StageOutcome(hidden, seq, False, unchanged, stats)


def stage_context(
    plan: StagePlan,
    hidden: Tensor,
    seq: TokenSequence,
    attention: Mapping[str, Tensor] | None,
    protect_newlines: bool,
    signals: StageSignals,
) -> tuple[Tensor, ReduceContext, Tensor]:
    """The visual tokens ``(B, N, D)``, the reducer's context, and their ``(B, N)`` columns (``-1``: none).

    Where every sample's visual tokens fill the same block of columns (one image per prompt at the
    same place: the usual case), the tokens are a view of ``hidden``, not a copy; reducers read them.
    """
    vis_idx, block = visual_columns(stage_tokens(plan, seq))
    valid = vis_idx >= 0
    safe = vis_idx.clamp(min=0)
    tokens = hidden[:, block] if block is not None else _rows(hidden, vis_idx)
    layout = seq.layout.gather(vis_idx) if seq.layout is not None else None
    protected = layout.newline & valid if layout is not None and protect_newlines else torch.zeros_like(valid)
    text = text_valid = text_idx = text_keys = None
    if plan.needs.text:
        text_idx = Selection.from_mask(seq.valid & ~seq.visual).indices
        text_valid = text_idx >= 0
        text = _rows(hidden, text_idx)
        text_keys = _rows(signals.keys, text_idx) if signals.keys is not None else None
    own = signals.own_attention or {}
    ctx = ReduceContext(
        at=plan.stage.point,
        budget=plan.budget(valid, protected, layout),
        valid=valid,
        protected=protected,
        sizes=seq.sizes.gather(1, safe).masked_fill(~valid, 1.0),
        layout=layout,
        attention={s: a.gather(1, safe).masked_fill(~valid, 0.0) for s, a in (attention or {}).items()},
        text=text,
        text_valid=text_valid,
        stage_index=plan.index,
        keep=plan.stage.keep,
        own_attention={s: a.gather(1, safe).masked_fill(~valid, 0.0) for s, a in own.items()},
        keys=_rows(signals.keys, vis_idx) if signals.keys is not None else None,
        text_keys=text_keys,
        final_norm=signals.final_norm,
        columns=vis_idx,
        text_columns=text_idx,
    )
    wanted = plan.needs.channels
    if wanted:
        ctx = replace(ctx, signals=channel_signals(plan, seq, wanted, vis_idx))
    if text_idx is not None:
        ctx = _context_with_text_signals(ctx, signals, seq, text_idx, vis_idx)
    if signals.vision is not None:
        ctx = _context_with_vision(ctx, signals.vision, vis_idx)
    return tokens, ctx, vis_idx


def visual_columns(mask: Tensor) -> tuple[Tensor, slice | None]:
    """The ``(B, N)`` columns of ``mask``'s ``True`` entries (``-1`` after a sample's last), and the block
    ``slice`` they fill where every sample's are the same run of adjacent columns; one host read.
    """
    batch, length = mask.shape
    if batch == 0:
        return Selection.from_mask(mask).indices, None
    counts = mask.sum(1)
    first = mask.int().argmax(1)
    last = length - 1 - mask.flip(1).int().argmax(1)
    most, fewest, start, other_start, end = torch.stack(
        [counts.max(), counts.min(), first.max(), first.min(), last.max()]
    ).tolist()
    if most == fewest and start == other_start and end - start + 1 == most:
        columns = torch.arange(start, start + most, device=mask.device).expand(batch, most)
        return columns, slice(start, start + most)
    return Selection.from_mask(mask, most=most).indices, None


def channel_signals(plan: StagePlan, seq: TokenSequence, names: frozenset[str], vis_idx: Tensor) -> dict[str, Tensor]:
    """The signal channels ``names`` at the stage's visual tokens: ``(B, N, *shape)``, ``0`` at padding.

    Raises:
        TokenpruneError: a channel the reducer reads was not produced for this sequence.
    """
    missing = sorted(names - set(seq.channels))
    if missing:
        raise TokenpruneError(
            f"stage {plan.index} ({plan.who}) reads the signal channel(s) {missing}, which were not produced for "
            "this forward; is the channel registered at a layer after this stage?"
        )
    pad = vis_idx < 0
    out = {}
    for name in sorted(names):
        values = gather_tokens(seq.channels[name], vis_idx)
        out[name] = values.masked_fill(pad.view(*pad.shape, *([1] * (values.dim() - 2))), 0)
    return out


def _context_with_vision(ctx: ReduceContext, vision: VisionSignal, vis_idx: Tensor) -> ReduceContext:
    """``ctx`` with the vision signal at its visual tokens (``-inf`` scores where no patch or padding)."""
    valid = _rows(vision.valid, vis_idx) & ctx.valid

    def scores(per_column: Tensor) -> Tensor:
        return _rows(per_column, vis_idx).masked_fill(~valid, float("-inf"))

    def rows(per_column: Tensor | None) -> Tensor | None:
        return None if per_column is None else _rows(per_column, vis_idx).masked_fill(~valid[..., None], 0.0)

    return replace(
        ctx,
        vision_attention=scores(vision.scores),
        vision_valid=valid,
        vision_features=rows(vision.features),
        vision_keys=rows(vision.keys),
        vision_attention_at={layer: scores(s) for layer, s in vision.also.items()},
    )


def _context_with_text_signals(
    ctx: ReduceContext, signals: StageSignals, seq: TokenSequence, text_idx: Tensor, vis_idx: Tensor
) -> ReduceContext:
    """``ctx`` with ``text_attention`` and ``input_embeddings`` from ``signals`` (where given)."""
    text_valid, valid = text_idx >= 0, vis_idx >= 0
    text_attention = input_embeddings = None
    if signals.text_attention is not None:
        ta = signals.text_attention[:, : text_idx.shape[1]]
        ta = ta.gather(2, vis_idx.clamp(min=0)[:, None, :].expand(-1, ta.shape[1], -1))
        text_attention = ta.masked_fill(~valid[:, None, :] | ~text_valid[..., None], 0.0)
    if signals.input_embeds is not None and signals.input_sequence is not None:
        first = signals.input_sequence
        in_vis = Selection.from_mask(first.visual & first.valid).indices
        lm_text = seq.lm_column.gather(1, text_idx.clamp(min=0)).masked_fill(~text_valid, -1)
        input_embeddings = InputEmbeddings(
            visual=_rows(signals.input_embeds, in_vis),
            visual_valid=in_vis >= 0,
            visual_columns=in_vis,
            text=_rows(signals.input_embeds, lm_text),
            text_columns=lm_text,
        )
    return replace(ctx, text_attention=text_attention, input_embeddings=input_embeddings)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` for a ``(B, L, D)`` tensor and ``(B, M)`` columns (``-1``: arbitrary values)."""
    return gather_tokens(x, index)


def stage_tokens(plan: StagePlan, seq: TokenSequence) -> Tensor:
    """``(B, L)``: the tokens of ``seq`` that ``plan``'s stage reduces (its ``tokens``: all visual, image or video)."""
    which = getattr(plan.stage, "tokens", "all")
    if which == "all" or (seq.video is None and which == "image"):
        return seq.visual
    video = seq.video if seq.video is not None else torch.zeros_like(seq.visual)
    return seq.visual & (video if which == "video" else ~video)


def _keep_mask(
    seq: TokenSequence, reduced: Tensor, vis_idx: Tensor, kept_visual: Tensor, valid_visual: Tensor
) -> Tensor:
    """``(B, L)``: every token the stage does not reduce (``reduced``), and the kept ones it does."""
    batch, length = seq.valid.shape
    cols = torch.where(valid_visual, vis_idx, torch.full_like(vis_idx, length))  # invalid -> a dummy column
    keep = torch.zeros(batch, length + 1, dtype=torch.bool, device=seq.valid.device)
    keep[:, :length] = seq.valid & ~reduced
    keep.scatter_(1, cols, kept_visual)
    return keep[:, :length]


def _write_merged(
    hidden: Tensor, sizes: Tensor, vis_idx: Tensor, roots: Tensor, merged: Tensor, merged_sizes: Tensor
) -> tuple[Tensor, Tensor]:
    """Write a merge's ``(B, M, D)`` tokens and sizes into the columns of its ``(B, M)`` root tokens."""
    batch, length, dim = hidden.shape
    dummy = torch.full_like(roots, length)
    root_cols = torch.where(roots >= 0, vis_idx.gather(1, roots.clamp(min=0)), dummy)
    padded = torch.cat([hidden, hidden.new_zeros(batch, 1, dim)], 1)
    padded = padded.scatter(1, root_cols.unsqueeze(-1).expand(-1, -1, dim), merged.to(hidden.dtype))
    padded_sizes = torch.cat([sizes, sizes.new_zeros(batch, 1)], 1)
    padded_sizes = padded_sizes.scatter(1, root_cols, merged_sizes.to(sizes.dtype))
    return padded[:, :length], padded_sizes[:, :length]


def _merged_channels(
    seq: TokenSequence, merge: Merge, ctx: ReduceContext, vis_idx: Tensor, roots: Tensor
) -> dict[str, Tensor]:
    """The sequence's channels with those of :attr:`~TokenSequence.mean_channels` merged like the tokens: each merged
    token gets the size-weighted mean of its group's values (the same weights as its hidden state)."""
    out = dict(seq.channels)
    for name in seq.mean_channels & set(out):
        values = out[name]
        rows = values.reshape(*values.shape[:2], -1)  # (B, L, prod(shape))
        merged, merged_sizes, _ = merge.apply(_rows(rows, vis_idx), ctx.sizes, ctx.valid)
        written, _ = _write_merged(rows, seq.sizes, vis_idx, roots, merged, merged_sizes)
        out[name] = written.reshape(values.shape)
    return out
