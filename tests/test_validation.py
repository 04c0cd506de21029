"""The core rejects invalid reducer results with a message naming the plugin and the defect."""

import itertools

import pytest
import torch
from plugin_sources import reducer_plugin_source

from tokenprune import Capabilities, Merge, ReducerOutputError, Selection
from tokenprune.plugins import get_plugin_manager
from tokenprune.testing import make_reduce_inputs
from tokenprune.validation import check_reduction

FIXED = Capabilities()
MERGING = Capabilities(merges=True)
ADAPTIVE = Capabilities(deterministic_count=False)
MERGING_ADAPTIVE = Capabilities(merges=True, deterministic_count=False)


def _inputs(keep=0.5):
    # samples of 15, 8 and 20 tokens; newline tokens (every 5th, 4th, 5th) protected
    return make_reduce_inputs(keep=keep)


def _check(result, caps=FIXED, keep=0.5):
    tokens, ctx = _inputs(keep)
    return check_reduction(result, tokens, ctx, who="reducer 'x' (plugin 'p', distribution d 1.0)", capabilities=caps)


def _valid_rows(ctx):
    """A valid selection: protected tokens, then the lowest other indices up to the budget."""
    rows = []
    for b in range(ctx.batch_size):
        n = int(ctx.num_valid[b])
        keep = [i for i in range(n) if ctx.protected[b, i]]
        keep += [i for i in range(n) if not ctx.protected[b, i]][: int(ctx.budget[b]) - len(keep)]
        rows.append(sorted(keep))
    return rows


def test_a_valid_selection_passes():
    _tokens, ctx = _inputs()
    rows = _valid_rows(ctx)
    assert _check(Selection.from_lists(rows)).tolist() == rows


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda ctx, rows: Selection.from_lists([rows[0], rows[1], [*rows[2][:-1], 25]]),
            r"sample 2: index 25 is outside \[0, 20\)",
        ),
        (
            lambda ctx, rows: Selection(torch.tensor([[3, 1, 4]] * 3), torch.tensor([3, 3, 3])),
            r"sample 0: indices are not sorted \(\[3, 1, 4\]\)",
        ),
        (lambda ctx, rows: Selection(torch.tensor([[1, 1, 4]] * 3), torch.tensor([3, 3, 3])), "indices are not unique"),
        (
            lambda ctx, rows: Selection(torch.tensor([[0, 1, 4]] * 3), torch.tensor([3, 3, 2])),
            r"entries after counts\[2\] = 2 must be -1",
        ),
        (
            lambda ctx, rows: Selection.from_lists([list(range(15)), rows[1], rows[2]]),
            "sample 0 keeps 15 tokens, over its budget of 7",
        ),
        (lambda ctx, rows: Selection.from_lists([rows[0][1:], rows[1], rows[2]]), "under its budget of 7"),
        (
            lambda ctx, rows: Selection.from_lists([[0, 1, 2, 3, 5, 6, 7], rows[1], rows[2]]),
            "sample 0: protected token 4 was dropped",
        ),
        (
            lambda ctx, rows: Selection(torch.tensor(rows[0])[None].expand(3, -1).int(), torch.tensor([7, 7, 7])),
            "indices has dtype torch.int32, expected torch.long",
        ),
        (
            lambda ctx, rows: Selection.from_lists(rows).indices,
            "returned Tensor; reduce\\(\\) must return a tokenprune.Selection or tokenprune.Merge",
        ),
        (
            lambda ctx, rows: Selection(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 3])),
            r"counts has shape \(2,\), expected \(3,\)",
        ),
    ],
)
def test_defects_are_named(make, message):
    tokens, ctx = _inputs()
    result = make(ctx, _valid_rows(ctx))
    with pytest.raises(ReducerOutputError, match=message) as info:
        check_reduction(result, tokens, ctx, who="reducer 'x' (plugin 'p', distribution d 1.0)", capabilities=FIXED)
    assert str(info.value).startswith("reducer 'x' (plugin 'p', distribution d 1.0) returned ")


def test_adaptive_reducers_may_keep_fewer_but_never_more():
    _tokens, ctx = _inputs()
    rows = _valid_rows(ctx)
    fewer = Selection.from_lists([[i for i in rows[0] if ctx.protected[0, i]], rows[1], rows[2]])
    assert _check(fewer, ADAPTIVE).counts[0] < ctx.budget[0]
    with pytest.raises(ReducerOutputError, match="over its budget"):
        _check(Selection.from_lists([list(range(15)), rows[1], rows[2]]), ADAPTIVE)


def _merge_all_into_first_unprotected(ctx, *, budget_ok=True):
    """A merge collapsing unprotected tokens of each sample onto the first ones, within budget."""
    b, n = ctx.valid.shape
    dest = torch.arange(n).expand(b, n).clone()
    for s in range(b):
        free = [i for i in range(int(ctx.num_valid[s])) if not ctx.protected[s, i]]
        roots = free[: int(ctx.budget[s]) - int(ctx.protected[s].sum())]
        for i in free[len(roots) :]:
            dest[s, i] = roots[-1]
    return dest


