"""The example plugin's own tests, as a third party would write them."""

import pytest
import torch
from tokenprune_example_reducer import CentroidDistance

from tokenprune import ReducerInputError
from tokenprune.testing import check_reducer


@pytest.mark.parametrize("params", [{}, {"metric": "l2"}, {"largest": False}])
def test_contract(params):
    check_reducer(CentroidDistance, params)


def test_keeps_the_outlier(make_reduce_inputs):
    tokens, ctx = make_reduce_inputs(grids=[(2, 4)], newlines=False, keep=1)
    tokens = torch.ones_like(tokens)
    tokens[0, 5] = -1.0  # one token points the other way
    assert CentroidDistance().reduce(tokens, ctx).tolist() == [[5]]
    assert CentroidDistance({"metric": "l2"}).reduce(tokens, ctx).tolist() == [[5]]
    assert CentroidDistance({"largest": False}).reduce(tokens, ctx).tolist() == [[0]]


def test_rejects_infinite_features(make_reduce_inputs):
    tokens, ctx = make_reduce_inputs()
    tokens[1, 2, 0] = float("inf")
    with pytest.raises(ReducerInputError, match="NaN or infinite"):
        CentroidDistance().reduce(tokens, ctx)
