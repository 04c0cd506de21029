"""MiniCPM-V 4.6 / 4.7 and MiniCPM-V-OCR: vision attention on their NaViT tower (``tokenprune/adapters/minicpmv.py``),
on the census's tiny models and inputs (slices of ``(8, 8k)`` patches NaViT-packed with ``target_sizes``, slices of
different sizes in one batch where the tower takes them).

The adapter serves the three types; its patch-to-token map is checked against the model (the kit's check: a push at
one position of the probed layer moves exactly the tokens the map marks), at the last layer (after the window merger
in the ``16x`` mode) and at the first (before it), and against a direct computation of each token's block of
positions; VisionZip (``attention: mean``) at ``post_projector`` keeps, per sample, the tokens with the highest scores
computed here from the layer's own q/k and the block means, and batch == one by one; ``cls``, ``pre_projector`` and
``vision_layer`` stages are refused naming why; a vision-attention stage on video tokens is refused and ``tokens:
image`` reduces the images of an image + video batch; a stage reading the layer before the window merger keeps the
tokens its attention ranks highest there. The engine invariants of the family: tests/test_families.py.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import tokenprune_visionzip
import torch
from engine_fixtures import manager_with
from test_engine_packed_tower import _Plugin
from test_families import SLOW, _skip_unless
from torch import Tensor

import tokenprune as tp
from tokenprune import Capabilities, ReduceContext, ReducerParams, ScoringReducer
from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.generic import adapter_for
from tokenprune.errors import TokenpruneError
from tokenprune.reducer import Requirements, VisionAttentionRequest
from tokenprune.testing import adapters as checks
from tokenprune.testing.census import build_tiny, default_cut_layer
from tokenprune.testing.census_inputs import InputBuilder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TYPES = ["minicpmv4_6", "minicpmv4_7", "minicpm_ocr"]
#: The types whose tiny config runs the window merger (the ``16x`` mode); MiniCPM-V-OCR's config is ``4x``.
WINDOWED = ["minicpmv4_6", "minicpmv4_7"]


class FirstLayerAttention(ScoringReducer):
    """Keeps the tokens whose patches receive the most attention at the tower's layer 0 (before the window merger)."""

    name = "first_layer_attention"
    capabilities = Capabilities(insertion_points=frozenset({"post_projector"}), vision_attention=frozenset({"mean"}))

    @classmethod
    def requirements(cls, params: ReducerParams) -> Requirements:
        return Requirements(vision_attention=VisionAttentionRequest("mean", 0))

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        return ctx.vision_attention


class _Reducers:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        registry.add(FirstLayerAttention)


def _params(types: list[str]) -> list[Any]:
    return [pytest.param(t, marks=pytest.mark.slow) if t in SLOW else t for t in types]


def _manager() -> tp.plugins.PluginManager:
    manager = manager_with(tokenprune_visionzip)
    for plugin in (_Plugin(), _Reducers(), checks._CheckReducers()):
        manager.register(plugin)
    return manager


def _built(model_type: str) -> tuple[torch.nn.Module, Any, InputBuilder, tp.plugins.PluginManager]:
    _skip_unless(model_type)
    model = build_tiny(model_type)
    manager = _manager()
    adapter = adapter_for(model, manager)
    return model, adapter, InputBuilder(model, adapter), manager


def _case(model_type: str) -> checks.AdapterCase:
    model, adapter, make_inputs, manager = _built(model_type)
    k, probe = default_cut_layer(adapter)
    return checks.adapter_case(
        model, make_inputs, [1, 2, 1], plugins=manager, pad_token_id=make_inputs.pad, layer=k, probe_layer=probe
    )


@pytest.mark.parametrize("model_type", TYPES)
def test_the_family_is_served_by_its_tower_adapter(model_type):
    """The encoder's layers, probed at the last (the merger's input), no CLS, no videos, no per-token projector."""
    _skip_unless(model_type)
    with torch.device("meta"):
        model = build_tiny(model_type)
    adapter = adapter_for(model, _manager())
    tower = adapter.vision_tower()
    layers = model.model.vision_tower.encoder.layers
    assert adapter.name == "minicpmv"
    assert tower.layers == tuple(layers) and tower.feature_layer == len(layers) - 1
    assert not tower.has_cls and not tower.videos
    assert adapter.projector() is None and adapter.packed_tower() is None
    assert default_cut_layer(adapter)[0] == 3  # the generic adapter's hybrid language model is kept


@pytest.mark.parametrize("model_type", _params(TYPES))
def test_vision_patches_map_to_the_tokens_the_model_builds_from_them(model_type):
    """At the default (last) layer: after the window merger in the ``16x`` mode, every layer's in the ``4x`` mode."""
    checks.vision_patches_map_to_tokens(_case(model_type))


