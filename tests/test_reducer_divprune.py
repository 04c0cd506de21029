"""DivPrune: a loop re-implementation of the official selection, hand-made cases, protected tokens, contract."""

from __future__ import annotations

import math

import pytest
import torch
from tokenprune_divprune import DivPrune, max_min_picks

from tokenprune import ReducerInputError, TokenLayout, load_pipeline
from tokenprune.testing import check_reducer, make_reduce_inputs
from tokenprune.testing import dense_context as context


def reference_divprune(x: list[list[float]], k: int) -> list[int]:
    """The official ``DivPrune`` (vbdi/divprune, llava_arch.py) with plain loops, in the order picked.

    Distance 1 - cosine; first pick: the largest second-smallest entry of a column (the smallest is the
    token's own distance 0); then the largest minimum distance to the picked rows. ``max`` keeps the
    first index on ties, like ``torch.argmax``.
    """
    n = len(x)
    norms = [math.sqrt(sum(v * v for v in row)) for row in x]
    dist = [
        [1.0 - sum(a * b for a, b in zip(x[i], x[j], strict=True)) / (norms[i] * norms[j]) for j in range(n)]
        for i in range(n)
    ]
    picked: list[int] = []
    for step in range(k):
        if step == 0:
            scores = [sorted(dist[i][j] for i in range(n))[1] for j in range(n)]
        else:
            scores = [min(dist[i][j] for i in picked) for j in range(n)]
        picked.append(max(range(n), key=lambda j: (scores[j], -j)))
    return picked


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("n", "k"), [(12, 3), (20, 10), (9, 8), (30, 1)])
def test_matches_the_official_algorithm(seed, n, k):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, 8, generator=gen) + 0.3
    kept = DivPrune().reduce(x, context(n, k)).tolist()[0]
    assert kept == sorted(reference_divprune(x[0].tolist(), k))


def test_pick_order_matches_the_official_algorithm():
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(7))
    unit = torch.nn.functional.normalize(x, dim=-1)
    picks = max_min_picks((1 - unit @ unit.T)[None], torch.ones(1, 16, dtype=torch.bool), torch.tensor([9]))
    assert picks[0].tolist() == reference_divprune(x.tolist(), 9)


def test_by_hand_on_a_circle():
    """Unit vectors at 0, 10, 20, 90, 180 and 185 degrees."""
    angles = [0, 10, 20, 90, 180, 185]
    x = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])[None]
    # Nearest-neighbour distances: 5 and 185 are 5 degrees apart; 0/10/20 are 10 apart; 90 is 70 from 20.
    # So 90 goes first; then the farthest from it: 185 (95 degrees); then the farthest from {90, 185}: 0 and
    # 180 are both 90 from 90, but 180 is 5 from 185, so 0; then 20 (20 from 0; 10 is 10 from 0, 180 is 5
    # from 185).
    assert [DivPrune().reduce(x, context(6, k)).tolist()[0] for k in (1, 2, 3, 4)] == [
        [3],
        [3, 5],
        [0, 3, 5],
        [0, 2, 3, 5],
    ]


def test_protected_tokens_are_kept_and_not_ranked():
    tokens, ctx = make_reduce_inputs(grids=[(3, 4)], keep=7, dim=6)  # 12 grid tokens + 3 protected newlines
    kept = DivPrune().reduce(tokens, ctx).tolist()[0]
    newlines = ctx.layout.newline[0].nonzero().squeeze(1).tolist()
    grid = [i for i in range(15) if i not in newlines]
    expected = [grid[p] for p in reference_divprune(tokens[0, grid].tolist(), 4)]
    assert kept == sorted(expected + newlines)


def test_unprotected_newlines_are_ranked_like_any_token():
    """The official code ranks LLaVA-NeXT's newline tokens with the others."""
    tokens, ctx = make_reduce_inputs(grids=[(3, 4)], keep=6, dim=6, protect_newlines=False)
    kept = DivPrune().reduce(tokens, ctx).tolist()[0]
    assert kept == sorted(reference_divprune(tokens[0, :15].tolist(), 6))


def test_a_padded_batch_matches_each_sample_alone():
    tokens, ctx = make_reduce_inputs(grids=[(5, 6), (2, 3), (4, 4)], keep=0.3, dim=12, protect_newlines=False)
    kept = DivPrune().reduce(tokens, ctx).tolist()
    for b, got in enumerate(kept):
        n, k = int(ctx.num_valid[b]), int(ctx.budget[b])
        assert got == sorted(reference_divprune(tokens[b, :n].tolist(), k))


