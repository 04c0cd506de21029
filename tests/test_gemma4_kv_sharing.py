"""Gemma 4 with KV sharing (``num_kv_shared_layers > 0``): the last layers reuse earlier layers' keys and values.

Tiny random Gemma 4 models (tokenprune.testing.tiny_configs) with sharing switched on. transformers'
``modeling_gemma4.py`` (5.18 to 5.25): the last layer of each attention type before the first shared layer
stores the keys and values it attended with (after its cache update) in ``shared_kv_states``; every shared
layer attends with them and keeps no cache; from 5.24 the language model slices its inputs to the last
``logits_to_keep`` positions before the first shared layer (``generate()`` passes 1 in the prefill). The
engine serves every cut: after one past a source layer, each shared layer's keys and values are gathered to
its kept tokens (checked against the stock model with the dropped tokens masked out instead); merges and a
shared layer's own attention are refused there (:mod:`tokenprune.engine.kv_sharing`).
"""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp
import tokenprune.engine.layer_hooks as layer_hooks
from tokenprune.adapters.generic import adapter_for
from tokenprune.engine import compat
from tokenprune.engine.kv_sharing import full_prefill, kv_sharing
from tokenprune.errors import PipelineError
from tokenprune.testing import adapters as checks
from tokenprune.testing.census import model_types
from tokenprune.testing.census_inputs import InputBuilder
from tokenprune.testing.tiny_configs import tiny_config

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif("gemma4" not in model_types(), reason="this transformers release has no gemma4"),
]


def _gemma4(layers: int = 8, shared: int = 4, device: str = "cpu", window: int | None = None) -> torch.nn.Module:
    """Sliding and full layers alternating; the last ``shared`` layers reuse keys and values. With 8 layers
    and 4 shared: layers 2 (sliding) and 3 (full) are the sources of layers 4 and 6 (sliding), 5 and 7 (full)."""
    cfg = tiny_config("gemma4")
    text = cfg.text_config
    text.num_hidden_layers = layers
    text.layer_types = ["sliding_attention", "full_attention"] * (layers // 2)
    text.num_kv_shared_layers = shared
    if window is not None:
        text.sliding_window = window
    torch.manual_seed(0)
    with torch.device(device):
        return compat.model_from_config(cfg).eval()


def _case(model: torch.nn.Module, **layers: int) -> checks.AdapterCase:
    manager = checks.adapter_check_manager()
    make_inputs = InputBuilder(model, adapter_for(model, manager))
    return checks.adapter_case(model, make_inputs, [1, 2, 1], plugins=manager, pad_token_id=make_inputs.pad, **layers)


@pytest.fixture(scope="module")
def case() -> checks.AdapterCase:
    return _case(_gemma4())


def test_the_sharing_is_read_as_transformers_builds_it(case):
    sharing = kv_sharing(case.adapter.text_config(), 8)
    assert sharing is not None and sharing.first_shared == 4 and sharing.earliest_source == 2
    assert dict(sharing.sources) == {"sliding_attention": 2, "full_attention": 3}
    attention = [layer.self_attn for layer in case.adapter.decoder_layers()]
    assert [a.is_kv_shared_layer for a in attention] == [False] * 4 + [True] * 4
    assert [a.store_full_length_kv for a in attention] == [False, False, True, True] + [False] * 4
    assert not hasattr(attention[4], "k_proj")  # a shared layer computes no keys of its own


def test_the_kits_kv_cache_check_leaves_the_shared_layers_out(case):
    """The check kit's ``kv_cache_holds_kept_tokens`` (cut at layer 2): layers 0 to 3 hold their own keys (the
    kept tokens from layer 2 on), shared layers 4 to 7 none (a dummy cache entry, or none before 5.24); counted are the first four."""
    checks.kv_cache_holds_kept_tokens(case)
    gen = case.generate(case.padded_batch(), 2)
    cache = compat.output_cache(gen)
    layers = compat.cache_layers(cache)  # 5.24 on: a dummy entry per shared layer; 5.21: none for them
    assert len(layers) in (4, 8) and all(keys is None for keys, _ in layers[4:])
    assert set(checks.cached_key_lengths(case, cache)) == {0, 1, 2, 3}


def test_engine_invariants_with_a_layer_cut_at_the_earliest_source_layer(case, monkeypatch):
    """The check kit's pipelines cut after the projector and at ``layer: 2`` (the earliest source): keep-all
    identity, cached decoding equals recomputation (both position policies), batch equals one by one, and
    ``remove()`` restores. ``generate()``'s prefill runs the shared layers on the last kept token only (the
    model's slicing, followed by the engine), which the recomputation (every position) checks."""
    tails: list[int] = []
    real = layer_hooks.tail_call
    monkeypatch.setattr(layer_hooks, "tail_call", lambda *a, **k: (tails.append(a[1].shape[1]), real(*a, **k))[1])
    checks.keep_all_is_identity(case)
    checks.cached_decode_equals_recompute(case)
    slices = hasattr(case.adapter.language_model(), "_maybe_slice_kv_shared_inputs")  # from transformers 5.24
    assert set(tails) == ({1} if slices else set())  # generate()'s prefill: shared layers on the last kept token
    checks.cached_decode_equals_recompute(case, positions="compact")
    checks.batch_equals_one_by_one(case)
    checks.remove_restores_model(case)


def _decode_equals_recompute(case: checks.AdapterCase, pipeline: dict, new: int = 3) -> None:
    """Cached ``generate()`` under ``pipeline`` equals one forward without cache on prompt plus output (1e-5)."""
    inputs = case.padded_batch()
    with tp.apply(case.model, pipeline, plugins=case.manager) as run:
        gen = case.generate(inputs, new)
        full = dict(inputs, input_ids=gen.sequences)
        ones = torch.ones_like(gen.sequences[:, -new:])
        full["attention_mask"] = torch.cat([inputs["attention_mask"], ones.to(inputs["attention_mask"].dtype)], 1)
        if "mm_token_type_ids" in full:
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ones)], 1)
        out = case.forward(full, use_cache=False).logits
        assert all(s.leaving < s.entering for s in run.stats.last_prefill.stages if s.entering)
    for j in range(new):
        torch.testing.assert_close(out[:, -new - 1 + j], gen.logits[j], atol=checks.PRUNE_TOLERANCE, rtol=0)


