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

import sys
from typing import Any

import pytest
import torch
from test_families import _skip_unless, _video_inputs
from test_families_towers import GLM, TOWERS, _built, _manager, _params
from torch import Tensor

import tokenprune as tp
from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.generic import adapter_for
from tokenprune.engine import compat
from tokenprune.engine.vision_probe import VisionProbe
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


def _videos_only(make_inputs: Any, image_token: int, pad: int) -> Any:
    """The census's video inputs without their images: the image placeholders left out of every ``(B, L)`` tensor
    (rows padded on the left again), no ``pixel_values`` or ``image_grid_thw`` (GLM-4.xV's have none already)."""

    def make(specs: list[Any], start: int = 0) -> dict[str, Any]:
        out = make_inputs(specs, start)
        if out.pop("image_grid_thw", None) is None:
            return out
        out.pop("pixel_values")
        ids = out["input_ids"]
        keep = [row != image_token for row in ids]
        longest = max(int(k.sum()) for k in keep)
        for name, value in list(out.items()):
            if isinstance(value, Tensor) and tuple(value.shape) == tuple(ids.shape):
                fill = pad if name == "input_ids" else 0
                rows = [row[k] for row, k in zip(value, keep, strict=True)]
                out[name] = torch.stack([torch.cat([row.new_full((longest - len(row),), fill), row]) for row in rows])
        return out

    return make


