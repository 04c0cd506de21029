"""Contract checks for reducer authors: every built-in reducer passes :func:`check_reducer`.

:func:`check_reducer` runs every check below at each insertion point the reducer declares, on a
synthetic ragged batch (three samples with different token counts, row-end newline tokens
protected, attention and text inputs filled in when the reducer reads them):

* results pass the core validator (indices in range, unique, sorted, protected tokens kept, counts
  within the budget, exactly the budget for ``deterministic_count`` reducers, right dtype/device)
  for fractional and absolute budgets;
* keep-all is identity: a budget of every token keeps every token (for ``deterministic_count``
  reducers; an adaptive reducer treats the budget as a cap);
* determinism: the same input gives the same result;
* a batch gives each sample the same result as running it alone;
* inputs are not modified in place;
* random ragged batches (grid shapes, budgets, newline protection on or off) keep exactly the
  budget (at most, for adaptive reducers) and every protected token;
* bfloat16 tokens work;
* the declared :meth:`~tokenprune.TokenReducer.overhead_macs` equals what ``torch.utils.flop_counter``
  counts while ``reduce`` runs, so the analytic FLOPs include the reducer's own work exactly;
* bad input is rejected clearly: unknown params raise a pydantic ``ValidationError``, and NaN
  features either raise a ``ValueError`` (e.g. :class:`~tokenprune.errors.ReducerInputError`) or
  are ignored by a reducer that does not read feature values; never an obscure crash;
* at a ``decode`` insertion point, over the steps of a generation (:func:`check_decode_steps`): each step's
  result is valid, a new generation (step 0 again) gives what the first gave, and each sample gets, step by
  step, what it gets alone: a reducer that keeps state between steps (DyCoke's) keeps it per generation and
  per sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from tokenprune.budget import budget_per_sample
from tokenprune.layout import TokenLayout
from tokenprune.reducer import (
    BUILTIN_SIGNALS,
    InputEmbeddings,
    InsertionPoint,
    Merge,
    ReduceContext,
    Selection,
    TokenReducer,
    VisionAttentionRequest,
)
from tokenprune.validation import check_reduction, check_stage_budget

DEFAULT_GRIDS: tuple[tuple[int, int], ...] = ((3, 4), (2, 3), (4, 4))
"""Feature grids (rows, cols) of the synthetic samples; with newlines: 15, 8 and 20 tokens."""


class ReducerContractError(AssertionError):
    """A reducer broke the contract; the message names the reducer and the check."""


def make_reduce_inputs(
    *,
    grids: Sequence[tuple[int, int]] = DEFAULT_GRIDS,
    dim: int = 16,
    keep: float | int = 0.5,
    at: InsertionPoint | None = None,
    newlines: bool = True,
    protect_newlines: bool = True,
    attention_sources: Sequence[str] = ("last", "text", "visual", "all"),
    own_attention_sources: Sequence[str] = (),
    signals: Sequence[str] = (),
    channel_shapes: Mapping[str, tuple[int, ...]] | None = None,
    text_tokens: int = 5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    reducer: TokenReducer | None = None,
    vision: VisionAttentionRequest | None = None,
    step: int | None = None,
) -> tuple[Tensor, ReduceContext]:
    """A synthetic padded batch of visual tokens and its :class:`ReduceContext`.

    Sample ``b`` is a ``grids[b]`` feature grid in raster order, each row followed by a newline
    token when ``newlines``. Features are seeded Gaussian noise; attention maps (probe and own-layer
    sources) are softmaxes of seeded logits over each sample's valid tokens. The text tokens follow
    the visual ones in the sequence (``columns``); ``signals`` adds seeded ``keys`` (``text_keys``),
    a parameter-free RMS norm as ``final_norm``, per-text-row ``text_attention`` (each row a softmax
    over the visual tokens and one more key, so rows sum to less than 1) and seeded
    ``input_embeddings`` (the same visual and text tokens as the language model's input). The budget
    is ``reducer.stage_budget`` of ``keep`` when a ``reducer`` is given (as the engine computes it),
    else the default rule. ``vision`` fills ``vision_attention`` (a softmax of seeded logits over the
    tokens that are not newlines, ``-inf`` at newlines and padding, as the engine marks tokens built
    from no patch), ``vision_valid``, and seeded ``vision_features`` / ``vision_keys`` if it asks. A registered
    signal channel's name in ``signals`` (one that is not the engine's own) fills ``ctx.signals[name]`` with
    seeded values of shape ``(B, N, *channel_shapes[name])`` (default ``(B, N)``), zero at padding, as the engine
    serves a channel. ``step`` is ``ctx.step``, the decoding step of a ``decode`` stage (``None`` elsewhere).

    Returns:
        ``(tokens, ctx)``: ``(B, N, D)`` tokens (zero at padding) and the context.
    """
    at = at or InsertionPoint("post_projector")
    gen = torch.Generator().manual_seed(seed)
    tokens, valid, layout = _synthetic_grids(grids, dim, newlines, gen)
    b, n = valid.shape
    protected = layout.newline & valid if protect_newlines else torch.zeros_like(valid)
    attention = _seeded_attention(attention_sources, valid, gen)
    own = _seeded_attention(own_attention_sources, valid, gen)
    text = torch.randn(b, text_tokens, dim, generator=gen) if text_tokens else None
    budget = _budget(reducer, keep, valid, protected, layout)
    keys = torch.randn(b, n, dim, generator=gen) if "keys" in signals else None
    text_keys = torch.randn(b, text_tokens, dim, generator=gen) if "keys" in signals and text_tokens else None
    columns = torch.arange(n).expand(b, n).masked_fill(~valid, -1)
    text_columns = (valid.sum(1, keepdim=True) + torch.arange(text_tokens)) if text_tokens else None
    ctx = ReduceContext(
        at=at,
        budget=budget,
        valid=valid,
        protected=protected,
        sizes=valid.float(),
        layout=layout,
        attention=attention,
        text=text,
        text_valid=torch.ones(b, text_tokens, dtype=torch.bool) if text_tokens else None,
        keep=keep,
        own_attention=own,
        keys=keys,
        text_keys=text_keys,
        final_norm=_rms_norm if "final_norm" in signals else None,
        columns=columns,
        text_columns=text_columns,
        signals=_seeded_channels(signals, channel_shapes or {}, valid, gen),
        step=step,
    )
    if text_tokens and text_columns is not None:
        ctx = _text_signals(ctx, signals, gen, dim, text_columns)
    if vision is not None:
        ctx = _vision_signals(ctx, vision, gen, dim)
    return tokens.to(device=device, dtype=dtype), ctx.to(device)


def _budget(
    reducer: TokenReducer | None, keep: float | int, valid: Tensor, protected: Tensor, layout: TokenLayout
) -> Tensor:
    """``(B,)`` the stage's budget: ``reducer.stage_budget`` where given (checked, as the engine does), else the
    default rule."""
    if reducer is None:
        return budget_per_sample(keep, valid, protected)
    wanted = reducer.stage_budget(keep, valid, protected, layout)
    return check_stage_budget(wanted, valid, protected, who=f"reducer {reducer.name!r}")


def _seeded_channels(
    signals: Sequence[str], shapes: Mapping[str, tuple[int, ...]], valid: Tensor, gen: torch.Generator
) -> dict[str, Tensor]:
    """Seeded ``(B, N, *shape)`` values of each registered channel among ``signals``, zero at padding."""
    out = {}
    for name in sorted(set(signals) - BUILTIN_SIGNALS):
        shape = tuple(shapes.get(name, ()))
        values = torch.randn(*valid.shape, *shape, generator=gen)
        out[name] = values.masked_fill(~valid.view(*valid.shape, *([1] * len(shape))), 0.0)
    return out


def _synthetic_grids(
    grids: Sequence[tuple[int, int]], dim: int, newlines: bool, gen: torch.Generator
) -> tuple[Tensor, Tensor, TokenLayout]:
    """Seeded ``(B, N, D)`` tokens of the raster grids, zero-padded, their ``(B, N)`` validity and layout."""
    layouts = [TokenLayout.grid(r, c, newlines=newlines) for r, c in grids]
    counts = [lay.shape[1] for lay in layouts]
    b, n = len(grids), max(counts)
    tokens = torch.zeros(b, n, dim)
    valid = torch.zeros(b, n, dtype=torch.bool)
    fields = {name: torch.full((b, n), -1, dtype=torch.long) for name in ("image", "view", "row", "col")}
    newline = torch.zeros(b, n, dtype=torch.bool)
    for i, (lay, count) in enumerate(zip(layouts, counts, strict=True)):
        tokens[i, :count] = torch.randn(count, dim, generator=gen)
        valid[i, :count] = True
        for name, t in fields.items():
            t[i, :count] = getattr(lay, name)[0]
        newline[i, :count] = lay.newline[0]
    return tokens, valid, TokenLayout(**fields, newline=newline)


def _seeded_attention(sources: Sequence[str], valid: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
    """Per source, a seeded softmax over each sample's valid tokens (``(B, N)``, 0 at padding)."""
    attention: dict[str, Tensor] = {}
    for source in sources:
        logits = torch.randn(valid.shape, generator=gen).masked_fill(~valid, float("-inf"))
        attention[source] = logits.softmax(-1)
    return attention