def test_edge_cases():
    assert DivPrune().reduce(torch.randn(1, 1, 4), context(1, 1)).tolist() == [[0]]
    assert DivPrune().reduce(torch.randn(1, 5, 4), context(5, 5)).tolist() == [[0, 1, 2, 3, 4]]
    assert DivPrune().reduce(torch.ones(1, 6, 4), context(6, 3)).tolist() == [[0, 1, 2]]  # ties: lower index
    zeros = torch.zeros(1, 4, 4)  # zero vectors: distance 1 to everything, no NaN
    assert DivPrune().reduce(zeros, context(4, 2)).tolist() == [[0, 1]]
    huge = torch.randn(1, 10, 4, generator=torch.Generator().manual_seed(1))
    expected = DivPrune().reduce(huge, context(10, 4)).tolist()
    assert DivPrune().reduce(huge * 1e30, context(10, 4)).tolist() == expected  # scale-free, no overflow


def test_views_form_one_set():
    """Unlike G-Prune, DivPrune ranks all views of a sample together (the official code)."""
    layout = TokenLayout.cat([TokenLayout.grid(2, 2), TokenLayout.grid(2, 3, view=1)])
    x = torch.randn(1, 10, 5, generator=torch.Generator().manual_seed(4))
    kept = DivPrune().reduce(x, context(10, 4, layout=layout)).tolist()[0]
    assert kept == sorted(reference_divprune(x[0].tolist(), 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_rejected(bad):
    x = torch.randn(1, 5, 4)
    x[0, 2, 1] = bad
    with pytest.raises(ReducerInputError, match=r"'divprune'.*token 2 of sample 0"):
        DivPrune().reduce(x, context(5, 2))


def test_overhead_is_half_the_distance_matrix():
    tokens, ctx = make_reduce_inputs(grids=[(30, 40)], newlines=False, keep=0.5, dim=8)
    from tokenprune.similarity import PANEL

    assert PANEL == 256
    panels = 256 * (1200 + 944 + 688 + 432) + 176 * 176  # rows 0-255 against 0-1199, 256-511 against 256-1199, ...
    assert DivPrune().overhead_macs(tokens, ctx) == 8 * panels < 0.7 * 8 * 1200**2
    full = make_reduce_inputs(grids=[(30, 40)], newlines=False, keep=1.0, dim=8)[1]
    assert DivPrune().overhead_macs(tokens, full) == 0  # nothing to choose: no distances


def test_contract():
    check_reducer(DivPrune)


def test_validates_in_yaml():
    pipe = load_pipeline("stages:\n  - at: post_projector\n    reducer: divprune\n    keep: 0.25\n")
    assert pipe.stages[0].reducer == "divprune"
    with pytest.raises(ValueError, match="threshold"):
        load_pipeline(
            "stages:\n  - at: post_projector\n    reducer: divprune\n    keep: 0.25\n    params: {threshold: 1}\n"
        )


@pytest.mark.parametrize("quantize", [False, True])
def test_numpy_and_torch_greedy_loops_pick_the_same(quantize):
    """The CPU loop runs on NumPy views; the torch loop serves other devices. Ties (quantized
    distances) must go to the lower index in both, across a padded batch."""
    from tokenprune_divprune import _greedy_numpy, _greedy_torch

    gen = torch.Generator().manual_seed(3)
    distance = torch.rand(3, 40, 40, generator=gen)
    if quantize:
        distance = (distance * 4).round() / 4
    distance[1, :, 30:] = float("inf")
    gap = distance[:, 0].clone()
    gap[1, 30:] = float("-inf")
    rows = distance.reshape(3 * 40, 40)
    by_numpy = _greedy_numpy(rows, gap.clone(), 25)
    by_torch = _greedy_torch(rows, gap.clone(), 25)
    assert by_numpy.dtype == by_torch.dtype == torch.long
    assert torch.equal(by_numpy, by_torch)


def test_distances_are_one_minus_the_similarities_exactly():
    from tokenprune.similarity import cosine_distance, cosine_similarity

    x = torch.randn(700, 48, generator=torch.Generator().manual_seed(0))  # several panels, a ragged last one
    assert torch.equal(cosine_distance(x), 1 - cosine_similarity(x))
