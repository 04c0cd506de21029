"""HiPrune: the contract, an independent port of the official ``encode_images`` selection, the engine's two layers."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import tiny_models as tm
import torch
from engine_fixtures import pipe
from tokenprune_hiprune import HiPrune

import tokenprune as tp
from tokenprune.testing import check_reducer, make_reduce_inputs


def official_hiprune(shallow: torch.Tensor, deep: torch.Tensor, retention: int, alpha: float, width: int) -> list[int]:
    """The tokens Danielement321/HiPrune keeps of one image, as a sorted list.

    A re-reading of ``LLaVA/llava/model/llava_arch.py`` ``encode_images`` at commit 6e83a12 (one image, ``N``
    tokens on a grid ``width`` wide; the Qwen2.5-VL file does the same with ``width = w / merge``): anchors by
    ``topk`` of the object layer's attention, their ``+-1, +-width`` neighbours clamped to ``[0, N - 1]``, then
    the deep layer's ``topk`` after subtracting 1 from the tokens already chosen.
    """
    n = shallow.shape[0]
    shallow_num = round(retention * alpha / 5)
    idx = torch.topk(shallow.unsqueeze(0), k=shallow_num, dim=1)[1]
    idx = torch.cat([idx, idx - 1, idx + 1, idx - width, idx + width], dim=1).clamp(0, n - 1)
    idx = torch.unique(idx, sorted=False).unsqueeze(0)
    deep_num = retention - idx.shape[1]
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask.scatter_(1, idx, 1)
    deep = deep.clone() - mask.int().squeeze()
    deep_idx = torch.topk(deep.unsqueeze(0), k=deep_num, dim=1)[1]
    return sorted(torch.cat([idx, deep_idx], dim=1)[0].tolist())


def _scores(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).softmax(0)


def _ctx(rows: int, cols: int, keep: int, params: dict, seed: int = 0):
    reducer = HiPrune(params)
    request = reducer.vision_attention_request()
    tokens, ctx = make_reduce_inputs(grids=[(rows, cols)], newlines=False, keep=keep, vision=request, seed=seed)
    shallow, deep = _scores(rows * cols, seed + 1), _scores(rows * cols, seed + 2)
    at = request.also_at[0]
    ctx = dataclasses.replace(ctx, vision_attention=deep[None], vision_attention_at={at: shallow[None]})
    return reducer, tokens, ctx, shallow, deep


def test_the_contract():
    check_reducer(HiPrune)
    check_reducer(HiPrune, {"attention": "cls", "object_layer": 2, "alpha": 0.5})


@pytest.mark.parametrize("keep", [192, 128, 64, 20])
@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_it_keeps_what_the_official_code_keeps_on_llava(keep, alpha):
    """LLaVA-1.5's 24x24 grid at the README's budgets (and a small one), two anchor shares."""
    reducer, tokens, ctx, shallow, deep = _ctx(24, 24, keep, {"alpha": alpha}, seed=keep)
    kept = reducer.reduce(tokens, ctx).tolist()[0]
    assert kept == official_hiprune(shallow, deep, keep, alpha, 24)
    assert len(kept) == keep


@pytest.mark.parametrize(("rows", "cols", "keep"), [(10, 14, 47), (6, 9, 18), (7, 7, 40)])
def test_it_keeps_what_the_official_code_keeps_on_other_grids(rows, cols, keep):
    """Qwen2.5-VL's merged grids are ``h/2 x w/2`` with the official ``width = w / merge``; edge anchors wrap."""
    reducer, tokens, ctx, shallow, deep = _ctx(rows, cols, keep, {"alpha": 0.5}, seed=rows)
    assert reducer.reduce(tokens, ctx).tolist()[0] == official_hiprune(shallow, deep, keep, 0.5, cols)


def test_anchors_bring_their_neighbours_and_registers_fill_the_rest():
    reducer, tokens, ctx, shallow, deep = _ctx(24, 24, 100, {"alpha": 0.05})
    shallow = torch.zeros(576)
    shallow[24 * 10 + 7] = 1.0  # the only anchor: round(100 * 0.05 / 5) = 1
    ctx = dataclasses.replace(ctx, vision_attention_at={8: shallow[None]})
    kept = set(reducer.reduce(tokens, ctx).tolist()[0])
    assert {247, 246, 248, 223, 271} <= kept
    registers = kept - {247, 246, 248, 223, 271}
    assert registers == set(
        deep.masked_fill(torch.isin(torch.arange(576), torch.tensor([247, 246, 248, 223, 271])), -1)
        .topk(95)
        .indices.tolist()
    )


def test_a_large_alpha_keeps_the_budget():
    """With alpha 1 on a small budget the anchors and buffers outnumber it (the official code fails); exact count."""
    reducer, tokens, ctx, _, _ = _ctx(6, 6, 8, {"alpha": 1.0})
    assert int(reducer.reduce(tokens, ctx).counts[0]) == 8


