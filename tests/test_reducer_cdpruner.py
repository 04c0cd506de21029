"""CDPruner: a loop re-implementation of the official selection, greedy log-det, views, text, contract."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from tokenprune_cdpruner import CDPruner, dpp_greedy_picks

from tokenprune import ReducerInputError, TokenLayout, load_pipeline
from tokenprune.testing import check_reducer, dense_context, make_reduce_inputs


def context(n, budget, text, **kw):
    """A dense context with text tokens ``text`` (``(B, T, D)``)."""
    ctx = dense_context(n, budget, **kw)
    return replace(ctx, text=text, text_valid=torch.ones(text.shape[:2], dtype=torch.bool))


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def reference_relevance(x: list[list[float]], text: list[list[float]]) -> list[float]:
    """The official relevance: negated mean cosine to the text embeddings, min-max scaled (+1e-6)."""
    q = [-sum(cosine(v, t) for t in text) / len(text) for v in x]
    lo, hi = min(q), max(q)
    return [(v - lo + 1e-6) / (hi - lo) for v in q]


def reference_greedy(x: list[list[float]], r: list[float], k: int) -> list[int]:
    """The official fast greedy MAP (CDPruner llava_arch.py) with plain loops, in the order picked."""
    n = len(x)
    kernel = [[r[i] * cosine(x[i], x[j]) * r[j] for j in range(n)] for i in range(n)]
    cis: list[list[float]] = []
    di2s = [kernel[i][i] for i in range(n)]
    picked = []
    for _ in range(k):
        j = max(range(n), key=lambda i: (di2s[i], -i))
        picked.append(j)
        eis = [(kernel[j][m] - sum(c[j] * c[m] for c in cis)) / math.sqrt(di2s[j]) for m in range(n)]
        cis.append(eis)
        di2s = [d - e * e for d, e in zip(di2s, eis, strict=True)]
        di2s[j] = -math.inf
    return picked


def greedy_log_det(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP by brute force: each pick maximises det(L[S + j]) (what fast greedy MAP computes incrementally)."""
    chosen: list[int] = []
    for _ in range(k):
        dets = [
            -math.inf if j in chosen else float(torch.linalg.det(kernel[[*chosen, j]][:, [*chosen, j]]))
            for j in range(kernel.shape[0])
        ]
        chosen.append(max(range(len(dets)), key=lambda j: (dets[j], -j)))
    return chosen


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("n", "k", "t"), [(12, 3, 1), (20, 10, 4), (9, 8, 2), (30, 1, 1)])
def test_matches_the_official_algorithm(seed, n, k, t):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, 16, generator=gen) + 0.2
    text = torch.randn(1, t, 16, generator=gen)
    kept = CDPruner().reduce(x, context(n, k, text)).tolist()[0]
    r = reference_relevance(x[0].tolist(), text[0].tolist())
    assert kept == sorted(reference_greedy(x[0].tolist(), r, k))


def test_fast_greedy_equals_greedy_log_det():
    gen = torch.Generator().manual_seed(5)
    feats = torch.nn.functional.normalize(torch.randn(14, 20, generator=gen, dtype=torch.float64), dim=-1)
    r = torch.rand(14, generator=gen, dtype=torch.float64) + 0.1
    kernel = r[:, None] * (feats @ feats.T) * r[None]
    picks = dpp_greedy_picks(kernel[None].float(), torch.ones(1, 14, dtype=torch.bool), torch.tensor([9]))
    assert picks[0].tolist() == greedy_log_det(kernel, 9)


def test_relevance_is_the_negated_similarity_to_the_text():
    """With orthogonal tokens (no diversity to gain), picks follow relevance: least text-like first (official sign)."""
    x = torch.eye(4)[None] * torch.tensor([1.0, 2.0, 3.0, 4.0])[None, :, None]
    text = torch.tensor([[[1.0, 0.5, 0.2, 0.0]]])  # cosines to the tokens: decreasing from token 0 to 3
    assert [CDPruner().reduce(x, context(4, k, text)).tolist()[0] for k in (1, 2, 3)] == [[3], [2, 3], [1, 2, 3]]


