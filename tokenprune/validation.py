"""Check what a reducer returned against the contract of :mod:`tokenprune.reducer`.

The engine calls :func:`check_reduction` on every result, so a faulty plugin fails with a message
naming it and the defect instead of corrupting a model's sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from tokenprune.errors import ReducerInputError, ReducerOutputError
from tokenprune.reducer import Capabilities, Merge, ReduceContext, Selection


def check_reduction(
    result: object,
    tokens: Tensor,
    ctx: ReduceContext,
    *,
    who: str,
    capabilities: Capabilities,
) -> Selection:
    """Validate ``result`` and return the kept tokens as a :class:`Selection`.

    Args:
        result: What ``reducer.reduce(tokens, ctx)`` returned.
        tokens: The ``(B, N, D)`` tokens the reducer was given.
        ctx: The context it was given.
        who: Names the reducer in messages, e.g. ``"reducer 'fastv' (plugin 'fastv', distribution
            tokenprune 0.1.0)"``.
        capabilities: The reducer's declaration (merges allowed, deterministic count).

    Raises:
        ReducerOutputError: naming ``who`` and the first defect found.
    """
    if isinstance(result, Merge):
        fail = _failure(who, "merge")
        if not capabilities.merges:
            raise fail("it returned a Merge but does not declare Capabilities(merges=True)")
        _check_merge(result, ctx, tokens.device, fail)
        selection = result.selection(ctx.valid)
    elif isinstance(result, Selection):
        fail = _failure(who, "selection")
        selection = result
        _check_selection(selection, ctx, tokens.device, fail)
    else:
        raise ReducerOutputError(
            f"{who} returned {type(result).__name__}; reduce() must return a tokenprune.Selection or tokenprune.Merge"
        )
    _check_budget(selection, ctx, capabilities, fail)
    return selection


def check_stage_budget(budget: object, valid: Tensor, protected: Tensor, *, who: str) -> Tensor:
    """Validate what a reducer's :meth:`~tokenprune.TokenReducer.stage_budget` returned; returns it.

    Args:
        budget: The returned budget.
        valid: ``(B, N)`` bool, the real tokens.
        protected: ``(B, N)`` bool, the protected tokens.
        who: Names the reducer in messages.

    Raises:
        ReducerOutputError: not a ``(B,)`` long tensor on the tokens' device, or a sample's budget
            below its protected tokens or above its valid tokens.
    """
    fail = _failure(who, "budget from stage_budget()")
    _check_tensor(budget, (int(valid.shape[0]),), valid.device, "budget", fail)
    if not isinstance(budget, Tensor):  # _check_tensor raised already; narrows the type
        raise fail("budget is not a tensor")
    low, high = (protected & valid).sum(1), valid.sum(1)
    if (at := _first((budget < low).unsqueeze(1))) is not None:
        s = at[0]
        raise fail(f"sample {s} gets {int(budget[s])} tokens, under its {int(low[s])} protected tokens")
    if (at := _first((budget > high).unsqueeze(1))) is not None:
        s = at[0]
        raise fail(f"sample {s} gets {int(budget[s])} tokens, over its {int(high[s])} valid tokens")
    return budget


Fail = Callable[[str], ReducerOutputError]


def _failure(who: str, kind: str) -> Fail:
    def fail(defect: str) -> ReducerOutputError:
        return ReducerOutputError(f"{who} returned an invalid {kind}: {defect}")

    return fail


def _first(mask: Tensor) -> tuple[int, int] | None:
    """``(sample, token)`` of the first ``True`` of a ``(B, N)`` mask, or ``None``."""
    if not bool(mask.any()):
        return None
    s, i = (int(v) for v in mask.nonzero()[0])
    return s, i


def _check_merge(result: Merge, ctx: ReduceContext, device: torch.device, fail: Fail) -> None:
    b, n = ctx.valid.shape
    dest = result.destination
    _check_tensor(dest, (b, n), device, "destination", fail)
    dropped = ctx.valid & (dest == -1)
    own = torch.arange(n, device=device).expand(b, n)
    valid_dest = torch.where(ctx.valid & ~dropped, dest, own)  # a dropped token is checked as if it stayed put
    if (at := _first((valid_dest < 0) | (valid_dest >= n))) is not None:
        s, i = at
        raise fail(
            f"sample {s}: token {i} is merged into index {int(valid_dest[s, i])}, outside [0, {n}) (-1 drops a token)"
        )
    if (at := _first(ctx.protected & dropped)) is not None:
        raise fail(f"sample {at[0]}: protected token {at[1]} was dropped")
    if (at := _first(~ctx.valid.gather(1, valid_dest) & ctx.valid)) is not None:
        s, i = at
        raise fail(f"sample {s}: token {i} is merged into padding position {int(valid_dest[s, i])}")
    if (at := _first(ctx.valid & ~dropped & ~result.roots.gather(1, valid_dest))) is not None:
        s, i = at
        raise fail(
            f"sample {s}: token {i} is merged into token {int(valid_dest[s, i])}, which is itself merged "
            "into another or dropped; destinations must be roots (tokens that map to themselves)"
        )
    if (at := _first(ctx.protected & ctx.valid & ~result.roots)) is not None:
        raise fail(f"sample {at[0]}: protected token {at[1]} was merged away")
    arrivals = torch.zeros(b, n, dtype=torch.long, device=device).scatter_add_(1, valid_dest, ctx.valid.long())
    if (at := _first(ctx.protected & ctx.valid & (arrivals > 1))) is not None:
        raise fail(f"sample {at[0]}: other tokens were merged into protected token {at[1]}")
    if result.weights is not None:
        _check_merge_weights(result, ctx, valid_dest, device, fail)


def _check_merge_weights(result: Merge, ctx: ReduceContext, dest: Tensor, device: torch.device, fail: Fail) -> None:
    """A merge's own weights: ``(B, N)``, finite, non-negative, with ``combine: mean``, each group's sum positive."""
    weights = result.weights
    if weights is None:
        return
    if result.combine != "mean":
        raise fail(f"Merge.weights replace the sizes of a 'mean' combination, not of {result.combine!r}")
    if not isinstance(weights, Tensor) or not weights.is_floating_point() or weights.shape != ctx.valid.shape:
        what = f"{weights.dtype} {tuple(weights.shape)}" if isinstance(weights, Tensor) else type(weights).__name__
        raise fail(f"Merge.weights is {what}; expected a float tensor of shape {tuple(ctx.valid.shape)}")
    if weights.device != device:
        raise fail(f"Merge.weights is on {weights.device}, but the tokens are on {device}")
    if (at := _first(ctx.valid & ~(torch.isfinite(weights) & (weights >= 0)))) is not None:
        raise fail(f"sample {at[0]}: token {at[1]} has weight {float(weights[at])}; weights must be finite and >= 0")
    kept = ctx.valid & (result.destination != -1)
    total = torch.zeros_like(weights, dtype=torch.float32).scatter_add_(1, dest, (weights * kept).float())
    if (at := _first(kept & result.roots & (total <= 0))) is not None:
        raise fail(f"sample {at[0]}: the group of token {at[1]} has weights summing to 0")


def _check_selection(selection: Selection, ctx: ReduceContext, device: torch.device, fail: Fail) -> None:
    b = ctx.valid.shape[0]
    _check_tensor(selection.counts, (b,), device, "counts", fail)
    if selection.indices.dim() != 2 or selection.indices.shape[0] != b:
        raise fail(f"indices has shape {tuple(selection.indices.shape)}, expected (B, K) with B = {b}")
    _check_tensor(selection.indices, tuple(selection.indices.shape), device, "indices", fail)
    if bool(_selection_defects(selection, ctx).any()):  # the only host sync of a valid selection
        _name_selection_defect(selection, ctx, fail)


def _selection_defects(selection: Selection, ctx: ReduceContext) -> Tensor:
    """``(B,)`` bool: the samples whose indices break the contract, for every sample at once.

    True where :func:`_name_selection_defect` finds a defect: counts outside ``[0, K]``, an index
    outside the sample's valid tokens, indices not strictly increasing, entries after the count
    that are not ``-1``, a protected token dropped.
    """
    indices, counts = selection.indices, selection.counts
    n = ctx.valid.shape[1]
    in_row = torch.arange(indices.shape[1], device=indices.device) < counts[:, None]
    n_valid = ctx.valid.sum(1, keepdim=True)
    outside = in_row & ((indices < 0) | (indices >= n_valid))
    unordered = in_row[:, 1:] & (indices[:, 1:] <= indices[:, :-1])
    tail = ~in_row & (indices != -1)
    kept = torch.zeros(indices.shape[0], n + 1, dtype=torch.bool, device=indices.device)
    kept.scatter_(1, torch.where(in_row & ~outside, indices, n), True)
    dropped = ctx.protected & ctx.valid & ~kept[:, :n]
    bad_count = (counts < 0) | (counts > indices.shape[1])
    return bad_count | outside.any(1) | unordered.any(1) | tail.any(1) | dropped.any(1)


def _name_selection_defect(selection: Selection, ctx: ReduceContext, fail: Fail) -> None:
    """Raise for the first defect, sample by sample (only run once a defect is known to exist)."""
    n = ctx.valid.shape[1]
    k = selection.indices.shape[1]
    if bool((selection.counts < 0).any()) or bool((selection.counts > k).any()):
        raise fail(f"counts {selection.counts.tolist()} do not fit indices with K = {k} columns")
    n_valid = ctx.valid.sum(1)
    for s in range(ctx.valid.shape[0]):
        _check_row(selection.indices[s], int(selection.counts[s]), int(n_valid[s]), s, fail)
    if (at := _first(ctx.protected & ctx.valid & ~selection.to_mask(n))) is not None:
        raise fail(f"sample {at[0]}: protected token {at[1]} was dropped")


def _check_row(indices: Tensor, count: int, n_valid: int, s: int, fail: Fail) -> None:
    """One sample's indices: in range, strictly increasing, ``-1`` after ``count``."""
    row = indices[:count]
    if count and (int(row.min()) < 0 or int(row.max()) >= n_valid):
        bad = row[(row < 0) | (row >= n_valid)][0]
        raise fail(f"sample {s}: index {int(bad)} is outside [0, {n_valid}) (its valid tokens)")
    if count > 1 and not bool((row[1:] > row[:-1]).all()):
        dup = bool((row[1:] == row[:-1]).any()) or row.unique().numel() < count
        raise fail(
            f"sample {s}: indices are {'not unique' if dup else 'not sorted'} "
            f"({_preview(row)}); return them strictly increasing"
        )
    if bool((indices[count:] != -1).any()):
        raise fail(f"sample {s}: entries after counts[{s}] = {count} must be -1 (padding)")


