"""Molmo2's vision tower (issue 32): vision attention on its ViT, each pooled token the mean of its pooled patches.

transformers' ``modeling_molmo2.py`` (5.21-5.25): the ViT (``vision_tower.layers``, no CLS) runs every crop of the
call as one sequence; ``get_image_features`` concatenates the outputs of the layers of
``adapter_config.vision_feature_layer`` and the projector attention-pools token ``t`` over the patches
``image_token_pooling[t]`` indexes in the call's crops flattened to rows (``-1``: padding), its query their mean. From
5.25 each image's indices count from its own first crop and the model offsets them by ``image_num_crops``; before,
the processor writes indices into the whole call (:func:`_as_release` writes the inputs each release's processor
writes). Videos run through the same tower and pooling (``get_video_features`` pools the frames as crops).

Checked on the census's batch (one crop per image) and on images of a global crop plus one or two overlapping
high-resolution crops (tests/test_family_videos.py's inputs): the adapter serves the family; the map against the
model (the check kit's push: a push at one patch moves exactly the tokens the map marks) and against the query the
model's projector computes; a direct computation of each token's mean (padding slots skipped); VisionZip
(``attention: mean``) at ``post_projector`` keeps, per sample, the tokens of highest mapped score, on images and on
videos; ``cls`` and the stages before the projector refused by name.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import tokenprune_visionzip
import torch
from engine_fixtures import manager_with
from test_families import _default_layer_case, _inputs, _skip_unless
from test_family_videos import _molmo2_crop_inputs, _molmo2_video_inputs
from torch import Tensor

import tokenprune as tp
from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.generic import adapter_for
from tokenprune.engine import compat
from tokenprune.engine.vision_probe import VisionProbe
from tokenprune.errors import TokenpruneError
from tokenprune.testing import adapters as checks
from tokenprune.testing.census import build_tiny
from tokenprune.testing.census_inputs import InputBuilder
from tokenprune.testing.tiny_configs import tiny_config
from tokenprune.testing.video_towers import video_patches_map_to_tokens

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _manager() -> tp.plugins.PluginManager:
    manager = manager_with(tokenprune_visionzip)
    manager.register(checks._CheckReducers())
    return manager


def _offsets(model: torch.nn.Module) -> bool:
    """transformers 5.25 on: ``get_image_features`` takes ``image_num_crops`` and offsets each image's indices."""
    return "image_num_crops" in inspect.signature(model.model.get_image_features).parameters


def _global(pooling: Tensor, counts: list[int], rows: list[int]) -> Tensor:
    """Per-item pooling indices (each item's from its own first crop) as indices into the whole call: item ``i``'s
    ``counts[i]`` rows offset by the ``rows`` of the items before it (the processor before 5.25)."""
    before = torch.tensor([0, *rows[:-1]]).cumsum(0).repeat_interleave(torch.tensor(counts))
    return torch.where(pooling >= 0, pooling + before[:, None], pooling)


def _as_release(model: torch.nn.Module, make_inputs: Any) -> Any:
    """``make_inputs`` as the installed release's processor writes them: before 5.25 the pooling indices of every
    image (video) count over the whole call, not from the image's (video's) first crop (frame)."""
    if _offsets(model):
        return make_inputs

    def inputs(specs: list[Any], start: int = 0) -> dict[str, Any]:
        out = make_inputs(specs, start)
        if "image_grids" in out:
            g, crops = out["image_grids"], out["image_num_crops"]
            counts = (g[:, 0] * g[:, 1] + g[:, 2] * g[:, 3]).tolist()
            patches = out["pixel_values"].shape[-2]
            out["image_token_pooling"] = _global(out["image_token_pooling"], counts, (crops * patches).tolist())
        if "video_grids" in out:
            g, patches = out["video_grids"], out["pixel_values_videos"].shape[-2]
            counts, rows = g.prod(-1).tolist(), (g[:, 0] * patches).tolist()
            out["video_token_pooling"] = _global(out["video_token_pooling"], counts, rows)
        return out

    return inputs


def _model() -> tuple[torch.nn.Module, Any, InputBuilder]:
    """The census's tiny Molmo2 with its projector's gated MLP scaled up 10x: at the tiny model's 0.02 weights the
    MLP (quadratic in its small input) moves a pushed token's features by ~1e-5, below the check kit's threshold."""
    _skip_unless("molmo2")
    model, adapter, builder = _inputs("molmo2")
    with torch.no_grad():
        for p in model.model.multi_modal_projector.image_projector.parameters():
            p.mul_(10.0)
    return model, adapter, builder


