"""Engine behaviour beyond the six invariants: positions, labels, merges, layouts, errors, loading."""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from engine_fixtures import Recorder, forward, generate, pipe
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokenprune as tp
from tokenprune.engine import compat
from tokenprune.errors import ReducerInputError, ReducerOutputError, TokenpruneError, UnsupportedModelError


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_position_policies_match_the_shortened_sequence(nxt, plugins, positions):
    """post_projector pruning equals running the unmodified model on the shortened sequence, with the
    kept tokens' original positions ('original') or default positions 0..L'-1 ('compact')."""
    inputs = nxt.make_inputs([(56, 112)])
    pipeline = pipe(("post_projector", "random", 0.4), positions=positions, protect_newlines=False)
    with tp.apply(nxt.model, pipeline, plugins=plugins) as run, torch.no_grad():
        pruned = nxt.model(**inputs).logits
    kept = run.stats.last_prefill.stages[0].kept[0]
    with torch.no_grad():
        feats = nxt.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    ids = inputs["input_ids"][0]
    visual_cols = (ids == tm.IMAGE_TOKEN).nonzero().squeeze(1)
    keep_cols = torch.ones_like(ids, dtype=torch.bool)
    keep_cols[visual_cols] = False
    keep_cols[visual_cols[kept]] = True
    short = ids[keep_cols][None]
    extra = {} if positions == "compact" else {"position_ids": keep_cols.nonzero().squeeze(1)[None]}
    with torch.no_grad():
        ref = nxt.model(
            input_ids=short,
            attention_mask=torch.ones_like(short),
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[feats[0][kept]])},
            **extra,
        ).logits
    assert pruned.shape == ref.shape
    torch.testing.assert_close(pruned, ref, atol=1e-5, rtol=0)


def test_compact_and_original_differ(nxt, plugins):
    """The two policies are really different (positions reach the model)."""
    inputs = nxt.make_inputs([(56, 112)])
    outs = []
    for positions in ("original", "compact"):
        with tp.apply(nxt.model, pipe(("post_projector", "random", 0.4), positions=positions), plugins=plugins):
            outs.append(forward(nxt.model, inputs, "llava_next").logits)
    assert outs[0].shape == outs[1].shape
    assert not torch.allclose(outs[0], outs[1], atol=1e-4)


def test_text_only_batch_runs_unchanged(nxt, plugins):
    inputs = nxt.make_inputs([None, None])
    ref = forward(nxt.model, inputs, "llava_next").logits
    with tp.apply(
        nxt.model, pipe(("post_projector", "random", 0.3), ({"layer": 2}, "probe_recorder", 0.3)), plugins=plugins
    ) as run:
        out = forward(nxt.model, inputs, "llava_next").logits
        gen = generate(nxt.model, inputs, 2)
    assert torch.equal(out, ref)
    assert gen.sequences.shape[1] == inputs["input_ids"].shape[1] + 2
    assert run.stats.last_prefill.stages == []


def _expected_loss(logits: torch.Tensor, labels: torch.Tensor, keep_cols: list[torch.Tensor]) -> torch.Tensor:
    width = logits.shape[1]
    aligned = torch.full((len(keep_cols), width), -100, dtype=torch.long)
    for b, cols in enumerate(keep_cols):
        aligned[b, width - cols.numel() :] = labels[b, cols]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), aligned[:, 1:].reshape(-1), ignore_index=-100
    )


