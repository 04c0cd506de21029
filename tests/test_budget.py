import random

import pytest
import torch

from tokenprune import TokenLayout
from tokenprune.budget import budget_per_sample, plan_spatial_groups, spatial_quotas, split_budget, tokens_to_keep
from tokenprune.testing import make_reduce_inputs


@pytest.mark.parametrize(
    ("keep", "present", "expected"),
    [
        (1.0, 7, 7),
        (0.5, 7, 3),  # fractions round down
        (0.29, 100, 29),  # 0.29 * 100 is 28.999... in binary; still 29
        (0.01, 10, 1),  # never below one token
        (64, 10, 10),  # counts are capped at what is present
        (3, 10, 3),
        (0.5, 0, 0),  # nothing present, nothing kept
    ],
)
def test_tokens_to_keep(keep, present, expected):
    assert tokens_to_keep(keep, present) == expected


def test_tokens_to_keep_rejects_bool():
    with pytest.raises(TypeError, match="not a bool"):
        tokens_to_keep(True, 5)


def test_budget_counts_protected_and_never_drops_them():
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    protected = torch.tensor([[0, 0, 1, 0, 0, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    # sample 0: half of 6 is 3 (2 of them protected); sample 1: 1 of 3 wanted, but 3 are protected
    assert budget_per_sample(0.5, valid, protected).tolist() == [3, 3]
    assert budget_per_sample(2, valid, protected).tolist() == [2, 3]
    assert budget_per_sample(1.0, valid, protected).tolist() == [6, 3]


@pytest.mark.parametrize("seed", range(20))
def test_budget_split_is_exact_and_proportional(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(0, 30) for _ in range(rng.randint(1, 5))]
    free = rng.randint(0, sum(sizes))
    quotas = split_budget(free, sizes)
    assert sum(quotas) == free
    for q, s in zip(quotas, sizes, strict=True):
        assert 0 <= q <= s
        assert abs(q - free * s / max(sum(sizes), 1)) < 1


def test_split_budget_worked_example():
    assert split_budget(5, [6, 3, 3]) == [3, 1, 1]
    assert split_budget(20, [6, 3]) == [6, 3]  # more than there is: every group keeps all


def test_plan_spatial_groups_separates_views_and_keeps_protected_newlines():
    _, ctx = make_reduce_inputs(grids=[(2, 3)], keep=4)  # 2 rows x (3 + newline), newlines protected
    always, groups, free = plan_spatial_groups(ctx, 0)
    assert always.tolist() == [3, 7] and free == 2
    assert [g.tolist() for g in groups] == [[0, 1, 2, 4, 5, 6]]
    _tokens, ctx = make_reduce_inputs(grids=[(2, 3)], keep=1.0)
    always, groups, free = plan_spatial_groups(ctx, 0)
    assert sorted(always.tolist()) == list(range(8)) and groups == [] and free == 0


def test_spatial_quotas_leave_out_groups_with_nothing_to_choose():
    lay = TokenLayout.cat([TokenLayout.grid(2, 2, view=0), TokenLayout.grid(1, 6, view=1)])
    from tokenprune.testing import dense_context

    ctx = dense_context(10, 2, layout=lay)
    always, chosen = spatial_quotas(ctx, 0)
    assert always.tolist() == []
    # 2 tokens over groups of 4 and 6: largest remainder gives 1 and 1
    assert [(m.tolist(), q) for m, q in chosen] == [([0, 1, 2, 3], 1), ([4, 5, 6, 7, 8, 9], 1)]
    ctx = dense_context(10, 1, layout=lay)
    assert [(m.tolist(), q) for m, q in spatial_quotas(ctx, 0)[1]] == [([4, 5, 6, 7, 8, 9], 1)]
