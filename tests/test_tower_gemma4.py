"""Gemma 4's vision tower (``tokenprune/adapters/gemma4.py``): vision attention on images and videos, each token the
mean of the ``k x k`` patches the tower pools into it, on the census's tiny model and inputs.

transformers' ``modeling_gemma4.py`` (5.18 to 5.25): ``Gemma4VisionModel`` runs one sequence per image (per video
frame) of patch rows with their ``(x, y)`` (``-1`` on padding, hidden as keys by the bidirectional mask); its
attention dispatches through ``ALL_ATTENTION_FUNCTIONS``; ``Gemma4VisionPooler._avg_pool_by_positions`` averages
patch ``(x, y)`` into token ``x // k + (X // k) * (y // k)``; ``embed_vision`` embeds token by token. Checked: the
adapter that serves it; the patch-to-token map against the model (the kit's check: a push at one patch moves exactly
the tokens the map marks; the same on the video call) and against a direct computation (patches in any order,
padding); VisionZip (``attention: mean``) at ``post_projector`` keeps the tokens of the highest mapped eager
attention, batch == one by one (images of different sizes; images and videos together); the refusals (``cls``: no
CLS token; ``pre_projector`` and ``vision_layer``: the pooler before the per-token embedder; Gemma 4 Unified: no
tower). The invariants of the family: ``tests/test_families.py -k gemma4``, ``tests/test_family_videos.py``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import tokenprune_visionzip
import torch
import transformers
from engine_fixtures import manager_with
from PIL import Image
from test_engine_packed_tower import _Plugin
from test_families import _skip_unless
from test_family_checkpoints import _layers, _run, _saved, _visual_count
from test_family_videos import _gemma4_video_inputs, _skip_where_the_stock_video_forward_fails
from test_vision_attention import _eager_weights
from torch import Tensor
from video_tower_checks import video_call

import tokenprune as tp
from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.gemma4 import Gemma4Adapter
from tokenprune.adapters.generic import GenericAdapter, adapter_for
from tokenprune.engine import compat
from tokenprune.errors import TokenpruneError
from tokenprune.testing import adapters as checks
from tokenprune.testing.census import build_tiny, default_cut_layer
from tokenprune.testing.census_inputs import InputBuilder
from tokenprune.testing.video_towers import video_patches_map_to_tokens

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SPECS = [1, 2, 1]  # the census's padded batch: images one and two pooled blocks wide
VISIONZIP = {"contextual_ratio": 0.0, "attention": "mean"}


def _manager() -> tp.plugins.PluginManager:
    manager = manager_with(tokenprune_visionzip)
    for plugin in (_Plugin(), checks._CheckReducers()):
        manager.register(plugin)
    return manager


@pytest.fixture(scope="module")
def case() -> checks.AdapterCase:
    _skip_unless("gemma4")
    model = build_tiny("gemma4")
    manager = _manager()
    adapter = adapter_for(model, manager)
    builder = InputBuilder(model, adapter)
    k, probe = default_cut_layer(adapter)
    return checks.adapter_case(
        model, builder, SPECS, plugins=manager, pad_token_id=builder.pad, layer=k, probe_layer=probe
    )


@pytest.fixture(scope="module")
def video_case(case: checks.AdapterCase) -> checks.AdapterCase:
    """The same model and images, with a video of three frames after the images of every image sample."""
    builder = case.make_inputs
    video = checks.adapter_case(
        case.model, _gemma4_video_inputs(builder), SPECS, plugins=case.manager, pad_token_id=builder.pad
    )
    _skip_where_the_stock_video_forward_fails(video)
    return video


def _visionzip(keep: int, **extra: Any) -> dict[str, Any]:
    return {"stages": [{"at": "post_projector", "reducer": "visionzip", "keep": keep, "params": VISIONZIP, **extra}]}


# --- the adapter ----------------------------------------------------------------------------------


def test_gemma4_is_served_by_its_tower_adapter(case):
    """The tower's encoder layers, probed at the last (the pooler's input), no CLS, videos through the same tower;
    the generic adapter's positions and default layer are kept."""
    adapter, tower = case.adapter, case.adapter.vision_tower()
    assert isinstance(adapter, Gemma4Adapter) and adapter.name == "gemma4"
    encoder = case.model.model.vision_tower.encoder
    assert tower.layers == tuple(encoder.layers) and tower.feature_layer == len(encoder.layers) - 1
    assert not tower.has_cls and tower.videos and tower.video_layers == ()
    assert adapter.position_scheme == "rope" and default_cut_layer(adapter)[0] == 2
    assert adapter.projector() is None and adapter.packed_tower() is None


