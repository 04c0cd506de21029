"""Hybrid language models: cuts through linear-attention (Gated DeltaNet) and short-convolution layers.

Tiny random Qwen3.5 and LFM2-VL models (tokenprune.testing.tiny_configs) with the layer kinds interleaved; the
engine invariants of the check kit run with a cut between a recurrent layer and an attention layer, in both
directions, with cached decoding after it.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp
from tokenprune.adapters.generic import adapter_for
from tokenprune.engine import compat
from tokenprune.engine.hybrid import check_attention_layers, layer_kinds
from tokenprune.engine.layer_args import LayerCut, cut_prefill_args, layer_args_of
from tokenprune.errors import PipelineError
from tokenprune.testing import adapters as checks
from tokenprune.testing.census import census_one, model_types
from tokenprune.testing.census_inputs import InputBuilder
from tokenprune.testing.tiny_configs import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _skip_unless(model_type: str) -> None:
    if model_type not in model_types():
        pytest.skip(f"transformers {compat.transformers_version()} has no {model_type}")


def _tiny(model_type: str, layer_types: list[str]) -> torch.nn.Module:
    cfg = tiny_config(model_type)
    text = cfg.get_text_config()
    text.layer_types = layer_types
    if hasattr(text, "full_attn_idxs"):
        text.full_attn_idxs = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    torch.manual_seed(0)
    return compat.model_from_config(cfg).eval()


def _case(model: torch.nn.Module) -> checks.AdapterCase:
    manager = checks.adapter_check_manager()
    make_inputs = InputBuilder(model, adapter_for(model, manager))
    return checks.adapter_case(model, make_inputs, [1, 2, 1], plugins=manager, pad_token_id=make_inputs.pad)


# The check kit's layer stage runs at layer 2: its input is layer 1's output.
CUTS = [
    # Qwen3.5: linear layer 0 (the cache length is read from an attention layer), a cut from a linear layer into
    # an attention layer, and the other way round (a pruned linear layer decoding after an attention layer)
    ("qwen3_5", ["linear_attention", "linear_attention", "full_attention", "linear_attention"]),
    ("qwen3_5", ["full_attention", "full_attention", "linear_attention", "full_attention"]),
    ("lfm2_vl", ["conv", "conv", "full_attention", "conv"]),
    ("lfm2_vl", ["full_attention", "full_attention", "conv", "full_attention"]),
]


@pytest.mark.parametrize(("model_type", "layer_types"), CUTS, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_a_cut_between_recurrent_and_attention_layers_decodes_as_recomputed(model_type, layer_types):
    _skip_unless(model_type)
    case = _case(_tiny(model_type, layer_types))
    checks.cached_decode_equals_recompute(case)
    if layer_types[0] == "full_attention":  # compact positions once per family (Gated DeltaNet is slow on CPU)
        checks.cached_decode_equals_recompute(case, positions="compact")
    checks.batch_equals_one_by_one(case)
    if layer_types[0] == "full_attention":  # the kit's removal check probes layer 0's attention
        checks.remove_restores_model(case)


@pytest.mark.parametrize(
    ("layer_types", "attention"),
    [
        (["conv", "conv", "full_attention", "conv"], {2}),
        (["full_attention", "full_attention", "conv", "full_attention"], {0, 1, 3}),
    ],
    ids=["conv-into-attention", "attention-into-conv"],
)
def test_the_kits_kv_cache_check_counts_the_attention_layers_keys_only(layer_types, attention):
    """The check kit's ``kv_cache_holds_kept_tokens`` with the cut at layer 2 of LFM2: the short-convolution layers
    keep a state, not keys, and are left out; every attention layer's keys are counted, and one without keys in the
    cache is an error naming it."""
    from types import SimpleNamespace

    _skip_unless("lfm2_vl")
    case = _case(_tiny("lfm2_vl", layer_types))
    checks.kv_cache_holds_kept_tokens(case)
    gen = case.generate(case.padded_batch(), 2)
    lengths = checks.cached_key_lengths(case, compat.output_cache(gen))
    assert set(lengths) == attention
    width = case.padded_batch()["input_ids"].shape[1] + 1
    assert all(n == width for n in lengths.values())  # no pipeline: every layer holds the prompt and a step
    empty = SimpleNamespace(layers=[SimpleNamespace(keys=None, values=None)] * len(layer_types))
    first = min(attention)
    with pytest.raises(checks.AdapterCheckError, match=rf"layer {first} \(full_attention\) holds no keys"):
        checks.cached_key_lengths(case, empty)


@pytest.mark.parametrize("model_type", ["qwen3_5", "lfm3_vl"])
def test_hybrid_types_pass_the_census(model_type):
    _skip_unless(model_type)
    row = census_one(model_type)
    assert row.status == "passes", row.detail


def test_the_tiny_hybrid_configs_hold_each_layer_kind():
    for model_type, kinds in [("qwen3_5", {"linear_attention"}), ("lfm2_vl", {"conv"}), ("lfm3_vl", {"conv"})]:
        if model_type in model_types():
            types = set(tiny_config(model_type).get_text_config().layer_types)
            assert kinds <= types and "full_attention" in types, (model_type, types)


def test_a_stage_reading_a_linear_layers_attention_is_refused_naming_the_usable_layers():
    _skip_unless("qwen3_5")
    model = _tiny("qwen3_5", ["full_attention", "linear_attention", "full_attention", "linear_attention"])
    fastv = {"stages": [{"at": {"layer": 2}, "reducer": "fastv", "keep": 0.5}]}
    with pytest.raises(PipelineError, match=r"layer 1 is a linear_attention layer.*layers are 0, 2.*k in 1, 3"):
        tp.apply(model, fastv)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    with tp.apply(model, {"stages": [{"at": {"layer": 3}, "reducer": "fastv", "keep": 0.5}]}):
        pass  # layer 2 is full attention: served


def test_an_own_attention_stage_needs_attention_at_its_layer_and_the_one_before():
    """PDrop reads layer k's own attention, computed with the arguments layer k - 1 received."""
    _skip_unless("qwen3_5")
    model = _tiny("qwen3_5", ["full_attention", "linear_attention", "full_attention", "full_attention"])
    for k, bad in [(1, 1), (2, 1)]:
        pdrop = {"stages": [{"at": {"layer": k}, "reducer": "pdrop", "keep": 0.5}]}
        with pytest.raises(PipelineError, match=rf"own attention.*layer {bad} is a linear_attention layer.*k in 3\b"):
            tp.apply(model, pdrop)
    with tp.apply(model, {"stages": [{"at": {"layer": 3}, "reducer": "pdrop", "keep": 0.5}]}):
        pass


