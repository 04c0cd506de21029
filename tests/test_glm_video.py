"""GLM-4.1V / 4.5V / 4.6V videos (``glm4v``, ``glm4v_moe``, ``glm46v``): video tokens typed by ``mm_token_type_ids``.

transformers' GLM-4.xV (``modeling_glm4v.py``, 5.25) has no video placeholder id of its own in the prompt: each
frame is ``<|begin_of_image|>``, the image token once per merged patch, ``<|end_of_image|>`` and the frame's
timestamp as text (``Glm4vProcessor.replace_frame_token_id``), and only ``mm_token_type_ids == 2`` says the
placeholders are a video's. ``get_video_features`` runs every temporal patch of ``video_grid_thw`` through the tower
as an image of grid ``(1, h, w)`` (each frame ``h / 2 x w / 2`` merged tokens, row by row), and ``get_rope_index``
splits ``video_grid_thw`` into one grid per frame, each run of typed placeholders taking the next. The engine reads
the types (:func:`tokenprune.adapters.token_types.typed_video_mask`), so GLM videos are video tokens with frames of
merged-patch grids, and the video reducers run on them. The tiny census models and the video inputs of
tests/test_families.py (a timestamp token before each frame) are used as they are.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_families import _default_layer_case, _inputs, _params, _skip_unless, _video_inputs
from video_reference import expected_video_keep, run_video_stage, video_stage

import tokenprune as tp
from tokenprune.adapters.token_types import typed_video_mask
from tokenprune.testing import adapters as checks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GLM_VIDEO = ["glm4v", "glm4v_moe", "glm46v"]
FRAMES = 3


def _case(model_type: str, frames: int = FRAMES) -> checks.AdapterCase:
    _skip_unless(model_type)
    model, adapter, builder = _inputs(model_type)
    return _default_layer_case(model, adapter, builder, _video_inputs(builder, frames=frames))


@pytest.fixture(scope="module")
def glm4v() -> checks.AdapterCase:
    return _case("glm4v")


@pytest.mark.parametrize("model_type", _params(GLM_VIDEO))
def test_the_video_layout_is_the_models_frames_of_merged_grids(model_type):
    """The engine marks the placeholders typed 2 as video tokens (their id is the image token), and lays each
    video out as ``t`` frames (``video_grid_thw``'s temporal patches, one run of placeholders after a timestamp
    each) of ``h / 2 x w / 2`` merged patches; every token's frame, row and column are the model's own M-RoPE
    positions for it (``get_rope_index``: the frame's run, height and width positions less the frame's start)."""
    case = _case(model_type)
    batch = case.padded_batch()
    ids, types, mask = batch["input_ids"], batch["mm_token_type_ids"], batch["attention_mask"].bool()
    image = case.adapter.image_token_id()
    assert case.adapter.video_mask(ids).sum() == 0 and bool((ids[types == 2] == image).all())
    assert torch.equal(typed_video_mask(case.adapter, ids, types), types == 2)
    with tp.apply(case.model, video_stage("check_drop", 1.0), plugins=case.manager) as run:
        case.forward(batch)
    (stage,) = run.stats.last_prefill.stages
    layout = stage.layout
    assert layout is not None
    vlm = case.adapter.vlm()
    positions, _ = vlm.get_rope_index(ids, types, video_grid_thw=batch["video_grid_thw"], attention_mask=mask)
    grids = iter(batch["video_grid_thw"].tolist())
    for b, n in enumerate(stage.entering):
        if not n:
            continue
        t, h, w = next(grids)
        per_frame = (h // 2) * (w // 2)
        assert n == t * per_frame
        frame, row, col = (getattr(layout, f)[b, :n] for f in ("frame", "row", "col"))
        assert bool(layout.video[b, :n].all()) and bool((layout.image[b, :n] == 0).all())
        assert frame.tolist() == [f for f in range(t) for _ in range(per_frame)]
        assert int(row.max()) + 1 == h // 2 and int(col.max()) + 1 == w // 2
        cols = (types[b] == 2).nonzero().flatten()
        runs = torch.cumsum(torch.diff(cols, prepend=cols[:1] - 1) > 1, 0)  # a timestamp and tags between frames
        assert torch.equal(runs, frame)
        _, tall, wide = positions[:, b, cols]
        start = positions[0, b, cols]  # each frame's start position (GLM: the temporal row of a frame is its start)
        assert torch.equal(tall - start, row) and torch.equal(wide - start, col)


@pytest.mark.parametrize("reducer", ["evs", "vidcom2"])
def test_a_video_reducer_prunes_each_frame_as_on_the_models_own_frames(glm4v, reducer):
    """EVS and VidCom2 on GLM videos keep exactly what their algorithm keeps on the frames the model computes:
    ``get_video_features``'s tokens of each video as ``(t, h / 2 * w / 2, D)``, for each sample of a padded
    batch (two video sizes, a text-only sample). EVS compares each token with the one at its place in the frame
    before, VidCom2 shares the budget out by frame: both need the frames."""
    keep = 0.4
    batch, stage = run_video_stage(glm4v, reducer, keep)
    with torch.no_grad():
        out = glm4v.adapter.vlm().get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
    videos = out.pooler_output
    assert len(videos) == 2 and stage.entering[2] == 0
    for b, ((t, h, w), feats) in enumerate(zip(batch["video_grid_thw"].tolist(), videos, strict=True)):
        expected = expected_video_keep(reducer, feats.float().reshape(t, (h // 2) * (w // 2), -1), keep)
        assert stage.kept[b] == expected.reshape(-1).nonzero().flatten().tolist()
        assert bool(expected[0].all()) or reducer != "evs"  # EVS keeps the first frame whole
        assert 0 < stage.leaving[b] < stage.entering[b]


def _batch_equals_one_by_one(case: checks.AdapterCase, pipeline: dict[str, Any]) -> None:
    """Each sample of a padded batch keeps and generates what it does alone (1e-5)."""
    batch = case.make_inputs(case.specs)
    with tp.apply(case.model, pipeline, plugins=case.manager) as run:
        gen = case.generate(batch, 3)
        (stage,) = run.stats.last_prefill.stages
        kept = stage.kept
        assert all(0 < out < into for out, into in zip(stage.leaving, stage.entering, strict=True) if into)
        for i, spec in enumerate(case.specs):
            alone = case.generate(case.make_inputs([spec], start=i), 3)
            assert run.stats.last_prefill.stages[0].kept[0] == kept[i]
            assert torch.equal(alone.sequences[0, -3:], gen.sequences[i, -3:])
            for a, b in zip(alone.logits, gen.logits, strict=True):
                torch.testing.assert_close(a[0], b[i], atol=checks.PRUNE_TOLERANCE, rtol=0)


def test_the_invariants_hold_with_a_video_reducer(glm4v):
    """EVS on the video tokens, then the check kit's layer cut at the default layer: cached generation equals
    recomputation under both position policies, and batch equals one by one."""
    evs = video_stage("evs", 0.5)
    cut = {"stages": [*evs["stages"], {"at": {"layer": glm4v.layer}, "reducer": "check_drop", "keep": 0.5}]}
    checks.cached_decode_equals_recompute(glm4v, pipeline=cut)
    checks.cached_decode_equals_recompute(glm4v, pipeline=cut, positions="compact")
    _batch_equals_one_by_one(glm4v, evs)


def test_an_image_beside_a_video_fails_in_the_stock_model(monkeypatch):
    """docs/models.md: an image and a video in one prompt do not run on transformers' GLM-4.xV itself (5.25 as
    before): ``get_placeholder_mask`` marks the image token for images and for videos alike, so the image features
    are scattered over every placeholder, the video's included, and the count check refuses."""
    import test_families

    _skip_unless("glm4v")
    model, _, builder = _inputs("glm4v")
    monkeypatch.setattr(test_families, "_videos_take_the_image_token", lambda vlm: False)  # keep the images
    batch = _video_inputs(builder)([1, 2])
    ids, video = batch["input_ids"], batch["input_ids"] == model.config.video_token_id
    image = model.config.image_token_id
    batch["input_ids"] = ids.masked_fill(video, image)  # GLM's video placeholders: the image token, typed 2
    batch["mm_token_type_ids"] = (batch["input_ids"] == image).long() + video.long()
    assert bool((batch["mm_token_type_ids"] == 1).any() and video.any() and "pixel_values" in batch)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"), torch.no_grad():
        model(**batch)
