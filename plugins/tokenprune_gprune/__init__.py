"""The ``gprune`` reducer: G-Prune, graph-based information propagation over the visual tokens.

G-Prune (Jiang et al., AAAI 2025, https://arxiv.org/abs/2501.02268; official code
https://github.com/jytmelon/G-Prune, ``LLaVA-NeXT/llava/model/llava_arch.py``). Packaged exactly as a
third-party plugin: this module is the entry point ``gprune`` of the ``tokenprune`` group, and
registers its reducer through the hook.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ReducerInputError, ReducerParams, Selection, TokenReducer
from tokenprune.budget import all_spatial_quotas, split_budget
from tokenprune.layout import TokenLayout
from tokenprune.similarity import symmetric_products
from tokenprune.validation import check_finite_tokens


class GPrune(TokenReducer):
    """Keep the tokens that collect the most "information" propagated over a similarity graph.

    Per sample, the visual tokens are split into graphs, one per ``(image, view)`` of the layout
    (LLaVA-NeXT: the base view and the high-resolution grid are separate graphs). Row-end newline
    tokens never enter a graph; protected tokens are always kept. For each graph of ``n`` tokens
    ``X`` (``(n, D)``):

    1. ``S = X̃ X̃ᵀ``, the cosine similarities (``X̃`` row-normalised);
    2. ``A_ij = S_ij`` where ``S_ij >= threshold`` (the diagonal always), otherwise no edge;
    3. ``P = rowsoftmax(A / temperature)`` over the edges only;
    4. ``s⁰ = (||x_i||₂)_i``, then ``s^t = s^{t-1} P`` for ``iterations`` steps (vector-matrix
       products, never a matrix power);
    5. ``score_j = s_j / deg_j`` with ``deg_j`` the number of edges of ``j``, self included;
    6. each graph keeps its top scores; ties go to the lower index.

    ``precision`` sets the dtype of steps 1-3 and of the degree: ``float32`` (default), or half
    precision as in the official fp16 code (``float16``, or ``model``: the tokens' dtype when it is
    float16 or bfloat16), where the degree counts the edges whose softmax weight is not 0, so weak
    edges that underflow drop out of it as there. The norms and the propagation stay float32.

    ``budget: stage`` (default): the stage's free budget (``budget`` minus protected tokens) is
    split over the graphs in proportion to their sizes (largest remainder), so the total is the
    stage's budget; if it exceeds the graph tokens, unprotected newline tokens fill the rest in
    sequence order. ``budget: official``: each graph keeps ``int(keep * n)`` of its own tokens (the
    official code's ``keep_ratio``) and every newline and protected token is kept on top; the
    reducer's :meth:`stage_budget` declares that count. Without a layout, all unprotected tokens of
    a sample form one graph.

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
        budget: Literal["stage", "official"] = Field(
            default="stage",
            description=(
                "'stage': the stage's budget, newlines included, split over the graphs; 'official': each graph "
                "keeps int(keep * its tokens) and every newline is kept on top (the official code)."
            ),
        )
        precision: Literal["float32", "float16", "model"] = Field(
            default="float32",
            description=(
                "Dtype of the similarity graph: 'float32', or half precision as in the official fp16 code "
                "('float16'; 'model': the tokens' dtype when it is float16 or bfloat16), where edges whose "
                "softmax weight underflows to 0 leave the degree."
            ),
        )

    def stage_budget(self, keep: float | int, valid: Tensor, protected: Tensor, layout: TokenLayout | None) -> Tensor:
        """``budget: stage``: the default rule. ``budget: official``: the kept newline and protected
        tokens plus ``int(keep * n)`` of each graph of ``n`` tokens (see :func:`official_quotas`)."""
        if self.params.budget == "stage":
            return super().stage_budget(keep, valid, protected, layout)
        counts = []
        for b in range(int(valid.shape[0])):
            always, graphs = official_graphs(valid[b], protected[b], layout, b)
            quotas = official_quotas(keep, [int(g.numel()) for g in graphs], int(always.numel()))
            counts.append(int(always.numel()) + sum(quotas))
        return torch.tensor(counts, dtype=torch.long, device=valid.device)

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Select per sample; see the class docstring. ``tokens`` is ``(B, N, D)``."""
        x = tokens.detach()
        check_finite_tokens(x, ctx, self.name)
        dtype = self._graph_dtype(x)
        keep = torch.zeros(ctx.valid.shape, dtype=torch.bool, device=x.device)
        for b, (always, chosen) in enumerate(self._plans(ctx)):
            keep[b, always] = True
            for members, quota in chosen:
                p = self.params
                scores = gprune_scores(x[b, members], p.threshold, p.temperature, p.iterations, dtype)
                order = torch.argsort(scores, descending=True, stable=True)
                keep[b, members[order[:quota]]] = True
        return Selection.from_mask(keep)

    def overhead_macs(self, tokens: Tensor, ctx: ReduceContext) -> int:
        """``n² D`` (similarities) plus ``iterations · n²`` (propagation) per graph that selects."""
        total = 0
        dim = int(tokens.shape[-1])
        for _, chosen in self._plans(ctx):
            for members, _ in chosen:
                n = int(members.numel())
                total += n * n * dim + self.params.iterations * n * n
        return total

    def _plans(self, ctx: ReduceContext) -> list[tuple[Tensor, list[tuple[Tensor, int]]]]:
        """Each sample's tokens kept without condition, and each graph that selects with its quota."""
        if self.params.budget == "stage":
            return all_spatial_quotas(ctx)
        return [self._plan(ctx, b) for b in range(ctx.batch_size)]

    def _plan(self, ctx: ReduceContext, b: int) -> tuple[Tensor, list[tuple[Tensor, int]]]:
        """``budget: official``: sample ``b``'s tokens kept without condition, and each graph that selects."""
        if ctx.keep is None:
            raise ReducerInputError(
                f"reducer {self.name!r}: budget 'official' needs the stage's keep in ctx.keep, which tokenprune.apply "
                "sets; pass keep=... to a ReduceContext built by hand"
            )
        always, graphs = official_graphs(ctx.valid[b], ctx.protected[b], ctx.layout, b)
        quotas = official_quotas(ctx.keep, [int(g.numel()) for g in graphs], int(always.numel()))
        whole = [g for g, q in zip(graphs, quotas, strict=True) if q >= g.numel()]
        chosen = [(g, q) for g, q in zip(graphs, quotas, strict=True) if 0 < q < g.numel()]
        return torch.cat([always, *whole]), chosen

    def _graph_dtype(self, x: Tensor) -> torch.dtype:
        if self.params.precision == "float16":
            return torch.float16
        if self.params.precision == "model" and x.dtype in (torch.float16, torch.bfloat16):
            return x.dtype
        return torch.float32

    def token_graph(self, features: Tensor, threshold: float | None = None) -> tuple[Tensor, Tensor]:
        """This reducer's graph on ``(n, D)`` ``features`` as one graph (float32): ``(degree, score)``, both ``(n,)``;
        ``threshold`` overrides the params' (an analysis may probe beyond the ``[-1, 1]`` a pipeline allows).
        For :func:`tokenprune.synth.background.graph_degrees`."""
        p = self.params
        weights, degree, norms = gprune_graph(features, p.threshold if threshold is None else threshold, p.temperature)
        return degree, propagate(weights, degree, norms, p.iterations)


def official_graphs(
    valid: Tensor, protected: Tensor, layout: TokenLayout | None, b: int
) -> tuple[Tensor, list[Tensor]]:
    """One sample's graphs as the official code forms them (``budget: official``).

    Args:
        valid: ``(N,)`` bool, the sample's real tokens (first in its row).
        protected: ``(N,)`` bool, its protected tokens.
        layout: The batch's layout, or ``None`` (then one graph).
        b: The sample's row in ``layout``.

    Returns:
        ``(always, graphs)``: the indices kept on top of the budget (every newline and protected
        token), and the unprotected non-newline tokens of each ``(image, view)``, in layout order.
    """
    n = int(valid.sum())
    device = valid.device
    newline = layout.newline[b, :n] if layout is not None else torch.zeros(n, dtype=torch.bool, device=device)
    always = (protected[:n] | newline).nonzero().squeeze(1)
    members = (~protected[:n] & ~newline).nonzero().squeeze(1)
    if not members.numel():
        return always, []
    if layout is None:
        return always, [members]
    image, view = layout.image[b, :n], layout.view[b, :n]
    key = image[members] * (int(view.max()) + 1) + view[members]
    _, inverse = torch.unique(key, return_inverse=True)
    return always, [members[inverse == g] for g in range(int(inverse.max()) + 1)]


def official_quotas(keep: float | int, sizes: list[int], always: int) -> list[int]:
    """How many tokens each graph keeps under ``budget: official``.

    A fraction keeps ``int(keep * n)`` of a graph of ``n`` tokens, as the official code's
    ``int(keep_ratio * 576)`` (no tolerance for binary representation error, possibly 0); a count
    is the graph tokens kept in all, split over the graphs by largest remainder. If nothing at all
    would be kept (``always`` is 0 and every quota 0), the largest graph keeps one token, so a
    sample never loses all its visual tokens.
    """
    if isinstance(keep, int) and not isinstance(keep, bool):
        return split_budget(min(keep, sum(sizes)), sizes)
    quotas = [int(keep * size) for size in sizes]
    if not always and sizes and not any(quotas):
        quotas[max(range(len(sizes)), key=lambda g: (sizes[g], -g))] = 1
    return quotas


def gprune_scores(
    x: Tensor, threshold: float, temperature: float, iterations: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """G-Prune scores of one graph.

    Args:
        x: ``(n, D)`` token features (any float dtype).
        threshold: Edges need a cosine similarity ``>= threshold``; self-loops always exist.
        temperature: Softmax temperature of the row normalisation.
        iterations: Propagation steps.
        dtype: Dtype of the graph (:func:`gprune_graph`); the propagation is float32.

    Returns:
        ``(n,)`` float32: propagated norms divided by each node's degree.
    """
    return propagate(*gprune_graph(x, threshold, temperature, dtype), iterations)


def propagate(weights: Tensor, degree: Tensor, norms: Tensor, iterations: int) -> Tensor:
    """G-Prune's scores from its graph (:func:`gprune_graph`): the norms propagated ``iterations`` times
    over the weights, divided by each node's degree."""
    s = norms
    for _ in range(iterations):
        s = s @ weights
    return s / degree


def gprune_graph(
    x: Tensor, threshold: float, temperature: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """The propagation matrix, degrees and initial norms of one graph.

    In float32, the degree is the number of edges (similarity ``>= threshold``, self included). In
    float16 or bfloat16, the similarities and the softmax are computed in that dtype as in the
    official code (``F.normalize``, ``A / temperature``, ``softmax``) and the degree counts the
    weights that are not 0, the official ``sum(A > 0)``: in float16 an edge whose weight underflows
    leaves the degree.

    Args:
        x: ``(n, D)`` token features (any float dtype).
        threshold: Edges need a cosine similarity ``>= threshold``; self-loops always exist.
        temperature: Softmax temperature of the row normalisation.
        dtype: ``torch.float32``, ``torch.float16`` or ``torch.bfloat16``.

    Returns:
        ``(weights, degree, norms)``: ``(n, n)`` row-stochastic float32 weights (0 off the edges),
        ``(n,)`` float32 degrees and ``(n,)`` float32 L2 norms of ``x``.
    """
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)  # no overflow in the squares
    scaled = x / scale
    norms = torch.linalg.vector_norm(scaled, dim=-1) * scale.squeeze(-1)
    if dtype == torch.float32:
        unit = torch.nn.functional.normalize(scaled, dim=-1)
        logits = symmetric_products(unit)  # (n, n), half the products of unit @ unit.T; edge logits in place below
        no_edge = logits < threshold
        no_edge.diagonal().fill_(False)  # self-loops always
        degree = x.shape[0] - no_edge.sum(-1, dtype=torch.float32)
        logits.div_(temperature).masked_fill_(no_edge, float("-inf"))
        return torch.softmax(logits, dim=-1), degree, norms
    # F.normalize of the half features, as the official code; rows whose norm would overflow the
    # dtype are first divided by a power of two (exact, so nothing else changes).
    limit = torch.finfo(dtype).max
    overflow = scale * math.sqrt(x.shape[-1]) >= limit / 2
    unit = torch.nn.functional.normalize(
        (x / torch.where(overflow, torch.exp2(scale.log2().ceil()), 1.0)).to(dtype), dim=-1
    )
    sim = unit @ unit.T
    no_edge = sim < threshold
    no_edge.diagonal().fill_(False)
    # Clamped: a tiny temperature must not turn logits into inf - inf = NaN.
    logits = (sim / temperature).clamp_(-limit, limit).masked_fill_(no_edge, float("-inf"))
    weights = torch.softmax(logits, dim=-1)  # in ``dtype``: weak edges may underflow to exactly 0
    return weights.float(), (weights > 0).sum(-1, dtype=torch.float32), norms


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(GPrune)


@tokenprune.hookimpl
def tokenprune_register_pipelines(registry: tokenprune.plugins.PipelineRegistry) -> None:
    for pruned in (50, 70, 90):
        stage = {
            "at": "post_projector",
            "reducer": "gprune",
            "keep": (100 - pruned) / 100,
            "params": {"budget": "official", "precision": "model"},
        }
        registry.add(
            f"gprune-{pruned}",
            {"stages": [stage]},
            paper="G-Prune (Jiang et al., AAAI 2025), https://arxiv.org/abs/2501.02268",
            table=f"Table 1, LLaVA-NeXT-8B, {pruned}% of the visual tokens pruned",
            description=f"G-Prune after the projector, {pruned}% pruned per graph as the official code counts",
        )
