import pytest
import torch
from pydantic import ValidationError

from tokenprune import (
    Capabilities,
    InsertionPoint,
    Merge,
    ReduceContext,
    ReducerInputError,
    ReducerOutputError,
    ScoringReducer,
    Selection,
    TokenLayout,
)
from tokenprune.reducer import top_k_selection


def _ctx(valid, budget, protected=None):
    valid = torch.as_tensor(valid, dtype=torch.bool)
    return ReduceContext(
        at=InsertionPoint("post_projector"),
        budget=torch.as_tensor(budget),
        valid=valid,
        protected=torch.zeros_like(valid) if protected is None else torch.as_tensor(protected, dtype=torch.bool),
        sizes=valid.float(),
    )


def test_selection_from_mask_sorts_and_pads():
    mask = torch.tensor([[False, True, False, True], [True, False, False, False], [False] * 4])
    sel = Selection.from_mask(mask)
    assert sel.indices.tolist() == [[1, 3], [0, -1], [-1, -1]]
    assert sel.counts.tolist() == [2, 1, 0]
    assert torch.equal(sel.to_mask(4), mask)
    assert sel.tolist() == [[1, 3], [0], []]


def test_selection_from_lists_matches_from_mask():
    sel = Selection.from_lists([[3, 1], [0]])
    assert sel.indices.tolist() == [[1, 3], [0, -1]]
    assert sel.indices.dtype == torch.long


def test_insertion_point_rules_and_order():
    with pytest.raises(ValueError, match="k >= 1"):
        InsertionPoint("layer", 0)
    with pytest.raises(ValueError, match="takes no layer"):
        InsertionPoint("post_projector", 2)
    points = [InsertionPoint("layer", 10), InsertionPoint("post_projector"), InsertionPoint("layer", 2)]
    assert [str(p) for p in sorted(points, key=lambda p: p.order)] == ["post_projector", "layer 2", "layer 10"]


def test_top_k_keeps_highest_scores_per_sample_with_ragged_budgets():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.3, 0.0]])
    ctx = _ctx([[1, 1, 1, 1], [1, 1, 1, 0]], [2, 1])
    assert top_k_selection(scores, ctx).tolist() == [[1, 3], [0]]


def test_top_k_keeps_protected_tokens_first_and_breaks_ties_by_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, -5.0]])
    ctx = _ctx([[1] * 5], [3], protected=[[0, 0, 0, 0, 1]])
    # the protected token is kept despite its low score; ties go to the lowest indices
    assert top_k_selection(scores, ctx).tolist() == [[0, 1, 4]]


def test_top_k_never_selects_padding():
    scores = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # high scores on padding
    ctx = _ctx([[1, 1, 0, 0]], [2])
    assert top_k_selection(scores, ctx).tolist() == [[0, 1]]


def test_top_k_reports_nan_scores_with_reducer_and_sample():
    scores = torch.tensor([[0.0, 1.0], [float("nan"), 1.0]])
    with pytest.raises(ReducerInputError, match=r"reducer 'norm': NaN scores for sample 1"):
        top_k_selection(scores, _ctx([[1, 1], [1, 1]], [1, 1]), reducer_name="norm")


class Norm(ScoringReducer):
    name = "norm"
    capabilities = Capabilities()

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1)


def test_scoring_reducer_rejects_scores_of_wrong_shape():
    class Bad(Norm):
        def score(self, tokens, ctx):
            return tokens.norm(dim=-1)[:, :1]

    with pytest.raises(ReducerOutputError, match=r"score\(\) returned shape \(2, 1\), expected"):
        Bad().reduce(torch.randn(2, 3, 4), _ctx([[1, 1, 1]] * 2, [1, 1]))


def test_reducer_params_are_validated_and_frozen():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Norm({"nope": 1})
    reducer = Norm()
    with pytest.raises(ValidationError):
        reducer.params.nope = 1  # type: ignore[attr-defined]


