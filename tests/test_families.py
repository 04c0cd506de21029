"""The families token-reduction papers evaluate on now (issue 32), each checked on its tiny census model.

Per family of the table in docs/models.md: the engine invariants (keep-all identity, cached generation equals
recomputation, batch equals one by one, ``remove()`` restores) with a post-projector cut and a layer cut at the
family's default layer (:func:`tokenprune.testing.census.default_cut_layer`: ``layer: 2`` where layer 1 is softmax
attention, else the first layer after one), with the dedicated adapter where the family has one; images of
different sizes in one padded batch; video where the census can build it; FLOPs counted three ways (analytic,
torch, fvcore) agreeing, or refused naming the layer kind. The census's tiny models and inputs
(tokenprune/testing/census.py, census_inputs.py) are used as they are; tests/test_hybrid.py adds the cuts between
recurrent and attention layers in both directions.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_census import _skip_before

from tokenprune.adapters.generic import adapter_for
from tokenprune.cost.flops import count_flops
from tokenprune.engine import compat
from tokenprune.testing import adapters as checks
from tokenprune.testing.census import build_tiny, census_one, default_cut_layer, model_types
from tokenprune.testing.census_inputs import InputBuilder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: The table's model types by family (docs/models.md has a section per family).
FAMILIES = {
    "Qwen3.5": ["qwen3_5", "qwen3_5_moe"],
    "Gemma 4": ["gemma4", "gemma4_unified"],
    "GLM-4.xV": ["glm4v", "glm4v_moe", "glm46v", "glmga", "glm_ocr"],
    "Llama 4": ["llama4"],
    "MiniCPM-V 4.6 / 4.7": ["minicpmv4_6", "minicpmv4_7", "minicpm_ocr"],
    "LFM2-VL / LFM3-VL": ["lfm2_vl", "lfm3_vl"],
    "Molmo2": ["molmo2"],
    "Aya Vision, Command A Vision": ["aya_vision", "cohere2_vision"],
    "Video-LLaVA": ["video_llava"],
    "ERNIE-4.5-VL, PaddleOCR-VL": ["ernie4_5_vl_moe", "paddleocr_vl"],
    "Qwen2.5-Omni / Qwen3-Omni thinkers": ["qwen2_5_omni_thinker", "qwen3_omni_moe_thinker"],
}
TYPES = [t for types in FAMILIES.values() for t in types]
#: Registered adapters of the table's types (the others: the generic adapter).
DEDICATED = {
    "llama4": "llama4",
    "video_llava": "video_llava",
    "qwen3_5": "qwen3_5",
    "qwen3_5_moe": "qwen3_5",
    **dict.fromkeys(("glm4v", "glm4v_moe", "glm46v", "glmga", "glm_ocr"), "glm4v"),
    "ernie4_5_vl_moe": "ernie4_5_vl_moe",
    "paddleocr_vl": "paddleocr_vl",
    "qwen2_5_omni_thinker": "qwen2_5_omni_thinker",
    "qwen3_omni_moe_thinker": "qwen3_omni_moe_thinker",
    "aya_vision": "aya_vision",
    "cohere2_vision": "cohere2_vision",
    "lfm2_vl": "lfm2_vl",
    "lfm3_vl": "lfm3_vl",
    "gemma4": "gemma4",
    **dict.fromkeys(("minicpmv4_6", "minicpmv4_7", "minicpm_ocr"), "minicpmv"),
    "molmo2": "molmo2",
}
#: The default layer on the tiny models: their hybrid language models alternate softmax attention (layer 0) and a
#: recurrent kind (layer 1), so the first layer after an attention layer, from 2 on, is 3.
HYBRID = {"qwen3_5", "qwen3_5_moe", "minicpmv4_6", "minicpmv4_7", "minicpm_ocr", "lfm2_vl", "lfm3_vl"}
#: Gated DeltaNet's reference kernel on CPU makes these the slow ones.
SLOW = {"qwen3_5", "qwen3_5_moe", "minicpmv4_6", "minicpmv4_7", "minicpm_ocr"}
#: Types whose census images come in different sizes (grids, NaViT slices, patch rows with positions); the others
#: take fixed-size crops or tiles, a variant below puts different numbers of them in one batch.
VARIABLE = {
    "qwen3_5": "image_grid_thw",
    "qwen3_5_moe": "image_grid_thw",
    "gemma4": "image_position_ids",
    "gemma4_unified": "image_position_ids",
    "glm4v": "image_grid_thw",
    "glm4v_moe": "image_grid_thw",
    "glm46v": "image_grid_thw",
    "glmga": "image_grid_thw",
    "glm_ocr": "image_grid_thw",
    "minicpmv4_6": "target_sizes",
    "minicpmv4_7": "target_sizes",
    "minicpm_ocr": "target_sizes",
    "lfm2_vl": "spatial_shapes",
    "lfm3_vl": "image_grid_thw",
    "ernie4_5_vl_moe": "image_grid_thw",
    "paddleocr_vl": "image_grid_thw",
    "qwen2_5_omni_thinker": "image_grid_thw",
    "qwen3_omni_moe_thinker": "image_grid_thw",
}


def _params(types: list[str]) -> list[Any]:
    return [pytest.param(t, marks=pytest.mark.slow) if t in SLOW else t for t in types]


#: Types of the table gated here beyond tests/test_census.py's ``SINCE``: the first release checked, and why.
#: (none now: the omni thinkers of 5.18, whose top-level model is their base model, are served since.)
SINCE: dict[str, tuple[str, str]] = {}


def _skip_unless(model_type: str) -> None:
    from packaging.version import Version

    _skip_before(model_type)
    since = SINCE.get(model_type)
    if since is not None and Version(compat.transformers_version()) < Version(since[0]):
        pytest.skip(f"transformers {compat.transformers_version()}: {since[1]}")
    if model_type not in model_types():
        pytest.skip(f"transformers {compat.transformers_version()} has no {model_type}")


def _skip_if_the_stock_model_fails(model_type: str, detail: str) -> None:
    """transformers 5.24.0's stock Llama 4 forward fails on its own (it reads ``image_outputs`` from its language
    model's output): the census reports it as not run, and nothing of tokenprune's can be checked there."""
    if model_type == "llama4" and "image_outputs" in detail:
        pytest.skip(f"transformers {compat.transformers_version()}'s stock Llama 4 forward fails: {detail}")


def test_the_table_names_every_family_once():
    assert len(TYPES) == len(set(TYPES)) == 23
    assert set(VARIABLE) | set(DEDICATED) | {"molmo2", "aya_vision", "cohere2_vision"} == set(TYPES)


@pytest.mark.parametrize("model_type", _params(TYPES))
def test_the_family_keeps_the_engine_invariants_at_its_default_layer(model_type):
    """Keep-all identity, cached generation == recomputation, batch == one by one and ``remove()``, with a
    post-projector cut and a cut at the family's default layer (the probed stage there too, where the layer before
    ``k - 1`` is not attention), served by the family's adapter."""
    _skip_unless(model_type)
    row = census_one(model_type, layer="default")
    _skip_if_the_stock_model_fails(model_type, row.detail)
    assert row.status == "passes", row.detail
    assert row.adapter == DEDICATED.get(model_type, f"generic ({model_type})")
    assert row.layer == (3 if model_type in HYBRID else 2)


