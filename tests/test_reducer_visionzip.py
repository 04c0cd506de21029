"""visionzip: dominant + contextual tokens against a re-implementation of the official code; contract; end to end.

The official algorithm (dvlab-research/VisionZip, ``visionzip/clip_encoder.py`` ``CLIPVisionTower_VisionZip.forward``)
is re-written below on plain tensors for one image: a [CLS] row first, the [CLS] attention summed over heads, the
keys averaged over heads. Its ``dominant`` counts the [CLS] token, which the post-projector tokens of HF's LLaVA
do not hold, so the plugin's ``D`` dominant patches are the official ``visionzip(dominant=D + 1)``.
"""

from __future__ import annotations

import dataclasses

import pytest
import tiny_models
import torch
from engine_fixtures import forward, manager_with
from tokenprune_visionzip import VisionZip, split_budget, visionzip_plan

import tokenprune as tp
from tokenprune import ReducerInputError
from tokenprune.engine import compat
from tokenprune.errors import TokenpruneError
from tokenprune.testing import check_reducer, dense_context, make_reduce_inputs


def _manager() -> tp.plugins.PluginManager:
    import tokenprune_visionzip

    return manager_with(tokenprune_visionzip)


def _pipe(keep: float | int, **params: object) -> dict:
    return {"stages": [{"at": "post_projector", "reducer": "visionzip", "keep": keep, "params": params}]}


def _official_visionzip(
    cls_attention: torch.Tensor, metric: torch.Tensor, hidden: torch.Tensor, dominant: int, contextual: int
):
    """The official forward for one image, written from ``clip_encoder.py``.

    Args:
        cls_attention: ``(H, S)`` the [CLS] query's attention row per head (position 0 is the [CLS] token).
        metric: ``(S, hd)`` the layer's keys averaged over heads (``utils.py``'s ``raw_key_states.mean(1)``).
        hidden: ``(S, Dh)`` the layer's output.
        dominant: ``visionzip(model, dominant=...)``: [CLS] included.
        contextual: ``visionzip(model, contextual=...)``.

    Returns:
        ``(kept, groups, official, mean)``: the kept positions ([CLS], dominant, targets), each target's merged
        positions, the official contextual tokens ``target + mean(assigned)`` and the group means.
    """
    s = hidden.shape[0]
    top = cls_attention[:, 1:].sum(0).topk(dominant - 1).indices + 1
    keep = torch.cat([torch.zeros(1, dtype=top.dtype), top])
    mask = torch.ones(s, dtype=torch.bool).scatter_(0, keep, False)  # True: remaining
    rest = mask.nonzero().flatten()
    unit = metric[mask] / metric[mask].norm(dim=-1, keepdim=True)
    step = max(1, unit.shape[0] // contextual)
    targets = torch.arange(0, unit.shape[0], step)[:contextual]
    others = ~torch.isin(torch.arange(unit.shape[0]), targets)
    assign = (unit[others] @ unit[targets].T).argmax(-1)
    one_hot = torch.zeros(int(others.sum()), contextual).scatter_(1, assign[:, None], 1.0)
    counts = one_hot.sum(0).clamp(min=1)[:, None]
    summed = one_hot.T @ hidden[mask][others]
    official = hidden[mask][targets] + summed / counts
    mean = (hidden[mask][targets] + summed) / (one_hot.sum(0)[:, None] + 1)
    groups = {int(rest[t]): rest[others][assign == j].tolist() for j, t in enumerate(targets.tolist())}
    kept = sorted(keep.tolist() + rest[targets].tolist())
    return kept, groups, official, mean


@pytest.mark.parametrize(("n", "budget", "ratio"), [(64, 16, 10 / 64), (49, 20, 0.3), (36, 9, 0.5), (30, 12, 1.0)])
def test_merge_equals_the_official_algorithm(n, budget, ratio):
    """Same scores and keys: the same dominant set, targets, assignments; merged features to 1e-6."""
    gen = torch.Generator().manual_seed(n + budget)
    heads, hd, dh = 4, 8, 12
    cls_attention = torch.randn(heads, n + 1, generator=gen).softmax(-1)
    metric, hidden = torch.randn(n + 1, hd, generator=gen), torch.randn(n + 1, dh, generator=gen)
    dominant, contextual = (int(v) for v in split_budget(torch.tensor([budget]), ratio))
    kept, groups, official, mean = _official_visionzip(cls_attention, metric, hidden, dominant + 1, contextual)

    reducer = VisionZip({"contextual_ratio": ratio})
    ctx = dense_context(n, budget)
    ctx.vision_attention = cls_attention[:, 1:].mean(0)[None]  # the engine's score: the mean over heads
    ctx.vision_keys = metric[None, 1:]
    tokens = hidden[None, 1:]  # the features as post-projector tokens (an identity projector)
    merge = reducer.reduce(tokens, ctx)
    destination = merge.destination[0].tolist()
    assert merge.selection(ctx.valid).tolist()[0] == [i - 1 for i in kept if i > 0]
    assert {t - 1: [i for i, d in enumerate(destination) if d == t - 1 and i != t - 1] for t in groups} == {
        t - 1: [i - 1 for i in members] for t, members in groups.items()
    }
    merged, sizes, selection = merge.apply(tokens, ctx.sizes, ctx.valid)
    rows = {i: r for r, i in enumerate(selection.tolist()[0])}
    got = torch.stack([merged[0, rows[t - 1]] for t in groups])
    torch.testing.assert_close(got, mean, rtol=0, atol=1e-6)
    assert [int(sizes[0, rows[t - 1]]) for t in groups] == [1 + len(m) for m in groups.values()]
    # The official contextual token is the target plus the mean of the rest: a different vector (docs, departures).
    assert not torch.allclose(got, official)


@pytest.mark.parametrize(("tokens", "split"), [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)), (16, (13, 3))])
def test_the_default_ratio_splits_the_paper_budgets(tokens, split):
    dominant, contextual = split_budget(torch.tensor([tokens]), VisionZip().params.contextual_ratio)
    assert (int(dominant), int(contextual)) == split