def _batch_equals_one_by_one(case: checks.AdapterCase, pipeline: dict) -> None:
    """Each sample of a padded batch generates what it generates alone (1e-5)."""
    batch = case.make_inputs(case.specs)
    with tp.apply(case.model, pipeline, plugins=case.manager):
        gen = case.generate(batch, 3)
        for i, spec in enumerate(case.specs):
            alone = case.generate(case.make_inputs([spec], start=i), 3)
            assert torch.equal(alone.sequences[0, -3:], gen.sequences[i, -3:])
            for a, b in zip(alone.logits, gen.logits, strict=True):
                torch.testing.assert_close(a[0], b[i], atol=checks.PRUNE_TOLERANCE, rtol=0)


POST_PROJECTOR = {"stages": [{"at": "post_projector", "reducer": "first_k", "keep": 0.75}]}


def test_a_post_projector_cut_serves_a_model_whose_sources_are_its_first_layers():
    """Layers 0 and 1 are the sources: a cut before the language model (every layer holds the kept tokens)."""
    case = _case(_gemma4(layers=4, shared=2))
    _decode_equals_recompute(case, POST_PROJECTOR)
    _batch_equals_one_by_one(case, POST_PROJECTOR)
    keep_all = {"stages": [{"at": "post_projector", "reducer": "check_drop", "keep": 1.0}]}
    inputs = case.padded_batch()
    ref = case.generate(inputs)
    with tp.apply(case.model, keep_all, plugins=case.manager):
        got = case.generate(inputs)
    assert torch.equal(got.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits, strict=True))