def test_merge_apply_matches_an_explicit_weighted_mean_and_conserves_size():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    sizes = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    # sample 0: 0 -> 1, 3 -> 4; sample 1: 2 -> 0; padding maps to itself
    dest = torch.tensor([[1, 1, 2, 4, 4], [0, 1, 0, 3, 4]])
    merged, merged_sizes, sel = Merge(dest).apply(x, sizes, valid)
    assert sel.tolist() == [[1, 2, 4], [0, 1]]
    for b in range(2):
        for slot, root in enumerate(sel.tolist()[b]):
            group = [i for i in range(5) if valid[b, i] and int(dest[b, i]) == root]
            w = sizes[b, group]
            expected = (x[b, group] * w[:, None]).sum(0) / w.sum()
            torch.testing.assert_close(merged[b, slot], expected)
            assert merged_sizes[b, slot] == w.sum()
    # total size and the size-weighted mean of the whole sample are conserved
    for b in range(2):
        n = int(sel.counts[b])
        total = (sizes[b] * valid[b]).sum()
        assert merged_sizes[b, :n].sum() == total
        before = (x[b] * (sizes[b] * valid[b])[:, None]).sum(0) / total
        after = (merged[b, :n] * merged_sizes[b, :n, None]).sum(0) / total
        torch.testing.assert_close(after, before)
    assert bool((merged[1, 2:] == 0).all()) and merged_sizes[1, 2] == 0  # padding slot


def test_merge_root_plus_mean_is_the_root_plus_the_weighted_mean_of_the_others():
    """VisionZip's official contextual token: root + mean(others) (size-weighted); a root alone stays itself;
    dropped tokens count in no group; sizes add up as for the mean."""
    torch.manual_seed(1)
    x = torch.randn(1, 6, 3)
    sizes = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0, 1.0]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    dest = torch.tensor([[1, 1, 2, 1, -1, 2]])  # root 1 <- 0, 3; root 2 <- 5; 4 dropped
    merged, merged_sizes, sel = Merge(dest, "root_plus_mean").apply(x, sizes, valid)
    assert sel.tolist() == [[1, 2]] and merged_sizes.tolist() == [[6.0, 2.0]]
    others = (x[0, 0] * 1.0 + x[0, 3] * 3.0) / 4.0
    torch.testing.assert_close(merged[0, 0], x[0, 1] + others)
    torch.testing.assert_close(merged[0, 1], x[0, 2] + x[0, 5])
    alone, _, _ = Merge(torch.tensor([[0, 1, 1]]), "root_plus_mean").apply(x[:, :3], sizes[:, :3], valid[:, :3])
    torch.testing.assert_close(alone[0, 0], x[0, 0])  # a root with no other member is itself
    torch.testing.assert_close(alone[0, 1], x[0, 1] + x[0, 2])


def test_merge_apply_keeps_dtype():
    x = torch.randn(1, 4, 2, dtype=torch.bfloat16)
    merged, _, _ = Merge(torch.tensor([[0, 0, 2, 2]])).apply(x, torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool))
    assert merged.dtype == torch.bfloat16 and merged.shape == (1, 2, 2)


def test_layout_grid_marks_row_end_newlines_and_gathers():
    lay = TokenLayout.grid(2, 3, newlines=True, batch=2)
    assert lay.shape == (2, 8)
    assert lay.newline[0].tolist() == [False, False, False, True] * 2
    assert lay.row[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    picked = lay.gather(torch.tensor([[3, 4], [0, -1]]))
    assert picked.col.tolist() == [[3, 0], [0, 0]]
    with pytest.raises(ValueError, match="every field must be"):
        TokenLayout(lay.image, lay.view, lay.row[:, :2], lay.col, lay.newline)


def test_sequence_layout_places_images_on_visual_columns():
    from tokenprune.layout import sequence_layout

    visual = torch.tensor([[False, True, True, True, False, False], [True, True, False, False, False, False]])
    layouts = [TokenLayout.grid(1, 2), TokenLayout.grid(1, 1), TokenLayout.grid(1, 2)]  # sample 0 has two images
    lay = sequence_layout(layouts, visual)
    assert lay.image.tolist() == [[-1, 0, 0, 1, -1, -1], [0, 0, -1, -1, -1, -1]]
    assert lay.col.tolist() == [[-1, 0, 1, 0, -1, -1], [0, 1, -1, -1, -1, -1]]
    with pytest.raises(ValueError, match="cannot cover"):
        sequence_layout(layouts[:2], visual)
    with pytest.raises(ValueError, match="do not split"):
        sequence_layout([TokenLayout.grid(1, 2), TokenLayout.grid(1, 3)], visual)
