"""``at: pre_projector``: the engine invariants on LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision, exactness against the
model's own projector, and clear refusals where the projector mixes tokens (Qwen2-VL and Qwen2.5-VL's merge units
are served by tests/test_engine_packed_tower.py).

The invariants are those of :mod:`tokenprune.testing.adapters` (keep-all identity, cached decoding == no-cache
recompute, remove() restores, batch == one by one) with the stages before the projector; the reducers are this
module's own (per tower row, seeded or adaptive, and a merge), so no method plugin is involved.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import tiny_models as tm
import torch
from engine_fixtures import BATCH_SPECS, forward, generate, pipe
from torch import Tensor

import tokenprune as tp
from tokenprune import Capabilities, Merge, ReduceContext, ScoringReducer, TokenReducer
from tokenprune.errors import PipelineError, TokenpruneError
from tokenprune.reducer import top_k_selection

FAMILIES = ["llava", "llava_next", "llava_onevision"]
PRE = frozenset({"pre_projector", "post_projector", "layer"})


class RowDrop(ScoringReducer):
    """Seeded scores per row (each image or crop draws its own), so a row keeps the same patches in any batch."""

    name = "row_drop"
    capabilities = Capabilities(insertion_points=PRE)

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        gen = torch.Generator().manual_seed(7 + ctx.stage_index)
        return torch.rand(tokens.shape[1], generator=gen).expand(ctx.valid.shape).clone()


class RowFirstK(TokenReducer):
    """Adaptive: keeps ``budget - h`` first valid patches, ``h`` in {0, 1, 2} hashed from the row's own features."""

    name = "row_first_k"
    capabilities = Capabilities(insertion_points=PRE, deterministic_count=False)

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Any:
        h = (tokens[:, 0, 0].float().abs() * 1e4).long() % 3
        want = torch.minimum((ctx.budget - h).clamp(min=1), ctx.num_valid)
        n = tokens.shape[1]
        scores = -torch.arange(n, dtype=torch.float32).expand(ctx.batch_size, n)
        return top_k_selection(scores, dataclasses.replace(ctx, budget=want))


class PairMerge(TokenReducer):
    """Merges each odd patch into the even one before it (roots: the even patches), target plus mean."""

    name = "pair_merge"
    capabilities = Capabilities(insertion_points=PRE, merges=True, deterministic_count=False)

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Merge:
        b, n = ctx.valid.shape
        idx = torch.arange(n).expand(b, n)
        return Merge(torch.where(idx % 2 == 1, idx - 1, idx), "root_plus_mean")


class _Plugin:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        for cls in (RowDrop, RowFirstK, PairMerge):
            registry.add(cls)


@pytest.fixture(scope="module")
def manager() -> tp.plugins.PluginManager:
    return tp.get_plugin_manager(plugins=[_Plugin()])


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


def _batch(tiny: tm.Tiny) -> dict[str, Any]:
    specs = BATCH_SPECS[tiny.name]
    return tiny.make_inputs([specs[0], specs[1], None])


PRUNE = pipe(("pre_projector", "row_drop", 0.5), ({"layer": 2}, "row_drop", 0.5))


def test_keep_all_is_identity(tiny, manager):
    inputs = _batch(tiny)
    ref, ref_gen = forward(tiny.model, inputs, tiny.name).logits, generate(tiny.model, inputs, 3)
    with tp.apply(tiny.model, pipe(("pre_projector", "row_drop", 1.0)), plugins=manager) as run:
        out, gen = forward(tiny.model, inputs, tiny.name).logits, generate(tiny.model, inputs, 3)
    assert torch.equal(out, ref) and torch.equal(gen.sequences, ref_gen.sequences)
    (stage,) = run.stats.last_prefill.stages
    assert stage.at == "pre_projector" and stage.entering == stage.leaving and stage.entering[0] > 0


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_cached_decode_equals_recompute(tiny, manager, positions):
    inputs = _batch(tiny)
    with tp.apply(tiny.model, {**PRUNE, "positions": positions}, plugins=manager) as run:
        gen = generate(tiny.model, inputs, 4)
        kept = [s.kept for s in run.stats.last_prefill.stages]
        pre = run.stats.last_prefill.stages[0]
        assert all(k < e for k, e in zip(pre.leaving[:2], pre.entering[:2], strict=True))
        seq = gen.sequences
        new = seq.shape[1] - inputs["input_ids"].shape[1]
        full = {**inputs, "input_ids": seq}
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(seq.shape[0], new).long()], 1)
        out = forward(tiny.model, full, tiny.name, use_cache=False).logits
        assert [s.kept for s in run.stats.last_prefill.stages] == kept
    for j in range(new):
        torch.testing.assert_close(out[:, -new - 1 + j], gen.logits[j], atol=1e-5, rtol=0)