def test_a_decode_stage_reading_a_conv_layer_is_refused():
    _skip_unless("lfm2_vl")
    model = _tiny("lfm2_vl", ["full_attention", "conv", "full_attention", "conv"])
    layers = list(model.model.language_model.layers)
    kinds = layer_kinds(model.config.get_text_config(), layers)
    assert kinds == ("full_attention", "conv", "full_attention", "conv")
    prepared = tp.prepare({"stages": [{"at": {"decode": 2}, "reducer": "dycoke_dp", "keep": 0.5}]})
    with pytest.raises(PipelineError, match=r"reads layer 1's attention and keys, but layer 1 is a conv layer"):
        check_attention_layers({}, prepared.plans[0], kinds)


def test_a_recurrent_layer_gets_the_kept_tokens_padding_mask_even_where_the_model_passed_none():
    """Ragged keep counts add padding slots on the left: a linear layer must zero them (its 2-D mask)."""
    _skip_unless("qwen3_5")
    model = _tiny("qwen3_5", ["full_attention", "linear_attention", "full_attention", "linear_attention"])
    adapter = adapter_for(model, checks.adapter_check_manager())
    cols = torch.tensor([[-1, 1, 3], [0, 2, 3]])
    seq = _sequence(cols)
    hidden = torch.zeros(2, 3, 64)
    cut = LayerCut(hidden, seq, 4, 1, False, adapter, all_valid=False, recurrent=True)
    table = layer_args_of(adapter)
    _, kw = cut_prefill_args((hidden,), {"attention_mask": None}, cut, table, boolean=True, dtype=torch.float32)
    assert torch.equal(kw["attention_mask"], torch.tensor([[0, 1, 1], [1, 1, 1]]))
    given = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])  # the model's 2-D masks: both left-padded
    _, kw = cut_prefill_args((hidden,), {"attention_mask": given}, cut, table, boolean=True, dtype=torch.float32)
    assert torch.equal(kw["attention_mask"], torch.tensor([[0, 1, 1], [0, 1, 1]]))