def _text_signals(
    ctx: ReduceContext, signals: Sequence[str], gen: torch.Generator, dim: int, text_columns: Tensor
) -> ReduceContext:
    """``ctx`` with seeded ``text_attention`` and ``input_embeddings`` where ``signals`` asks for them."""
    b, n = ctx.valid.shape
    t = text_columns.shape[1]
    if "text_attention" in signals:
        logits = torch.randn(b, t, n + 1, generator=gen)
        logits[:, :, :n] = logits[:, :, :n].masked_fill(~ctx.valid[:, None, :], float("-inf"))
        ctx = replace(ctx, text_attention=logits.softmax(-1)[:, :, :n])
    if "input_embeddings" in signals:
        embeds = InputEmbeddings(
            visual=torch.randn(b, n, dim, generator=gen) * ctx.valid[..., None],
            visual_valid=ctx.valid.clone(),
            visual_columns=ctx.columns.clone() if ctx.columns is not None else torch.arange(n).expand(b, n),
            text=torch.randn(b, t, dim, generator=gen),
            text_columns=text_columns.clone(),
        )
        ctx = replace(ctx, input_embeddings=embeds)
    return ctx


def _vision_signals(
    ctx: ReduceContext, vision: VisionAttentionRequest, gen: torch.Generator, dim: int
) -> ReduceContext:
    """``ctx`` with seeded vision-encoder attention (and features, keys) on the tokens that are not newlines."""
    b, n = ctx.valid.shape
    patch = ctx.valid & ~(ctx.layout.newline if ctx.layout is not None else torch.zeros_like(ctx.valid))
    scores = torch.randn(b, n, generator=gen).masked_fill(~patch, float("-inf")).softmax(-1)
    features = torch.randn(b, n, dim, generator=gen).masked_fill(~patch[..., None], 0.0) if vision.features else None
    keys = torch.randn(b, n, 8, generator=gen).masked_fill(~patch[..., None], 0.0) if vision.keys else None
    also = {
        at: torch.randn(b, n, generator=gen).masked_fill(~patch, float("-inf")).softmax(-1) for at in vision.also_at
    }
    return replace(
        ctx,
        vision_attention=scores.masked_fill(~patch, float("-inf")),
        vision_valid=patch,
        vision_features=features,
        vision_keys=keys,
        vision_attention_at={at: s.masked_fill(~patch, float("-inf")) for at, s in also.items()},
    )


