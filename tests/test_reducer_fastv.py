"""FastV: keeps exactly the top-attention tokens of the chosen probe source; layer stages only."""

from __future__ import annotations

import pytest
import torch
from tokenprune_fastv import FastV, nearest_count

import tokenprune as tp
from tokenprune import InsertionPoint, PipelineError, ReduceContext, ReducerInputError
from tokenprune.budget import budget_per_sample
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


# --- rounding: nearest, the official llava-hf code ---------------------------------------------------


def official_kept_count(image_token_length: int, fastv_r: float) -> int:
    """The official llava-hf ``modeling_llama.py``: ``topk(round(FASTV_image_token_length * (1 - FASTV_r)))``."""
    return round(image_token_length * (1 - fastv_r))


def official_selection(attention_row: torch.Tensor, fastv_r: float) -> list[int]:
    """The image tokens the official code keeps for one sample's last-token attention row."""
    count = official_kept_count(attention_row.shape[0], fastv_r)
    return sorted(attention_row.topk(count).indices.tolist())


def test_nearest_rounds_half_to_even_as_python_round():
    assert [nearest_count(0.5, n) for n in (5, 7, 9, 11)] == [
        2,
        4,
        4,
        6,
    ]  # 2.5, 3.5, 4.5, 5.5; int(x + 0.5): 3, 4, 5, 6
    assert nearest_count(0.1, 15) == official_kept_count(15, 0.9) == 1  # 15 * (1 - 0.9) = 1.4999999999999998
    assert nearest_count(0.3, 45) == official_kept_count(45, 0.7) == 14  # 13.500000000000002
    assert nearest_count(0.25, 576) == 144 and nearest_count(0.001, 100) == 1  # at least one (the official code: 0)


def test_nearest_count_equals_the_official_count_for_every_two_decimal_ratio():
    for hundredths in range(1, 100):
        fastv_r = hundredths / 100
        keep = float(f"{1 - fastv_r:.2f}")  # what a user writes for that R
        for n in range(1, 700):
            expected = max(1, official_kept_count(n, fastv_r))
            assert nearest_count(keep, n) == expected, (fastv_r, n)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("n", "fastv_r"), [(45, 0.7), (576, 0.5), (30, 0.75), (7, 0.5)])
def test_nearest_keeps_what_the_official_code_keeps(seed, n, fastv_r):
    attention = torch.rand(1, n, generator=torch.Generator().manual_seed(seed)).softmax(-1)
    reducer = FastV({"rounding": "nearest"})
    keep = float(f"{1 - fastv_r:.2f}")
    valid = torch.ones(1, n, dtype=torch.bool)
    budget = reducer.stage_budget(keep, valid, torch.zeros_like(valid), None)
    assert budget.tolist() == [official_kept_count(n, fastv_r)]
    kept = reducer.reduce(torch.randn(1, n, 4), context({"last": attention}, budget.tolist())).tolist()
    assert kept == [official_selection(attention[0], fastv_r)]


def test_floor_is_the_default_and_counts_are_not_rounded():
    _, ctx = make_reduce_inputs(keep=0.3, attention_sources=["last"])
    args = (ctx.valid, ctx.protected, ctx.layout)
    assert FastV().params.rounding == "floor"
    assert torch.equal(FastV().stage_budget(0.3, *args), budget_per_sample(0.3, ctx.valid, ctx.protected))
    nearest = FastV({"rounding": "nearest"})
    # Samples of 15, 8 and 20 tokens (3, 2 and 4 newlines, protected). 15 * (1 - 0.7) is
    # 4.500000000000001 in the official code: 5, where floor keeps 4; 2.4 -> 2 (the protected ones).
    assert nearest.stage_budget(0.3, *args).tolist() == [5, 2, 6] == [official_kept_count(n, 0.7) for n in (15, 8, 20)]
    assert FastV().stage_budget(0.3, *args).tolist() == [4, 2, 6]
    assert nearest.stage_budget(0.5, *args).tolist() == [8, 4, 10]  # 7.5 -> 8; floor keeps 7
    assert FastV().stage_budget(0.5, *args).tolist() == [7, 4, 10]
    assert torch.equal(nearest.stage_budget(5, *args), FastV().stage_budget(5, *args))


def test_contract_nearest():
    check_reducer(FastV, {"rounding": "nearest"})