def test_gemma4_unified_has_no_tower_and_stays_with_the_generic_adapter():
    """Gemma 4 Unified embeds its patches directly (no encoder): no vision attention, refused at ``apply``."""
    _skip_unless("gemma4_unified")
    with torch.device("meta"):
        model = build_tiny("gemma4_unified")
    adapter = adapter_for(model, _manager())
    assert type(adapter) is GenericAdapter and adapter.vision_tower() is None
    with pytest.raises(TokenpruneError, match=r"reads vision-encoder attention.*does not describe its vision tower"):
        tp.apply(model, _visionzip(3), plugins=_manager())


# --- the patch-to-token map -------------------------------------------------------------------------


def test_vision_patches_map_to_the_tokens_the_model_builds_from_them(case):
    """On the census's padded batch (images 6x6 and 6x12 patches, zero-padded to the batch's largest; the last
    position of the first sequence is padding, built into no token)."""
    positions = case.padded_batch()["image_position_ids"]
    assert bool((positions[0] == -1).all(-1).any()) and len({int((p != -1).all(-1).sum()) for p in positions}) == 2
    checks.vision_patches_map_to_tokens(case)


def _expected_means(positions: Tensor, values: Tensor, k: int) -> Tensor:
    """Token ``(r, c)`` of an image ``X x Y`` patches wide: the mean of the patches at ``x // k == c``,
    ``y // k == r``, tokens row by row (the pooler's documented grouping), computed patch by patch."""
    real = [(int(x), int(y), i) for i, (x, y) in enumerate(positions.tolist()) if (x, y) != (-1, -1)]
    cols, rows = (max(p[0] for p in real) + 1) // k, (max(p[1] for p in real) + 1) // k
    out = []
    for r in range(rows):
        for c in range(cols):
            block = [values[i] for x, y, i in real if x // k == c and y // k == r]
            out.append(torch.stack(block).mean(0))
    return torch.stack(out)


def test_each_token_is_the_mean_of_its_k_by_k_patches(case):
    """Computed directly: an image of 9 x 6 patches (``k = 3``: 2 rows of 3 tokens) with its patches in a shuffled
    order and padding rows between them, and a 3 x 3 image padded at the end; the map follows the positions, not the
    rows' order, and leaves the padding out. The model's own pooler agrees (its token is the sum over ``k^2``)."""
    adapter = case.adapter
    k = adapter.pooling()
    assert k == 3
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.arange(6), torch.arange(9), indexing="ij")
    wide = torch.stack([x.reshape(-1), y.reshape(-1)], 1)[torch.randperm(54, generator=g)]
    wide = torch.cat([wide[:20], torch.full((9, 2), -1), wide[20:], torch.full((9, 2), -1)])  # 72 rows
    y, x = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    small = torch.cat([torch.stack([x.reshape(-1), y.reshape(-1)], 1), torch.full((63, 2), -1)])
    positions = torch.stack([wide, small])
    values = [torch.randn(72, 4, generator=g) for _ in range(2)]
    mapped = adapter.map_vision_patches(ImageCall((None, positions), {}, None), values)
    assert [tuple(m.shape) for m in mapped] == [(6, 4), (1, 4)]
    for got, pos, v in zip(mapped, positions, values, strict=True):
        torch.testing.assert_close(got, _expected_means(pos, v, k), rtol=0, atol=1e-6)
        pooled, mask = case.model.model.vision_tower.pooler._avg_pool_by_positions(
            v.masked_fill((pos == -1).all(-1)[:, None], 0.0)[None], pos[None], 72 // k**2
        )
        torch.testing.assert_close(got, pooled[0][mask[0]], rtol=0, atol=1e-6)  # full blocks: sum / k^2


def _check_pushes(adapter: Any, method: Any, call: ImageCall, places: list[tuple[int, int]], mapper: Any) -> None:
    """The kit's push check on one feature call (``method(*call.args, **call.kwargs)``): a value at tower position
    ``p`` of sequence ``r`` (each of ``places``) marks (through ``mapper``) exactly the tokens that move when that
    position's attention output at the last tower layer is pushed; a constant maps to 1 on every token."""
    attention = compat.vision_attention_module(adapter.vision_tower().layers[-1])
    lengths: list[int] = []

    def features(flat: int | None) -> Tensor:
        def push(module: torch.nn.Module, _: Any, output: Any) -> Any:
            out = output[0].clone()
            if not lengths:
                lengths.extend([out.shape[1]] * out.shape[0])
            if flat is not None:
                out.reshape(-1, out.shape[-1])[flat] += torch.linspace(-50.0, 50.0, out.shape[-1])
            return (out, *output[1:])

        handle = attention.register_forward_hook(push)
        try:
            with torch.no_grad():
                return torch.cat(list(method(*call.args, **call.kwargs).pooler_output))
        finally:
            handle.remove()

    base = features(None)
    for r, p in places:
        values = [torch.zeros(n, 1) for n in lengths]
        values[r][p] = 1.0
        marked = torch.cat(mapper(call, values)).reshape(-1).abs() > 1e-9
        moved = (features(sum(lengths[:r]) + p) - base).abs().amax(-1) > 1e-4
        assert torch.equal(marked, moved), (r, p, marked.nonzero().flatten(), moved.nonzero().flatten())
    ones = torch.cat(mapper(call, [torch.ones(n, 1) for n in lengths])).reshape(-1)
    torch.testing.assert_close(ones, torch.ones_like(ones))


