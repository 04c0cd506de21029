"""count_flops: analytic == torch == fvcore per layer, unpruned and under a two-stage pipeline."""

import pytest
import tiny_models
import torch

import tokenprune as tp
from tokenprune import Capabilities, ScoringReducer
from tokenprune.cost.analytic import DecoderShape, language_model_macs
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


@pytest.mark.parametrize("family", sorted(tiny_models.BUILDERS))
def test_every_adapter_counts_agree_under_a_two_stage_pipeline(family):
    """count_flops (what `tokenprune flops` prints) works on every supported family, counters agreeing per layer."""
    t = tiny_models.BUILDERS[family]()
    inputs = t.make_inputs([(56, 84)])
    report = count_flops(t.model, inputs, TWO_STAGES)
    _assert_counters_agree(report)
    assert report.vision > 0
    assert report.layers[-1].tokens[0] <= report.layers[0].tokens[0]


@pytest.mark.parametrize(
    "family", ["llava_next_video", "llava_onevision", "video_llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
)
def test_video_inputs_count_agree_and_the_video_stage_shrinks_the_language_model(family):
    """A prompt with an image and a 4-frame video: the counters agree per layer, unpruned and with a
    `tokens: video` stage, which costs the language model less and leaves the vision towers' cost alone."""
    t = tiny_models.BUILDERS[family]()
    inputs = t.make_inputs([[(56, 56), tiny_models.Video(4, 56, 56)]])
    video_stage = {"stages": [{"at": "post_projector", "reducer": "random", "keep": 0.5, "tokens": "video"}]}
    unpruned, pruned = count_flops(t.model, inputs), count_flops(t.model, inputs, video_stage)
    for report in (unpruned, pruned):
        _assert_counters_agree(report)
    assert pruned.language_model["analytic"] < unpruned.language_model["analytic"]
    assert pruned.vision == unpruned.vision > 0


# --- mixture of experts (Qwen3-VL-MoE) ------------------------------------------------------------

EXPERTS = ["grouped_mm", "eager", "batched_mm", "grouped_mm_fallback"]
"""How transformers runs the experts: ``aten::_grouped_mm`` (its default), a loop of ``linear`` over the
experts hit, ``bmm`` on gathered weights, and its own grouped-mm op where torch's kernel cannot run."""


@pytest.fixture(scope="module")
def moe():
    t = tiny_models.qwen3_vl_moe()
    return t.model, t.make_inputs([(112, 112)])  # 16 visual tokens, so both stages below cut


@pytest.fixture(params=EXPERTS)
def experts(request, moe, monkeypatch):
    model = moe[0]
    native = request.param.removesuffix("_fallback")
    if request.param.endswith("_fallback"):
        import transformers.integrations.moe

        monkeypatch.setattr(transformers.integrations.moe, "_can_use_grouped_mm", lambda *args: False)
    previous = model.get_experts_implementation()
    model.set_experts_implementation(native)
    yield request.param
    model.set_experts_implementation(previous)


@pytest.mark.parametrize("pruned", [False, True], ids=["unpruned", "two_stages"])
def test_a_mixture_of_experts_model_counts_agree(moe, experts, pruned):
    """Routed experts, however transformers runs them, are counted alike by the three counters."""
    model, inputs = moe
    pipe = {
        "stages": [
            {"at": "post_projector", "reducer": "random", "keep": 0.5},
            {"at": {"layer": 2}, "reducer": "random", "keep": 3},
        ]
    }
    report = count_flops(model, inputs, pipe if pruned else None)
    _assert_counters_agree(report)
    tokens = [r.tokens[0] for r in report.layers]
    length = inputs["input_ids"].shape[1]
    if pruned:
        assert tokens[0] == tokens[1] == length - 8 and tokens[2] == tokens[3] == length - 13
    else:
        assert tokens == [length] * 4
    assert not any("no formula" in note for note in report.fvcore_notes), report.fvcore_notes
    # the experts are in the count: per token, attention 12288 + router 256 + 2 experts x 6144 (see below)
    n = tokens[0]
    assert report.layers[0].torch == n * (12288 + 256 + 2 * 6144) + 2 * 64 * n * n


def test_a_mixture_of_experts_layer_costs_router_plus_top_k_experts_plus_attention(moe):
    model, _ = moe
    text = model.config.text_config
    hidden, heads, kv_heads, head_dim = (
        text.hidden_size,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.head_dim,
    )
    experts, top_k, inter = text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    router = hidden * experts
    expert = hidden * 2 * inter + inter * hidden  # gate_up, down
    shape = DecoderShape.from_model(model)
    assert shape.linear_macs_per_token == (attention + router + top_k * expert,) * text.num_hidden_layers
    assert (hidden, experts, top_k, inter) == (64, 4, 2, 32)  # so the numbers below are the tiny model's
    assert shape.linear_macs_per_token[0] == 12288 + 256 + 2 * 6144
    n = 26
    macs = language_model_macs(shape, [n] * 4, logits_positions=n)
    assert macs.layers[0] == n * (12288 + 256 + 2 * 6144) + 2 * heads * head_dim * n * n


def test_dense_layers_of_a_mixture_of_experts_model_are_counted_as_dense():
    """``mlp_only_layers``: those layers have a plain SwiGLU MLP; the others route."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    t = tiny_models.qwen3_vl_moe()
    config = Qwen3VLMoeConfig.from_dict(t.model.config.to_dict())
    config.text_config.mlp_only_layers = [1]
    shape = DecoderShape.from_model(Qwen3VLMoeForConditionalGeneration(config))
    dense = 12288 + 3 * 64 * config.text_config.intermediate_size
    assert shape.linear_macs_per_token == (24832, dense, 24832, 24832)


def _strip_router(layer):
    layer.mlp.gate = torch.nn.Identity()


def _strip_top_k(layer):
    del layer.mlp.gate.top_k
    del layer.mlp.experts.config


def _stray_matrix(layer):
    layer.mlp.extra = torch.nn.Parameter(torch.zeros(4, 4))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_strip_router, r"Qwen3VLMoeTextSparseMoeBlock \(experts Qwen3VLMoeTextExperts\): expected one router"),
        (_strip_top_k, r"Qwen3VLMoeTextSparseMoeBlock .*: no top_k on the router \(Qwen3VLMoeTextTopKRouter\)"),
        (_stray_matrix, r"2-D parameter 'mlp.extra' \(4, 4\) that is neither a linear module's weight"),
    ],
)
def test_a_mixture_of_experts_block_it_cannot_read_is_refused_by_name(damage, message):
    """Counting without the router, the top_k or a stray matrix would be silently wrong."""
    t = tiny_models.qwen3_vl_moe()
    damage(t.model.get_decoder().layers[2])
    with pytest.raises(TypeError, match="decoder layer 2.*" + message):
        DecoderShape.from_model(t.model)


def test_an_experts_op_fvcore_cannot_count_is_reported_not_agreed(moe, monkeypatch):
    """Without our grouped-mm handle fvcore skips the experts: its column is low and a note names the op."""
    import tokenprune.cost.flops as flops
    from tokenprune.cost.counters import fvcore_sdpa_handle

    model, inputs = moe
    monkeypatch.setattr(flops, "fvcore_handles", lambda: {"aten::scaled_dot_product_attention": fvcore_sdpa_handle})
    report = count_flops(model, inputs)
    n = report.layers[0].tokens[0]
    assert all(r.analytic == r.torch == r.fvcore + n * 2 * 6144 for r in report.layers)  # the experts, missing
    assert any(note.startswith("fvcore has no formula for aten::_grouped_mm") for note in report.fvcore_notes)
    assert not any("aten::_grouped_mm" in note for note in report.fvcore_notes if "element-wise" in note)