def test_batch_equals_one_by_one(tiny, manager):
    specs = BATCH_SPECS[tiny.name]
    pipeline = pipe(("pre_projector", "row_first_k", 0.75), ("pre_projector", "pair_merge", 1.0))
    with tp.apply(tiny.model, pipeline, plugins=manager) as run:
        batch = tiny.make_inputs(specs)
        out, gen = forward(tiny.model, batch, tiny.name).logits, generate(tiny.model, batch, 3)
        stages = run.stats.last_prefill.stages
        assert len(set(stages[0].leaving)) > 1 and stages[1].leaving != stages[1].entering
        for i, spec in enumerate(specs):
            alone = tiny.make_inputs([spec], start=i)
            o1, g1 = forward(tiny.model, alone, tiny.name).logits, generate(tiny.model, alone, 3)
            torch.testing.assert_close(o1[0, -1], out[i, -1], atol=1e-5, rtol=0)
            assert torch.equal(g1.sequences[0, -3:], gen.sequences[i, -3:])
            assert [s.kept[0] for s in run.stats.last_prefill.stages] == [s.kept[i] for s in stages]


def test_remove_restores_the_model(tiny, manager):
    inputs = _batch(tiny)
    projector = tiny.model.model.multi_modal_projector
    before = forward(tiny.model, inputs, tiny.name).logits
    hooks = len(projector._forward_pre_hooks)
    run = tp.apply(tiny.model, PRUNE, plugins=manager)
    assert len(projector._forward_pre_hooks) == hooks + 1
    pruned = forward(tiny.model, inputs, tiny.name).logits
    assert pruned.shape[1] < before.shape[1]
    run.remove()
    run.remove()
    assert torch.equal(forward(tiny.model, inputs, tiny.name).logits, before)
    assert len(projector._forward_pre_hooks) == hooks


