"""G-Prune: hand-computed graphs, an independent loop implementation, budgets, layout groups, contract."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from pydantic import ValidationError
from tokenprune_gprune import GPrune, gprune_graph, gprune_scores, official_quotas

from tokenprune import InsertionPoint, ReduceContext, ReducerInputError, TokenLayout
from tokenprune.testing import check_reducer
from tokenprune.testing import dense_context as context


def reference_scores(x: list[list[float]], threshold: float, temperature: float, iterations: int) -> list[float]:
    """The algorithm of the paper/official code written with plain loops (no tensors, no matrix power)."""
    n = len(x)
    norms = [math.sqrt(sum(v * v for v in row)) for row in x]
    cos = [
        [sum(a * b for a, b in zip(x[i], x[j], strict=True)) / (norms[i] * norms[j]) for j in range(n)]
        for i in range(n)
    ]
    edge = [[i == j or cos[i][j] >= threshold for j in range(n)] for i in range(n)]
    weights = []
    for i in range(n):
        exps = [math.exp((cos[i][j] - 1.0) / temperature) if edge[i][j] else 0.0 for j in range(n)]
        total = sum(exps)
        weights.append([e / total for e in exps])
    s = list(norms)
    for _ in range(iterations):
        s = [sum(s[i] * weights[i][j] for i in range(n)) for j in range(n)]
    degree = [sum(edge[i]) for i in range(n)]
    return [s[j] / degree[j] for j in range(n)]


# Six tokens in three orthogonal clusters: {0, 1, 2} along e1 (norms 1, 2, 3), {3, 4} along e2
# (norms 4, 4) and {5} along e3 (norm 1.5). Within a cluster every similarity is 1, so each row of
# the softmax is uniform over the cluster and one step already averages the cluster's norms:
#   cluster {0,1,2}: mean 2, degree 3 -> 2/3;  cluster {3,4}: mean 4, degree 2 -> 2;  {5}: 1.5 / 1.
CLUSTERS = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0], [0, 4.0, 0], [0, 4.0, 0], [0, 0, 1.5]])


def test_six_token_graph_by_hand():
    scores = gprune_scores(CLUSTERS, threshold=0.5, temperature=0.03, iterations=5)
    torch.testing.assert_close(scores, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0, 2.0, 1.5]))
    no_propagation = gprune_scores(CLUSTERS, threshold=0.5, temperature=0.03, iterations=0)
    torch.testing.assert_close(no_propagation, torch.tensor([1 / 3, 2 / 3, 1.0, 2.0, 2.0, 1.5]))
    kept = [GPrune().reduce(CLUSTERS[None], context(6, k)).tolist()[0] for k in range(1, 7)]
    assert kept == [[3], [3, 4], [3, 4, 5], [0, 3, 4, 5], [0, 1, 3, 4, 5], [0, 1, 2, 3, 4, 5]]


def test_two_step_propagation_by_hand():
    """Three tokens where the graph is a path 0 - 1 - 2 (0 and 2 are not linked)."""
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])  # cos(0,1) = cos(1,2) = 0.707, cos(0,2) = 0
    tau = 1.0
    e = math.exp(math.sqrt(0.5) - 1.0)  # weight of a 0.707 edge relative to a self-loop (logit 1)
    # Rows of P: 0 -> {0: 1, 1: e}/(1+e); 1 -> {0: e, 1: 1, 2: e}/(1+2e); 2 -> {1: e, 2: 1}/(1+e).
    p = [
        [1 / (1 + e), e / (1 + e), 0],
        [e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)],
        [0, e / (1 + e), 1 / (1 + e)],
    ]
    s = [1.0, math.sqrt(2), 2.0]
    for _ in range(2):
        s = [sum(s[i] * p[i][j] for i in range(3)) for j in range(3)]
    expected = torch.tensor([s[0] / 2, s[1] / 3, s[2] / 2])
    torch.testing.assert_close(gprune_scores(x, threshold=0.5, temperature=tau, iterations=2), expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("threshold", "temperature", "iterations"), [(0.5, 0.03, 5), (0.1, 0.5, 3), (0.7, 0.1, 0)])
def test_scores_match_a_loop_implementation(seed, threshold, temperature, iterations):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64) + 0.5
    expected = reference_scores(x.tolist(), threshold, temperature, iterations)
    torch.testing.assert_close(
        gprune_scores(x, threshold, temperature, iterations),
        torch.tensor(expected, dtype=torch.float32),
        rtol=1e-4,
        atol=1e-5,
    )


def test_propagation_equals_matrix_power():
    """t vector-matrix products equal w · P^t (what the official code computes with matrix_power)."""
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(3))
    unit = torch.nn.functional.normalize(x, dim=-1)
    sim = unit @ unit.T
    edges = (sim >= 0.2) | torch.eye(12, dtype=torch.bool)
    p = torch.softmax((sim / 0.1).masked_fill(~edges, -5000.0), -1).double()
    expected = (x.norm(dim=-1).double() @ torch.linalg.matrix_power(p, 4)) / edges.sum(-1)
    torch.testing.assert_close(gprune_scores(x, 0.2, 0.1, 4).double(), expected, rtol=1e-4, atol=1e-6)


def llava_next_layout() -> TokenLayout:
    """A base view 2x2 (view 0) then a 2x3 high-res grid with a newline per row (view 1): 4 + 8 tokens."""
    base = TokenLayout.grid(2, 2)
    hires = TokenLayout.grid(2, 3, newlines=True, view=1)
    return TokenLayout.cat([base, hires])


def test_views_are_separate_graphs_and_newlines_are_kept():
    layout = llava_next_layout()
    x = torch.randn(1, 12, 6, generator=torch.Generator().manual_seed(0))
    newline = layout.newline
    ctx = context(12, 2 + 5, protected=newline.clone(), layout=layout)  # 2 newlines + 5 free: 4:6 split -> 2 + 3
    kept = GPrune().reduce(x, ctx).tolist()[0]
    base_scores = gprune_scores(x[0, :4], 0.5, 0.03, 5)
    hires_idx = torch.tensor([4, 5, 6, 8, 9, 10])
    hires_scores = gprune_scores(x[0, hires_idx], 0.5, 0.03, 5)
    expected = base_scores.argsort(descending=True, stable=True)[:2].tolist()
    expected += hires_idx[hires_scores.argsort(descending=True, stable=True)[:3]].tolist()
    assert kept == sorted([*expected, 7, 11])


def test_unprotected_newlines_stay_out_of_the_graphs():
    layout = llava_next_layout()
    x = torch.randn(1, 12, 6, generator=torch.Generator().manual_seed(1))
    x[0, 7] = x[0, 11] = 100.0  # huge newline features would win any norm-based ranking
    kept = GPrune().reduce(x, context(12, 6, layout=layout)).tolist()[0]
    assert 7 not in kept and 11 not in kept and len(kept) == 6
    # Only when the budget exceeds the grid tokens do newlines fill it, in sequence order.
    assert GPrune().reduce(x, context(12, 11, layout=layout)).tolist()[0] == [i for i in range(12) if i != 11]


def test_without_layout_one_graph():
    x = torch.randn(1, 10, 5, generator=torch.Generator().manual_seed(2))
    kept = GPrune().reduce(x, context(10, 4)).tolist()[0]
    assert kept == sorted(gprune_scores(x[0], 0.5, 0.03, 5).argsort(descending=True, stable=True)[:4].tolist())


def test_edge_cases():
    one = torch.randn(1, 1, 4)
    assert GPrune().reduce(one, context(1, 1)).tolist() == [[0]]
    x = torch.randn(1, 5, 4)
    assert GPrune().reduce(x, context(5, 5)).tolist() == [[0, 1, 2, 3, 4]]
    identical = torch.ones(1, 6, 4)
    assert GPrune().reduce(identical, context(6, 3)).tolist() == [[0, 1, 2]]  # ties go to the lower index
    zeros = torch.zeros(1, 4, 4)  # zero vectors: no NaN from the normalisation
    assert GPrune().reduce(zeros, context(4, 2)).tolist() == [[0, 1]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_are_rejected(bad):
    x = torch.randn(1, 5, 4)
    x[0, 3, 1] = bad
    with pytest.raises(ReducerInputError, match=r"'gprune'.*token 3 of sample 0"):
        GPrune().reduce(x, context(5, 2))


@pytest.mark.parametrize("params", [{"threshold": 1.5}, {"threshold": -1.1}, {"temperature": 0.0}, {"iterations": -1}])
def test_params_are_validated(params):
    with pytest.raises(ValidationError):
        GPrune(params)


def test_defaults_are_the_official_code():
    assert GPrune().params.model_dump() == {
        "threshold": 0.5,
        "temperature": 0.03,
        "iterations": 5,
        "budget": "stage",
        "precision": "float32",
    }


@pytest.mark.parametrize("params", [{}, {"threshold": 0.7}, {"threshold": -1.0, "iterations": 0}])
def test_contract(params):
    check_reducer(GPrune, params)


def test_huge_features_do_not_overflow():
    x = CLUSTERS * 1e30
    scores = gprune_scores(x, threshold=0.5, temperature=0.03, iterations=5)
    torch.testing.assert_close(scores / 1e30, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0, 2.0, 1.5]))


# --- official modes: budget: official and precision: float16 / model -------------------------------


def official_selection(
    feature: torch.Tensor,
    base_len: int,
    rows: int,
    cols: int,
    keep_ratio: float,
    similarity: float = 0.5,
    temperature: float = 0.03,
    iterate_num: int = 5,
) -> list[int]:
    """The official selection (G-Prune's LLaVA-NeXT fork, ``llava_arch.py`` lines 228-277), line by line.

    ``feature`` is one image: a base view of ``base_len`` tokens, then a ``rows x cols`` grid with a
    newline after each row. Computes in ``feature``'s dtype, as the official code in the model's.
    """
    mask = torch.zeros(rows, cols + 1)
    mask[:, -1] = 1
    mask = mask.flatten()
    index1 = torch.arange(0, base_len)
    index2 = torch.where(mask == 0)[0] + base_len
    row_end = torch.where(mask == 1)[0] + base_len
    kept = []
    for index, count in ((index1, int(keep_ratio * base_len)), (index2, int(keep_ratio * rows * cols))):
        normalized = torch.nn.functional.normalize(feature[index], p=2, dim=1)
        a = normalized @ normalized.t()
        a[a < similarity] = 0
        a = a / temperature
        a[abs(a) < 1e-6] = -5000
        a = torch.nn.functional.softmax(a, dim=1)
        degree = torch.sum(a > 0, dim=1)
        a = torch.matrix_power(a, iterate_num)
        w = torch.norm(feature[index], dim=-1).view(1, -1).to(dtype=a.dtype)
        result = (w @ a) / degree
        kept.append(index[result.topk(count).indices.flatten()])
    return torch.sort(torch.cat((*kept, row_end)))[0].tolist()


def official_context(reducer: GPrune, layout: TokenLayout, keep: float | int, protect: bool = True) -> ReduceContext:
    """What the engine builds for one sample: the budget from the reducer's stage_budget, and keep."""
    valid = torch.ones(layout.shape, dtype=torch.bool)
    protected = layout.newline.clone() if protect else torch.zeros_like(valid)
    budget = reducer.stage_budget(keep, valid, protected, layout)
    return ReduceContext(
        at=InsertionPoint("post_projector"),
        budget=budget,
        valid=valid,
        protected=protected,
        sizes=valid.float(),
        layout=layout,
        keep=keep,
    )


def anyres_layout(base: int, rows: int, cols: int) -> TokenLayout:
    """LLaVA-NeXT's layout: a ``base x base`` view, then a ``rows x cols`` grid with a newline per row."""
    return TokenLayout.cat([TokenLayout.grid(base, base), TokenLayout.grid(rows, cols, newlines=True, view=1)])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("keep", [0.1, 0.29, 0.5, 0.77])
@pytest.mark.parametrize("protect", [True, False])
def test_official_budget_matches_the_official_code(seed, keep, protect):
    layout = anyres_layout(4, 6, 5)  # 16 + 6 x (5 + 1) = 52 tokens
    x = torch.randn(1, 52, 8, generator=torch.Generator().manual_seed(seed))
    reducer = GPrune({"budget": "official"})
    ctx = official_context(reducer, layout, keep, protect)
    expected = official_selection(x[0], 16, 6, 5, keep)
    # int(0.29 * 30) = 8 (8.7); no tolerance either way. Every newline is kept, protected or not.
    assert int(ctx.budget[0]) == int(keep * 16) + int(keep * 30) + 6 == len(expected)
    assert GPrune({"budget": "official"}).reduce(x, ctx).tolist() == [expected]


def test_official_budget_counts_on_llava_next():
    """The issue's figure: on 576 + 48 x 49 tokens the stage budget keeps 12.8% fewer at keep 0.1."""
    layout = anyres_layout(24, 48, 48)
    valid = torch.ones(layout.shape, dtype=torch.bool)
    newline = layout.newline
    counts = {
        mode: [int(GPrune({"budget": mode}).stage_budget(k, valid, newline, layout)) for k in (0.5, 0.3, 0.1)]
        for mode in ("stage", "official")
    }
    assert counts == {"stage": [1464, 878, 292], "official": [1488, 911, 335]}
    assert round(1 - 292 / 335, 3) == 0.128
    assert int(GPrune().stage_budget(0.1, valid, newline, layout)) == 292  # the default is unchanged


def test_official_budget_with_a_count_and_without_layout():
    reducer = GPrune({"budget": "official"})
    layout = anyres_layout(4, 6, 5)
    x = torch.randn(1, 52, 8, generator=torch.Generator().manual_seed(5))
    ctx = official_context(reducer, layout, 23)  # a count: graph tokens, split 16:30 -> 8 + 15, newlines on top
    assert int(ctx.budget[0]) == 23 + 6
    kept = reducer.reduce(x, ctx).tolist()[0]
    assert sum(1 for i in kept if i < 16) == 8 and len(kept) == 29
    flat = official_context(reducer, TokenLayout.grid(1, 10), 0.35)
    flat = dataclasses.replace(flat, layout=None)
    assert reducer.reduce(x[:, :10], flat).counts.tolist() == [3]


def test_official_quotas():
    assert official_quotas(0.1, [576, 2304], 48) == [57, 230]
    assert official_quotas(0.29, [100], 0) == [28]  # 0.29 * 100 = 28.999999999999996, as int() in the official code
    assert official_quotas(0.1, [3, 4], 0) == [0, 1]  # nothing at all: the largest graph keeps one token
    assert official_quotas(0.1, [3, 4], 2) == [0, 0]  # the newlines already keep the sample alive
    assert official_quotas(1.0, [3, 4], 0) == [3, 4]
    assert official_quotas(100, [3, 4], 0) == [3, 4]


def test_official_budget_needs_the_stage_keep():
    ctx = context(12, 7, layout=llava_next_layout())
    with pytest.raises(ReducerInputError, match=r"'gprune'.*ctx\.keep"):
        GPrune({"budget": "official"}).reduce(torch.randn(1, 12, 4), ctx)


def clustered(seed: int, n: int = 60, dim: int = 64, groups: int = 5) -> torch.Tensor:
    """Groups of near-duplicates (similarity ~0.99) whose centres are 0.53-0.57 apart: every pair of
    tokens is an edge, but in float16 the weights of the between-group edges underflow to 0 (about
    exp(-15) / 10 < 2**-25), so they leave the degree, as on the large uniform regions of real images."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, groups + 1, generator=gen))[0].T  # orthonormal rows
    cos = 0.53 + 0.04 * torch.rand(groups, generator=gen)
    centres = cos.sqrt()[:, None] * basis[0] + (1 - cos).sqrt()[:, None] * basis[1:]
    member = torch.randint(0, groups, (n,), generator=gen)
    scale = 1 + torch.rand(n, 1, generator=gen)
    return (centres[member] + 0.03 * torch.randn(n, dim, generator=gen)) * scale * 3


def official_fp16_graph(x: torch.Tensor, similarity: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official softmax weights and degree, computed in x's (half) dtype as in the official code."""
    normalized = torch.nn.functional.normalize(x, p=2, dim=1)
    a = normalized @ normalized.t()
    a[a < similarity] = 0
    a = a / temperature
    a[abs(a) < 1e-6] = -5000
    a = torch.nn.functional.softmax(a, dim=1)
    return a, torch.sum(a > 0, dim=1)


@pytest.mark.parametrize("seed", range(8))
def test_half_precision_graph_matches_the_official_fp16_code(seed):
    x = clustered(seed).half()
    weights, degree, _ = gprune_graph(x, 0.5, 0.03, torch.float16)
    expected_weights, expected_degree = official_fp16_graph(x, 0.5, 0.03)
    assert degree.tolist() == expected_degree.float().tolist()  # exactly: the same edges underflow
    torch.testing.assert_close(weights, expected_weights.float(), rtol=0, atol=0)
    layout = anyres_layout(4, 4, 11)  # 16 + 4 x 12 = 64 tokens: 16 + 44 features, 4 newlines
    feats = torch.zeros(64, 64, dtype=torch.half)
    feats[~layout.newline[0]] = x
    feats[layout.newline[0]] = 1.0
    reducer = GPrune({"budget": "official", "precision": "float16"})
    kept = reducer.reduce(feats[None], official_context(reducer, layout, 0.3)).tolist()[0]
    assert kept == official_selection(feats, 16, 4, 11, 0.3)


def test_half_precision_drops_weak_edges_from_the_degree_and_changes_the_choice():
    x = clustered(6).half()
    _, half_degree, _ = gprune_graph(x, 0.5, 0.03, torch.float16)
    _, full_degree, _ = gprune_graph(x, 0.5, 0.03)
    assert bool((half_degree <= full_degree).all()) and int((full_degree - half_degree).sum()) > 300
    half = GPrune({"precision": "float16"}).reduce(x[None], context(60, 12)).tolist()
    assert half != GPrune().reduce(x[None], context(60, 12)).tolist()
    model = GPrune({"precision": "model"})
    assert model.reduce(x[None], context(60, 12)).tolist() == half  # 'model' follows the tokens' dtype
    assert (
        model.reduce(x[None].float(), context(60, 12)).tolist()
        == GPrune().reduce(x[None].float(), context(60, 12)).tolist()
    )


def test_half_precision_survives_huge_features_and_a_tiny_temperature():
    x = CLUSTERS * 1e30  # beyond float16's range: rows are rescaled by a power of two first
    scores = gprune_scores(x, 0.5, 0.03, 5, torch.float16)
    torch.testing.assert_close(scores / 1e30, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0, 2.0, 1.5]), rtol=2e-3, atol=0)
    assert bool(torch.isfinite(gprune_scores(torch.randn(7, 4), 0.5, 1e-9, 3, torch.float16)).all())


@pytest.mark.parametrize("params", [{"budget": "official"}, {"precision": "float16"}, {"precision": "model"}])
def test_contract_official_modes(params):
    check_reducer(GPrune, params)
