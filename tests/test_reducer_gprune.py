"""G-Prune: hand-computed graphs, an independent loop implementation, budgets, layout groups, contract."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from tokenprune_gprune import GPrune, gprune_scores

from tokenprune import ReducerInputError, TokenLayout
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