def _rms_norm(x: Tensor) -> Tensor:
    """A parameter-free RMS norm, the synthetic ``final_norm``."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


def dense_context(
    n: int,
    budget: int | Sequence[int],
    *,
    at: InsertionPoint | None = None,
    protected: Tensor | None = None,
    sizes: Tensor | None = None,
    layout: TokenLayout | None = None,
    attention: Mapping[str, Tensor] | None = None,
) -> ReduceContext:
    """A context for a batch without padding: ``len(budget)`` samples (1 for an int) of ``n`` valid tokens.

    For hand-computed reducer tests; ``protected`` defaults to none, ``sizes`` to ones, ``at`` to
    ``post_projector``.
    """
    budgets = [budget] if isinstance(budget, int) else list(budget)
    valid = torch.ones(len(budgets), n, dtype=torch.bool)
    return ReduceContext(
        at=at or InsertionPoint("post_projector"),
        budget=torch.tensor(budgets),
        valid=valid,
        protected=torch.zeros_like(valid) if protected is None else protected,
        sizes=valid.float() if sizes is None else sizes,
        layout=layout,
        attention=dict(attention or {}),
    )


def check_reducer(
    reducer_cls: type[TokenReducer],
    params: Mapping[str, Any] | None = None,
    *,
    device: torch.device | str = "cpu",
    dim: int = 16,
    channel_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Run every contract check on ``reducer_cls`` (see the module docstring).

    ``channel_shapes``: the per-column shape of each registered signal channel the reducer reads (as its
    :class:`~tokenprune.channels.SignalChannel` declares it; default ``()``, one number per token).

    Raises:
        ReducerContractError: naming the reducer and the first check that failed.
    """
    check_params_reject_unknown(reducer_cls)
    for kind in sorted(reducer_cls.capabilities.insertion_points):
        at = InsertionPoint(kind) if kind in ("pre_projector", "post_projector") else InsertionPoint(kind, 2)
        reducer = reducer_cls(params or {})
        common: dict[str, Any] = {"at": at, "device": device, "dim": dim, "channel_shapes": channel_shapes}
        for keep in (0.5, 0.25, 1, 3, 1.0):
            check_valid_result(reducer, keep=keep, **common)
        if reducer_cls.capabilities.deterministic_count:  # adaptive reducers treat the budget as a cap only
            check_keep_all_is_identity(reducer, **common)
        check_deterministic(reducer, **common)
        check_batch_matches_single(reducer, **common)
        check_inputs_unchanged(reducer, **common)
        check_valid_result(reducer, keep=0.5, dtype=torch.bfloat16, **common)
        check_valid_result(reducer, keep=0.5, protect_newlines=False, **common)
        check_nan_input(reducer, **common)
        for keep in (0.5, 0.1):
            check_overhead_is_counted(reducer, keep=keep, **common)
        check_random_budgets(reducer, **common)
        if kind == "decode":
            check_decode_steps(reducer, **common)


