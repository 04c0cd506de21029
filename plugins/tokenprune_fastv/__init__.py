"""The ``fastv`` reducer: after decoder layer ``k - 1``, keep the visual tokens that receive the most attention.

FastV (Chen et al., ECCV 2024, https://arxiv.org/abs/2403.06764; official code
https://github.com/pkunlp-icler/FastV). Packaged exactly as a third-party plugin: this module is the
entry point ``fastv`` of the ``tokenprune`` group, and registers its reducer through the hook.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ReducerParams, ScoringReducer
from tokenprune.reducer import AttentionSource
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

    Cost: ``O(N log N)`` here; the probe adds ``O(H R L)`` at layer ``k - 1`` for ``R`` query rows.
    """

    name = "fastv"
    capabilities = Capabilities(insertion_points=frozenset({"layer"}), attention=frozenset({"last"}))

    class Params(ReducerParams):
        source: Literal["last", "all", "text", "visual"] = Field(
            default="last",
            description=(
                "Whose attention ranks the tokens: 'last' = the last token (official code), 'all' = every token "
                "(the paper), 'text' or 'visual' = those tokens' rows; averaged over heads."
            ),
        )

    @classmethod
    def attention_sources_for(cls, params: ReducerParams) -> frozenset[AttentionSource]:
        """The one probe source a FastV stage reads (``params.source``)."""
        return frozenset({params.source})  # type: ignore[attr-defined]

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        """``(B, N)`` head-averaged attention received from the ``source`` rows at layer ``k - 1``."""
        hint = "FastV runs at a layer stage through tokenprune.apply, which computes the attention of layer k - 1"
        return required_attention(ctx, self.params.source, self.name, hint)


@tokenprune.hookimpl
def tokenprune_register_reducers(registry: tokenprune.plugins.ReducerRegistry) -> None:
    registry.add(FastV)
