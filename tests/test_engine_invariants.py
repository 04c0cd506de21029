"""The six engine invariants of issue 3, on tiny random models of every adapter.

1. keep-all is identity; 2. cached decoding equals no-cache recompute; 3. KV cache sizes;
4. remove() restores the model; 5. batch equals one by one (ragged keep counts); 6. the attention
probe matches eager attention while the model runs sdpa.
"""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
from engine_fixtures import (
    ADAPTERS,
    BATCH_SPECS,
    Recorder,
    forward,
    generate,
    manager,
    pipe,
)

import tokenprune as tp

PRUNE = pipe(("post_projector", "random", 0.5), ({"layer": 2}, "random", 0.5))
KEEP_ALL = pipe(("post_projector", "random", 1.0), ({"layer": 1}, "probe_recorder", 1.0), ({"layer": 2}, "random", 1.0))


@pytest.fixture(scope="module", params=ADAPTERS)
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


@pytest.fixture(scope="module")
def plugins() -> tp.plugins.PluginManager:
    return manager()


def padded_batch(tiny: tm.Tiny) -> dict:
    """A batch of 3 with left padding: two image samples of different sizes and a text-only one."""
    specs = BATCH_SPECS[tiny.name]
    return tiny.make_inputs([specs[0], specs[1], None])


def test_keep_all_is_identity(tiny, plugins):
    """Invariant 1: a keep-all pipeline gives bit-identical logits and generations (batch 3, padding)."""
    inputs = padded_batch(tiny)
    assert int((inputs["attention_mask"] == 0).sum()) > 0
    ref = forward(tiny.model, inputs, tiny.name).logits
    ref_gen = generate(tiny.model, inputs)
    with tp.apply(tiny.model, KEEP_ALL, plugins=plugins) as run:
        out = forward(tiny.model, inputs, tiny.name).logits
        gen = generate(tiny.model, inputs)
    assert torch.equal(out, ref)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for a, b in zip(gen.logits, ref_gen.logits, strict=False):
        assert torch.equal(a, b)
    stages = run.stats.last_prefill.stages
    assert [s.reducer for s in stages] == ["random", "probe_recorder", "random"]
    assert all(s.entering == s.leaving for s in stages)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_cached_decode_equals_recompute(tiny, plugins, positions):
    """Invariant 2: cached decoding after a pruned prefill equals a no-cache recompute (1e-5)."""
    inputs = padded_batch(tiny)
    n = 4
    pipeline = {**PRUNE, "positions": positions}
    with tp.apply(tiny.model, pipeline, plugins=plugins) as run:
        gen = generate(tiny.model, inputs, n)
        kept_cached = [s.kept for s in run.stats.last_prefill.stages]
        full = dict(inputs)
        seq = gen.sequences
        new = seq.shape[1] - inputs["input_ids"].shape[1]
        full["input_ids"] = seq
        full["attention_mask"] = torch.cat(
            [inputs["attention_mask"], torch.ones(seq.shape[0], new, dtype=torch.long)], 1
        )
        if "token_type_ids" in full:  # generated tokens: PaliGemma's causal suffix (1), Gemma3's text (0)
            fill = 1 if tiny.name == "paligemma" else 0
            full["token_type_ids"] = torch.cat(
                [inputs["token_type_ids"], torch.full((seq.shape[0], new), fill, dtype=torch.long)], 1
            )
        if "mm_token_type_ids" in full:
            full["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros(seq.shape[0], new, dtype=torch.int)], 1
            )
        out = forward(tiny.model, full, tiny.name, use_cache=False).logits
        kept_recomputed = [s.kept for s in run.stats.last_prefill.stages]
    assert kept_recomputed == kept_cached  # the same pruned sequence
    for j in range(new):
        torch.testing.assert_close(out[:, -new - 1 + j], gen.logits[j], atol=1e-5, rtol=0)


def test_kv_cache_holds_kept_tokens(tiny, plugins):
    """Invariant 3: every layer's cache holds exactly the tokens the pipeline keeps there."""
    inputs = padded_batch(tiny)
    n = 3
    visual = (
        inputs["input_ids"] == tiny.model.config.image_token_id
        if hasattr(tiny.model.config, "image_token_id")
        else None
    )
    with tp.apply(tiny.model, PRUNE, plugins=plugins) as run:
        gen = generate(tiny.model, inputs, n)
    prefill = run.stats.last_prefill
    post, layer = prefill.stages
    text = ((inputs["attention_mask"] == 1) & ~visual).sum(1) if visual is not None else None
    assert text is not None
    per_sample_0 = [int(t) + k for t, k in zip(text, post.leaving, strict=False)]
    per_sample_2 = [int(t) + k for t, k in zip(text, layer.leaving, strict=False)]
    assert layer.leaving == [max(1, k // 2) if k else 0 for k in post.leaving]
    assert prefill.layer_tokens == [per_sample_0, per_sample_0, per_sample_2, per_sample_2]
    cache = gen.past_key_values
    for i, width in enumerate([max(per_sample_0)] * 2 + [max(per_sample_2)] * 2):
        assert cache.layers[i].keys.shape[2] == width + n - 1, f"layer {i}"


def test_remove_restores_model(tiny, plugins):
    """Invariant 4: after remove(), outputs and state_dict are bit-identical and no hook is left."""
    inputs = padded_batch(tiny)
    before = forward(tiny.model, inputs, tiny.name).logits
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    impl = tiny.model.config.get_text_config()._attn_implementation
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tiny.model.modules())
    pipeline = pipe(
        ("post_projector", "random", 0.5), ({"layer": 1}, "probe_recorder", 0.5), ({"layer": 2}, "random", 0.5)
    )
    run = tp.apply(tiny.model, pipeline, plugins=plugins)
    pruned = forward(tiny.model, inputs, tiny.name).logits
    assert pruned.shape[1] < before.shape[1] or not torch.equal(pruned[:, -1], before[:, -1])
    run.remove()
    run.remove()  # idempotent
    after = forward(tiny.model, inputs, tiny.name).logits
    assert torch.equal(after, before)
    new_state = tiny.model.state_dict()
    assert state.keys() == new_state.keys()
    assert all(torch.equal(state[k], new_state[k]) for k in state)
    assert tiny.model.config.get_text_config()._attn_implementation == impl
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tiny.model.modules()) == hooks_before
    assert "get_image_features" not in tiny.model.model.__dict__