def test_a_valid_merge_passes_and_a_merge_needs_the_capability():
    _tokens, ctx = _inputs()
    merge = Merge(_merge_all_into_first_unprotected(ctx))
    assert _check(merge, MERGING).counts.tolist() == ctx.budget.tolist()
    with pytest.raises(ReducerOutputError, match=r"does not declare Capabilities\(merges=True\)"):
        _check(merge, FIXED)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.__setitem__((0, 0), 99), r"sample 0: token 0 is merged into index 99, outside \[0, 20\)"),
        (lambda d: d.__setitem__((1, 0), 10), "sample 1: token 0 is merged into padding position 10"),
        (lambda d: d.__setitem__((0, 4), 0), "sample 0: protected token 4 was merged away"),
        (lambda d: d.__setitem__((0, 3), 4), "other tokens were merged into protected token 4"),
        (
            lambda d: (d.__setitem__((0, 0), 1), d.__setitem__((0, 1), 2)),
            "token 0 is merged into token 1, which is itself merged",
        ),
        (
            lambda d: d.__setitem__((0, 0), -2),
            r"token 0 is merged into index -2, outside \[0, 20\) \(-1 drops a token\)",
        ),
        (lambda d: d.__setitem__((0, 4), -1), "sample 0: protected token 4 was dropped"),
        (
            lambda d: (d.__setitem__((0, 1), -1), d.__setitem__((0, 0), 1)),
            "token 0 is merged into token 1, which is itself merged into another or dropped",
        ),
    ],
)
def test_merge_defects_are_named(edit, message):
    tokens, ctx = _inputs()
    dest = torch.arange(ctx.valid.shape[1]).expand(ctx.batch_size, -1).clone()
    edit(dest)
    with pytest.raises(ReducerOutputError, match=message):
        check_reduction(
            Merge(dest),
            tokens,
            ctx,
            who="reducer 'x'",
            capabilities=Capabilities(merges=True, deterministic_count=False),
        )


def test_a_merge_may_drop_tokens():
    """Destination -1 drops a token: it is neither kept nor counted against the budget."""
    _tokens, ctx = _inputs()
    dest = _merge_all_into_first_unprotected(ctx)
    for s in range(ctx.batch_size):
        free = [i for i in range(int(ctx.num_valid[s])) if not ctx.protected[s, i]]
        dest[s, free] = -1  # keep only the protected tokens
    selection = _check(Merge(dest), MERGING_ADAPTIVE)
    assert selection.to_mask(ctx.valid.shape[1]).tolist() == (ctx.protected & ctx.valid).tolist()


def test_a_plugin_returning_an_invalid_selection_is_named_with_its_distribution(fake_distribution):
    source = (
        reducer_plugin_source("unsorted", cls="Unsorted")
        + """
from tokenprune import Selection

def _reduce(self, tokens, ctx):
    b = tokens.shape[0]
    return Selection(torch.tensor([[2, 0]] * b), torch.full((b,), 2))

Unsorted.reduce = _reduce
"""
    )
    fake_distribution("acme-pruners", "acme_unsorted", source, entry_point="acme", version="2.3")
    registry = get_plugin_manager().reducers
    cls = registry.get("unsorted")
    tokens, ctx = make_reduce_inputs(keep=2, newlines=False)
    with pytest.raises(ReducerOutputError) as info:
        check_reduction(
            cls().reduce(tokens, ctx), tokens, ctx, who=registry.describe("unsorted"), capabilities=cls.capabilities
        )
    assert str(info.value) == (
        "reducer 'unsorted' (plugin 'acme', distribution acme-pruners 2.3) returned an invalid selection: "
        "sample 0: indices are not sorted ([2, 0]); return them strictly increasing"
    )


def _row_by_row_verdict(indices, counts, ctx, caps):
    """The contract, one sample and one index at a time: True if the selection is valid."""
    k = indices.shape[1]
    for s in range(ctx.batch_size):
        count, n_valid = int(counts[s]), int(ctx.num_valid[s])
        row = indices[s].tolist()
        if not 0 <= count <= k or count > int(ctx.budget[s]):
            return False
        if caps.deterministic_count and count < int(ctx.budget[s]):
            return False
        kept = row[:count]
        if any(not 0 <= i < n_valid for i in kept) or any(b <= a for a, b in itertools.pairwise(kept)):
            return False
        if any(i != -1 for i in row[count:]):
            return False
        if any(bool(ctx.protected[s, i]) and i not in kept for i in range(n_valid)):
            return False
    return True


@pytest.mark.parametrize("caps", [FIXED, ADAPTIVE], ids=["fixed", "adaptive"])
def test_the_vectorised_check_agrees_with_the_contract_row_by_row(caps):
    """Random valid and corrupted selections: check_reduction raises exactly when one sample breaks the contract."""
    tokens, ctx = _inputs()
    base = Selection.from_lists(_valid_rows(ctx))
    generator = torch.Generator().manual_seed(0)
    verdicts = set()
    for trial in range(300):
        indices, counts = base.indices.clone(), base.counts.clone()
        s = int(torch.randint(ctx.batch_size, (1,), generator=generator))
        j = int(torch.randint(indices.shape[1], (1,), generator=generator))
        edit = trial % 5
        if edit == 0:
            indices[s, j] = int(torch.randint(-2, 22, (1,), generator=generator))
        elif edit == 1:
            counts[s] = int(torch.randint(-1, indices.shape[1] + 2, (1,), generator=generator))
        elif edit == 2 and j > 0:
            indices[s, j] = indices[s, j - 1]
        elif edit == 3:
            indices[s] = indices[s].flip(0)
        expected = _row_by_row_verdict(indices, counts, ctx, caps)
        verdicts.add(expected)
        try:
            check_reduction(Selection(indices, counts), tokens, ctx, who="x", capabilities=caps)
            passed = True
        except ReducerOutputError:
            passed = False
        assert passed == expected, (trial, indices[s].tolist(), counts.tolist())
    assert verdicts == {True, False}