def test_labels_follow_the_kept_tokens(nxt, plugins):
    """A training forward with labels: the loss is computed on the kept tokens with their labels."""
    inputs = nxt.make_inputs([(56, 56), (56, 112)])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids.masked_fill((ids == tm.IMAGE_TOKEN) | (mask == 0), -100)
    ref = forward(nxt.model, inputs, "llava_next", labels=labels)
    with tp.apply(nxt.model, pipe(("post_projector", "random", 1.0)), plugins=plugins):
        same = forward(nxt.model, inputs, "llava_next", labels=labels)
    assert torch.equal(same.loss, ref.loss)
    with tp.apply(
        nxt.model, pipe(("post_projector", "random", 0.5), ({"layer": 2}, "random", 0.5)), plugins=plugins
    ) as run:
        out = nxt.model(**inputs, labels=labels)
    stages = run.stats.last_prefill.stages
    keep_cols = []
    for b in range(ids.shape[0]):
        visual = (ids[b] == tm.IMAGE_TOKEN).nonzero().squeeze(1)
        first = visual[torch.tensor(stages[0].kept[b])]
        final = first[torch.tensor(stages[1].kept[b])]
        cols = torch.cat([((ids[b] != tm.IMAGE_TOKEN) & (mask[b] == 1)).nonzero().squeeze(1), final]).sort().values
        keep_cols.append(cols)
    assert out.logits.shape[1] == max(c.numel() for c in keep_cols)
    torch.testing.assert_close(out.loss, _expected_loss(out.logits, labels, keep_cols), atol=1e-6, rtol=0)
    assert not torch.allclose(out.loss, ref.loss)