CROPS = {"census": None, "crops": _molmo2_crop_inputs}


def _case(inputs: str) -> checks.AdapterCase:
    model, adapter, builder = _model()
    make_inputs = builder if CROPS[inputs] is None else CROPS[inputs](builder)
    return _default_layer_case(model, adapter, builder, _as_release(model, make_inputs))


def test_molmo2_is_served_by_its_adapter_with_the_deepest_feature_layer():
    """The ``molmo2`` adapter: the ViT's layers, probed by default at the deepest of the concatenated feature layers
    (the census's ``[24, 18]``: layer 24; the checkpoints' ``[-3, -9]``: layer ``n - 3``), no CLS, videos served;
    the generic adapter's positions kept; no per-token projector."""
    _skip_unless("molmo2")
    cfg = tiny_config("molmo2")
    for feature_layers, expected in (([24, 18], 24), ([-3, -9], -3), ([0, -1], -1)):
        cfg.adapter_config.vision_feature_layer = feature_layers
        with torch.device("meta"):
            model = compat.model_from_config(cfg)
        adapter = adapter_for(model, _manager())
        tower = adapter.vision_tower()
        layers = model.model.vision_tower.layers
        assert adapter.name == "molmo2" and type(adapter).__name__ == "Molmo2Adapter"
        assert tower.layers == tuple(layers) and tower.feature_layer == expected % len(layers)
        assert not tower.has_cls and tower.videos and "deepest" in tower.notes
        assert adapter.projector() is None and adapter.packed_tower() is None
        assert adapter.position_scheme == "rope"


@pytest.mark.parametrize("inputs", sorted(CROPS))
def test_vision_patches_map_to_the_tokens_the_model_pools_them_into(inputs):
    """The check kit's push, on the padded batch: the census's one crop per image, and images of a global crop plus
    one or two overlapping high-res crops (canvas grids of different sizes; the margins' patches pooled nowhere)."""
    checks.vision_patches_map_to_tokens(_case(inputs))


def test_video_frames_patches_map_to_the_tokens_the_model_pools_them_into():
    """The check kit's video check: two videos (one tower sequence per frame, each frame pooled as a crop, the 3x3
    windows padded with ``-1``)."""
    model, adapter, builder = _model()
    batch = _as_release(model, _molmo2_video_inputs(builder))([1, 1])
    lengths = video_patches_map_to_tokens(model, batch, adapter=adapter)
    assert len(lengths) == int(batch["video_grids"][:, 0].sum())


