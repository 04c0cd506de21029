"""The vision probe: sdpa unchanged, scores equal eager attention, the adapters' patch-to-token maps, errors."""

from __future__ import annotations

import sys

import pytest
import tiny_models
import torch

import tokenprune as tp
from tokenprune.engine import compat
from tokenprune.engine.run_stats import RunStats
from tokenprune.engine.vision_probe import VisionProbe
from tokenprune.errors import TokenpruneError
from tokenprune.testing.adapters import adapter_case, vision_patches_map_to_tokens

SPECS = {
    "llava": [(56, 56), (56, 56), (56, 56)],
    "llava_next": [(56, 84), (100, 56), (56, 56)],
    "qwen2_vl": [(56, 84), (100, 56), (56, 56)],
}


def _manager() -> tp.plugins.PluginManager:
    """The installed plugins: fastervlm is registered through its entry point like every built-in."""
    return tp.plugins.get_plugin_manager()


@pytest.fixture(scope="module", params=sorted(SPECS))
def tiny(request):
    return request.param, getattr(tiny_models, request.param)()


def _tower_modules(model):
    adapter = _manager().adapters.get(model.config.model_type)(model)
    tower = adapter.vision_tower()
    return adapter, tower, [compat.vision_attention_module(layer) for layer in tower.layers]


def _eager_weights(model, inputs, modules):
    """Eager attention weights of every tower attention module: one ``(B, H, S, S)`` entry per call."""
    seen: dict[int, list[torch.Tensor]] = {}
    configs = {id(m.config): m.config for m in modules}
    swapped = [(c, compat.swap_attention_implementation(c, "eager")) for c in configs.values()]
    module = sys.modules[type(modules[0]).__module__]
    stock = module.eager_attention_forward

    def capture(mod, *args, **kwargs):
        out, weights = stock(mod, *args, **kwargs)
        if mod in modules:
            seen.setdefault(modules.index(mod), []).append(weights.detach().float())
        return out, weights

    module.eager_attention_forward = capture
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        module.eager_attention_forward = stock
        for c, v in swapped:
            compat.restore_attention_implementation(c, v)
    return seen


@pytest.mark.parametrize("kind", ["cls", "mean"])
def test_probe_scores_equal_eager_attention(tiny, kind):
    name, t = tiny
    _, tower, modules = _tower_modules(t.model)
    if kind == "cls" and not tower.has_cls:
        pytest.skip("no CLS token")
    inputs = t.make_inputs([SPECS[name][0], SPECS[name][1], None])
    layer = tower.feature_layer
    probe = VisionProbe(tower, {layer: (frozenset({kind}), False, False)})
    probe.install()
    try:
        probe.reset(active=True)
        with torch.no_grad():
            t.model(**inputs)
        got = probe.records[layer].scores[kind]
    finally:
        probe.remove()
    weights = (
        torch.cat([w.mean(1) for w in _eager_weights(t.model, inputs, modules)[layer]]) if name != "qwen2_vl" else None
    )
    if weights is None:  # one call per image, each (1, H, S_i, S_i)
        per = _eager_weights(t.model, inputs, modules)[layer]
        expected = [w.mean(1)[0].mean(0) for w in per]
    elif kind == "cls":
        expected = list(weights[:, 0])
    else:
        start = 1 if tower.has_cls else 0
        expected = list(weights[:, start:].mean(1))
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


def probe_under_sdpa(model, inputs, manager) -> RunStats:
    """Run a keep-all FasterVLM stage with stock sdpa spied on; check that every tower layer ran sdpa, that its
    attention implementation is restored afterwards and that the logits equal the unprobed model's."""
    _, tower, modules = _tower_modules(model)
    with torch.no_grad():
        plain = model(**inputs).logits
    calls: list[object] = []
    sdpa = compat.sdpa_module()
    stock = sdpa.sdpa_attention_forward

    def spy(module, *args, **kwargs):
        calls.append(module)
        return stock(module, *args, **kwargs)

    kind = "cls" if tower.has_cls else "mean"
    pipe = {"stages": [{"at": "post_projector", "reducer": "fastervlm", "keep": 1.0, "params": {"attention": kind}}]}
    sdpa.sdpa_attention_forward = spy
    try:
        with tp.apply(model, pipe, plugins=manager) as run:
            assert {compat.attention_implementation(m.config) for m in modules} == {"tokenprune_vision_sdpa"}
            with torch.no_grad():
                probed = model(**inputs).logits
    finally:
        sdpa.sdpa_attention_forward = stock
    assert all(m in calls for m in modules)  # every tower layer ran stock sdpa
    assert {compat.attention_implementation(m.config) for m in modules} == {"sdpa"}
    assert "tokenprune_vision_sdpa" not in compat.attention_users()
    assert torch.equal(plain, probed)
    return run.stats


def test_probe_runs_under_sdpa_and_leaves_the_tower_unchanged(tiny):
    name, t = tiny
    stats = probe_under_sdpa(t.model, t.make_inputs([SPECS[name][0], SPECS[name][1], None]), _manager())
    assert stats.last_prefill.stages[0].overhead_macs > 0


def test_vision_patches_map_to_tokens(tiny):
    name, t = tiny
    vision_patches_map_to_tokens(adapter_case(t.model, t.make_inputs, SPECS[name]))


def test_cls_on_a_tower_without_cls_names_the_tower_and_suggests_mean():
    t = tiny_models.qwen2_vl()
    pipe = {"stages": [{"at": "post_projector", "reducer": "fastervlm", "keep": 0.5}]}
    with pytest.raises(TokenpruneError, match=r"Qwen2VisionTransformer.*no CLS token.*'mean'"):
        tp.apply(t.model, pipe, plugins=_manager())


def test_a_vision_layer_the_tower_lacks_is_refused():
    t = tiny_models.llava()
    pipe = {"stages": [{"at": "post_projector", "reducer": "fastervlm", "keep": 0.5, "params": {"layer": 7}}]}
    with pytest.raises(TokenpruneError, match=r"stage 0 \(fastervlm\): vision layer 7 does not exist.*2 encoder"):
        tp.apply(t.model, pipe, plugins=_manager())


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_5_vl"])
def test_more_families_map_vision_patches_to_tokens(name):
    t = getattr(tiny_models, name)()
    vision_patches_map_to_tokens(adapter_case(t.model, t.make_inputs, [(56, 84), (100, 56), (56, 56)]))
