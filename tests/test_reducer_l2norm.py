"""l2norm: keeps the largest (or smallest) norms of the tensor it is given; contract."""

from __future__ import annotations

import pytest
import torch
from tokenprune_l2norm import L2Norm

from tokenprune import InsertionPoint, ReducerInputError
from tokenprune.testing import check_reducer, make_reduce_inputs


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_keeps_the_extreme_norms(largest, seed):
    tokens, ctx = make_reduce_inputs(keep=0.4, seed=seed, protect_newlines=False)
    kept = L2Norm({"largest": largest}).reduce(tokens, ctx).tolist()
    for b, got in enumerate(kept):
        n, k = int(ctx.num_valid[b]), int(ctx.budget[b])
        norms = [float(torch.sqrt((tokens[b, i] ** 2).sum())) for i in range(n)]
        ranked = sorted(range(n), key=lambda i: -norms[i] if largest else norms[i])
        assert got == sorted(ranked[:k])


def test_by_hand_with_protected_tokens():
    tokens, ctx = make_reduce_inputs(grids=[(1, 4)], keep=2, dim=2)  # 4 grid tokens + 1 protected newline
    tokens[0, :5] = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.0, 0.5], [0.0, 0.0]])
    assert L2Norm().reduce(tokens, ctx).tolist() == [[2, 4]]  # norm 10, then the protected newline
    assert L2Norm({"largest": False}).reduce(tokens, ctx).tolist() == [[3, 4]]  # norm 0.5


def test_hidden_states_at_a_layer_are_ranked_the_same_way():
    tokens, ctx = make_reduce_inputs(keep=0.5, at=InsertionPoint("layer", 3), protect_newlines=False)
    scores = L2Norm().score(tokens, ctx)
    torch.testing.assert_close(scores[ctx.valid], tokens.norm(dim=-1)[ctx.valid])


def test_edge_cases():
    tokens, ctx = make_reduce_inputs(grids=[(1, 1)], newlines=False, keep=1)
    assert L2Norm().reduce(tokens, ctx).tolist() == [[0]]
    tokens, ctx = make_reduce_inputs(grids=[(2, 3)], newlines=False, keep=3)
    assert L2Norm().reduce(torch.ones_like(tokens), ctx).tolist() == [[0, 1, 2]]  # ties: lower index
    assert L2Norm().reduce(tokens, make_reduce_inputs(grids=[(2, 3)], newlines=False, keep=1.0)[1]).counts.tolist() == [
        6
    ]
    big = tokens.to(torch.bfloat16) * 1e30  # float32 norms of huge bf16 features do not overflow
    expected = L2Norm().reduce(tokens.to(torch.bfloat16), ctx).tolist()
    assert L2Norm().reduce(big, ctx).tolist() == expected
    assert bool(torch.isfinite(L2Norm().score(big, ctx)).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_rejected(bad):
    tokens, ctx = make_reduce_inputs()
    tokens[2, 5, 3] = bad
    with pytest.raises(ReducerInputError, match=r"'l2norm'.*token 5 of sample 2"):
        L2Norm().reduce(tokens, ctx)


@pytest.mark.parametrize("params", [{}, {"largest": False}])
def test_contract(params):
    check_reducer(L2Norm, params)