def test_views_are_separate_dpps_with_one_relevance_scale():
    """Base view 2x2 (4 tokens) and a 2x3 grid with newlines (view 1): 5 free tokens split 2 + 3."""
    layout = TokenLayout.cat([TokenLayout.grid(2, 2), TokenLayout.grid(2, 3, newlines=True, view=1)])
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 12, 8, generator=gen)
    text = torch.randn(1, 3, 8, generator=gen)
    ctx = context(12, 7, text, protected=layout.newline.clone(), layout=layout)
    kept = CDPruner({"split": "view"}).reduce(x, ctx).tolist()[0]
    grid = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]
    r = dict(zip(grid, reference_relevance(x[0, grid].tolist(), text[0].tolist()), strict=True))
    base, hires = grid[:4], grid[4:]
    expected = [base[p] for p in reference_greedy(x[0, base].tolist(), [r[i] for i in base], 2)]
    expected += [hires[p] for p in reference_greedy(x[0, hires].tolist(), [r[i] for i in hires], 3)]
    assert kept == sorted([*expected, 7, 11])
    whole = CDPruner({"split": "sample"}).reduce(x, ctx).tolist()[0]
    assert whole == sorted([grid[p] for p in reference_greedy(x[0, grid].tolist(), list(r.values()), 5)] + [7, 11])


def test_the_default_selects_per_crop_of_the_base_view_size():
    """The official per-crop selection: base view 2x2, a 4x4 grid cut into four 2x2 crops; 10 free tokens
    split 2 + 2 + 2 + 2 + 2, each crop its own DPP, one relevance scale over the sample."""
    layout = TokenLayout.cat([TokenLayout.grid(2, 2), TokenLayout.grid(4, 4, view=1)])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 20, 8, generator=gen)
    text = torch.randn(1, 3, 8, generator=gen)
    kept = CDPruner().reduce(x, context(20, 10, text, layout=layout)).tolist()[0]
    r = reference_relevance(x[0].tolist(), text[0].tolist())
    crops = [[0, 1, 2, 3]] + [
        [4 + 4 * row + col for row in rows for col in cols] for rows in ((0, 1), (2, 3)) for cols in ((0, 1), (2, 3))
    ]
    expected = []
    for crop in crops:
        expected += [crop[p] for p in reference_greedy(x[0, crop].tolist(), [r[i] for i in crop], 2)]
    assert kept == sorted(expected)
    assert CDPruner({"split": "view"}).reduce(x, context(20, 10, text, layout=layout)).tolist()[0] != kept