def test_batch_equals_one_by_one(tiny, plugins):
    """Invariant 5: images of different sizes, per-sample keep counts (an adaptive reducer, then a
    fraction at layer 2); each sample gets the same tokens and logits (1e-5) as when run alone."""
    specs = BATCH_SPECS[tiny.name]
    batch = tiny.make_inputs(specs)
    pipeline = pipe(("post_projector", "first_k", 0.75), ({"layer": 2}, "random", 0.5))
    with tp.apply(tiny.model, pipeline, plugins=plugins) as run:
        gen = generate(tiny.model, batch, 3)
        out = forward(tiny.model, batch, tiny.name).logits
        stages = run.stats.last_prefill.stages
        assert len(set(stages[0].leaving)) > 1 and len(set(stages[1].leaving)) > 1
        assert any(k < (b * 3) // 4 for k, b in zip(stages[0].leaving, stages[0].entering, strict=False))  # adaptive
        for i, spec in enumerate(specs):
            alone = tiny.make_inputs([spec], start=i)
            g1 = generate(tiny.model, alone, 3)
            o1 = forward(tiny.model, alone, tiny.name).logits
            assert torch.equal(g1.sequences[0, -3:], gen.sequences[i, -3:])
            for a, b in zip(g1.logits, gen.logits, strict=False):
                torch.testing.assert_close(a[0], b[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(o1[0, -1], out[i, -1], atol=1e-5, rtol=0)
            alone_stats = run.stats.last_prefill.stages
            assert alone_stats[0].kept[0] == stages[0].kept[i]
            assert alone_stats[1].kept[0] == stages[1].kept[i]


def test_probe_matches_eager_attention(tiny, plugins, monkeypatch):
    """Invariant 6: probe scores equal eager attention weights (1e-6) while the model ran sdpa."""
    import tokenprune.probe as probe_module

    calls = []
    real = probe_module.sdpa_attention_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_module, "sdpa_attention_forward", counting)
    inputs = padded_batch(tiny)
    Recorder.clear()
    with tp.apply(tiny.model, pipe(({"layer": 2}, "probe_recorder", 0.5)), plugins=plugins):
        forward(tiny.model, inputs, tiny.name)
    n_layers = tiny.model.config.get_text_config().num_hidden_layers
    assert len(calls) == n_layers  # every layer attended through stock sdpa
    ctx = Recorder.contexts[-1]
    eager = copy.deepcopy(tiny.model)
    eager.set_attn_implementation("eager")
    out = forward(eager, inputs, tiny.name, output_attentions=True)
    att = out.attentions[1].float()  # layer k - 1 = 1: (B, H, L, L)
    visual = inputs["input_ids"] == tiny.model.config.image_token_id
    valid = inputs["attention_mask"].bool()
    for b in range(visual.shape[0]):
        cols = visual[b].nonzero().squeeze(1)
        n = cols.numel()
        expected_last = att[b, :, -1, cols].mean(0)
        torch.testing.assert_close(ctx.attention["last"][b, :n], expected_last, atol=1e-6, rtol=0)
        text_rows = (valid[b] & ~visual[b]).nonzero().squeeze(1)
        expected_text = att[b][:, text_rows][:, :, cols].mean(0).mean(0)
        torch.testing.assert_close(ctx.attention["text"][b, :n], expected_text, atol=1e-6, rtol=0)
    assert tiny.model.config.get_text_config()._attn_implementation == "sdpa"


def test_probe_only_at_needed_layers(tiny, plugins):
    """The probe records only at layer k - 1 of the stages that need it."""
    inputs = padded_batch(tiny)
    with tp.apply(tiny.model, pipe(({"layer": 3}, "probe_recorder", 0.5)), plugins=plugins) as run:
        forward(tiny.model, inputs, tiny.name)
        assert set(run._probe.scores) == {2}
        assert tiny.model.config.get_text_config()._attn_implementation.startswith("tokenprune_probe")
