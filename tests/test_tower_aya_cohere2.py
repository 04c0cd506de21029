"""Aya Vision's and Command A Vision's cropped SigLIP towers (tokenprune/adapters/crop_towers.py): vision attention
on the census's tiny models and inputs.

Per model type: the adapter that serves it (the tower's encoder layers, probed at the layer the features come from,
no CLS); the patch-to-token map against the model (the check kit's push test, on the census's batch and on images of
one and three crops in one padded batch; Aya also with ``vision_feature_layer: -2``), against the model's own pixel
shuffle, and against a direct computation (each token the mean of its 2x2 block of patches); VisionZip
(``attention: mean``) at ``post_projector`` keeping the tokens whose scores, computed here from the tower's own
q and k, are highest, batch == one by one; ``attention: cls`` refused (SigLIP has no CLS); the stages before the
projector refused naming the pixel shuffle; FLOPs three ways with a vision-attention stage. The engine invariants of
the families (tests/test_families.py) run with these adapters.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import tokenprune_visionzip
import torch
from engine_fixtures import manager_with
from test_families import _cropped_inputs, _skip_unless
from torch import Tensor

import tokenprune as tp
from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.generic import adapter_for
from tokenprune.engine import compat
from tokenprune.errors import TokenpruneError
from tokenprune.testing import adapters as checks
from tokenprune.testing.census import build_tiny, default_cut_layer
from tokenprune.testing.census_inputs import InputBuilder
from tokenprune.testing.tiny_configs import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TYPES = ["aya_vision", "cohere2_vision"]
VISIONZIP = {"at": "post_projector", "reducer": "visionzip", "keep": 3}
VISIONZIP["params"] = {"contextual_ratio": 0.0, "attention": "mean"}


def _manager() -> tp.plugins.PluginManager:
    manager = manager_with(tokenprune_visionzip)
    manager.register(checks._CheckReducers())
    return manager


def _built(model_type: str, model: Any = None) -> tuple[torch.nn.Module, Any, InputBuilder, Any]:
    _skip_unless(model_type)
    model = build_tiny(model_type) if model is None else model
    manager = _manager()
    adapter = adapter_for(model, manager)
    return model, adapter, InputBuilder(model, adapter), manager


def _case(model: Any, adapter: Any, builder: InputBuilder, manager: Any, make_inputs: Any) -> checks.AdapterCase:
    k, probe = default_cut_layer(adapter)
    return checks.adapter_case(
        model, make_inputs, [1, 2, 1], plugins=manager, pad_token_id=builder.pad, layer=k, probe_layer=probe
    )


def _layers(model: Any) -> tuple[torch.nn.Module, ...]:
    visual = model.model.vision_tower
    return tuple(getattr(visual, "vision_model", visual).encoder.layers)


@pytest.mark.parametrize("model_type", TYPES)
def test_the_family_is_served_by_its_crop_tower_adapter(model_type):
    """The dedicated adapter: the SigLIP encoder's layers, probed at the last (the features' layer), no CLS, no
    video; no per-token projector, no packed tower; the generic adapter's 1-D positions and default layer."""
    _skip_unless(model_type)
    with torch.device("meta"):
        model = build_tiny(model_type)
    adapter = adapter_for(model, _manager())
    tower = adapter.vision_tower()
    assert adapter.name == model_type and adapter.tower() is model.model.vision_tower
    assert tower.layers == _layers(model) and tower.feature_layer == len(tower.layers) - 1
    assert not tower.has_cls and not tower.videos
    assert adapter.projector() is None and adapter.packed_tower() is None
    assert adapter.position_scheme == "rope"
    assert default_cut_layer(adapter)[0] == 2


@pytest.mark.parametrize("crops", ["census", "one and three"])
@pytest.mark.parametrize("model_type", TYPES)
def test_vision_patches_map_to_the_tokens_the_model_builds_from_them(model_type, crops):
    """The check kit's push test on the census's padded batch (one crop per image) and on images of one and three
    crops in one padded batch (the families' images of different sizes)."""
    model, adapter, builder, manager = _built(model_type)
    make_inputs = builder if crops == "census" else _cropped_inputs(builder)
    checks.vision_patches_map_to_tokens(_case(model, adapter, builder, manager, make_inputs))


