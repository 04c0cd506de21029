"""Llama 4's adapter: the top model as the multimodal base model, complex ``freqs_cis`` through a cut, tile grids,
chunked attention, vision attention with the CLS token last. The engine invariants run on the same tiny model in
tests/test_engine_invariants.py."""

from __future__ import annotations

from typing import Any

import pytest
import tiny_models as tm
import torch
from engine_fixtures import pipe
from torch import Tensor

import tokenprune as tp
from tokenprune import Capabilities, ReduceContext, ScoringReducer
from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.llama4 import Llama4Adapter
from tokenprune.errors import TokenpruneError
from tokenprune.testing import adapters as ta

SPECS = [(56, 56), (112, 112), [(56, 112), (56, 56)]]


@pytest.fixture(scope="module")
def tiny() -> tm.Tiny:
    return tm.llama4()


@pytest.fixture(scope="module")
def plugins() -> tp.plugins.PluginManager:
    return ta.adapter_check_manager()


def _run(tiny: tm.Tiny, pipeline: dict, specs: list, plugins: tp.plugins.PluginManager) -> tp.RunStats:
    with tp.apply(tiny.model, pipeline, plugins=plugins) as run, torch.no_grad():
        tiny.model(**tiny.make_inputs(specs))
    return run.stats


def test_the_top_model_is_the_multimodal_model_and_the_text_model_holds_the_layers(tiny):
    adapter = tp.get_plugin_manager().adapters.get("llama4")(tiny.model)
    assert isinstance(adapter, Llama4Adapter)
    assert adapter.vlm() is tiny.model
    assert adapter.language_model() is tiny.model.language_model.model
    assert len(adapter.decoder_layers()) == 4
    assert adapter.text_config().layer_types == ["chunked_attention"] * 3 + ["full_attention"]


def test_local_tiles_are_stitched_into_one_grid_then_the_global_view(tiny, plugins):
    """Per image, read from the separators: its local tiles placed on one grid (view 1, ``crop`` the tile, row by
    row), then the global view (view 0); each tile 2 x 2 tokens (the pixel shuffle of 4 x 4 patches), row-major.
    Images of 2 x 2, 1 x 2 and 2 x 1 tiles, then a one-tile image (the global view only)."""
    specs = [[(112, 112), (56, 112), (112, 56), (56, 56)]]
    stats = _run(tiny, pipe(("post_projector", "check_drop", 1.0)), specs, plugins)
    lay = stats.forwards[0].stages[0].layout
    r, c = [0, 0, 1, 1], [0, 1, 0, 1]
    r2, c2 = [x + 2 for x in r], [x + 2 for x in c]  # the second row or column of tiles
    rows = [*r, *r, *r2, *r2, *r, *(r * 3), *r, *r2, *r, *r]
    cols = [*c, *c2, *c, *c2, *c, *c, *c2, *c, *(c * 3), *c]
    assert lay.row[0].tolist() == rows and lay.col[0].tolist() == cols
    tiles = [(0, 4), (1, 2), (2, 2), (3, 0)]  # (image, local tiles)
    assert lay.image[0].tolist() == [i for i, n in tiles for _ in range(4 * (n + 1))]
    assert lay.view[0].tolist() == [v for _, n in tiles for v in [1] * 4 * n + [0] * 4]
    assert lay.crop[0].tolist() == [t for _, n in tiles for t in [k for k in range(n) for _ in range(4)] + [-1] * 4]
    assert not lay.newline.any()


def test_tile_grids_read_the_separators_and_refuse_other_patterns():
    from tokenprune.adapters.llama4 import tile_grids

    ids = torch.tensor([[1, *tm._llama4_image_ids(3, 2), 30, *tm._llama4_image_ids(1, 1)]])
    assert tile_grids(ids, ids == tm.IMAGE_TOKEN, tm.LLAMA4_IDS["end"]) == [(6, 2), (0, 1)]
    cut = ids[:, :-1]  # the last image not closed
    assert tile_grids(cut, cut == tm.IMAGE_TOKEN, tm.LLAMA4_IDS["end"]) == []


def test_tiles_unmatched_by_the_prompt_get_one_grid_each(tiny):
    """Features the remembered runs do not explain: one square grid per tile, each numbered as an image."""
    adapter = Llama4Adapter(tiny.model)
    adapter._images = [(4, 2)]
    call = ImageCall((), {}, torch.zeros(3, 4, 8))
    layouts = adapter.image_layouts(call)
    assert [lay.image.tolist() for lay in layouts] == [[[i] * 4] for i in range(3)]
    assert all(lay.view.eq(0).all() and lay.row.tolist() == [[0, 0, 1, 1]] for lay in layouts)


