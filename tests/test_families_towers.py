"""The packed vision towers of issue 32's families (Qwen3.5, GLM-4.xV): vision attention, ``pre_projector`` and
``vision_layer: k`` stages on whole 2x2 merge units, on the census's tiny models and inputs.

Per model type: the adapter that serves it; the patch-to-token map against the model (the kit's check: a push at one
patch moves exactly the tokens the map marks) and against a direct computation; VisionZip at ``post_projector`` on
the probe's scores (batch == one by one, and the same units kept before the merger); the check kit's invariants
(keep-all identity, cached generation == recomputation, batch == one by one with images of different sizes,
``remove()`` restores) with the first stage at ``pre_projector`` and at ``vision_layer: 1``; a ``vision_layer`` cut
equal to the tower's last block run frame by frame on the kept patches (their rotary positions, their position
embeddings added before block 0); FLOPs three ways where the family's are counted (Qwen3.5's and ERNIE's are refused
by layer kind: tests/test_families.py). The costlier checks run once per tower class (:data:`DISTINCT`).
PaddleOCR-VL: vision attention here; its raster-ordered tower's stages before the projector in
tests/test_tower_paddleocr_vl.py.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import tokenprune_visionzip
import torch
from engine_fixtures import manager_with
from test_engine_packed_tower import _Plugin
from test_families import HYBRID, SLOW, _skip_unless, _video_inputs
from torch import Tensor

import tokenprune as tp
from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.generic import adapter_for
from tokenprune.testing import adapters as checks
from tokenprune.testing.census import build_tiny, default_cut_layer
from tokenprune.testing.census_inputs import InputBuilder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GLM = ("glm4v", "glm4v_moe", "glm46v", "glmga", "glm_ocr")

#: Model type -> the adapter that serves it.
TOWERS = {
    "qwen3_5": "qwen3_5",
    "qwen3_5_moe": "qwen3_5",
    **dict.fromkeys(GLM, "glm4v"),
    "ernie4_5_vl_moe": "ernie4_5_vl_moe",
}
#: One type per tower class for the costlier checks (GLM-4.6V's and GLM-Image's towers are GLM-4.1V's class).
DISTINCT = [t for t in TOWERS if t not in ("glm46v", "glmga")]
#: Vision attention (PaddleOCR-VL's stages before the projector: tests/test_tower_paddleocr_vl.py).
VISION = [*TOWERS, "paddleocr_vl"]
BEFORE = ["pre_projector", {"vision_layer": 1}]


def _params(types: Any) -> list[Any]:
    return [pytest.param(t, marks=pytest.mark.slow) if t in SLOW else t for t in types]


def _manager() -> tp.plugins.PluginManager:
    manager = manager_with(tokenprune_visionzip)
    for plugin in (_Plugin(), checks._CheckReducers()):
        manager.register(plugin)
    return manager


def _built(model_type: str) -> tuple[torch.nn.Module, Any, InputBuilder, tp.plugins.PluginManager]:
    _skip_unless(model_type)
    model = build_tiny(model_type)
    manager = _manager()
    adapter = adapter_for(model, manager)
    return model, adapter, InputBuilder(model, adapter), manager


def _case(model_type: str, at: Any = "post_projector") -> checks.AdapterCase:
    model, adapter, make_inputs, manager = _built(model_type)
    k, probe = default_cut_layer(adapter)
    return checks.adapter_case(
        model, make_inputs, [1, 2, 1], plugins=manager, pad_token_id=make_inputs.pad, layer=k, probe_layer=probe, at=at
    )


@pytest.mark.parametrize("model_type", sorted(TOWERS))
def test_the_family_is_served_by_its_tower_adapter(model_type):
    """The dedicated adapter: the tower's blocks, probed at the last (the merger's input), no CLS, 2x2 units."""
    _skip_unless(model_type)
    with torch.device("meta"):
        model = build_tiny(model_type)
    adapter = adapter_for(model, _manager())
    tower, packed = adapter.vision_tower(), adapter.packed_tower()
    visual = adapter.tower()
    assert visual is getattr(model.model, "vision_tower" if model_type == "ernie4_5_vl_moe" else "visual")
    assert adapter.name == TOWERS[model_type]
    assert tower.layers == tuple(visual.blocks) and tower.feature_layer == len(visual.blocks) - 1
    assert not tower.has_cls and tower.videos  # the videos' tower calls too (tests/test_tower_videos.py)
    assert packed.module is visual and packed.merge == 2 and packed.window is None
    assert adapter.position_scheme == "mrope"  # the generic adapter's positions are kept
    assert default_cut_layer(adapter)[0] == (3 if model_type in HYBRID else 2)


@pytest.mark.parametrize("model_type", _params(VISION))
def test_vision_patches_map_to_the_tokens_the_model_builds_from_them(model_type):
    checks.vision_patches_map_to_tokens(_case(model_type))


@pytest.mark.parametrize("model_type", sorted(TOWERS))
def test_each_token_gets_the_mean_of_its_units_patches(model_type):
    """Computed directly: frame ``f``'s token ``j`` is the mean of the frame's patches ``4j .. 4j + 3`` (the processor
    stores a unit's patches together), a video-like image of two frames its frames' tokens one after the other."""
    _skip_unless(model_type)
    with torch.device("meta"):
        model = build_tiny(model_type)
    adapter = adapter_for(model, _manager())
    grid = torch.tensor([[1, 4, 8], [2, 4, 4]])
    values = [torch.randn(n, 3, generator=torch.Generator().manual_seed(n + i)) for i, n in enumerate((32, 16, 16))]
    mapped = adapter.map_vision_patches(ImageCall((None, grid), {}, None), values)
    expected = [
        torch.stack([values[0][4 * j : 4 * j + 4].mean(0) for j in range(8)]),
        torch.stack([values[f][4 * j : 4 * j + 4].mean(0) for f in (1, 2) for j in range(4)]),
    ]
    assert len(mapped) == 2
    for got, want in zip(mapped, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", _params(VISION))
def test_visionzip_ranks_by_the_towers_attention_before_and_after_the_merger(model_type):
    """VisionZip (dominant tokens only, ``attention: mean``) at ``post_projector``: a padded batch of different image
    sizes keeps, per sample, the tokens it keeps alone; before the merger (its budget per frame; PaddleOCR-VL's in
    tests/test_tower_paddleocr_vl.py) a one-image sample keeps the same units (both rank by the probe's per-patch
    scores averaged over each unit)."""
    case = _case(model_type)
    params = {"contextual_ratio": 0.0, "attention": "mean"}
    batch = case.make_inputs([1, 2, 1])
    kept: dict[str, Any] = {}
    for at in ("post_projector", "pre_projector") if model_type in TOWERS else ("post_projector",):
        pipeline = {"stages": [{"at": at, "reducer": "visionzip", "keep": 3, "params": params}]}
        with tp.apply(case.model, pipeline, plugins=case.manager) as run:
            out = case.forward(batch).logits
            (stage,) = run.stats.last_prefill.stages
            kept[at] = stage.kept
            assert stage.entering == [4, 12, 4]
            assert stage.leaving == ([3, 6, 3] if at == "pre_projector" else [3, 3, 3])  # per frame, per sample
            for i in range(3):
                alone = case.forward(case.make_inputs([[1, 2, 1][i]], start=i)).logits
                torch.testing.assert_close(alone[0, -1], out[i, -1], atol=1e-5, rtol=0)
                assert run.stats.last_prefill.stages[0].kept[0] == kept[at][i]
    if model_type in TOWERS:
        assert kept["pre_projector"][0::2] == kept["post_projector"][0::2]  # the one-image samples


@pytest.mark.parametrize("at", BEFORE, ids=str)
@pytest.mark.parametrize("model_type", _params(DISTINCT))
def test_stages_before_the_merger_keep_the_invariants(model_type, at):
    """The check kit's invariants with its first stage before the merger (whole units), its layer stage at the
    family's default layer: keep-all identity, cached generation == recomputation (original and compact positions),
    batch == one by one (images one and two units wide) and ``remove()``."""
    case = _case(model_type, at)
    checks.keep_all_is_identity(case)
    checks.cached_decode_equals_recompute(case)
    checks.cached_decode_equals_recompute(case, positions="compact")
    checks.batch_equals_one_by_one(case)
    checks.remove_restores_model(case)


def _reference_tokens(adapter: Any, pixels: Tensor, grid: Tensor, keep: Tensor) -> Tensor:
    """The tower by hand: its last block run frame by frame on the kept units' patches with their own rotary
    embeddings (the rest of the tower as the model runs it), then the model's own merger or resampler (its output for
    the unit's patches only); the kept units' tokens."""
    captured: dict[str, Any] = {}
    last = adapter.tower().blocks[-1]

    def features() -> Tensor:
        with torch.no_grad():
            return torch.cat(list(adapter.vlm().get_image_features(pixels, grid).pooler_output))

    def grab(m: torch.nn.Module, a: tuple[Any, ...], k: dict[str, Any]) -> None:
        captured.update(hidden=a[0], **k)

    handle = last.register_forward_pre_hook(grab, with_kwargs=True)
    features()
    handle.remove()
    hidden, (cos, sin) = captured["hidden"], captured["position_embeddings"]
    out = torch.zeros_like(hidden)
    for a, b in itertools.pairwise(captured["cu_seqlens"].tolist()):
        rows = torch.tensor([4 * u + j for u in range(a // 4, b // 4) if keep[u] for j in range(4)])
        if rows.numel():
            cu = torch.tensor([0, len(rows)], dtype=torch.int32)
            embeddings = (cos[rows], sin[rows])
            with torch.no_grad():
                out[rows] = last(hidden[rows], cu_seqlens=cu, max_seqlen=len(rows), position_embeddings=embeddings)
    handle = last.register_forward_hook(lambda m, a, o: out)  # the model's own tail (norm, downsample, merger)
    merged = features()
    handle.remove()
    return merged[keep]


@pytest.mark.parametrize("model_type", _params(DISTINCT))
def test_a_vision_layer_cut_equals_the_last_block_run_on_the_kept_patches(model_type):
    """``vision_layer: 1`` on an image two units wide (8 units): the language model receives, at the kept units,
    the tokens of the tower's last block run on the kept patches alone (per frame, with their rotary positions; the
    position embeddings were added before block 0), through the model's own merger."""
    model, adapter, make_inputs, manager = _built(model_type)
    inputs = make_inputs([1], start=1)
    seen: list[Tensor] = []
    pipeline = {"stages": [{"at": {"vision_layer": 1}, "reducer": "unit_drop", "keep": 3}]}
    with tp.apply(model, pipeline, plugins=manager) as run:
        handle = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["inputs_embeds"]), with_kwargs=True
        )
        with torch.no_grad():
            model(**inputs)
        handle.remove()
        (stage,) = run.stats.last_prefill.stages
    kept = torch.tensor(stage.kept[0])
    keep = torch.zeros(int(inputs["image_grid_thw"].prod()) // 4, dtype=torch.bool)
    keep[kept] = True
    assert len(kept) == 3 and keep.numel() == 8
    ref = _reference_tokens(adapter, inputs["pixel_values"], inputs["image_grid_thw"], keep)
    image = (inputs["input_ids"][0] == adapter.image_token_id()).nonzero()[:, 0]
    assert seen[0].shape[1] == inputs["input_ids"].shape[1] - 8 + 3
    start = int(image[0])
    torch.testing.assert_close(seen[0][0, start : start + 3], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", _params(["qwen3_5", "ernie4_5_vl_moe"]))
def test_a_vision_attention_stage_on_video_tokens_is_served_and_tokens_image_prunes_the_images(model_type):
    """The probe watches the video call too (Qwen3.5's videos run through ``get_image_features``, as Qwen3-VL's;
    ERNIE's through the tower directly), so a vision-attention stage reduces the image (4 units) and the video tokens
    of an image + video prompt together, and ``tokens: image`` reduces the images only, keeping the video (the
    scores: tests/test_tower_videos.py)."""
    model, _, builder, manager = _built(model_type)
    inputs = _video_inputs(builder)([1])
    videos = int(inputs["video_grid_thw"].prod(-1).sum()) // 4 // (2 if model_type == "ernie4_5_vl_moe" else 1)
    stage = {"at": "post_projector", "reducer": "visionzip", "keep": 2, "params": {"contextual_ratio": 0.0}}
    stage["params"]["attention"] = "mean"
    with tp.apply(model, {"stages": [stage]}, plugins=manager) as run, torch.no_grad():
        model(**inputs)
        (s,) = run.stats.last_prefill.stages
    assert s.entering == [4 + videos] and s.leaving == [2]
    with tp.apply(model, {"stages": [{**stage, "tokens": "image"}]}, plugins=manager) as run, torch.no_grad():
        model(**inputs)
        (s,) = run.stats.last_prefill.stages
    assert s.entering == [4] and s.leaving == [2]


def _agree(report: Any) -> None:
    for row in report.layers:
        assert row.analytic == row.torch == row.fvcore, (row, report.fvcore_notes)
    lm = report.language_model
    assert lm["analytic"] == lm["torch"] == lm["fvcore"], report.fvcore_notes


@pytest.mark.parametrize("model_type", [t for t in DISTINCT if t in GLM])
def test_flops_of_stages_before_the_merger_agree_three_ways(model_type):
    """GLM-4.xV (Qwen3.5's FLOPs are refused by layer kind, tests/test_families.py): with a ``pre_projector`` and a
    ``vision_layer: 1`` stage, analytic == torch == fvcore on every decoder layer and the language model, which runs on
    the kept units' tokens; the tower does the same work before the merger and less after a cut between blocks."""
    flops_before_the_merger_agree_three_ways(*_built(model_type))


def flops_before_the_merger_agree_three_ways(model: Any, adapter: Any, make_inputs: Any, manager: Any) -> None:
    """The FLOPs check above on a built family (also PaddleOCR-VL's, tests/test_tower_paddleocr_vl.py)."""
    from tokenprune.cost.flops import count_flops

    inputs = make_inputs([1], start=1)  # one image of 8 units
    base = count_flops(model, inputs, use_fvcore=False)
    for at in BEFORE:
        pipeline = {"stages": [{"at": at, "reducer": "unit_drop", "keep": 3}]}
        report = count_flops(model, inputs, pipeline, plugins=manager)
        _agree(report)
        assert report.layers[0].tokens[0] == base.layers[0].tokens[0] - 5
        assert report.language_model["analytic"] < base.language_model["analytic"]
        if at == "pre_projector":
            assert report.vision == base.vision
        else:
            assert report.vision < base.vision


@pytest.mark.parametrize("model_type", ["glm4v"])
def test_glm_video_prompts_keep_the_videos_out_of_the_tower_stages(model_type):
    """GLM-4.xV's video placeholders are its image token, typed video by ``mm_token_type_ids``
    (``tokenprune/adapters/token_types.py``): a vision-attention stage reduces them (``tokens: all`` or ``video``, the
    tower's attention recorded during ``get_video_features``, tests/test_tower_videos.py), and with ``tokens: image``
    reduces nothing on a prompt without images; the stages before the merger reduce images only (the videos run
    through ``get_video_features``, which they do not cut), so a video-only prompt runs as the stock model."""
    model, _, builder, manager = _built(model_type)
    inputs = _video_inputs(builder)([1, 1])
    with torch.no_grad():
        stock = model(**inputs).logits
    vision = {"at": "post_projector", "reducer": "visionzip", "keep": 2}
    vision["params"] = {"contextual_ratio": 0.0, "attention": "mean"}
    for tokens in ("all", "video"):
        with tp.apply(model, {"stages": [{**vision, "tokens": tokens}]}, plugins=manager) as run, torch.no_grad():
            model(**inputs)
            (s,) = run.stats.last_prefill.stages
        assert s.entering == [8, 16] and s.leaving == [2, 2], tokens
    before = [{"at": "pre_projector", "reducer": "unit_drop", "keep": 2}]
    before.append({"at": {"vision_layer": 1}, "reducer": "unit_drop", "keep": 2})
    for stage in [{**vision, "tokens": "image"}, *({**s, "tokens": t} for s in before for t in ("all", "image"))]:
        with tp.apply(model, {"stages": [stage]}, plugins=manager) as handle, torch.no_grad():
            logits = model(**inputs).logits
        assert torch.equal(logits, stock), stage
        assert all(sum(s.entering) == 0 for s in handle.stats.last_prefill.stages)


@pytest.mark.parametrize("model_type", [*(t for t in DISTINCT if t in GLM), "paddleocr_vl"])
def test_flops_of_a_vision_attention_stage_agree_three_ways(model_type):
    """VisionZip at ``post_projector`` on the probe's scores (the families whose FLOPs are counted): analytic == torch
    == fvcore on every decoder layer and the language model, which runs on the kept tokens."""
    from tokenprune.cost.flops import count_flops

    model, _, make_inputs, manager = _built(model_type)
    inputs = make_inputs([1], start=1)  # one image of 8 units
    base = count_flops(model, inputs, use_fvcore=False)
    stage = {"at": "post_projector", "reducer": "visionzip", "keep": 3}
    stage["params"] = {"contextual_ratio": 0.0, "attention": "mean"}
    report = count_flops(model, inputs, {"stages": [stage]}, plugins=manager)
    _agree(report)
    assert report.layers[0].tokens[0] == base.layers[0].tokens[0] - 5
    assert report.language_model["analytic"] < base.language_model["analytic"]


@pytest.mark.parametrize("at", BEFORE, ids=str)
@pytest.mark.parametrize("model_type", _params(["qwen3_5", "ernie4_5_vl_moe"]))
def test_stages_before_the_merger_reduce_the_images_of_a_prompt_with_a_video(model_type, at):
    """A video beside each image (Qwen3.5's runs through ``get_image_features``, ERNIE's through the tower): the stage
    reduces the image units only (the video's tower call is left alone), and keep-all identity, cached generation ==
    recomputation and batch == one by one hold."""
    images_beside_videos_are_reduced_alone(*_built(model_type), at)


def images_beside_videos_are_reduced_alone(model: Any, adapter: Any, builder: Any, manager: Any, at: Any) -> None:
    """The check above on a built family (also Qwen2.5-Omni's thinker, tests/test_tower_omni_thinkers.py)."""
    make_inputs = _video_inputs(builder)
    inputs = make_inputs([1, 1])
    with tp.apply(model, {"stages": [{"at": at, "reducer": "unit_drop", "keep": 2}]}, plugins=manager) as run:
        with torch.no_grad():
            model(**inputs)
        (stage,) = run.stats.last_prefill.stages
    images = (inputs["input_ids"] == adapter.image_token_id()).sum(1).tolist()
    assert stage.entering == images == [4, 8] and stage.leaving == [2, 2]
    k, probe = default_cut_layer(adapter)
    case = checks.adapter_case(
        model, make_inputs, [1, 2, 1], plugins=manager, pad_token_id=builder.pad, layer=k, probe_layer=probe, at=at
    )
    for check in (checks.keep_all_is_identity, checks.cached_decode_equals_recompute, checks.batch_equals_one_by_one):
        check(case)