def test_aya_vision_probes_the_layer_its_vision_feature_layer_names():
    """Aya Vision with ``vision_feature_layer: -2`` on a three-layer tower: the features are layer 1's output, the
    probed layer is 1, and the map still marks exactly the tokens the model builds from a pushed patch there."""
    _skip_unless("aya_vision")
    cfg = tiny_config("aya_vision")
    cfg.vision_config.num_hidden_layers, cfg.vision_feature_layer = 3, -2
    torch.manual_seed(0)
    model, adapter, builder, manager = _built("aya_vision", compat.model_from_config(cfg).eval())
    tower = adapter.vision_tower()
    assert len(tower.layers) == 3 and tower.feature_layer == 1
    checks.vision_patches_map_to_tokens(_case(model, adapter, builder, manager, _cropped_inputs(builder)))


def _block_means(v: Tensor, side: int) -> Tensor:
    """Token ``(i, j)`` of a ``side x side`` crop, row-major: the mean of patches ``(2i + a, 2j + b)``."""
    n = side // 2
    return torch.stack(
        [
            torch.stack([v[(2 * i + a) * side + 2 * j + b] for a in (0, 1) for b in (0, 1)]).mean(0)
            for i in range(n)
            for j in range(n)
        ]
    )


@pytest.mark.parametrize("model_type", TYPES)
def test_each_token_gets_the_mean_of_its_two_by_two_block_of_patches(model_type):
    """Computed directly from the documented grouping: crops of 8 x 8 and 4 x 4 patches (raster order) give 4 x 4
    and 2 x 2 tokens, token ``(i, j)`` the mean of patches ``(2i + a, 2j + b)``; one tensor per crop. Aya under the
    ``default`` strategy drops position 0 first; a sequence that is not a square grid is not mapped."""
    _skip_unless(model_type)
    with torch.device("meta"):
        model = build_tiny(model_type)
    adapter = adapter_for(model, _manager())
    values = [torch.randn(n, 3, generator=torch.Generator().manual_seed(n)) for n in (64, 16)]
    mapped = adapter.map_vision_patches(ImageCall((None,), {}, None), values)
    assert len(mapped) == 2
    for got, v in zip(mapped, values, strict=True):
        torch.testing.assert_close(got, _block_means(v, math.isqrt(v.shape[0])), rtol=0, atol=1e-6)
    assert adapter.map_vision_patches(ImageCall((None,), {}, None), [torch.randn(12, 3)]) is None
    if model_type == "aya_vision":
        with_first = [torch.cat([torch.full((1, 3), 1e3), v]) for v in values]
        by_name = ImageCall((None,), {"vision_feature_select_strategy": "default"}, None)
        for call in (by_name, ImageCall((None, -1, "default"), {}, None)):  # by keyword, by place
            for got, v in zip(adapter.map_vision_patches(call, with_first), values, strict=True):
                torch.testing.assert_close(got, _block_means(v, math.isqrt(v.shape[0])), rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", TYPES)
def test_the_models_pixel_shuffle_builds_each_token_from_the_block_the_map_averages(model_type):
    """The model's own projector's pixel shuffle on patch indices: the channels of token ``(i, j)`` of a crop come
    from exactly patches ``(2i + a, 2j + b)``, the ones :meth:`map_vision_patches` averages for it."""
    _skip_unless(model_type)
    model = build_tiny(model_type)
    adapter = adapter_for(model, _manager())
    side = 8
    index = torch.arange(side * side, dtype=torch.float64)[None, :, None]  # (1, S, 1): each patch's own index
    shuffled = model.model.multi_modal_projector.pixel_shuffle(index).reshape(-1, 4)  # (tokens, 4 patches)
    one_hot = [torch.eye(side * side, dtype=torch.float64)]
    (weights,) = adapter.map_vision_patches(ImageCall((None,), {}, None), one_hot)  # (tokens, S): mean weights
    for t, patches in enumerate(shuffled.long().tolist()):
        assert set(patches) == set(weights[t].nonzero().flatten().tolist()), t
        torch.testing.assert_close(weights[t][patches], torch.full((4,), 0.25, dtype=torch.float64))


def _mean_attention_scores(model: Any, adapter: Any, pixels: Tensor) -> Tensor:
    """``(crops, S)``: the attention each patch receives at the feature layer, averaged over heads and queries,
    computed here from the layer's input with its own norm and projections (eager softmax)."""
    layer = adapter.vision_tower().layers[adapter.vision_tower().feature_layer]
    seen: list[Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model.model.get_image_features(pixel_values=pixels)
    handle.remove()
    attn = layer.self_attn
    with torch.no_grad():
        h = layer.layer_norm1(seen[0])
        b, s, _ = h.shape
        q, k = (p(h).reshape(b, s, attn.num_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj))
        probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * attn.scale, dim=-1)
    return probs.mean(dim=(1, 2))


@pytest.mark.parametrize("model_type", TYPES)
def test_visionzip_keeps_the_tokens_whose_mapped_tower_attention_is_highest(model_type):
    """VisionZip (dominant tokens only, ``attention: mean``) at ``post_projector`` on images of one and three crops:
    each sample keeps its 3 tokens with the highest score, each token's score the mean over its 2x2 block of the
    attention its patches receive (computed here from the tower's q and k); batch == one by one."""
    model, adapter, builder, manager = _built(model_type)
    make_inputs = _cropped_inputs(builder)
    batch = make_inputs([1, 2, 1])
    scores = _mean_attention_scores(model, adapter, batch["pixel_values"])
    side = math.isqrt(scores.shape[1])
    tokens = [_block_means(s[:, None], side)[:, 0] for s in scores]  # per crop, in pixel_values order
    per_crop = tokens[0].shape[0]
    counts = ((batch["input_ids"] == adapter.image_token_id()).sum(1) // per_crop).tolist()
    with tp.apply(model, {"stages": [VISIONZIP]}, plugins=manager) as run, torch.no_grad():
        out = model(**batch).logits
        (stage,) = run.stats.last_prefill.stages
        assert stage.entering == [per_crop * c for c in counts] and stage.leaving == [3] * 3
        start = 0
        for i, c in enumerate(counts):
            sample = torch.cat(tokens[start : start + c])
            start += c
            assert sorted(stage.kept[i]) == sorted(sample.topk(3).indices.tolist()), i
            alone = model(**make_inputs([[1, 2, 1][i]], start=i)).logits
            torch.testing.assert_close(alone[0, -1], out[i, -1], atol=1e-5, rtol=0)
            assert run.stats.last_prefill.stages[0].kept[0] == stage.kept[i]
    assert counts == [1, 4, 1]  # one crop; three then one; one


@pytest.mark.parametrize("model_type", TYPES)
def test_cls_attention_is_refused_the_tower_has_no_cls(model_type):
    model, _, builder, manager = _built(model_type)
    stage = {**VISIONZIP, "params": {**VISIONZIP["params"], "attention": "cls"}}
    with pytest.raises(TokenpruneError, match=r"SiglipVisionModel has no CLS token; use the 'mean'"):
        with tp.apply(model, {"stages": [stage]}, plugins=manager), torch.no_grad():
            model(**builder([1]))


@pytest.mark.parametrize("at", ["pre_projector", {"vision_layer": 1}], ids=str)
@pytest.mark.parametrize("model_type", TYPES)
def test_stages_before_the_projector_are_refused_naming_the_pixel_shuffle(model_type, at):
    """The projector builds each token from a 2x2 block of patches, so it is not per token: ``pre_projector`` and
    ``vision_layer`` stages are refused at ``apply``, naming the adapter and why; the model keeps only the hooks
    it had."""
    model, _, _, manager = _built(model_type)
    hooks = [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()]
    with pytest.raises(TokenpruneError, match=rf"'{model_type}'.*pixel-shuffles each d x d block.*not a per-token"):
        tp.apply(model, {"stages": [{"at": at, "reducer": "check_drop", "keep": 2}]}, plugins=manager)
    assert [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()] == hooks


@pytest.mark.parametrize("model_type", TYPES)
def test_flops_of_a_vision_attention_stage_agree_three_ways(model_type):
    """VisionZip at ``post_projector`` on the probe's scores: analytic == torch == fvcore on every decoder layer and
    the language model, which runs on the kept tokens (an image of three crops)."""
    from tokenprune.cost.flops import count_flops

    model, adapter, builder, manager = _built(model_type)
    inputs = _cropped_inputs(builder)([1], start=1)
    visual = int((inputs["input_ids"] == adapter.image_token_id()).sum())
    base = count_flops(model, inputs, use_fvcore=False)
    report = count_flops(model, inputs, {"stages": [VISIONZIP]}, plugins=manager)
    for row in report.layers:
        assert row.analytic == row.torch == row.fvcore, (row, report.fvcore_notes)
    lm = report.language_model
    assert lm["analytic"] == lm["torch"] == lm["fvcore"], report.fvcore_notes
    assert report.layers[0].tokens[0] == base.layers[0].tokens[0] - (visual - 3)
    assert report.language_model["analytic"] < base.language_model["analytic"]