def _sequence(cols: torch.Tensor):
    from tokenprune.engine.sequence import TokenSequence

    valid = cols >= 0
    return TokenSequence(
        input_column=cols,
        lm_column=cols,
        valid=valid,
        visual=torch.zeros_like(valid),
        sizes=torch.ones(cols.shape),
        layout=None,
        positions=cols.clamp(min=0)[None],
        freed_positions=torch.zeros(1, cols.shape[0], dtype=torch.long),
        has_padding_slots=True,
    )


def test_flops_of_linear_attention_layers_are_refused_naming_the_layer_kind():
    from tokenprune.cost.analytic import DecoderShape

    _skip_unless("qwen3_5")
    with torch.device("meta"):
        model = _tiny("qwen3_5", ["full_attention", "linear_attention", "full_attention", "linear_attention"])
    with pytest.raises(TypeError, match=r"decoder layers 1, 3 are linear_attention layers: .*short-convolution"):
        DecoderShape.from_model(model)


def test_flops_of_short_convolution_layers_agree_three_ways():
    """LFM2's conv layers: ``n P + (n + kernel - 1) channels kernel``, as torch and fvcore count them."""
    from tokenprune.cost.analytic import DecoderShape
    from tokenprune.cost.flops import count_flops

    _skip_unless("lfm2_vl")
    model = _tiny("lfm2_vl", ["full_attention", "conv", "full_attention", "conv"])
    shape = DecoderShape.from_model(model)
    text = model.config.text_config
    assert shape.conv[1] == (text.hidden_size * text.conv_L_cache, text.conv_L_cache) and shape.conv[0] == (0, 1)
    inputs = _case(model).make_inputs([1])
    two_stages = {
        "stages": [
            {"at": "post_projector", "reducer": "random", "keep": 0.5},
            {"at": {"layer": 2}, "reducer": "random", "keep": 1},
        ]
    }
    base = count_flops(model, inputs)
    pruned = count_flops(model, inputs, two_stages)
    for report in (base, pruned):
        for row in report.layers:
            assert row.analytic == row.torch == row.fvcore, row
        assert report.language_model["analytic"] == report.language_model["torch"] == report.language_model["fvcore"]
    assert pruned.layers[3].tokens[0] < pruned.layers[1].tokens[0] < base.layers[1].tokens[0]
    assert pruned.layers[3].analytic < pruned.layers[1].analytic  # the conv layer after the cut costs less


# --- Gemma 4: per-layer embeddings follow the cut; KV sharing: what it cannot follow refused -------------------------------------------------


def _gemma4(shared: int = 0) -> torch.nn.Module:
    """The census's tiny Gemma 4 (its vision tower from the vision config's defaults; the census builder makes its
    variable-resolution patch rows with their ``image_position_ids``), ``shared`` KV-sharing layers."""
    cfg = tiny_config("gemma4")
    if shared:  # every layer kind the sharing layers read has a producing layer before them
        cfg.text_config.layer_types = ["sliding_attention", "full_attention"] * 2
    cfg.text_config.num_kv_shared_layers = shared
    torch.manual_seed(0)
    return compat.model_from_config(cfg).eval()