def _check_budget(selection: Selection, ctx: ReduceContext, capabilities: Capabilities, fail: Fail) -> None:
    over = selection.counts > ctx.budget
    under = (selection.counts < ctx.budget) if capabilities.deterministic_count else torch.zeros_like(over)
    if not bool((over | under).any()):
        return
    if bool(over.any()):
        s = int(over.nonzero()[0])
        raise fail(f"sample {s} keeps {int(selection.counts[s])} tokens, over its budget of {int(ctx.budget[s])}")
    s = int(under.nonzero()[0])
    raise fail(
        f"sample {s} keeps {int(selection.counts[s])} tokens, under its budget of {int(ctx.budget[s])}; "
        "a reducer that keeps fewer must declare Capabilities(deterministic_count=False)"
    )


def required_attention(ctx: ReduceContext, source: str, reducer_name: str, hint: str) -> Tensor:
    """``ctx.attention[source]`` as ``(B, N)`` float32 with padding at 0, for a reducer that reads it.

    Raises:
        ReducerInputError: the source is missing (``hint`` says how the reducer gets it), has the wrong
            shape, or holds NaN or infinite values at a valid token.
    """
    attention = ctx.attention.get(source)
    if attention is None:
        raise ReducerInputError(
            f"reducer {reducer_name!r}: no {source!r} attention in the context (got "
            f"{sorted(ctx.attention) or 'none'}); {hint}"
        )
    if attention.shape != ctx.valid.shape:
        raise ReducerInputError(
            f"reducer {reducer_name!r}: {source!r} attention has shape {tuple(attention.shape)}, expected (B, N) = "
            f"{tuple(ctx.valid.shape)}"
        )
    attention = attention.detach().float()
    if not bool((torch.isfinite(attention) | ~ctx.valid).all()):
        raise ReducerInputError(f"reducer {reducer_name!r}: the {source!r} attention contains NaN or infinite values")
    return attention.masked_fill(~ctx.valid, 0.0)


