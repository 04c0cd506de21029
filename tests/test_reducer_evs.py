"""EVS: the contract, an independent port of vLLM's ``compute_retention_mask``, the engine."""

from __future__ import annotations

import dataclasses

import pytest
import tiny_models as tm
import torch
from engine_fixtures import pipe
from tokenprune_evs import EVS, retained_count

import tokenprune as tp
from tokenprune.layout import TokenLayout
from tokenprune.testing import check_reducer, make_reduce_inputs


def vllm_evs(embeds: torch.Tensor, frames: int, rows: int, cols: int, q: float) -> list[int]:
    """The rows of one video (``(F * rows * cols, D)``) that vLLM's EVS keeps, as a sorted list.

    A re-reading of ``vllm/multimodal/evs.py`` (``compute_retained_tokens_count``, ``compute_retention_mask``)
    at commit 094f117 (the same in ``vllm/multimodal/video_prune/evs.py`` at d750efb), spatial merge 1.
    """
    x = embeds.reshape(frames, rows, cols, embeds.size(-1))
    dissimilarity = 1 - torch.nn.functional.cosine_similarity(x[1:, ...], x[:-1, ...], dim=-1)
    dissimilarity = torch.cat([255 * torch.ones_like(x[:1, :, :, 0]), dissimilarity], dim=0)
    order = torch.argsort(dissimilarity.view(-1), dim=-1, descending=True, stable=True)
    total = rows * cols * frames
    retain = max(rows * cols, int(total * (1 - q)))
    return sorted(order[:retain].tolist())


def _video_ctx(frames: list[int], per_frame: tuple[int, int], keep: float | int, seed: int = 0):
    """One video per sample (``frames[b]`` frames of rows x cols), frames drifting so some tokens stay put."""
    r, c = per_frame
    tokens, ctx = make_reduce_inputs(grids=[(f * r, c) for f in frames], newlines=False, keep=keep, seed=seed, dim=12)
    gen = torch.Generator().manual_seed(seed + 1)
    width = tokens.shape[1]
    layouts = []
    for b, f in enumerate(frames):
        base = torch.randn(1, r * c, tokens.shape[2], generator=gen)
        moving = torch.rand(f, r * c, 1, generator=gen) < 0.4  # some positions change from frame to frame
        tokens[b, : f * r * c] = (base + moving * torch.randn(f, r * c, tokens.shape[2], generator=gen)).reshape(
            f * r * c, -1
        )
        lay = TokenLayout.cat([TokenLayout.grid(r, c, frame=i, video=True) for i in range(f)])
        if width > lay.shape[1]:
            lay = TokenLayout.cat([lay, TokenLayout.grid(1, width - lay.shape[1])])
        layouts.append(lay)
    layout = TokenLayout(**{f.name: torch.cat([getattr(x, f.name) for x in layouts]) for f in dataclasses.fields(lay)})
    budget = EVS().stage_budget(keep, ctx.valid, ctx.protected, layout)
    return tokens, dataclasses.replace(ctx, layout=layout, budget=budget, keep=keep)


def test_the_contract():
    check_reducer(EVS)


@pytest.mark.parametrize("frames", [1, 2, 3, 6])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9])
def test_it_keeps_what_vllm_keeps(frames, keep):
    tokens, ctx = _video_ctx([frames], (3, 4), keep, seed=frames)
    kept = EVS().reduce(tokens, ctx).tolist()[0]
    assert kept == vllm_evs(tokens[0, : frames * 12], frames, 3, 4, 1 - keep)
    assert len(kept) == int(ctx.budget[0]) == retained_count(12, frames, keep)
    assert set(range(12)) <= set(kept)  # the first frame, whole


def test_an_integer_keep_is_the_count_per_video():
    _, ctx = _video_ctx([5], (3, 4), 30)
    assert int(ctx.budget[0]) == 30
    _, small = _video_ctx([5], (3, 4), 4)
    assert int(small.budget[0]) == 12  # at least the first frame, as vLLM's floor


def test_a_static_position_goes_first():
    tokens, ctx = _video_ctx([3], (2, 2), 0.5)
    tokens[0, 4:12] = tokens[0, 0:4].repeat(2, 1)  # frames 1 and 2 equal frame 0...
    tokens[0, 9] += 5.0  # ...but one token of frame 2
    kept = EVS().reduce(tokens, ctx).tolist()[0]
    assert kept[:4] == [0, 1, 2, 3] and 9 in kept and len(kept) == 6


def test_batch_of_videos_of_different_lengths_matches_one_by_one():
    tokens, ctx = _video_ctx([4, 7, 2], (2, 3), 0.3)
    batch = EVS().reduce(tokens, ctx).tolist()
    for b, f in enumerate([4, 7, 2]):
        assert batch[b] == vllm_evs(tokens[b, : f * 6], f, 2, 3, 0.7)


def test_frames_of_different_sizes_and_nan_are_refused():
    tokens, ctx = _video_ctx([2], (2, 5), 0.5)
    frame = ctx.layout.frame.clone()
    frame[0, 9] = 1
    with pytest.raises(tp.ReducerInputError, match="every frame must hold as many"):
        EVS().stage_budget(0.5, ctx.valid, ctx.protected, dataclasses.replace(ctx.layout, frame=frame))
    tokens[0, 3, 0] = float("nan")
    with pytest.raises(tp.ReducerInputError, match="NaN or infinite"):
        EVS().reduce(tokens, ctx)


class _Plugin:
    @staticmethod
    @tp.hookimpl
    def tokenprune_register_reducers(registry):
        registry.add(EVS)


@pytest.mark.parametrize(
    ("family", "video", "expected"),
    [
        ("llava_onevision", tm.Video(4, 56, 56), 4 + 1),  # 4 frames of 2 x 2: the first frame, then the newline
        ("qwen2_vl", tm.Video(8, 56, 56), 8),  # 4 temporal patches of 2 x 2 keep int(0.5 * 16)
    ],
)
def test_in_the_engine_only_the_video_is_pruned(family, video, expected):
    tiny = tm.BUILDERS[family]()
    keep = 0.25 if family == "llava_onevision" else 0.5
    stage = pipe(("post_projector", "evs", keep))
    stage["stages"][0]["tokens"] = "video"
    inputs = tiny.make_inputs([[(56, 56), video]])
    with tp.apply(tiny.model, stage, plugins=tp.get_plugin_manager(plugins=[_Plugin()])) as run, torch.no_grad():
        tiny.model(**inputs)
    stats = run.stats.forwards[0].stages[0]
    assert stats.leaving == [expected]
    assert bool(stats.layout.video.all())