def check_decode_steps(reducer: TokenReducer, *, steps: int = 4, **kwargs: Any) -> None:
    """A ``decode`` reducer over the steps of two generations (step ``0, 1, ...`` on inputs seeded per step).

    Each step's result must be valid; the second generation must give what the first gave (state from an earlier
    generation is forgotten at step 0); each sample, run alone through the same steps by a fresh instance, must get
    what it gets in the batch at every step (state is kept per sample).
    """
    grids = kwargs.pop("grids", DEFAULT_GRIDS)
    inputs = [_inputs_for(reducer, grids=grids, seed=s, step=s, **kwargs) for s in range(steps)]
    generations = [[_signature(_run(reducer, tokens, ctx), ctx) for tokens, ctx in inputs] for _ in range(2)]
    if generations[0] != generations[1]:
        raise ReducerContractError(
            f"{reducer.name}: a second generation (steps 0 to {steps - 1} on the same inputs) kept {generations[1]} "
            f"but the first kept {generations[0]}; forget a generation's state at step 0"
        )
    for i in range(len(grids)):
        alone = type(reducer)(reducer.params)
        for s, (tokens, ctx) in enumerate(inputs):
            one = ctx.sample(i)
            kept = _signature(alone.reduce(tokens[i : i + 1, : int(one.valid.shape[1])], one), one)[0]
            if kept != generations[0][s][i]:
                raise ReducerContractError(
                    f"{reducer.name}: at decoding step {s}, sample {i} keeps {generations[0][s][i]} in a batch but "
                    f"{kept} alone; keep a reducer's state per sample"
                )


