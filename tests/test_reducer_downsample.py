"""downsample: uniform lattices per grid, exact budgets, layout groups and fallbacks; contract."""

from __future__ import annotations

import random

import pytest
import torch
from tokenprune_downsample import Downsample, lattice, sequence_lattice

from tokenprune import TokenLayout
from tokenprune.testing import check_reducer, dense_context


def test_square_lattices_by_hand():
    rows, cols = lattice(4, 4, 4)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(1, 1), (1, 3), (3, 1), (3, 3)]
    rows, cols = lattice(24, 24, 144)  # a stride-2 lattice, offset by one
    assert sorted(set(rows.tolist())) == list(range(1, 24, 2)) and sorted(set(cols.tolist())) == list(range(1, 24, 2))
    rows, cols = lattice(3, 3, 1)
    assert (rows.tolist(), cols.tolist()) == ([1], [1])  # the centre
    rows, cols = lattice(2, 6, 3)  # a wide grid keeps one row of three
    assert (rows.tolist(), cols.tolist()) == ([1, 1, 1], [1, 3, 5])


@pytest.mark.parametrize("seed", range(30))
def test_lattice_is_exact_and_spread(seed):
    rng = random.Random(seed)
    r, c = rng.randint(1, 12), rng.randint(1, 12)
    q = rng.randint(1, r * c)
    rows, cols = lattice(r, c, q)
    points = set(zip(rows.tolist(), cols.tolist(), strict=True))
    assert len(points) == q
    assert all(0 <= i < r and 0 <= j < c for i, j in points)
    per_row = [sum(1 for i, _ in points if i == row) for row in sorted({i for i, _ in points})]
    assert max(per_row) - min(per_row) <= 1  # points spread evenly over the lattice rows


def test_sequence_lattice():
    assert sequence_lattice(10, 5).tolist() == [1, 3, 5, 7, 9]
    assert sequence_lattice(7, 7).tolist() == list(range(7))


def test_llava_next_layout_split_and_lattices():
    base = TokenLayout.grid(4, 4)  # 16 tokens
    hires = TokenLayout.grid(4, 8, newlines=True, view=1)  # 32 tokens + 4 newlines
    layout = TokenLayout.cat([base, hires])
    n = 16 + 36
    protected = layout.newline.clone()
    # 4 newlines + 12 free tokens: 16:32 -> 4 base + 8 high-res.
    kept = (
        Downsample().reduce(torch.randn(1, n, 3), dense_context(n, 16, layout=layout, protected=protected)).tolist()[0]
    )
    base_kept = [i for i in kept if i < 16]
    assert base_kept == [5, 7, 13, 15]  # (1,1), (1,3), (3,1), (3,3)
    hires_kept = [(int(layout.row[0, i]), int(layout.col[0, i])) for i in kept if i >= 16 and not layout.newline[0, i]]
    rows, cols = lattice(4, 8, 8)
    assert hires_kept == list(zip(rows.tolist(), cols.tolist(), strict=True))
    assert all(bool(layout.newline[0, i]) for i in kept if i >= 16 and (int(layout.col[0, i]) == 8))
    assert sum(bool(layout.newline[0, i]) for i in kept) == 4


def test_several_images_each_get_their_share():
    layout = TokenLayout.cat([TokenLayout.grid(2, 2, image=0), TokenLayout.grid(4, 4, image=1)])
    kept = Downsample().reduce(torch.randn(1, 20, 3), dense_context(20, 5, layout=layout)).tolist()[0]
    assert kept == [3, 4 + 5, 4 + 7, 4 + 13, 4 + 15]  # 1 of 4 (the centre rounds to (1,1)) and 4 of 16


def test_fallbacks_to_sequence_order():
    x = torch.randn(1, 10, 3)
    assert Downsample().reduce(x, dense_context(10, 5, layout=None)).tolist() == [[1, 3, 5, 7, 9]]
    # An incomplete grid (an earlier stage removed tokens): evenly spaced in sequence order.
    full = TokenLayout.grid(3, 4)
    keep = torch.tensor([0, 1, 2, 4, 5, 7, 8, 9, 11])
    partial = TokenLayout(**{k: getattr(full, k)[:, keep] for k in ("image", "view", "row", "col", "newline")})
    assert Downsample().reduce(torch.randn(1, 9, 3), dense_context(9, 3, layout=partial)).tolist() == [[1, 4, 7]]


def test_edge_cases_and_features_not_read():
    layout = TokenLayout.grid(1, 1)
    assert Downsample().reduce(torch.randn(1, 1, 3), dense_context(1, 1, layout=layout)).tolist() == [[0]]
    layout = TokenLayout.grid(3, 3)
    assert Downsample().reduce(torch.randn(1, 9, 3), dense_context(9, 9, layout=layout)).tolist() == [list(range(9))]
    nan = torch.full((1, 9, 3), float("nan"))
    assert Downsample().reduce(nan, dense_context(9, 1, layout=layout)).tolist() == [[4]]


def test_contract():
    check_reducer(Downsample)
