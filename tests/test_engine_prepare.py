"""Prepare once, install many times: `tp.prepare` validates and builds once; `tp.apply` only binds and installs."""

from __future__ import annotations

from typing import Any, ClassVar

import engine_fixtures as ef
import pytest
import tiny_models as tm
import torch

import tokenprune as tp
import tokenprune.pipeline as pipeline_module
from tokenprune import Capabilities, ReduceContext, ScoringReducer

HALF = {"stages": [{"at": "post_projector", "reducer": "counted", "keep": 0.5}]}


class Counted(ScoringReducer):
    """Keeps the first tokens and counts how often it is built."""

    name = "counted"
    capabilities = Capabilities(insertion_points=frozenset({"post_projector", "layer"}))
    built: ClassVar[int] = 0

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        type(self).built += 1

    def score(self, tokens: torch.Tensor, ctx: ReduceContext) -> torch.Tensor:
        return -torch.arange(tokens.shape[1], dtype=torch.float32).expand(tokens.shape[0], -1)


class CountedPlugin:
    """Registers :class:`Counted` and a preset using it."""

    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        registry.add(Counted)

    @tp.hookimpl
    def tokenprune_register_pipelines(self, registry: Any) -> None:
        registry.add("counted-half", HALF, paper="none", table="none", description="a test preset")


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often a pipeline's stages were checked against the reducers, and reducers built."""
    calls = {"checks": 0}
    check = pipeline_module._check_stages

    def counted_check(*args: Any, **kwargs: Any) -> Any:
        calls["checks"] += 1
        return check(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "_check_stages", counted_check)
    monkeypatch.setattr(Counted, "built", 0)
    return calls


@pytest.fixture(scope="module")
def manager() -> tp.plugins.PluginManager:
    return tp.get_plugin_manager(plugins=[CountedPlugin()])


def test_prepare_validates_once_and_builds_each_reducer_once(manager, counting):
    prepared = tp.prepare(
        {"stages": [*HALF["stages"], {"at": {"layer": 1}, "reducer": "counted", "keep": 4}]}, plugins=manager
    )
    assert counting["checks"] == 1 and Counted.built == 2
    assert isinstance(prepared, tp.PreparedPipeline) and len(prepared.reducers) == 2
    assert tp.prepare(prepared, plugins=manager) is prepared  # already prepared against this manager
    assert counting["checks"] == 1 and Counted.built == 2


def test_presets_resolve_against_the_callers_manager(manager):
    prepared = tp.prepare({"preset": "counted-half"}, plugins=manager)
    assert prepared.name == "counted-half" and [s.reducer for s in prepared.stages] == ["counted"]
    assert tp.load_pipeline({"preset": "counted-half"}, plugins=manager).stages == prepared.stages
    with pytest.raises(tp.PipelineError, match="unknown pipeline preset"):  # a fresh manager has no such preset
        tp.prepare({"preset": "counted-half"})


def test_the_old_registry_keywords_still_work_with_a_deprecation_warning(manager):
    with pytest.warns(DeprecationWarning, match="plugins="):
        pipe = tp.load_pipeline({"preset": "counted-half"}, registry=manager.reducers, presets=manager.pipelines)
    assert [s.reducer for s in pipe.stages] == ["counted"]
    with pytest.raises(TypeError, match="not both"):
        tp.load_pipeline(HALF, plugins=manager, registry=manager.reducers)


def test_apply_of_a_prepared_pipeline_on_two_models_neither_validates_nor_builds(manager, counting):
    tiny = tm.llava_next()
    first, second = tiny.model, tm.llava_next().model  # the same seed: the same weights
    inputs = tiny.make_inputs([(56, 56), (56, 112)])
    with tp.apply(first, HALF, plugins=manager) as run:  # the old way: prepared on the way
        expected = ef.forward(first, inputs, "llava_next").logits
        tokens = run.stats.last_prefill.layer_tokens
    counting["checks"], Counted.built = 0, 0
    prepared = tp.prepare(HALF, plugins=manager)
    with tp.apply(first, prepared) as one, tp.apply(second, prepared) as two:
        assert one.prepared is prepared and two.reducers == prepared.reducers
        a = ef.forward(first, inputs, "llava_next").logits
        b = ef.forward(second, inputs, "llava_next").logits
        assert one.stats.last_prefill.layer_tokens == two.stats.last_prefill.layer_tokens == tokens
    assert torch.equal(a, expected) and torch.equal(b, expected)
    with tp.apply(first, prepared):  # and again, after both were removed
        assert torch.equal(ef.forward(first, inputs, "llava_next").logits, expected)
    assert counting["checks"] == 1 and Counted.built == 1


def test_compare_validates_and_builds_each_pipeline_once_across_both_passes(manager, counting, tmp_path):
    from tokenprune.bench.config import load_config
    from tokenprune.bench.runner import compare
    from tokenprune.synth.model import TINY, build_model
    from tokenprune.synth.processor import build_processor

    config = load_config(
        {
            "model": "unused",
            "output": str(tmp_path),
            "batch_size": 2,
            "heatmaps": 0,
            "tasks": [{"name": "synthvqa", "per_type": 1}],
            "pipelines": [{"name": "counted", **HALF}],
            "timing": {"warmup": 1, "repeats": 2, "memory": True},
        }
    )
    outcome = compare(config, plugins=manager, model_and_processor=(build_model(TINY, seed=0), build_processor()))
    assert outcome.computed > 0
    # resolve_pipelines validated it; the accuracy pass and four cost-pass rounds reused one prepared pipeline
    assert counting["checks"] == 1 and Counted.built == 1