def check_finite_tokens(tokens: Tensor, ctx: ReduceContext, reducer_name: str) -> None:
    """Raise :class:`~tokenprune.errors.ReducerInputError` if a valid token has a NaN or infinite feature.

    For reducers whose arithmetic would turn such a value into a silent wrong ranking; padding is ignored.
    """
    finite = torch.isfinite(tokens).all(-1) | ~ctx.valid
    if not bool(finite.all()):
        sample, token = (int(v) for v in (~finite).nonzero()[0])
        raise ReducerInputError(
            f"reducer {reducer_name!r}: token {token} of sample {sample} has NaN or infinite features"
        )


def attention_and_projected(
    tokens: Tensor, ctx: ReduceContext, reducer_name: str, similarity: str
) -> tuple[Tensor, Tensor | None]:
    """A vision-attention reducer's ``(B, N)`` ``ctx.vision_attention`` and, under ``similarity: projected``,
    its ``(B, N, D)`` post-projector ``tokens`` (detached, checked finite; else ``None``: the reducer reads
    its other metric).

    Raises:
        ReducerInputError: no vision attention in ``ctx``, or a valid token with a NaN or infinite feature.
    """
    if ctx.vision_attention is None:
        raise ReducerInputError(
            f"reducer {reducer_name!r} needs ctx.vision_attention; run it at post_projector through tokenprune.apply"
        )
    if similarity != "projected":
        return ctx.vision_attention, None
    check_finite_tokens(tokens.detach(), ctx, reducer_name)
    return ctx.vision_attention, tokens.detach()