def test_a_budget_too_small_for_a_contextual_token_keeps_only_dominant_ones():
    """T = 3: floor(3 * 10/64 + 0.5) = 0 contextual tokens; the rest is dropped, as FasterVLM."""
    ctx = dense_context(10, 3)
    ctx.vision_attention = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.0, 0.0, 0.7, 0.0, 0.0]])
    ctx.vision_keys = torch.randn(1, 10, 4)
    merge = VisionZip().reduce(torch.randn(1, 10, 6), ctx)
    assert merge.destination.tolist()[0] == [-1, 1, -1, 3, -1, -1, -1, 7, -1, -1]


def test_targets_are_strided_over_the_remaining_tokens_and_newlines_rank_last():
    _, ctx = make_reduce_inputs(
        grids=((4, 5),), keep=12, protect_newlines=False, vision=VisionZip().vision_attention_request()
    )
    plan = visionzip_plan(ctx.vision_attention, ctx, 0.5)  # T = 12: 6 dominant + 6 contextual among 24 tokens
    newline = ctx.layout.newline[0]
    assert not bool((plan.dominant[0] & newline).any())
    rest = (plan.target[0] | plan.merged[0]).nonzero().flatten().tolist()
    assert len(rest) == 18 and plan.target[0].nonzero().flatten().tolist() == rest[0::3]


def test_without_the_signals_the_errors_say_what_is_missing():
    tokens, ctx = make_reduce_inputs()
    with pytest.raises(ReducerInputError, match=r"'visionzip' needs ctx\.vision_attention"):
        VisionZip().reduce(tokens, ctx)
    ctx.vision_attention = torch.zeros(ctx.valid.shape)
    with pytest.raises(ReducerInputError, match=r"needs ctx\.vision_keys.*similarity: projected"):
        VisionZip().reduce(tokens, ctx)


@pytest.mark.parametrize(
    "params",
    [{}, {"attention": "mean"}, {"similarity": "projected"}, {"contextual_ratio": 0.0}, {"contextual_ratio": 1.0}],
)
def test_contract(params):
    check_reducer(VisionZip, params)


