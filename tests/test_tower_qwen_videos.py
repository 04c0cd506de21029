"""Vision attention on the video tokens of the Qwen packed towers: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE)
and the Qwen2.5-Omni and Qwen3-Omni thinkers (``Qwen2VLTower`` / ``Qwen3VLTower``).

``get_video_features`` runs the images' tower on ``video_grid_thw``, one attention sequence per temporal patch
(``cu_seqlens`` per frame): Qwen2-VL's, Qwen2.5-VL's and the thinkers' directly, Qwen3-VL's through
``get_image_features`` (the engine records the outer video call; the nested image call's sequences are the video's).
Qwen2.5-VL's and Qwen2.5-Omni's towers hold each frame's merge units in window order (``get_window_index`` per
temporal patch): one sequence per frame at a full-attention block, one per window at a windowed block. The checks
that must see that reordering run with windows of 2 units (``window_size`` 56: a frame 2 x 4 units wide runs as
units 0 1 4 5 2 3 6 7), the census's windows of 4 units holding its frames whole.

Checked on the census's tiny thinkers and video inputs (tests/test_families.py) and on the tiny Qwen2-VL, Qwen2.5-VL
and Qwen3-VL of tests/tiny_models.py (videos of the same sizes): the map against the model itself (a
push at one patch of the video call's probed attention moves exactly the tokens the map marks; at a full-attention
and at a windowed block; a map that forgets the window order fails it), against a direct computation of each token's
patches, and VisionZip (``attention: mean``) at ``post_projector`` keeping the tokens of highest score, those scores
computed from the tower's eager attention and the documented grouping (a padded batch of two video sizes, equal to
one by one; an image beside a video with ``tokens: all`` and ``tokens: video``).
"""

from __future__ import annotations

from typing import Any

import pytest
import tiny_models as tm
import tokenprune_visionzip
import torch
from engine_fixtures import manager_with
from test_families import _skip_unless, _video_inputs
from test_tower_omni_thinkers import window_order
from video_tower_checks import (
    expected_scores,
    frame_tokens,
    images_and_videos_ranked_together,
    top,
    video_map_matches_the_model,
    videos_only,
    visionzip,
)

import tokenprune as tp
from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.generic import adapter_for
from tokenprune.adapters.vision import merged_unit_means
from tokenprune.engine import compat
from tokenprune.testing.adapters import AdapterCheckError
from tokenprune.testing.census import build_tiny
from tokenprune.testing.census_inputs import InputBuilder
from tokenprune.testing.video_towers import video_patches_map_to_tokens

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TYPES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2_5_omni_thinker", "qwen3_omni_moe_thinker"]
#: Model type -> the adapter that serves it.
ADAPTERS = {
    **dict.fromkeys(["qwen2_vl", "qwen2_5_vl"], "qwen2_vl"),
    **dict.fromkeys(["qwen3_vl", "qwen3_vl_moe"], "qwen3_vl"),
    **{t: t for t in ("qwen2_5_omni_thinker", "qwen3_omni_moe_thinker")},
}
#: The types whose tower runs window attention (Qwen2.5-VL's): their checks run with windows of 2 units.
WINDOWED = {"qwen2_5_vl", "qwen2_5_omni_thinker"}
#: Window side in merge units, and the tower's ``window_size`` (pixels) that gives it.
SIDE, WINDOW = 2, 56
FRAMES = 2


def _built(model_type: str, full: list[int] | None = None) -> tuple[Any, ...]:
    """The tiny model, its adapter, its inputs (``make(images)`` -> ``make_inputs(specs, start)``, sample ``i`` a video
    of two frames 2 x 2 units (``i`` even) or 2 x 4 units (odd), after an image of that size with ``images``) and a
    plugin manager with VisionZip; windowed towers with windows of 2 units (and full attention at ``full``).

    The thinkers are the census's; Qwen2-VL, Qwen2.5-VL and Qwen3-VL the tiny models of tests/tiny_models.py.
    """
    manager = manager_with(tokenprune_visionzip)
    if model_type in tm.BUILDERS:
        tiny = tm.BUILDERS[model_type]()
        model, adapter = tiny.model, adapter_for(tiny.model, manager)

        def make(images: bool) -> Any:
            def spec(i: int) -> list[Any]:
                size = (56, 56 * (1 + i % 2))
                return [size, tm.Video(2 * FRAMES, *size)] if images else [tm.Video(2 * FRAMES, *size)]

            return lambda specs, start=0: tiny.make_inputs([spec(i) for i in range(start, start + len(specs))], start)

    else:
        _skip_unless(model_type)
        model = build_tiny(model_type)
        adapter = adapter_for(model, manager)
        builder = InputBuilder(model, adapter)

        def make(images: bool) -> Any:
            with_images = _video_inputs(builder, FRAMES)
            return with_images if images else videos_only(with_images, adapter.image_token_id(), builder.pad)

    if model_type in WINDOWED:
        visual = adapter.vlm().visual
        visual.window_size = visual.config.window_size = WINDOW
        if full is not None:
            visual.fullatt_block_indexes = visual.config.fullatt_block_indexes = full
    return model, adapter, make, manager