def check_params_reject_unknown(reducer_cls: type[TokenReducer]) -> None:
    """``Params`` must reject a field it does not define."""
    try:
        reducer_cls({"__not_a_parameter__": 1})
    except ValidationError:
        return
    raise ReducerContractError(
        f"{reducer_cls.name}: Params accepted an unknown field; subclass tokenprune.ReducerParams"
    )


def check_valid_result(reducer: TokenReducer, **kwargs: Any) -> Selection:
    """The result passes the core validator; returns the kept tokens."""
    tokens, ctx = _inputs_for(reducer, **kwargs)
    return _run(reducer, tokens, ctx)


def check_keep_all_is_identity(reducer: TokenReducer, **kwargs: Any) -> None:
    """A budget of every token keeps every token, unmerged."""
    tokens, ctx = _inputs_for(reducer, keep=1.0, **kwargs)
    result = reducer.reduce(tokens, ctx)
    selection = _validate(reducer, result, tokens, ctx)
    if selection.to_mask(ctx.valid.shape[1]).tolist() != ctx.valid.tolist():
        raise ReducerContractError(f"{reducer.name}: keep 1.0 did not keep every token ({selection.counts.tolist()})")
    if isinstance(result, Merge) and not bool((result.roots | ~ctx.valid).all()):
        raise ReducerContractError(f"{reducer.name}: keep 1.0 merged tokens")


def check_deterministic(reducer: TokenReducer, **kwargs: Any) -> None:
    """The same input gives the same result."""
    tokens, ctx = _inputs_for(reducer, **kwargs)
    first, second = (_signature(reducer.reduce(tokens, ctx), ctx) for _ in range(2))
    if first != second:
        raise ReducerContractError(f"{reducer.name}: two calls on the same input gave different results")


def check_batch_matches_single(reducer: TokenReducer, **kwargs: Any) -> None:
    """Each sample of a ragged batch gets what it gets alone."""
    grids = kwargs.pop("grids", DEFAULT_GRIDS)
    tokens, ctx = _inputs_for(reducer, grids=grids, **kwargs)
    batched = _signature(reducer.reduce(tokens, ctx), ctx)
    for i in range(len(grids)):
        alone_ctx = ctx.sample(i)
        alone_tokens = tokens[i : i + 1, : int(alone_ctx.valid.shape[1])]
        alone = _signature(reducer.reduce(alone_tokens, alone_ctx), alone_ctx)
        if alone[0] != batched[i]:
            raise ReducerContractError(
                f"{reducer.name}: sample {i} keeps {batched[i]} in a batch but {alone[0]} alone; results must not "
                "depend on the other samples or on padding"
            )


def check_inputs_unchanged(reducer: TokenReducer, **kwargs: Any) -> None:
    """``reduce`` must not modify its inputs in place."""
    tokens, ctx = _inputs_for(reducer, **kwargs)
    maps = {**{("a", k): v for k, v in ctx.attention.items()}, **{("o", k): v for k, v in ctx.own_attention.items()}}
    for name in ("keys", "text", "text_keys", "text_attention", "vision_attention", "vision_features", "vision_keys"):
        if getattr(ctx, name) is not None:
            maps[("t", name)] = getattr(ctx, name)
    before = (tokens.clone(), ctx.sizes.clone(), {k: v.clone() for k, v in maps.items()})
    reducer.reduce(tokens, ctx)
    changed = not torch.equal(tokens, before[0]) or not torch.equal(ctx.sizes, before[1])
    changed = changed or any(not torch.equal(maps[k], v) for k, v in before[2].items())
    if changed:
        raise ReducerContractError(f"{reducer.name}: reduce() modified its inputs in place")