def test_a_padded_batch_equals_one_by_one():
    reducer = VisionZip({"contextual_ratio": 0.4})
    tokens, ctx = make_reduce_inputs(
        grids=((6, 7), (3, 4), (8, 8)), keep=0.3, reducer=reducer, vision=reducer.vision_attention_request()
    )
    batched = reducer.reduce(tokens, ctx).destination
    for b in range(3):
        n = int(ctx.num_valid[b])
        alone = dense_context(n, int(ctx.budget[b]), protected=ctx.protected[b : b + 1, :n])
        alone.vision_attention = ctx.vision_attention[b : b + 1, :n]
        alone.vision_keys = ctx.vision_keys[b : b + 1, :n]
        assert reducer.reduce(tokens[b : b + 1, :n], alone).destination[0].tolist() == batched[b, :n].tolist()


def test_validates_in_yaml_and_names_a_bad_field():
    registry = _manager().reducers
    pipe = tp.load_pipeline(
        "stages:\n  - at: post_projector\n    reducer: visionzip\n    keep: 64\n    params: {contextual_ratio: 0.25}\n",
        registry=registry,
    )
    assert pipe.stages[0].params == {"contextual_ratio": 0.25}
    with pytest.raises(ValueError, match="contextual_ratio"):
        tp.load_pipeline(_pipe(64, contextual_ratio=1.5), registry=registry)
    with pytest.raises(ValueError, match="contextual_ratoi"):
        tp.load_pipeline(_pipe(64, contextual_ratoi=0.2), registry=registry)


def test_cls_on_a_tower_without_cls_suggests_mean():
    t = tiny_models.qwen2_vl()
    with pytest.raises(TokenpruneError, match=r"no CLS token.*'mean'"):
        tp.apply(t.model, _pipe(0.5), plugins=_manager())


def _tower_signals(model, pixel_values, layer: int):
    """Eager attentions, the layer's output and its head-averaged keys (``k_proj`` captured by a hook)."""
    tower = model.model.vision_tower
    attention = tower.encoder.layers[layer].self_attn
    keys = []
    handle = attention.k_proj.register_forward_hook(lambda m, a, out: keys.append(out))
    previous = compat.swap_attention_implementation(tower.config, "eager")
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        compat.restore_attention_implementation(tower.config, previous)
        handle.remove()
    b, s, _ = keys[0].shape
    metric = keys[0].view(b, s, attention.num_heads, -1).mean(2)
    return out.attentions[layer], out.hidden_states[layer], metric


def test_llava_keeps_what_the_official_code_keeps():
    t = tiny_models.llava()
    inputs = t.make_inputs([(56, 56), (56, 56)])
    keep = 7  # of 16 patches: 6 dominant + 1 contextual with the default ratio; 4 + 3 with ratio 0.5
    for ratio in (10 / 64, 0.5):
        with tp.apply(t.model, _pipe(keep, contextual_ratio=ratio), plugins=_manager()) as run, torch.no_grad():
            t.model(**inputs)
        got = run.stats.last_prefill.stages[0].kept
        layer = t.model.config.vision_feature_layer  # -1 in the tiny model (-2 in LLaVA-1.5's checkpoints)
        attn, hidden, metric = _tower_signals(t.model, inputs["pixel_values"], layer)
        dominant, contextual = (int(v) for v in split_budget(torch.tensor([keep]), ratio))
        for b in range(2):
            kept, *_ = _official_visionzip(attn[b, :, 0], metric[b], hidden[b], dominant + 1, contextual)
            assert got[b] == [i - 1 for i in kept if i > 0]
        assert run.stats.last_prefill.stages[0].overhead_macs > 0


@pytest.mark.parametrize(("name", "attention"), [("llava_next", "cls"), ("qwen2_vl", "mean")])
def test_end_to_end_batched_equals_one_by_one(name, attention):
    t = getattr(tiny_models, name)()
    specs = [(56, 84), (100, 56), None]
    with tp.apply(t.model, _pipe(0.4, attention=attention, contextual_ratio=0.3), plugins=_manager()) as run:
        batched = forward(t.model, t.make_inputs(specs), name)
        stage = run.stats.last_prefill.stages[0]
        kept, leaving = stage.kept, stage.leaving
        for i, spec in enumerate(specs):
            alone = forward(t.model, t.make_inputs([spec], start=i), name)
            if spec is not None:
                assert run.stats.last_prefill.stages[0].kept[0] == kept[i]
            torch.testing.assert_close(alone.logits[0, -1], batched.logits[i, -1], rtol=1e-4, atol=1e-5)
    assert kept[2] == [] and all(len(k) == n > 0 for k, n in zip(kept[:2], leaving[:2], strict=True))