#: The checkpoints' layer patterns, cut short: Qwen3.5's one full-attention layer in four (3, 7, ...) and LFM2's
#: first attention layer at 2 (LFM2-VL's language model; LFM3-VL's default config too), with the default layer.
CHECKPOINT_PATTERNS = [
    pytest.param(
        "qwen3_5",
        ["linear_attention"] * 3 + ["full_attention", "linear_attention"],
        4,
        marks=pytest.mark.slow,
        id="qwen3_5",
    ),
    pytest.param("lfm2_vl", ["conv", "conv", "full_attention", "conv"], 3, id="lfm2_vl"),
]


@pytest.mark.parametrize(("model_type", "layer_types", "expected"), CHECKPOINT_PATTERNS)
def test_the_default_layer_of_the_checkpoints_layer_pattern_keeps_the_invariants(model_type, layer_types, expected):
    """On the checkpoints' pattern the first layer is recurrent: the default layer (Qwen3.5: ``layer: 4``, FastV's
    ``layer: 2`` by the default layer rule) gets the cut and the probed stage, and the invariants hold there."""
    from tokenprune.testing.tiny_configs import tiny_config

    _skip_unless(model_type)
    cfg = tiny_config(model_type)
    text = cfg.get_text_config()
    text.num_hidden_layers, text.layer_types = len(layer_types), layer_types
    if hasattr(text, "full_attn_idxs"):
        text.full_attn_idxs = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    torch.manual_seed(0)
    model = compat.model_from_config(cfg).eval()
    manager = checks.adapter_check_manager()
    adapter = adapter_for(model, manager)
    assert default_cut_layer(adapter) == (expected, expected)
    make_inputs = InputBuilder(model, adapter)
    case = checks.adapter_case(
        model,
        make_inputs,
        [1, 2, 1],
        plugins=manager,
        pad_token_id=make_inputs.pad,
        layer=expected,
        probe_layer=expected,
    )
    for check in (
        checks.keep_all_is_identity,
        checks.cached_decode_equals_recompute,
        checks.batch_equals_one_by_one,
        checks.remove_restores_model,
    ):
        check(case)


