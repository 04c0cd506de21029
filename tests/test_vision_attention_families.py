"""Vision-encoder attention on Qwen3-VL (dense and MoE) and InternVL: the probe equals eager attention, the
tower is left as it was, the patch-to-token maps (DeepStack taps, pixel shuffle, CLS), and video tokens.

The families' end-to-end runs (fastervlm, vispruner; a padded batch of different image sizes equals one by
one) are in ``tests/test_vision_families.py``.
"""

from __future__ import annotations

import pytest
import tiny_models
import tokenprune_fastervlm
import tokenprune_vispruner
import torch
from engine_fixtures import BATCH_SPECS, VIDEO_SPECS, forward, manager_with
from test_vision_attention import _eager_weights, _tower_modules, probe_under_sdpa
from video_tower_checks import video_call

import tokenprune as tp
from tokenprune.engine import compat
from tokenprune.engine.vision_probe import VisionProbe
from tokenprune.errors import TokenpruneError
from tokenprune.testing.adapters import adapter_case, vision_patches_map_to_tokens
from tokenprune.testing.video_towers import video_patches_map_to_tokens

FAMILIES = ["qwen3_vl", "qwen3_vl_moe", "internvl"]


def _manager() -> tp.plugins.PluginManager:
    return manager_with(tokenprune_fastervlm, tokenprune_vispruner)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return getattr(tiny_models, request.param)()


def _kinds(name: str) -> list[str]:
    return ["cls", "mean"] if name == "internvl" else ["mean"]


@pytest.mark.parametrize("layer", [None, 0])
def test_probe_scores_equal_eager_attention(tiny, layer):
    """At the default (last) layer and at layer 0 (a DeepStack tap of the tiny Qwen3-VL): per tower sequence,
    the probe's scores are the eager attention's, averaged over heads (and query rows, CLS excluded)."""
    _, tower, modules = _tower_modules(tiny.model)
    inputs = tiny.make_inputs([*BATCH_SPECS[tiny.name][:2], None])
    index = tower.feature_layer if layer is None else layer
    for kind in _kinds(tiny.name):
        probe = VisionProbe(tower, {index: (frozenset({kind}), False, False)})
        probe.install()
        try:
            probe.reset(active=True)
            with torch.no_grad():
                tiny.model(**inputs)
            got = probe.records[index].scores[kind]
        finally:
            probe.remove()
        calls = _eager_weights(tiny.model, inputs, modules)[index]
        if tiny.name == "internvl":  # one call over every tile: (tiles, H, S, S), position 0 the CLS token
            weights = torch.cat([w.mean(1) for w in calls])
            expected = list(weights[:, 0] if kind == "cls" else weights[:, 1:].mean(1))
        else:  # one call per image: (1, H, S_i, S_i), no CLS
            expected = [w.mean(1)[0].mean(0) for w in calls]
        sequences = inputs["pixel_values"] if tiny.name == "internvl" else inputs["image_grid_thw"]
        assert len(got) == len(expected) == sequences.shape[0]  # per tile (InternVL), per image (Qwen3-VL)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


def test_probe_runs_under_sdpa_and_leaves_the_tower_unchanged(tiny):
    probe_under_sdpa(tiny.model, tiny.make_inputs([*BATCH_SPECS[tiny.name][:2], None]), _manager())


def test_vision_patches_map_to_tokens(tiny):
    vision_patches_map_to_tokens(adapter_case(tiny.model, tiny.make_inputs, BATCH_SPECS[tiny.name]))


def test_towers():
    """Qwen3-VL: the last block, no CLS; InternVL: ``vision_feature_layer`` (from the config), CLS."""
    for name, layers, layer, cls in [("qwen3_vl", 3, 2, False), ("internvl", 2, 1, True)]:
        t = getattr(tiny_models, name)()
        tower = _manager().adapters.get(t.model.config.model_type)(t.model).vision_tower()
        assert (len(tower.layers), tower.feature_layer, tower.has_cls) == (layers, layer, cls)