@pytest.mark.parametrize("model_type", _params(WINDOWED))
def test_positions_before_the_window_merger_map_to_the_tokens_built_from_them(model_type):
    """A layer before the window merger, its sequences the slices' full patch grids: a token built from a 4 x 4 block
    of patches. Checked on the tower cut to its layer 0 (``insert_layer_id``: the window merger runs on its output),
    which the probe reads as the last layer (later layers attend across the slice, so the kit's push would move every
    token of it)."""
    case = _case(model_type)
    tower = case.model.model.vision_tower
    assert case.model.config.vision_config.insert_layer_id == 0
    tower.encoder.layers = torch.nn.ModuleList(list(tower.encoder.layers)[:1])
    assert case.adapter.vision_tower().layers == (tower.encoder.layers[0],)
    checks.vision_patches_map_to_tokens(case)


def _block(v: Tensor, width: int, k: int, i: int, j: int) -> Tensor:
    return torch.stack([v[(k * i + a) * width + k * j + b] for a in range(k) for b in range(k)]).mean(0)


@pytest.mark.parametrize("model_type", TYPES)
def test_each_token_gets_the_mean_of_its_block_of_raster_positions(model_type):
    """Computed directly: slices of 8 x 8 and 8 x 16 patches in raster order (patch ``(r, c)`` at row ``w r + c``);
    ``16x``: token ``(i, j)`` the mean of patches ``(4i + a, 4j + b)`` on the patch grid, of windows
    ``(2i + a, 2j + b)`` on the window grid after the window merger; ``4x``: of patches ``(2i + a, 2j + b)``."""
    _skip_unless(model_type)
    with torch.device("meta"):
        model = build_tiny(model_type)
    adapter = adapter_for(model, _manager())
    sizes = torch.tensor([[8, 8], [8, 16]])
    windowed = model.config.downsample_mode != "4x"
    cases = [([(8, 8), (8, 16)], 4 if windowed else 2)] + ([([(4, 4), (4, 8)], 2)] if windowed else [])
    for grid, k in cases:
        g = torch.Generator().manual_seed(k)
        values = [torch.randn(h * w, 3, generator=g) for h, w in grid]
        mapped = adapter.map_vision_patches(ImageCall((None, sizes), {}, None), values)
        expected = [
            torch.stack([_block(v, w, k, i, j) for i in range(h // k) for j in range(w // k)])
            for v, (h, w) in zip(values, grid, strict=True)
        ]
        assert len(mapped) == 2
        for got, want in zip(mapped, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if windowed:  # the call's own downsample_mode wins over the config's
        values = [torch.randn(h * w, 3) for h, w in ((8, 8), (8, 16))]
        four = adapter.map_vision_patches(ImageCall((None, sizes), {"downsample_mode": "4x"}, None), values)
        assert [int(m.shape[0]) for m in four] == [16, 32]
    with pytest.raises(TokenpruneError, match="fits neither the 8 x 8 patches"):
        adapter.map_vision_patches(ImageCall((None, sizes), {}, None), [torch.zeros(10, 1), torch.zeros(128, 1)])


def _scores_at(model: torch.nn.Module, inputs: dict[str, Any], layer: int = -1) -> list[Tensor]:
    """Per slice, the attention each position receives at the tower's ``layer`` (softmax of its q/k, mean over the
    slice's query rows and the heads), computed here from the layer's input."""
    attn = model.model.vision_tower.encoder.layers[layer].self_attn
    seen: dict[str, Any] = {}

    def grab(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.update(hidden=kwargs["hidden_states"], cu=kwargs["cu_seqlens"])

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    x, cu = seen["hidden"][0], seen["cu"].tolist()
    out = []
    with torch.no_grad():
        for a, b in itertools.pairwise(cu):
            q = attn.q_proj(x[a:b]).view(b - a, attn.num_heads, -1).transpose(0, 1)
            k = attn.k_proj(x[a:b]).view(b - a, attn.num_heads, -1).transpose(0, 1)
            out.append(torch.softmax(q @ k.transpose(1, 2) * attn.scaling, -1).mean(1).mean(0))
    return out


@pytest.mark.parametrize("model_type", _params(TYPES))
def test_visionzip_keeps_the_tokens_the_towers_attention_ranks_highest(model_type):
    """VisionZip (dominant tokens only, ``attention: mean``) at ``post_projector`` on a padded batch of slices of two
    sizes: each sample keeps the 3 tokens whose block of the last layer's positions receives the most attention
    (computed here), and the tokens it keeps alone."""
    case = _case(model_type)
    batch = case.make_inputs([1, 2, 1])
    sizes = batch["target_sizes"].tolist()
    k = 2  # the last layer's positions per token side: after the window merger (16x), or patches (4x)
    grids = [(h // 2, w // 2) if case.model.config.downsample_mode != "4x" else (h, w) for h, w in sizes]
    tokens = [
        torch.stack([_block(s[:, None], w, k, i, j) for i in range(h // k) for j in range(w // k)])[:, 0]
        for s, (h, w) in zip(_scores_at(case.model, batch), grids, strict=True)
    ]
    per_sample = [tokens[0], torch.cat(tokens[1:3]), tokens[3]]
    stage = {"at": "post_projector", "reducer": "visionzip", "keep": 3}
    stage["params"] = {"contextual_ratio": 0.0, "attention": "mean"}
    with tp.apply(case.model, {"stages": [stage]}, plugins=case.manager) as run:
        out = case.forward(batch).logits
        (s,) = run.stats.last_prefill.stages
        kept = s.kept
        assert s.entering == [int(t.shape[0]) for t in per_sample] and s.leaving == [3, 3, 3]
        for b, scores in enumerate(per_sample):
            assert sorted(kept[b]) == sorted(scores.topk(3).indices.tolist()), (b, scores)
        for i in range(3):
            alone = case.forward(case.make_inputs([[1, 2, 1][i]], start=i)).logits
            torch.testing.assert_close(alone[0, -1], out[i, -1], atol=1e-5, rtol=0)
            assert run.stats.last_prefill.stages[0].kept[0] == kept[i]


@pytest.mark.parametrize("model_type", ["minicpmv4_6"])
def test_cls_pre_projector_and_vision_layer_stages_are_refused_naming_why(model_type):
    """No CLS token (``attention: cls`` refused, ``mean`` named); the merger concatenates blocks of raster-ordered
    positions, so ``pre_projector`` and ``vision_layer`` stages are refused; all at ``apply``, naming why."""
    model, _, _, manager = _built(model_type)
    cls = {"at": "post_projector", "reducer": "visionzip", "keep": 2, "params": {"attention": "cls"}}
    with pytest.raises(TokenpruneError, match=r"MiniCPMV4_6VisionModel has no CLS token; use the 'mean'"):
        tp.apply(model, {"stages": [cls]}, plugins=manager)
    for at in ("pre_projector", {"vision_layer": 1}):
        with pytest.raises(TokenpruneError, match=r"concatenates each 2x2 block.*raster-ordered"):
            tp.apply(model, {"stages": [{"at": at, "reducer": "unit_drop", "keep": 2}]}, plugins=manager)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["minicpmv4_6"])
def test_a_vision_attention_stage_on_video_tokens_is_refused_and_tokens_image_prunes_the_images(model_type):
    """The forward does not know which units make a frame, so the tower serves no video tokens: a vision-attention
    stage that would reduce them is refused naming ``tokens: image``, which reduces the images only."""
    from test_family_videos import _minicpm_video_inputs

    model, adapter, builder, manager = _built(model_type)
    inputs = _minicpm_video_inputs(builder)([1])
    stage = {"at": "post_projector", "reducer": "visionzip", "keep": 2}
    stage["params"] = {"contextual_ratio": 0.0, "attention": "mean"}
    with tp.apply(model, {"stages": [stage]}, plugins=manager), torch.no_grad():
        with pytest.raises(
            TokenpruneError, match=rf"'{adapter.name}' adapter serves .*image tokens only.*tokens: image"
        ):
            model(**inputs)
    with tp.apply(model, {"stages": [{**stage, "tokens": "image"}]}, plugins=manager) as run, torch.no_grad():
        model(**inputs)
        (s,) = run.stats.last_prefill.stages
    images = int((inputs["input_ids"] == adapter.image_token_id()).sum())
    assert s.entering == [images] and s.leaving == [2]


@pytest.mark.parametrize("model_type", _params(WINDOWED))
def test_a_stage_reading_the_layer_before_the_window_merger_keeps_the_tokens_its_attention_ranks_highest(model_type):
    """A stage reading the tower's layer 0 (before the window merger, the slices' full patch grids) on the padded
    batch: each sample keeps the 3 tokens whose 4 x 4 block of patches receives the most attention there."""
    case = _case(model_type)
    batch = case.make_inputs([1, 2, 1])
    sizes = batch["target_sizes"].tolist()
    tokens = [
        torch.stack([_block(s[:, None], w, 4, i, j) for i in range(h // 4) for j in range(w // 4)])[:, 0]
        for s, (h, w) in zip(_scores_at(case.model, batch, 0), sizes, strict=True)
    ]
    per_sample = [tokens[0], torch.cat(tokens[1:3]), tokens[3]]
    pipeline = {"stages": [{"at": "post_projector", "reducer": "first_layer_attention", "keep": 3}]}
    with tp.apply(case.model, pipeline, plugins=case.manager) as run:
        case.forward(batch)
        (s,) = run.stats.last_prefill.stages
    assert s.entering == [int(t.shape[0]) for t in per_sample]
    for b, scores in enumerate(per_sample):
        assert sorted(s.kept[b]) == sorted(scores.topk(3).indices.tolist()), (b, scores)
