"""Check what a reducer returned against the contract of :mod:`tokenprune.reducer`.

The engine calls :func:`check_reduction` on every result, so a faulty plugin fails with a message
naming it and the defect instead of corrupting a model's sequence.
"""

from __future__ import annotations

from collections.abc import Callable

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

    def fail(defect: str) -> ReducerOutputError:
        return ReducerOutputError(f"{who} returned an invalid {kind}: {defect}")

    b, n = ctx.valid.shape
    device = tokens.device
    if isinstance(result, Merge):
        kind = "merge"
        if not capabilities.merges:
            raise fail("it returned a Merge but does not declare Capabilities(merges=True)")
        dest = result.destination
        _check_tensor(dest, (b, n), device, "destination", fail)
        dropped = ctx.valid & (dest == -1)
        own = torch.arange(n, device=device).expand(b, n)
        valid_dest = torch.where(ctx.valid & ~dropped, dest, own)  # a dropped token is checked as if it stayed put
        out_of_range = (valid_dest < 0) | (valid_dest >= n)
        if bool(out_of_range.any()):
            s, i = (int(v) for v in out_of_range.nonzero()[0])
            raise fail(
                f"sample {s}: token {i} is merged into index {int(valid_dest[s, i])}, outside [0, {n}) "
                "(-1 drops a token)"
            )
        protected_dropped = ctx.protected & dropped
        if bool(protected_dropped.any()):
            s, i = (int(v) for v in protected_dropped.nonzero()[0])
            raise fail(f"sample {s}: protected token {i} was dropped")
        into_padding = ~ctx.valid.gather(1, valid_dest) & ctx.valid
        if bool(into_padding.any()):
            s, i = (int(v) for v in into_padding.nonzero()[0])
            raise fail(f"sample {s}: token {i} is merged into padding position {int(valid_dest[s, i])}")
        chained = ctx.valid & ~dropped & ~result.roots.gather(1, valid_dest)
        if bool(chained.any()):
            s, i = (int(v) for v in chained.nonzero()[0])
            raise fail(
                f"sample {s}: token {i} is merged into token {int(valid_dest[s, i])}, which is itself merged "
                "into another or dropped; destinations must be roots (tokens that map to themselves)"
            )
        protected_moved = ctx.protected & ctx.valid & ~result.roots
        if bool(protected_moved.any()):
            s, i = (int(v) for v in protected_moved.nonzero()[0])
            raise fail(f"sample {s}: protected token {i} was merged away")
        arrivals = torch.zeros(b, n, dtype=torch.long, device=device).scatter_add_(1, valid_dest, ctx.valid.long())
        into_protected = ctx.protected & ctx.valid & (arrivals > 1)
        if bool(into_protected.any()):
            s, i = (int(v) for v in into_protected.nonzero()[0])
            raise fail(f"sample {s}: other tokens were merged into protected token {i}")
        selection = result.selection(ctx.valid)
    elif isinstance(result, Selection):
        kind = "selection"
        selection = result
        _check_tensor(selection.counts, (b,), device, "counts", fail)
        if selection.indices.dim() != 2 or selection.indices.shape[0] != b:
            raise fail(f"indices has shape {tuple(selection.indices.shape)}, expected (B, K) with B = {b}")
        _check_tensor(selection.indices, tuple(selection.indices.shape), device, "indices", fail)
        k = selection.indices.shape[1]
        if bool((selection.counts < 0).any()) or bool((selection.counts > k).any()):
            raise fail(f"counts {selection.counts.tolist()} do not fit indices with K = {k} columns")
        n_valid = ctx.valid.sum(1)
        for s in range(b):
            c = int(selection.counts[s])
            row = selection.indices[s, :c]
            if c and (int(row.min()) < 0 or int(row.max()) >= int(n_valid[s])):
                bad = row[(row < 0) | (row >= n_valid[s])][0]
                raise fail(f"sample {s}: index {int(bad)} is outside [0, {int(n_valid[s])}) (its valid tokens)")
            if c > 1 and not bool((row[1:] > row[:-1]).all()):
                dup = bool((row[1:] == row[:-1]).any()) or row.unique().numel() < c
                raise fail(
                    f"sample {s}: indices are {'not unique' if dup else 'not sorted'} "
                    f"({_preview(row)}); return them strictly increasing"
                )
            if bool((selection.indices[s, c:] != -1).any()):
                raise fail(f"sample {s}: entries after counts[{s}] = {c} must be -1 (padding)")
        missing = ctx.protected & ctx.valid & ~selection.to_mask(n)
        if bool(missing.any()):
            s, i = (int(v) for v in missing.nonzero()[0])
            raise fail(f"sample {s}: protected token {i} was dropped")
    else:
        raise ReducerOutputError(
            f"{who} returned {type(result).__name__}; reduce() must return a tokenprune.Selection or tokenprune.Merge"
        )

    over = selection.counts > ctx.budget
    if bool(over.any()):
        s = int(over.nonzero()[0])
        raise fail(f"sample {s} keeps {int(selection.counts[s])} tokens, over its budget of {int(ctx.budget[s])}")
    if capabilities.deterministic_count:
        under = selection.counts < ctx.budget
        if bool(under.any()):
            s = int(under.nonzero()[0])
            raise fail(
                f"sample {s} keeps {int(selection.counts[s])} tokens, under its budget of {int(ctx.budget[s])}; "
                "a reducer that keeps fewer must declare Capabilities(deterministic_count=False)"
            )
    return selection


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
