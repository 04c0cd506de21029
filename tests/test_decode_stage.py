"""The ``decode`` insertion point: per decoding step, layers k onwards attend only to the kept cached tokens.

The reference is independent of the engine's gathering: the stock model, without tokenprune, with an
attention function that *masks* the left-out visual columns at layers >= k during decoding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import tiny_models as tm
import torch
from engine_fixtures import BATCH_SPECS, VIDEO_SPECS, generate, manager_with, pipe

import tokenprune as tp
from tokenprune import Capabilities, ReduceContext, Selection, TokenReducer
from tokenprune.engine import compat
from tokenprune.errors import PipelineError

LAYER = 2


class EveryOther(TokenReducer):
    """At step ``s``, keep the visual tokens whose index within the sample has the parity of ``s``."""

    name = "test_every_other"
    capabilities = Capabilities(insertion_points=frozenset({"decode"}), deterministic_count=False)

    def stage_budget(self, keep: Any, valid: torch.Tensor, protected: torch.Tensor, layout: Any) -> torch.Tensor:
        return valid.sum(1)

    def reduce(self, tokens: torch.Tensor, ctx: ReduceContext) -> Selection:
        index = torch.arange(ctx.valid.shape[1], device=ctx.valid.device)[None]
        return Selection.from_mask(ctx.valid & ((index % 2) == (ctx.step or 0) % 2))


class _Plugin:
    @staticmethod
    @tp.hookimpl
    def tokenprune_register_reducers(registry: Any) -> None:
        registry.add(EveryOther)


PLUGINS = _Plugin()


def _manager() -> tp.plugins.PluginManager:
    return manager_with(PLUGINS)


def _visual_columns(tiny: tm.Tiny, inputs: dict[str, Any]) -> torch.Tensor:
    """Image and video tokens of ``input_ids``, from the config's token ids."""
    ids, cfg = inputs["input_ids"], tiny.model.config
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    tokens = {getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None}
    return torch.isin(ids, torch.tensor(sorted(tokens)))


SPECS: dict[str, list[Any]] = {
    **BATCH_SPECS,  # every built-in family, samples of different images (Qwen3-VL: DeepStack after layers 0-2)
    **{f"{name}-video": specs for name, specs in VIDEO_SPECS.items()},
    "gemma3-window": BATCH_SPECS["gemma3"],  # layer 3 is a sliding layer: it keeps the last 12 keys
}
DECODE_LAYER = {"gemma3": 3, "gemma3-window": 3}  # Gemma3's layer 2 is its full-attention layer


def _tiny(family: str) -> tm.Tiny:
    if family == "gemma3-window":
        return tm.gemma3(sliding_window=12)
    return tm.BUILDERS[family.removesuffix("-video")]()


@contextlib.contextmanager
def masked_reference(tiny: tm.Tiny, visual: torch.Tensor, layer: int) -> Iterator[None]:
    """The stock model attending, at decoding step ``s`` and layers >= ``layer``, only to the visual tokens
    whose rank within their sample has the parity of ``s`` (and to every other token)."""
    rank = visual.long().cumsum(1) - 1
    step = {"n": -1}
    width = visual.shape[1]

    def masked_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: Any, mask: Any, **kw: Any) -> Any:
        if query.shape[2] == 1 and module.layer_idx == 0:
            step["n"] += 1
        if query.shape[2] == 1 and module.layer_idx >= layer:
            b, lk = key.shape[0], key.shape[2]
            positions = torch.arange(lk) + (width + step["n"] + 1 - lk)  # a sliding layer keeps only the last keys
            left_out = visual & ((rank % 2) != step["n"] % 2)
            padded = torch.cat([left_out, torch.zeros(b, step["n"] + 1, dtype=torch.bool)], 1)
            allowed = ~padded[:, positions]
            base = torch.ones(b, 1, 1, lk, dtype=torch.bool) if mask is None else mask.bool()
            mask = base & allowed[:, None, None, :]
        return compat.stock_attention("sdpa", module)(module, query, key, value, mask, **kw)

    config = tiny.model.config.get_text_config()
    compat.acquire_attention("test_masked_sdpa", "sdpa", masked_sdpa)
    previous = compat.swap_attention_implementation(config, "test_masked_sdpa")
    try:
        yield
    finally:
        compat.restore_attention_implementation(config, previous)
        compat.release_attention("test_masked_sdpa")


