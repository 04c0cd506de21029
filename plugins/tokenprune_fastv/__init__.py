"""The ``fastv`` reducer: after decoder layer ``k - 1``, keep the visual tokens that receive the most attention.

FastV (Chen et al., ECCV 2024, https://arxiv.org/abs/2403.06764; official code
https://github.com/pkunlp-icler/FastV). Packaged exactly as a third-party plugin: this module is the
entry point ``fastv`` of the ``tokenprune`` group, and registers its reducer through the hook.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ReducerParams, ScoringReducer
from tokenprune.layout import TokenLayout
from tokenprune.reducer import AttentionSourceParams, Requirements
from tokenprune.validation import required_attention


class FastV(ScoringReducer):
    """Rank visual tokens by the attention they receive at layer ``k - 1``; keep the top of them.

    Runs at ``{layer: k}`` only (the paper's default is ``k = 2``, i.e. ``at: {layer: 2}``). The
    engine's attention probe computes, under the model's sdpa attention, the attention
    probabilities of layer ``k - 1`` (the layer whose output the stage receives), averaged over
    heads and over the query rows of ``source``:

    * ``last`` (default, the official code): the last token's row only;
    * ``all`` (the paper's Eq.): every real token's row (causal: a token is attended only by the
      tokens after it);
    * ``text`` / ``visual``: the text tokens' or the visual tokens' rows.

    ``rounding`` turns a fractional ``keep`` into a count: ``floor`` (default, tokenprune's rule for
    every reducer) or ``nearest``, the official llava-hf code's ``round(n * (1 - R))`` (Python's
    ``round``: halves go to the even count), through :meth:`stage_budget`.

    Cost: ``O(N log N)`` here; the probe adds ``O(H R L)`` at layer ``k - 1`` for ``R`` query rows.
    """

    name = "fastv"
    capabilities = Capabilities(insertion_points=frozenset({"layer"}), attention=frozenset({"last"}))

    class Params(AttentionSourceParams):
        rounding: Literal["floor", "nearest"] = Field(
            default="floor",
            description="How a fractional keep becomes a count: 'floor' (tokenprune's rule) or 'nearest', the "
            "official llava-hf code's round(n * (1 - R)), halves to even.",
        )

    def stage_budget(self, keep: float | int, valid: Tensor, protected: Tensor, layout: TokenLayout | None) -> Tensor:
        """``rounding: floor``: the default rule. ``nearest``: :func:`nearest_count` of each sample's tokens,
        at least its protected tokens; a count ``keep`` is the same under both."""
        if self.params.rounding == "floor" or isinstance(keep, int):
            return super().stage_budget(keep, valid, protected, layout)
        wanted = [nearest_count(keep, int(n)) for n in valid.sum(1).tolist()]
        return torch.maximum(torch.tensor(wanted, dtype=torch.long, device=valid.device), (protected & valid).sum(1))

    @classmethod
    def requirements(cls, params: ReducerParams) -> Requirements:
        """The one probe source a FastV stage reads (``params.source``)."""
        return Requirements(attention=frozenset({params.source}))  # type: ignore[attr-defined]

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        """``(B, N)`` head-averaged attention received from the ``source`` rows at layer ``k - 1``."""
        hint = "FastV runs at a layer stage through tokenprune.apply, which computes the attention of layer k - 1"
        return required_attention(ctx, self.params.source, self.name, hint)


def nearest_count(keep: float, present: int) -> int:
    """How many of ``present`` tokens the official llava-hf FastV keeps for the fraction ``keep``.

    The official code is given the pruned fraction ``R`` and keeps ``round(n * (1 - R))`` (Python's
    ``round``, halves to even: 2.5 -> 2, 3.5 -> 4). Here ``R = 1 - keep`` rounded to 12 decimals,
    which recovers the ``R`` a user wrote (``keep: 0.9`` is ``R = 0.1``, not
    ``0.09999999999999998``), so the count equals the official one, floating-point error included
    (``15 * (1 - 0.9)`` is ``1.4999999999999998``: 1 token), for every ``R`` of up to 12
    decimals. At least 1 token (the official code may keep 0), at most ``present``.

    >>> nearest_count(0.5, 5), nearest_count(0.5, 7), nearest_count(0.1, 15), nearest_count(0.25, 576)
    (2, 4, 1, 144)
    """
    if present <= 0:
        return 0
    pruned = round(1.0 - keep, 12)
    return min(present, max(1, round(present * (1 - pruned))))


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(FastV)


FASTV_PAPER = "FastV (Chen et al., ECCV 2024), https://arxiv.org/abs/2403.06764"


@tokenprune.hookimpl
def tokenprune_register_pipelines(registry: tokenprune.plugins.PipelineRegistry) -> None:
    for k, r, table in (
        (2, 50, "the paper's main setting (K=2, R=50%; about 45% fewer FLOPs on LLaVA-1.5-13B)"),
        (2, 75, "the paper's latency setting (K=2, R=75%; A-OKVQA on LLaVA-1.5-13B)"),
        (3, 50, "the official README's lmms-eval table (K=3, R=50%; LLaVA-1.5-7B, 57% of the FLOPs)"),
    ):
        stage = {"at": {"layer": k}, "reducer": "fastv", "keep": (100 - r) / 100, "params": {"rounding": "nearest"}}
        registry.add(
            f"fastv-k{k}-r{r}",
            {"stages": [stage]},
            paper=FASTV_PAPER,
            table=table,
            description=f"FastV: after layer {k}, drop {r}% of the visual tokens (official rounding)",
        )