def _pooling_query(model: torch.nn.Module, run: Any) -> tuple[list[Tensor], Tensor]:
    """The projector's input crops (``(P, D')`` each, the concatenated feature layers) and the pooling attention's
    query ``(T, D')`` (the mean of each kept token's valid patches, as the model computes it) during ``run()``."""
    seen: dict[str, Tensor] = {}
    projector = model.model.multi_modal_projector

    def features(module: Any, args: Any, kwargs: Any) -> None:
        seen["features"] = (args[0] if args else kwargs["image_features"]).reshape(-1, *args[0].shape[-2:])

    def query(module: Any, args: Any, kwargs: Any) -> None:
        seen["query"] = (args[0] if args else kwargs["hidden_states"]).squeeze(1)

    handles = [
        projector.register_forward_pre_hook(features, with_kwargs=True),
        projector.image_pooling_2d.register_forward_pre_hook(query, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return list(seen["features"].unbind(0)), seen["query"]


@pytest.mark.parametrize("kind", ["images", "videos"])
def test_the_map_of_the_projectors_input_is_the_query_the_model_pools_with(kind):
    """The model's own mean: mapping the projector's input (the concatenated feature layers, one row per crop or
    frame) gives, token for token, the query its pooling attention computes (the mean of the token's valid patches;
    the videos' 3x3 windows are padded with ``-1``), split per image (video) as the features are."""
    model, adapter, builder = _model()
    vlm = model.model
    if kind == "images":
        batch = _as_release(model, _molmo2_crop_inputs(builder))([1, 2])
        args = (batch["pixel_values"], batch["image_token_pooling"], batch["image_grids"])
        extra = {"image_num_crops": batch["image_num_crops"]} if _offsets(model) else {}
        method, mapper = vlm.get_image_features, adapter.map_vision_patches
    else:
        batch = _as_release(model, _molmo2_video_inputs(builder))([1, 1])
        args, extra = (batch["pixel_values_videos"], batch["video_token_pooling"], batch["video_grids"]), {}
        method, mapper = vlm.get_video_features, adapter.map_vision_video_patches
        assert bool((batch["video_token_pooling"] < 0).any())
    crops, query = _pooling_query(model, lambda: method(*args, **extra))
    out = method(*args, **extra)
    mapped = mapper(ImageCall(args, extra, out), crops)
    assert [m.shape[0] for m in mapped] == [f.shape[0] for f in ImageCall(args, extra, out).features()]
    assert len(mapped) == args[2].shape[0] == (3 if kind == "images" else 2)
    torch.testing.assert_close(torch.cat(mapped), query, rtol=1e-5, atol=1e-6)


def test_each_token_is_the_mean_of_its_valid_pooled_patches():
    """Computed directly, slot by slot: two images of 1 and 2 crops of 4 patches each, token ``t`` of image ``i`` the
    mean of the values at its indices that are not ``-1`` among image ``i``'s crops (indices from the image's first
    crop on 5.25, over the whole call before); a video of two frames likewise."""
    _skip_unless("molmo2")
    with torch.device("meta"):
        model = build_tiny("molmo2")
    adapter = adapter_for(model, _manager())
    g = torch.Generator().manual_seed(3)
    values = [torch.randn(4, 3, generator=g) for _ in range(3)]  # crops: image 0's one, image 1's two
    own = [  # per image, its tokens' indices into its own crops
        torch.tensor([[0, 1, -1, -1], [2, 3, 3, -1]]),
        torch.tensor([[0, 5, -1, 7], [-1, -1, 4, 1], [6, 6, 6, 6]]),
    ]
    pooling = torch.cat(own) if _offsets(model) else _global(torch.cat(own), [2, 3], [4, 8])
    grids, crops = torch.tensor([[1, 2, 0, 0], [1, 1, 1, 2]]), torch.tensor([1, 2])
    mapped = adapter.map_vision_patches(ImageCall((None, pooling, grids, crops), {}, None), values)
    images = [values[:1], values[1:]]
    expected = [
        torch.stack([torch.stack([torch.cat(images[i])[j] for j in row if j >= 0]).mean(0) for row in own[i]])
        for i in range(2)
    ]
    assert len(mapped) == 2
    for got, want in zip(mapped, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    video = torch.tensor([[0, 1, -1], [4, -1, 7]])  # one video of 2 frames of a 1 x 1 grid
    mapped = adapter.map_vision_video_patches(ImageCall((None, video, torch.tensor([[2, 1, 1]])), {}, None), values[1:])
    want = torch.stack([values[1][:2].mean(0), (values[2][0] + values[2][3]) / 2])
    torch.testing.assert_close(mapped[0], want, rtol=0, atol=1e-6)


def _expected_keep(case: checks.AdapterCase, batch: dict[str, Any], keep: int, video: bool) -> list[list[int]]:
    """Per sample, the ``keep`` visual tokens of highest mapped score (the deepest feature layer's ``mean`` attention
    by an own probe, mapped by the adapter), ascending; ``[]`` for a sample without any."""
    tower = case.adapter.vision_tower()
    probe = VisionProbe(tower, {tower.feature_layer: (frozenset({"mean"}), False, False)})
    vlm = case.adapter.vlm()
    probe.install()
    try:
        probe.begin("video" if video else "image")
        with torch.no_grad():
            if video:
                args = (batch["pixel_values_videos"], batch["video_token_pooling"], batch["video_grids"])
                out, kw = vlm.get_video_features(*args), {}
            else:
                args = (batch["pixel_values"], batch["image_token_pooling"], batch["image_grids"])
                kw = {"image_num_crops": batch["image_num_crops"]} if _offsets(case.model) else {}
                out = vlm.get_image_features(*args, **kw)
        records = probe.video_records if video else probe.records
        scores = [s[:, None] for s in records[tower.feature_layer].scores["mean"]]
    finally:
        probe.remove()
    mapper = case.adapter.map_vision_video_patches if video else case.adapter.map_vision_patches
    per_item = iter(mapper(ImageCall(args, kw, out), scores))
    counts = (batch["input_ids"] == case.adapter.image_token_id()).sum(1).tolist()
    expected = []
    for n in counts:
        sample: list[Tensor] = []
        while sum(t.shape[0] for t in sample) < n:
            sample.append(next(per_item)[:, 0])
        flat = torch.cat(sample) if sample else torch.zeros(0)
        expected.append(sorted(flat.argsort(descending=True)[:keep].tolist()))
    return expected


@pytest.mark.parametrize("kind", ["images", "videos"])
def test_visionzip_keeps_the_tokens_of_highest_mapped_attention(kind):
    """VisionZip (dominant tokens only, ``attention: mean``) at ``post_projector`` on a padded batch (images with
    high-res crops of different sizes; videos of three and four frames, a text-only sample beside them): each sample
    keeps the tokens of highest mean attention received by their pooled patches, and as it keeps them alone."""
    case = _case("crops") if kind == "images" else None
    if case is None:
        model, adapter, builder = _model()
        case = _default_layer_case(model, adapter, builder, _as_release(model, _molmo2_video_inputs(builder)))
    manager = _manager()
    stage = {"at": "post_projector", "reducer": "visionzip", "keep": 5}
    stage["params"] = {"contextual_ratio": 0.0, "attention": "mean"}
    batch = case.padded_batch()
    expected = _expected_keep(case, batch, 5, kind == "videos")
    with tp.apply(case.model, {"stages": [stage]}, plugins=manager) as run:
        out = case.forward(batch).logits
        (s,) = run.stats.last_prefill.stages
        assert s.kept == expected and s.leaving == [5 if n else 0 for n in s.entering]
        assert s.entering[0] > 0 and s.entering[1] > s.entering[0]
        for i in range(2):
            alone = case.forward(case.make_inputs([case.specs[i]], start=i)).logits
            torch.testing.assert_close(alone[0, -1], out[i, -1], atol=1e-5, rtol=0)
            assert run.stats.last_prefill.stages[0].kept[0] == expected[i]


def test_cls_attention_and_stages_before_the_projector_are_refused_by_name():
    """The ViT has no CLS token: ``attention: cls`` is refused naming ``mean``; ``pre_projector`` and
    ``vision_layer`` stages are refused naming the pooling over index sets of patches (no hook left behind)."""
    _skip_unless("molmo2")
    model = build_tiny("molmo2")
    manager = _manager()
    stage = {"at": "post_projector", "reducer": "visionzip", "keep": 2}
    stage["params"] = {"contextual_ratio": 0.0, "attention": "cls"}
    with pytest.raises(TokenpruneError, match=r"has no CLS token; use the 'mean'"):
        tp.apply(model, {"stages": [stage]}, plugins=manager)
    for at in ("pre_projector", {"vision_layer": 1}):
        with pytest.raises(TokenpruneError, match=r"'molmo2'.*attention-pools each token from an index set of patches"):
            tp.apply(model, {"stages": [{"at": at, "reducer": "check_drop", "keep": 2}]}, plugins=manager)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_flops_of_a_vision_attention_stage_agree_three_ways():
    """VisionZip (``attention: mean``) at ``post_projector`` on an image of a global crop and two high-res crops:
    analytic == torch == fvcore on every decoder layer and the language model, which runs on the kept tokens."""
    from tokenprune.cost.flops import count_flops

    model, _, builder = _model()
    inputs = _as_release(model, _molmo2_crop_inputs(builder))([1], start=1)  # 16 + 28 tokens
    base = count_flops(model, inputs, use_fvcore=False)
    stage = {"at": "post_projector", "reducer": "visionzip", "keep": 5}
    stage["params"] = {"contextual_ratio": 0.0, "attention": "mean"}
    report = count_flops(model, inputs, {"stages": [stage]}, plugins=_manager())
    for row in report.layers:
        assert row.analytic == row.torch == row.fvcore, (row, report.fvcore_notes)
    lm = report.language_model
    assert lm["analytic"] == lm["torch"] == lm["fvcore"], report.fvcore_notes
    assert report.layers[0].tokens[0] == base.layers[0].tokens[0] - 44 + 5
    assert lm["analytic"] < base.language_model["analytic"]


@pytest.mark.parametrize("reducer", ["visionzip", "vispruner", "fastervlm"])
def test_the_vision_attention_reducers_run_with_their_defaults_on_images_and_videos(reducer):
    """Each vision-attention reducer with its defaults but ``attention: mean`` (VisionZip's contextual tokens and
    VisPruner's diverse ones from the mapped keys or features) keeps its budget per sample, images and videos."""
    model, _, builder = _model()
    stage = {"at": "post_projector", "reducer": reducer, "keep": 6, "params": {"attention": "mean"}}
    for make_inputs in (_molmo2_crop_inputs, _molmo2_video_inputs):
        batch = _as_release(model, make_inputs(builder))([1, 2, None])
        with tp.apply(model, {"stages": [stage]}, plugins=_manager()) as run, torch.no_grad():
            model(**batch)
            (s,) = run.stats.last_prefill.stages
        assert s.entering[0] > 6 and s.entering[1] > 6 and s.entering[2] == 0
        assert s.leaving == [6, 6, 0]
