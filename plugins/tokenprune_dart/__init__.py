"""The ``dart`` reducer: duplication-aware pruning with pivot tokens, at a layer stage.

DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", https://arxiv.org/abs/2502.11494; official code
https://github.com/ZichenWen1/DART). Packaged exactly as a third-party plugin: this module is the
entry point ``dart`` of the ``tokenprune`` group.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ReducerInputError, ReducerParams, Selection, TokenReducer
from tokenprune.validation import check_finite_tokens


class DART(TokenReducer):
    """Keep pivot tokens, then, for each pivot, the visual tokens least similar to it.

    Runs at ``{layer: K}`` only (the official default is ``K = 2``). Pivots: the
    ``pivot_image_tokens`` visual tokens and the ``pivot_text_tokens`` text tokens after the last
    visual token with the largest L1 norm of layer ``K - 1``'s keys (after RoPE, key heads
    concatenated). Similarity: the cosine of layer ``K - 1``'s output passed through the language
    model's final norm. Pivots are visited in sequence order; each claims an equal share of the
    budget left after the visual pivots (the first ones one more while a remainder is left), taking
    the remaining visual tokens least similar to it. Visual pivots are kept, text pivots are not.

    Cost: ``O(P N D)`` element-wise for ``P`` pivots (no matrix products).
    """

    name = "dart"
    capabilities = Capabilities(
        insertion_points=frozenset({"layer"}), signals=frozenset({"keys", "final_norm"}), needs_text=True
    )

    class Params(ReducerParams):
        pivot_image_tokens: int = Field(
            default=4, ge=0, description="Visual pivots: the visual tokens with the largest key L1 norm (kept)."
        )
        pivot_text_tokens: int = Field(
            default=4,
            ge=0,
            description="Text pivots: the text tokens after the last visual token with the largest key L1 norm.",
        )

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """The protected tokens, the visual pivots and each pivot's least similar tokens, per sample."""
        keys, text_keys, norm = self._inputs(tokens, ctx)
        normed = _unit(norm(tokens).float())
        text_normed = _unit(norm(ctx.text).float()) if ctx.text is not None else None
        keep = torch.zeros_like(ctx.valid)
        for b, (free, visual, last_visual) in enumerate(_sample_counts(ctx)):
            text = self._text_pivots(b, text_keys, ctx, last_visual) if visual else []
            keep[b] = self._sample(b, max(free, 0), text, normed, text_normed, keys, ctx)
        return Selection.from_mask(keep)

    def _inputs(self, tokens: Tensor, ctx: ReduceContext) -> tuple[Tensor, Tensor | None, object]:
        hint = "DART runs at a layer stage through tokenprune.apply, which serves layer K - 1's keys and the final norm"
        if ctx.keys is None or ctx.final_norm is None:
            raise ReducerInputError(f"reducer {self.name!r}: the context has no keys or final norm; {hint}")
        if ctx.keys.shape[:2] != ctx.valid.shape:
            raise ReducerInputError(
                f"reducer {self.name!r}: keys have shape {tuple(ctx.keys.shape)}, expected (B, N, Dk) with "
                f"(B, N) = {tuple(ctx.valid.shape)}"
            )
        check_finite_tokens(tokens, ctx, self.name)
        check_finite_tokens(ctx.keys, ctx, self.name)
        return ctx.keys.float().abs().sum(-1), _text_l1(ctx), ctx.final_norm

    def _sample(
        self,
        b: int,
        free: int,
        text: list[int],
        normed: Tensor,
        text_normed: Tensor | None,
        key_l1: Tensor,
        ctx: ReduceContext,
    ) -> Tensor:
        """``(N,)`` bool: sample ``b``'s kept tokens (see the class docstring), given its ``free`` budget
        (beyond its protected tokens) and its text pivots."""
        valid, protected = ctx.valid[b], ctx.protected[b] & ctx.valid[b]
        candidates = valid & ~protected
        image = _top(key_l1[b], candidates, min(self.params.pivot_image_tokens, free))
        image_columns = ctx.columns[b, image].tolist() if ctx.columns is not None and image else image
        text_columns = ctx.text_columns[b, text].tolist() if text else []  # type: ignore[index]
        pivots = sorted(
            [(column, normed[b, i]) for column, i in zip(image_columns, image, strict=True)]
            + [(column, text_normed[b, t]) for column, t in zip(text_columns, text, strict=True)]  # type: ignore[index]
        )
        chosen = torch.zeros_like(valid)
        chosen[image] = True
        rest = free - len(image)
        for j, (_, vector) in enumerate(pivots):
            share = rest // len(pivots) + (1 if j < rest % len(pivots) else 0)
            if share == 0:
                continue
            cos = (normed[b] * vector).sum(-1)
            chosen |= _top_mask(-cos, candidates & ~chosen, share)  # sequential picks, kept on the device
        return chosen | protected

    def _text_pivots(self, b: int, text_key_l1: Tensor | None, ctx: ReduceContext, last_visual: int) -> list[int]:
        """The text pivots of sample ``b`` (which has visual tokens): its text tokens after its last visual
        token (at column ``last_visual``) with the largest key L1 norm."""
        if text_key_l1 is None or ctx.text_columns is None or ctx.text_valid is None:
            return []
        after = ctx.text_valid[b] & (ctx.text_columns[b] > last_visual)
        return _top(text_key_l1[b], after, self.params.pivot_text_tokens)


def _sample_counts(ctx: ReduceContext) -> list[list[int]]:
    """Per sample, in one host read: its budget beyond its protected tokens, whether it has visual
    tokens (1 or 0) and the column of its last visual token (``-1``: none)."""
    valid = ctx.valid
    batch, length = valid.shape
    columns = ctx.columns if ctx.columns is not None else torch.arange(length, device=valid.device).expand(batch, -1)
    columns = torch.cat([columns.masked_fill(~valid, -1), columns.new_full((batch, 1), -1)], 1)
    free = ctx.budget.to(valid.device) - (ctx.protected & valid).sum(1)
    return torch.stack([free, valid.any(1).long(), columns.max(1).values.long()], 1).tolist()


def _text_l1(ctx: ReduceContext) -> Tensor | None:
    """``(B, T)`` L1 norms of the text tokens' keys (``None`` without text keys)."""
    if ctx.text_keys is None:
        return None
    return ctx.text_keys.float().abs().sum(-1)


def _unit(x: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (cosine similarity becomes a dot product; eps as ``F.cosine_similarity``)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _top(score: Tensor, allowed: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest ``score`` among ``allowed`` (ties to the lower index)."""
    k = min(k, int(allowed.sum()))
    if k <= 0:
        return []
    order = score.masked_fill(~allowed, float("-inf")).argsort(descending=True, stable=True)
    return order[:k].tolist()


def _top_mask(score: Tensor, allowed: Tensor, k: int) -> Tensor:
    """:func:`_top` as a ``(N,)`` bool mask, with no host read (``k > 0``)."""
    order = score.masked_fill(~allowed, float("-inf")).argsort(descending=True, stable=True)[:k]
    mask = torch.zeros_like(allowed)
    mask[order] = torch.arange(order.numel(), device=order.device) < allowed.sum()  # the first min(k, allowed)
    return mask


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(DART)