def test_the_request_reads_the_object_layer_and_the_features_layer():
    request = HiPrune({"object_layer": 16}).vision_attention_request()
    assert (request.kind, request.layer, request.also_at) == ("mean", None, (15,))


class _Spy(HiPrune):
    name = "hiprune_spy"
    seen: ClassVar[list] = []

    def reduce(self, tokens, ctx):
        _Spy.seen.append(ctx)
        return super().reduce(tokens, ctx)


class _Plugin:
    @staticmethod
    @tp.hookimpl
    def tokenprune_register_reducers(registry):
        registry.add(_Spy)


def _run(family: str, specs, keep, params):
    tiny = tm.BUILDERS[family]()
    stage = pipe(("post_projector", "hiprune_spy", keep))
    stage["stages"][0]["params"] = params
    _Spy.seen.clear()
    with tp.apply(tiny.model, stage, plugins=tp.get_plugin_manager(plugins=[_Plugin()])) as run, torch.no_grad():
        tiny.model(**tiny.make_inputs(specs))
    return tiny, run, _Spy.seen[-1]


def test_in_the_engine_the_two_layers_are_the_towers_attention():
    """Tiny LLaVA-1.5 (2 tower layers, features from the last): the object layer 1's and the features layer's mean
    patch attention, each equal to eager attention, and the official selection on them."""
    from test_vision_attention import _eager_weights, _tower_modules

    tiny, run, ctx = _run("llava", [[(56, 56)]], 6, {"object_layer": 1, "alpha": 0.9})  # round(6 * 0.9 / 5): 1 anchor
    _, tower, modules = _tower_modules(tiny.model)
    assert tower.feature_layer % len(modules) == 1
    weights = _eager_weights(tiny.model, tiny.make_inputs([[(56, 56)]]), modules)
    n = int(ctx.valid[0].sum())
    for layer, got in ((1, ctx.vision_attention), (0, ctx.vision_attention_at[0])):
        expected = weights[layer][0].mean(1)[0, 1:].mean(0)[1:]  # heads, then the patch query rows; CLS key dropped
        torch.testing.assert_close(got[0, :n], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(ctx.vision_attention, ctx.vision_attention_at[0])
    kept = run.stats.forwards[0].stages[0].leaving
    assert kept == [6]
    expected_kept = official_hiprune(ctx.vision_attention_at[0][0, :n], ctx.vision_attention[0, :n], 6, 0.9, 4)
    assert HiPrune({"object_layer": 1, "alpha": 0.9}).reduce(torch.zeros(1, n, 8), ctx).tolist()[0] == expected_kept


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_in_the_engine_on_crops_and_cls_free_towers(family):
    """LLaVA-NeXT's anyres crops (each its own grid) and Qwen2-VL's merged tokens: exactly the budget."""
    _, run, ctx = _run(family, [[(70, 100)], [(56, 56)]], 0.25, {"object_layer": 1})
    stages = run.stats.forwards[0].stages[0]
    assert stages.leaving == ctx.budget.tolist()
    assert 0 in ctx.vision_attention_at


def test_an_object_layer_the_tower_lacks_is_refused():
    tiny = tm.BUILDERS["llava"]()
    stage = pipe(("post_projector", "hiprune", 0.5))
    with pytest.raises(tp.TokenpruneError, match="vision layer 8 does not exist"):
        with tp.apply(tiny.model, stage), torch.no_grad():
            tiny.model(**tiny.make_inputs([[(56, 56)]]))


def test_the_probe_cost_counts_both_layers():
    """The stage's overhead holds the probe's multiply-accumulates at the object layer and at the features layer:
    twice FasterVLM's single `mean` layer on the same input (tiny LLaVA's two tower layers are alike)."""
    tiny = tm.BUILDERS["llava"]()
    inputs = tiny.make_inputs([[(56, 56)], [(56, 56)]])
    macs = {}
    for reducer, params in (("hiprune", {"object_layer": 1}), ("fastervlm", {"attention": "mean"})):
        stage = pipe(("post_projector", reducer, 6))
        stage["stages"][0]["params"] = params
        with tp.apply(tiny.model, stage) as run, torch.no_grad():
            tiny.model(**inputs)
        macs[reducer] = run.stats.forwards[0].stages[0].overhead_macs
    assert macs["fastervlm"] > 0 and macs["hiprune"] == 2 * macs["fastervlm"]


def test_an_object_layer_that_is_the_features_layer_is_counted_once():
    tiny = tm.BUILDERS["llava"]()
    inputs = tiny.make_inputs([[(56, 56)]])
    macs = []
    for object_layer in (1, 2):
        stage = pipe(("post_projector", "hiprune", 6))
        stage["stages"][0]["params"] = {"object_layer": object_layer, "layer": 0}
        with tp.apply(tiny.model, stage) as run, torch.no_grad():
            tiny.model(**inputs)
        macs.append(run.stats.forwards[0].stages[0].overhead_macs)
    assert macs[1] == 2 * macs[0] > 0  # object layer 1 is tower layer 0, the register layer: computed once
