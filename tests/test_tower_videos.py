"""Vision attention on the video tokens of the packed-tower families (Qwen3.5, GLM-4.xV, ERNIE-4.5-VL).

``get_video_features`` runs the same packed tower as the images, one attention sequence per temporal patch of
``video_grid_thw`` (``cu_seqlens`` per frame): Qwen3.5 through ``get_image_features``, GLM-4.xV with one ``(1, h, w)``
grid per frame, ERNIE directly, whose resampler then merges each 2x2 unit of two consecutive frames into one token
(``_temporal_slicing``). The adapters' ``map_vision_video_patches`` map the frames' sequences to the video tokens.

Checked on the census's tiny models and video inputs (tests/test_families.py): the map against the model itself (a
push at one patch of the video call's probed attention moves exactly the tokens the map marks, as the check kit's
image check does for ``get_image_features``), against a direct computation of each token's patches, and VisionZip
(``attention: mean``) at ``post_projector`` keeping the tokens of highest score, those scores computed from the
tower's eager attention weights and the documented grouping (a padded batch of two video sizes, equal to one by one;
an image beside a video where the stock model takes one: Qwen3.5, ERNIE).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_families import _skip_unless, _video_inputs
from test_families_towers import GLM, TOWERS, _built, _manager, _params
from torch import Tensor
from video_tower_checks import (
    expected_scores,
    images_and_videos_ranked_together,
    top,
    unit,
    video_map_matches_the_model,
    videos_only,
    visionzip,
)

import tokenprune as tp
from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.generic import adapter_for
from tokenprune.engine import compat
from tokenprune.testing.census import build_tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: The types whose census inputs hold videos (GLM-4.6V's tower is GLM-4.1V's class; GLM-Image takes no videos).
VIDEO = ["qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe", "glm_ocr", "ernie4_5_vl_moe"]
#: Types whose stock model takes an image beside a video in one prompt (GLM-4.xV's counts them as one more video).
MIXED = ["qwen3_5", "ernie4_5_vl_moe"]
#: The frames (temporal patches) per video: ERNIE merges them in pairs.
FRAMES = 2


def _frame_merge(model_type: str) -> int:
    """How many temporal patches make one frame of video tokens (ERNIE's resampler merges two)."""
    return 2 if model_type == "ernie4_5_vl_moe" else 1


@pytest.mark.parametrize("model_type", sorted(TOWERS))
def test_the_packed_towers_serve_video_tokens(model_type):
    """Every packed-tower family's tower is also watched during ``get_video_features`` (``VisionTower.videos``)."""
    _skip_unless(model_type)
    with torch.device("meta"):
        model = build_tiny(model_type)
    tower = adapter_for(model, _manager()).vision_tower()
    assert tower.videos and not tower.video_layers and not tower.has_cls


@pytest.mark.parametrize("model_type", _params(VIDEO))
def test_video_patches_map_to_the_tokens_the_model_builds_from_them(model_type):
    """Two videos of different sizes (2x2 and 2x4 units a frame, two frames): the probe records one sequence per
    frame during the video call; a value at the first, second, middle or last patch of frames 0, 1 and the last maps
    to exactly the video tokens that move when that patch's attention output at the probed block is pushed (ERNIE:
    frames 0 and 1 feed the same tokens), and mapping ones gives every token 1 (a mean)."""
    model, adapter, builder, _ = _built(model_type)
    inputs = _video_inputs(builder, FRAMES)([1, 1])
    lengths = video_map_matches_the_model(model, adapter, inputs)
    grid = inputs["video_grid_thw"]
    assert lengths == [h * w for t, h, w in grid.tolist() for _ in range(t)]
    tokens = sum(
        len(m)
        for m in adapter.map_vision_video_patches(
            ImageCall((None, grid), {}, None), [torch.ones(n, 1) for n in lengths]
        )
    )
    assert tokens == int(grid.prod(-1).sum()) // 4 // _frame_merge(model_type)


@pytest.mark.parametrize("model_type", sorted(TOWERS))
def test_each_video_token_is_the_mean_of_its_units_patches(model_type):
    """Computed directly: a video of ``t`` frames of 2x4 units (grid ``(t, 4, 8)``), frame ``f``'s token ``j`` the mean
    of the frame's patches ``4j .. 4j + 3`` (the processor stores a unit's patches together); ERNIE's token ``(k, j)``
    the mean of unit ``j``'s patches in frames ``2k`` and ``2k + 1`` (a one-frame video its frame, the resampler
    duplicating it; a third frame, which fills no pair, dropped as the resampler drops it)."""
    _skip_unless(model_type)
    with torch.device("meta"):
        model = build_tiny(model_type)
    adapter = adapter_for(model, _manager())
    grid = torch.tensor([[4, 4, 8], [1, 4, 4], [3, 2, 4]])
    sizes = [32] * 4 + [16] + [8] * 3
    values = [torch.randn(n, 3, generator=torch.Generator().manual_seed(7 + i)) for i, n in enumerate(sizes)]
    mapped = adapter.map_vision_video_patches(ImageCall((None, grid), {}, None), values)
    frames = [values[0:4], values[4:5], values[5:8]]
    if model_type == "ernie4_5_vl_moe":
        pairs = [[(0, 1), (2, 3)], [(0, 0)], [(0, 1)]]
    else:
        pairs = [[(f, f) for f in range(len(v))] for v in frames]
    expected = [
        torch.stack([(unit(v[a], j) + unit(v[b], j)) / 2 for a, b in pair for j in range(v[0].shape[0] // 4)])
        for v, pair in zip(frames, pairs, strict=True)
    ]
    assert len(mapped) == 3
    for got, want in zip(mapped, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _expected_scores(model_type: str, model: torch.nn.Module, adapter: Any, inputs: dict[str, Any]) -> list[Tensor]:
    """Per sample, the scores of its visual tokens in sequence order (its image's, then its video's): each token the
    mean of its unit's patches' eager scores (ERNIE's video token: over both frames of its pair)."""
    attention = compat.vision_attention_module(adapter.tower().blocks[-1])
    return expected_scores(model.model, attention, inputs, _frame_merge(model_type))


def _sharp(model_type: str) -> tuple[torch.nn.Module, Any, Any, Any]:
    """The tiny model with its probed block's ``qkv`` weights scaled by 10: at the census's init (std 0.02) the
    tower's attention is nearly uniform, every token's score within ``1e-6`` of ``1 / S``, and a keep decided by
    ties would test nothing."""
    model, adapter, builder, manager = _built(model_type)
    with torch.no_grad():
        compat.vision_attention_module(adapter.tower().blocks[-1]).qkv.weight.mul_(10.0)
    return model, adapter, builder, manager


@pytest.mark.parametrize("model_type", _params(VIDEO))
def test_visionzip_keeps_the_video_tokens_of_highest_tower_attention(model_type):
    """VisionZip (dominant tokens only, ``attention: mean``) at ``post_projector`` on a padded batch of two video-only
    prompts of different video sizes: each sample keeps the tokens of highest score (its tower's eager attention
    received per patch, averaged over each token's patches), and the batch keeps and predicts what each sample does
    alone."""
    model, adapter, builder, manager = _sharp(model_type)
    make_inputs = videos_only(_video_inputs(builder, FRAMES), adapter.image_token_id(), builder.pad)
    inputs = make_inputs([1, 1])
    expected = _expected_scores(model_type, model, adapter, inputs)
    keep = 3
    with tp.apply(model, visionzip(keep), plugins=manager) as run, torch.no_grad():
        out = model(**inputs).logits
        (stage,) = run.stats.last_prefill.stages
        assert (
            stage.entering
            == [len(s) for s in expected]
            == [8 // _frame_merge(model_type), 16 // _frame_merge(model_type)]
        )
        assert stage.leaving == [keep, keep]
        assert [sorted(k) for k in stage.kept] == [top(s, keep) for s in expected]
        for i in range(2):
            alone = model(**make_inputs([1], start=i)).logits
            assert sorted(run.stats.last_prefill.stages[0].kept[0]) == sorted(stage.kept[i])
            torch.testing.assert_close(alone[0, -1], out[i, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", _params(MIXED))
def test_visionzip_ranks_an_image_and_a_video_together(model_type):
    """An image beside a video in each sample: ``tokens: all`` ranks the image's tokens (the image call's scores) and
    the video's (the video call's) together and keeps the highest; ``tokens: video`` keeps the video's highest only
    (the image entering nothing)."""
    model, adapter, builder, manager = _sharp(model_type)
    inputs = _video_inputs(builder, FRAMES)([1, 1])
    expected = _expected_scores(model_type, model, adapter, inputs)
    images_and_videos_ranked_together(model, adapter, manager, inputs, expected)


@pytest.mark.parametrize("model_type", [t for t in VIDEO if t in GLM])
def test_fastvid_runs_on_glm_videos(model_type):
    """FastVID reads the tower's ``mean`` attention per frame, now served on GLM-4.xV's typed video tokens."""
    model, _, builder, manager = _built(model_type)
    inputs = _video_inputs(builder, 4)([1, 1])
    stage = {"at": "post_projector", "tokens": "video", "reducer": "fastvid", "keep": 0.5}
    with tp.apply(model, {"stages": [stage]}, plugins=manager) as run, torch.no_grad():
        model(**inputs)
        (s,) = run.stats.last_prefill.stages
    assert s.entering == [16, 32] and all(0 < n < e for n, e in zip(s.leaving, s.entering, strict=True))
