"""Heatmaps frame by frame, video frames from files, and video prompts through the processor."""

from __future__ import annotations

from typing import Any

import pytest
import tiny_models as tm
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.adapters.loading import build_inputs, load_frames
from tokenprune.bench.heatmap import draw_heatmap, panels, surviving_tokens
from tokenprune.errors import TokenpruneError


def _run_dycoke(family: str) -> tuple[Any, Any]:
    tiny = tm.BUILDERS[family]()
    inputs = tiny.make_inputs([[(56, 56), tm.Video(4, 56, 56)]])
    stage = {"at": "post_projector", "reducer": "dycoke", "keep": 0.5, "tokens": "video"}
    with tp.apply(tiny.model, {"stages": [stage]}) as run, torch.no_grad():
        tiny.model(**inputs)
    return run.stats.last_prefill, surviving_tokens(run.stats.last_prefill)


@pytest.mark.parametrize(("family", "frames"), [("llava_onevision", 4), ("qwen2_vl", 2)])
def test_one_panel_per_image_view_and_per_video_frame(family, frames, tmp_path):
    """LLaVA-OneVision lays out each input frame, Qwen2-VL each temporal patch (two input frames)."""
    _, (layout, kept) = _run_dycoke(family)
    keys = panels(layout)
    videos = [k for k in keys if k[0]]
    assert videos == [(True, 0, f) for f in range(frames)]
    assert all(not k[0] for k in keys[: len(keys) - frames])
    per_frame = [int(kept[layout.video[0] & (layout.frame[0] == f) & ~layout.newline[0]].sum()) for f in range(frames)]
    whole = int((layout.video[0] & (layout.frame[0] == 0) & ~layout.newline[0]).sum())
    assert per_frame[0] == whole and per_frame[1] == whole // 2  # frame 1 is pruned against frame 0
    pictures = [tm.image(56, 56, seed=s) for s in range(4)]
    out = tmp_path / "kept.png"
    draw_heatmap(tm.image(56, 56), layout, kept, out, frames=[pictures])
    with Image.open(out) as png:
        assert png.width == 400 * len(keys)  # 4 inches per panel at 100 dpi


def test_a_prompt_with_only_a_video_draws_its_frames_on_grey_without_pictures(tmp_path):
    _, (layout, kept) = _run_dycoke("llava_onevision")
    only_video = tp.TokenLayout(**{f: getattr(layout, f)[:, layout.video[0]] for f in layout.__dataclass_fields__})
    out = tmp_path / "video.png"
    draw_heatmap(None, only_video, kept[layout.video[0]], out)
    with Image.open(out) as png:
        assert png.width == 400 * 4


def test_frames_load_from_a_folder_in_name_order_and_from_a_gif(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for i, c in reversed(list(enumerate(colours))):
        Image.new("RGB", (8, 8), c).save(folder / f"frame-{i:02d}.png")
    (folder / "notes.txt").write_text("not a frame")
    assert [f.getpixel((0, 0)) for f in load_frames(folder)] == colours
    gif = tmp_path / "clip.gif"
    first, *rest = [Image.new("RGB", (8, 8), c) for c in colours]
    first.save(gif, save_all=True, append_images=rest, duration=40)
    loaded = load_frames(gif)
    assert len(loaded) == 3 and all(f.mode == "RGB" for f in loaded)
    with pytest.raises(TokenpruneError, match="does not exist"):
        load_frames(tmp_path / "missing.gif")
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with pytest.raises(TokenpruneError, match="MP4 are not decoded: extract the frames first"):
        load_frames(tmp_path / "clip.mp4")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenpruneError, match="holds no image"):
        load_frames(empty)


class _Processor:
    """Records the call; ``video_token`` as transformers' video-capable processors have it."""

    image_token, video_token = "<image>", "<video>"

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.calls = error, []

    def __call__(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        return {"input_ids": torch.ones(1, 3, dtype=torch.long), "pixel_values_videos": torch.ones(1, 2)}


def test_a_video_prompt_gets_its_placeholder_and_the_frames_as_one_video():
    frames = [Image.new("RGB", (8, 8)) for _ in range(3)]
    processor = _Processor()
    out = build_inputs(processor, None, "what happens?", video=frames, dtype=torch.bfloat16)
    (call,) = processor.calls
    assert call["text"] == "<video>\nwhat happens?" and call["videos"] == [frames] and "images" not in call
    assert out["pixel_values_videos"].dtype == torch.bfloat16 and out["input_ids"].dtype == torch.long
    both = _Processor()
    build_inputs(both, frames[0], "<video> and <image>: same?", video=frames)
    assert both.calls[0]["text"] == "<video> and <image>: same?" and both.calls[0]["images"] is frames[0]
    with pytest.raises(TokenpruneError, match="needs an image or a video"):
        build_inputs(_Processor(), None, "hi")


def test_a_video_without_torchvision_is_refused_with_the_fix():
    missing = ImportError("Qwen2VLVideoProcessor requires the Torchvision library but it was not found")
    with pytest.raises(TokenpruneError, match=r"video input needs torchvision.*install the torchvision release"):
        build_inputs(_Processor(missing), None, "hi", video=[Image.new("RGB", (8, 8))])


def test_a_video_of_unknown_frames_is_drawn_on_grey():
    """MiniCPM-V's video tokens have no frame (``UNKNOWN_FRAME``, tests/test_family_videos.py): a panel of such a video
    cannot pick its frame's picture and is drawn on grey rather than failing or picking a frame at random."""
    from dataclasses import replace

    import numpy as np

    from tokenprune.bench.heatmap import _picture
    from tokenprune.layout import UNKNOWN_FRAME, TokenLayout

    grid = TokenLayout.grid(2, 3, video=True)
    layout = replace(grid, frame=torch.full_like(grid.frame, UNKNOWN_FRAME))
    frames = [[Image.new("RGB", (8, 8), (255, 0, 0))]]
    picture = _picture(None, frames, layout, (True, 0, UNKNOWN_FRAME))
    assert picture.shape == (64, 64, 3) and bool((picture == 128).all())
    known = _picture(None, frames, grid, (True, 0, 0))
    assert bool((np.asarray(known)[..., 0] == 255).all())
