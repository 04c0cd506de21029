"""The engine invariants on video inputs (alone and with an image in the same prompt), and `tokens:` per stage.

Video tokens are visual tokens: a stage reduces image and video tokens together (``tokens: all``, the
default), or only one kind (``tokens: image`` / ``tokens: video``; the others are kept like text). The
layout gives every video token its frame (the temporal patch it belongs to).
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from engine_fixtures import VIDEO_SPECS, pipe

import tokenprune as tp
from tokenprune.testing import adapters as ta

SUPPRESS = [4, 5, 6, 7]


QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]  # the LLaVA family: test_engine_invariants_video_llava.py


@pytest.fixture(scope="module", params=QWEN)
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


@pytest.fixture(scope="module")
def plugins() -> tp.plugins.PluginManager:
    return ta.adapter_check_manager()


@pytest.fixture(scope="module")
def case(tiny: tm.Tiny, plugins: tp.plugins.PluginManager) -> ta.AdapterCase:
    return ta.adapter_case(
        tiny.model, tiny.make_inputs, VIDEO_SPECS[tiny.name], plugins=plugins, pad_token_id=0, suppress_tokens=SUPPRESS
    )


@pytest.mark.parametrize("check", [*ta.INVARIANTS, *ta.ADAPTER_CHECKS], ids=lambda check: check.name)
def test_check(case, check):
    check.run(case)


def _stage(tiny: tm.Tiny, plugins: tp.plugins.PluginManager, tokens: str | None, specs: list) -> tuple:
    stage = pipe(("post_projector", "check_drop", 0.5))
    if tokens is not None:
        stage["stages"][0]["tokens"] = tokens
    inputs = tiny.make_inputs(specs)
    with tp.apply(tiny.model, stage, plugins=plugins) as run, torch.no_grad():
        tiny.model(**inputs)
    return run.stats.forwards[0].stages[0], inputs


@pytest.mark.parametrize("tokens", [None, "all", "image", "video"])
def test_a_stage_reduces_the_tokens_it_names(tiny, plugins, tokens):
    """An image and a 2-step video: the stage sees and halves only what it names; the layout says which is which."""
    everything, _ = _stage(tiny, plugins, None, [[(56, 56), VIDEO_SPECS[tiny.name][0]]])
    video = everything.layout.video[0, : everything.entering[0]]
    n_video, n_image = int(video.sum()), int((~video).sum())
    assert n_video and n_image
    stats, _ = _stage(tiny, plugins, tokens, [[(56, 56), VIDEO_SPECS[tiny.name][0]]])
    entering = {None: n_video + n_image, "all": n_video + n_image, "image": n_image, "video": n_video}[tokens]
    assert stats.entering == [entering] and stats.leaving == [entering // 2]
    lay = stats.layout
    if tokens == "image":
        assert not lay.video.any() and not lay.frame.any()
    else:
        frames = lay.frame[0][lay.video[0] & ~lay.newline[0]].tolist()
        assert frames == sorted(frames) and len(set(frames)) == _steps(tiny, VIDEO_SPECS[tiny.name][0])


def _steps(tiny: tm.Tiny, video: tm.Video) -> int:
    """Frames in the layout: Qwen's temporal patches hold two input frames, LLaVA's frames are their own."""
    return video.frames // 2 if tiny.name.startswith("qwen") else video.frames


def test_a_video_stage_on_a_prompt_without_video_changes_nothing(tiny, plugins):
    stats, _ = _stage(tiny, plugins, "video", [(56, 56)])
    assert stats.entering == [0] and stats.leaving == [0]


def test_downsample_plans_per_frame(tiny):
    """The spatial budget is split over the frames (groups), as it is over views of an image."""
    if tiny.name == "video_llava":  # its frames are [CLS] + 4 x 4 tokens, not 2 x 2
        pytest.skip("tested in test_video_llava.py (test_downsample_keeps_a_regular_grid_of_every_frame)")
    video = tm.Video(8, 56, 56)  # Qwen: 4 temporal patches of 2 x 2 tokens; LLaVA: 8 frames of 2 x 2
    inputs = tiny.make_inputs([video])
    with tp.apply(tiny.model, pipe(("post_projector", "downsample", 0.25))) as run, torch.no_grad():
        tiny.model(**inputs)
    stats = run.stats.forwards[0].stages[0]
    kept = stats.layout.frame[0][stats.kept[0]]
    kept = kept[~stats.layout.newline[0][stats.kept[0]]].tolist()
    # one token per frame (LLaVA-OneVision's protected video newline takes one slot of the 8)
    assert kept == sorted(set(kept)) and len(kept) >= _steps(tiny, video) - 1