def test_crops_follow_the_layouts_crop_where_unpadding_cut_the_top():
    """A 6x8 grid whose padded 8x8 lost one row at the top: the crops are rows 0-2 / 3-5 (the official crops
    of the padded grid), not 0-3 / 4-5 as counted from the unpadded corner."""
    hires = TokenLayout.grid(6, 8, view=1)
    hires = replace(hires, crop=((hires.row + 1) // 4) * 2 + hires.col // 4)
    layout = TokenLayout.cat([TokenLayout.grid(4, 4), hires])
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 64, 8, generator=gen)
    text = torch.randn(1, 3, 8, generator=gen)
    kept = CDPruner().reduce(x, context(64, 16, text, layout=layout)).tolist()[0]
    r = reference_relevance(x[0].tolist(), text[0].tolist())
    crops = [list(range(16))] + [
        [16 + 8 * row + col for row in rows for col in cols]
        for rows in ((0, 1, 2), (3, 4, 5))
        for cols in (range(4), range(4, 8))
    ]
    quotas = [4, 3, 3, 3, 3]  # 16 split by size (16, 12, 12, 12, 12), largest remainder
    expected = []
    for crop, quota in zip(crops, quotas, strict=True):
        expected += [crop[p] for p in reference_greedy(x[0, crop].tolist(), [r[i] for i in crop], quota)]
    assert kept == sorted(expected)


@pytest.mark.parametrize(("size", "offset"), [((70, 100), (1, 0)), ((100, 70), (0, 1))])
def test_llava_next_crops_are_located_with_the_unpadding_offset(size, offset):
    """Tiny LLaVA-NeXT (4x4-token crops on a 2x2 grid of 8x8 tokens): a 70x100 image loses one padded row at the
    top (and bottom), a 100x70 one a column at the left; each crop is the official one, shifted by that offset."""
    import tiny_models as tm
    from engine_fixtures import pipe
    from tokenprune_cdpruner import crop_tiles

    import tokenprune as tp

    seen = []

    class Spy(CDPruner):
        name = "cdpruner_spy"

        def reduce(self, tokens, ctx):
            seen.append(ctx)
            return super().reduce(tokens, ctx)

    class SpyPlugin:
        @tp.hookimpl
        def tokenprune_register_reducers(self, registry):
            registry.add(Spy)

    tiny = tm.BUILDERS["llava_next"]()
    with tp.apply(
        tiny.model, pipe(("post_projector", "cdpruner_spy", 0.3)), plugins=tp.get_plugin_manager(plugins=[SpyPlugin()])
    ):
        with torch.no_grad():
            tiny.model(**tiny.make_inputs([[size]]))
    (ctx,) = seen
    lay = ctx.layout
    hires = ((lay.view[0] == 1) & ~lay.newline[0] & ctx.valid[0]).nonzero().squeeze(1)
    rows, cols = int(lay.row[0, hires].max()) + 1, int(lay.col[0, hires].max()) + 1
    assert (rows, cols) == ((6, 8) if offset[0] else (8, 6))  # unpadded: 8 - 2 * 1
    tiles = {tuple(sorted(t.tolist())) for t in crop_tiles(hires, ctx, 0)}
    official = {}
    for i in hires.tolist():
        r, c = int(lay.row[0, i]) + offset[0], int(lay.col[0, i]) + offset[1]
        official.setdefault((r // 4, c // 4), []).append(i)
    assert tiles == {tuple(sorted(v)) for v in official.values()}
    assert len(tiles) == 4


def test_a_padded_batch_matches_each_sample_alone():
    tokens, ctx = make_reduce_inputs(grids=[(5, 6), (2, 3), (4, 4)], keep=0.3, dim=24, newlines=False, text_tokens=4)
    kept = CDPruner().reduce(tokens, ctx).tolist()
    for b, got in enumerate(kept):
        n, k = int(ctx.num_valid[b]), int(ctx.budget[b])
        r = reference_relevance(tokens[b, :n].tolist(), ctx.text[b].tolist())
        assert got == sorted(reference_greedy(tokens[b, :n].tolist(), r, k))


def test_more_picks_than_the_feature_rank():
    """Rank 2: after two picks every gain is spanned; the rest follow relevance instead of NaN."""
    x = torch.randn(1, 8, 2, generator=torch.Generator().manual_seed(3))
    text = torch.tensor([[[1.0, 0.0]]])
    r = reference_relevance(x[0].tolist(), text[0].tolist())
    first_two = reference_greedy(x[0].tolist(), r, 2)
    rest = sorted((i for i in range(8) if i not in first_two), key=lambda i: -r[i])
    for k in range(3, 9):
        assert CDPruner().reduce(x, context(8, k, text)).tolist()[0] == sorted(first_two + rest[: k - 2])


def test_edge_cases():
    text = torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(0))
    assert CDPruner().reduce(torch.randn(1, 1, 4), context(1, 1, text)).tolist() == [[0]]
    assert CDPruner().reduce(torch.randn(1, 5, 4), context(5, 5, text)).tolist() == [[0, 1, 2, 3, 4]]
    for seed in range(20):  # identical tokens: rounding noise in the relevance must not decide
        text = torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(seed))
        assert CDPruner().reduce(torch.ones(1, 6, 4), context(6, 3, text)).tolist() == [[0, 1, 2]]  # lower index
    assert CDPruner().reduce(torch.zeros(1, 4, 4), context(4, 2, text)).tolist() == [[0, 1]]  # no NaN
    no_text = replace(context(5, 2, text), text_valid=torch.zeros(1, 2, dtype=torch.bool))
    assert CDPruner().reduce(torch.randn(1, 5, 4), no_text).counts.tolist() == [2]  # uniform relevance


def test_missing_or_bad_text_is_rejected():
    x = torch.randn(1, 5, 4)
    with pytest.raises(ReducerInputError, match=r"'cdpruner' needs the text tokens"):
        CDPruner().reduce(x, dense_context(5, 2))
    text = torch.randn(1, 3, 4)
    text[0, 1, 0] = float("nan")
    with pytest.raises(ReducerInputError, match=r"text token 1 of sample 0"):
        CDPruner().reduce(x, context(5, 2, text))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_rejected(bad):
    x = torch.randn(1, 5, 4)
    x[0, 3, 1] = bad
    with pytest.raises(ReducerInputError, match=r"'cdpruner'.*token 3 of sample 0"):
        CDPruner().reduce(x, context(5, 2, torch.randn(1, 2, 4)))


def test_defaults():
    assert CDPruner().params.model_dump() == {"split": "tile"}
    assert CDPruner.capabilities.needs_text


@pytest.mark.parametrize("params", [{}, {"split": "view"}, {"split": "sample"}])
def test_contract(params):
    check_reducer(CDPruner, params)


def test_validates_in_yaml():
    pipe = load_pipeline(
        "stages:\n  - at: post_projector\n    reducer: cdpruner\n    keep: 64\n    params: {split: sample}\n"
    )
    assert pipe.stages[0].params == {"split": "sample"}
    with pytest.raises(ValueError, match="per_veiw"):
        load_pipeline(
            "stages:\n  - at: post_projector\n    reducer: cdpruner\n    keep: 64\n    params: {per_veiw: false}\n"
        )


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_text_at_post_projector_is_the_prompts_own_embeddings(family):
    """Through tp.apply, ctx.text holds the input embeddings of each sample's non-image tokens, padding excluded."""
    import tiny_models as tm
    from engine_fixtures import BATCH_SPECS, forward, pipe

    import tokenprune as tp

    seen = []

    class Spy(CDPruner):
        name = "cdpruner_spy"

        def reduce(self, tokens, ctx):
            seen.append((ctx.text.clone(), ctx.text_valid.clone()))
            return super().reduce(tokens, ctx)

    class SpyPlugin:
        @tp.hookimpl
        def tokenprune_register_reducers(self, registry):
            registry.add(Spy)

    tiny = tm.BUILDERS[family]()
    batch = tiny.make_inputs(BATCH_SPECS[family])
    manager = tp.get_plugin_manager(plugins=[SpyPlugin()])
    with tp.apply(tiny.model, pipe(("post_projector", "cdpruner_spy", 0.3)), plugins=manager):
        forward(tiny.model, batch, family)
    text, text_valid = seen[-1]
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    embed = tiny.model.get_input_embeddings()
    for b in range(ids.shape[0]):
        cols = (mask[b] & (ids[b] != tiny.model.config.image_token_id)).nonzero().squeeze(1)
        assert int(text_valid[b].sum()) == cols.numel() > 0
        torch.testing.assert_close(text[b, : cols.numel()], embed(ids[b, cols]))


def test_plugins_lists_both_with_capabilities():
    import json

    from typer.testing import CliRunner

    from tokenprune.cli import app

    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    for name, needs_text in (("divprune", False), ("cdpruner", True)):
        assert plugins[name]["distribution"] == "tokenprune"
        (reducer,) = plugins[name]["reducers"]
        caps = reducer["capabilities"]
        assert reducer["name"] == name
        assert caps["insertion_points"] == ["layer", "post_projector"] and caps["attention"] == []
        assert (caps["needs_text"], caps["merges"], caps["deterministic_count"]) == (needs_text, False, True)