def _inputs(model_type: str) -> tuple[torch.nn.Module, Any, InputBuilder]:
    model = build_tiny(model_type)
    manager = checks.adapter_check_manager()
    adapter = adapter_for(model, manager)
    return model, adapter, InputBuilder(model, adapter)


@pytest.mark.parametrize("model_type", sorted(VARIABLE))
def test_images_of_different_sizes_share_the_census_batch(model_type):
    """The census's batch ``[1, 2, 1]`` (the invariants above run on it) holds images one and two units wide, given
    to the model in its own layout argument: samples 0 and 1 alone have different visual-token counts, and the
    padded batch mixes both sizes."""
    _skip_unless(model_type)
    _, adapter, make_inputs = _inputs(model_type)
    assert make_inputs.mode == VARIABLE[model_type]
    if not make_inputs.mixed_sizes:  # MiniCPM-V 4.6 on 5.18: its window merger takes one slice size per call
        pytest.skip(
            f"transformers {compat.transformers_version()}'s stock {model_type} tower fails on slices of different "
            f"sizes in one call: {make_inputs.mixed_sizes_failure}"
        )
    image = adapter.image_token_id()
    alone = [int((make_inputs([1], start=i)["input_ids"] == image).sum()) for i in (0, 1)]
    assert alone[0] != alone[1], alone
    batch = make_inputs([1, 2, 1])  # sample 1: an image two units wide, then one a unit wide
    assert (batch["input_ids"] == image).sum(1).tolist() == [alone[0], alone[1] + alone[0], alone[0]]


