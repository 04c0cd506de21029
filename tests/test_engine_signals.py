"""The layer-stage signals the engine serves on request: own-layer attention, keys, final norm, columns."""

from __future__ import annotations

import pytest
import tiny_models as tm
from engine_fixtures import BATCH_SPECS, forward, pipe

import tokenprune as tp
from tokenprune.engine import compat
from tokenprune.engine import probe as probe_module

SEEN: list[tp.ReduceContext] = []


class SignalSpy(tp.TokenReducer):
    name = "signal_spy"
    capabilities = tp.Capabilities(
        insertion_points=frozenset({"layer"}),
        own_attention=frozenset({"last"}),
        signals=frozenset({"keys", "final_norm"}),
        needs_text=True,
    )

    def reduce(self, tokens, ctx):
        SEEN.append(ctx)
        return tp.Selection.all(ctx.valid)


class SpyPlugin:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry):
        registry.add(SignalSpy)


@pytest.mark.parametrize("name", ["llava_next", "qwen2_vl"])
def test_signals_are_served_for_every_column(name):
    tiny = tm.BUILDERS[name]()
    batch = tiny.make_inputs(BATCH_SPECS[name])
    SEEN.clear()
    manager = tp.get_plugin_manager(plugins=[SpyPlugin()])
    with tp.apply(tiny.model, pipe(({"layer": 2}, "signal_spy", 1.0)), plugins=manager) as run:
        forward(tiny.model, batch, name)
        assert run._forwards.probe.keys == {1} and run._forwards.probe.own == {2: {"last"}}
    ctx = SEEN[-1]
    cfg = tiny.model.config.get_text_config()
    dk = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert ctx.keys.shape == (*ctx.valid.shape, dk) and ctx.text_keys.shape[-1] == dk
    assert ctx.final_norm is tiny.model.model.language_model.norm
    real = batch["attention_mask"].bool()
    visual = batch["input_ids"] == tiny.model.config.image_token_id
    for b in range(ctx.batch_size):
        cols = ctx.columns[b][ctx.valid[b]].tolist()
        text_cols = ctx.text_columns[b][ctx.text_valid[b]].tolist()
        assert cols == (visual[b] & real[b]).nonzero().squeeze(1).tolist()
        assert text_cols == (~visual[b] & real[b]).nonzero().squeeze(1).tolist()
        own = ctx.own_attention["last"][b]
        assert bool((own[ctx.valid[b]] > 0).all()) and float(own.sum()) < 1.0
    assert not probe_module._TARGETS and not compat.attention_users()