def test_the_image_processors_patches_map_to_the_tokens_the_model_builds(case):
    """On what Gemma 4's own image processor writes (``Gemma4ImageProcessorPil``, the tiny checkpoint's, 70 soft
    tokens at most: two images of other aspect ratios resized to 18 x 30 and 42 x 12 patches, padded to 630 rows):
    the first and last patches, patches inside the images, the first padding row."""
    if not hasattr(transformers, "Gemma4ImageProcessorPil"):
        pytest.skip(f"transformers {compat.transformers_version()} has no Gemma4ImageProcessorPil")
    vision = case.model.config.vision_config
    processor = transformers.Gemma4ImageProcessorPil(
        patch_size=int(vision.patch_size), pooling_kernel_size=int(vision.pooling_kernel_size), max_soft_tokens=70
    )
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(96, 64), (64, 200)]]
    out = processor(images, return_tensors="pt")
    positions = out["image_position_ids"]
    real = (positions != -1).all(-1).sum(1).tolist()
    assert real == [540, 504] and positions.shape[1] == 630
    call = ImageCall((out["pixel_values"], positions), {}, None)
    places = [(r, p) for r in (0, 1) for p in (0, 1, 29, 31, 100, real[r] - 1, real[r])]
    _check_pushes(case.adapter, case.adapter.vlm().get_image_features, call, places, case.adapter.map_vision_patches)


