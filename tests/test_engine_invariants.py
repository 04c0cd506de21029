"""The six engine invariants of issue 3, on tiny random models of every adapter.

1. keep-all is identity; 2. cached decoding equals no-cache recompute; 3. KV cache sizes;
4. remove() restores the model; 5. batch equals one by one (ragged keep counts); 6. the attention
probe matches eager attention while the model runs sdpa.

The checks themselves live in :mod:`tokenprune.testing_adapters`, so a third-party adapter is
tested exactly as the built-ins are; this module parametrizes them over the built-in tiny models.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
from engine_fixtures import ADAPTERS, BATCH_SPECS, forward, pipe

import tokenprune as tp
from tokenprune import testing_adapters as ta

# Ids generate must not produce: the image placeholder and Qwen's video / vision start / end ids.
SUPPRESS = [4, 5, 6, 7]


@pytest.fixture(scope="module", params=ADAPTERS)
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


@pytest.fixture(scope="module")
def checks() -> tp.plugins.PluginManager:
    return ta.adapter_check_manager()


def _args(tiny: tm.Tiny, checks: tp.plugins.PluginManager) -> tuple[tuple, dict]:
    return (tiny.model, tiny.make_inputs, BATCH_SPECS[tiny.name]), {
        "plugins": checks,
        "pad_token_id": 0,
        "suppress_tokens": SUPPRESS,
    }


def test_keep_all_is_identity(tiny, checks):
    """Invariant 1: a keep-all pipeline gives bit-identical logits and generations (batch 3, padding)."""
    args, kw = _args(tiny, checks)
    ta.check_keep_all_is_identity(*args, **kw)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_cached_decode_equals_recompute(tiny, checks, positions):
    """Invariant 2: cached decoding after a pruned prefill equals a no-cache recompute (1e-5)."""
    args, kw = _args(tiny, checks)
    # Generated tokens' token_type_ids: PaliGemma's causal suffix (1), Gemma3's text (0).
    fill = 1 if tiny.name == "paligemma" else 0
    ta.check_cached_decode_equals_recompute(*args, positions=positions, generated_token_type_id=fill, **kw)


def test_kv_cache_holds_kept_tokens(tiny, checks):
    """Invariant 3: every layer's cache holds exactly the tokens the pipeline keeps there."""
    args, kw = _args(tiny, checks)
    ta.check_kv_cache_holds_kept_tokens(*args, **kw)


def test_remove_restores_model(tiny, checks):
    """Invariant 4: after remove(), outputs and state_dict are bit-identical and no hook is left."""
    args, kw = _args(tiny, checks)
    ta.check_remove_restores_model(*args, **kw)


def test_batch_equals_one_by_one(tiny, checks):
    """Invariant 5: images of different sizes, per-sample keep counts (an adaptive reducer, then a
    fraction at layer 2); each sample gets the same tokens and logits (1e-5) as when run alone."""
    args, kw = _args(tiny, checks)
    ta.check_batch_equals_one_by_one(*args, **kw)


def test_probe_matches_eager_attention(tiny, checks):
    """Invariant 6: probe scores equal eager attention weights (1e-6) while the model ran sdpa."""
    args, kw = _args(tiny, checks)
    ta.check_probe_matches_eager_attention(*args, **kw)


def test_probe_only_at_needed_layers(tiny, plugins):
    """The probe records only at layer k - 1 of the stages that need it."""
    specs = BATCH_SPECS[tiny.name]
    inputs = tiny.make_inputs([specs[0], specs[1], None])
    with tp.apply(tiny.model, pipe(({"layer": 3}, "probe_recorder", 0.5)), plugins=plugins) as run:
        forward(tiny.model, inputs, tiny.name)
        assert set(run._forwards.probe.scores) == {2}
        assert tiny.model.config.get_text_config()._attn_implementation.startswith("tokenprune_probe")


def test_rotary_matches_model(tiny, checks):
    """Not an engine invariant: each adapter's rotary() gives the model's own position embeddings."""
    args, kw = _args(tiny, checks)
    ta.check_rotary_matches_model(*args, **kw)


def test_layout_covers_visual_tokens(tiny, checks):
    """Not an engine invariant: each adapter's layouts align with its visual tokens."""
    args, kw = _args(tiny, checks)
    ta.check_layout_covers_visual_tokens(*args, **kw)


def test_the_kit_needs_no_built_in_reducer(monkeypatch):
    """A third-party adapter author may disable any plugin: the checks bring their own reducers."""
    monkeypatch.setenv("TOKENPRUNE_DISABLE_PLUGINS", "random,fastv,gprune,tome,l2norm,downsample,atp")
    checks = ta.adapter_check_manager()
    assert "random" not in checks.reducers and "check_drop" in checks.reducers
    tiny = tm.llava_next()
    ta.check_adapter(tiny.model, tiny.make_inputs, BATCH_SPECS["llava_next"], plugins=checks, suppress_tokens=SUPPRESS)


def test_every_built_in_adapter_is_tested():
    """ADAPTERS (the parametrisation above) covers every model type the built-in adapter plugin registers."""
    built_in = set(tp.get_plugin_manager().adapters.provided_by("adapters"))
    assert len(built_in) >= 9
    assert built_in == set(ADAPTERS) == set(BATCH_SPECS) and built_in <= set(tm.BUILDERS)
