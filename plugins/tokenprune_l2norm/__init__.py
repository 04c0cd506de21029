"""The ``l2norm`` reducer: keep the visual tokens with the largest (or smallest) L2 norm.

G-Prune's "information amount" baseline (https://arxiv.org/abs/2501.02268): its graph propagation
starts from these norms. Packaged exactly as a third-party plugin: this module is the entry point
``l2norm`` of the ``tokenprune`` group, and registers its reducer through the hook.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ReducerParams, ScoringReducer
from tokenprune.validation import check_finite_tokens


class L2Norm(ScoringReducer):
    """Keep the tokens whose feature vectors have the largest L2 norm (``largest: false``: smallest).

    The norm is taken of the tensor the stage receives, computed in float32:

    * at ``post_projector``, the projected visual features (the LLM's embedding space), as in
      G-Prune's baseline;
    * at ``{layer: k}``, the hidden states entering decoder layer ``k`` (the output of layer
      ``k - 1``).

    Cost: ``O(N D)``. NaN or infinite features raise :class:`tokenprune.ReducerInputError`.
    """

    name = "l2norm"
    capabilities = Capabilities(insertion_points=frozenset({"post_projector", "layer"}))

    class Params(ReducerParams):
        largest: bool = Field(
            default=True,
            description="Keep the largest-norm tokens (True, G-Prune's baseline) or the smallest-norm ones (False).",
        )

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        """``(B, N)`` float32 norms of the ``(B, N, D)`` tokens, negated when ``largest`` is False."""
        x = tokens.detach().float()
        check_finite_tokens(x, ctx, self.name)
        # Scaled by the largest entry, so the squares cannot overflow float32 (features near 1e19 and up).
        scale = x.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        norms = (torch.linalg.vector_norm(x / scale, dim=-1) * scale.squeeze(-1)).masked_fill(~ctx.valid, 0.0)
        return norms if self.params.largest else -norms


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(L2Norm)
