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
from tokenprune import testing_adapters as ta

SUPPRESS = [4, 5, 6, 7]


@pytest.fixture(scope="module", params=sorted(VIDEO_SPECS))
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
    """One image (4 tokens) and a 2-step video (8 tokens): the stage sees and halves only what it names."""
    stats, _ = _stage(tiny, plugins, tokens, [[(56, 56), tm.Video(4, 56, 56)]])
    entering = {None: 12, "all": 12, "image": 4, "video": 8}[tokens]
    assert stats.entering == [entering] and stats.leaving == [entering // 2]
    lay = stats.layout
    if tokens in ("video", None, "all"):
        video = lay.video[0].tolist()
        assert sum(video) == 8 and lay.frame[0][lay.video[0]].tolist() == [0] * 4 + [1] * 4
    if tokens == "image":
        assert not lay.video.any() and not lay.frame.any()


def test_a_video_stage_on_a_prompt_without_video_changes_nothing(tiny, plugins):
    stats, _ = _stage(tiny, plugins, "video", [(56, 56)])
    assert stats.entering == [0] and stats.leaving == [0]


def test_downsample_plans_per_frame(tiny):
    """The spatial budget is split over the frames (groups), as it is over views of an image."""
    inputs = tiny.make_inputs([tm.Video(8, 56, 56)])  # 4 temporal patches of 2 x 2 tokens
    with tp.apply(tiny.model, pipe(("post_projector", "downsample", 0.25))) as run, torch.no_grad():
        tiny.model(**inputs)
    stats = run.stats.forwards[0].stages[0]
    assert stats.layout.frame[0][stats.kept[0]].tolist() == [0, 1, 2, 3]
