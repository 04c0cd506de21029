"""Never silently unpruned, never a raw internal error: the engine's refusals and its recovery."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from engine_fixtures import forward, generate, pipe
from transformers import LogitsProcessor, LogitsProcessorList

import tokenprune as tp
from tokenprune.engine import compat
from tokenprune.errors import ReducerInputError, TokenpruneError


def _bypass_hooks(module: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``module`` run without its hooks, as if a release called it in a way hooks do not see."""
    monkeypatch.setattr(module, "_call_impl", module.forward)


@pytest.mark.parametrize("at", ["post_projector", {"layer": 2}])
def test_a_stage_that_did_not_run_is_an_error(nxt, plugins, monkeypatch, at):
    inputs = nxt.make_inputs([(56, 56)])
    lm = nxt.model.model.language_model
    _bypass_hooks(lm if at == "post_projector" else lm.layers[1], monkeypatch)
    with tp.apply(nxt.model, pipe((at, "random", 0.5)), plugins=plugins):
        with pytest.raises(TokenpruneError) as err:
            forward(nxt.model, inputs, "llava_next")
    message = str(err.value)
    assert "stage 0 ('random'" in message and "did not run" in message
    assert "llava_next" in message and compat.transformers_version() in message


def test_text_only_prefills_need_no_stage(nxt, plugins):
    inputs = nxt.make_inputs([None, None])
    with tp.apply(nxt.model, pipe(("post_projector", "random", 0.5)), plugins=plugins) as run:
        forward(nxt.model, inputs, "llava_next")
    assert run.stats.last_prefill.stages == []


def test_inputs_embeds_with_pixel_values_is_refused(nxt, plugins):
    inputs = nxt.make_inputs([(56, 56)])
    embeds = nxt.model.get_input_embeddings()(inputs.pop("input_ids").clamp(max=200))
    with tp.apply(nxt.model, pipe(("post_projector", "random", 0.5)), plugins=plugins):
        with pytest.raises(TokenpruneError, match="inputs_embeds and pixel_values but no input_ids"):
            nxt.model(inputs_embeds=embeds, **inputs)


def test_nan_visual_features_reach_fastv_as_an_error(nxt, plugins):
    inputs = nxt.make_inputs([(56, 56), (56, 112)])
    poison = nxt.model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        with tp.apply(nxt.model, pipe(({"layer": 2}, "fastv", 0.5)), plugins=plugins):
            with pytest.raises(ReducerInputError, match="fastv"):
                forward(nxt.model, inputs, "llava_next")
    finally:
        poison.remove()


def _prefill(model, inputs, plugins, stage):
    """Apply ``stage`` and run a cached prefill; returns the handle and the cache."""
    run = tp.apply(model, pipe(stage), plugins=plugins)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    return run, compat.output_cache(out)


@pytest.mark.parametrize("stage", [("post_projector", "random", 0.5), ({"layer": 2}, "random", 0.5)])
def test_a_decoding_mask_over_the_pruned_cache_is_refused(nxt, plugins, stage):
    inputs = nxt.make_inputs([(56, 56), (56, 112)])
    run, cache = _prefill(nxt.model, inputs, plugins, stage)
    with run:
        pruned = compat.cache_layers(cache)[-1][0].shape[2]
        step = {"input_ids": torch.tensor([[10], [11]]), compat.cache_argument_name(nxt.model.forward): cache}
        with pytest.raises(TokenpruneError, match=f"covers {pruned + 1} tokens.*unpruned"):
            nxt.model(**step, attention_mask=torch.ones(2, pruned + 1, dtype=torch.long))


@pytest.mark.parametrize("stage", [("post_projector", "random", 0.5), ({"layer": 2}, "random", 0.5)])
def test_a_custom_4d_decoding_mask_gets_a_tokenprune_error(nxt, plugins, stage):
    inputs = nxt.make_inputs([(56, 56), (56, 112)])
    run, cache = _prefill(nxt.model, inputs, plugins, stage)
    with run:
        step = {"input_ids": torch.tensor([[10], [11]]), compat.cache_argument_name(nxt.model.forward): cache}
        wrong = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        with pytest.raises(TokenpruneError, match="decoding step"):
            nxt.model(**step, attention_mask=wrong)


class _Raise(LogitsProcessor):
    """Raises at decoding step ``at`` (0 = the prefill's logits)."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0

    def __call__(self, input_ids, scores):
        self.seen += 1
        if self.seen > self.at:
            raise RuntimeError("interrupted")
        return scores


@pytest.mark.parametrize("at", [0, 2])
@pytest.mark.parametrize("stage", [("post_projector", "random", 0.5), ({"layer": 2}, "fastv", 0.5)])
def test_the_handle_recovers_after_generate_raised(nxt, plugins, stage, at):
    inputs = nxt.make_inputs([(56, 56), (56, 112)])
    with tp.apply(nxt.model, pipe(stage), plugins=plugins):
        torch.manual_seed(0)
        expected = generate(nxt.model, inputs).sequences
    with tp.apply(nxt.model, pipe(stage), plugins=plugins):
        with pytest.raises(RuntimeError, match="interrupted"):
            generate(nxt.model, inputs, logits_processor=LogitsProcessorList([_Raise(at)]))
        torch.manual_seed(0)
        again = generate(nxt.model, inputs).sequences
    assert torch.equal(again, expected)


def test_the_handle_recovers_after_a_reducer_raised(nxt, plugins):
    inputs = nxt.make_inputs([(56, 56), (56, 112)])
    stage = ({"layer": 2}, "fastv", 0.5)
    with tp.apply(nxt.model, pipe(stage), plugins=plugins):
        expected = generate(nxt.model, inputs).sequences
    with tp.apply(nxt.model, pipe(stage), plugins=plugins) as run:
        reducer = run.reducers[0]
        reducer.reduce = lambda tokens, ctx: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            generate(nxt.model, inputs)
        del reducer.reduce
        again = generate(nxt.model, inputs).sequences
    assert torch.equal(again, expected)


@pytest.mark.parametrize("at", ["post_projector", {"layer": 2}])
def test_qwen_padded_batch_with_a_text_only_sample(plugins, at):
    """A padded Qwen2-VL batch where one sample has no image generates as its samples do one by one."""
    tiny = tm.qwen2_vl()
    specs = [(56, 56), None, (112, 112)]
    stage = (at, "fastv" if at != "post_projector" else "l2norm", 0.5)
    with tp.apply(tiny.model, pipe(stage), plugins=plugins):
        batch = generate(tiny.model, tiny.make_inputs(specs)).sequences
        alone = [generate(tiny.model, tiny.make_inputs([s], start=i)).sequences for i, s in enumerate(specs)]
    for row, single in zip(batch, alone, strict=True):
        assert torch.equal(row[-4:], single[0, -4:])
