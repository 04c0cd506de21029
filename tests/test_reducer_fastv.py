"""FastV: keeps exactly the top-attention tokens of the chosen probe source; layer stages only."""

from __future__ import annotations

import pytest
import torch
from tokenprune_fastv import FastV

import tokenprune as tp
from tokenprune import InsertionPoint, PipelineError, ReduceContext, ReducerInputError
from tokenprune.testing import check_reducer, dense_context, make_reduce_inputs


def context(attention: dict[str, torch.Tensor], budget: list[int], protected=None) -> ReduceContext:
    n = next(iter(attention.values())).shape[1]
    return dense_context(n, budget, at=InsertionPoint("layer", 2), attention=attention, protected=protected)


@pytest.mark.parametrize("seed", range(5))
def test_keeps_exactly_the_top_attention_tokens(seed):
    gen = torch.Generator().manual_seed(seed)
    attention = torch.rand(2, 30, generator=gen).softmax(-1)
    ctx = context({"last": attention}, [7, 12])
    kept = FastV().reduce(torch.randn(2, 30, 8), ctx).tolist()
    for row, k, got in zip(attention.tolist(), (7, 12), kept, strict=True):
        top = sorted(range(30), key=lambda i: -row[i])[:k]
        assert got == sorted(top)


def test_source_selects_the_probe_rows():
    last = torch.tensor([[0.1, 0.5, 0.2, 0.2]])
    everyone = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    ctx = context({"last": last, "all": everyone}, [2])
    tokens = torch.randn(1, 4, 3)
    assert FastV().reduce(tokens, ctx).tolist() == [[1, 2]]  # 0.5, then the 0.2 tie to the lower index
    assert FastV({"source": "all"}).reduce(tokens, ctx).tolist() == [[0, 2]]
    assert FastV().attention_sources() == {"last"}
    assert FastV({"source": "all"}).attention_sources() == {"all"}
    assert FastV.capabilities.attention == {"last"} and FastV.capabilities.insertion_points == {"layer"}


def test_protected_tokens_are_kept_first():
    attention = torch.tensor([[0.0, 0.1, 0.6, 0.3]])
    protected = torch.tensor([[True, False, False, False]])
    assert FastV().reduce(torch.randn(1, 4, 3), context({"last": attention}, [2], protected)).tolist() == [[0, 2]]


def test_features_are_not_read():
    attention = torch.tensor([[0.1, 0.6, 0.3]])
    tokens = torch.full((1, 3, 2), float("nan"))
    assert FastV().reduce(tokens, context({"last": attention}, [1])).tolist() == [[1]]


def test_missing_or_bad_attention_is_a_clear_error():
    ctx = context({"all": torch.rand(1, 4)}, [2])
    with pytest.raises(ReducerInputError, match=r"'fastv'.*no 'last' attention"):
        FastV().reduce(torch.randn(1, 4, 3), ctx)
    nan = torch.tensor([[0.1, float("nan"), 0.2, 0.3]])
    with pytest.raises(ReducerInputError, match=r"'fastv'"):
        FastV().reduce(torch.randn(1, 4, 3), context({"last": nan}, [2]))


def test_edge_cases():
    one = context({"last": torch.tensor([[1.0]])}, [1])
    assert FastV().reduce(torch.randn(1, 1, 2), one).tolist() == [[0]]
    ties = context({"last": torch.full((1, 5), 0.2)}, [3])
    assert FastV().reduce(torch.randn(1, 5, 2), ties).tolist() == [[0, 1, 2]]
    tokens, ctx = make_reduce_inputs(keep=1.0, at=InsertionPoint("layer", 2), attention_sources=["last"])
    assert FastV().reduce(tokens, ctx).counts.tolist() == ctx.num_valid.tolist()


def test_pipeline_rejects_post_projector():
    with pytest.raises(PipelineError, match=r"fastv"):
        tp.load_pipeline({"stages": [{"at": "post_projector", "reducer": "fastv", "keep": 0.5}]})
    tp.load_pipeline({"stages": [{"at": {"layer": 2}, "reducer": "fastv", "keep": 0.5, "params": {"source": "all"}}]})
    with pytest.raises(PipelineError, match=r"source"):
        tp.load_pipeline({"stages": [{"at": {"layer": 2}, "reducer": "fastv", "keep": 0.5, "params": {"source": "x"}}]})


@pytest.mark.parametrize("params", [{}, {"source": "all"}, {"source": "text"}])
def test_contract(params):
    check_reducer(FastV, params)