def _cropped_inputs(b: InputBuilder, crops: tuple[int, ...] = (1, 3)) -> Any:
    """Aya Vision's and Command A Vision's prompts: image ``j`` of sample ``i`` is ``crops[(i + j) % 2]`` fixed-size
    crops (tiles and the global view), each crop's placeholders after a text separator, as their processors write
    them (``TILE_1``, ..., ``TILE_GLOBAL``; Cohere2's line break after each tile)."""

    def make_inputs(specs: list[Any], start: int = 0) -> dict[str, Any]:
        per_image = [
            [b._image(i, 10 * j + c)[0] for c in range(crops[(i + j) % 2])]
            for i, spec in enumerate(specs, start)
            for j in range(spec or 0)
        ]
        flat = [crop for image in per_image for crop in image]
        pixels = b._batch(flat, [(b.image_size, b.image_size)] * len(flat)) if flat else {}
        counts = iter(b._counts(pixels, len(flat)) if flat else [])
        images, rows, t = iter(per_image), [], b.text_ids
        for i, spec in enumerate(specs, start):
            ids = t[i : i + 3]
            for _ in range(spec or 0):
                for c, _crop in enumerate(next(images)):
                    ids = [*ids, t[60 + c], *b._placeholders(next(counts))]
                ids = [*ids, t[50 + i]]
            rows.append(ids + t[100 + i : 104 + i % 2])
        width = max(map(len, rows))
        ids = torch.tensor([[b.pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, **pixels}

    return make_inputs


def _default_layer_case(model: Any, adapter: Any, builder: Any, make_inputs: Any) -> checks.AdapterCase:
    """The check kit's case of samples 1, 2, 1 (a text-only third) with its layer stage at the family's default."""
    k, probe = default_cut_layer(adapter)
    return checks.adapter_case(
        model,
        make_inputs,
        [1, 2, 1],
        plugins=checks.adapter_check_manager(),
        pad_token_id=builder.pad,
        layer=k,
        probe_layer=probe,
    )


@pytest.mark.parametrize("model_type", ["aya_vision", "cohere2_vision"])
def test_images_of_different_numbers_of_crops_share_a_padded_batch(model_type):
    """One crop and three crops per image in one padded batch: each crop is a grid of its own, and batch == one by one
    and cached generation == recomputation hold at the default layer."""
    _skip_unless(model_type)
    model, adapter, builder = _inputs(model_type)
    assert builder.mode == "fixed"
    make_inputs = _cropped_inputs(builder)
    image = adapter.image_token_id()
    alone = [int((make_inputs([1], start=i)["input_ids"] == image).sum()) for i in (0, 1)]
    assert alone[1] == 3 * alone[0], alone
    case = _default_layer_case(model, adapter, builder, make_inputs)
    for check in (checks.keep_all_is_identity, checks.cached_decode_equals_recompute, checks.batch_equals_one_by_one):
        check(case)
    checks.layout_covers_visual_tokens(case)


#: Two stages: half the visual tokens after the projector, all the rest kept through a cut at the default layer.
def _two_stages(layer: int) -> dict[str, Any]:
    return {
        "stages": [
            {"at": "post_projector", "reducer": "random", "keep": 0.5},
            {"at": {"layer": layer}, "reducer": "random", "keep": 0.5},
        ]
    }


#: FLOPs refused, with the layer kind the refusal names.
FLOPS_REFUSED = {
    **dict.fromkeys(("qwen3_5", "qwen3_5_moe", "minicpmv4_6", "minicpmv4_7", "minicpm_ocr"), "linear_attention"),
    "ernie4_5_vl_moe": "modality-isolated mixture-of-experts",
}


@pytest.mark.parametrize("model_type", TYPES)
def test_flops_agree_three_ways_or_are_refused_naming_the_layer_kind(model_type):
    """Unpruned and under two stages (a post-projector cut and one at the default layer): analytic == torch ==
    fvcore on every decoder layer and the language model; the pruned model costs less. Where the count is refused,
    before anything runs, the refusal names the layer kind."""
    from tokenprune.cost.analytic import DecoderShape

    _skip_unless(model_type)
    if model_type in FLOPS_REFUSED:
        with torch.device("meta"):
            model = build_tiny(model_type)
        with pytest.raises(TypeError, match=FLOPS_REFUSED[model_type]):
            DecoderShape.from_model(model)
        return
    model, adapter, make_inputs = _inputs(model_type)
    inputs = make_inputs([1])
    try:
        base = count_flops(model, inputs)
    except AttributeError as exc:
        _skip_if_the_stock_model_fails(model_type, str(exc))
        raise
    pruned = count_flops(model, inputs, _two_stages(default_cut_layer(adapter)[0]))
    for report in (base, pruned):
        for row in report.layers:
            assert row.analytic == row.torch == row.fvcore, (row, report.fvcore_notes)
        lm = report.language_model
        assert lm["analytic"] == lm["torch"] == lm["fvcore"], report.fvcore_notes
    assert pruned.language_model["analytic"] < base.language_model["analytic"]
    assert pruned.layers[-1].tokens[0] < pruned.layers[0].tokens[0] < base.layers[0].tokens[0]


def test_gemma3n_is_not_run_naming_timm():
    """Gemma 3n's MobileNetV5 tower is a timm model: without timm the census cannot build it and says so (never a
    pass); with timm it is refused naming AltUp (next test)."""
    _skip_unless("gemma3n")
    row = census_one("gemma3n")
    try:
        import timm  # noqa: F401
    except Exception:  # timm is no test dependency (see NOT_A_TEST_DEPENDENCY)
        assert row.status == "not run" and row.detail.startswith("needs timm, not installed"), row
        return
    assert row.status == "refused" and "AltUp" in row.detail, row.detail


def test_gemma3n_language_model_is_refused_naming_altup():
    """Gemma 3n's text model builds without timm: a VLM around it is refused by the generic adapter, which would
    otherwise gather its (4, B, L, D) AltUp hidden states as if they were (B, L, D)."""
    _skip_unless("gemma3n")
    from transformers import Gemma3nTextConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextModel

    from tokenprune.adapters.shape import refusal

    cfg = Gemma3nTextConfig(
        vocab_size=64,
        vocab_size_per_layer_input=64,
        hidden_size=32,
        hidden_size_per_layer_input=8,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_kv_shared_layers=0,
        laurel_rank=4,
        activation_sparsity_pattern=[0.0, 0.0],
        layer_types=["sliding_attention", "full_attention"],
    )

    class Vlm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.language_model = Gemma3nTextModel(cfg)

        def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return pixel_values

    class Top(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Vlm()

    reason = refusal(Top())
    assert reason is not None and "AltUp" in reason and "(4, B, L, D)" in reason, reason


# --- video ------------------------------------------------------------------------------------------------------


def _frames_apart(vlm: torch.nn.Module) -> bool:
    """Whether the model's ``get_rope_index`` splits a video's grid into one grid per temporal patch (Qwen3-VL's and
    GLM-4V's timestamps between frames), so that each frame is a run of placeholders of its own."""
    import inspect

    source = inspect.getsource(type(vlm).get_rope_index) if hasattr(vlm, "get_rope_index") else ""
    return "repeat_interleave(video_grid_thw" in source


def _video_inputs(b: InputBuilder, frames: int = 2) -> Any:
    """The census inputs with a video in every image sample: ``frames`` temporal patches of a ``(2m, 2mk)`` grid
    (``k = 1 + i % 2``), as flat patch rows with ``video_grid_thw``, its placeholders after the image's (one run per
    frame after a timestamp token where the model's positions take frames apart), video ids typed 2."""
    cfg, vlm = b.model.config, b.vlm
    video_id, apart, m = int(cfg.video_token_id), _frames_apart(vlm), b._merge()
    as_image = _videos_take_the_image_token(vlm)
    if as_image:  # GLM-4.xV: videos alone (an image beside them would be counted as one more video)
        video_id = b.image_token

    def make_inputs(specs: list[Any], start: int = 0) -> dict[str, Any]:
        out = b([None] * len(specs) if as_image else specs, start)
        samples = [i for i, spec in enumerate(specs, start) if spec]
        if not samples:
            return out
        grids = [(frames, 2 * m, 2 * m * (1 + i % 2)) for i in samples]
        width = b._image(0, 0)[0].shape[1]
        gens = [torch.Generator().manual_seed(500 + i) for i in samples]
        pixels = torch.cat(
            [torch.randn(t * h * w, width, generator=g) for (t, h, w), g in zip(grids, gens, strict=True)]
        )
        with torch.no_grad():
            feats = vlm.get_video_features(pixel_values_videos=pixels, video_grid_thw=torch.tensor(grids))
        counts = [int(f.shape[0]) for f in _features(feats)]
        rows = [row[mask.bool()].tolist() for row, mask in zip(out["input_ids"], out["attention_mask"], strict=True)]
        for n, i in enumerate(samples):
            per = counts[n] // frames if apart else counts[n]
            runs = frames if apart else 1
            for f in range(runs):
                stamp = [b.text_ids[(150 + f) % len(b.text_ids)]] if apart else []
                opened = [b.open, *[video_id] * per, b.close] if b.open is not None else [video_id] * per
                rows[i - start] = rows[i - start][:-2] + stamp + opened + rows[i - start][-2:]
        longest = max(map(len, rows))
        ids = torch.tensor([[b.pad] * (longest - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
        out.update(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=torch.tensor(grids))
        if b.mm_types:
            out["mm_token_type_ids"] = 2 * (ids == video_id).long() if as_image else (ids == b.image_token).long()
            out["mm_token_type_ids"] += 0 if as_image else 2 * (ids == video_id).long()
        return out

    return make_inputs


def _videos_take_the_image_token(vlm: torch.nn.Module) -> bool:
    """Whether the model's video placeholders are its image token, told apart by ``mm_token_type_ids`` only
    (GLM-4.xV: ``special_video_mask = input_ids == self.config.image_token_id``)."""
    import inspect

    source = inspect.getsource(type(vlm).get_placeholder_mask) if hasattr(vlm, "get_placeholder_mask") else ""
    return "special_video_mask = input_ids == self.config.image_token_id" in source


def _features(out: Any) -> list[torch.Tensor]:
    from tokenprune.adapters.base import ImageCall

    return ImageCall((), {}, out).features()


#: Families with video whose census inputs take a video of ``video_grid_thw`` patch rows, read by the generic
#: adapter's video layouts (ERNIE: two temporal patches merged into one frame; GLM-4.xV: its video placeholders are
#: its image token, typed 2 by ``mm_token_type_ids``, tests/test_glm_video.py). Video-LLaVA's frames (CLS + grid)
#: are checked in tests/test_engine_invariants_video_llava.py.
VIDEO = ["qwen3_5", "ernie4_5_vl_moe", "qwen2_5_omni_thinker", "qwen3_omni_moe_thinker", "glm4v", "glm4v_moe", "glm46v"]


@pytest.mark.parametrize("model_type", _params(VIDEO))
def test_a_video_beside_images_keeps_the_engine_invariants(model_type):
    """Every image sample also holds a video (two sizes across the batch): keep-all identity, cached generation ==
    recomputation and batch == one by one at the default layer, the layouts covering image and video tokens."""
    _skip_unless(model_type)
    model, adapter, builder = _inputs(model_type)
    make_inputs = _video_inputs(builder)
    case = _default_layer_case(model, adapter, builder, make_inputs)
    batch = case.padded_batch()
    if "mm_token_type_ids" in batch:  # GLM-4.xV's video placeholders are its image token, typed 2
        assert int((batch["mm_token_type_ids"] == 2).sum()) > 0
    else:
        assert int((batch["input_ids"] == model.config.video_token_id).sum()) > 0
    for check in (checks.keep_all_is_identity, checks.cached_decode_equals_recompute, checks.batch_equals_one_by_one):
        check(case)
    checks.layout_covers_visual_tokens(case)


# --- docs/models.md -----------------------------------------------------------------------------------------------


def _census_script() -> Any:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "census.py"
    spec = importlib.util.spec_from_file_location("census_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_have_a_section_per_family_that_regenerating_the_table_keeps():
    script = _census_script()
    page = script.DOCS.read_text()
    sections = page.split("\n### ")[1:]
    for types in FAMILIES.values():
        heading = next((s.splitlines()[0] for s in sections if f"`{types[0]}`" in s.splitlines()[0]), None)
        assert heading is not None and all(f"`{t}`" in heading for t in types), types
    table = "<!-- census-table -->\nnew table\n<!-- /census-table -->\n"
    regenerated = script.models_page(table, page)
    assert regenerated.startswith("# Models\n\n" + table)
    assert regenerated.split("<!-- /census-table -->\n")[1] == page.split("<!-- /census-table -->\n")[1]
    assert script.models_page(table, "") == "# Models\n\n" + table
