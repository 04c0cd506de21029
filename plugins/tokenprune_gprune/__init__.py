"""The ``gprune`` reducer: G-Prune, graph-based information propagation over the visual tokens.

G-Prune (Jiang et al., AAAI 2025, https://arxiv.org/abs/2501.02268; official code
https://github.com/jytmelon/G-Prune, ``LLaVA-NeXT/llava/model/llava_arch.py``). Packaged exactly as a
third-party plugin: this module is the entry point ``gprune`` of the ``tokenprune`` group, and
registers its reducer through the hook.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ReducerParams, Selection, TokenReducer
from tokenprune.budget import spatial_quotas
from tokenprune.validation import check_finite_tokens


class GPrune(TokenReducer):
    """Keep the tokens that collect the most "information" propagated over a similarity graph.

    Per sample, the visual tokens are split into graphs, one per ``(image, view)`` of the layout
    (LLaVA-NeXT: the base view and the high-resolution grid are separate graphs). Row-end newline
    tokens never enter a graph; protected tokens are always kept. For each graph of ``n`` tokens
    ``X`` (``(n, D)``, in float32):

    1. ``S = X̃ X̃ᵀ``, the cosine similarities (``X̃`` row-normalised);
    2. ``A_ij = S_ij`` where ``S_ij >= threshold`` (the diagonal always), otherwise no edge;
    3. ``P = rowsoftmax(A / temperature)`` over the edges only;
    4. ``s⁰ = (||x_i||₂)_i``, then ``s^t = s^{t-1} P`` for ``iterations`` steps (vector-matrix
       products, never a matrix power);
    5. ``score_j = s_j / deg_j`` with ``deg_j`` the number of edges of ``j``, self included;
    6. each graph keeps its top scores; ties go to the lower index.

    The stage's free budget (``budget`` minus protected tokens) is split over the graphs in
    proportion to their sizes (largest remainder), so the total is exactly the budget. If the budget
    exceeds the graph tokens, unprotected newline tokens fill the rest in sequence order. Without a
    layout, all unprotected tokens of a sample form one graph.

    Cost per graph: ``O(n² D)`` for the similarities, ``O(iterations · n²)`` for the propagation,
    ``O(n²)`` memory.
    """

    name = "gprune"
    capabilities = Capabilities(insertion_points=frozenset({"post_projector", "layer"}))

    class Params(ReducerParams):
        threshold: float = Field(
            default=0.5,
            ge=-1.0,
            le=1.0,
            description="Cosine-similarity threshold of an edge (official code 0.5; the paper's best is 0.7).",
        )
        temperature: float = Field(default=0.03, gt=0.0, description="Softmax temperature of the edge weights.")
        iterations: int = Field(default=5, ge=0, description="Propagation steps t (0: the norms divided by degree).")

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Select per sample; see the class docstring. ``tokens`` is ``(B, N, D)``."""
        x = tokens.detach()
        check_finite_tokens(x, ctx, self.name)
        keep = torch.zeros(ctx.valid.shape, dtype=torch.bool, device=x.device)
        for b in range(ctx.batch_size):
            always, chosen = spatial_quotas(ctx, b)
            keep[b, always] = True
            for members, quota in chosen:
                scores = gprune_scores(
                    x[b, members], self.params.threshold, self.params.temperature, self.params.iterations
                )
                order = torch.argsort(scores, descending=True, stable=True)
                keep[b, members[order[:quota]]] = True
        return Selection.from_mask(keep)

    def overhead_macs(self, tokens: Tensor, ctx: ReduceContext) -> int:
        """``n² D`` (similarities) plus ``iterations · n²`` (propagation) per graph that selects."""
        total = 0
        dim = int(tokens.shape[-1])
        for b in range(ctx.batch_size):
            for members, _ in spatial_quotas(ctx, b)[1]:
                n = int(members.numel())
                total += n * n * dim + self.params.iterations * n * n
        return total


def gprune_scores(x: Tensor, threshold: float, temperature: float, iterations: int) -> Tensor:
    """G-Prune scores of one graph.

    Args:
        x: ``(n, D)`` token features (any float dtype; computed in float32).
        threshold: Edges need a cosine similarity ``>= threshold``; self-loops always exist.
        temperature: Softmax temperature of the row normalisation.
        iterations: Propagation steps.

    Returns:
        ``(n,)`` float32: propagated norms divided by each node's degree.
    """
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)  # no overflow in the squares
    unit = torch.nn.functional.normalize(x / scale, dim=-1)
    logits = unit @ unit.T  # (n, n) cosine similarities, turned into edge logits in place below
    no_edge = logits < threshold
    no_edge.diagonal().fill_(False)  # self-loops always
    degree = x.shape[0] - no_edge.sum(-1, dtype=torch.float32)
    logits.div_(temperature).masked_fill_(no_edge, float("-inf"))
    weights = torch.softmax(logits, dim=-1)  # (n, n) row-stochastic
    s = torch.linalg.vector_norm(x / scale, dim=-1) * scale.squeeze(-1)
    for _ in range(iterations):
        s = s @ weights
    return s / degree


@tokenprune.hookimpl
def tokenprune_register_reducers(registry: tokenprune.plugins.ReducerRegistry) -> None:
    registry.add(GPrune)
