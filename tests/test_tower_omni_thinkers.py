"""The Qwen2.5-Omni and Qwen3-Omni thinkers' vision towers (``tokenprune/adapters/omni_thinkers.py``), on the census's
tiny thinkers and inputs.

Qwen2.5-Omni's tower is Qwen2.5-VL's windowed one: its merge units run in window order (``get_window_index``), the
PatchMerger's output is put back in raster order. The census's tiny thinker has windows of 4 units (the checkpoints'
112 pixels), which hold its images whole (window order == raster order); the checks that must see the reordering
also run with windows of 2 units (``window_size`` 56: an image 2 x 4 units wide runs as units 0 1 4 5 2 3 6 7).
Per thinker: the adapter that serves it; the patch-to-token map against the model (the kit's check: a push at one
patch moves exactly the tokens the map marks; and a map that forgets the window order fails it) and against a
direct computation from the documented grouping; VisionZip (``attention: mean``; no CLS) at ``post_projector`` keeps
the tokens whose patches received the most attention, computed here from the tower's own q and k; vision attention
on video tokens served (an image and a video reduced together; ``tokens: image`` the image only; the video scores:
tests/test_tower_qwen_videos.py). Qwen2.5-Omni: ``pre_projector`` and ``vision_layer: k`` on whole
units with the kit's invariants, a ``vision_layer`` cut equal to the next block run window by window on the kept
patches, the images of a prompt with a video reduced and the video kept, FLOPs three ways. Qwen3-Omni: those stages
refused naming DeepStack.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import pytest
import tokenprune_visionzip
import torch
from engine_fixtures import manager_with
from test_engine_packed_tower import _Plugin, _reference_tower
from test_families import _skip_unless, _video_inputs
from test_families_towers import images_beside_videos_are_reduced_alone
from torch import Tensor

import tokenprune as tp
from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.generic import GenericDeepStackAdapter, adapter_for
from tokenprune.adapters.vision import merged_unit_means
from tokenprune.errors import TokenpruneError
from tokenprune.testing import adapters as checks
from tokenprune.testing.census import build_tiny, default_cut_layer
from tokenprune.testing.census_inputs import InputBuilder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

Q25, Q3 = "qwen2_5_omni_thinker", "qwen3_omni_moe_thinker"
THINKERS = [Q25, Q3]
#: The window sides (in merge units) the Qwen2.5-Omni checks run with: the census's (images whole) and 2.
WINDOWS = {"census": None, "window2": 56}
VISIONZIP = {"at": "post_projector", "reducer": "visionzip", "keep": 3}
VISIONZIP["params"] = {"contextual_ratio": 0.0, "attention": "mean"}


def _manager() -> tp.plugins.PluginManager:
    manager = manager_with(tokenprune_visionzip)
    for plugin in (_Plugin(), checks._CheckReducers()):
        if not manager.pluggy.is_registered(plugin):
            manager.register(plugin)
    return manager


def _window(model: torch.nn.Module, adapter: Any, window_size: int | None, full: list[int] | None = None) -> None:
    """Qwen2.5-Omni's tower with windows of ``window_size`` pixels (and full attention at ``full``)."""
    visual = adapter.vlm().visual
    if window_size is not None:
        visual.window_size = visual.config.window_size = window_size
    if full is not None:
        visual.fullatt_block_indexes = visual.config.fullatt_block_indexes = full


def _built(model_type: str, window_size: int | None = None, full: list[int] | None = None) -> tuple[Any, ...]:
    _skip_unless(model_type)
    model = build_tiny(model_type)
    manager = _manager()
    adapter = adapter_for(model, manager)
    _window(model, adapter, window_size, full)
    return model, adapter, InputBuilder(model, adapter), manager


def _case(model_type: str, specs: list[int], window_size: int | None = None, at: Any = "post_projector") -> Any:
    model, adapter, make_inputs, manager = _built(model_type, window_size)
    k, probe = default_cut_layer(adapter)
    return checks.adapter_case(
        model, make_inputs, specs, plugins=manager, pad_token_id=make_inputs.pad, layer=k, probe_layer=probe, at=at
    )