def test_a_layer_cut_before_the_sources_and_a_decode_stage_reading_a_shared_layer(case):
    """``layer: 1`` (before both sources) with ``decode: 6``, which reads shared layer 5's attention and leaves
    tokens out of shared layers 6 and 7's: cached decoding after the cut equals recomputation, and each sample of a
    padded batch decodes as it does alone."""
    cut = {"stages": [{"at": {"layer": 1}, "reducer": "first_k", "keep": 0.5}]}
    _decode_equals_recompute(case, cut)
    pipe = {"stages": [*cut["stages"], {"at": {"decode": 6}, "reducer": "dycoke_dp", "keep": 0.5}]}
    _batch_equals_one_by_one(case, pipe)
    with tp.apply(case.model, pipe, plugins=case.manager) as run:
        case.generate(case.padded_batch(), 3)
    decoded = [s for f in run.stats.forwards if f.phase == "decode" for s in f.stages]
    assert len(decoded) == 2 and all(s.reducer == "dycoke_dp" and s.leaving < s.entering for s in decoded)


@pytest.mark.parametrize("k", [3, 4, 6])
def test_a_layer_cut_after_a_source_gathers_the_shared_keys_and_values_to_the_kept_tokens(case, k, monkeypatch):
    """``layer: 3`` cuts between the sources (sliding source 2 holds every token, full source 3 the kept ones),
    ``layer: 4`` before every shared layer, ``layer: 6`` among them (the prefill then runs the shared layers on
    every token): cached decoding equals recomputation and a padded batch decodes as one by one, so the shared
    layers after the cut attended to exactly the kept tokens' keys and values, in the prefill and every step."""
    gathers: list[int] = []
    real = layer_hooks.shared_keys_call
    monkeypatch.setattr(layer_hooks, "shared_keys_call", lambda kw, i, *a: (gathers.append(i), real(kw, i, *a))[1])
    cut = {"stages": [{"at": {"layer": k}, "reducer": "first_k", "keep": 0.5}]}
    _prefill_equals_masked_reference(case, cut, k)
    assert set(gathers) == {i for i in range(4, 8) if i >= k}
    _decode_equals_recompute(case, cut)
    _batch_equals_one_by_one(case, cut)


def _prefill_equals_masked_reference(case: checks.AdapterCase, pipeline: dict, *cuts: int) -> None:
    """The reference, with no gather: the stock model with every token kept and the tokens the ``layer: k``
    stages (at ``cuts``, in order) dropped masked out of the attention of layers ``k`` on (the shared layers'
    included, over their source's keys of every token) gives the pruned run's last logits (1e-5)."""
    inputs = case.padded_batch()
    with tp.apply(case.model, pipeline, plugins=case.manager) as run:
        pruned = case.forward(inputs).logits[:, -1]
    visual = case.visual(inputs)
    entering = [visual[b].nonzero().flatten() for b in range(visual.shape[0])]
    keep, keeps = torch.ones_like(visual), {}
    for k, stage in zip(cuts, run.stats.last_prefill.stages, strict=True):
        keep = keep.clone()
        for b, kept in enumerate(stage.kept):
            keep[b, entering[b]] = False
            entering[b] = entering[b][kept]
            keep[b, entering[b]] = True
        keeps[k] = keep
    assert not keep.all()
    layers = case.adapter.decoder_layers()

    def leave_out(i):
        def hook(module, args, kwargs):
            mask = keeps[max(k for k in keeps if k <= i)]
            kwargs["attention_mask"] = kwargs["attention_mask"] & mask[:, None, None, :]
            return args, kwargs

        return hook

    first = min(cuts)
    handles = [layers[i].register_forward_pre_hook(leave_out(i), with_kwargs=True) for i in range(first, len(layers))]
    try:
        reference = case.forward(inputs).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(pruned, reference, atol=checks.PRUNE_TOLERANCE, rtol=0)


def test_two_layer_cuts_around_a_source(case):
    """``layer: 2`` then ``layer: 3``: sliding source 2 holds the first cut's tokens, the shared layers the
    second's, gathered from the source's own (pruned) columns."""
    stages = [
        {"at": {"layer": 2}, "reducer": "first_k", "keep": 0.75},
        {"at": {"layer": 3}, "reducer": "check_drop", "keep": 0.5},
    ]
    pipe = {"stages": stages}
    _prefill_equals_masked_reference(case, pipe, 2, 3)
    _decode_equals_recompute(case, pipe)
    _batch_equals_one_by_one(case, {"stages": [stages[0], {**stages[1], "reducer": "first_k"}]})


