"""count_flops: analytic == torch == fvcore per layer, unpruned and under a two-stage pipeline."""

import pytest
import tiny_models

import tokenprune as tp
from tokenprune import Capabilities, ScoringReducer
from tokenprune.cost.flops import count_flops
from tokenprune.plugins import get_plugin_manager

FAMILIES = ["llava_next", "llava", "qwen2_vl"]
TWO_STAGES = {
    "stages": [
        {"at": "post_projector", "reducer": "random", "keep": 0.5},
        {"at": {"layer": 2}, "reducer": "random", "keep": 3},
    ]
}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    t = getattr(tiny_models, request.param)()
    return t.model, t.make_inputs([(56, 84)])


def _assert_counters_agree(report):
    for row in report.layers:
        assert row.analytic == row.torch == row.fvcore, row
    assert report.lm_head[0] == report.lm_head[1] == report.lm_head[2]
    lm = report.language_model
    assert lm["analytic"] == lm["torch"] == lm["fvcore"]


def test_unpruned_counts_agree(tiny):
    model, inputs = tiny
    report = count_flops(model, inputs)
    _assert_counters_agree(report)
    length = inputs["input_ids"].shape[1]
    assert [r.tokens for r in report.layers] == [(length,)] * 4
    assert report.vision > 0 and report.overhead == 0


def test_two_stage_pipeline_counts_agree_and_shrink(tiny):
    model, inputs = tiny
    base = count_flops(model, inputs, use_fvcore=False)
    pruned = count_flops(model, inputs, TWO_STAGES)
    _assert_counters_agree(pruned)
    tokens = [r.tokens[0] for r in pruned.layers]
    assert tokens[0] == tokens[1] < base.layers[0].tokens[0]  # post_projector stage shortened every layer
    assert tokens[2] == tokens[3] <= tokens[1]  # the layer-2 stage shortened layers 2 and 3
    assert pruned.vision == base.vision  # pruning after the projector leaves the vision tower alone
    assert 0 < pruned.reduction(base) < 1


class LastTokenAttention(ScoringReducer):
    """Scores by the attention of the last token (a FastV stand-in)."""

    name = "last_attention"
    capabilities = Capabilities(insertion_points=frozenset({"layer"}), attention=frozenset({"last"}))

    def score(self, tokens, ctx):
        return ctx.attention["last"]


class Plugin:
    @staticmethod
    @tp.hookimpl
    def tokenprune_register_reducers(registry):
        registry.add(LastTokenAttention)


def test_the_attention_probe_is_counted_where_it_runs():
    t = tiny_models.llava_next()
    inputs = t.make_inputs([(56, 56)])
    pipe = {"stages": [{"at": {"layer": 2}, "reducer": "last_attention", "keep": 0.25}]}
    report = count_flops(t.model, inputs, pipe, plugins=get_plugin_manager(plugins=[Plugin()]))
    probed = report.layers[1]  # layer k - 1 = 1 computes the probe's QK^T for the last row
    length = inputs["input_ids"].shape[1]
    assert report.probe == 64 * 1 * length  # q_dim x rows x keys
    assert probed.torch == probed.analytic + report.probe
    assert report.layers[0].torch == report.layers[0].analytic
    assert report.layers[2].tokens[0] < length


@pytest.mark.parametrize("source", ["last", "all"])
def test_the_own_layer_attention_is_counted_where_it_runs(source):
    """PyramidDrop's dry call of layer k (key projection, the queries it needs, QK^T) happens in the stage's
    pre-hook, outside every layer: torch counts it there, and the analytic count equals it exactly."""
    t = tiny_models.llava_next()
    inputs = t.make_inputs([(56, 56)])
    pipe = {"stages": [{"at": {"layer": 2}, "reducer": "pdrop", "keep": 0.25, "params": {"source": source}}]}
    report = count_flops(t.model, inputs, pipe)
    _assert_counters_agree(report)
    length = inputs["input_ids"].shape[1]
    queries = 1 if source == "last" else length
    # tiny LLaVA-NeXT: hidden 64, 4 heads of 16, 2 key-value heads (k_proj 64 -> 32)
    assert report.probe == length * 64 * 32 + queries * 64 * 64 + queries * length * 64
    assert dict((name, macs) for _, name, macs in report.reducers) == {"pdrop": 0}
    assert report.reducers_torch == report.probe


def test_flops_report_serialises():
    t = tiny_models.llava()
    report = count_flops(t.model, t.make_inputs([(56, 56)]), use_fvcore=False)
    data = report.as_dict()
    assert data["unit"].startswith("MACs") and data["total"] == report.total
    assert data["lm_head"]["fvcore"] is None and data["language_model"]["fvcore"] is None


def test_reducer_overhead_is_counted_exactly():
    """G-Prune's graph and ToMe's matching: the declared MACs equal what torch saw outside the layers."""
    t = tiny_models.llava_next()
    inputs = t.make_inputs([(56, 84)])
    pipe = {
        "stages": [
            {"at": "post_projector", "reducer": "gprune", "keep": 0.5},
            {"at": {"layer": 2}, "reducer": "tome", "keep": 0.5},
        ]
    }
    report = count_flops(t.model, inputs, pipe)
    _assert_counters_agree(report)
    declared = dict((name, macs) for _, name, macs in report.reducers)
    assert declared["gprune"] > 0 and declared["tome"] > 0
    assert report.reducers_torch == sum(declared.values())
    assert report.total == report.vision + report.language_model["analytic"] + report.overhead


MOE = {"qwen3_vl_moe"}


@pytest.mark.parametrize("family", sorted(set(tiny_models.BUILDERS) - MOE))
def test_every_adapter_counts_agree_under_a_two_stage_pipeline(family):
    """count_flops (what `tokenprune flops` prints) works on every supported family, counters agreeing per layer."""
    t = tiny_models.BUILDERS[family]()
    inputs = t.make_inputs([(56, 84)])
    report = count_flops(t.model, inputs, TWO_STAGES)
    _assert_counters_agree(report)
    assert report.vision > 0
    assert report.layers[-1].tokens[0] <= report.layers[0].tokens[0]


@pytest.mark.parametrize("family", sorted(MOE))
def test_a_mixture_of_experts_model_is_refused_not_miscounted(family):
    """The experts' 3-D weights are no nn.Linear: counting without them would be silently low."""
    t = tiny_models.BUILDERS[family]()
    with pytest.raises(TypeError, match="mixture-of-experts"):
        count_flops(t.model, t.make_inputs([(56, 84)]))
