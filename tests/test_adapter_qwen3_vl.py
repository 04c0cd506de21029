"""Qwen3-VL's DeepStack under pruning, against a hand-written reference of the pruned model.

The engine invariants (``test_engine_invariants.py``) show keep-all identity, cached == recompute and
batch == one by one for ``qwen3_vl`` and ``qwen3_vl_moe``; they compare the engine with itself. Here the
pruned model is computed independently: the language model's layers are called one by one on the kept
tokens, with each DeepStack tensor cut (or averaged, for a merge) to the kept visual tokens and added
with the model's own ``_deepstack_process``, and the engine's logits must match it.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from engine_fixtures import TestReducers, pipe

import tokenprune as tp
from tokenprune.testing.adapters import adapter_check_manager

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_vl_moe"])
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


@pytest.fixture(scope="module")
def plugins() -> tp.plugins.PluginManager:
    return adapter_check_manager(TestReducers())


def _lm_call(model: torch.nn.Module, inputs: dict) -> dict:
    """The keyword arguments the unmodified language model receives."""
    seen: dict = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen


def _reference(
    model: torch.nn.Module, call: dict, cut_before: int, keep: list[int], merge: bool = False
) -> torch.Tensor:
    """Logits of the model with only ``keep`` (visual ranks) of the visual tokens, cut before layer ``cut_before``.

    ``merge``: instead of dropping, each odd visual rank is averaged into the even rank before it
    (tokens and DeepStack features alike), and ``keep`` is ignored.
    """
    lm = model.model.language_model
    hidden, pos = call["inputs_embeds"], call["position_ids"]
    mask, feats = call["visual_pos_masks"], list(call["deepstack_visual_embeds"])
    vis_cols = mask[0].nonzero().squeeze(1).tolist()
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i == cut_before:
                if merge:
                    hidden, feats = _merge_pairs(hidden, feats, vis_cols)
                    keep = list(range(0, len(vis_cols), 2))
                cols = [c for c in range(hidden.shape[1]) if c not in vis_cols or vis_cols.index(c) in keep]
                hidden, pos, mask = hidden[:, cols], pos[..., cols], mask[:, cols]
                feats = [f[keep] for f in feats]
            hidden = layer(hidden, position_embeddings=lm.rotary_emb(hidden, pos), attention_mask=None)
            if i < len(feats):
                hidden = lm._deepstack_process(hidden, mask, feats[i])
        return model.lm_head(lm.norm(hidden))


def _merge_pairs(hidden: torch.Tensor, feats: list[torch.Tensor], vis_cols: list[int]) -> tuple:
    """Average visual rank ``2j + 1`` into ``2j``, in the hidden states and every DeepStack tensor."""
    hidden, feats = hidden.clone(), [f.clone() for f in feats]
    for j in range(0, len(vis_cols) - 1, 2):
        a, b = vis_cols[j], vis_cols[j + 1]
        hidden[0, a] = ((hidden[0, a].float() + hidden[0, b].float()) / 2).to(hidden.dtype)
        for f in feats:
            f[j] = ((f[j].float() + f[j + 1].float()) / 2).to(f.dtype)
    return hidden, feats


def _engine(model: torch.nn.Module, inputs: dict, pipeline: dict, plugins: tp.plugins.PluginManager) -> tuple:
    with tp.apply(model, pipeline, plugins=plugins) as run, torch.no_grad():
        logits = model(**inputs).logits
    return logits, run.stats.forwards[0].stages


@pytest.mark.parametrize("at", ["post_projector", {"layer": 1}, {"layer": 2}, {"layer": 3}])
def test_a_stage_cuts_the_deepstack_features_like_the_tokens(tiny, plugins, at):
    """Post-projector, and layer stages before, at and after the last DeepStack layer (2), match the reference."""
    inputs = tiny.make_inputs([(112, 112)])
    call = _lm_call(tiny.model, inputs)
    assert len(call["deepstack_visual_embeds"]) == len(tm.QWEN3_DEEPSTACK)
    logits, stages = _engine(tiny.model, inputs, pipe((at, "check_drop", 0.5)), plugins)
    keep = stages[0].kept[0]
    assert 0 < len(keep) < int(call["visual_pos_masks"].sum())
    cut = 0 if at == "post_projector" else at["layer"]
    torch.testing.assert_close(logits, _reference(tiny.model, call, cut, keep), atol=1e-5, rtol=0)


def test_a_merge_averages_the_deepstack_features_like_the_tokens(tiny, plugins):
    inputs = tiny.make_inputs([(56, 112)])
    call = _lm_call(tiny.model, inputs)
    logits, _ = _engine(tiny.model, inputs, pipe(("post_projector", "merge_pairs", 0.5)), plugins)
    torch.testing.assert_close(logits, _reference(tiny.model, call, 0, [], merge=True), atol=1e-5, rtol=0)


def test_the_reference_is_sensitive_to_the_deepstack_features(tiny, plugins):
    """Without the DeepStack features, or with them one row out of place, the logits differ."""
    inputs = tiny.make_inputs([(112, 112)])
    call = _lm_call(tiny.model, inputs)
    logits, stages = _engine(tiny.model, inputs, pipe(({"layer": 2}, "check_drop", 0.5)), plugins)
    keep = stages[0].kept[0]
    none = dict(call, deepstack_visual_embeds=[])
    rolled = dict(call, deepstack_visual_embeds=[f.roll(1, 0) for f in call["deepstack_visual_embeds"]])
    for wrong in (none, rolled):
        assert not torch.allclose(logits, _reference(tiny.model, wrong, 2, keep), atol=1e-4)


def test_deepstack_layers_and_the_default_when_nothing_is_pruned(tiny):
    adapter = tp.get_plugin_manager().adapters.get(tiny.model.config.model_type)(tiny.model)
    assert adapter.name == "qwen3_vl" and adapter.deepstack_layers() == (0, 1, 2)
    kwargs = {"visual_pos_masks": None, "deepstack_visual_embeds": None, "inputs_embeds": 1}
    assert adapter.take_visual_residuals(kwargs) is None and kwargs == {"inputs_embeds": 1}


def test_a_saved_checkpoint_loads_and_prunes_like_the_original(tiny, plugins, tmp_path):
    """from_pretrained on a checkpoint saved here gives the same model, which the adapter claims and prunes alike."""
    from transformers import AutoModelForImageTextToText

    tiny.model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    inputs = tiny.make_inputs([(112, 112)])
    pipeline = pipe(("post_projector", "check_drop", 0.5), ({"layer": 2}, "check_drop", 0.5))
    expected, _ = _engine(tiny.model, inputs, pipeline, plugins)
    got, _ = _engine(loaded, inputs, pipeline, plugins)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
