"""The model census and the generic adapter: every image-text-to-text type is served or refused by name.

The whole census with the invariants on every served type takes minutes (``scripts/census.py --invariants``
writes docs/models.md); here every type is built and resolved as ``apply()`` resolves it, and the invariants
run on a few generically served types: one with 1-D RoPE and crop tensors, one with M-RoPE and grids.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest
import torch

import tokenprune as tp
from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.generic import GenericAdapter, GenericDeepStackAdapter, adapter_for, grids_from_hints
from tokenprune.engine import compat
from tokenprune.errors import UnsupportedModelError
from tokenprune.plugins import get_plugin_manager
from tokenprune.testing.census import InputBuilder, build_tiny, census_one, model_types, resolve_types
from tokenprune.testing.tiny_configs import tiny_config


def test_grids_from_hints_divide_by_the_factor_that_fits_every_image():
    # Qwen2-VL-like grids (patches, merge 2), one tensor per image
    assert grids_from_hints([(1, 4, 8), (2, 4, 4)], [8, 8]) == [(1, 2, 4), (2, 2, 2)]
    # one tensor for all images: split by the hints
    assert grids_from_hints([(1, 4, 8), (1, 4, 4)], [12]) == [(1, 2, 4), (1, 2, 2)]
    # image sizes in pixels over a 28-pixel patch
    assert grids_from_hints([(1, 56, 84)], [6]) == [(1, 2, 3)]
    # counts nothing explains, or per-crop tensors of another number than hints: no grid
    assert grids_from_hints([(1, 4, 4)], [5]) is None
    assert grids_from_hints([(1, 4, 4)], [4, 4]) is None


def test_every_type_resolves_to_an_adapter_or_a_named_refusal():
    """Built on the meta device, every type is served (a registered adapter wins) or refused naming it."""
    registered = set(get_plugin_manager().adapters)
    start = time.perf_counter()
    rows = resolve_types()
    seconds = time.perf_counter() - start
    assert [r.model_type for r in rows] == model_types()
    for r in rows:
        assert r.status in ("registered", "generic", "refused", "not run"), (r.model_type, r.status, r.detail)
        refused_by_adapter = r.status == "refused" and f"model_type {r.model_type!r}" in r.detail  # its own refusal
        expected = r.model_type in registered and r.status != "not run" and not refused_by_adapter
        assert (r.status == "registered") == expected, r.model_type
        if r.status == "refused":
            assert r.detail, r.model_type
    counts = {s: sum(r.status == s for r in rows) for s in ("registered", "generic", "refused", "not run")}
    print(f"resolved {len(rows)} types in {seconds:.0f} s: {counts}")
    if compat.transformers_version() == _pinned():  # the matrix's other releases register other types
        # 30 generic, 36 registered and 34 refused on transformers 5.25.0 (Qwen3.5's, GLM-4.xV's, ERNIE-4.5-VL's,
        # PaddleOCR-VL's, the omni thinkers', Aya Vision's, Command A Vision's, LFM2/3-VL's, Gemma 4's, MiniCPM-V's and
        # Molmo2's 22 types have the adapters of their vision towers)
        assert counts["generic"] >= 30 and counts["registered"] >= 36 and counts["refused"] >= 31


def _pinned() -> str:
    lines = (Path(__file__).resolve().parents[1] / "constraints.txt").read_text().splitlines()
    return next(line.split("==")[1] for line in lines if line.startswith("transformers=="))


@pytest.mark.parametrize("model_type", ["got_ocr2", "llava_onevision1_5"])  # crops; image_grid_thw grids
def test_generically_served_types_keep_the_engine_invariants(model_type):
    if model_type not in model_types():
        pytest.skip(f"transformers {compat.transformers_version()} has no {model_type}")
    row = census_one(model_type)
    assert row.adapter == f"generic ({model_type})"
    assert row.status == "passes", row.detail


def test_apply_refuses_a_hybrid_language_model_naming_type_and_reason():
    if "unlimited_ocr" not in model_types():
        pytest.skip(f"transformers {compat.transformers_version()} has no unlimited_ocr")
    model = build_tiny("unlimited_ocr")
    with pytest.raises(UnsupportedModelError, match=r"'unlimited_ocr'.*the engine does not serve"):
        tp.apply(model, {"stages": [{"at": "post_projector", "reducer": "random", "keep": 0.5}]})
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_the_generic_adapter_detects_mrope():
    with torch.device("meta"):
        assert GenericAdapter(build_tiny("glm4v")).position_scheme == "mrope"
        assert GenericAdapter(build_tiny("aya_vision")).position_scheme == "rope"
        if "cohere_compass" in model_types():  # rope parameters per layer type, each with its mrope_section
            assert GenericAdapter(build_tiny("cohere_compass")).position_scheme == "mrope"


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [
        ("mllama", "cross-attends to the image features"),
        ("florence2", "encoder-decoder"),
        ("blip-2", "holds no multimodal base model as `.model`"),
        ("mistral_large4", "layers the engine does not serve (indexed_attention"),
        ("inkling2", "layers the engine does not serve (hybrid_sliding"),
        ("chameleon", "discrete image codes"),
        ("emu3", "discrete image codes"),
        ("apertus1p5", "discrete image codes"),
        ("mistral4", "no vision tower: it takes no images"),
        ("evolla", "no vision tower: it takes no images"),
        ("diffusion_gemma", "has no get_image_features method"),
        ("glm5_next", "indexed_attention"),
        ("qwen4_exp", "indexed_attention"),
        ("dots3_note", "indexed_attention"),
        ("granite4_vision", "its language model takes vision_mask, deepstack_features"),
    ],
)
def test_refusals_name_the_type_and_the_reason(model_type, reason):
    if model_type not in model_types():
        pytest.skip(f"transformers {compat.transformers_version()} has no {model_type}")
    _skip_before(model_type)
    with torch.device("meta"):
        model = build_tiny(model_type)
    with pytest.raises(UnsupportedModelError) as err:
        tp.apply(model, {"stages": [{"at": "post_projector", "reducer": "random", "keep": 0.5}]})
    assert repr(model_type) in str(err.value) and reason in str(err.value)


#: Types whose tiny model or shape differs on older releases of the matrix, with the first release checked and why
#: (the census of those releases reports them as 'not run' or refused by name, which test_every_type_resolves_to_an_adapter_or_a_named_refusal
#: checks there).
SINCE = {
    "diffusion_gemma": (
        "5.21.1",
        "5.18's DiffusionGemma config leaves its text model's config None (it does not build)",
    ),
    "granite4_vision": ("5.21.1", "5.18's Granite 4 Vision reads attention_multiplier from a text config without it"),
}


def _skip_before(model_type: str) -> None:
    from packaging.version import Version

    since = SINCE.get(model_type)
    if since is not None and Version(compat.transformers_version()) < Version(since[0]):
        pytest.skip(f"transformers {compat.transformers_version()}: {since[1]}")


# --- types the generic adapter learned to serve by feature (issue 31) ---------------------------------------

#: One fast type per new reader: list sizes (Qianfan-OCR), a sliding mask built for full layers (Step3.7),
#: per-image merge sizes (VideoLLaMA3), image boundary ids (Ovis2.5), GQA in the tower (EXAONE-4.5),
#: ``(N, C, P, P)`` patches and DeepSeek-V3's rotary head (Kimi-K2.5), a learned-query resampler (Aria),
#: Qwen3-VL-style DeepStack outside Qwen3-VL (Cosmos3-Omni), token-type layer arguments (ERNIE-4.5-VL).
NEWLY_SERVED = ["qianfan_ocr", "step3p7", "video_llama_3", "ovis2_5", "exaone4_5"]
NEWLY_SERVED_SLOW = ["kimi_k25", "aria", "cosmos3_omni", "idefics2", "fuyu", "cohere_compass"]  # ERNIE: test_families
#: Variable-aspect inputs read by place: Gemma 4's ``image_position_ids`` (per-layer embeddings; Unified: no tower,
#: a bidirectional image mask), MiniCPM-V's NaViT-packed slices with ``target_sizes`` over a Qwen3.5 hybrid language
#: model (4.7: its canvas M-RoPE; MiniCPM-V-OCR: 4.6's code in the ``4x`` mode), slow for Gated DeltaNet's reference
#: kernel on CPU (their layouts are checked fast below).
NEWLY_SERVED += ["gemma4", "gemma4_unified"]
#: Of those, the types whose vision tower an adapter of their own describes (the generic adapter plus the tower).
NEWLY_SERVED_SLOW += ["minicpmv4_6", "minicpmv4_7", "minicpm_ocr"]
TOWER_ADAPTERS = {"gemma4": "gemma4", **dict.fromkeys(("minicpmv4_6", "minicpmv4_7", "minicpm_ocr"), "minicpmv")}


@pytest.mark.parametrize(
    "model_type", [*NEWLY_SERVED, *(pytest.param(t, marks=pytest.mark.slow) for t in NEWLY_SERVED_SLOW)]
)
def test_newly_served_types_keep_the_engine_invariants(model_type):
    _skip_before(model_type)
    if model_type not in model_types():
        pytest.skip(f"transformers {compat.transformers_version()} has no {model_type}")
    row = census_one(model_type)
    assert row.adapter == TOWER_ADAPTERS.get(model_type, f"generic ({model_type})")
    assert row.status == "passes", row.detail


def test_video_llava_passes_the_census_with_its_adapter():
    """Its census case generates the video token id (the census suppresses the image id only): fed back without a
    video in the no-cache recompute, it is text, as the model embeds it, so both passes keep the same tokens."""
    _skip_before("video_llava")
    row = census_one("video_llava")
    assert (row.status, row.adapter) == ("passes", "video_llava"), row.detail


def _meta_adapter(model_type):
    if model_type not in model_types():
        pytest.skip(f"transformers {compat.transformers_version()} has no {model_type}")
    with torch.device("meta"):
        return adapter_for(build_tiny(model_type), get_plugin_manager())


@pytest.mark.parametrize("model_type", ["cosmos3_omni", "qwen3_omni_moe_thinker", "granite_docling"])
def test_qwen3_vl_style_deepstack_is_served_with_its_residuals_taken_by_the_engine(model_type):
    _skip_before(model_type)
    adapter = _meta_adapter(model_type)
    assert isinstance(adapter, GenericDeepStackAdapter)
    mask, feats = torch.zeros(1, 3, dtype=torch.bool), [torch.zeros(0, 4)]
    kwargs = {"visual_pos_masks": mask, "deepstack_visual_embeds": feats, "inputs_embeds": None}
    taken = adapter.take_visual_residuals(kwargs)
    assert taken is not None and taken.mask is mask and "deepstack_visual_embeds" not in kwargs


def test_a_text_model_is_the_language_model_and_resamplers_lay_out_one_row_per_image():
    idefics2 = _meta_adapter("idefics2")
    assert isinstance(idefics2, GenericAdapter) and not isinstance(idefics2, GenericDeepStackAdapter)
    assert idefics2.language_model() is idefics2.vlm().text_model
    assert idefics2.resampled and _meta_adapter("aria").resampled
    assert not _meta_adapter("aya_vision").resampled  # a patch projector: square grids stay grids


@pytest.mark.parametrize(
    ("model_type", "grids"),
    [
        ("gemma4", [(2, 2), (2, 4), (2, 2)]),
        ("minicpmv4_6", [(2, 2), (2, 4), (2, 2)]),
        ("minicpm_ocr", [(4, 4), (4, 8)]),
    ],
)
def test_variable_aspect_layouts_are_read_from_arguments_passed_by_place(model_type, grids):
    """Gemma 4 passes ``image_position_ids`` and MiniCPM-V ``target_sizes`` positionally: one grid per image (slice),
    the patches' extent over the pooling (merge) factor, rows and columns in the model's token order (MiniCPM-V 4.6
    on 5.18, whose tower takes one slice size per call: every slice a unit wide)."""
    _skip_before(model_type)
    if model_type not in model_types():
        pytest.skip(f"transformers {compat.transformers_version()} has no {model_type}")
    model = build_tiny(model_type)
    adapter = adapter_for(model, get_plugin_manager())
    vlm, calls = adapter.vlm(), []
    original = vlm.get_image_features

    @functools.wraps(original)
    def recorded(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(ImageCall(args, kwargs, out))
        return out

    vlm.get_image_features = recorded
    specs = [1, 2] if len(grids) == 3 else [1, 1]
    builder = InputBuilder(model, adapter)
    if not builder.mixed_sizes:
        grids = [grids[0]] * len(grids)
    with torch.no_grad():
        model(**builder(specs))
    layouts = adapter.image_layouts(calls[-1])
    assert [(int(lay.row.max()) + 1, int(lay.col.max()) + 1) for lay in layouts] == grids
    for lay, (_, cols) in zip(layouts, grids, strict=True):  # row-major, as the model orders its tokens
        assert torch.equal(lay.col[0], torch.arange(lay.col.shape[1]) % cols)


def _sliced_inputs(builder, slices=2):
    """MiniCPM-V 4.7 prompts whose images are a thumbnail and ``slices`` detail slices in one row, each crop between
    its markers as the processor writes them (``<image>..</image><slice>..</slice>..\\n``), all crops packed in one
    ``pixel_values`` row with their ``target_sizes``."""
    cfg, b = builder.model.config, builder
    ids_of = (cfg.image_start_id, cfg.image_end_id, cfg.slice_start_id, cfg.slice_end_id, cfg.newline_id)

    def make_inputs(specs, start=0):
        crops = [
            b._image(i, c + i % 2) for i, spec in enumerate(specs, start) for c in range((spec or 0) * (1 + slices))
        ]
        pixels = b._batch([c for c, _ in crops], [s for _, s in crops]) if crops else {}
        counts = iter(b._counts(pixels, len(crops)) if crops else [])
        rows = []
        for i, spec in enumerate(specs, start):
            ids = b.text_ids[i : i + 3]
            for _ in range(spec or 0):
                for c in range(1 + slices):
                    opens, closes = ids_of[:2] if c == 0 else ids_of[2:4]
                    ids = [*ids, opens, *[b.image_token] * next(counts), closes]
                ids = [*ids, ids_of[4], b.text_ids[50 + i]]
            rows.append(ids + b.text_ids[100 + i : 104 + 2 * i])
        width = max(map(len, rows))
        ids = torch.tensor([[b.pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, **pixels, "mm_token_type_ids": (ids == b.image_token).long()}

    return make_inputs


@pytest.mark.slow
def test_minicpmv4_7_sliced_images_keep_the_engine_invariants_with_a_grid_per_slice():
    """A thumbnail and two slices per image: the canvas M-RoPE of 4.7 lays the slices out around the thumbnail; the
    engine slices those positions, and each slice is a grid of its own (its ``target_sizes`` over the merge)."""
    from tokenprune.testing import adapters as checks

    if "minicpmv4_7" not in model_types():
        pytest.skip(f"transformers {compat.transformers_version()} has no minicpmv4_7")
    model = build_tiny("minicpmv4_7")
    manager = checks.adapter_check_manager()
    adapter = adapter_for(model, manager)
    builder = InputBuilder(model, adapter)
    make_inputs = _sliced_inputs(builder)
    batch = make_inputs([1])
    assert adapter.position_scheme == "mrope" and batch["target_sizes"].shape[0] == 3
    case = checks.adapter_case(model, make_inputs, [1, 2, 1], plugins=manager, pad_token_id=builder.pad)
    for check in (checks.keep_all_is_identity, checks.cached_decode_equals_recompute, checks.batch_equals_one_by_one):
        check(case)
    checks.layout_covers_visual_tokens(case)
    with tp.apply(
        model, {"stages": [{"at": "post_projector", "reducer": "check_drop", "keep": 1.0}]}, plugins=manager
    ) as run:
        case.forward(batch)
    layout, n = run.stats.last_prefill.stages[0].layout, int((batch["input_ids"] == adapter.image_token_id()).sum())
    crops = [(int(i), int(layout.row[0, :n][layout.image[0, :n] == i].max()) + 1) for i in layout.image[0, :n].unique()]
    assert crops == [(0, 2), (1, 2), (2, 2)]  # the thumbnail and each slice: a grid of two token rows


def test_qwen2_vl_tiny_merger_writes_the_language_models_width():
    """Qwen2-VL's vision config names the tower's width ``embed_dim`` and its merger's output ``hidden_size``: the
    tiny config makes the latter the language model's width, so the stock model runs on the census's images and its
    adapter passes the census's invariants (before, a 32-wide merger fed a 64-wide language model)."""
    cfg = compat.config_class("qwen2_vl")
    tiny = tiny_config("qwen2_vl")
    assert cfg().vision_config.embed_dim is not None
    assert tiny.vision_config.hidden_size == tiny.text_config.hidden_size != tiny.vision_config.embed_dim
    row = census_one("qwen2_vl")
    assert (row.status, row.adapter) == ("passes", "qwen2_vl"), row.detail