@pytest.mark.parametrize("shared", [0, 4])
@pytest.mark.parametrize("second", [3, 6])
def test_two_layer_cuts_the_first_before_the_first_full_attention_layer(shared, second):
    """``layer: 1`` then ``layer: 3`` or ``6``, with and without KV sharing. The first full-attention layer (1) holds
    the first cut's tokens, and transformers 5.25 sizes the decoding steps' full-attention mask from its cache (earlier
    releases: from layer 0's), so the full-attention layers after the second cut get a mask over neither the unpruned
    cache nor their own: the engine rebuilds it over their own cache (it refused the step before). Cached decoding
    equals recomputation under both position policies (the check kit's), the prefill equals the stock model with the
    dropped tokens masked out, and a padded batch decodes as one by one."""
    case = _case(_gemma4(shared=shared), layer=second, probe_layer=1)
    cuts = (1, second)
    two_cuts = {"stages": [{"at": {"layer": k}, "reducer": "check_drop", "keep": 0.5} for k in cuts]}
    checks.cached_decode_equals_recompute(case, pipeline=two_cuts)
    checks.cached_decode_equals_recompute(case, pipeline=two_cuts, positions="compact")
    _prefill_equals_masked_reference(case, two_cuts, *cuts)
    _batch_equals_one_by_one(case, {"stages": [{**s, "reducer": "first_k"} for s in two_cuts["stages"]]})


def test_an_attention_stage_reading_a_shared_layer(case):
    """FastV at ``layer: 6`` reads shared layer 5's attention (with full source 3's keys) in the prefill: each
    sample of a padded batch keeps and decodes what it does alone. (Its last-row scores differ between a
    prefill and a recomputation with the output appended, so that check does not apply.)"""
    fastv = {"stages": [{"at": {"layer": 6}, "reducer": "fastv", "keep": 0.5}]}
    _batch_equals_one_by_one(case, fastv)
    with tp.apply(case.model, fastv, plugins=case.manager) as run:
        case.generate(case.padded_batch(), 2)
    (stage,) = run.stats.last_prefill.stages
    assert stage.reducer == "fastv" and all(
        out < into for out, into in zip(stage.leaving, stage.entering, strict=True) if into
    )


@pytest.mark.parametrize(
    ("k", "reducer", "why"),
    [
        (3, "sparsevlm", "it may merge tokens, and a merged token has no keys and values in the source layer"),
        (5, "pdrop", "it reads layer 5's own attention, and layer 5 computes no keys of its own"),
    ],
)
def test_what_kv_sharing_cannot_follow_is_refused_naming_the_usable_layers(case, k, reducer, why):
    pipe = {"stages": [{"at": {"layer": k}, "reducer": reducer, "keep": 0.5}]}
    expected = (
        rf"shares keys and values \(layers 4 to 7 attend with the keys and values of layer 2 \(sliding_attention\), "
        rf"layer 3 \(full_attention\)\) and {why}; put the stage at layer: k for k in 1\.\.2"
    )
    with pytest.raises(PipelineError, match=expected):
        tp.apply(case.model, pipe)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in case.model.modules())


def test_a_layer_cut_where_the_first_layers_are_the_sources():
    """Layers 0 and 1 are the sources: ``layer: 1`` gathers sliding source 0's keys for shared layer 2."""
    case = _case(_gemma4(layers=4, shared=2))
    cut = {"stages": [{"at": {"layer": 1}, "reducer": "first_k", "keep": 0.5}]}
    _decode_equals_recompute(case, cut)
    _batch_equals_one_by_one(case, cut)


def test_the_shared_layers_run_on_every_token_where_the_last_columns_may_be_cut():
    """``generate()``'s ``logits_to_keep=1`` is kept where the language model's last column is text in every
    sample (no cut drops it), and set to 0 where it is visual or a channel reads a shared layer."""
    text_last = torch.tensor([[True, False], [False, False]])
    visual_last = torch.tensor([[False, False], [True, True]])
    for visual, always, expected in [(text_last, False, 1), (visual_last, False, 0), (text_last, True, 0)]:
        kw = {"logits_to_keep": 1}
        assert full_prefill(kw, visual, always=always) == (expected == 0)
        assert kw["logits_to_keep"] == expected
    kw = {"logits_to_keep": 0}
    assert not full_prefill(kw, visual_last, always=True) and kw["logits_to_keep"] == 0


