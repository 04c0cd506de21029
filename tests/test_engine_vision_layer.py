"""``at: {vision_layer: k}``: ToMe between vision-tower layers on LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision.

The engine invariants (keep-all identity, cached decoding == no-cache recompute, batch == one by one, remove()
restores) with a ``tome`` stage inside the tower; the tokens the language model receives equal a hand-run of the
tower's remaining layer on ToMe's merged tokens with its proportional attention (``log(size)`` added to the keys'
scores, as ``tome/patch/timm.py``'s ``attn + size.log()`` in facebookresearch/ToMe); refusals.
"""

from __future__ import annotations

from typing import Any

import pytest
import tiny_models as tm
import torch
from engine_fixtures import BATCH_SPECS, forward, generate, pipe

import tokenprune as tp
from tokenprune.errors import PipelineError, TokenpruneError

FAMILIES = ["llava", "llava_next", "llava_onevision"]
TOME = pipe(({"vision_layer": 1}, "tome", 0.5))


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


def _batch(tiny: tm.Tiny) -> dict[str, Any]:
    specs = BATCH_SPECS[tiny.name]
    return tiny.make_inputs([specs[0], specs[1], None])


def test_keep_all_is_identity(tiny):
    inputs = _batch(tiny)
    ref, ref_gen = forward(tiny.model, inputs, tiny.name).logits, generate(tiny.model, inputs, 3)
    with tp.apply(tiny.model, pipe(({"vision_layer": 1}, "tome", 1.0))) as run:
        out, gen = forward(tiny.model, inputs, tiny.name).logits, generate(tiny.model, inputs, 3)
    assert torch.equal(out, ref) and torch.equal(gen.sequences, ref_gen.sequences)
    (stage,) = run.stats.last_prefill.stages
    assert stage.at == "vision layer 1" and stage.entering == stage.leaving and stage.entering[0] > 0


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_cached_decode_equals_recompute(tiny, positions):
    inputs = _batch(tiny)
    pipeline = {**pipe(({"vision_layer": 1}, "tome", 0.5), ({"layer": 2}, "random", 0.5)), "positions": positions}
    with tp.apply(tiny.model, pipeline) as run:
        gen = generate(tiny.model, inputs, 4)
        kept = [s.kept for s in run.stats.last_prefill.stages]
        tower = run.stats.last_prefill.stages[0]
        assert all(k < e for k, e in zip(tower.leaving[:2], tower.entering[:2], strict=True))
        seq = gen.sequences
        new = seq.shape[1] - inputs["input_ids"].shape[1]
        full = {**inputs, "input_ids": seq}
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(seq.shape[0], new).long()], 1)
        out = forward(tiny.model, full, tiny.name, use_cache=False).logits
        assert [s.kept for s in run.stats.last_prefill.stages] == kept
    for j in range(new):
        torch.testing.assert_close(out[:, -new - 1 + j], gen.logits[j], atol=1e-5, rtol=0)


def test_batch_equals_one_by_one(tiny):
    specs = BATCH_SPECS[tiny.name]
    with tp.apply(tiny.model, TOME) as run:
        batch = tiny.make_inputs(specs)
        out, gen = forward(tiny.model, batch, tiny.name).logits, generate(tiny.model, batch, 3)
        (stage,) = run.stats.last_prefill.stages
        assert len(set(stage.leaving)) > 1 or tiny.name == "llava"
        for i, spec in enumerate(specs):
            alone = tiny.make_inputs([spec], start=i)
            o1, g1 = forward(tiny.model, alone, tiny.name).logits, generate(tiny.model, alone, 3)
            torch.testing.assert_close(o1[0, -1], out[i, -1], atol=1e-5, rtol=0)
            assert torch.equal(g1.sequences[0, -3:], gen.sequences[i, -3:])
            assert run.stats.last_prefill.stages[0].kept[0] == stage.kept[i]


