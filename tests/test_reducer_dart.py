"""DART: pivots by key L1 norm, then each pivot's least similar tokens; matches the official algorithm.

The reference re-implements the official ``get_retained_image_token`` (DART's
``modeling_llama_self.py``) with its sets and loops, on one unpadded sample as the official code runs:
layer ``K - 1``'s keys captured from the eager attention function, its output from
``output_hidden_states`` passed through the final norm; pivots visited in ascending sequence order
(the official Python set order is undefined).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from engine_fixtures import BATCH_SPECS, forward, pipe
from tokenprune_dart import DART
from transformers.models.llama import modeling_llama
from transformers.models.qwen2_vl import modeling_qwen2_vl

import tokenprune as tp
from tokenprune import InsertionPoint, PipelineError, ReducerInputError
from tokenprune.testing import check_reducer, make_reduce_inputs


def official(last_layer_state, key_states, start, length, pivot_image, pivot_text, topk):
    """The official selection, written out (``last_layer_state`` already final-normed; batch of one)."""
    k = key_states.permute(0, 2, 1, 3).reshape(key_states.shape[0], key_states.shape[2], -1)
    image_l1 = torch.norm(k[0][start : start + length], p=1, dim=-1)
    query_l1 = torch.norm(k[0][start + length :], p=1, dim=-1)
    image_indices = (image_l1.topk(pivot_image).indices + start).tolist()
    query_indices = (query_l1.topk(pivot_text).indices + start + length).tolist()
    indices = set(image_indices + query_indices)
    valid = set(range(start, start + length)) - set(image_indices)
    for item in sorted(indices):  # deterministic pivot order: ascending sequence position
        valid_list = sorted(valid)
        cos = -F.cosine_similarity(last_layer_state[0][item, :], last_layer_state[0][valid_list, :], dim=-1)
        picked = [valid_list[i] for i in cos.topk(topk).indices.tolist()]
        indices.update(picked)
        valid.difference_update(picked)
    indices.difference_update(query_indices)
    return sorted(i - start for i in indices)


def test_selection_on_synthetic_inputs_matches_the_official_loop():
    """Pivots by key L1 norm, text pivots only after the image, equal shares, least similar first."""
    tokens, ctx = make_reduce_inputs(
        grids=[(4, 5)], keep=10, at=InsertionPoint("layer", 2), signals=["keys", "final_norm"], newlines=False
    )
    kept = DART({"pivot_image_tokens": 2, "pivot_text_tokens": 2}).reduce(tokens, ctx).tolist()[0]
    n = 20
    hidden = torch.cat([tokens[0], ctx.text[0]])[None]  # the image first, then 5 text tokens
    keys = torch.cat([ctx.keys[0], ctx.text_keys[0]])[None, None]  # (1, 1, L, Dk)
    expected = official(ctx.final_norm(hidden), keys, 0, n, 2, 2, (10 - 2) // 4)
    assert len(kept) == 10 and kept == expected


def test_budget_is_exact_and_remainders_go_to_the_first_pivots():
    tokens, ctx = make_reduce_inputs(
        grids=[(4, 5)], keep=11, at=InsertionPoint("layer", 2), signals=["keys", "final_norm"]
    )
    assert DART().reduce(tokens, ctx).counts.tolist() == ctx.budget.tolist()
    small = replace(ctx, budget=torch.tensor([2]))  # fewer than the visual pivots: the top-L1 visual tokens
    protected = ctx.protected[0].nonzero().squeeze(1).tolist()
    kept = DART().reduce(tokens, small).tolist()[0]
    assert set(protected) <= set(kept) and len(kept) == max(2, len(protected))


def test_text_pivots_only_after_the_last_visual_token():
    tokens, ctx = make_reduce_inputs(
        grids=[(3, 3)], keep=5, at=InsertionPoint("layer", 2), signals=["keys", "final_norm"], newlines=False
    )
    before = replace(ctx, text_columns=ctx.text_columns - 100)  # every text token before the image
    alone = DART({"pivot_text_tokens": 0}).reduce(tokens, ctx).tolist()
    assert DART().reduce(tokens, before).tolist() == alone  # no text pivot qualifies: the same as none


def test_missing_signals_and_bad_input_are_clear_errors():
    tokens, ctx = make_reduce_inputs(at=InsertionPoint("layer", 2), signals=["keys", "final_norm"])
    with pytest.raises(ReducerInputError, match=r"'dart'.*keys or final norm"):
        DART().reduce(tokens, replace(ctx, keys=None))
    bad = tokens.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ReducerInputError, match=r"'dart'.*NaN"):
        DART().reduce(bad, ctx)
    with pytest.raises(PipelineError, match=r"dart"):
        tp.load_pipeline({"stages": [{"at": "post_projector", "reducer": "dart", "keep": 0.5}]})
    with pytest.raises(PipelineError, match=r"pivot_image_tokens"):
        tp.load_pipeline(
            {"stages": [{"at": {"layer": 2}, "reducer": "dart", "keep": 9, "params": {"pivot_image_tokens": -1}}]}
        )


@pytest.mark.parametrize("params", [{}, {"pivot_text_tokens": 0}, {"pivot_image_tokens": 1, "pivot_text_tokens": 1}])
def test_contract(params):
    check_reducer(DART, params)


# --- end to end on tiny models -------------------------------------------------------------------

EAGER = {"llava_next": modeling_llama, "qwen2_vl": modeling_qwen2_vl}


@pytest.fixture(scope="module", params=["llava_next", "qwen2_vl"])
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


def reference_sample(tiny, eager, inputs, layer, pivots, keep, monkeypatch):
    """The official selection for one unpadded sample, from the eager model's keys and hidden states."""
    captured = {}
    real = EAGER[tiny.name].eager_attention_forward
    target = eager.model.language_model.layers[layer - 1].self_attn

    def capture(module, query, key, value, attention_mask, **kw):
        if module is target:
            captured["k"] = key
        return real(module, query, key, value, attention_mask, **kw)

    monkeypatch.setattr(EAGER[tiny.name], "eager_attention_forward", capture)
    out = forward(eager, inputs, tiny.name, output_hidden_states=True)
    monkeypatch.setattr(EAGER[tiny.name], "eager_attention_forward", real)
    visual = (inputs["input_ids"][0] == tiny.model.config.image_token_id).nonzero().squeeze(1)
    start, length = int(visual[0]), len(visual)
    assert visual.tolist() == list(range(start, start + length))  # one contiguous image, as the official code assumes
    lm = eager.model.language_model
    with torch.no_grad():
        normed = lm.norm(out.hidden_states[layer])
    topk = (keep - pivots[0]) // sum(pivots)
    return official(normed, captured["k"], start, length, pivots[0], pivots[1], topk)


