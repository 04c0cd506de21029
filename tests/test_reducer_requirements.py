"""One requirements declaration per reducer, read by validation, the engine's install plan and the FLOP count."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import engine_fixtures as ef
import pytest
import tiny_models as tm
import torch
from pydantic import Field

import tokenprune as tp
from tokenprune import Capabilities, ReduceContext, ReducerParams, Requirements, ScoringReducer
from tokenprune.reducer import AttentionSource


class ReadsSource(ScoringReducer):
    """Ranks by the attention of ``source`` rows: its needs depend on its params, declared once."""

    name = "reads_source"
    capabilities = Capabilities(insertion_points=frozenset({"post_projector", "layer"}))
    seen: ClassVar[list[ReduceContext]] = []

    class Params(ReducerParams):
        source: AttentionSource | None = Field(default=None, description="Attention rows read (None: none).")

    @classmethod
    def requirements(cls, params: Any) -> Requirements:
        base = super().requirements(params)
        return replace(base, attention=frozenset({params.source})) if params.source else base

    def score(self, tokens: torch.Tensor, ctx: ReduceContext) -> torch.Tensor:
        self.seen.append(ctx)
        return ctx.attention[self.params.source] if self.params.source else tokens.float().norm(dim=-1)


class OldStyle(ReadsSource):
    """The same needs, written against the older API (a per-need classmethod override)."""

    name = "old_style"

    @classmethod
    def requirements(cls, params: Any) -> Requirements:
        return ScoringReducer.requirements.__func__(cls, params)  # type: ignore[attr-defined]

    @classmethod
    def attention_sources_for(cls, params: Any) -> frozenset[AttentionSource]:
        return frozenset({params.source}) if params.source else frozenset()


class Plugin:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        registry.add(ReadsSource)
        registry.add(OldStyle)


@pytest.fixture(scope="module")
def manager() -> tp.plugins.PluginManager:
    with pytest.warns(DeprecationWarning, match="old_style|OldStyle.*attention_sources_for.*requirements"):
        manager = tp.get_plugin_manager(plugins=[Plugin()])
        manager.reducers  # noqa: B018 (the registry is filled, and the deprecation raised, on first use)
    return manager


@pytest.mark.parametrize("name", ["reads_source", "old_style"])
def test_the_declaration_is_what_every_reader_sees(manager, name):
    cls = manager.reducers.get(name)
    needs = cls({"source": "all"}).needs()
    assert needs.attention == {"all"} and cls.requirements(cls.Params()).attention == frozenset()
    assert cls({"source": "all"}).attention_sources() == {"all"}  # the older accessor agrees
    # validation: attention exists only inside the language model
    with pytest.raises(tp.PipelineError, match="reads attention scores \\(all\\)"):
        tp.prepare(
            {"stages": [{"at": "post_projector", "reducer": name, "keep": 0.5, "params": {"source": "all"}}]},
            plugins=manager,
        )
    tp.prepare({"stages": [{"at": "post_projector", "reducer": name, "keep": 0.5}]}, plugins=manager)  # no source: fine
    # the install plan: the probe computes exactly the declared source at layer k - 1
    ReadsSource.seen.clear()
    tiny = tm.llava_next()
    stage = {"at": {"layer": 2}, "reducer": name, "keep": 0.5, "params": {"source": "all"}}
    prepared = tp.prepare({"stages": [stage]}, plugins=manager)
    assert prepared.plans[0].needs.attention == {"all"}
    with tp.apply(tiny.model, prepared):
        ef.forward(tiny.model, tiny.make_inputs([(56, 56), (56, 112)]), "llava_next")
    (ctx,) = ReadsSource.seen
    assert set(ctx.attention) == {"all"} and ctx.attention["all"].shape == ctx.valid.shape


def test_the_flop_count_reads_the_declaration(manager):
    """The probe's MACs follow the declared source: `all` rows cost more than the `last` row."""
    from tokenprune.cost.flops import count_flops

    tiny = tm.llava_next()
    inputs = tiny.make_inputs([(56, 56)])

    def probe(source: str) -> int:
        stage = {"at": {"layer": 2}, "reducer": "reads_source", "keep": 0.5, "params": {"source": source}}
        return count_flops(tiny.model, inputs, {"stages": [stage]}, use_fvcore=False, plugins=manager).probe

    last, every = probe("last"), probe("all")
    assert 0 < last < every