def test_gemma4_per_layer_embeddings_follow_the_cut():
    _skip_unless("gemma4")
    model = _gemma4()
    assert model.config.text_config.hidden_size_per_layer_input  # per-layer embeddings on
    manager = checks.adapter_check_manager()
    make_inputs = InputBuilder(model, adapter_for(model, manager))
    case = checks.adapter_case(model, make_inputs, [1, 2, 1], plugins=manager, pad_token_id=make_inputs.pad)
    checks.keep_all_is_identity(case)
    checks.cached_decode_equals_recompute(case)
    checks.batch_equals_one_by_one(case)
    checks.remove_restores_model(case)


def test_gemma4_with_kv_shared_layers_refuses_what_the_sharing_cannot_follow_with_the_reason():
    """Layers 0 (sliding) and 1 (full) are the sources of the shared layers 2 and 3: a cut at layer 2 is served
    (their keys and values gathered to the kept tokens: tests/test_gemma4_kv_sharing.py), reading layer 2's own
    attention is not (it computes no keys of its own)."""
    _skip_unless("gemma4")
    with torch.device("meta"):
        model = _gemma4(shared=2)
    pdrop = {"stages": [{"at": {"layer": 2}, "reducer": "pdrop", "keep": 0.5}]}
    with pytest.raises(
        PipelineError, match=r"shares keys and values \(layers 2 to 3 attend .*layer 2 computes no keys"
    ):
        tp.apply(model, pdrop)
    for point in ("post_projector", {"layer": 2}):
        with tp.apply(model, {"stages": [{"at": point, "reducer": "random", "keep": 0.5}]}):
            pass


def test_a_decode_stage_runs_after_an_attention_layer_of_a_hybrid_model():
    """``decode: k`` reads layer ``k - 1``'s attention (full here); linear layers keep their state as it is."""
    _skip_unless("qwen3_5")
    model = _tiny("qwen3_5", ["full_attention", "linear_attention", "full_attention", "linear_attention"])
    case = _case(model)
    pipe = {"stages": [{"at": {"decode": 3}, "reducer": "dycoke_dp", "keep": 0.5}]}
    with tp.apply(model, pipe, plugins=case.manager) as run:
        case.generate(case.padded_batch(), 3)
    decoded = [s for f in run.stats.forwards if f.phase == "decode" for s in f.stages]
    assert len(decoded) == 2 and all(s.reducer == "dycoke_dp" and s.leaving < s.entering for s in decoded)


def test_cuts_through_recurrent_layers_read_nothing_from_the_device_per_layer_or_step():
    """The hot path stays host-sync free: tokenprune's reads fall in the stages, none in a later layer or a step."""
    from tokenprune.testing import SyncCounter

    _skip_unless("qwen3_5")
    model = _tiny("qwen3_5", ["full_attention", "linear_attention", "full_attention", "linear_attention"])
    case = _case(model)
    pipe = {
        "stages": [
            {"at": "post_projector", "reducer": "random", "keep": 0.5},
            {"at": {"layer": 2}, "reducer": "random", "keep": 0.5},
        ]
    }
    with tp.apply(model, pipe, plugins=case.manager), SyncCounter(model) as syncs, torch.inference_mode():
        case.generate(case.padded_batch(), 3)
    mine = syncs.select(owner="tokenprune")
    assert syncs.count(owner="tokenprune", phase="decode") == 0, syncs.report(mine)
    assert set(syncs.per_layer(owner="tokenprune", phase="prefill")) <= {None, 1}, syncs.report(mine)


def test_the_default_layer_is_2_where_layer_1_is_attention_else_the_first_after_an_attention_layer():
    from tokenprune.engine.hybrid import default_layer

    assert default_layer(["full_attention"] * 4) == 2
    qwen3_5 = ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 2
    assert default_layer(qwen3_5) == 4
    lfm2 = ["conv", "conv", "full_attention", "conv", "conv", "full_attention"]
    assert default_layer(lfm2) == 3
    assert default_layer(["full_attention", "conv", "conv"]) is None  # layer 0's attention only serves layer: 1
    assert default_layer(["sliding_attention", "sliding_attention", "full_attention"]) == 2