@pytest.mark.parametrize("family", sorted(SPECS))
def test_left_out_tokens_are_exactly_masked_out_at_layers_k_onwards(family):
    """A padded batch of two different inputs; every decoding step keeps another half of the visual tokens."""
    tiny, layer = _tiny(family), DECODE_LAYER.get(family.removesuffix("-video"), LAYER)
    inputs = tiny.make_inputs(SPECS[family])
    pipeline = pipe(({"decode": layer}, "test_every_other", 1.0), protect_newlines=False)  # newlines are ranked too
    with tp.apply(tiny.model, pipeline, plugins=_manager()) as run:
        pruned = generate(tiny.model, inputs, n=5)
    with masked_reference(tiny, _visual_columns(tiny, inputs), layer):
        reference = generate(tiny.model, inputs, n=5)
    stock = generate(tiny.model, inputs, n=5)
    for a, b in zip(pruned.logits, reference.logits, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(pruned.logits, stock.logits, strict=True))
    decodes = [f for f in run.stats.forwards if f.phase == "decode"]
    assert len(decodes) == 4 and all(len(f.stages) == 1 for f in decodes)
    visual = _visual_columns(tiny, inputs).sum(1).tolist()
    for s, f in enumerate(decodes):
        stage = f.stages[0]
        assert stage.at == f"decode layer {layer}" and stage.entering == visual
        assert stage.kept == [[i for i in range(n) if i % 2 == s % 2] for n in visual]


def test_keep_all_is_identity_and_the_cache_keeps_every_token():
    tiny = tm.BUILDERS["llava_next"]()
    inputs = tiny.make_inputs([[(64, 96)]])
    stock = generate(tiny.model, inputs, n=4)
    with tp.apply(tiny.model, pipe(({"decode": LAYER}, "dycoke_dp", 1.0))) as run:
        kept_all = generate(tiny.model, inputs, n=4)
    for a, b in zip(kept_all.logits, stock.logits, strict=True):
        assert torch.equal(a, b)
    assert [len(f.stages) for f in run.stats.forwards] == [0, 1, 1, 1]
    with tp.apply(tiny.model, pipe(({"decode": LAYER}, "dycoke_dp", 0.25))):
        pruned = generate(tiny.model, inputs, n=4)
    stock_lengths = [k.shape[-2] for k, _ in compat.cache_layers(stock.past_key_values)]
    assert [k.shape[-2] for k, _ in compat.cache_layers(pruned.past_key_values)] == stock_lengths
    after = generate(tiny.model, inputs, n=4)  # removed: the stock model again
    for a, b in zip(after.logits, stock.logits, strict=True):
        assert torch.equal(a, b)


def test_with_prefill_stages_a_batch_equals_one_by_one():
    """After a post_projector and a layer stage, the decode stage follows the kept columns per sample."""
    tiny = tm.BUILDERS["qwen2_vl"]()
    specs = [[(56, 84)], [(84, 84)]]
    pipeline = pipe(
        ("post_projector", "l2norm", 0.75),
        ({"layer": 1}, "fastv", 0.75),
        ({"decode": 3}, "dycoke_dp", 0.3),
    )
    with tp.apply(tiny.model, pipeline) as run:
        batched = generate(tiny.model, tiny.make_inputs(specs), n=4)
    kept = [f.stages[0].kept for f in run.stats.forwards if f.phase == "decode"]
    for i, spec in enumerate(specs):
        with tp.apply(tiny.model, pipeline) as single_run:
            single = generate(tiny.model, tiny.make_inputs([spec], start=i), n=4)
        width = single.logits[0].shape[0]
        for a, b in zip(batched.logits, single.logits, strict=True):
            torch.testing.assert_close(a[i : i + width], b, atol=1e-4, rtol=1e-4)
        single_kept = [f.stages[0].kept[0] for f in single_run.stats.forwards if f.phase == "decode"]
        assert single_kept == [k[i] for k in kept]
    assert any(len(k[0]) < run.stats.forwards[1].stages[0].entering[0] for k in kept)  # the first step prunes


