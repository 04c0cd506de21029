"""vispruner: important + diverse tokens against plain loops and a re-implementation of the official code.

The vispruner entry point (``tokenprune_vispruner`` in ``pyproject.toml``) reaches the shared venv only
when it is reinstalled; these tests build their plugin manager from the module.
"""

from __future__ import annotations

import math

import pytest
import tiny_models
import torch
from engine_fixtures import forward, manager_with
from tokenprune_vispruner import VisPruner

import tokenprune as tp
from tokenprune import ReducerInputError
from tokenprune.engine import compat
from tokenprune.testing import check_reducer, make_reduce_inputs


def _manager() -> tp.plugins.PluginManager:
    import tokenprune_vispruner

    return manager_with(tokenprune_vispruner)


def _pipe(keep: float | int, **params: object) -> dict:
    return {"stages": [{"at": "post_projector", "reducer": "vispruner", "keep": keep, "params": params}]}


def _loop_reference(scores: list[float], feats: list[list[float]], quota: int, ratio: float) -> list[int]:
    """VisPruner's selection written as plain loops: important by attention, then even/odd de-duplication."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    n_imp = int(quota * ratio)
    important, residual, diverse = order[:n_imp], order[n_imp:], quota - n_imp

    def unit(v: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v] if norm > 0 else v

    u = {i: unit(feats[i]) for i in residual}
    while (drop := min(8, len(residual) - diverse)) > 0:
        even, odd = residual[0::2], residual[1::2]
        best = [max(sum(a * b for a, b in zip(u[e], u[o], strict=True)) for o in odd) for e in even]
        ranked = sorted(range(len(even)), key=lambda j: (-best[j], j))
        residual = [even[j] for j in ranked[drop:]] + odd
    return sorted(important + residual)


@pytest.mark.parametrize(
    ("keep", "ratio", "similarity"), [(0.5, 0.5, "vision"), (0.3, 0.75, "projected"), (0.9, 0.0, "vision")]
)
def test_selection_equals_a_plain_loop(keep, ratio, similarity):
    reducer = VisPruner({"important_ratio": ratio, "similarity": similarity})
    grids = ((9, 10), (6, 7), (12, 12))
    tokens, ctx = make_reduce_inputs(grids=grids, keep=keep, reducer=reducer, vision=reducer.vision_attention_request())
    feats = ctx.vision_features if similarity == "vision" else tokens
    kept = reducer.reduce(tokens, ctx).tolist()
    for b, got in enumerate(kept):
        members = (ctx.valid[b] & ~ctx.protected[b]).nonzero().flatten().tolist()
        quota = int(ctx.budget[b]) - int((ctx.protected[b] & ctx.valid[b]).sum())
        scores = [float(ctx.vision_attention[b, i]) for i in members]
        picked = _loop_reference(scores, [feats[b, i].tolist() for i in members], quota, ratio)
        protected = (ctx.protected[b] & ctx.valid[b]).nonzero().flatten().tolist()
        assert got == sorted(protected + [members[j] for j in picked])
        assert len(got) == int(ctx.budget[b])


def test_duplicates_go_and_distinct_tokens_stay():
    """Two important tokens, then ten in attention order: five copies of one feature and five distinct ones.
    One round drops the four copies at even positions; one copy and the distinct tokens stay."""
    tokens, ctx = make_reduce_inputs(
        grids=((1, 12),), newlines=False, keep=8, vision=VisPruner().vision_attention_request()
    )
    ctx.vision_attention = torch.linspace(1.0, 0.1, 12)[None]
    feats = torch.ones(1, 12, 16)
    distinct = [5, 7, 9, 10, 11]
    for i, j in enumerate(distinct):
        feats[0, j] = torch.nn.functional.one_hot(torch.tensor(i), 16).float()
    ctx.vision_features = feats
    kept = VisPruner({"important_ratio": 0.25}).reduce(tokens, ctx).tolist()[0]  # int(8 * 0.25) = 2 important
    assert kept == [0, 1, 3, *distinct]


def test_without_the_signals_the_errors_say_what_is_missing():
    tokens, ctx = make_reduce_inputs()
    with pytest.raises(ReducerInputError, match=r"'vispruner' needs ctx\.vision_attention"):
        VisPruner().reduce(tokens, ctx)
    ctx.vision_attention = torch.zeros(ctx.valid.shape)
    with pytest.raises(ReducerInputError, match=r"needs ctx\.vision_features.*similarity: projected"):
        VisPruner().reduce(tokens, ctx)


def test_nan_tower_features_are_refused_like_nan_tokens():
    tokens, ctx = make_reduce_inputs(grids=((3, 4),), keep=4, vision=VisPruner().vision_attention_request())
    ctx.vision_features[0, 0, 0] = float("nan")
    with pytest.raises(ReducerInputError, match="NaN or infinite"):
        VisPruner().reduce(tokens, ctx)


@pytest.mark.parametrize(
    "params", [{}, {"attention": "mean"}, {"similarity": "projected"}, {"important_ratio": 1.0}, {"layer": -1}]
)
def test_contract(params):
    check_reducer(VisPruner, params)


def _official_vispruner(model, pixel_values, select_layer: int, keep: int, ratio: float) -> list[list[int]]:
    """VisPruner's encode_images (Theia-4869/VisPruner) on LLaVA-1.5: eager attentions and hidden states at
    select_layer, [CLS] row over the patches averaged over heads, argsort, then the batched even/odd rounds."""
    tower = model.model.vision_tower
    previous = compat.swap_attention_implementation(tower.config, "eager")
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        compat.restore_attention_implementation(tower.config, previous)
    feats = out.hidden_states[select_layer][:, 1:]
    attn = out.attentions[select_layer][:, :, 0, 1:].mean(1)
    b = feats.shape[0]
    n_imp = int(keep * ratio)
    order = attn.argsort(dim=-1, descending=True)
    important, residual = order[:, :n_imp], order[:, n_imp:]
    unit = feats / feats.norm(dim=-1, keepdim=True)
    rows = torch.arange(b)[:, None]
    while (r := min(8, residual.shape[1] - (keep - n_imp))) > 0:
        big = residual.shape[1]
        tokens = unit[rows.expand(-1, big), residual]
        scores = (tokens[:, ::2] @ tokens[:, 1::2].transpose(-1, -2)).max(-1).values
        distinct = scores.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat([residual[:, ::2][rows.expand(-1, big // 2 - r), distinct], residual[:, 1::2]], -1)
    return [sorted(row.tolist()) for row in torch.cat([important, residual], -1)]


@pytest.mark.parametrize(("keep", "ratio"), [(12, 0.5), (11, 0.55), (10, 0.4)])
def test_llava_matches_the_official_algorithm(keep, ratio):
    t = tiny_models.llava()
    inputs = t.make_inputs([(56, 56), (56, 56)])
    with tp.apply(t.model, _pipe(keep, important_ratio=ratio), plugins=_manager()) as run:
        with torch.no_grad():
            t.model(**inputs)
    got = run.stats.last_prefill.stages[0].kept
    layer = t.model.config.vision_feature_layer  # -1 in the tiny model (-2 in LLaVA-1.5's checkpoints)
    assert got == _official_vispruner(t.model, inputs["pixel_values"], layer, keep, ratio)
    assert run.stats.last_prefill.stages[0].overhead_macs > 0


@pytest.mark.parametrize(
    ("name", "attention", "similarity"),
    [("llava_next", "cls", "vision"), ("qwen2_vl", "mean", "vision"), ("llava", "cls", "projected")],
)
def test_end_to_end_batched_equals_one_by_one(name, attention, similarity):
    t = getattr(tiny_models, name)()
    specs = [(56, 84), (100, 56), None] if name != "llava" else [(56, 56), (56, 56), None]
    with tp.apply(t.model, _pipe(0.4, attention=attention, similarity=similarity), plugins=_manager()) as run:
        batched = forward(t.model, t.make_inputs(specs), name)
        kept = run.stats.last_prefill.stages[0].kept
        for i, spec in enumerate(specs):
            alone = forward(t.model, t.make_inputs([spec], start=i), name)
            if spec is not None:
                assert run.stats.last_prefill.stages[0].kept[0] == kept[i]
            torch.testing.assert_close(alone.logits[0, -1], batched.logits[i, -1], rtol=1e-4, atol=1e-5)
    assert kept[2] == [] and len(kept[0]) > 0


@pytest.mark.parametrize(("neighbours", "fallback"), [(32, 8), (4, 2), (2, 0)])
@pytest.mark.parametrize("clustered", [False, True])
def test_fast_rounds_pick_what_the_full_block_rounds_pick(monkeypatch, neighbours, fallback, clustered):
    """The neighbour lists (with their fallback, and the exact rounds when it overflows) equal the rounds
    that read the whole even-by-odd block, on spread and on clustered (near-duplicate) features."""
    import tokenprune_vispruner as module

    monkeypatch.setattr(module, "NEIGHBOURS", neighbours)
    monkeypatch.setattr(module, "FALLBACK_ROWS", fallback)
    g = torch.Generator().manual_seed(neighbours + fallback + clustered)
    misses = []
    for n, quota, ratio in [(300, 40, 0.5), (257, 100, 0.25), (90, 9, 0.0)]:
        feats = torch.randn(n, 24, generator=g)
        if clustered:  # a few centres plus noise: many near-duplicates, lists full of one cluster
            feats = torch.randn(6, 24, generator=g)[torch.randint(6, (n,), generator=g)] + 0.05 * feats
        scores = torch.rand(n, generator=g)
        fast, missed = module._picks(scores, feats, quota, ratio)
        reference = module.vispruner_picks(scores, feats, quota, ratio, exact=True)
        assert torch.equal(module.vispruner_picks(scores, feats, quota, ratio), reference)
        if not bool(missed):
            assert torch.equal(fast, reference)
        if neighbours == 32:  # the default lists: every round read them (with the fallback), no exact rerun
            assert not bool(missed)
        misses.append(bool(missed))
    if neighbours == 2 and clustered:  # two neighbours cannot hold a cluster: the exact rounds rerun
        assert any(misses)