def attention_and_metric(
    tokens: Tensor, ctx: ReduceContext, reducer_name: str, similarity: str, tower: Literal["keys", "features"]
) -> tuple[Tensor, Tensor]:
    """A vision-attention reducer's ``(B, N)`` ``ctx.vision_attention`` and the ``(B, N, d)`` metric it compares
    tokens by: under ``similarity: projected`` its post-projector ``tokens``, else the tower's ``ctx.vision_keys``
    or ``ctx.vision_features`` (``tower``), detached and checked finite either way.

    Raises:
        ReducerInputError: no vision attention in ``ctx``, no tower metric (naming the request field that serves
            it, and ``similarity: projected``), or a valid token with a NaN or infinite value.
    """
    attention, projected = attention_and_projected(tokens, ctx, reducer_name, similarity)
    if projected is not None:
        return attention, projected
    metric = ctx.vision_keys if tower == "keys" else ctx.vision_features
    if metric is None:
        raise ReducerInputError(
            f"reducer {reducer_name!r} with similarity {similarity!r} needs ctx.vision_{tower} (the engine serves "
            f"them when the stage's vision request sets {tower}); or set similarity: projected"
        )
    check_finite_tokens(metric, ctx, reducer_name)
    return attention, metric


def _check_tensor(
    t: object, shape: tuple[int, ...], device: torch.device, name: str, fail: Callable[[str], ReducerOutputError]
) -> None:
    if not isinstance(t, Tensor):
        raise fail(f"{name} is a {type(t).__name__}, not a torch.Tensor")
    if t.dtype != torch.long:
        raise fail(f"{name} has dtype {t.dtype}, expected torch.long (int64)")
    if t.device != device:
        raise fail(f"{name} is on {t.device}, but the tokens are on {device}")
    if tuple(t.shape) != tuple(shape):
        raise fail(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _preview(row: Tensor, limit: int = 8) -> str:
    values = row[:limit].tolist()
    return str(values)[:-1] + (", ...]" if row.numel() > limit else "]")
