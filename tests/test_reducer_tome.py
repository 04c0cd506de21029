"""ToMe: hand-computed matchings, an independent loop implementation, conservation under Merge.apply, contract."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tokenprune_tome import ToMe

from tokenprune import Merge, ReducerInputError
from tokenprune.testing import check_reducer, make_reduce_inputs
from tokenprune.testing import dense_context as context
from tokenprune.validation import check_reduction


def reference_destinations(x: list[list[float]], sizes: list[float], protected: list[bool], budget: int) -> list[int]:
    """Rounds of bipartite soft matching written with plain Python loops."""
    n = len(x)
    sums = {i: [sizes[i] * v for v in x[i]] for i in range(n)}
    mass = {i: sizes[i] for i in range(n)}
    members = {i: [i] for i in range(n)}
    alive = [i for i in range(n) if not protected[i]]
    target = budget - sum(protected)
    while len(alive) > target:
        t = len(alive)
        r = min(t - target, t // 2)

        def unit(i: int) -> list[float]:
            mean = [v / mass[i] for v in sums[i]]
            norm = math.sqrt(sum(v * v for v in mean)) or 1.0
            return [v / norm for v in mean]

        a_set, b_set = alive[0::2], alive[1::2]
        edges = []
        for pos, a in enumerate(a_set):
            best, match = -math.inf, None
            for b in b_set:
                sim = sum(p * q for p, q in zip(unit(a), unit(b), strict=True))
                if sim > best:
                    best, match = sim, b
            edges.append((-best, pos, a, match))
        merged = set()
        for _, _, a, b in sorted(edges)[:r]:
            sums[b] = [p + q for p, q in zip(sums[b], sums[a], strict=True)]
            mass[b] += mass[a]
            members[b] += members.pop(a)
            merged.add(a)
        alive = [i for i in alive if i not in merged]
    destination = list(range(n))
    for root, group in members.items():
        for i in group:
            destination[i] = root
    return destination


def test_one_round_by_hand():
    # Two pairs of nearly parallel tokens. A = {0, 2}, B = {1, 3}; 0 matches 1 and 2 matches 3.
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
    assert ToMe().reduce(x, context(4, 2)).destination.tolist() == [[1, 1, 3, 3]]
    # Budget 3: one merge; both edges score 1/sqrt(1.01), the tie goes to the lower A token (0).
    assert ToMe().reduce(x, context(4, 3)).destination.tolist() == [[1, 1, 2, 3]]


def test_rounds_compose_to_roots():
    x = torch.randn(1, 9, 4, generator=torch.Generator().manual_seed(0))
    result = ToMe().reduce(x, context(9, 1))
    dest = result.destination[0]
    assert len(set(dest.tolist())) == 1  # everything in one group, every destination a root
    assert bool((dest[dest] == dest).all())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [1, 3, 7, 12])
def test_matches_a_loop_implementation(seed, budget):
    gen = torch.Generator().manual_seed(seed)
    n = 17
    x = torch.randn(1, n, 5, generator=gen)
    sizes = torch.randint(1, 4, (1, n), generator=gen).float()
    protected = torch.zeros(1, n, dtype=torch.bool)
    protected[0, [4, 11]] = True
    expected = reference_destinations(x[0].tolist(), sizes[0].tolist(), protected[0].tolist(), max(budget, 3))
    result = ToMe().reduce(x, context(n, max(budget, 3), protected=protected, sizes=sizes))
    assert result.destination[0].tolist() == expected


@pytest.mark.parametrize("seed", range(3))
def test_merge_conserves_total_size_and_weighted_mean(seed):
    tokens, ctx = make_reduce_inputs(keep=(0.5, 0.3, 0.2)[seed], protect_newlines=seed == 0, seed=seed, dim=8)
    ctx.sizes = ctx.valid.float() * torch.randint(1, 5, ctx.valid.shape, generator=torch.Generator().manual_seed(seed))
    result = ToMe().reduce(tokens, ctx)
    assert isinstance(result, Merge)
    selection = check_reduction(result, tokens, ctx, who="tome", capabilities=ToMe.capabilities)
    assert selection.counts.tolist() == ctx.budget.tolist()
    merged, merged_sizes, _ = result.apply(tokens, ctx.sizes, ctx.valid)
    torch.testing.assert_close(merged_sizes.sum(1), ctx.sizes.sum(1))
    weighted_in = (tokens * ctx.sizes.unsqueeze(-1)).sum(1)
    weighted_out = (merged * merged_sizes.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(weighted_out, weighted_in, rtol=1e-5, atol=1e-4)
    # Each root is the size-weighted mean of its group.
    dest = result.destination
    for b in range(ctx.batch_size):
        for j, root in enumerate(selection.tolist()[b]):
            group = [i for i in range(int(ctx.num_valid[b])) if int(dest[b, i]) == root]
            w = ctx.sizes[b, group]
            expected = (tokens[b, group] * w[:, None]).sum(0) / w.sum()
            torch.testing.assert_close(merged[b, j], expected, rtol=1e-5, atol=1e-5)


def test_protected_tokens_never_merge():
    x = torch.ones(1, 6, 3)  # identical tokens: every pair is a perfect match
    protected = torch.tensor([[False, True, False, False, True, False]])
    dest = ToMe().reduce(x, context(6, 3, protected=protected)).destination[0].tolist()
    assert dest[1] == 1 and dest[4] == 4
    assert all(d not in (1, 4) for i, d in enumerate(dest) if i not in (1, 4))
    assert len(set(dest)) == 3


def test_no_room_beyond_protected_tokens_drops_that_samples_other_tokens_only():
    tokens, ctx = make_reduce_inputs(keep=0.5)
    budget = ctx.budget.clone()
    budget[0] = int(ctx.protected[0].sum())  # sample 0: only its newline tokens fit
    ctx = dataclasses.replace(ctx, budget=budget)
    result = ToMe().reduce(tokens, ctx)
    assert isinstance(result, Merge)
    n0 = int(ctx.num_valid[0])
    free0 = ctx.valid[0] & ~ctx.protected[0]
    assert (result.destination[0][free0] == -1).all() and int(free0[:n0].sum()) > 0
    selection = check_reduction(result, tokens, ctx, who="tome", capabilities=ToMe.capabilities)
    assert selection.to_mask(ctx.valid.shape[1])[0].tolist() == ctx.protected[0].tolist()
    merged, sizes, _ = result.apply(tokens, ctx.sizes, ctx.valid)
    kept0 = ctx.protected[0].nonzero().squeeze(1)
    torch.testing.assert_close(merged[0, : len(kept0)], tokens[0, kept0])  # the kept tokens are not averaged
    assert sizes[0, : len(kept0)].tolist() == [1.0] * len(kept0)
    for s in range(1, ctx.batch_size):  # the other samples merge exactly as they would alone
        n = int(ctx.num_valid[s])
        alone = ToMe().reduce(tokens[s : s + 1, :n], _slice(ctx, s, n))
        assert result.destination[s, :n].tolist() == alone.destination[0].tolist()


def _slice(ctx, s, n):
    return dataclasses.replace(
        ctx,
        budget=ctx.budget[s : s + 1],
        valid=ctx.valid[s : s + 1, :n],
        protected=ctx.protected[s : s + 1, :n],
        sizes=ctx.sizes[s : s + 1, :n],
        layout=None,
        attention={},
        text=None,
        text_valid=None,
    )


def test_edge_cases():
    assert ToMe().reduce(torch.randn(1, 1, 3), context(1, 1)).destination.tolist() == [[0]]
    x = torch.randn(1, 5, 3)
    assert ToMe().reduce(x, context(5, 5)).destination.tolist() == [[0, 1, 2, 3, 4]]
    identical = ToMe().reduce(torch.ones(1, 4, 3), context(4, 2)).destination.tolist()
    assert identical == [[1, 1, 1, 3]]  # ties: every A token takes the first B token (as torch.max does)
    zeros = ToMe().reduce(torch.zeros(1, 4, 3), context(4, 1)).destination[0]
    assert len(set(zeros.tolist())) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_rejected(bad):
    x = torch.randn(1, 5, 4)
    x[0, 2, 0] = bad
    with pytest.raises(ReducerInputError, match=r"'tome'.*token 2 of sample 0"):
        ToMe().reduce(x, context(5, 2))


def test_contract():
    check_reducer(ToMe)


# --- order: official, the official merge.py output order between rounds ------------------------------


def official_rounds(x: torch.Tensor, sizes: torch.Tensor, target: int) -> list[frozenset[int]]:
    """Rounds of the official ``bipartite_soft_matching`` + ``merge_wavg`` + ``merge_source`` (tome/merge.py).

    ``x`` is ``(t, D)``, the mergeable tokens in index order; each round feeds the official output,
    ``[unmerged A, B]``, to the next, with ``r = min(t - target, t // 2)`` and the merged means as the
    metric. Returns the groups of original tokens. (The official argsort is not stable; stable here.)
    """
    xs, size = x[None].clone(), sizes[None, :, None].clone()
    source = torch.eye(x.shape[0])[None]
    while xs.shape[1] > target:
        t = xs.shape[1]
        r = min(t - target, t // 2)
        metric = xs / xs.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx = edge_idx[..., r:, :]  # Unmerged Tokens
        src_idx = edge_idx[..., :r, :]  # Merged Tokens
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

        def merge(v: torch.Tensor, mode: str, r=r, unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx) -> torch.Tensor:
            src, dst = v[..., ::2, :], v[..., 1::2, :]
            n, t1, c = src.shape
            unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
            src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
            dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
            return torch.cat([unm, dst], dim=1)

        xs = merge(xs * size, "sum")
        size = merge(size, "sum")
        xs = xs / size
        source = merge(source, "amax")
    return [frozenset(row.nonzero().squeeze(1).tolist()) for row in source[0]]


def groups_of(destination: list[int], members: list[int]) -> set[frozenset[int]]:
    """The groups of ``members`` (as positions in ``members``) under a Merge's destinations."""
    position = {m: i for i, m in enumerate(members)}
    groups: dict[int, set[int]] = {}
    for m in members:
        groups.setdefault(destination[m], set()).add(position[m])
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [3, 5, 8, 12])
def test_official_order_matches_the_official_merge_rounds(seed, budget):
    gen = torch.Generator().manual_seed(seed)
    n = 17
    x = torch.randn(1, n, 5, generator=gen)
    sizes = torch.randint(1, 4, (1, n), generator=gen).float()
    protected = torch.zeros(1, n, dtype=torch.bool)
    protected[0, [4, 11]] = True
    members = [i for i in range(n) if not protected[0, i]]
    expected = set(official_rounds(x[0, members], sizes[0, members], budget - 2))
    result = ToMe({"order": "official"}).reduce(x, context(n, budget, protected=protected, sizes=sizes))
    assert groups_of(result.destination[0].tolist(), members) == expected
    assert result.destination[0, [4, 11]].tolist() == [4, 11]


def test_the_order_between_rounds_changes_the_groups():
    """Over seeds and budgets that need several rounds, the two orders disagree somewhere (and index order
    matches the loop implementation, so defaults are unchanged)."""
    differ = 0
    for seed in range(6):
        x = torch.randn(1, 17, 5, generator=torch.Generator().manual_seed(seed))
        index = ToMe().reduce(x, context(17, 3)).destination[0].tolist()
        official = ToMe({"order": "official"}).reduce(x, context(17, 3)).destination[0].tolist()
        assert index == reference_destinations(x[0].tolist(), [1.0] * 17, [False] * 17, 3)
        differ += groups_of(index, list(range(17))) != groups_of(official, list(range(17)))
    assert differ > 0
    assert ToMe().params.order == "index"


def test_one_round_is_the_same_in_both_orders():
    """The order only matters between rounds: one round (keep >= half) merges the same pairs."""
    x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(9))
    for budget in (8, 11, 15):
        assert torch.equal(
            ToMe().reduce(x, context(16, budget)).destination,
            ToMe({"order": "official"}).reduce(x, context(16, budget)).destination,
        )


def test_contract_official_order():
    check_reducer(ToMe, {"order": "official"})
