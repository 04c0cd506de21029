"""fastervlm: [CLS]-attention top-k against a re-implementation of the official code; contract; end to end."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from engine_fixtures import forward, manager_with
from tokenprune_fastervlm import FasterVLM

import tokenprune as tp
from tokenprune import ReducerInputError
from tokenprune.engine import compat
from tokenprune.testing import check_reducer, make_reduce_inputs


def _manager() -> tp.plugins.PluginManager:
    import tokenprune_fastervlm

    return manager_with(tokenprune_fastervlm)


def _pipe(keep: float | int, **params: object) -> dict:
    return {"stages": [{"at": "post_projector", "reducer": "fastervlm", "keep": keep, "params": params}]}


def test_ranks_by_vision_attention_and_newlines_last():
    tokens, ctx = make_reduce_inputs(
        keep=0.5, protect_newlines=False, reducer=FasterVLM(), vision=FasterVLM().vision_attention_request()
    )
    kept = FasterVLM().reduce(tokens, ctx).tolist()
    for b, got in enumerate(kept):
        n, k = int(ctx.num_valid[b]), int(ctx.budget[b])
        scores = [float(ctx.vision_attention[b, i]) for i in range(n)]
        ranked = sorted(range(n), key=lambda i: (-scores[i], i))
        assert got == sorted(ranked[:k])
        assert not any(bool(ctx.layout.newline[b, i]) for i in got)


def test_without_the_signal_the_error_says_where_to_run():
    tokens, ctx = make_reduce_inputs()
    with pytest.raises(ReducerInputError, match=r"'fastervlm' needs ctx\.vision_attention"):
        FasterVLM().reduce(tokens, ctx)


@pytest.mark.parametrize("params", [{}, {"attention": "mean"}, {"layer": -1}])
def test_contract(params):
    check_reducer(FasterVLM, params)


def _official_fastervlm(model, pixel_values, select_layer: int, keep: int) -> list[list[int]]:
    """FasterVLM's encode_images (Theia-4869/FasterVLM): eager attentions, [CLS] row of layer select_layer over the
    patches, mean over heads, top-k, kept in index order."""
    tower = model.model.vision_tower
    previous = compat.swap_attention_implementation(tower.config, "eager")
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        compat.restore_attention_implementation(tower.config, previous)
    attn = out.attentions[select_layer]  # (B, H, S, S); a negative select_layer: the layer of the features
    cls = attn[:, :, 0, 1:].mean(1)
    return [sorted(row.topk(keep).indices.tolist()) for row in cls]


def test_llava_matches_the_official_algorithm():
    t = tiny_models.llava()
    inputs = t.make_inputs([(56, 56), (56, 56)])
    for keep in (3, 8):
        with tp.apply(t.model, _pipe(keep), plugins=_manager()) as run:
            with torch.no_grad():
                t.model(**inputs)
        got = run.stats.last_prefill.stages[0].kept
        layer = t.model.config.vision_feature_layer  # -1 in the tiny model (-2 in LLaVA-1.5's checkpoints)
        assert got == _official_fastervlm(t.model, inputs["pixel_values"], layer, keep)


@pytest.mark.parametrize(("name", "attention"), [("llava_next", "cls"), ("qwen2_vl", "mean"), ("llava", "cls")])
def test_end_to_end_batched_equals_one_by_one(name, attention):
    t = getattr(tiny_models, name)()
    specs = [(56, 84), (100, 56), None] if name != "llava" else [(56, 56), (56, 56), None]
    with tp.apply(t.model, _pipe(0.4, attention=attention), plugins=_manager()) as run:
        batched = forward(t.model, t.make_inputs(specs), name)
        kept = run.stats.last_prefill.stages[0].kept
        for i, spec in enumerate(specs):
            alone = forward(t.model, t.make_inputs([spec], start=i), name)
            if spec is not None:
                assert run.stats.last_prefill.stages[0].kept[0] == kept[i]
            torch.testing.assert_close(alone.logits[0, -1], batched.logits[i, -1], rtol=1e-4, atol=1e-5)
    assert kept[2] == [] and len(kept[0]) > 0