def test_the_pixel_shuffle_orders_each_tiles_tokens_row_major(tiny):
    """Token k of a tile holds the 2 x 2 patches of row k // 2 and column k % 2 (the model's own pixel shuffle)."""
    from transformers.models.llama4.modeling_llama4 import pixel_shuffle

    side = 4
    coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).float()
    shuffled = pixel_shuffle(coords.reshape(1, side * side, 2), 0.5)[0]  # (4 tokens, 2 coords x 4 patches)
    for k in range(shuffled.shape[0]):
        patches = {(int(a), int(b)) for a, b in shuffled[k].reshape(-1, 2).tolist()}
        assert patches == {(2 * (k // 2) + i, 2 * (k % 2) + j) for i in (0, 1) for j in (0, 1)}


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_freqs_cis_follows_a_layer_cut(tiny, plugins, positions):
    """After a cut at layer 2, layers 2 and 3 get the kept tokens' complex freqs_cis: those of the position ids they
    receive (original: gathered, with gaps; compact: renumbered 0, 1, ... per sample)."""
    seen = []

    def grab(module, args, kwargs):
        seen.append((args[0].shape[1], kwargs["position_embeddings"], kwargs["position_ids"]))

    layers = tiny.model.language_model.model.layers
    pipeline = pipe(({"layer": 2}, "check_drop", 0.5), positions=positions)
    with tp.apply(tiny.model, pipeline, plugins=plugins), torch.no_grad():  # after the engine's hooks
        handles = [layers[i].register_forward_pre_hook(grab, with_kwargs=True) for i in (1, 2, 3)]
        try:
            tiny.model(**tiny.make_inputs(SPECS[1:2]))
        finally:
            for h in handles:
                h.remove()
    (width, _, _), *pruned = seen
    rotary = tiny.model.language_model.model.rotary_emb
    for length, freqs, position_ids in pruned:
        assert length < width and freqs.is_complex() and freqs.shape == (1, length, 8)
        assert torch.equal(freqs, rotary(freqs.real, position_ids))
        steps = position_ids[0].diff()
        assert bool((steps == 1).all()) == (positions == "compact")


def test_layer_stats_are_recorded_where_the_top_model_is_the_multimodal_model(tiny, plugins):
    """The multimodal model's post-hook runs before the top model's (the same module): every decoder layer's kept
    tokens are recorded after a post_projector cut."""
    stats = _run(tiny, pipe(("post_projector", "check_drop", 0.5)), SPECS, plugins)
    fs = stats.forwards[0]
    inputs = tiny.make_inputs(SPECS)
    real = inputs["attention_mask"].sum(1).tolist()
    visual = (inputs["input_ids"] == tm.IMAGE_TOKEN).sum(1).tolist()
    kept = [r - v + v // 2 for r, v in zip(real, visual, strict=True)]
    assert fs.layer_tokens == [kept] * 4


class _PreDrop(ScoringReducer):
    name = "pre_drop"
    capabilities = Capabilities(insertion_points=frozenset({"pre_projector", "post_projector"}))

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        return torch.rand(ctx.valid.shape)


class _PrePlugin:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        registry.add(_PreDrop)


def test_a_pre_projector_stage_is_refused_by_name(tiny):
    with pytest.raises(TokenpruneError, match=r"'llama4'.*pre_projector stages are not served for llama4"):
        _run(tiny, pipe(("pre_projector", "pre_drop", 0.5)), SPECS[:1], ta.adapter_check_manager(_PrePlugin()))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny.model.modules())


def test_prompts_longer_than_a_chunk(plugins, monkeypatch):
    """Chunks of 16 tokens, prompts of up to 36: keep-all is still the identity and cached decoding after a
    post_projector cut equals a recompute (the model chunks the pruned sequence); after a layer cut, decoding is
    refused by name (the chunked layers' cache and mask keep only their chunk)."""
    tiny = tm.llama4(chunk=16)
    case = ta.adapter_case(tiny.model, tiny.make_inputs, SPECS, plugins=plugins, suppress_tokens=[4, 5, 6, 7])
    assert case.padded_batch()["input_ids"].shape[1] > 16
    ta.keep_all_is_identity(case)
    monkeypatch.setattr(ta, "PRUNE", pipe(("post_projector", "check_drop", 0.5)))
    ta.cached_decode_equals_recompute(case)
    with tp.apply(tiny.model, pipe(({"layer": 2}, "check_drop", 0.5)), plugins=plugins):
        with pytest.raises(TokenpruneError, match=r"'llama4': layer 2 is a chunked_attention layer"):
            case.generate(case.padded_batch(), 4)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny.model.modules())


def test_the_census_serves_llama4_and_it_passes():
    """The census's own tiny Llama 4 (built from the default config, shrunk) and inputs keep the invariants."""
    from tokenprune.testing.census import census_one

    row = census_one("llama4")
    assert (row.status, row.adapter) == ("passes", "llama4"), row.detail


def test_vision_probe_scores_equal_eager_attention(tiny, monkeypatch):
    """At the feature (last) layer, per tile: the probe's ``mean`` scores (under sdpa) are the eager attention each
    position receives, averaged over heads and queries (the CLS token, last, included as the tower has it)."""
    from transformers.models.llama4 import modeling_llama4

    from tokenprune.engine import compat
    from tokenprune.engine.vision_probe import VisionProbe

    tower = Llama4Adapter(tiny.model).vision_tower()
    assert tower is not None and not tower.has_cls and tower.feature_layer == 1
    inputs = tiny.make_inputs([SPECS[0], SPECS[1], None])
    probe = VisionProbe(tower, {tower.feature_layer: (frozenset({"mean"}), False, False)})
    probe.install()
    try:
        probe.reset(active=True)
        with torch.no_grad():
            tiny.model(**inputs)
        got = probe.records[tower.feature_layer].scores["mean"]
    finally:
        probe.remove()
    target = compat.vision_attention_module(tower.layers[-1])
    seen, stock = [], modeling_llama4.vision_eager_attention_forward

    def capture(module, *args, **kwargs):
        out, weights = stock(module, *args, **kwargs)
        if module is target:
            seen.append(weights.float())
        return out, weights

    monkeypatch.setattr(modeling_llama4, "vision_eager_attention_forward", capture)
    previous = compat.swap_attention_implementation(target.config, "eager")
    try:
        with torch.no_grad():
            tiny.model(**inputs)
    finally:
        compat.restore_attention_implementation(target.config, previous)
    expected = torch.cat(seen).mean(1).mean(1)  # (tiles, S): over heads, then over queries
    assert len(got) == expected.shape[0] == inputs["pixel_values"].shape[0]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
