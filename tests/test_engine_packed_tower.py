"""``pre_projector`` and ``{vision_layer: k}`` on Qwen2-VL and Qwen2.5-VL's packed towers, on whole 2x2 merge units.

The engine invariants (keep-all identity, cached decoding == no-cache recompute, batch == one by one, remove()
restores) at both points; the language model receives the stock merger's tokens at the kept units; a vision-layer
removal equals the tower's own blocks run window by window (or frame by frame) on the kept patches with their own
rotary positions; merges inside the packed tower are refused with the reason.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import tiny_models as tm
import torch
from engine_fixtures import BATCH_SPECS, forward, generate, pipe
from torch import Tensor

import tokenprune as tp
from tokenprune import Capabilities, ReduceContext, ScoringReducer
from tokenprune.errors import TokenpruneError

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
POINTS = frozenset({"vision_layer", "pre_projector", "post_projector", "layer"})


class UnitDrop(ScoringReducer):
    """Seeded scores per unit place, so a frame keeps the same units in any batch."""

    name = "unit_drop"
    capabilities = Capabilities(insertion_points=POINTS)

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        gen = torch.Generator().manual_seed(11 + ctx.stage_index)
        return torch.rand(tokens.shape[1], generator=gen).expand(ctx.valid.shape).clone()


class _Plugin:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        registry.add(UnitDrop)


@pytest.fixture(scope="module")
def manager() -> tp.plugins.PluginManager:
    return tp.get_plugin_manager(plugins=[_Plugin()])


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


def _batch(tiny: tm.Tiny) -> dict[str, Any]:
    specs = BATCH_SPECS[tiny.name]
    return tiny.make_inputs([specs[0], specs[1], None])


AT = ["pre_projector", {"vision_layer": 1}]


@pytest.mark.parametrize("at", AT, ids=str)
def test_keep_all_is_identity(tiny, manager, at):
    inputs = _batch(tiny)
    ref, ref_gen = forward(tiny.model, inputs, tiny.name).logits, generate(tiny.model, inputs, 3)
    with tp.apply(tiny.model, pipe((at, "unit_drop", 1.0)), plugins=manager) as run:
        out, gen = forward(tiny.model, inputs, tiny.name).logits, generate(tiny.model, inputs, 3)
    assert torch.equal(out, ref) and torch.equal(gen.sequences, ref_gen.sequences)
    (stage,) = run.stats.last_prefill.stages
    assert stage.entering == stage.leaving and stage.entering[:2] == [4, 16]


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("at", AT, ids=str)
def test_cached_decode_equals_recompute(tiny, manager, at, positions):
    inputs = _batch(tiny)
    pipeline = {**pipe((at, "unit_drop", 0.5), ({"layer": 2}, "unit_drop", 0.5)), "positions": positions}
    with tp.apply(tiny.model, pipeline, plugins=manager) as run:
        gen = generate(tiny.model, inputs, 4)
        kept = [s.kept for s in run.stats.last_prefill.stages]
        first = run.stats.last_prefill.stages[0]
        assert first.leaving[:2] == [2, 8] and first.entering[:2] == [4, 16]
        seq = gen.sequences
        new = seq.shape[1] - inputs["input_ids"].shape[1]
        full = {**inputs, "input_ids": seq}
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(seq.shape[0], new).long()], 1)
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(seq[:, :new])], 1)
        out = forward(tiny.model, full, tiny.name, use_cache=False).logits
        assert [s.kept for s in run.stats.last_prefill.stages] == kept
    for j in range(new):
        torch.testing.assert_close(out[:, -new - 1 + j], gen.logits[j], atol=1e-5, rtol=0)


@pytest.mark.parametrize("at", AT, ids=str)
def test_batch_equals_one_by_one(tiny, manager, at):
    specs = BATCH_SPECS[tiny.name]
    with tp.apply(tiny.model, pipe((at, "unit_drop", 0.5)), plugins=manager) as run:
        batch = tiny.make_inputs(specs)
        out, gen = forward(tiny.model, batch, tiny.name).logits, generate(tiny.model, batch, 3)
        (stage,) = run.stats.last_prefill.stages
        assert len(set(stage.leaving)) > 1
        for i, spec in enumerate(specs):
            alone = tiny.make_inputs([spec], start=i)
            o1, g1 = forward(tiny.model, alone, tiny.name).logits, generate(tiny.model, alone, 3)
            torch.testing.assert_close(o1[0, -1], out[i, -1], atol=1e-5, rtol=0)
            assert torch.equal(g1.sequences[0, -3:], gen.sequences[i, -3:])
            assert run.stats.last_prefill.stages[0].kept[0] == stage.kept[i]


@pytest.mark.parametrize("at", AT, ids=str)
def test_remove_restores_the_model(tiny, manager, at):
    inputs = _batch(tiny)
    visual = tiny.model.model.visual
    watched = [visual, visual.merger, *visual.blocks]
    before = forward(tiny.model, inputs, tiny.name).logits
    hooks = [len(m._forward_pre_hooks) for m in watched]
    run = tp.apply(tiny.model, pipe((at, "unit_drop", 0.5)), plugins=manager)
    assert [len(m._forward_pre_hooks) for m in watched] != hooks
    assert forward(tiny.model, inputs, tiny.name).logits.shape[1] < before.shape[1]
    run.remove()
    run.remove()
    assert torch.equal(forward(tiny.model, inputs, tiny.name).logits, before)
    assert [len(m._forward_pre_hooks) for m in watched] == hooks


def _lm_inputs(model: torch.nn.Module) -> tuple[list[Tensor], Any]:
    seen: list[Tensor] = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"]), with_kwargs=True
    )
    return seen, handle


def test_pre_projector_the_language_model_receives_the_merger_tokens_of_the_kept_units(manager):
    """Qwen2.5-VL (window order): the kept units' tokens are the stock merger's, in raster order, the others gone."""
    t = tm.qwen2_5_vl()
    inputs = t.make_inputs([(112, 112)])
    with torch.no_grad():
        stock = t.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    stock = torch.cat(list(stock)) if isinstance(stock, (list, tuple)) else stock
    with tp.apply(t.model, pipe(("pre_projector", "unit_drop", 5)), plugins=manager) as run:
        seen, handle = _lm_inputs(t.model)  # after the engine's hook: the language model's pruned input
        forward(t.model, inputs, t.name)
        handle.remove()
        (stage,) = run.stats.last_prefill.stages
    kept = torch.tensor(stage.kept[0])
    image = (inputs["input_ids"][0] == tm.IMAGE_TOKEN).nonzero()[:, 0]
    assert len(kept) == 5 and seen[0].shape[1] == inputs["input_ids"].shape[1] - 16 + 5
    start = int(image[0])
    torch.testing.assert_close(seen[0][0, start : start + 5], stock[kept], atol=1e-6, rtol=0)


def _reference_tower(
    visual: torch.nn.Module, pixels: Tensor, grid: Tensor, keep_units: Tensor, window_index: Tensor | None
) -> Tensor:
    """The tower by hand: block 0 on every patch, then block 1 run separately on each attention segment (window or
    frame) of the kept units' patches with their own rotary embeddings, then the merger at the kept units."""
    captured: dict[str, Any] = {}

    def grab(m: torch.nn.Module, a: tuple[Any, ...], k: dict[str, Any]) -> None:
        captured.update(hidden=a[0], **k)

    handle = visual.blocks[1].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        visual(pixels, grid_thw=grid)
    handle.remove()
    hidden, (cos, sin) = captured["hidden"], captured["position_embeddings"]
    units = hidden.shape[0] // 4
    order = torch.arange(units) if window_index is None else window_index  # raster unit at each tower place
    segments = captured["cu_seqlens"].tolist()
    keep_place = keep_units[order]
    out = torch.zeros_like(hidden)
    for a, b in itertools.pairwise(segments):
        places = [p for p in range(a // 4, b // 4) if keep_place[p]]
        if not places:
            continue
        rows = torch.tensor([4 * p + j for p in places for j in range(4)])
        cu = torch.tensor([0, len(rows)], dtype=torch.int32)
        with torch.no_grad():
            out[rows] = visual.blocks[1](
                hidden[rows], cu_seqlens=cu, max_seqlen=len(rows), position_embeddings=(cos[rows], sin[rows])
            )
    with torch.no_grad():
        merged = visual.merger(out)
    return merged[torch.argsort(order)]


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_layer_equals_the_blocks_run_on_the_kept_patches(family, manager):
    """Block 1 of the tiny towers: Qwen2-VL's attends per frame, Qwen2.5-VL's (made windowed here: full attention at
    block 0 only) within its 2x2-unit windows; a removal before it equals that block run segment by segment on the
    kept patches, and the language model receives the merger of its output at the kept units."""
    t = tm.BUILDERS[family]()
    visual = t.model.model.visual
    inputs = t.make_inputs([(112, 112)])
    window_index = None
    if family == "qwen2_5_vl":
        from tokenprune.engine import compat

        visual.fullatt_block_indexes = visual.config.fullatt_block_indexes = [0]
        window_index = compat.vision_window_index(visual, inputs["image_grid_thw"])
    with tp.apply(t.model, pipe(({"vision_layer": 1}, "unit_drop", 6)), plugins=manager) as run:
        seen, handle = _lm_inputs(t.model)
        forward(t.model, inputs, t.name)
        handle.remove()
        (stage,) = run.stats.last_prefill.stages
    kept = torch.tensor(stage.kept[0])
    keep_units = torch.zeros(16, dtype=torch.bool)
    keep_units[kept] = True
    ref = _reference_tower(visual, inputs["pixel_values"], inputs["image_grid_thw"], keep_units, window_index)
    start = int((inputs["input_ids"][0] == tm.IMAGE_TOKEN).nonzero()[0, 0])
    assert len(kept) == 6 and seen[0].shape[1] == inputs["input_ids"].shape[1] - 10
    torch.testing.assert_close(seen[0][0, start : start + 6], ref[kept], atol=1e-6, rtol=0)


def test_merges_inside_the_packed_tower_are_refused():
    t = tm.qwen2_vl()
    with tp.apply(t.model, pipe(({"vision_layer": 1}, "tome", 0.5))):
        with pytest.raises(TokenpruneError, match="takes no attention mask for ToMe's proportional attention"):
            forward(t.model, t.make_inputs([(56, 56)]), t.name)


def test_qwen3_vl_is_refused_naming_deepstack(manager):
    t = tm.qwen3_vl()
    with pytest.raises(TokenpruneError, match="DeepStack mergers read intermediate tower blocks"):
        tp.apply(t.model, pipe(("pre_projector", "unit_drop", 0.5)), plugins=manager)


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_projector_vision_attention_is_the_units_mean_as_after_the_merger(family):
    """VisionZip's dominant selection (no contextual tokens) keeps the same units before the merger as after it: both
    read the probe's per-patch attention averaged over each unit's patches (Qwen2.5-VL's window order undone)."""
    t = tm.BUILDERS[family]()
    inputs = t.make_inputs(BATCH_SPECS[family])
    params = {"contextual_ratio": 0.0, "attention": "mean"}
    kept = {}
    for at in ("pre_projector", "post_projector"):
        with tp.apply(t.model, pipe((at, "visionzip", 5, params))) as run:
            forward(t.model, inputs, t.name)
            (stage,) = run.stats.last_prefill.stages
            kept[at] = stage.kept
            assert stage.leaving == [4, 5, 5]
    assert kept["pre_projector"] == kept["post_projector"]
