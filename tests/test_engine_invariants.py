"""The six engine invariants of issue 3, on tiny random models of every adapter.

1. keep-all is identity; 2. cached decoding equals no-cache recompute; 3. KV cache sizes;
4. remove() restores the model; 5. batch equals one by one (ragged keep counts); 6. the attention
probe matches eager attention while the model runs sdpa.

The checks themselves live in :mod:`tokenprune.testing.adapters`, so a third-party adapter is
tested exactly as the built-ins are; this module parametrizes its ``INVARIANTS`` and ``ADAPTER_CHECKS``
(the tuples ``check_adapter`` runs) over the built-in tiny models.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
from engine_fixtures import ADAPTERS, BATCH_SPECS, forward, pipe

import tokenprune as tp
from tokenprune.testing import adapters as ta

# Ids generate must not produce: the image placeholder and Qwen's video / vision start / end ids.
SUPPRESS = [4, 5, 6, 7]


@pytest.fixture(scope="module", params=ADAPTERS)
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


@pytest.fixture(scope="module")
def checks() -> tp.plugins.PluginManager:
    return ta.adapter_check_manager()


@pytest.fixture(scope="module")
def case(tiny: tm.Tiny, checks: tp.plugins.PluginManager) -> ta.AdapterCase:
    """The adapter case, built once per adapter and shared by every check."""
    # Generated tokens' token_type_ids: PaliGemma's causal suffix (1), Gemma3's text (0).
    fill = 1 if tiny.name == "paligemma" else 0
    return ta.adapter_case(
        tiny.model,
        tiny.make_inputs,
        BATCH_SPECS[tiny.name],
        plugins=checks,
        pad_token_id=0,
        suppress_tokens=SUPPRESS,
        generated_token_type_id=fill,
    )


@pytest.mark.parametrize("check", [*ta.INVARIANTS, *ta.ADAPTER_CHECKS], ids=lambda check: check.name)
def test_check(case, check):
    """Every check of check_adapter (the engine's invariants, then the adapter's own), from one tuple."""
    check.run(case)


def test_probe_only_at_needed_layers(tiny, plugins):
    """The probe records only at layer k - 1 of the stages that need it."""
    specs = BATCH_SPECS[tiny.name]
    inputs = tiny.make_inputs([specs[0], specs[1], None])
    with tp.apply(tiny.model, pipe(({"layer": 3}, "probe_recorder", 0.5)), plugins=plugins) as run:
        forward(tiny.model, inputs, tiny.name)
        assert set(run._forwards.probe.scores) == {2}
        assert tiny.model.config.get_text_config()._attn_implementation.startswith("tokenprune_probe")


def test_the_kit_needs_no_built_in_reducer(monkeypatch):
    """A third-party adapter author may disable any plugin: the checks bring their own reducers."""
    monkeypatch.setenv("TOKENPRUNE_DISABLE_PLUGINS", "random,fastv,gprune,tome,l2norm,downsample,atp")
    checks = ta.adapter_check_manager()
    assert "random" not in checks.reducers and "check_drop" in checks.reducers
    tiny = tm.llava_next()
    ta.check_adapter(tiny.model, tiny.make_inputs, BATCH_SPECS["llava_next"], plugins=checks, suppress_tokens=SUPPRESS)


def test_every_built_in_adapter_is_tested():
    """Every model type the built-in adapter plugin registers is tested: by ADAPTERS (the parametrisation above,
    on tiny_models), or by tests/test_families.py (the families of issue 32 on their census models, with the
    adapter named in its DEDICATED)."""
    from test_families import DEDICATED

    built_in = set(tp.get_plugin_manager().adapters.provided_by("adapters"))
    assert len(built_in) >= 9
    assert set(ADAPTERS) == set(BATCH_SPECS) and set(ADAPTERS) <= built_in and set(ADAPTERS) <= set(tm.BUILDERS)
    assert built_in - set(ADAPTERS) == set(DEDICATED) - set(ADAPTERS)