def test_a_model_whose_every_layer_reuses_keys_and_values_is_refused():
    """A Gemma 4 assistant's layers all reuse the keys and values of the target model it drafts for."""
    with torch.device("meta"):
        model = _gemma4(layers=4, shared=4)
    with pytest.raises(tp.UnsupportedModelError, match=r"num_kv_shared_layers=4 of 4 layers\): they come from another"):
        tp.apply(model, {"stages": [{"at": "post_projector", "reducer": "random", "keep": 0.5}]})


def test_decoding_past_a_sliding_window_after_a_cut_is_refused_as_without_sharing():
    """The engine's sliding-window caveat (decoding after a layer cut while prompt and output fit the window)
    holds for a cut after a sliding source too: a clear error, not misaligned keys."""
    case = _case(_gemma4(window=8))
    cut = {"stages": [{"at": {"layer": 3}, "reducer": "first_k", "keep": 0.5}]}
    with tp.apply(case.model, cut, plugins=case.manager):
        with pytest.raises(
            tp.TokenpruneError, match="sliding_attention layer whose cache and mask keep only its window"
        ):
            case.generate(case.padded_batch(), 3)


@pytest.mark.parametrize("k", [2, 4])
def test_kv_sharing_reads_nothing_from_the_device_per_layer_or_step(case, k):
    """The gather and the sliced prefill's arguments stay host-sync free: tokenprune's reads fall in the stages
    (and the one read of the language model's last columns per prefill), none in a later layer or a step."""
    from tokenprune.testing import SyncCounter

    pipe = {
        "stages": [
            {"at": "post_projector", "reducer": "random", "keep": 0.5},
            {"at": {"layer": k}, "reducer": "random", "keep": 0.5},
        ]
    }
    with tp.apply(case.model, pipe, plugins=case.manager), SyncCounter(case.model) as syncs, torch.inference_mode():
        case.generate(case.padded_batch(), 3)
    mine = syncs.select(owner="tokenprune")
    assert syncs.count(owner="tokenprune", phase="decode") == 0, syncs.report(mine)
    assert set(syncs.per_layer(owner="tokenprune", phase="prefill")) <= {None, k - 1}, syncs.report(mine)


def test_flops_of_shared_layers_agree_analytic_and_torch(case):
    """A shared layer has no key or value projection and attends to as many keys as it holds tokens (gathered
    after a cut at layer 3). fvcore cannot trace a Gemma 4 decoder layer, shared or not (its per-layer input)."""
    from tokenprune.cost.analytic import DecoderShape
    from tokenprune.cost.flops import count_flops

    shape = DecoderShape.from_model(case.model)
    assert shape.k_proj_macs[4:] == (0,) * 4 and all(shape.k_proj_macs[:4])
    inputs = case.make_inputs([case.specs[0]])
    cut = {
        "stages": [
            {"at": "post_projector", "reducer": "random", "keep": 0.5},
            {"at": {"layer": 3}, "reducer": "random", "keep": 0.5},
        ]
    }
    base, pruned = count_flops(case.model, inputs), count_flops(case.model, inputs, cut)
    for report in (base, pruned):
        assert all(row.analytic == row.torch for row in report.layers)
        assert report.language_model["analytic"] == report.language_model["torch"]
    assert pruned.layers[4].tokens[0] < pruned.layers[2].tokens[0] < base.layers[2].tokens[0]


def test_a_merge_after_a_source_at_layer_0_names_the_language_model_input():
    with torch.device("meta"):
        model = _gemma4(layers=4, shared=2)
    pipe = {"stages": [{"at": {"layer": 1}, "reducer": "sparsevlm", "keep": 0.5}]}
    with pytest.raises(PipelineError, match=r"may merge tokens.*before the language model \(layer 0 is a source"):
        tp.apply(model, pipe)