def window_order(h: int, w: int, side: int | None) -> list[int]:
    """The raster unit at each place of a frame of ``h x w`` units in window order, from Qwen2.5-VL's documented
    grouping: windows of ``side x side`` units in raster order (the last ones cut short at the edges), each window's
    units in raster order (``None``: one window)."""
    side = side or max(h, w)
    ids = [(r // side) * (-(-w // side)) + c // side for r in range(h) for c in range(w)]
    return sorted(range(h * w), key=lambda u: ids[u])


# --- the adapters ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", THINKERS)
def test_the_thinkers_are_served_by_their_tower_adapters(model_type):
    """Qwen2.5-Omni: the blocks probed at the last full-attention block, the windowed packed tower, the PatchMerger
    as projector; Qwen3-Omni: probed at the last block, DeepStack residuals kept, no stages before the merger."""
    _skip_unless(model_type)
    with torch.device("meta"):
        model = build_tiny(model_type)
    adapter = adapter_for(model, _manager())
    visual = adapter.vlm().visual
    tower = adapter.vision_tower()
    assert adapter.name == model_type and adapter.position_scheme == "mrope"
    assert tower.layers == tuple(visual.blocks) and not tower.has_cls and tower.videos
    assert default_cut_layer(adapter)[0] == 2
    if model_type == Q25:
        assert visual.config.fullatt_block_indexes == [1] and tower.feature_layer == 1
        assert tower.notes == "last full-attention block"
        packed = adapter.packed_tower()
        assert packed.module is visual and packed.merge == 2 and packed.window == 4 and packed.full_blocks == {1}
        assert adapter.projector() is visual.merger
    else:
        assert isinstance(adapter, GenericDeepStackAdapter) and tower.feature_layer == len(visual.blocks) - 1
        assert adapter.packed_tower() is None and adapter.projector() is None


# --- the patch-to-token map --------------------------------------------------------------------------------------


def _map_cases() -> list[Any]:
    cases = [(Q25, window, specs) for window in WINDOWS for specs in ([1, 2, 1], [2, 1, 1])]
    return [pytest.param(*c, id="-".join(map(str, c))) for c in [*cases, (Q3, "census", [1, 2, 1])]]


@pytest.mark.parametrize(("model_type", "window", "specs"), _map_cases())
def test_vision_patches_map_to_the_tokens_the_model_builds_from_them(model_type, window, specs):
    """The kit's check on the padded batch (images 2 x 2 and 2 x 4 units; with ``[2, 1, 1]`` the last tower sequence
    is the wide image, whose middle and last patches the window order moves)."""
    checks.vision_patches_map_to_tokens(_case(model_type, specs, WINDOWS[window]))


def test_a_map_that_forgets_the_window_order_fails_the_check():
    """The check can fail: the consecutive-units map (Qwen3-Omni's) on Qwen2.5-Omni's windows of 2 units."""
    case = _case(Q25, [2, 1, 1], 56)
    plain = lambda call, values: merged_unit_means(call.arg("image_grid_thw", 1), values, 4)  # noqa: E731
    case.adapter.map_vision_patches = plain
    with pytest.raises(
        checks.AdapterCheckError,
        match=r"position 8 of tower sequence 2 maps to tokens \[14\], but the model builds tokens \[16\]",
    ):
        checks.vision_patches_map_to_tokens(case)


@pytest.mark.parametrize("model_type", THINKERS)
def test_each_token_gets_the_mean_of_its_units_patches(model_type):
    """Computed directly from the grouping: a frame's tower sequence holds its units' 4 patches together, Qwen2.5-Omni's
    in window order (windows of 2 units here; a 3 x 3-unit frame's windows cut short), so raster token ``u`` of a frame
    is the mean of the patches at place ``p`` where the frame's window order puts unit ``u``; a two-frame image's tokens
    frame after frame."""
    _skip_unless(model_type)
    with torch.device("meta"):
        model = build_tiny(model_type)
    adapter = adapter_for(model, _manager())
    side = None
    if model_type == Q25:
        _window(model, adapter, 56)
        side = 2
    grid = torch.tensor([[1, 4, 8], [2, 8, 8], [1, 6, 6]])
    frames = [(h // 2, w // 2) for t, h, w in grid.tolist() for _ in range(t)]
    values = [torch.randn(4 * h * w, 3, generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(frames)]
    mapped = adapter.map_vision_patches(ImageCall((None, grid), {}, None), values)
    tokens = []
    for v, (h, w) in zip(values, frames, strict=True):
        place = {u: p for p, u in enumerate(window_order(h, w, side))}
        tokens.append(torch.stack([v[4 * place[u] : 4 * place[u] + 4].mean(0) for u in range(h * w)]))
    expected = [tokens[0], torch.cat(tokens[1:3]), tokens[3]]
    if model_type == Q25:
        assert window_order(2, 4, 2) == [0, 1, 4, 5, 2, 3, 6, 7]
        assert window_order(3, 3, 2) == [0, 1, 3, 4, 2, 5, 6, 7, 8]
    assert len(mapped) == 3
    for got, want in zip(mapped, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# --- VisionZip on the tower's attention -------------------------------------------------------------------------


def _received_attention(adapter: Any, inputs: dict[str, Any], layer: int) -> Tensor:
    """Each patch's attention received at tower block ``layer`` (mean over heads and the queries of its attention
    segment: its frame, or its window at a windowed block), computed here from the block's input with its own q / k
    (or qkv) projections and rotary embeddings; ``(N,)`` in the tower's order (window order for Qwen2.5-Omni)."""
    attn = adapter.vision_tower().layers[layer].attn
    seen: dict[str, Any] = {}
    handle = attn.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0], **k), with_kwargs=True)
    with torch.no_grad():
        adapter.vlm().get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    handle.remove()
    x, (cos, sin), cu = seen["x"], seen["position_embeddings"], seen["cu_seqlens"].tolist()
    n, heads = x.shape[0], attn.num_heads
    with torch.no_grad():
        if hasattr(attn, "qkv"):
            q, k, _ = attn.qkv(x).reshape(n, 3, heads, -1).unbind(1)
        else:
            q, k = attn.q(x).reshape(n, heads, -1), attn.k(x).reshape(n, heads, -1)
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        q, k = rotate(q, k, cos, sin)
    out = []
    for a, b in itertools.pairwise(cu):
        logits = torch.einsum("qhd,khd->hqk", q[a:b].float(), k[a:b].float()) * q.shape[-1] ** -0.5
        out.append(logits.softmax(-1).mean((0, 1)))
    return torch.cat(out)


ZIP_CASES = [(Q25, "census", None), (Q25, "window2", None), (Q25, "window2", 0), (Q3, "census", None)]


@pytest.mark.parametrize(("model_type", "window", "layer"), ZIP_CASES)
def test_visionzip_keeps_the_tokens_whose_patches_received_the_most_attention(model_type, window, layer):
    """VisionZip's dominant tokens (``attention: mean``, keep 3 per sample) on the padded batch are, per sample, the
    3 tokens with the highest mean over their unit's 4 patches of the attention received at the probed block (the
    default, or Qwen2.5-Omni's windowed block 0: attention within each window), each image's units put back in raster
    order by :func:`window_order`; a sample alone keeps the same."""
    model, adapter, make_inputs, manager = _built(model_type, WINDOWS[window])
    side = 2 if WINDOWS[window] else None
    inputs = make_inputs([1, 2, 1])
    tower = adapter.vision_tower()
    received = _received_attention(adapter, inputs, tower.feature_layer if layer is None else layer)
    units = []
    for scores, (_, h, w) in zip(
        received.split(inputs["image_grid_thw"].prod(-1).tolist()), inputs["image_grid_thw"].tolist(), strict=True
    ):
        placed = scores.reshape(-1, 4).mean(1)
        raster = torch.empty_like(placed)
        raster[torch.tensor(window_order(h // 2, w // 2, side))] = placed
        units.append(raster)
    per_sample = [torch.cat(units[0:1]), torch.cat(units[1:3]), torch.cat(units[3:4])]
    stage = {**VISIONZIP, "params": {**VISIONZIP["params"], "layer": layer}}
    with tp.apply(model, {"stages": [stage]}, plugins=manager) as run, torch.no_grad():
        batch = model(**inputs).logits
        (s,) = run.stats.last_prefill.stages
        assert s.entering == [4, 12, 4] and s.leaving == [3, 3, 3]
        for i, scores in enumerate(per_sample):
            assert s.kept[i] == sorted(scores.topk(3).indices.tolist()), i
        kept = s.kept
        for i, n in enumerate([1, 2, 1]):
            alone = model(**make_inputs([n], start=i)).logits
            assert run.stats.last_prefill.stages[0].kept[0] == kept[i]
            torch.testing.assert_close(alone[0, -1], batch[i, -1], atol=1e-5, rtol=0)


def test_visionzip_keeps_the_same_units_before_and_after_the_merger():
    """Qwen2.5-Omni, windows of 2 units: VisionZip at ``pre_projector`` (budget per frame) keeps, for the one-image
    samples, the units it keeps at ``post_projector`` (both rank by the probe's scores averaged over each unit)."""
    model, _, make_inputs, manager = _built(Q25, 56)
    inputs = make_inputs([1, 2, 1])
    kept = {}
    for at in ("post_projector", "pre_projector"):
        with tp.apply(model, {"stages": [{**VISIONZIP, "at": at}]}, plugins=manager) as run, torch.no_grad():
            model(**inputs)
            (stage,) = run.stats.last_prefill.stages
        kept[at] = stage.kept
        assert stage.leaving == ([3, 6, 3] if at == "pre_projector" else [3, 3, 3])
    assert kept["pre_projector"][0::2] == kept["post_projector"][0::2]


@pytest.mark.parametrize("model_type", THINKERS)
def test_a_vision_attention_stage_on_video_tokens_is_served_and_tokens_image_prunes_the_images(model_type):
    """The probe watches the video call too (the thinkers' videos run through the tower directly): a stage reducing
    every visual token reduces the image (4 units) and the video (two frames of 4 units) together, and ``tokens:
    image`` reduces the image only, keeping the video (the video scores: tests/test_tower_qwen_videos.py)."""
    model, _, builder, manager = _built(model_type)
    inputs = _video_inputs(builder)([1])
    for tokens, entering in (("all", 4 + 8), ("image", 4)):
        stage = {**VISIONZIP, "keep": 2, "tokens": tokens}
        with tp.apply(model, {"stages": [stage]}, plugins=manager) as run, torch.no_grad():
            model(**inputs)
            (s,) = run.stats.last_prefill.stages
        assert s.entering == [entering] and s.leaving == [2]


# --- stages before the merger -----------------------------------------------------------------------------------

BEFORE = ["pre_projector", {"vision_layer": 1}]


@pytest.mark.parametrize("at", BEFORE, ids=str)
def test_qwen3_omni_refuses_stages_before_the_merger_naming_deepstack(at):
    model, _, _, manager = _built(Q3)
    with pytest.raises(TokenpruneError, match=r"'qwen3_omni_moe_thinker'.*DeepStack mergers read intermediate"):
        tp.apply(model, {"stages": [{"at": at, "reducer": "unit_drop", "keep": 2}]}, plugins=manager)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("at", BEFORE, ids=str)
@pytest.mark.parametrize("window", WINDOWS)
def test_qwen2_5_omni_stages_before_the_merger_keep_the_invariants(window, at):
    """The kit's invariants with the first stage before the merger (whole units, in window order or not), the layer
    stage at the default layer: keep-all identity, cached generation == recomputation (original and compact
    positions), batch == one by one (images one and two units wide) and ``remove()``."""
    case = _case(Q25, [1, 2, 1], WINDOWS[window], at)
    checks.keep_all_is_identity(case)
    checks.cached_decode_equals_recompute(case)
    checks.cached_decode_equals_recompute(case, positions="compact")
    checks.batch_equals_one_by_one(case)
    checks.remove_restores_model(case)


def test_a_vision_layer_cut_equals_the_windowed_block_run_on_the_kept_patches():
    """Windows of 2 units and full attention at block 0 only (block 1 windowed): ``vision_layer: 1`` on an image
    2 x 4 units wide keeps 3 units, and the language model receives the tokens of block 1 run window by window on
    the kept patches (their rotary embeddings; a window left empty skipped), through the model's own merger, in
    raster order."""
    model, adapter, make_inputs, manager = _built(Q25, 56, full=[0])
    inputs = make_inputs([1], start=1)
    visual, seen = adapter.vlm().visual, []
    pipeline = {"stages": [{"at": {"vision_layer": 1}, "reducer": "unit_drop", "keep": 3}]}
    with tp.apply(model, pipeline, plugins=manager) as run:
        handle = adapter.language_model().register_forward_pre_hook(
            lambda m, a, k: seen.append(k["inputs_embeds"]), with_kwargs=True
        )
        with torch.no_grad():
            model(**inputs)
        handle.remove()
        (stage,) = run.stats.last_prefill.stages
    kept = torch.tensor(stage.kept[0])
    keep = torch.zeros(8, dtype=torch.bool)
    keep[kept] = True
    order = torch.tensor(window_order(2, 4, 2))
    ref = _reference_tower(visual, inputs["pixel_values"], inputs["image_grid_thw"], keep, order)
    start = int((inputs["input_ids"][0] == adapter.image_token_id()).nonzero()[0, 0])
    assert len(kept) == 3 and seen[0].shape[1] == inputs["input_ids"].shape[1] - 5
    torch.testing.assert_close(seen[0][0, start : start + 3], ref[kept], atol=1e-5, rtol=0)


@pytest.mark.parametrize("at", BEFORE, ids=str)
def test_qwen2_5_omni_stages_before_the_merger_reduce_the_images_of_a_prompt_with_a_video(at):
    """A video beside each image (its tower call through ``get_video_features``): the stage reduces the image units
    only, and keep-all identity, cached generation == recomputation and batch == one by one hold."""
    images_beside_videos_are_reduced_alone(*_built(Q25, 56), at)


def test_qwen2_5_omni_flops_of_stages_before_the_merger_agree_three_ways():
    """With a ``pre_projector``, a ``vision_layer: 1`` and a VisionZip stage in turn (windows of 2 units): analytic ==
    torch == fvcore on every decoder layer and the language model, which runs on the kept units' tokens."""
    from tokenprune.cost.flops import count_flops

    model, _, make_inputs, manager = _built(Q25, 56)
    inputs = make_inputs([1], start=1)  # one image of 8 units
    base = count_flops(model, inputs, use_fvcore=False)
    stages = [{"at": at, "reducer": "unit_drop", "keep": 3} for at in BEFORE] + [VISIONZIP]
    for stage in stages:
        report = count_flops(model, inputs, {"stages": [stage]}, plugins=manager)
        for row in report.layers:
            assert row.analytic == row.torch == row.fvcore, (stage, row, report.fvcore_notes)
        lm = report.language_model
        assert lm["analytic"] == lm["torch"] == lm["fvcore"], report.fvcore_notes
        assert report.layers[0].tokens[0] == base.layers[0].tokens[0] - 5
        assert report.language_model["analytic"] < base.language_model["analytic"]
        if stage["at"] == {"vision_layer": 1}:
            assert report.vision < base.vision