def _video_call(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the model's one ``get_video_features`` call on ``inputs``."""
    vlm, seen = model.model, []
    original = vlm.get_video_features

    def record(*args: Any, **kwargs: Any) -> Any:
        seen.append((args, kwargs))
        return original(*args, **kwargs)

    vlm.get_video_features = record
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        del vlm.get_video_features
    assert len(seen) == 1
    return seen[0]


def _video_features(model: torch.nn.Module, call: tuple[Any, ...], attention: Any, flat: int | None) -> Tensor:
    """Every video's tokens, ``(n, D)``, with row ``flat`` of the probed attention's packed output pushed."""

    def push(module: torch.nn.Module, args: Any, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output
        rows = out.reshape(-1, out.shape[-1]).clone()
        rows[flat] += torch.linspace(-50.0, 50.0, rows.shape[-1], dtype=rows.dtype)
        out = rows.reshape(out.shape)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handle = attention.register_forward_hook(push) if flat is not None else None
    try:
        with torch.no_grad():
            out = model.model.get_video_features(*call[0], **call[1])
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat([f.reshape(-1, f.shape[-1]).float() for f in ImageCall((), {}, out).features()])


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
    tower = adapter.vision_tower()
    layer = tower.feature_layer
    args, kwargs = _video_call(model, inputs)
    probe = VisionProbe(tower, {layer: (frozenset({"mean"}), False, False)})
    probe.install()
    try:
        probe.begin("video")
        with torch.no_grad():
            model.model.get_video_features(*args, **kwargs)
        probe.active = False
        lengths = [int(s.shape[0]) for s in probe.video_records[layer].scores["mean"]]
    finally:
        probe.remove()
    grid = inputs["video_grid_thw"]
    assert lengths == [h * w for t, h, w in grid.tolist() for _ in range(t)]
    call, attention = ImageCall(args, kwargs, None), compat.vision_attention_module(tower.layers[layer])
    base = _video_features(model, (args, kwargs), attention, None)
    offsets = [sum(lengths[:r]) for r in range(len(lengths))]
    for r in (0, 1, len(lengths) - 1):
        for p in sorted({0, 1, lengths[r] // 2, lengths[r] - 1}):
            values = [torch.zeros(n, 1) for n in lengths]
            values[r][p] = 1.0
            marked = torch.cat(adapter.map_vision_video_patches(call, values)).reshape(-1).abs() > 1e-9
            moved = (_video_features(model, (args, kwargs), attention, offsets[r] + p) - base).abs().amax(-1) > 1e-4
            assert marked.shape == moved.shape and torch.equal(marked, moved), (r, p, marked.nonzero(), moved.nonzero())
            assert int(marked.sum()) == 1
    ones = torch.cat(adapter.map_vision_video_patches(call, [torch.ones(n, 1) for n in lengths])).reshape(-1)
    torch.testing.assert_close(ones, torch.ones_like(ones), rtol=0, atol=1e-6)
    assert ones.numel() == int(grid.prod(-1).sum()) // 4 // _frame_merge(model_type)


def _unit(v: Tensor, j: int) -> Tensor:
    return v[4 * j : 4 * j + 4].mean(0)


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
        torch.stack([(_unit(v[a], j) + _unit(v[b], j)) / 2 for a, b in pair for j in range(v[0].shape[0] // 4)])
        for v, pair in zip(frames, pairs, strict=True)
    ]
    assert len(mapped) == 3
    for got, want in zip(mapped, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _eager_scores(model: torch.nn.Module, attention: torch.nn.Module, run: Any) -> list[Tensor]:
    """Per call of ``attention`` during ``run()`` (one per frame), the attention each key position receives under
    eager attention, averaged over heads and query rows: ``(S,)``."""
    seen: list[Tensor] = []
    swapped = (attention.config, compat.swap_attention_implementation(attention.config, "eager"))
    module = sys.modules[type(attention).__module__]
    stock = module.eager_attention_forward

    def capture(mod: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        out, weights = stock(mod, *args, **kwargs)
        if mod is attention:
            seen.append(weights.detach().float()[0].mean(0).mean(0))
        return out, weights

    module.eager_attention_forward = capture
    try:
        with torch.no_grad():
            run()
    finally:
        module.eager_attention_forward = stock
        compat.restore_attention_implementation(*swapped)
    return seen


def _expected_scores(model_type: str, model: torch.nn.Module, adapter: Any, inputs: dict[str, Any]) -> list[Tensor]:
    """Per sample, the scores of its visual tokens in sequence order (its image's, then its video's): each token the
    mean of its unit's patches' eager scores (ERNIE's video token: over both frames of its pair)."""
    vlm, attention = model.model, compat.vision_attention_module(adapter.tower().blocks[-1])
    grid = inputs["video_grid_thw"]
    frames = _eager_scores(model, attention, lambda: vlm.get_video_features(inputs["pixel_values_videos"], grid))
    merge, videos, start = _frame_merge(model_type), [], 0
    for t, _, _ in grid.tolist():
        units = [torch.stack([_unit(s, j) for j in range(s.shape[0] // 4)]) for s in frames[start : start + t]]
        videos.append(torch.cat([sum(units[k : k + merge]) / merge for k in range(0, t, merge)]))
        start += t
    images: list[Tensor] = []
    if "image_grid_thw" in inputs:
        pixels, image_grid = inputs["pixel_values"], inputs["image_grid_thw"]
        scores = _eager_scores(model, attention, lambda: vlm.get_image_features(pixels, image_grid))
        images = [torch.stack([_unit(s, j) for j in range(s.shape[0] // 4)]) for s in scores]  # one frame each
    return [torch.cat([images[i], videos[i]]) if images else videos[i] for i in range(len(videos))]


def _sharp(model_type: str) -> tuple[torch.nn.Module, Any, Any, Any]:
    """The tiny model with its probed block's ``qkv`` weights scaled by 10: at the census's init (std 0.02) the
    tower's attention is nearly uniform, every token's score within ``1e-6`` of ``1 / S``, and a keep decided by
    ties would test nothing."""
    model, adapter, builder, manager = _built(model_type)
    with torch.no_grad():
        compat.vision_attention_module(adapter.tower().blocks[-1]).qkv.weight.mul_(10.0)
    return model, adapter, builder, manager


def _visionzip(keep: int, tokens: str = "all") -> dict[str, Any]:
    stage = {"at": "post_projector", "reducer": "visionzip", "keep": keep, "tokens": tokens}
    stage["params"] = {"contextual_ratio": 0.0, "attention": "mean"}
    return {"stages": [stage]}


def _top(scores: Tensor, keep: int) -> list[int]:
    order = scores.argsort(descending=True, stable=True)
    assert float(scores[order[keep - 1]] - scores[order[keep]]) > 1e-5  # no tie at the cut: the keep is decided
    return sorted(order[:keep].tolist())


@pytest.mark.parametrize("model_type", _params(VIDEO))
def test_visionzip_keeps_the_video_tokens_of_highest_tower_attention(model_type):
    """VisionZip (dominant tokens only, ``attention: mean``) at ``post_projector`` on a padded batch of two video-only
    prompts of different video sizes: each sample keeps the tokens of highest score (its tower's eager attention
    received per patch, averaged over each token's patches), and the batch keeps and predicts what each sample does
    alone."""
    model, adapter, builder, manager = _sharp(model_type)
    make_inputs = _videos_only(_video_inputs(builder, FRAMES), adapter.image_token_id(), builder.pad)
    inputs = make_inputs([1, 1])
    expected = _expected_scores(model_type, model, adapter, inputs)
    keep = 3
    with tp.apply(model, _visionzip(keep), plugins=manager) as run, torch.no_grad():
        out = model(**inputs).logits
        (stage,) = run.stats.last_prefill.stages
        assert (
            stage.entering
            == [len(s) for s in expected]
            == [8 // _frame_merge(model_type), 16 // _frame_merge(model_type)]
        )
        assert stage.leaving == [keep, keep]
        assert [sorted(k) for k in stage.kept] == [_top(s, keep) for s in expected]
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
    images = (inputs["input_ids"] == adapter.image_token_id()).sum(1).tolist()
    assert images == [4, 8]
    for tokens, keep in (("all", 5), ("video", 2)):
        with tp.apply(model, _visionzip(keep, tokens), plugins=manager) as run, torch.no_grad():
            model(**inputs)
            (stage,) = run.stats.last_prefill.stages
        scores = expected if tokens == "all" else [s[n:] for s, n in zip(expected, images, strict=True)]
        assert stage.entering == [len(s) for s in scores]
        assert [sorted(k) for k in stage.kept] == [_top(s, keep) for s in scores]


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