def _lm_inputs(model) -> tuple[list, object]:
    got: list = []
    lm = model.model.language_model
    return got, lm.register_forward_pre_hook(lambda m, a, kw: got.append(kw["inputs_embeds"]), with_kwargs=True)


@pytest.mark.parametrize("ratio", [10 / 64, 0.5])
def test_pre_projector_is_the_official_visionzip(ratio):
    """At pre_projector (the default place, the presets'), every image token the language model receives equals
    the official forward's output token projected by the model's own projector: the dominant patches, and each
    contextual token ``target + mean(assigned)`` of the tower's features (to 1e-6), in index order."""
    t = tiny_models.llava()
    inputs = t.make_inputs([(56, 56), (56, 56)])
    keep = 7
    pipe = {
        "stages": [{"at": "pre_projector", "reducer": "visionzip", "keep": keep, "params": {"contextual_ratio": ratio}}]
    }
    with tp.apply(t.model, pipe, plugins=_manager()) as run, torch.no_grad():
        got, handle = _lm_inputs(t.model)  # after the engine's hook: what the language model receives
        try:
            t.model(**inputs)
        finally:
            handle.remove()
    (stage,) = run.stats.last_prefill.stages
    assert stage.at == "pre_projector" and stage.leaving == [keep, keep] and stage.overhead_macs > 0
    layer = t.model.config.vision_feature_layer
    attn, hidden, metric = _tower_signals(t.model, inputs["pixel_values"], layer)
    dominant, contextual = (int(v) for v in split_budget(torch.tensor([keep]), ratio))
    visual = inputs["input_ids"] == t.model.config.image_token_id
    projector = t.model.model.multi_modal_projector
    for b in range(2):
        kept, groups, official, _ = _official_visionzip(attn[b, :, 0], metric[b], hidden[b], dominant + 1, contextual)
        assert stage.kept[b] == [i - 1 for i in kept if i > 0]
        rows = dict(zip([int(t) for t in groups], official, strict=True))
        expected = torch.stack([rows[i] if i in rows else hidden[b, i] for i in kept if i > 0])
        with torch.no_grad():
            expected = projector(expected)
        lm_visual = _lm_visual_rows(got[0][b], inputs, b, visual[b], keep)
        torch.testing.assert_close(lm_visual, expected, rtol=0, atol=1e-6)


def _lm_visual_rows(embeds, inputs, b, visual, keep):
    """The ``keep`` image rows of sample ``b`` in the language model's (right-aligned, pruned) input."""
    real = inputs["attention_mask"][b].bool()
    ids_visual = visual[real]
    first = int(ids_visual.nonzero()[0])
    after = embeds[-int(real.sum()) + (int(ids_visual.sum()) - keep) :]  # the sample's real tokens, right-aligned
    return after[first : first + keep]


def test_the_official_combination_is_the_default_before_the_projector_only():
    ctx = dense_context(8, 4)
    ctx.vision_attention = torch.arange(8.0)[None]
    ctx.vision_keys = torch.randn(1, 8, 4)
    assert VisionZip({"contextual_ratio": 0.5}).reduce(torch.randn(1, 8, 3), ctx).combine == "mean"
    pre = dataclasses.replace(ctx, at=tp.InsertionPoint("pre_projector"))
    assert VisionZip({"contextual_ratio": 0.5}).reduce(torch.randn(1, 8, 3), pre).combine == "root_plus_mean"
    forced = VisionZip({"contextual_ratio": 0.5, "combine": "mean"}).reduce(torch.randn(1, 8, 3), pre)
    assert forced.combine == "mean"
    assert VisionZip({"combine": "official"}).reduce(torch.randn(1, 8, 3), ctx).combine == "root_plus_mean"