def test_vision_attention_params_build_their_request_from_attention_and_layer():
    from tokenprune.reducer import VisionAttentionParams

    params = VisionAttentionParams(attention="mean", layer=-3)
    assert params.vision_request() == tp.VisionAttentionRequest("mean", -3)
    assert params.vision_request(keys=True, also_at=(4,)) == tp.VisionAttentionRequest(
        "mean", -3, keys=True, also_at=(4,)
    )
    hiprune = tp.get_plugin_manager().reducers.get("hiprune")
    needs = hiprune.requirements(hiprune.Params(object_layer=9, layer=-2))
    assert needs.vision_attention == tp.VisionAttentionRequest("mean", -2, also_at=(8,))


def test_a_reducer_with_vision_attention_params_reads_what_they_ask_by_default():
    """No ``requirements`` override: the default asks for the params' kind and layer (and what a ``vision_request``
    override adds), as VisionZip's ``similarity: keys`` asks for the layer's keys; without such params, ``cls``."""
    from tokenprune.reducer import VisionAttentionParams, VisionAttentionRequest

    class Extra(VisionAttentionParams):
        keys: bool = Field(default=False, description="Also the layer's keys.")

        def vision_request(self, **more: Any) -> VisionAttentionRequest:
            return super().vision_request(keys=self.keys, **more)

    class ThirdParty(ScoringReducer):
        name = "third_party_vision"
        capabilities = Capabilities(
            insertion_points=frozenset({"post_projector"}), vision_attention=frozenset({"cls", "mean"})
        )
        Params = Extra

        def score(self, tokens: torch.Tensor, ctx: ReduceContext) -> torch.Tensor:
            return ctx.vision_attention

    needs = ThirdParty.requirements(Extra(attention="mean", layer=-4, keys=True))
    assert needs.vision_attention == VisionAttentionRequest("mean", -4, keys=True)
    assert ThirdParty.requirements(Extra()).vision_attention == VisionAttentionRequest("cls", None)
    manager = tp.get_plugin_manager()
    zip_ = manager.reducers.get("visionzip")
    assert zip_.requirements(zip_.Params(similarity="keys", layer=-2)).vision_attention.keys
    assert not zip_.requirements(zip_.Params(similarity="projected")).vision_attention.keys
    vis = manager.reducers.get("vispruner")
    assert vis.requirements(vis.Params()).vision_attention.features
    assert not vis.requirements(vis.Params(similarity="projected")).vision_attention.features
    fast = manager.reducers.get("fastervlm")
    assert fast.requirements(fast.Params(attention="mean", layer=3)).vision_attention == VisionAttentionRequest(
        "mean", 3
    )


def test_fastv_and_pdrop_take_the_one_source_param_and_read_it_at_their_own_layers():
    from pydantic import ValidationError

    from tokenprune.reducer import AttentionSourceParams

    reducers = tp.get_plugin_manager().reducers
    fastv, pdrop = reducers.get("fastv"), reducers.get("pdrop")
    for reducer in (fastv, pdrop):
        assert issubclass(reducer.Params, AttentionSourceParams) and reducer.Params().source == "last"
        with pytest.raises(ValidationError):
            reducer.Params(source="first")
    assert fastv.requirements(fastv.Params(source="text")).attention == frozenset({"text"})
    assert pdrop.requirements(pdrop.Params(source="all")).own_attention == frozenset({"all"})
    assert not pdrop.requirements(pdrop.Params(source="all")).attention