def test_the_language_model_receives_the_projector_of_the_merged_features(manager):
    """LLaVA-1.5: every kept token is exactly the model's projector applied to its (merged) tower feature."""
    t = tm.llava()
    inputs = t.make_inputs([(56, 56)])
    got: list[Tensor] = []
    lm = t.model.model.language_model
    with tp.apply(t.model, pipe(("pre_projector", "pair_merge", 1.0)), plugins=manager) as run:
        # registered after the engine's hook: what the language model receives
        handle = lm.register_forward_pre_hook(lambda m, a, kw: got.append(kw["inputs_embeds"]), with_kwargs=True)
        try:
            forward(t.model, inputs, "llava")
        finally:
            handle.remove()
    with torch.no_grad():
        feats = t.model.model.get_image_features(inputs["pixel_values"])
        tower = t.model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    layer = t.model.config.vision_feature_layer
    x = tower.hidden_states[layer][0, 1:]  # (P, Dv), the [CLS] token dropped as the model does
    expected = t.model.model.multi_modal_projector(x[0::2] + x[1::2])  # target + mean of its one assigned patch
    (stage,) = run.stats.last_prefill.stages
    n = x.shape[0]
    assert stage.kept[0] == list(range(0, n, 2)) and stage.leaving == [n // 2]
    visual = (inputs["input_ids"] == t.model.config.image_token_id)[0]
    assert len(feats.pooler_output[0]) == n and got[0].shape[1] == inputs["input_ids"].shape[1] - n // 2
    first = int(visual.nonzero()[0, 0])
    image_rows = got[0][0, first : first + n // 2]
    torch.testing.assert_close(image_rows, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_vl", "idefics3", "gemma3", "internvl"])
def test_families_whose_projector_mixes_tokens_are_refused(family, manager):
    t = tm.BUILDERS[family]()
    with pytest.raises(
        TokenpruneError, match=rf"pre_projector, which the '{family}' family \(adapter .*cannot serve: .*post_proj"
    ):
        tp.apply(t.model, pipe(("pre_projector", "row_drop", 0.5)), plugins=manager)


def test_validation_orders_and_refuses_what_the_point_cannot_serve(manager):
    ok = tp.load_pipeline(
        pipe(("pre_projector", "row_drop", 0.5), ("post_projector", "row_drop", 0.5)), plugins=manager
    )
    assert [str(s.point) for s in ok.stages] == ["pre_projector", "post_projector"]
    with pytest.raises(PipelineError, match="pre_projector, then post_projector"):
        tp.load_pipeline(pipe(("post_projector", "row_drop", 0.5), ("pre_projector", "row_drop", 0.5)), plugins=manager)
    with pytest.raises(PipelineError, match="does not run at pre_projector"):
        tp.load_pipeline(pipe(("pre_projector", "random", 0.5)), plugins=manager)
    video = {"stages": [{"at": "pre_projector", "reducer": "row_drop", "keep": 0.5, "tokens": "video"}]}
    with pytest.raises(PipelineError, match="image features only"):
        tp.load_pipeline(video, plugins=manager)
    assert tp.InsertionPoint("pre_projector").order < tp.InsertionPoint("post_projector").order


def test_the_listing_and_the_schema_show_the_new_point():
    """`tokenprune plugins --json` lists pre_projector among visionzip's insertion points; the pipeline schema's
    `at` accepts it."""
    from tokenprune.cli import plugins_report
    from tokenprune.pipeline import pipeline_json_schema

    report = plugins_report(tp.get_plugin_manager())
    (visionzip,) = [r for p in report["plugins"] for r in p["reducers"] if r["name"] == "visionzip"]
    assert "pre_projector" in visionzip["capabilities"]["insertion_points"]
    assert "pre_projector" in str(pipeline_json_schema())


def _visionzip_manager() -> tp.plugins.PluginManager:
    import tokenprune_visionzip
    from engine_fixtures import manager_with

    return manager_with(tokenprune_visionzip)


def test_visionzip_budgets_each_crop_as_the_official_code(monkeypatch):
    """LLaVA-NeXT: every crop (base view and tiles) keeps its own D + C rows of the projector's input, as the
    official code; HF's unpadding then leaves out the kept rows that fall in the padding."""
    from tokenprune.engine import pre_projector

    runs: list[Any] = []
    apply = pre_projector.PreProjector.apply

    def recording(self, *args: Any, **kwargs: Any) -> Any:
        runs.append(self.last)
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(pre_projector.PreProjector, "apply", recording)
    t = tm.llava_next()
    with tp.apply(t.model, pipe(("pre_projector", "visionzip", 5)), plugins=_visionzip_manager()) as run:
        forward(t.model, t.make_inputs([(56, 84)]), "llava_next")
    kept_rows = runs[0].masks[-1].sum(1).tolist()
    (stage,) = run.stats.last_prefill.stages
    assert len(kept_rows) > 1 and kept_rows == [5] * len(kept_rows)
    assert stage.leaving[0] < stage.entering[0]


def test_a_pre_projector_stage_then_a_post_projector_stage_reading_vision_attention():
    """The post_projector stage's vision signal follows the tokens the pre_projector stage kept."""
    t = tm.llava()
    inputs = t.make_inputs([(56, 56), (56, 56)])
    manager = _visionzip_manager()
    manager.pluggy.register(_Plugin())
    pipeline = pipe(("pre_projector", "row_drop", 12), ("post_projector", "visionzip", 6, {"contextual_ratio": 0.5}))
    with tp.apply(t.model, pipeline, plugins=manager) as run:
        forward(t.model, inputs, "llava")
    pre, post = run.stats.last_prefill.stages
    assert pre.leaving == [12, 12] and post.entering == [12, 12] and post.leaving == [6, 6]
    assert all(0 <= k < 12 for row in post.kept for k in row)


def test_a_token_interpolated_from_kept_and_dropped_patches_is_refused(manager):
    """LLaVA-OneVision downscales a large anyres grid by interpolation (here forced with ``anyres_max_1``): a token
    then stands for several patches, and dropping some of them before the projector has no meaning. Keep-all
    still runs and is exact."""
    t = tm.llava_onevision()
    for cfg in (t.model.config, t.model.model.config):
        cfg.vision_aspect_ratio = "anyres_max_1"
    inputs = t.make_inputs([(112, 112)])
    ref = forward(t.model, inputs, "llava_onevision").logits
    with tp.apply(t.model, pipe(("pre_projector", "row_drop", 1.0)), plugins=manager):
        assert torch.equal(forward(t.model, inputs, "llava_onevision").logits, ref)
    with tp.apply(t.model, pipe(("pre_projector", "row_drop", 0.5)), plugins=manager):
        with pytest.raises(
            TokenpruneError, match=r"built from several patches of which only some were kept.*post_proj"
        ):
            forward(t.model, inputs, "llava_onevision")
