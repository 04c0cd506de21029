"""The ``centroid`` reducer: keep the tokens that differ most from their image's mean token."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tokenprune import Capabilities, ReduceContext, ReducerInputError, ReducerParams, ScoringReducer


class CentroidDistance(ScoringReducer):
    """Keep the tokens farthest from the mean token of their sample.

    Scores are ``1 - cos(x_i, mean)`` (``metric: cosine``) or ``||x_i - mean||`` (``metric: l2``),
    where the mean is taken over the sample's valid tokens. ``largest: false`` keeps the most typical
    tokens instead.
    """

    name = "centroid"
    capabilities = Capabilities(insertion_points=frozenset({"post_projector", "layer"}))

    class Params(ReducerParams):
        metric: Literal["cosine", "l2"] = Field(default="cosine", description="Distance to the mean token.")
        largest: bool = Field(default=True, description="Keep the farthest tokens (True) or the closest (False).")

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        """``(B, N)`` distances of each token to its sample's mean token."""
        x = tokens.float()
        valid = ctx.valid.unsqueeze(-1)
        if not bool(torch.isfinite(x).masked_fill(~valid, True).all()):
            raise ReducerInputError(f"reducer {self.name!r}: the tokens contain NaN or infinite values")
        mean = (x * valid).sum(1, keepdim=True) / ctx.valid.sum(1).clamp(min=1).view(-1, 1, 1)
        if self.params.metric == "cosine":
            distance = 1 - torch.nn.functional.cosine_similarity(x, mean, dim=-1)
        else:
            distance = (x - mean).norm(dim=-1)
        return distance if self.params.largest else -distance