@pytest.mark.slow
def test_keeps_what_the_official_algorithm_keeps(tiny, monkeypatch):
    """Under sdpa in a padded batch, each sample keeps exactly the official selection (computed alone, eager)."""
    pivots, keep = ((4, 4), 20) if tiny.name == "llava_next" else ((1, 1), 3)  # budgets of the form p + P * m
    params = {"pivot_image_tokens": pivots[0], "pivot_text_tokens": pivots[1]}
    specs = BATCH_SPECS[tiny.name]
    batch = tiny.make_inputs(specs)
    with tp.apply(tiny.model, pipe(({"layer": 2}, "dart", keep, params), protect_newlines=False)) as run:
        forward(tiny.model, batch, tiny.name)
        kept = run.stats.last_prefill.stages[0].kept
    eager = copy.deepcopy(tiny.model)
    eager.set_attn_implementation("eager")
    for i, spec in enumerate(specs):
        alone = tiny.make_inputs([spec], start=i)
        assert kept[i] == reference_sample(tiny, eager, alone, 2, pivots, keep, monkeypatch), f"sample {i}"


@pytest.mark.slow
@pytest.mark.parametrize("stages", ["dart", "dart_then_pdrop"])
def test_batched_equals_one_by_one(tiny, stages):
    specs = BATCH_SPECS[tiny.name]
    batch = tiny.make_inputs(specs)
    pipeline = pipe(({"layer": 2}, "dart", 0.5))
    if stages == "dart_then_pdrop":
        pipeline = pipe(({"layer": 1}, "pdrop", 0.7), ({"layer": 2}, "dart", 0.5), ({"layer": 2}, "pdrop", 0.6))
    with tp.apply(tiny.model, pipeline) as run:
        logits = forward(tiny.model, batch, tiny.name).logits
        stages_batched = run.stats.last_prefill.stages
        assert len(set(stages_batched[0].entering)) > 1
        for i, spec in enumerate(specs):
            alone_logits = forward(tiny.model, tiny.make_inputs([spec], start=i), tiny.name).logits
            for s_batch, s_alone in zip(stages_batched, run.stats.last_prefill.stages, strict=True):
                assert s_alone.kept[0] == s_batch.kept[i]
            torch.testing.assert_close(alone_logits[0, -1], logits[i, -1], atol=1e-4, rtol=0)