def check_random_budgets(reducer: TokenReducer, *, seeds: Sequence[int] = range(8), **kwargs: Any) -> None:
    """Random ragged batches: the result is valid, keeps its budget and every protected token."""
    import random

    for seed in seeds:
        rng = random.Random(seed)
        grids = [(rng.randint(1, 5), rng.randint(1, 6)) for _ in range(rng.randint(1, 3))]
        keep = rng.choice([rng.uniform(0.01, 1.0), rng.randint(1, 40)])
        tokens, ctx = _inputs_for(
            reducer,
            grids=grids,
            keep=keep,
            protect_newlines=rng.random() < 0.5,
            newlines=rng.random() < 0.7,
            seed=seed,
            **kwargs,
        )
        selection = _run(reducer, tokens, ctx)  # the validator checks budgets and protected tokens
        if reducer.capabilities.deterministic_count and selection.counts.tolist() != ctx.budget.tolist():
            raise ReducerContractError(
                f"{reducer.name}: seed {seed} kept {selection.counts.tolist()} tokens for budgets {ctx.budget.tolist()}"
            )


def check_overhead_is_counted(reducer: TokenReducer, **kwargs: Any) -> None:
    """``overhead_macs`` equals the multiply-accumulates torch's FLOP counter sees in ``reduce``."""
    from tokenprune.cost.counters import flops_to_macs, torch_flops

    tokens, ctx = _inputs_for(reducer, **kwargs)
    count, _ = torch_flops(reducer.reduce, tokens, ctx)
    declared = reducer.overhead_macs(tokens, ctx)
    if declared != flops_to_macs(count.flops):
        raise ReducerContractError(
            f"{reducer.name}: overhead_macs() declares {declared:,} MACs but reduce() performed "
            f"{flops_to_macs(count.flops):,} (torch.utils.flop_counter); make them agree"
        )


def check_nan_input(reducer: TokenReducer, **kwargs: Any) -> None:
    """NaN features raise a ``ValueError`` or are ignored; no other exception escapes."""
    tokens, ctx = _inputs_for(reducer, **kwargs)
    tokens = tokens.clone()
    tokens[0, 0] = float("nan")
    try:
        result = reducer.reduce(tokens, ctx)
    except ValueError:
        return
    except Exception as exc:
        raise ReducerContractError(
            f"{reducer.name}: NaN features raised {type(exc).__name__}: {exc}; raise tokenprune.ReducerInputError "
            "(a ValueError) with a clear message instead"
        ) from exc
    _validate(reducer, result, tokens, ctx)


# --- machinery -------------------------------------------------------------------------------------


def _inputs_for(reducer: TokenReducer, **kwargs: Any) -> tuple[Tensor, ReduceContext]:
    needs = reducer.needs()  # the one declaration of what the reducer reads
    kwargs.setdefault("attention_sources", tuple(needs.attention))
    kwargs.setdefault("own_attention_sources", tuple(needs.own_attention))
    kwargs.setdefault("signals", tuple(needs.signals))
    kwargs.setdefault("text_tokens", 5 if needs.text else 0)
    kwargs.setdefault("vision", needs.vision_attention)
    return make_reduce_inputs(reducer=reducer, **kwargs)


def _validate(reducer: TokenReducer, result: object, tokens: Tensor, ctx: ReduceContext) -> Selection:
    try:
        return check_reduction(result, tokens, ctx, who=f"reducer {reducer.name!r}", capabilities=reducer.capabilities)
    except Exception as exc:
        raise ReducerContractError(str(exc)) from exc


def _run(reducer: TokenReducer, tokens: Tensor, ctx: ReduceContext) -> Selection:
    return _validate(reducer, reducer.reduce(tokens, ctx), tokens, ctx)


def _signature(result: Selection | Merge, ctx: ReduceContext) -> list[Any]:
    """Per sample: the kept indices, and for a merge the destinations of the valid tokens."""
    if isinstance(result, Merge):
        dest = result.destination
        return [dest[i, : int(c)].tolist() for i, c in enumerate(ctx.num_valid)]
    return result.tolist()