def test_remove_restores_the_model(tiny):
    inputs = _batch(tiny)
    layer = tp.get_plugin_manager().adapters.get(tiny.model.config.model_type)(tiny.model).vision_tower().layers[1]
    before = forward(tiny.model, inputs, tiny.name).logits
    hooks = len(layer._forward_pre_hooks)
    run = tp.apply(tiny.model, TOME)
    assert len(layer._forward_pre_hooks) == hooks + 1
    assert forward(tiny.model, inputs, tiny.name).logits.shape[1] < before.shape[1]
    run.remove()
    run.remove()
    assert torch.equal(forward(tiny.model, inputs, tiny.name).logits, before)
    assert len(layer._forward_pre_hooks) == hooks


def test_the_remaining_layers_run_on_the_merged_tokens_with_proportional_attention():
    """LLaVA-1.5: ToMe merges the input of tower layer 1; the language model receives the projector of that layer's
    output on the merged tokens, with log(size) added to the attention scores (a hand-run of the layer)."""
    from tokenprune_tome import ToMe

    t = tm.llava()
    inputs = t.make_inputs([(56, 56)])
    tower = t.model.model.vision_tower
    layer = tower.encoder.layers[1]
    seen: list[torch.Tensor] = []
    got: list[torch.Tensor] = []
    with tp.apply(t.model, TOME) as run:
        h1 = layer.register_forward_pre_hook(
            lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
        )
        h2 = t.model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: got.append(kw["inputs_embeds"]), with_kwargs=True
        )
        try:
            forward(t.model, inputs, "llava")
        finally:
            h1.remove()
            h2.remove()
    (stage,) = run.stats.last_prefill.stages
    with torch.no_grad():  # the layer-1 input without the engine: the tower's embeddings and layer 0
        full = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[1]
        patches = full[:, 1:]
        ctx = tp.testing.dense_context(16, 8)
        merge = ToMe().reduce(patches, ctx)
        merged, sizes, selection = merge.apply(patches, ctx.sizes, ctx.valid)
        x = torch.cat([full[:, :1], merged], 1)
        bias = torch.cat([torch.zeros(1, 1), sizes.log()], 1)[:, None, None, :]
        out = layer(x, bias)
        out = out[0] if isinstance(out, tuple) else out
        expected = t.model.model.multi_modal_projector(out[:, 1:])
        plain = layer(x, None)
        plain = t.model.model.multi_modal_projector((plain[0] if isinstance(plain, tuple) else plain)[:, 1:])
    assert seen[0].shape[1] == 9 and stage.kept[0] == selection.tolist()[0]
    visual = inputs["input_ids"][0] == t.model.config.image_token_id
    first = int(visual.nonzero()[0])
    torch.testing.assert_close(got[0][0, first : first + 8], expected[0], rtol=0, atol=1e-5)
    assert not torch.allclose(plain, expected, rtol=0, atol=1e-4)  # the sizes' bias matters


@pytest.mark.parametrize("family", ["qwen3_vl", "idefics3"])
def test_families_without_a_per_token_projector_are_refused(family):
    t = tm.BUILDERS[family]()
    with pytest.raises(TokenpruneError, match=rf"vision layer 1, which the '{family}|qwen3_vl'.*cannot serve"):
        tp.apply(t.model, TOME)


def test_a_layer_after_the_features_layer_and_a_vision_attention_stage_are_refused():
    import tokenprune_fastervlm
    from engine_fixtures import manager_with

    t = tm.llava()
    with pytest.raises(TokenpruneError, match=r"vision layer 2, but the model takes its features from .* layer 1"):
        tp.apply(t.model, pipe(({"vision_layer": 2}, "tome", 0.5)))
    both = pipe(({"vision_layer": 1}, "tome", 0.5), ("post_projector", "fastervlm", 0.5))
    with pytest.raises(TokenpruneError, match=r"reads vision-encoder attention, which does not follow"):
        tp.apply(t.model, both, plugins=manager_with(tokenprune_fastervlm))
    with pytest.raises(PipelineError, match="vision layers, pre_projector"):
        tp.load_pipeline(pipe(("pre_projector", "visionzip", 8), ({"vision_layer": 1}, "tome", 0.5)))
    with pytest.raises(PipelineError, match="does not run at vision layer 1"):
        tp.load_pipeline(pipe(({"vision_layer": 1}, "random", 0.5)))
