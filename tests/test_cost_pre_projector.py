"""count_flops with ``pre_projector`` stages: the three counters agree per layer, the language model's saved work is
counted, and the stages' own work (run in a pre-hook of the projector) is reported with the reducers, not the tower."""

from __future__ import annotations

import pytest
import tiny_models
import torch

import tokenprune as tp
from tokenprune import Capabilities, ScoringReducer
from tokenprune.cost.flops import count_flops

FAMILIES = ["llava", "llava_next", "llava_onevision"]


class GramScore(ScoringReducer):
    """Scores each patch by its row sum of the Gram matrix ``X X^T``: ``M P^2 D`` MACs, declared."""

    name = "gram_score"
    capabilities = Capabilities(insertion_points=frozenset({"vision_layer", "pre_projector", "post_projector"}))

    def score(self, tokens, ctx):
        return torch.bmm(tokens.float(), tokens.float().transpose(1, 2)).sum(-1)

    def overhead_macs(self, tokens, ctx):
        b, n, d = tokens.shape
        return b * n * n * d


class _Plugin:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry):
        registry.add(GramScore)


@pytest.fixture(scope="module")
def manager():
    return tp.get_plugin_manager(plugins=[_Plugin()])


def _agree(report):
    for row in report.layers:
        assert row.analytic == row.torch == row.fvcore, row
    lm = report.language_model
    assert lm["analytic"] == lm["torch"] == lm["fvcore"]


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2_vl", "qwen2_5_vl"])
def test_counters_agree_and_the_stage_work_is_counted_exactly(family, manager):
    t = tiny_models.BUILDERS[family]()
    inputs = t.make_inputs([(56, 84)])
    pipe = {"stages": [{"at": "pre_projector", "reducer": "gram_score", "keep": 0.5}]}
    base = count_flops(t.model, inputs, use_fvcore=False)
    report = count_flops(t.model, inputs, pipe, plugins=manager)
    _agree(report)
    (stage,) = report.reducers
    assert stage[2] > 0 and report.reducers_torch == stage[2]  # the Gram products, seen by torch in the hook
    assert report.vision == base.vision  # the tower and the projector do the same work
    assert report.layers[0].tokens[0] < base.layers[0].tokens[0]  # the language model runs on fewer tokens
    saved = base.language_model["analytic"] - report.language_model["analytic"]
    assert saved > 0 and 0 < report.reduction(base) < 1


def test_visionzip_before_the_projector_counts_agree():
    import tokenprune_visionzip
    from engine_fixtures import manager_with

    t = tiny_models.llava()
    inputs = t.make_inputs([(56, 56)])
    base = count_flops(t.model, inputs, use_fvcore=False)
    report = count_flops(t.model, inputs, {"preset": "visionzip-64"}, plugins=manager_with(tokenprune_visionzip))
    _agree(report)
    # 64 tokens of the tiny model's 16 patches keep all; a real budget below:
    pipe = {"stages": [{"at": "pre_projector", "reducer": "visionzip", "keep": 7, "params": {"contextual_ratio": 0.5}}]}
    report = count_flops(t.model, inputs, pipe, plugins=manager_with(tokenprune_visionzip))
    _agree(report)
    declared = report.reducers[0][2]
    assert 0 < report.reducers_torch < declared  # declared also holds the vision probe's [CLS] rows (in the tower)
    assert report.layers[0].tokens[0] == base.layers[0].tokens[0] - (16 - 7)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_vision_layer_stage_saves_tower_and_language_model_work_counted_once(family):
    """ToMe between tower layers: the tower's later layer runs on fewer tokens (torch's vision line shrinks), the
    language model too (every counter agrees per layer), and ToMe's matching is reported once, with the reducers."""
    t = tiny_models.BUILDERS[family]()
    inputs = t.make_inputs([(56, 84)])
    base = count_flops(t.model, inputs, use_fvcore=False)
    report = count_flops(t.model, inputs, {"stages": [{"at": {"vision_layer": 1}, "reducer": "tome", "keep": 0.5}]})
    _agree(report)
    (stage,) = report.reducers
    assert stage[2] > 0 and report.reducers_torch == stage[2]
    assert report.vision < base.vision
    assert report.layers[0].tokens[0] < base.layers[0].tokens[0]
    assert report.total == report.vision + report.language_model["analytic"] + report.overhead


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_a_vision_layer_stage_on_a_packed_tower_saves_tower_work(family, manager):
    """Qwen's packed tower: a unit removal before block 1 shrinks the tower's later block (torch's vision line), the
    language model's input, and the stage's own products are reported once, with the reducers."""
    t = tiny_models.BUILDERS[family]()
    inputs = t.make_inputs([(112, 112)])
    base = count_flops(t.model, inputs, use_fvcore=False)
    pipe = {"stages": [{"at": {"vision_layer": 1}, "reducer": "gram_score", "keep": 0.5}]}
    report = count_flops(t.model, inputs, pipe, plugins=manager)
    _agree(report)
    (stage,) = report.reducers
    assert stage[2] > 0 and report.reducers_torch == stage[2]
    assert report.vision < base.vision
    assert report.layers[0].tokens[0] == base.layers[0].tokens[0] - 8