def test_a_video_frames_patches_map_to_its_video_tokens(video_case):
    """The push check on the ``get_video_features`` call of images and videos of two frame sizes (one tower sequence
    per frame, a video's frames one after the other; 5.18: the videos stacked)."""
    adapter = video_case.adapter
    args, kwargs = video_call(video_case.model, video_case.model.model, video_case.padded_batch())
    pixels = args[0] if args else kwargs["pixel_values_videos"]
    frames, length = int(pixels.reshape(-1, *pixels.shape[-2:]).shape[0]), int(pixels.shape[-2])
    places = [(r, p) for r in (0, 4, frames - 1) for p in (0, 1, length // 2, length - 1)]
    call = ImageCall(args, kwargs, None)
    _check_pushes(adapter, adapter.vlm().get_video_features, call, places, adapter.map_vision_video_patches)
    lengths = video_patches_map_to_tokens(video_case.model, video_case.padded_batch(), adapter=adapter)
    assert len(lengths) == frames  # the kit's check (positions 0-3 and the quarters of sequences 0, 1, last) too


# --- VisionZip end to end ------------------------------------------------------------------------------


def _eager_token_scores(case: checks.AdapterCase, inputs: dict[str, Any]) -> list[Tensor]:
    """Per sample, its image tokens' VisionZip scores computed apart from the probe: the tower's last layer under
    eager attention, averaged over heads and the real (non-padding) query rows, each token the mean over its
    patches (:func:`_expected_means`), the images of a sample in order."""
    layers = case.adapter.vision_tower().layers
    modules = [compat.vision_attention_module(layer) for layer in layers]
    (weights,) = _eager_weights(case.model, inputs, modules)[len(layers) - 1]  # one call: (images, H, P, P)
    positions = inputs["image_position_ids"]
    real = ~(positions == -1).all(-1)
    per_image = []
    for w, pos, ok in zip(weights.mean(1), positions, real, strict=True):
        scores = w[ok].mean(0)  # (P,): the attention each patch receives, over the real queries
        per_image.append(_expected_means(pos, scores[:, None], case.adapter.pooling())[:, 0])
    out, n = [], 0
    for spec in SPECS:
        out.append(torch.cat(per_image[n : n + spec]))
        n += spec
    return out


def test_visionzip_keeps_the_tokens_of_the_highest_mapped_attention(case):
    """VisionZip (dominant tokens only, ``attention: mean``) at ``post_projector`` on the padded batch of images of
    different sizes: each sample keeps its 3 tokens of highest eager attention mapped to the tokens, the same as
    alone, with the same last logits."""
    batch = case.make_inputs(SPECS)
    expected = _eager_token_scores(case, batch)
    with tp.apply(case.model, _visionzip(3), plugins=case.manager) as run:
        out = case.forward(batch).logits
        (stage,) = run.stats.last_prefill.stages
        assert stage.entering == [4, 12, 4] and stage.leaving == [3, 3, 3]
        kept = stage.kept
        for i, scores in enumerate(expected):
            assert sorted(kept[i]) == sorted(scores.topk(3).indices.tolist()), (i, scores)
            alone = case.forward(case.make_inputs([SPECS[i]], start=i)).logits
            assert run.stats.last_prefill.stages[0].kept[0] == kept[i]
            torch.testing.assert_close(alone[0, -1], out[i, -1], atol=1e-5, rtol=0)


def test_visionzip_ranks_image_and_video_tokens_by_the_towers_attention(video_case):
    """``tokens: all`` on images and videos (frames of two sizes): the video tokens are ranked by their frames'
    attention next to the image tokens; the padded batch keeps per sample what it keeps alone."""
    batch = video_case.make_inputs(SPECS)
    video_id = video_case.model.config.video_token_id
    videos = (batch["input_ids"] == video_id).sum(1).tolist()
    with tp.apply(video_case.model, _visionzip(5), plugins=video_case.manager) as run:
        out = video_case.forward(batch).logits
        (stage,) = run.stats.last_prefill.stages
        assert stage.entering == [n + v for n, v in zip([4, 12, 4], videos, strict=True)]
        assert stage.leaving == [5, 5, 5]
        for i, spec in enumerate(SPECS):
            alone = video_case.forward(video_case.make_inputs([spec], start=i)).logits
            assert run.stats.last_prefill.stages[0].kept[0] == stage.kept[i]
            torch.testing.assert_close(alone[0, -1], out[i, -1], atol=1e-5, rtol=0)
    assert any(max(k) >= n for k, n in zip(stage.kept, [4, 12, 4], strict=True))  # a video token (after the images)


# --- refusals -----------------------------------------------------------------------------------------


def test_cls_attention_is_refused_naming_the_tower(case):
    pipe = {"stages": [{"at": "post_projector", "reducer": "visionzip", "keep": 3, "params": {"attention": "cls"}}]}
    with pytest.raises(TokenpruneError, match=r"Gemma4VisionModel has no CLS token; use the 'mean'"):
        tp.apply(case.model, pipe, plugins=case.manager)


@pytest.mark.parametrize(
    ("at", "reducer"),
    [("pre_projector", "visionzip"), ("pre_projector", "unit_drop"), ({"vision_layer": 1}, "unit_drop")],
)
def test_stages_before_the_embedder_are_refused_naming_the_pooler(case, at, reducer):
    """The embedder's input is the pooled tokens, not the tower's patches: refused, whatever the reducer reads."""
    params = VISIONZIP if reducer == "visionzip" else {}
    pipe = {"stages": [{"at": at, "reducer": reducer, "keep": 3, "params": params}]}
    with pytest.raises(TokenpruneError, match=r"'gemma4'.*pools each k x k block of patches.*Gemma4VisionPooler"):
        tp.apply(case.model, pipe, plugins=case.manager)


def test_run_with_visionzip_on_the_towers_attention(tmp_path_factory):
    """``tokenprune run`` on the tiny saved checkpoint with its own processor (a 96x64 image, resized to 30 x 18 patches: 10 x 6 tokens):
    VisionZip (dominant tokens, ``attention: mean``) at ``post_projector`` keeps half the image's tokens, every
    decoder layer runs on the rest."""
    _skip_unless("gemma4")
    root = tmp_path_factory.mktemp("gemma4-visionzip")
    image = root / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 64, 3), dtype=np.uint8)).save(image)
    try:
        folder = _saved("gemma4", tmp_path_factory)
    except ModuleNotFoundError as exc:  # 5.18: its Gemma4Processor imports the torchvision image processor
        if "torchvision" not in repr(exc.__cause__):
            raise
        pytest.skip(
            f"transformers {compat.transformers_version()}'s Gemma4Processor imports torchvision, not loadable here"
        )
    visual, prompt = _visual_count(folder, image)
    assert visual == 60
    pipeline = root / "visionzip.yaml"
    params = "{contextual_ratio: 0.0, attention: mean}"
    pipeline.write_text(
        f"stages:\n  - {{at: post_projector, reducer: visionzip, keep: {visual // 2}, params: {params}}}\n"
    )
    output = _run(folder, pipeline, image)
    assert re.search(rf"stage 0 visionzip at post_projector: visual tokens {visual} -> {visual // 2} ", output), output
    assert set(_layers(output)) == {prompt - visual // 2}
