"""examples/compare-video.yaml: valid, and its video reducers keep the same number of tokens on its video."""

from __future__ import annotations

from pathlib import Path

import torch

import tokenprune as tp
from tokenprune.bench.config import load_config, resolve_pipelines
from tokenprune.layout import TokenLayout

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "compare-video.yaml"


def _llava_onevision_video(frames: int = 32, side: int = 14) -> tuple[torch.Tensor, torch.Tensor, TokenLayout]:
    """One sample: a video of ``frames`` 14x14 frames, then the protected video newline (LLaVA-OneVision's)."""
    parts = [TokenLayout.grid(side, side, frame=f, video=True) for f in range(frames)]
    last = TokenLayout.grid(1, 1, frame=frames - 1, video=True)
    parts.append(
        TokenLayout(
            image=last.image,
            view=last.view,
            row=last.row,
            col=last.col,
            newline=~last.newline,
            frame=last.frame,
            video=last.video,
        )
    )
    layout = TokenLayout.cat(parts)
    valid = torch.ones(layout.shape, dtype=torch.bool)
    return valid, layout.newline.clone(), layout


def test_the_video_config_matches_the_budgets():
    registry = tp.get_plugin_manager().reducers
    pipelines = dict(resolve_pipelines(load_config(CONFIG), registry))
    assert set(pipelines) == {
        "unpruned",
        "dycoke-ttm",
        "vidcom2-matched",
        "evs-matched",
        "holitom-matched",
        "fastvid-matched",
        "random-matched",
    }
    (holitom,) = pipelines["holitom-matched"].stages
    assert holitom.tokens == "video" and holitom.keep == round(3098 / 6272, 3)  # DyCoke's share: its count varies
    (fastvid,) = pipelines["fastvid-matched"].stages
    assert fastvid.tokens == "video" and fastvid.keep == holitom.keep
    valid, protected, layout = _llava_onevision_video()
    fastvid_cap = registry.get("fastvid")().stage_budget(fastvid.keep, valid, protected, layout)
    assert int(fastvid_cap[0]) == 32 * int(196 * fastvid.keep) + 1  # at most 96 a frame, and the newline
    budgets = {}
    for name, pipeline in pipelines.items():
        if name in ("unpruned", "holitom-matched", "fastvid-matched"):
            continue
        (stage,) = pipeline.stages
        assert stage.tokens == "video"
        reducer = registry.get(stage.reducer)(stage.params)
        budgets[name] = int(reducer.stage_budget(stage.keep, valid, protected, layout)[0])
    assert set(budgets.values()) == {3098 + 1}, budgets  # 49.4% of the 6272 frame tokens, and the newline
