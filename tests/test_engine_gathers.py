"""The engine's row gathers: the fast paths give exactly what the general ones give.

`gather_tokens` copies whole rows with `index_select` where the batch and token axes merge without a
copy, and falls back to `gather` elsewhere; `visual_columns` hands the visual tokens over as a view of
one block of columns where every sample has them in the same place, and as sorted columns otherwise.
"""

import pytest
import torch

from tokenprune.engine.sequence import gather_kept_rows, gather_tokens, right_aligned_columns
from tokenprune.engine.stage import visual_columns
from tokenprune.reducer import Selection


def _reference_gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    t = t.expand(idx.shape[0], *t.shape[1:])
    index = idx.clamp(min=0).view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
    return t.gather(1, index)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(3, 11, 5, generator=g),  # contiguous: index_select over the flattened batch
        lambda g: torch.randn(1, 11, 5, generator=g),  # one row for the whole batch
        lambda g: torch.randn(3, 11, 2, 4, generator=g),  # more trailing axes
        lambda g: torch.randn(3, 5, 11, generator=g).transpose(1, 2),  # axes that do not merge: gather
        lambda g: torch.randn(11, 3, 5, generator=g).transpose(0, 1),  # batch-strided: gather
    ],
)
def test_gather_tokens_equals_a_plain_gather_on_every_memory_layout(make):
    g = torch.Generator().manual_seed(0)
    t = make(g)
    idx = torch.randint(-1, 11, (3, 7), generator=g)
    out = gather_tokens(t, idx)
    assert out.shape == (3, 7, *t.shape[2:])
    assert torch.equal(out, _reference_gather(t, idx))


def test_gather_tokens_carries_gradients_to_the_rows_it_read():
    t = torch.randn(2, 6, 3, requires_grad=True)
    idx = torch.tensor([[0, 2, 2], [5, -1, 1]])
    gather_tokens(t, idx).sum().backward()
    expected = torch.zeros(2, 6)
    for b, row in enumerate(idx.clamp(min=0).tolist()):
        for i in row:
            expected[b, i] += 1
    assert torch.equal(t.grad[..., 0], expected)


@pytest.mark.parametrize(
    ("rows", "block"),
    [
        ([[0, 1, 1, 1, 0], [0, 1, 1, 1, 0]], slice(1, 4)),  # the same block in every sample
        ([[1, 1, 0, 0, 0]], slice(0, 2)),
        ([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], None),  # shifted: not one block
        ([[0, 1, 0, 1, 0], [0, 1, 0, 1, 0]], None),  # a gap
        ([[0, 1, 1, 0, 0], [0, 1, 1, 1, 0]], None),  # ragged counts
        ([[0, 0, 0, 0, 0], [0, 1, 1, 0, 0]], None),  # a sample without visual tokens
    ],
)
def test_visual_columns_are_the_selection_of_the_mask_and_a_block_only_where_one_exists(rows, block):
    mask = torch.tensor(rows, dtype=torch.bool)
    columns, found = visual_columns(mask)
    assert torch.equal(columns, Selection.from_mask(mask).indices)
    assert found == block
    if block is not None:
        hidden = torch.randn(mask.shape[0], mask.shape[1], 4)
        assert torch.equal(hidden[:, block], _reference_gather(hidden, columns))


def test_kept_rows_are_zero_in_the_padding_slots_of_a_batch_and_a_single_sample_has_none():
    hidden = torch.randn(2, 6, 3) + 5.0
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    idx = right_aligned_columns(keep)
    rows = gather_kept_rows(hidden, idx)
    assert torch.equal(rows[idx < 0], torch.zeros(int((idx < 0).sum()), 3))
    assert torch.equal(rows[idx >= 0], _reference_gather(hidden, idx)[idx >= 0])
    one = right_aligned_columns(keep[1:])
    assert bool((one >= 0).all()) and torch.equal(gather_kept_rows(hidden[1:], one), _reference_gather(hidden[1:], one))