def test_internvl_maps_an_earlier_feature_layer():
    """``vision_feature_layer: -2``: the features (and the default probed layer) are layer 0's output."""
    t = tiny_models.internvl()
    t.model.config.vision_feature_layer = -2
    case = adapter_case(t.model, t.make_inputs, BATCH_SPECS["internvl"])
    assert case.adapter.vision_tower().feature_layer == 0
    vision_patches_map_to_tokens(case)


def test_internvl_token_is_the_mean_of_its_two_by_two_patches():
    """A 4 x 4 patch tile (CLS first) gives 2 x 2 tokens, each the mean of the 2 x 2 patches it concatenates."""
    t = tiny_models.internvl()
    adapter = _manager().adapters.get("internvl")(t.model)
    grid = torch.arange(16.0).reshape(4, 4)  # patch (r, c) has value 4 r + c
    values = [torch.cat([torch.tensor([[100.0]]), grid.reshape(16, 1)])]
    call = tp.adapters.base.ImageCall((), {"vision_feature_select_strategy": "default"}, None)
    (mapped,) = adapter.map_vision_patches(call, values)
    rows, cols = adapter.tile_grid()
    expected = torch.stack([grid[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean() for r, c in zip(rows, cols, strict=True)])
    torch.testing.assert_close(mapped[:, 0], expected)


def test_cls_on_qwen3_vl_is_refused_and_suggests_mean():
    t = tiny_models.qwen3_vl()
    pipe = {"stages": [{"at": "post_projector", "reducer": "fastervlm", "keep": 0.5, "params": {"attention": "cls"}}]}
    with pytest.raises(TokenpruneError, match=r"Qwen3VLVisionModel.*no CLS token.*'mean'"):
        tp.apply(t.model, pipe, plugins=_manager())


# --- video tokens (Qwen3-VL's get_video_features runs get_image_features) -----------------------


def test_qwen3_vl_maps_patches_on_image_and_video_prompts():
    """The kit's check on a batch with videos: the outer image call is probed and mapped apart from the video's
    (whose own check is in tests/test_tower_qwen_videos.py)."""
    t = tiny_models.qwen3_vl()
    video = tiny_models.Video
    specs = [[(56, 56), video(2, 56, 112)], [video(4, 56, 56), (56, 112)], [(112, 56), video(4, 112, 56)]]
    vision_patches_map_to_tokens(adapter_case(t.model, t.make_inputs, specs))


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("tokens", [None, "all", "video"])
def test_a_vision_attention_stage_on_video_tokens_is_served(name, tokens):
    """The Qwen towers serve video attention (``get_video_features`` runs the tower; Qwen3-VL's through
    ``get_image_features``): a stage reducing video tokens runs on an image + video prompt, over the image's 4 and the
    video's 8 tokens (``tokens: video``: the video's only). The scores: tests/test_tower_qwen_videos.py."""
    t = getattr(tiny_models, name)()
    stage = {"at": "post_projector", "reducer": "vispruner", "keep": 0.5, "params": {"attention": "mean"}}
    if tokens is not None:
        stage["tokens"] = tokens
    with tp.apply(t.model, {"stages": [stage]}, plugins=_manager()) as run, torch.no_grad():
        t.model(**t.make_inputs([[(56, 56), VIDEO_SPECS[name][1][1]]]))
        (s,) = run.stats.last_prefill.stages
    assert s.entering == [8 if tokens == "video" else 4 + 8]
    assert 0 < s.leaving[0] < s.entering[0]


SEEN: list[torch.Tensor] = []
"""The valid vision scores the recording reducer saw, one tensor per stage call."""


def _recording_fastervlm():
    class Recording(tokenprune_fastervlm.FasterVLM):
        name = "recording_fastervlm"

        def score(self, tokens, ctx):
            SEEN.append(ctx.vision_attention[ctx.valid].clone())
            return super().score(tokens, ctx)

    class Plugin:
        @tp.hookimpl
        def tokenprune_register_reducers(self, registry):
            registry.add(Recording)

    manager = _manager()
    manager.register(Plugin())
    return manager


def test_qwen3_vl_image_tokens_next_to_a_video_get_the_image_scores():
    """``tokens: image`` on an image + video prompt: the image's vision scores are those of the image alone (the
    video's call through get_image_features is recorded as the video's, apart), and a video-only prompt passes
    unchanged."""
    t = tiny_models.qwen3_vl()
    manager = _recording_fastervlm()
    stage = {"at": "post_projector", "reducer": "recording_fastervlm", "keep": 0.5, "tokens": "image"}
    stage["params"] = {"attention": "mean"}
    video = VIDEO_SPECS["qwen3_vl"][0]
    SEEN.clear()
    with tp.apply(t.model, {"stages": [stage]}, plugins=manager) as run, torch.no_grad():
        t.model(**t.make_inputs([(56, 56)]))
        t.model(**t.make_inputs([[(56, 56), video]]))
        with_video = run.stats.last_prefill.stages[0]
        t.model(**t.make_inputs([video]))
        only_video = run.stats.last_prefill.stages[0]
    alone, mixed = SEEN
    torch.testing.assert_close(mixed, alone, rtol=0, atol=1e-6)
    assert with_video.entering == [alone.numel()] and len(with_video.kept[0]) == alone.numel() // 2
    assert only_video.entering == [0]


# --- LLaVA-NeXT-Video: vision attention on video tokens --------------------------------------------

LLAVA_VIDEOS = VIDEO_SPECS["llava_next_video"]  # [video], [image, video], [video, video]: 4 frames of 56 px


def test_llava_next_video_probe_scores_equal_eager_attention_on_frames():
    """A video-only batch: one tower sequence per frame, the probe's video records are the eager attention's."""
    t = tiny_models.llava_next_video()
    _, tower, modules = _tower_modules(t.model)
    assert tower.videos and tower.has_cls
    inputs = t.make_inputs([LLAVA_VIDEOS[0], LLAVA_VIDEOS[2]])
    layer = tower.feature_layer
    for kind in ("cls", "mean"):
        probe = VisionProbe(tower, {layer: (frozenset({kind}), False, False)})
        probe.install()
        try:
            probe.begin("video")
            with torch.no_grad():
                t.model(**inputs)
            got = probe.video_records[layer].scores[kind]
            assert not probe.records
        finally:
            probe.remove()
        weights = torch.cat([w.mean(1) for w in _eager_weights(t.model, inputs, modules)[layer]])
        expected = list(weights[:, 0] if kind == "cls" else weights[:, 1:].mean(1))
        assert len(got) == len(expected) == 3 * 4  # three videos of four frames
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision", "video_llava"])
def test_llava_video_families_map_frame_patches_to_video_tokens(family):
    """A value at one patch of a frame marks exactly the video tokens whose features move when that patch's
    attention output is pushed (the kit's image check, on get_video_features): LLaVA-NeXT-Video's average
    pooling, LLaVA-OneVision's bilinear pooling (and its video newline, built from no patch), Video-LLaVA's
    own video tower (every position a token, [CLS] included)."""
    t = tiny_models.BUILDERS[family]()
    adapter = _manager().adapters.get(family)(t.model)
    tower = adapter.vision_tower()
    assert tower.videos
    args, kwargs = video_call(t.model, t.model.model, t.make_inputs(VIDEO_SPECS[family][1:]))
    layer = compat.vision_attention_module((tower.video_layers or tower.layers)[tower.feature_layer])
    pixels = args[0] if args else kwargs["pixel_values_videos"]
    sequences, length = pixels.shape[0] * pixels.shape[1], int(tower.has_cls) + (56 // 14) ** 2
    call = tp.adapters.base.ImageCall(args, kwargs, None)

    def features(flat):
        def push(module, _, output):
            out = output[0].clone()
            rows = out.reshape(-1, out.shape[-1])
            rows[flat] += torch.linspace(-50.0, 50.0, rows.shape[-1])
            return (out, *output[1:])

        handle = layer.register_forward_hook(push) if flat is not None else None
        try:
            with torch.no_grad():
                out = t.model.model.get_video_features(*args, **kwargs).pooler_output
        finally:
            if handle is not None:
                handle.remove()
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in out])

    base = features(None)
    for r in (0, 5, sequences - 1):
        for p in (0, 1, length // 2, length - 1):
            values = [torch.zeros(length, 1) for _ in range(sequences)]
            values[r][p] = 1.0
            marked = torch.cat(adapter.map_vision_video_patches(call, values)).reshape(-1).abs() > 1e-9
            moved = (features(r * length + p) - base).abs().amax(-1) > 1e-4
            assert torch.equal(marked, moved), (r, p, marked.nonzero().flatten(), moved.nonzero().flatten())
    mapped = adapter.map_vision_video_patches(call, [torch.ones(length, 1)] * sequences)
    ones = torch.cat(mapped).reshape(-1)
    expected = torch.ones_like(ones)  # CLS dropped (kept: Video-LLaVA), pooling windows: every token a mean
    if family == "llava_onevision":  # but each video's newline, built from no patch
        expected[torch.tensor([len(m) for m in mapped]).cumsum(0) - 1] = 0.0
    torch.testing.assert_close(ones, expected)


@pytest.mark.parametrize("reducer", ["fastervlm", "vispruner"])
def test_llava_next_video_videos_batched_equal_one_by_one(reducer):
    """Image and video tokens ranked together by their vision attention (``tokens: all``): the padded batch
    keeps the same tokens and gives the same logits as one by one."""
    t = tiny_models.llava_next_video()
    specs = [*LLAVA_VIDEOS, None]
    stage = {"at": "post_projector", "reducer": reducer, "keep": 0.5, "params": {"attention": "cls"}}
    with tp.apply(t.model, {"stages": [stage]}, plugins=_manager()) as run:
        batched = forward(t.model, t.make_inputs(specs), "llava_next_video")
        kept, before = run.stats.last_prefill.stages[0].kept, run.stats.last_prefill.stages[0].entering
        for i, spec in enumerate(specs):
            alone = forward(t.model, t.make_inputs([spec], start=i), "llava_next_video")
            if spec is not None:
                assert run.stats.last_prefill.stages[0].kept[0] == kept[i]
            torch.testing.assert_close(alone.logits[0, -1], batched.logits[i, -1], rtol=1e-4, atol=1e-5)
    assert kept[-1] == []
    assert all(0 < len(k) < n for k, n in zip(kept[:-1], before[:-1], strict=True))


def test_llava_next_video_image_scores_are_apart_from_the_video_call():
    """On an image + video prompt the image tokens get the image call's scores (those of the image alone) and
    the video tokens the video call's (those of the video alone): the probe records the two calls apart."""
    t = tiny_models.llava_next_video()
    manager = _recording_fastervlm()
    stage = {"at": "post_projector", "reducer": "recording_fastervlm", "keep": 0.5, "params": {"attention": "cls"}}
    image, video = LLAVA_VIDEOS[1]
    SEEN.clear()
    with tp.apply(t.model, {"stages": [stage]}, plugins=manager), torch.no_grad():
        for spec in (image, video, [image, video]):
            t.model(**t.make_inputs([spec]))
    alone_image, alone_video, mixed = SEEN
    torch.testing.assert_close(mixed, torch.cat([alone_image, alone_video]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(VIDEO_SPECS))
def test_the_kits_video_check_holds_on_every_video_family(name):
    """``tokenprune.testing.video_towers.video_patches_map_to_tokens`` on each tiny video family's batch of images and
    videos (VIDEO_SPECS): pushes at the probed layer of the tower that encodes the videos (Video-LLaVA's second tower)
    move exactly the video tokens the adapter's map marks; one tower sequence per frame (CLIP's with its CLS), per
    temporal patch of two frames for Qwen."""
    t = tiny_models.BUILDERS[name]()
    inputs = t.make_inputs(VIDEO_SPECS[name])
    lengths = video_patches_map_to_tokens(t.model, inputs)
    frames = [v.frames for spec in VIDEO_SPECS[name] for v in (spec if isinstance(spec, list) else [spec])
              if isinstance(v, tiny_models.Video)]  # fmt: skip
    assert len(lengths) == sum(frames) // (2 if name.startswith("qwen") else 1)
