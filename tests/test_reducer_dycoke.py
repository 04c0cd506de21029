"""DyCoke's temporal token merging: the contract, an independent port of the official ``dycole_ttm``, the engine."""

from __future__ import annotations

import dataclasses

import pytest
import tiny_models as tm
import torch
from engine_fixtures import pipe
from tokenprune_dycoke import DyCoke

import tokenprune as tp
from tokenprune.layout import TokenLayout
from tokenprune.testing import check_reducer, make_reduce_inputs


def official_ttm(x: torch.Tensor, per_frame: int, keep_ratio: float) -> list[int]:
    """The rows of ``x`` (``(F * T, D)``, one video) that KD-TAO/DyCoke's ``dycole_ttm`` keeps, as a sorted list.

    A straightforward re-reading of the official loops (HEAD of the official repository): pairs
    ``(i, i + 1)`` for even ``i``, then frames ``i + 2`` against ``i`` for ``i`` in ``range(0, F - 4, 4)``;
    an unpaired last frame is never appended.
    """
    num_frames = x.shape[0] // per_frame
    frame = [list(range(f * per_frame, (f + 1) * per_frame)) for f in range(num_frames)]
    k = int(keep_ratio * per_frame)
    out: list[list[int]] = []
    for i in range(0, num_frames - 1, 2):
        sim = torch.nn.functional.cosine_similarity(x[frame[i]], x[frame[i + 1]], dim=1)
        out.append(frame[i])
        out.append([frame[i + 1][j] for j in sim.topk(k, largest=False).indices.tolist()])
    for i in range(0, num_frames - 4, 4):
        sim = torch.nn.functional.cosine_similarity(x[frame[i]], x[frame[i + 2]], dim=1)
        out[i] = frame[i]
        out[i + 2] = [frame[i + 2][j] for j in sim.topk(k, largest=False).indices.tolist()]
    return sorted(t for part in out for t in part)


def _video_ctx(frames: list[int], per_frame: tuple[int, int], keep: float | int, reducer: DyCoke, seed: int = 0):
    """A batch with one video per sample (``frames[b]`` frames of ``per_frame`` rows x columns), DyCoke's budget."""
    r, c = per_frame
    tokens, ctx = make_reduce_inputs(grids=[(f * r, c) for f in frames], newlines=False, keep=keep, seed=seed)
    width = tokens.shape[1]
    layouts = []
    for f in frames:
        lay = TokenLayout.cat([TokenLayout.grid(r, c, frame=i, video=True) for i in range(f)])
        pad = width - lay.shape[1]
        if pad:
            lay = TokenLayout.cat([lay, TokenLayout.grid(1, pad)])
        layouts.append(lay)
    layout = TokenLayout(**{f.name: torch.cat([getattr(x, f.name) for x in layouts]) for f in dataclasses.fields(lay)})
    budget = reducer.stage_budget(keep, ctx.valid, ctx.protected, layout)
    return tokens, dataclasses.replace(ctx, layout=layout, budget=budget, keep=keep)


def test_the_contract():
    check_reducer(DyCoke)
    check_reducer(DyCoke, {"drop_unpaired_frame": False})


@pytest.mark.parametrize("frames", [2, 3, 4, 5, 6, 8, 9, 12])
@pytest.mark.parametrize("keep", [0.3, 0.5])
def test_it_keeps_what_the_official_code_keeps(frames, keep):
    reducer = DyCoke()
    tokens, ctx = _video_ctx([frames], (2, 5), keep, reducer, seed=frames)
    kept = reducer.reduce(tokens, ctx)
    n = frames * 10
    assert kept.tolist()[0] == official_ttm(tokens[0, :n], 10, keep)
    assert int(kept.counts[0]) == int(ctx.budget[0])


def test_an_unpaired_last_frame_can_be_kept():
    reducer = DyCoke({"drop_unpaired_frame": False})
    tokens, ctx = _video_ctx([5], (2, 5), 0.3, reducer)
    kept = set(reducer.reduce(tokens, ctx).tolist()[0])
    assert set(range(40, 50)) <= kept  # frame 4 whole
    assert kept - set(range(40, 50)) == set(official_ttm(tokens[0, :50], 10, 0.3))


def test_batch_of_videos_of_different_lengths_matches_one_by_one():
    reducer = DyCoke()
    tokens, ctx = _video_ctx([4, 7, 2], (2, 3), 0.5, reducer)
    batch = reducer.reduce(tokens, ctx).tolist()
    for b, f in enumerate([4, 7, 2]):
        assert batch[b] == official_ttm(tokens[b, : f * 6], 6, 0.5)


def test_an_integer_keep_is_a_count_per_pruned_frame():
    reducer = DyCoke()
    _, ctx = _video_ctx([4], (2, 5), 2, reducer)
    assert int(ctx.budget[0]) == 10 + 2 + 10 + 2


def test_frames_of_different_sizes_are_refused():
    reducer = DyCoke()
    _, ctx = _video_ctx([2], (2, 5), 0.5, reducer)
    frame = ctx.layout.frame.clone()
    frame[0, 9] = 1  # frame 0 has 9 tokens, frame 1 has 11
    with pytest.raises(tp.ReducerInputError, match="every frame must hold as many"):
        reducer.stage_budget(0.5, ctx.valid, ctx.protected, dataclasses.replace(ctx.layout, frame=frame))


class _Plugin:
    @staticmethod
    @tp.hookimpl
    def tokenprune_register_reducers(registry):
        registry.add(DyCoke)


@pytest.mark.parametrize(
    ("family", "video", "expected"),
    [
        ("llava_onevision", tm.Video(4, 56, 56), 4 + 1 + 4 + 1 + 1),  # 4 frames of 2 x 2, then the video newline
        ("qwen2_vl", tm.Video(8, 56, 56), 4 + 1 + 4 + 1),  # 4 temporal patches of 2 x 2
    ],
)
def test_in_the_engine_only_the_video_is_pruned(family, video, expected):
    """With an image in the prompt, `tokens: video` prunes the video's frames and leaves the image alone."""
    tiny = tm.BUILDERS[family]()
    stage = pipe(("post_projector", "dycoke", 0.3))
    stage["stages"][0]["tokens"] = "video"
    inputs = tiny.make_inputs([[(56, 56), video]])
    plugins = tp.get_plugin_manager(plugins=[_Plugin()])
    with tp.apply(tiny.model, stage, plugins=plugins) as run, torch.no_grad():
        tiny.model(**inputs)
    stats = run.stats.forwards[0].stages[0]
    assert stats.leaving == [expected]
    assert bool(stats.layout.video.all())