def _places(model_type: str) -> Any:
    """Where each unit of a frame sits in the tower's sequence (window order), or ``None`` (raster order)."""
    return (lambda h, w: window_order(h, w, SIDE)) if model_type in WINDOWED else None


@pytest.mark.parametrize("model_type", TYPES)
def test_the_towers_serve_video_tokens(model_type):
    """The tower is also watched during ``get_video_features`` (``VisionTower.videos``), through its own blocks."""
    _, adapter, _, _ = _built(model_type)
    tower = adapter.vision_tower()
    assert adapter.name == ADAPTERS[model_type]
    assert tower.videos and not tower.video_layers and not tower.has_cls
    assert tower.layers == tuple(adapter.vlm().visual.blocks)


def _map_cases() -> list[Any]:
    cases = [(t, "default") for t in TYPES] + [(t, "windowed_block") for t in sorted(WINDOWED)]
    return [pytest.param(*c, id="-".join(c)) for c in cases]


@pytest.mark.parametrize(("model_type", "block"), _map_cases())
def test_video_patches_map_to_the_tokens_the_model_builds_from_them(model_type, block):
    """Two videos of different sizes (2x2 and 2x4 units a frame, two frames): at the probed block (the default, a
    full-attention block: one sequence per frame; ``windowed_block``: full attention at block 0 only, the last block
    windowed and probed, one sequence per window of 2x2 units) a value at the first, second, middle or last patch of
    sequences 0, 1 and the last maps to exactly the video token that moves when that patch's attention output is
    pushed, and mapping ones gives every token 1 (a mean)."""
    windowed = block == "windowed_block"
    model, adapter, make, _ = _built(model_type, full=[0] if windowed else None)
    inputs = make(True)([1, 1])
    grid = inputs["video_grid_thw"]
    lengths = video_map_matches_the_model(model, adapter, inputs, layer=1 if windowed else None)
    per_frame = [h * w for t, h, w in grid.tolist() for _ in range(t)]
    assert lengths == ([16] * (sum(per_frame) // 16) if windowed else per_frame)


def test_a_map_that_forgets_the_window_order_fails_the_check():
    """The check can fail: the consecutive-units map on Qwen2.5-VL's windows of 2 units (the 2x4-unit video)."""
    model, adapter, make, _ = _built("qwen2_5_vl")
    inputs = make(True)([1, 1])
    adapter.map_vision_video_patches = lambda call, values: merged_unit_means(call.arg("video_grid_thw", 1), values, 4)
    with pytest.raises(
        AdapterCheckError, match=r"position \d+ of video tower sequence \d+ maps to tokens \[\d+\], but"
    ):
        video_map_matches_the_model(model, adapter, inputs)


@pytest.mark.parametrize("model_type", TYPES)
def test_each_video_token_is_the_mean_of_its_units_patches(model_type):
    """Computed directly: videos of grids ``(4, 4, 8)``, ``(1, 4, 4)`` and ``(3, 2, 4)``, one sequence per frame;
    frame ``f``'s token ``u`` (raster order) the mean of the 4 patches at the unit's place in the frame's sequence
    (Qwen2.5-VL's window order of 2 units per frame: a 2 x 4-unit frame's places hold units 0 1 4 5 2 3 6 7)."""
    _, adapter, _, _ = _built(model_type)
    grid = torch.tensor([[4, 4, 8], [1, 4, 4], [3, 2, 4]])
    sizes = [32] * 4 + [16] + [8] * 3
    values = [torch.randn(n, 3, generator=torch.Generator().manual_seed(7 + i)) for i, n in enumerate(sizes)]
    mapped = adapter.map_vision_video_patches(ImageCall((None, grid), {}, None), values)
    frames, places = [values[0:4], values[4:5], values[5:8]], _places(model_type)
    assert len(mapped) == 3
    for got, video, (_, h, w) in zip(mapped, frames, grid.tolist(), strict=True):
        want = torch.cat([_frame(v, h // 2, w // 2, places) for v in video])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _frame(v: torch.Tensor, h: int, w: int, places: Any) -> torch.Tensor:
    """``frame_tokens`` per channel of ``v`` (``(h * w * 4, C)``): ``(h * w, C)``."""
    return torch.stack([frame_tokens(v[:, c], h, w, places) for c in range(v.shape[1])], -1)


def _sharp(model_type: str) -> tuple[Any, ...]:
    """The tiny model with its probed block's ``qkv`` (``q``, ``k``, ``v``) weights scaled by 10 (at the census's init the tower's attention
    is nearly uniform and a keep decided by ties would test nothing), and that block's attention."""
    model, adapter, make, manager = _built(model_type)
    tower = adapter.vision_tower()
    attention = compat.vision_attention_module(tower.layers[tower.feature_layer])
    with torch.no_grad():  # Qwen2.5-Omni's attention projects q, k and v apart
        for name in ("qkv", "q", "k", "v"):
            if hasattr(attention, name):
                getattr(attention, name).weight.mul_(10.0)
    return model, adapter, make, manager, attention


@pytest.mark.parametrize("model_type", TYPES)
def test_visionzip_keeps_the_video_tokens_of_highest_tower_attention(model_type):
    """VisionZip (dominant tokens only, ``attention: mean``) at ``post_projector`` on a padded batch of two video-only
    prompts of different video sizes: each sample keeps the tokens of highest score (the tower's eager attention
    received per patch at the probed block, averaged over each token's patches at their window places), and the
    batch keeps and predicts what each sample does alone."""
    model, adapter, make, manager, attention = _sharp(model_type)
    make_inputs = make(False)
    inputs = make_inputs([1, 1])
    expected = expected_scores(adapter.vlm(), attention, inputs, places=_places(model_type))
    keep = 3
    with tp.apply(model, visionzip(keep), plugins=manager) as run, torch.no_grad():
        out = model(**inputs).logits
        (stage,) = run.stats.last_prefill.stages
        assert stage.entering == [len(s) for s in expected] == [8, 16]
        assert stage.leaving == [keep, keep]
        assert [sorted(k) for k in stage.kept] == [top(s, keep) for s in expected]
        for i in range(2):
            alone = model(**make_inputs([1], start=i)).logits
            assert sorted(run.stats.last_prefill.stages[0].kept[0]) == sorted(stage.kept[i])
            torch.testing.assert_close(alone[0, -1], out[i, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", TYPES)
def test_visionzip_ranks_an_image_and_a_video_together(model_type):
    """An image beside a video in each sample (images 2x2 and 2x4 units): ``tokens: all`` ranks the image's tokens
    (the image call's scores) and the video's (the video call's) together and keeps the highest; ``tokens: video``
    keeps the video's highest only (the image entering nothing)."""
    model, adapter, make, manager, attention = _sharp(model_type)
    inputs = make(True)([1, 1])
    expected = expected_scores(adapter.vlm(), attention, inputs, places=_places(model_type))
    images_and_videos_ranked_together(model, adapter, manager, inputs, expected)


def test_the_kits_video_check_finds_the_adapter_as_apply_does():
    """``tokenprune.testing.video_towers.video_patches_map_to_tokens`` called as an adapter author would, with the
    model and a batch of videos only: the adapter resolved from the installed plugins, one sequence per frame."""
    model, _, make, _ = _built("qwen2_vl")
    inputs = make(False)([1, 1])
    per_frame = [h * w for t, h, w in inputs["video_grid_thw"].tolist() for _ in range(t)]
    assert video_patches_map_to_tokens(model, inputs) == per_frame


def test_the_kits_video_check_names_an_adapter_without_video_attention():
    model, adapter, make, _ = _built("qwen2_vl")
    adapter.vision_tower = lambda: None
    with pytest.raises(AdapterCheckError, match=r"'qwen2_vl' adapter gives no vision attention on video tokens"):
        video_patches_map_to_tokens(model, make(False)([1, 1]), adapter=adapter)
