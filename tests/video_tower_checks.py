"""Checks of vision attention on video tokens, shared by the packed-tower families' video tests
(tests/test_tower_videos.py: Qwen3.5, GLM-4.xV, ERNIE-4.5-VL; tests/test_tower_qwen_videos.py: Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, the Qwen2.5-Omni and Qwen3-Omni thinkers; LFM3-VL's), and :func:`video_call` by Gemma 4's and
LLaVA-NeXT-Video's.

* :func:`video_map_matches_the_model`: the check kit's video check
  (:func:`tokenprune.testing.video_towers.video_patches_map_to_tokens`: a push at one position of the probed
  attention's output during ``get_video_features`` moves exactly the video tokens the map marks), and one token per
  pushed position, as these families build a token from one unit's patches.
* :func:`expected_scores`: each visual token's score computed directly from the tower's eager attention (per call,
  averaged over heads and query rows) and the documented grouping (a token the mean of its unit's ``m * m``
  patches; a unit's place in a frame given by ``places``, e.g. Qwen2.5-VL's window order; ERNIE's frame pairs).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import tokenprune as tp
from tokenprune.adapters.base import ImageCall
from tokenprune.engine import compat
from tokenprune.testing.adapters import pushed_positions
from tokenprune.testing.video_towers import recorded_call, video_patches_map_to_tokens

#: ``(h, w)`` units of a frame -> the raster unit at each place of the tower's sequence (``None``: raster order).
Places = Callable[[int, int], list[int]] | None


def videos_only(make_inputs: Any, image_token: int, pad: int) -> Any:
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


def video_call(model: torch.nn.Module, vlm: Any, inputs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the one ``get_video_features`` call of base model ``vlm`` while ``model`` runs
    ``inputs`` (the check kit's recorder)."""
    return recorded_call(model, vlm, "get_video_features", inputs)


def video_map_matches_the_model(
    model: torch.nn.Module, adapter: Any, inputs: dict[str, Any], layer: int | None = None
) -> list[int]:
    """The check kit's :func:`~tokenprune.testing.video_towers.video_patches_map_to_tokens` (the map against the
    model at the pushed positions of sequences 0, 1 and the last), and, as the families here build every video token
    from one unit's patches: each of those positions maps to one token, and mapping ones gives every token 1 (the
    kit's looser check leaves out tokens built from no patch). Returns the recorded sequences' lengths."""
    lengths = video_patches_map_to_tokens(model, inputs, adapter=adapter, layer=layer)
    call = ImageCall(*video_call(model, adapter.vlm(), inputs), None)
    for r in sorted({0, min(1, len(lengths) - 1), len(lengths) - 1}):
        for p in pushed_positions(lengths[r]):
            values = [torch.zeros(n, 1) for n in lengths]
            values[r][p] = 1.0
            assert int((torch.cat(adapter.map_vision_video_patches(call, values)).abs() > 1e-9).sum()) == 1, (r, p)
    ones = torch.cat(adapter.map_vision_video_patches(call, [torch.ones(n, 1) for n in lengths])).reshape(-1)
    torch.testing.assert_close(ones, torch.ones_like(ones), rtol=0, atol=1e-6)
    return lengths


def unit(v: Tensor, j: int) -> Tensor:
    """The mean of unit ``j``'s 4 patches (stored together) in one tower sequence ``v``."""
    return v[4 * j : 4 * j + 4].mean(0)


def eager_scores(attention: torch.nn.Module, run: Any) -> list[Tensor]:
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


def frame_tokens(scores: Tensor, h: int, w: int, places: Places = None) -> Tensor:
    """One frame's token scores in raster order, ``(h * w,)``: unit ``u``'s the mean of the patches at its place in
    the frame's sequence ``scores`` (``places(h, w)[k]``: the raster unit at place ``k``)."""
    means = torch.stack([unit(scores, k) for k in range(h * w)])
    if places is None:
        return means
    out = torch.empty_like(means)
    out[torch.tensor(places(h, w))] = means
    return out


def expected_scores(
    vlm: Any, attention: torch.nn.Module, inputs: dict[str, Any], merge: int = 1, places: Places = None
) -> list[Tensor]:
    """Per sample, the scores of its visual tokens in sequence order (its image's, then its video's), from the eager
    attention of ``attention`` (the probed block's) during the image and video calls: each token the mean of its
    unit's patches in its frame (``places``: where each unit sits in a frame's sequence; ``merge``: frames of one
    token, ERNIE's 2, whose token is the mean over both frames of its pair)."""
    grid = inputs["video_grid_thw"]
    frames = eager_scores(attention, lambda: vlm.get_video_features(inputs["pixel_values_videos"], grid))
    videos, start = [], 0
    for t, h, w in grid.tolist():
        units = [frame_tokens(s, h // 2, w // 2, places) for s in frames[start : start + t]]
        videos.append(torch.cat([sum(units[k : k + merge]) / merge for k in range(0, t, merge)]))
        start += t
    if "image_grid_thw" not in inputs:
        return videos
    pixels, image_grid = inputs["pixel_values"], inputs["image_grid_thw"]
    scores = eager_scores(attention, lambda: vlm.get_image_features(pixels, image_grid))
    images = [frame_tokens(s, h // 2, w // 2, places) for s, (_, h, w) in zip(scores, image_grid.tolist(), strict=True)]
    return [torch.cat([images[i], videos[i]]) for i in range(len(videos))]


def visionzip(keep: int, tokens: str = "all") -> dict[str, Any]:
    """VisionZip's dominant tokens only (``attention: mean``) at ``post_projector``."""
    stage = {"at": "post_projector", "reducer": "visionzip", "keep": keep, "tokens": tokens}
    stage["params"] = {"contextual_ratio": 0.0, "attention": "mean"}
    return {"stages": [stage]}


def top(scores: Tensor, keep: int) -> list[int]:
    """The ``keep`` highest positions of ``scores`` (no tie at the cut: the keep is decided)."""
    order = scores.argsort(descending=True, stable=True)
    assert float(scores[order[keep - 1]] - scores[order[keep]]) > 1e-5
    return sorted(order[:keep].tolist())


def images_and_videos_ranked_together(
    model: torch.nn.Module, adapter: Any, manager: Any, inputs: dict[str, Any], expected: list[Tensor]
) -> None:
    """An image (2x2 and 2x4 units) beside a video in each sample, ``expected`` each sample's scores (image tokens
    first): ``tokens: all`` keeps the highest of both, ``tokens: video`` the video's highest only."""
    images = (inputs["input_ids"] == adapter.image_token_id()).sum(1).tolist()
    assert images == [4, 8]
    for tokens, keep in (("all", 5), ("video", 2)):
        with tp.apply(model, visionzip(keep, tokens), plugins=manager) as run, torch.no_grad():
            model(**inputs)
            (stage,) = run.stats.last_prefill.stages
        scores = expected if tokens == "all" else [s[n:] for s, n in zip(expected, images, strict=True)]
        assert stage.entering == [len(s) for s in scores]
        assert [sorted(k) for k in stage.kept] == [top(s, keep) for s in scores]
