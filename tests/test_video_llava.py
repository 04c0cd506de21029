"""Video-LLaVA: its video layout (frames of [CLS] + grid), the video reducers on it, and a video placeholder
id with no video (text to the model, so text to the stages).

The engine invariants on its images run in ``test_engine_invariants.py`` and on its videos (alone and with an
image) in ``test_engine_invariants_video_llava.py``; the census's own tiny model in ``test_census.py``.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from engine_fixtures import pipe
from test_vision_attention import _eager_weights

import tokenprune as tp
from tokenprune.adapters.video_llava import VideoLlavaAdapter
from tokenprune.engine import compat
from tokenprune.engine.vision_probe import VisionProbe
from tokenprune.testing import adapters as ta

FRAMES = 8
GRID = 4  # 56 px frames of 14 px patches
PER_FRAME = 1 + GRID * GRID


@pytest.fixture(scope="module")
def tiny() -> tm.Tiny:
    return tm.video_llava()


@pytest.fixture(scope="module")
def plugins() -> tp.plugins.PluginManager:
    return ta.adapter_check_manager()


def _first_stage(tiny: tm.Tiny, pipeline: dict, inputs: dict, plugins=None) -> tp.engine.run_stats.StageStats:
    with tp.apply(tiny.model, pipeline, plugins=plugins) as run, torch.no_grad():
        tiny.model(**inputs)
    return run.stats.forwards[0].stages[0]


def test_each_frame_is_its_cls_token_then_its_grid(tiny, plugins):
    """A video of 8 frames: per frame, [CLS] (view 1, a 1 x 1 grid) then the 4 x 4 patch grid, frame by frame."""
    stats = _first_stage(
        tiny, pipe(("post_projector", "check_drop", 1.0)), tiny.make_inputs([tm.Video(FRAMES, 56, 56)]), plugins
    )
    lay = stats.layout
    n = stats.entering[0]
    assert n == FRAMES * PER_FRAME
    assert bool(lay.video[0, :n].all()) and bool((lay.image[0, :n] == 0).all())
    frame = lay.frame[0, :n].reshape(FRAMES, PER_FRAME)
    assert bool((frame == torch.arange(FRAMES)[:, None]).all())
    view = lay.view[0, :n].reshape(FRAMES, PER_FRAME)
    assert bool((view[:, 0] == 1).all()) and bool((view[:, 1:] == 0).all())
    rows = lay.row[0, :n].reshape(FRAMES, PER_FRAME)[:, 1:]
    cols = lay.col[0, :n].reshape(FRAMES, PER_FRAME)[:, 1:]
    grid_rows, grid_cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    assert bool((rows == grid_rows.reshape(-1)).all()) and bool((cols == grid_cols.reshape(-1)).all())
    assert not bool(lay.newline[0, :n].any())


def test_images_are_grids_without_cls(tiny, plugins):
    stats = _first_stage(
        tiny, pipe(("post_projector", "check_drop", 1.0)), tiny.make_inputs([[(56, 56), (56, 56)]]), plugins
    )
    lay = stats.layout
    assert stats.entering == [2 * GRID * GRID]
    assert not bool(lay.video[0].any()) and bool((lay.view[0] == 0).all())
    assert lay.image[0].tolist() == [0] * GRID * GRID + [1] * GRID * GRID


def test_downsample_keeps_a_regular_grid_of_every_frame(tiny):
    """``downsample`` at 0.25 keeps every frame's 2 x 2 grid of stride 2 (the frames are its groups, as views are)."""
    stats = _first_stage(
        tiny, pipe(("post_projector", "downsample", 0.25)), tiny.make_inputs([tm.Video(FRAMES, 56, 56)])
    )
    kept = stats.kept[0]
    lay = stats.layout
    grid = lay.view[0][kept] == 0
    for f in range(FRAMES):
        at = grid & (lay.frame[0][kept] == f)
        cells = sorted(zip(lay.row[0][kept][at].tolist(), lay.col[0][kept][at].tolist(), strict=True))
        assert cells == [(1, 1), (1, 3), (3, 1), (3, 3)], f


@pytest.mark.parametrize("reducer", ["dycoke", "vidcom2", "evs", "holitom"])
def test_video_reducers_compare_its_frames(tiny, reducer):
    """The frame-wise video reducers run on its (frames, 1 + g * g) tokens (HoliTom with the video tower's
    attention): a video alone and beside an image, the image kept (they reduce videos only), the video reduced."""
    inputs = tiny.make_inputs([tm.Video(FRAMES, 56, 56), [(56, 56), tm.Video(FRAMES, 56, 56)]])
    stats = _first_stage(tiny, {"stages": [{"at": "post_projector", "reducer": reducer, "keep": 0.5}]}, inputs)
    video = FRAMES * PER_FRAME
    assert stats.entering == [video, video + GRID * GRID]
    for b, left in enumerate(stats.leaving):
        kept = stats.kept[b]
        assert left < stats.entering[b] and int(stats.layout.video[b][kept].sum()) < video
        assert int((~stats.layout.video[b][kept]).sum()) == (GRID * GRID if b else 0)


def test_a_video_placeholder_without_a_video_is_text(tiny, plugins):
    """The video token id in a prompt that has no video (a generated token fed back, as the no-cache recompute
    does) is text to the model (Video-LLaVA scatters video features only where it computed them): the stages see
    the image tokens only, and the token stays."""
    inputs = tiny.make_inputs([(56, 56)])
    ids = inputs["input_ids"]
    stray = int(ids.shape[1]) - 2
    assert int(ids[0, stray]) != tm.IMAGE_TOKEN
    ids[0, stray] = tm.VIDEO_TOKEN
    with torch.no_grad():
        reference = tiny.model(**inputs).logits
    with tp.apply(tiny.model, pipe(("post_projector", "check_drop", 0.5)), plugins=plugins) as run, torch.no_grad():
        tiny.model(**inputs)
    stats = run.stats.forwards[0].stages[0]
    assert stats.entering == [GRID * GRID] and stats.leaving == [GRID * GRID // 2]
    assert not bool(stats.layout.video.any())
    with tp.apply(tiny.model, pipe(("post_projector", "check_drop", 1.0)), plugins=plugins), torch.no_grad():
        kept_all = tiny.model(**inputs).logits
    torch.testing.assert_close(kept_all, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["cls", "mean"])
def test_the_probe_reads_the_video_tower_on_videos(tiny, kind):
    """Videos run through the video tower: the probe's video records are its eager attention, one sequence per
    frame, and the image tower's records stay empty."""
    tower = VideoLlavaAdapter(tiny.model).vision_tower()
    assert tower.videos and tower.has_cls and len(tower.video_layers) == len(tower.layers)
    inputs = tiny.make_inputs([tm.Video(4, 56, 56), [tm.Video(4, 56, 56)]])
    layer = tower.feature_layer
    probe = VisionProbe(tower, {layer: (frozenset({kind}), False, False)})
    probe.install()
    try:
        probe.begin("video")
        with torch.no_grad():
            tiny.model(**inputs)
        got = probe.video_records[layer].scores[kind]
        assert not probe.records
    finally:
        probe.remove()
    modules = [compat.vision_attention_module(m) for m in tower.video_layers]
    weights = torch.cat([w.mean(1) for w in _eager_weights(tiny.model, inputs, modules)[layer]])
    expected = list(weights[:, 0] if kind == "cls" else weights[:, 1:].mean(1))
    assert len(got) == len(expected) == 2 * 4
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