def test_merges_carry_sizes_forward(nxt, plugins):
    """A Merge replaces each group by its size-weighted mean; later stages see the summed sizes."""
    inputs = nxt.make_inputs([(56, 56)])
    Recorder.clear()
    pipeline = pipe(
        ("post_projector", "merge_pairs", 1.0), ("post_projector", "merge_pairs", 1.0), protect_newlines=False
    )
    with tp.apply(nxt.model, pipeline, plugins=plugins) as run:
        forward(nxt.model, inputs, "llava_next")
    first, second = Recorder.contexts[-2:]
    t1, t2 = Recorder.tokens[-2:]
    n = int(first.num_valid[0])
    assert int(second.num_valid[0]) == (n + 1) // 2
    torch.testing.assert_close(t2[0, 0], (t1[0, 0] + t1[0, 1]) / 2)
    assert second.sizes[0, : n // 2].tolist() == [2.0] * (n // 2)
    stats = run.stats.last_prefill.stages
    assert stats[1].leaving == [(((n + 1) // 2) + 1) // 2]
    assert stats[0].kept[0] == list(range(0, n, 2))


def test_llava_next_layout_and_protected_newlines(nxt, plugins):
    """The layout marks the base view, the unpadded grid and one newline per grid row; newlines
    are protected by default and droppable with protect_newlines: false."""
    inputs = nxt.make_inputs([(56, 112)])
    with tp.apply(nxt.model, pipe(("post_projector", "random", 0.1)), plugins=plugins) as run:
        forward(nxt.model, inputs, "llava_next")
    stage = run.stats.last_prefill.stages[0]
    lay = stage.layout
    n = stage.entering[0]
    view, row, col, newline = (getattr(lay, f)[0, :n] for f in ("view", "row", "col", "newline"))
    base = view == 0
    assert int(base.sum()) == 16 and set(row[base].tolist()) == {0, 1, 2, 3} and set(col[base].tolist()) == {0, 1, 2, 3}
    grid = (view == 1) & ~newline
    rows, cols = int(row[grid].max()) + 1, int(col[grid].max()) + 1
    assert int(grid.sum()) == rows * cols
    assert int(newline.sum()) == rows and bool((col[newline] == cols).all())
    assert sorted(row[newline].tolist()) == list(range(rows))
    kept = torch.tensor(stage.kept[0])
    assert bool(newline[kept].sum() == rows)  # all kept
    with tp.apply(nxt.model, pipe(("post_projector", "random", 0.1), protect_newlines=False), plugins=plugins) as run:
        forward(nxt.model, inputs, "llava_next")
    kept = torch.tensor(run.stats.last_prefill.stages[0].kept[0])
    assert int(newline[kept].sum()) < rows


def test_qwen_layout_is_the_merged_grid(plugins):
    tiny = tm.qwen2_vl()
    inputs = tiny.make_inputs([(56, 112)])
    with tp.apply(tiny.model, pipe(("post_projector", "random", 0.5)), plugins=plugins) as run:
        forward(tiny.model, inputs, "qwen2_vl")
    lay = run.stats.last_prefill.stages[0].layout
    _t, h, w = inputs["image_grid_thw"][0].tolist()
    assert lay.row[0].tolist() == [r for r in range(h // 2) for _ in range(w // 2)]
    assert lay.col[0].tolist() == [c for _ in range(h // 2) for c in range(w // 2)]


def test_unsupported_model_type_lists_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in tm.TEXT.items()}))
    with pytest.raises(UnsupportedModelError) as err:
        tp.apply(model, pipe(("post_projector", "random", 0.5)))
    message = str(err.value)
    assert "'llama'" in message
    for name in ("llava_next", "llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "gemma3"):
        assert name in message
    assert "adapter" in message and ".md" in message
    assert hook_count(model) == 0


def test_layer_out_of_range_is_rejected_cleanly(nxt, plugins):
    before = hook_count(nxt.model)
    with pytest.raises(TokenpruneError, match="4 decoder layers"):
        tp.apply(nxt.model, pipe(({"layer": 4}, "random", 0.5)), plugins=plugins)
    assert hook_count(nxt.model) == before


class Picky(tp.TokenReducer):
    """Keeps the first tokens; refuses to run at layer 3 (as trained weights might)."""

    name = "picky"
    capabilities = tp.Capabilities(insertion_points=frozenset({"post_projector", "layer"}))
    bound: ClassVar[list[tuple[torch.nn.Module, tp.InsertionPoint]]] = []

    def bind(self, model: torch.nn.Module, at: tp.InsertionPoint) -> None:
        type(self).bound.append((model, at))
        if at == tp.InsertionPoint("layer", 3):
            raise ReducerInputError("no module was trained for layer 3; use layer 2")

    def reduce(self, tokens: torch.Tensor, ctx: tp.ReduceContext) -> tp.Selection:
        return tp.Selection.from_mask(torch.arange(tokens.shape[1]) < ctx.budget[:, None])


class PickyPlugin:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: object) -> None:
        registry.add(Picky)  # type: ignore[attr-defined]


def test_bind_sees_each_stage_and_can_refuse_before_any_hook(nxt):
    plugins = tp.get_plugin_manager(plugins=[PickyPlugin()])
    Picky.bound.clear()
    with tp.apply(nxt.model, pipe(("post_projector", "picky", 0.5), ({"layer": 2}, "picky", 0.5)), plugins=plugins):
        pass
    assert [(m is nxt.model, str(at)) for m, at in Picky.bound] == [(True, "post_projector"), (True, "layer 2")]
    before = hook_count(nxt.model)
    with pytest.raises(ReducerInputError, match=r"stage 1 \('picky' at layer 3\): no module was trained for layer 3"):
        tp.apply(nxt.model, pipe(("post_projector", "picky", 0.5), ({"layer": 3}, "picky", 0.5)), plugins=plugins)
    assert hook_count(nxt.model) == before
    with tp.apply(nxt.model, pipe(("post_projector", "picky", 0.5)), plugins=plugins):  # the model is free again
        pass


def test_failure_midway_removes_everything(nxt, plugins, monkeypatch):
    """If installation fails after the probe and some hooks are in place, nothing is left behind."""
    before = hook_count(nxt.model)
    from tokenprune.engine.hooks import HookSet

    def boom(self, module, name, after, before=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(HookSet, "wrap_method", boom)  # the last step of the installation
    with pytest.raises(RuntimeError, match="boom"):
        tp.apply(nxt.model, pipe(({"layer": 2}, "probe_recorder", 0.5)), plugins=plugins)
    assert hook_count(nxt.model) == before
    assert "get_image_features" not in nxt.model.model.__dict__
    assert nxt.model.config.get_text_config()._attn_implementation == "sdpa"
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert not any(k.startswith("tokenprune") for k in ALL_ATTENTION_FUNCTIONS._global_mapping)


def test_double_apply_is_refused(nxt, plugins):
    with tp.apply(nxt.model, pipe(("post_projector", "random", 0.5)), plugins=plugins):
        with pytest.raises(TokenpruneError, match="already has a tokenprune pipeline"):
            tp.apply(nxt.model, pipe(("post_projector", "random", 0.5)), plugins=plugins)
    with tp.apply(nxt.model, pipe(("post_projector", "random", 0.5)), plugins=plugins):
        pass


def test_invalid_reducer_output_names_the_reducer(nxt, plugins):
    inputs = nxt.make_inputs([(56, 56)])
    with tp.apply(nxt.model, pipe(("post_projector", "bad_reducer", 0.5)), plugins=plugins):
        with pytest.raises(ReducerOutputError, match=r"'bad_reducer'.*not sorted"):
            forward(nxt.model, inputs, "llava_next")
    assert torch.equal(forward(nxt.model, inputs, "llava_next").logits, forward(nxt.model, inputs, "llava_next").logits)


def test_stats_record_reducer_time_and_decode_steps(nxt, plugins):
    inputs = nxt.make_inputs([(56, 56)])
    with tp.apply(nxt.model, pipe(("post_projector", "random", 0.5)), plugins=plugins) as run:
        generate(nxt.model, inputs, 3)
    phases = [f.phase for f in run.stats.forwards]
    assert phases == ["prefill", "decode", "decode"]
    assert run.stats.reducer_seconds > 0
    decode = run.stats.forwards[-1]
    assert decode.layer_tokens == [[1]] * 4
    assert "stage 0 (random at post_projector)" in run.stats.summary()
    assert run.stats.as_dict()["forwards"][0]["stages"][0]["entering"] == [36]


def test_save_pretrained_and_from_pretrained(nxt, plugins, tmp_path):
    """The real loading path: a saved model loaded with from_pretrained prunes like the original."""
    from transformers import AutoModelForImageTextToText

    nxt.model.save_pretrained(tmp_path / "tiny")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "tiny", attn_implementation="sdpa").eval()
    inputs = nxt.make_inputs([(56, 112), (56, 56)])
    pipeline = pipe(("post_projector", "random", 0.5), ({"layer": 2}, "probe_recorder", 0.5))
    outs = []
    for model in (nxt.model, loaded):
        with tp.apply(model, pipeline, plugins=plugins):
            outs.append(generate(model, inputs, 3))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits, strict=False):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_bf16_identity_and_pruning(nxt, plugins):
    model = copy.deepcopy(nxt.model).to(torch.bfloat16)
    inputs = nxt.make_inputs([(56, 112), (56, 56), None])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    ref = forward(model, inputs, "llava_next").logits
    with tp.apply(
        model, pipe(("post_projector", "random", 1.0), ({"layer": 2}, "probe_recorder", 1.0)), plugins=plugins
    ):
        same = forward(model, inputs, "llava_next").logits
    assert torch.equal(same, ref)
    with tp.apply(
        model, pipe(("post_projector", "random", 0.5), ({"layer": 2}, "probe_recorder", 0.5)), plugins=plugins
    ) as run:
        gen = generate(model, inputs, 3)
    assert torch.isfinite(torch.stack(gen.logits)).all()
    assert gen.past_key_values.layers[3].keys.shape[2] < gen.past_key_values.layers[0].keys.shape[2]
    assert run.stats.last_prefill.stages[1].leaving == [
        max(1, k // 2) if k else 0 for k in run.stats.last_prefill.stages[0].leaving
    ]


def test_eager_models_use_additive_masks(nxt, plugins):
    """A model loaded with eager attention prunes too (float masks); cached == recompute."""
    model = copy.deepcopy(nxt.model)
    model.set_attn_implementation("eager")
    inputs = nxt.make_inputs([(56, 112), (56, 56), None])
    pipeline = pipe(
        ("post_projector", "first_k", 0.5), ({"layer": 1}, "probe_recorder", 1.0), ({"layer": 2}, "random", 0.5)
    )
    with tp.apply(model, pipeline, plugins=plugins):
        gen = generate(model, inputs, 3)
        seq = gen.sequences
        full = dict(
            inputs,
            input_ids=seq,
            attention_mask=torch.cat([inputs["attention_mask"], torch.ones(3, 3, dtype=torch.long)], 1),
        )
        out = forward(model, full, "llava_next", use_cache=False).logits
    assert model.config.get_text_config()._attn_implementation == "eager"
    for j in range(3):
        torch.testing.assert_close(out[:, -4 + j], gen.logits[j], atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("cache_name", ["current", "past_key_values"])
@pytest.mark.parametrize("name", ["llava_next", "qwen2_vl"])
def test_manual_decode_loop_without_position_ids(name, cache_name, plugins):
    """model(**inputs) then model(next_token, <cache>=...) with no position_ids, as a user loop does,
    gives the same logits as generate(); under the release's own cache argument and under the name
    that transformers 5.24 deprecated."""
    tiny = tm.BUILDERS[name]()
    if cache_name == "current":
        cache_name = compat.cache_argument_name(tiny.model.forward)
    inputs = tiny.make_inputs([(112, 112)])
    with tp.apply(tiny.model, pipe(("post_projector", "random", 0.5), ({"layer": 2}, "random", 0.5)), plugins=plugins):
        gen = generate(tiny.model, inputs, 3)
        with torch.no_grad():
            out = tiny.model(**inputs, use_cache=True)
            cache, mask = compat.output_cache(out), inputs["attention_mask"]
            steps = [out.logits[:, -1]]
            for t in range(2):
                token = gen.sequences[:, inputs["input_ids"].shape[1] + t][:, None]
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                kw = {"mm_token_type_ids": torch.zeros_like(token)} if name.startswith("qwen") else {}
                kw[cache_name] = cache
                out = tiny.model(input_ids=token, attention_mask=mask, use_cache=True, **kw)
                cache = compat.output_cache(out)
                steps.append(out.logits[:, -1])
    for a, b in zip(steps, gen.logits, strict=False):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_gemma3_sliding_window_shorter_than_the_prompt(plugins):
    """Gemma3 with a sliding window (6) shorter than the prompt. What still holds exactly: keep-all
    identity, and the prefill (first generated token's logits) equals a no-cache recompute, since both
    slice the same unpruned-position mask. Later cached steps are NOT asserted: transformers truncates a
    sliding layer's cache to its last window-1 entries of the *pruned* sequence, while the prefill window
    counted original positions (docs/engine.md, "Sliding windows")."""
    tiny = tm.gemma3(sliding_window=6)
    inputs = tiny.make_inputs([[(56, 56), (56, 56)], (56, 56)])
    assert inputs["input_ids"].shape[1] > 6
    ref = generate(tiny.model, inputs, 3)
    with tp.apply(tiny.model, pipe(("post_projector", "random", 1.0), ({"layer": 1}, "random", 1.0)), plugins=plugins):
        same = generate(tiny.model, inputs, 3)
    assert torch.equal(same.sequences, ref.sequences)
    with tp.apply(tiny.model, pipe(({"layer": 1}, "random", 0.5)), plugins=plugins):
        gen = generate(tiny.model, inputs, 1)
        out = forward(tiny.model, inputs, "gemma3", use_cache=False).logits
    torch.testing.assert_close(out[:, -1], gen.logits[0], atol=1e-5, rtol=0)


def test_layer_tokens_count_real_tokens_without_pruning(nxt, plugins):
    """Stats count real tokens, not padding, also when nothing is pruned (an empty pipeline)."""
    inputs = nxt.make_inputs([(56, 56), None])
    with tp.apply(nxt.model, {"stages": []}, plugins=plugins) as run:
        forward(nxt.model, inputs, "llava_next")
    real = inputs["attention_mask"].sum(1).tolist()
    assert run.stats.last_prefill.layer_tokens == [real] * 4
    assert real[0] != real[1]


def test_training_forward_backpropagates_through_kept_tokens(plugins):
    """model.train() with labels: the loss backpropagates to the projector through the kept tokens."""
    tiny = tm.llava_next(seed=1)
    model = tiny.model.train()
    inputs = tiny.make_inputs([(56, 112), (56, 56)])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids.masked_fill((ids == tm.IMAGE_TOKEN) | (mask == 0), -100)
    pipeline = pipe(("post_projector", "random", 0.5), ({"layer": 2}, "probe_recorder", 0.5))
    with tp.apply(model, pipeline, plugins=plugins):
        out = model(**inputs, labels=labels)
        out.loss.backward()
    grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_llava_next_several_images_per_prompt(nxt, plugins):
    """Two images of different sizes in one prompt, next to a one-image sample: layouts number the
    images within the sample, and the batch equals the samples run alone."""
    specs = [[(56, 112), (112, 112)], (56, 56)]
    batch = nxt.make_inputs(specs)
    pipeline = pipe(("post_projector", "random", 0.5), ({"layer": 2}, "random", 0.5))
    with tp.apply(nxt.model, pipeline, plugins=plugins) as run:
        gen = generate(nxt.model, batch, 3)
        stage = run.stats.last_prefill.stages[0]
        n = stage.entering[0]
        assert set(stage.layout.image[0, :n].tolist()) == {0, 1}
        assert int(stage.layout.newline[0, :n].sum()) > 0
        for i, spec in enumerate(specs):
            alone = generate(nxt.model, nxt.make_inputs([spec], start=i), 3)
            assert torch.equal(alone.sequences[0, -3:], gen.sequences[i, -3:])
            for a, b in zip(alone.logits, gen.logits, strict=True):
                torch.testing.assert_close(a[0], b[i], atol=1e-5, rtol=0)


def test_llava_next_newlines_close_the_row_of_the_last_token_before_them():
    """The vectorised row closing equals the sequential rule: a newline copies the view and row of the
    token before it, after that token was itself closed (runs of newlines, a leading newline)."""
    from tokenprune.adapters.llava_next import _close_rows

    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        coords = torch.randint(0, 9, (n, 3), generator=gen)
        newline = torch.rand(n, generator=gen) < 0.3
        coords[newline] = -1
        view, row, col = coords[:, 0].clone(), coords[:, 1].clone(), coords[:, 2].clone()
        for j in range(n):
            if newline[j]:
                view[j] = view[j - 1] if j else 0
                row[j] = row[j - 1] if j else 0
        got = _close_rows(coords, newline)
        assert all(torch.equal(a, b) for a, b in zip(got, (view, row, col), strict=True))


@pytest.mark.parametrize("stages", [[("post_projector", "random", 0.5)], []])
def test_without_stages_inside_the_language_model_no_decoder_layer_is_hooked_and_every_layer_is_recorded(stages):
    tiny = tm.BUILDERS["llava_next"]()
    inputs = tiny.make_inputs([(56, 56), (56, 112)])
    layers = tiny.model.model.language_model.layers
    with tp.apply(tiny.model, pipe(*stages)) as run:
        assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)
        out = generate(tiny.model, inputs, n=3)
    assert all(not layer._forward_pre_hooks for layer in layers)
    prefill, *steps = run.stats.forwards
    kept = prefill.stages[0].leaving if stages else inputs["attention_mask"].sum(1).tolist()
    text = (inputs["attention_mask"].sum(1) - (inputs["input_ids"] == tiny.model.config.image_token_id).sum(1)).tolist()
    expected = [k + t for k, t in zip(kept, text, strict=True)] if stages else kept
    assert prefill.layer_tokens == [expected] * len(layers)
    cached = [k.shape[-2] for k, _ in compat.cache_layers(out.past_key_values)]
    width = max(expected) if stages else inputs["input_ids"].shape[1]  # left padding to the longest sample
    assert prefill.layer_width == [width] * len(layers)
    assert cached == [width + len(steps)] * len(layers)
    assert len(steps) == 2 and all(s.layer_tokens == [[1, 1]] * len(layers) for s in steps)
    assert all(s.layer_width == [1] * len(layers) for s in steps)
