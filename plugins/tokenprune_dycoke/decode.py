"""The ``dycoke_dp`` reducer: DyCoke's dynamic pruning (DP) of the cached visual tokens during decoding.

DyCoke's second stage (Tao et al., CVPR 2025, https://arxiv.org/abs/2411.15024; official code
https://github.com/KD-TAO/DyCoke, ``PrunableDynamicCache`` and the decoder loop of
``llava/model/language_model/modeling_qwen2.py``). At every decoding step, layer ``L - 1``'s attention
of the new token to the visual tokens is compared with the previous step's; when it changed (cosine
similarity below ``threshold``, and always at the first step), layers ``L`` onwards attend only to the
visual tokens it attends to most for this step; otherwise to all of them. The cache keeps every token.
It runs at ``at: {decode: L}`` (the official ``L = 3``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from tokenprune import Capabilities, ReduceContext, ReducerParams, Selection, TokenReducer
from tokenprune.layout import TokenLayout


class DyCokeDecode(TokenReducer):
    """Per decoding step, keep the visual tokens with the most attention from the new token, when it moved.

    Per sample, over its valid unprotected visual tokens (protected ones, LLaVA-OneVision's video newline
    among them, are kept, as the official range leaves the newline out), with ``a`` the step's
    attention of the last query row at layer ``L - 1`` (head-averaged) and ``a'`` the previous step's:

    * at the first decoding step, or when ``cos(a, a') < threshold``: keep the ``int(keep * n)`` tokens
      of largest ``a`` (``keep`` is ``1 - P``, the official ``P = 0.7``: ``keep: 0.3``; an integer
      ``keep`` is a count), ties to the lower index;
    * otherwise keep every token: this step attends to the whole cache, as the official loop does when
      the attention is stable (it resets the kept set at every step and only recomputes it on change).

    The count is therefore either ``int(keep * n)`` or ``n``, decided per step (``deterministic_count``
    is False; the budget the engine checks is ``n``). The previous step's attention is kept per sample
    and forgotten at step 0 of every generation; a context without a step (``ctx.step is None``, built
    by hand) is always pruned and leaves no state. Cost: ``O(N)`` per step.
    """

    name = "dycoke_dp"
    capabilities = Capabilities(
        insertion_points=frozenset({"decode"}), attention=frozenset({"last"}), deterministic_count=False
    )

    class Params(ReducerParams):
        threshold: float = Field(
            default=0.9,
            ge=-1.0,
            le=1.0,
            description=(
                "Prune at a step when the cosine similarity of its attention to the visual tokens and the previous "
                "step's is below this (the official 0.9); at or above it the step attends to every token."
            ),
        )

    def __init__(self, params: ReducerParams | Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self._previous: Tensor | None = None

    def stage_budget(self, keep: float | int, valid: Tensor, protected: Tensor, layout: TokenLayout | None) -> Tensor:
        """Every valid token: a step whose attention did not move keeps them all (see the class docstring)."""
        return valid.sum(1)

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """``tokens`` (layer ``L - 1``'s cached keys) are not read; ``ctx.attention['last']`` is ``(B, N)``."""
        attention = ctx.attention["last"].float()
        candidates = ctx.valid & ~ctx.protected
        scores = attention.masked_fill(~candidates, 0.0)
        previous = self._previous
        self._previous = scores if ctx.step is not None else None  # a context built by hand has no steps
        if not ctx.step or previous is None or previous.shape != scores.shape:
            prune = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
        else:
            similarity = torch.nn.functional.cosine_similarity(scores, previous, dim=1)
            prune = similarity < self.params.threshold
        n = candidates.sum(1)
        quota = torch.where(prune, _quota(n, ctx.keep), n)
        order = attention.masked_fill(~candidates, float("-inf")).argsort(dim=1, descending=True, stable=True)
        positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        return Selection.from_mask(ctx.protected & ctx.valid | candidates & (rank < quota.unsqueeze(1)))


def _quota(candidates: Tensor, keep: float | int | None) -> Tensor:
    """Tokens kept at a pruning step: ``int(keep * n)`` (the official ``int(img_len * (1 - P))``), or a count."""
    if keep is None:  # a context built by hand, without the stage's keep
        return candidates
    if isinstance(keep, int):
        return candidates.clamp(max=keep)
    return (candidates.double() * float(keep)).long()
