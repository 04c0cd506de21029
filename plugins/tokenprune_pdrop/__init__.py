"""The ``pdrop`` reducer: one stage of PyramidDrop, ranked by the stage's own layer's attention.

PyramidDrop (Xing et al., CVPR 2025, https://arxiv.org/abs/2410.17247; official code
https://github.com/Cooperx521/PyramidDrop). The paper's schedule is a pipeline of several ``pdrop``
stages (e.g. layers 8, 16 and 24, each keeping half of what reaches it). Packaged exactly as a
third-party plugin: this module is the entry point ``pdrop`` of the ``tokenprune`` group.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ReducerParams, ScoringReducer
from tokenprune.reducer import AttentionSourceParams, Requirements
from tokenprune.validation import required_attention


class PyramidDrop(ScoringReducer):
    """Keep the visual tokens that the last instruction token attends to most, at the stage's own layer.

    Runs at ``{layer: k}`` only. Before layer ``k`` runs, the engine computes the attention that
    layer ``k`` itself would compute on the hidden states entering it (its input norm, q/k
    projections, RoPE, grouped heads; under sdpa), for the query rows of ``source``, averaged over
    heads; the stage keeps the top of it. This is the official ``pdrop_rank_drop`` ranking, which
    differs from FastV's (layer ``k - 1``'s attention).

    Cost: ``O(N log N)`` here; the engine adds layer ``k``'s q/k/v projections on the ``L`` tokens
    entering it and ``O(H R L)`` scores for ``R`` query rows.
    """

    name = "pdrop"
    capabilities = Capabilities(insertion_points=frozenset({"layer"}), own_attention=frozenset({"last"}))

    class Params(AttentionSourceParams):
        """``source``: whose attention at the stage's own layer ranks the tokens (``last``, the last instruction
        token, as the official inference code)."""

    @classmethod
    def requirements(cls, params: ReducerParams) -> Requirements:
        """The one own-layer source a PyramidDrop stage reads (``params.source``)."""
        return Requirements(own_attention=frozenset({params.source}))  # type: ignore[attr-defined]

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        """``(B, N)`` head-averaged attention received from the ``source`` rows at the stage's own layer."""
        hint = (
            "PyramidDrop runs at a layer stage through tokenprune.apply, which computes the stage's own layer's "
            "attention (ctx.own_attention)"
        )
        return required_attention(replace(ctx, attention=ctx.own_attention), self.params.source, self.name, hint)


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(PyramidDrop)


@tokenprune.hookimpl
def tokenprune_register_pipelines(registry: tokenprune.plugins.PipelineRegistry) -> None:
    registry.add(
        "pdrop-llava",
        {
            "positions": "compact",
            "protect_newlines": False,
            "stages": [{"at": {"layer": k}, "reducer": "pdrop", "keep": 0.5} for k in (8, 16, 24)],
        },
        paper="PyramidDrop (Xing et al., CVPR 2025), https://arxiv.org/abs/2410.17247",
        table="the official evaluation scripts (scripts/v1_5 and v1_6 pdrop_eval: layers 8/16/24, lambda 0.5) "
        "behind the LLaVA-1.5-7B and LLaVA-NeXT-7B results",
        description="PyramidDrop: keep half of the visual tokens at layers 8, 16 and 24 (32-layer LLMs)",
    )
