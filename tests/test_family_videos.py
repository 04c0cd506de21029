"""Videos of the families whose video inputs are not ``video_grid_thw`` grids (issue 32): Gemma 4, MiniCPM-V, Molmo2;
and Molmo2's images with high-resolution crops.

transformers' video processors need torchvision, which does not load here, so the inputs are built by hand as the
processors write them. Gemma 4 (``modeling_gemma4.py``, ``video_processing_gemma4.py``, ``processing_gemma4.py``,
5.25): ``pixel_values_videos`` ``(total_frames, max_patches, 3*P*P)`` patch rows of every frame of every video,
``video_position_ids`` each patch's ``(x, y)`` (``-1`` on padding), ``num_frames_per_video``; each frame's
placeholders are ``<timestamp> <boi> <|video|> x n <eoi>`` with ``n`` the frame's patches over ``k^2`` (``k`` the
pooling kernel), typed ``2`` in ``mm_token_type_ids``. The engine lays every video out as its frames of pooled
grids (:mod:`tokenprune.adapters.frame_layouts`). MiniCPM-V 4.6 / 4.7 (``modeling_minicpmv4_6.py``,
``video_processing_minicpmv4_6.py``, ``processing_minicpmv4_6.py``): every visual unit of the batch's videos NaViT-packed
into ``pixel_values_videos`` ``(1, 3, P, sum of h*w*P)`` with its ``(h, w)`` in ``target_sizes_videos``, one frame's
placeholders ``<image_start> <video> x n <image_end>``; the forward is given no frame count per video, so the
engine lays each unit out as a grid of unknown frame and video reducers refuse. Molmo2 (``modeling_molmo2.py``,
``image_processing_molmo2.py``, ``video_processing_molmo2.py``, ``processing_molmo2.py``): per image a global crop and
overlapping high-resolution crops pooled 2x2 into a global grid and a grid over the stitched canvas, per video frames
pooled 3x3 (:mod:`tokenprune.adapters.pooled_grids`).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from test_families import _default_layer_case, _inputs, _skip_unless
from video_reference import expected_video_keep, run_video_stage, video_stage

import tokenprune as tp
from tokenprune.engine import compat
from tokenprune.errors import ReducerInputError
from tokenprune.testing import adapters as checks
from tokenprune.testing.census_inputs import InputBuilder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FRAMES = 3


def _gemma4_video_inputs(b: InputBuilder, frames: int = FRAMES) -> Any:
    """The census inputs (images of ``image_position_ids``) with a video after the images of every image sample:
    ``frames`` frames of ``(2k, 2k * (1 + i % 2))`` patches (``k`` the pooling kernel), zero-padded to the batch's
    largest frame as the video processor pads them, each frame's placeholders after a timestamp token. Frames
    ``(F_total, P, ...)`` with ``num_frames_per_video`` (5.21+), or ``(V, F, P, ...)`` where
    ``get_video_features`` takes no frame counts (5.18)."""
    cfg, vlm = b.model.config, b.vlm
    merged = getattr(cfg.vision_config, "model_patch_size", None)  # Gemma 4 Unified: a token per model patch
    k = 1 if merged else int(cfg.vision_config.pooling_kernel_size)
    patch = int(merged or cfg.vision_config.patch_size)
    video_id, boi, eoi = int(cfg.video_token_id), int(cfg.boi_token_id), int(cfg.eoi_token_id)
    flat = "num_frames_per_video" in inspect.signature(vlm.get_video_features).parameters

    def make_inputs(specs: list[Any], start: int = 0) -> dict[str, Any]:
        out = b(specs, start)
        samples = [i for i, spec in enumerate(specs, start) if spec]
        if not samples:
            return out
        sizes = [(2 * k, 2 * k * (1 + i % 2)) for i in samples]
        most = max(h * w for h, w in sizes)
        pixels = torch.zeros(len(samples) * frames, most, 3 * patch * patch)
        positions = torch.full((len(samples) * frames, most, 2), -1, dtype=torch.long)
        for n, (i, (h, w)) in enumerate(zip(samples, sizes, strict=True)):
            g = torch.Generator().manual_seed(500 + i)
            y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            for f in range(frames):
                pixels[n * frames + f, : h * w] = torch.rand(h * w, 3 * patch * patch, generator=g)
                positions[n * frames + f, : h * w] = torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)
        per_video = torch.full((len(samples),), frames, dtype=torch.long)
        counted = {"num_frames_per_video": per_video} if flat else {}
        if not flat:  # transformers 5.18: (V, F, P, ...) videos stacked, no frame counts
            pixels, positions = pixels.unflatten(0, (-1, frames)), positions.unflatten(0, (-1, frames))
        with torch.no_grad():
            feats = vlm.get_video_features(pixels, positions, **counted).pooler_output
        rows = [row[m.bool()].tolist() for row, m in zip(out["input_ids"], out["attention_mask"], strict=True)]
        for n, i in enumerate(samples):
            per_frame = int(feats[n].shape[0]) // frames
            video = []
            for f in range(frames):
                video += [b.text_ids[150 + f], boi, *[video_id] * per_frame, eoi]
            rows[i - start] = rows[i - start][:-2] + video + rows[i - start][-2:]
        longest = max(map(len, rows))
        ids = torch.tensor([[b.pad] * (longest - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
        out.update(
            input_ids=ids,
            attention_mask=mask,
            pixel_values_videos=pixels,
            video_position_ids=positions,
            **counted,
        )
        if b.mm_types:
            out["mm_token_type_ids"] = (ids == b.image_token).long() + 2 * (ids == video_id).long()
        return out

    return make_inputs


@pytest.fixture(scope="module", params=["gemma4", "gemma4_unified"])
def gemma4(request) -> checks.AdapterCase:
    _skip_unless(request.param)
    model, adapter, builder = _inputs(request.param)
    case = _default_layer_case(model, adapter, builder, _gemma4_video_inputs(builder))
    _skip_where_the_stock_video_forward_fails(case)
    return case


def _skip_where_the_stock_video_forward_fails(case: checks.AdapterCase) -> None:
    """transformers 5.21's Gemma 4 forward calls ``get_video_features`` without ``num_frames_per_video``, which
    that method requires: no video runs on the stock model there."""
    try:
        with torch.no_grad():
            case.model(**case.padded_batch())
    except ValueError as exc:
        if "num_frames_per_video" not in str(exc):
            raise
        pytest.skip(f"transformers {compat.transformers_version()}'s stock Gemma 4 fails on videos: {exc}"[:200])


def _kernel(case: checks.AdapterCase) -> int:
    """The tokens' kernel over the patches: the tower's pooling kernel (Gemma 4), 1 (Gemma 4 Unified: no tower)."""
    vision = case.model.config.vision_config
    return 1 if getattr(vision, "model_patch_size", None) else int(vision.pooling_kernel_size)


def test_gemma4_videos_keep_the_engine_invariants(gemma4):
    """Images and a video (two frame sizes across the batch, a text-only sample): keep-all identity, cached
    generation == recomputation and batch == one by one at the default layer, the layouts covering every image and
    video token."""
    batch = gemma4.padded_batch()
    assert int((batch["input_ids"] == gemma4.model.config.video_token_id).sum()) > 0
    assert int((batch["input_ids"] == gemma4.model.config.image_token_id).sum()) > 0
    for check in (checks.keep_all_is_identity, checks.cached_decode_equals_recompute, checks.batch_equals_one_by_one):
        check(gemma4)
    checks.layout_covers_visual_tokens(gemma4)


def test_gemma4_video_layout_is_the_models_frames_of_pooled_grids(gemma4):
    """Each video's tokens are its ``num_frames_per_video`` frames, one run of placeholders each (the timestamp,
    ``<boi>`` and ``<eoi>`` between them), every frame a ``(h / k) x (w / k)`` grid of the frame's patch extent, in
    the order the model's pooler writes them (token ``x // k + (w // k) * (y // k)``)."""
    batch = gemma4.padded_batch()
    ids = batch["input_ids"]
    video_id = gemma4.model.config.video_token_id
    k = _kernel(gemma4)
    assert torch.equal(gemma4.adapter.video_mask(ids), ids == video_id)
    with tp.apply(gemma4.model, video_stage("check_drop", 1.0), plugins=gemma4.manager) as run:
        gemma4.forward(batch)
    (stage,) = run.stats.last_prefill.stages
    layout = stage.layout
    assert layout is not None
    positions = batch["video_position_ids"]  # (F_total, P, 2), or (V, F, P, 2) on 5.18
    extents = positions.reshape(-1, *positions.shape[-2:]).clamp(min=0).amax(1) + 1  # (frames, 2): (x, y)
    frames = iter(extents.tolist())
    for b, n in enumerate(stage.entering):
        if not n:
            continue
        grids = [next(frames) for _ in range(FRAMES)]
        (w, h) = grids[0]
        per_frame = (w // k) * (h // k)
        assert all(g == grids[0] for g in grids) and n == FRAMES * per_frame
        frame, row, col = (getattr(layout, f)[b, :n] for f in ("frame", "row", "col"))
        assert bool(layout.video[b, :n].all()) and bool((layout.image[b, :n] == 0).all())
        assert frame.tolist() == [f for f in range(FRAMES) for _ in range(per_frame)]
        pooled = torch.arange(per_frame).repeat(FRAMES)
        assert torch.equal(col, pooled % (w // k)) and torch.equal(row, pooled // (w // k))
        assert int(row.max()) + 1 == h // k
        columns = (ids[b] == video_id).nonzero().flatten()
        runs = torch.cumsum(torch.diff(columns, prepend=columns[:1] - 1) > 1, 0)
        assert torch.equal(runs, frame)


@pytest.mark.parametrize("reducer", ["evs", "vidcom2"])
def test_a_video_reducer_prunes_each_gemma4_frame_as_on_the_models_frames(gemma4, reducer):
    """EVS and VidCom2 keep exactly what their algorithms keep on ``get_video_features``' tokens of each video as
    ``(frames, tokens per frame, D)``, per sample of the padded batch (two frame sizes, a text-only sample)."""
    keep = 0.4
    batch, stage = run_video_stage(gemma4, reducer, keep)
    with torch.no_grad():
        videos = (
            gemma4.adapter.vlm()
            .get_video_features(
                batch["pixel_values_videos"],
                batch["video_position_ids"],
                **{k: batch[k] for k in ("num_frames_per_video",) if k in batch},  # none on 5.18
            )
            .pooler_output
        )
    assert len(videos) == 2 and stage.entering[2] == 0
    for b, feats in enumerate(videos):
        x = feats.float().reshape(FRAMES, -1, feats.shape[-1])
        expected = expected_video_keep(reducer, x, keep)
        assert stage.entering[b] == x.shape[0] * x.shape[1]  # the stage's tokens: the video's, not the images'
        assert stage.kept[b] == expected.reshape(-1).nonzero().flatten().tolist()
        assert 0 < stage.leaving[b] < stage.entering[b]


# --- MiniCPM-V 4.6 / 4.7 ------------------------------------------------------------------------------------------

MINICPM = [pytest.param(t, marks=pytest.mark.slow) for t in ("minicpmv4_6", "minicpmv4_7", "minicpm_ocr")]


def _minicpm_video_inputs(b: InputBuilder, frames: int = FRAMES) -> Any:
    """The census inputs (NaViT slices with ``target_sizes``) with a video after the images of every image sample:
    ``frames`` frames of ``(8, 8 (1 + i % 2))`` patches (``(8, 8)`` where the tower takes no mixed sizes, as
    MiniCPM-V 4.6's before 5.21) (no slices), every frame of the batch packed along the width
    as the video processor packs them, each frame's placeholders between the image start and end ids."""
    video_id = int(b.model.config.video_token_id)

    def make_inputs(specs: list[Any], start: int = 0) -> dict[str, Any]:
        out = b(specs, start)
        samples = [i for i, spec in enumerate(specs, start) if spec]
        if not samples:
            return out
        units = [
            b._packed_slice(torch.Generator().manual_seed(500 + 10 * i + f), 1 + i % 2 if b.mixed_sizes else 1)
            for i in samples
            for f in range(frames)
        ]
        pixels = torch.cat([u for u, _ in units], dim=-1)[None]
        sizes = torch.tensor([size for _, size in units])
        with torch.no_grad():
            feats = b.vlm.get_video_features(pixels, sizes).pooler_output
        rows = [row[m.bool()].tolist() for row, m in zip(out["input_ids"], out["attention_mask"], strict=True)]
        counts = iter(int(f.shape[0]) for f in feats)
        for i in samples:
            video = []
            for _ in range(frames):
                n = next(counts)
                video += [b.open, *[video_id] * n, b.close] if b.open is not None else [video_id] * n
            rows[i - start] = rows[i - start][:-2] + video + rows[i - start][-2:]
        longest = max(map(len, rows))
        ids = torch.tensor([[b.pad] * (longest - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
        out.update(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, target_sizes_videos=sizes)
        if b.mm_types:
            out["mm_token_type_ids"] = (ids == b.image_token).long() + 2 * (ids == video_id).long()
        return out

    return make_inputs


def _minicpm_case(model_type: str) -> checks.AdapterCase:
    _skip_unless(model_type)
    model, adapter, builder = _inputs(model_type)
    return _default_layer_case(model, adapter, builder, _minicpm_video_inputs(builder))


@pytest.mark.parametrize("model_type", MINICPM)
def test_minicpm_videos_keep_the_engine_invariants_with_a_grid_per_unit(model_type):
    """Images and a video of two frame sizes in one batch: keep-all identity, cached generation == recomputation and
    batch == one by one at the default layer (and a random stage on the video tokens); each video unit (here a
    frame without slices) is laid out as its ``target_sizes_videos`` grid over the merge (4 in the ``16x`` mode, 2 in
    the ``4x`` mode of MiniCPM-V-OCR's config), of unknown frame."""
    from tokenprune.layout import UNKNOWN_FRAME

    case = _minicpm_case(model_type)
    for check in (checks.keep_all_is_identity, checks.cached_decode_equals_recompute, checks.batch_equals_one_by_one):
        check(case)
    checks.layout_covers_visual_tokens(case)
    batch = case.padded_batch()
    with tp.apply(case.model, video_stage("random", 0.5), plugins=case.manager) as run:
        case.forward(batch)
    (stage,) = run.stats.last_prefill.stages
    sizes = iter(batch["target_sizes_videos"].tolist())
    merge = 2 if case.model.config.downsample_mode == "4x" else 4
    for b, n in enumerate(stage.entering):
        if not n:
            continue
        assert 0 < stage.leaving[b] < n
        image, frame, row, col = (getattr(stage.layout, f)[b, :n] for f in ("image", "frame", "row", "col"))
        assert bool(stage.layout.video[b, :n].all()) and bool((frame == UNKNOWN_FRAME).all())
        at = 0
        for unit in range(FRAMES):
            h, w = (s // merge for s in next(sizes))
            cells = torch.arange(h * w)
            assert bool((image[at : at + h * w] == unit).all())
            assert torch.equal(row[at : at + h * w], cells // w) and torch.equal(col[at : at + h * w], cells % w)
            at += h * w
        assert at == n


@pytest.mark.parametrize("reducer", ["evs", "vidcom2", "dycoke"])
def test_a_video_reducer_on_minicpm_videos_is_refused_naming_the_missing_frames(reducer):
    """The model's forward does not take ``num_frames_per_video`` nor ``grids_videos``: a reducer that works frame by
    frame refuses, naming why, rather than running on one-frame videos."""
    case = _minicpm_case("minicpmv4_6")
    with tp.apply(case.model, video_stage(reducer, 0.5), plugins=case.manager):
        with pytest.raises(ReducerInputError, match="which frame each video token belongs to"):
            case.forward(case.padded_batch())


# --- Molmo2 -------------------------------------------------------------------------------------------------------

#: The tiny model's crops are 8 patches a side: overlap margins of 1 patch leave windows of 6 (the processor's
#: default [4, 4] is for its 27-patch crops).
MARGINS = (1, 1)


def _pooling(index_grid: torch.Tensor, pool: int) -> tuple[torch.Tensor, int, int]:
    """``arange_for_pooling`` of ``image_processing_molmo2.py`` (5.25): the patch-index grid padded with ``-1`` to a
    multiple of ``pool`` (centred), one row of ``pool^2`` patch indices per pooled token, row-major."""
    h, w = index_grid.shape
    ph, pw = -h % pool, -w % pool
    grid = torch.nn.functional.pad(index_grid, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2), value=-1)
    rows, cols = grid.shape[0] // pool, grid.shape[1] // pool
    return grid.reshape(rows, pool, cols, pool).permute(0, 2, 1, 3).reshape(rows * cols, pool * pool), rows, cols


def _canvas(tiles: tuple[int, int], side: int) -> torch.Tensor:
    """The high-resolution canvas's patch indices (``_build_overlapping_crops``): the crops' patches, the overlap
    margins between neighbouring crops dropped, stitched into one grid."""
    (th, tw), (left, right) = tiles, MARGINS
    g = torch.arange(th * tw * side * side).reshape(th, tw, side, side)
    g[1:, :, :left, :] = -1
    g[:, 1:, :, :left] = -1
    g[:-1, :, -right:, :] = -1
    g[:, :-1, :, -right:] = -1
    g = g.permute(0, 2, 1, 3).reshape(-1)
    return g[g >= 0].reshape(th * (side - left - right) + left + right, tw * (side - left - right) + left + right)


def _molmo2_image(side: int, tiles: tuple[int, int], width: int, seed: int) -> dict[str, Any]:
    """One image as ``_image_batch_to_patches_and_grids`` writes it: the global crop then the ``th x tw`` crops as
    patch rows, the global crop's pooling rows then the canvas's (offset past the global crop), its grid."""
    crops = 1 + tiles[0] * tiles[1]
    pixels = torch.randn(crops, side * side, width, generator=torch.Generator().manual_seed(seed))
    low, lh, lw = _pooling(torch.arange(side * side).reshape(side, side), 2)
    high, hh, hw = _pooling(_canvas(tiles, side), 2)
    high = torch.where(high >= 0, high + side * side, high)
    return {"pixels": pixels, "pooling": torch.cat([low, high]), "grid": [lh, lw, hh, hw], "crops": crops}


def _molmo2_tokens(cfg: Any, col: int) -> dict[str, int]:
    return {
        "patch": int(cfg.image_token_id),
        "col": col,
        "low_start": int(cfg.low_res_image_start_token_id),
        "start": int(cfg.image_start_token_id),
        "end": int(cfg.image_end_token_id),
        "frame_start": int(cfg.frame_start_token_id),
        "frame_end": int(cfg.frame_end_token_id),
    }


def _image_string(grid: list[int], tok: dict[str, int]) -> list[int]:
    """``Molmo2Processor.replace_image_token``: the global grid after ``<low_res_im_start>``, then the canvas grid
    after ``<im_start>``, an ``<im_col>`` after every row."""
    lh, lw, hh, hw = grid
    low = [tok["low_start"], *([tok["patch"]] * lw + [tok["col"]]) * lh, tok["end"]]
    high = ([tok["patch"]] * hw + [tok["col"]]) * hh
    return [*low, tok["start"], *high, tok["end"]]


def _padded(rows: list[list[int]], pad: int, typed: set[int]) -> dict[str, torch.Tensor]:
    """Left-padded ids, their mask and ``mm_token_type_ids`` (``1`` on every token of the processor's
    ``image_token_ids``: patches, columns, starts and ends)."""
    longest = max(map(len, rows))
    ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    types = torch.isin(ids, torch.tensor(sorted(typed))).long() * mask
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}


def _molmo2_crop_inputs(b: InputBuilder) -> Any:
    """Images of one global crop plus ``1 x (1 + (i + j) % 2)`` overlapping high-resolution crops each."""
    cfg = b.model.config
    side = b.image_size // b.patch
    tok = _molmo2_tokens(cfg, b.text_ids[170])

    def make_inputs(specs: list[Any], start: int = 0) -> dict[str, Any]:
        t, rows, images = b.text_ids, [], []
        for i, spec in enumerate(specs, start):
            ids = t[i : i + 3]
            for j in range(spec or 0):
                image = _molmo2_image(side, (1, 1 + (i + j) % 2), b._image(0, 0)[0].shape[1], 100 * i + j)
                images.append(image)
                ids = [*ids, *_image_string(image["grid"], tok), t[50 + i]]
            rows.append(ids + t[100 + i : 104 + i % 2])
        out = _padded(rows, b.pad, set(tok.values()))
        if images:
            out.update(
                pixel_values=torch.cat([im["pixels"] for im in images]),
                image_token_pooling=torch.cat([im["pooling"] for im in images]),
                image_grids=torch.tensor([im["grid"] for im in images]),
                image_num_crops=torch.tensor([im["crops"] for im in images]),
            )
        return out

    return make_inputs


def _molmo2_video_inputs(b: InputBuilder, frames: int = FRAMES) -> Any:
    """A video per image sample (Molmo2 takes images or videos, never both; at most one video per sample) of
    ``frames + i % 2`` frames resized to one crop, pooled 3x3 (the video processor's default) into ``3 x 3`` tokens
    padded with ``-1``; each frame's placeholders after a timestamp between ``<frame_start>`` and ``<frame_end>``."""
    cfg = b.model.config
    side = b.image_size // b.patch
    tok = _molmo2_tokens(cfg, b.text_ids[170])
    pooling, rows_per_frame, cols = _pooling(torch.arange(side * side).reshape(side, side), 3)

    def make_inputs(specs: list[Any], start: int = 0) -> dict[str, Any]:
        t, rows, videos = b.text_ids, [], []
        for i, spec in enumerate(specs, start):
            ids = t[i : i + 3]
            if spec:
                g = torch.Generator().manual_seed(700 + i)
                videos.append(torch.randn(frames + i % 2, side * side, b._image(0, 0)[0].shape[1], generator=g))
                for f in range(frames + i % 2):
                    patches = [tok["patch"]] * cols * rows_per_frame
                    ids = [*ids, t[150 + f], tok["frame_start"], *patches, tok["frame_end"]]
            rows.append(ids + t[100 + i : 104 + i % 2])
        out = _padded(rows, b.pad, set(tok.values()) - {tok["col"]})
        if videos:
            pooled = []
            for video in videos:
                offsets = torch.arange(video.shape[0]).view(-1, 1, 1) * side * side
                pooled.append(torch.where(pooling >= 0, pooling + offsets, pooling).reshape(-1, pooling.shape[-1]))
            out.update(
                pixel_values_videos=torch.cat(videos),
                video_token_pooling=torch.cat(pooled),
                video_grids=torch.tensor([[v.shape[0], rows_per_frame, cols] for v in videos]),
            )
        return out

    return make_inputs


def _molmo2_case(inputs: Any) -> checks.AdapterCase:
    _skip_unless("molmo2")
    model, adapter, builder = _inputs("molmo2")
    return _default_layer_case(model, adapter, builder, inputs(builder))


def test_molmo2_images_with_high_res_crops_keep_the_engine_invariants():
    """One and two overlapping high-resolution crops per image beside the global crop, in one padded batch: keep-all
    identity, cached generation == recomputation, batch == one by one at the default layer; the layouts cover every
    image token."""
    case = _molmo2_case(_molmo2_crop_inputs)
    grids = case.padded_batch()["image_grids"].tolist()
    assert {tuple(g) for g in grids} == {(4, 4, 4, 4), (4, 4, 4, 7)}, grids  # 8 x 8 and 8 x 14 patch canvases
    for check in (checks.keep_all_is_identity, checks.cached_decode_equals_recompute, checks.batch_equals_one_by_one):
        check(case)
    checks.layout_covers_visual_tokens(case)


def test_molmo2_image_layout_is_the_global_grid_then_the_canvas_grid():
    """Each image's tokens: view 0 the ``resized_h x resized_w`` global grid, then view 1 the ``high_h x high_w``
    canvas grid, row-major, as the processor's pooling rows order them (``arange_for_pooling``: pooled window
    ``(r, c)`` is row ``r * cols + c``), whatever the image's number of crops."""
    case = _molmo2_case(_molmo2_crop_inputs)
    batch = case.padded_batch()
    pipeline = {"stages": [{"at": "post_projector", "reducer": "check_drop", "keep": 1.0}]}
    with tp.apply(case.model, pipeline, plugins=case.manager) as run:
        case.forward(batch)
    (stage,) = run.stats.last_prefill.stages
    layout, grids = stage.layout, iter(batch["image_grids"].tolist())
    for b, n in enumerate(stage.entering):
        at = 0
        while at < n:
            lh, lw, hh, hw = next(grids)
            for view, (h, w) in enumerate(((lh, lw), (hh, hw))):
                cells = torch.arange(h * w)
                part = slice(at, at + h * w)
                assert bool((layout.view[b, part] == view).all())
                assert torch.equal(layout.row[b, part], cells // w) and torch.equal(layout.col[b, part], cells % w)
                at += h * w
        assert at == n


def test_molmo2_videos_keep_the_engine_invariants_in_frames():
    """Videos of three and four frames (a text-only sample beside them): the placeholders of a forward given videos are video
    tokens laid out as ``video_grids``' frames; keep-all identity, cached generation == recomputation, batch == one
    by one at the default layer; EVS keeps what its algorithm keeps on the frames of the tokens the model builds
    (``get_video_features``' features added to the placeholder's embedding)."""
    from tokenprune_evs import retained_count, retention_mask

    case = _molmo2_case(_molmo2_video_inputs)
    for check in (checks.keep_all_is_identity, checks.cached_decode_equals_recompute, checks.batch_equals_one_by_one):
        check(case)
    checks.layout_covers_visual_tokens(case)
    batch = case.padded_batch()
    with tp.apply(case.model, video_stage("evs", 0.4)) as run:
        case.forward(batch)
    (stage,) = run.stats.last_prefill.stages
    with torch.no_grad():
        videos = (
            case.adapter.vlm()
            .get_video_features(batch["pixel_values_videos"], batch["video_token_pooling"], batch["video_grids"])
            .pooler_output
        )
        # Molmo2 adds the features to the placeholder's embedding: the tokens the stage reads
        placeholder = case.model.get_input_embeddings()(torch.tensor(case.model.config.image_token_id))
    assert len(videos) == 2 and stage.entering[2] == 0
    for b, (feats, (frames, rows, cols)) in enumerate(zip(videos, batch["video_grids"].tolist(), strict=True)):
        frame = stage.layout.frame[b, : stage.entering[b]]
        assert frame.tolist() == [f for f in range(frames) for _ in range(rows * cols)]
        x = (feats + placeholder).float().reshape(frames, rows * cols, -1)
        expected = retention_mask(x, retained_count(rows * cols, frames, 0.4))
        assert stage.kept[b] == expected.reshape(-1).nonzero().flatten().tolist()
        assert 0 < stage.leaving[b] < stage.entering[b]
