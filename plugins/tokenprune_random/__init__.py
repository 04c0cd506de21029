"""The ``random`` reducer: keep a seeded random subset of the visual tokens.

A baseline that recent benchmarks find surprisingly strong (UniPruneBench; G-Prune's Table 1 reports
it next to the methods). Packaged exactly as a third-party plugin: this module is the entry point
``random`` of the ``tokenprune`` group, and registers its reducer through the hook.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ReducerParams, ScoringReducer


class RandomReducer(ScoringReducer):
    """Keep a uniformly random subset of the tokens of each sample.

    Each sample draws its scores from a generator seeded with ``seed`` plus the stage index, so a
    sample keeps the same tokens whether it runs alone or in a batch, and two samples with the same
    number of tokens keep the same positions. Protected tokens are kept as always.
    """

    name = "random"
    capabilities = Capabilities(insertion_points=frozenset({"post_projector", "layer"}))

    class Params(ReducerParams):
        seed: int = Field(default=0, description="Seed of the random draw; the same seed keeps the same tokens.")

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        """``(B, N)`` uniform random scores, drawn on the CPU for reproducibility across devices."""
        scores = torch.zeros(ctx.valid.shape)
        for row, count in enumerate(ctx.num_valid.tolist()):
            # Draw exactly the sample's own token count, so padding cannot change its draw.
            generator = torch.Generator().manual_seed(self.params.seed + 1_000_003 * ctx.stage_index)
            scores[row, :count] = torch.rand(count, generator=generator)
        return scores.to(tokens.device)


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(RandomReducer)