def test_eager_attention_gives_the_sdpa_result():
    tiny = tm.BUILDERS["llava_next"]()
    inputs = tiny.make_inputs([[(64, 96)], [(96, 64)]])
    pipeline = pipe(({"decode": LAYER}, "test_every_other", 1.0), protect_newlines=False)
    with tp.apply(tiny.model, pipeline, plugins=_manager()):
        sdpa = generate(tiny.model, inputs, n=4)
    tiny.model.set_attn_implementation("eager")
    with tp.apply(tiny.model, pipeline, plugins=_manager()):
        eager = generate(tiny.model, inputs, n=4)
    for a, b in zip(sdpa.logits, eager.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"at": {"decode": 3}, "reducer": "fastv", "keep": 0.5}], "'fastv' does not run at decode layer 3"),
        (
            [
                {"at": {"decode": 2}, "reducer": "dycoke_dp", "keep": 0.5},
                {"at": {"decode": 3}, "reducer": "dycoke_dp", "keep": 0.5},
            ],
            "at most one decode stage",
        ),
        (
            [
                {"at": {"decode": 2}, "reducer": "dycoke_dp", "keep": 0.5},
                {"at": {"layer": 3}, "reducer": "fastv", "keep": 0.5},
            ],
            "then the decode stage",
        ),
        ([{"at": {"decode": 0}, "reducer": "dycoke_dp", "keep": 0.5}], "decode must be an integer >= 1"),
        ([{"at": {"decode": 2, "layer": 1}, "reducer": "dycoke_dp", "keep": 0.5}], "`at` is 'post_projector'"),
        ([{"at": "post_projector", "reducer": "dycoke_dp", "keep": 0.5}], "it supports: decode"),
    ],
)
def test_invalid_decode_stages_are_refused_by_name(stages, message):
    with pytest.raises(PipelineError, match=message):
        tp.load_pipeline({"stages": stages})


def test_a_decode_layer_the_model_lacks_is_refused_and_nothing_stays_installed():
    tiny = tm.BUILDERS["llava_next"]()
    inputs = tiny.make_inputs([[(64, 96)]])
    stock = generate(tiny.model, inputs, n=2)
    layers = tiny.model.config.text_config.num_hidden_layers
    with pytest.raises(PipelineError, match=f"runs at layer {layers}.*use a layer between 1 and {layers - 1}"):
        tp.apply(tiny.model, pipe(({"decode": layers}, "dycoke_dp", 0.5)))
    after = generate(tiny.model, inputs, n=2)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, stock.logits, strict=True))


def test_a_decode_stage_after_a_sliding_window_layer_is_refused_by_name():
    tiny = tm.gemma3(sliding_window=6)
    with pytest.raises(PipelineError, match=r"layer 1 uses sliding-window attention.*full-attention layer: 3"):
        tp.apply(tiny.model, pipe(({"decode": 2}, "dycoke_dp", 0.5)))


class TextAtDecode(TokenReducer):
    """Declares the decode point but reads what a decode stage cannot serve."""

    name = "test_text_at_decode"
    capabilities = Capabilities(
        insertion_points=frozenset({"decode"}), attention=frozenset({"last", "text"}), needs_text=True
    )

    def reduce(self, tokens: torch.Tensor, ctx: ReduceContext) -> Selection:
        return Selection.from_mask(ctx.valid)


class _TextPlugin:
    @staticmethod
    @tp.hookimpl
    def tokenprune_register_reducers(registry: Any) -> None:
        registry.add(TextAtDecode)


def test_a_decode_reducer_that_reads_what_decoding_lacks_is_refused_naming_it():
    manager = manager_with(PLUGINS, _TextPlugin())
    stage = {"at": {"decode": 2}, "reducer": "test_text_at_decode", "keep": 0.5}
    with pytest.raises(PipelineError) as err:
        tp.load_pipeline({"stages": [stage]}, registry=manager.reducers)
    message = str(err.value)
    assert "only the `last` attention exists; 'test_text_at_decode' reads ['text']" in message
    assert "serves only attention and the cached keys; 'test_text_at_decode' needs text" in message
