"""`tokenprune run` and `tokenprune check` on tiny checkpoints of today's VLM families, saved to disk (issue 32).

Each family's tiny random model is saved with a processor that works with it (a tokenizer built in code holding
the family's special tokens, the family's own torchvision-free image processor:
tokenprune/testing/tiny_checkpoints.py); the real CLI loads both from the folder. The expected visual-token
counts come from the processor's own placeholder expansion, not from the CLI's output.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tokenprune.cli import app
from tokenprune.testing.tiny_checkpoints import NOT_BUILT, RECIPES, save_tiny_checkpoint

COVERED = ["qwen3_5", "gemma4", "glm4v", "aya_vision", "paddleocr_vl", "video_llava", "ernie4_5_vl_moe"]
#: Families of issue 32 whose `tokenprune run` is not tested here, with the reason.
SKIPPED = {
    **NOT_BUILT,
    "minicpmv4_6": "MiniCPMV4_6Processor.__init__ reads its video processor's slice_mode and downsample_mode, so the "
    "processor cannot be built without its video processor (MiniCPMV4_6VideoProcessor), whose class needs torchvision",
}
#: Hybrid families (recurrent layers beside attention): a layer stage goes at the first usable layer.
HYBRID = ["qwen3_5"]
PROMPT = "describe the picture"
runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An image (96x64: every family's processor turns it into an even number of visual tokens) and pipelines."""
    root = tmp_path_factory.mktemp("family-inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8)).save(root / "image.png")
    (root / "half.yaml").write_text("stages:\n  - {at: post_projector, reducer: random, keep: 0.5}\n")
    return {"root": root, "image": root / "image.png", "half": root / "half.yaml"}


_SAVED: dict[str, Path] = {}


def _saved(model_type: str, factory: pytest.TempPathFactory) -> Path:
    """The family's tiny checkpoint, saved once per session."""
    if model_type not in _SAVED:
        _SAVED[model_type] = save_tiny_checkpoint(model_type, factory.mktemp(model_type))
    return _SAVED[model_type]


@pytest.fixture(scope="module", params=COVERED)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """``(model type, folder)``: the family's tiny checkpoint, saved once per module."""
    return request.param, _saved(request.param, tmp_path_factory)


def _visual_count(folder: Path, image: Path) -> tuple[int, int]:
    """``(visual tokens, prompt tokens)`` of the prompt with the image, as the family's processor expands it."""
    from tokenprune.adapters.loading import build_inputs, load_processor
    from tokenprune.testing.tiny_configs import tiny_config

    processor = load_processor(folder)
    with Image.open(image) as im:
        inputs = build_inputs(processor, im.convert("RGB"), PROMPT)
    cfg = tiny_config(_model_type(folder))
    placeholder = getattr(cfg, "image_token_id", None)
    placeholder = placeholder if placeholder is not None else cfg.image_token_index
    ids = inputs["input_ids"][0]
    return int((ids == placeholder).sum()), int(ids.numel())


def _model_type(folder: Path) -> str:
    import json

    return json.loads((folder / "config.json").read_text())["model_type"]


def _run(folder: Path, pipeline: Path, image: Path) -> str:
    args = ["run", "--model", str(folder), "--pipeline", str(pipeline), "--prompt", PROMPT]
    result = runner.invoke(app, [*args, "--image", str(image), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert re.search(r"answer: \S", result.output), result.output
    return result.output


def _layers(output: str) -> list[int]:
    found = re.search(r"tokens per decoder layer: \[([\d, ]+)\]", output)
    assert found, output
    return [int(x) for x in found.group(1).split(",")]


@pytest.mark.parametrize("model_type", sorted(set(SKIPPED) - set(RECIPES)))
def test_a_family_without_a_recipe_is_refused_then_skipped_with_its_reason(model_type, tmp_path):
    """No checkpoint is saved (the refusal names the reason where tiny_checkpoints knows it); reported as skipped."""
    with pytest.raises(KeyError, match=model_type):
        save_tiny_checkpoint(model_type, tmp_path)
    pytest.skip(f"tokenprune run not tested on {model_type}: {SKIPPED[model_type]}")


def test_every_family_of_the_issue_is_covered_or_skipped_with_a_reason():
    families = {"qwen3_5", "gemma4", "lfm2_vl", "glm4v", "llama4", "molmo2", "minicpmv4_6", "aya_vision"}
    families |= {"cohere2_vision", "ernie4_5_vl_moe", "paddleocr_vl", "video_llava"}
    assert families == set(COVERED) | set(SKIPPED)
    assert not set(COVERED) & set(SKIPPED)
    assert set(COVERED) <= set(RECIPES)


def test_the_checkpoint_loads_with_from_pretrained(checkpoint, files):
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    from tokenprune.adapters.loading import load_processor

    model_type, folder = checkpoint
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.config.model_type == model_type
    family = PROCESSOR_MAPPING_NAMES[model_type]
    if "video_processor" not in getattr(transformers, family).get_attributes():  # no torchvision needed
        assert type(AutoProcessor.from_pretrained(folder)).__name__ == family
    else:  # its video processor needs torchvision: the family's processor without it, for images
        assert type(load_processor(folder).images).__name__ == family
    visual, _ = _visual_count(folder, files["image"])
    assert visual > 0 and visual % 2 == 0


def test_run_cuts_the_visual_tokens_after_the_projector(checkpoint, files):
    _, folder = checkpoint
    visual, prompt = _visual_count(folder, files["image"])
    output = _run(folder, files["half"], files["image"])
    assert f"prompt tokens: {prompt}" in output
    assert re.search(rf"stage 0 random at post_projector: visual tokens {visual} -> {visual // 2} ", output), output
    assert set(_layers(output)) == {prompt - visual // 2}


def test_run_cuts_at_the_default_layer(checkpoint, files):
    """FastV at the family's default layer: 2, or on a hybrid model the first whose previous layer is attention."""
    from tokenprune.engine.hybrid import SOFTMAX_KINDS, default_layer
    from tokenprune.testing.tiny_configs import tiny_config

    model_type, folder = checkpoint
    text = tiny_config(model_type).get_text_config()
    kinds = list(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)
    layer = default_layer(kinds)
    assert layer is not None and kinds[layer - 1] in SOFTMAX_KINDS
    assert (layer == 2) == (model_type not in HYBRID)
    pipeline = files["root"] / f"fastv-{layer}.yaml"
    pipeline.write_text(f"stages:\n  - {{at: {{layer: {layer}}}, reducer: fastv, keep: 0.5}}\n")
    visual, prompt = _visual_count(folder, files["image"])
    output = _run(folder, pipeline, files["image"])
    assert re.search(rf"stage 0 fastv at .*: visual tokens {visual} -> {visual // 2} ", output), output
    assert _layers(output) == [prompt] * layer + [prompt - visual // 2] * (len(kinds) - layer)


#: Families whose adapters describe their vision towers (issue 32): where VisionZip runs on the probe's scores.
TOWERS = dict.fromkeys(["qwen3_5", "glm4v", "ernie4_5_vl_moe", "paddleocr_vl"], "pre_projector")


@pytest.mark.parametrize("model_type", sorted(TOWERS))
def test_run_with_visionzip_on_the_towers_attention(model_type, files, tmp_path_factory):
    """VisionZip (dominant tokens, ``attention: mean``) on the tower's attention, before the merger where the family
    serves it: half the image's tokens leave, every decoder layer runs on the rest."""
    folder = _saved(model_type, tmp_path_factory)
    at = TOWERS[model_type]
    visual, prompt = _visual_count(folder, files["image"])
    pipeline = files["root"] / f"visionzip-{model_type}.yaml"
    params = "{contextual_ratio: 0.0, attention: mean}"
    pipeline.write_text(f"stages:\n  - {{at: {at}, reducer: visionzip, keep: {visual // 2}, params: {params}}}\n")
    output = _run(folder, pipeline, files["image"])
    assert re.search(rf"stage 0 visionzip at {at}: visual tokens {visual} -> {visual // 2} ", output), output
    assert set(_layers(output)) == {prompt - visual // 2}


@pytest.mark.slow  # the check kit's generations: 2 to 25 s a family (Qwen3.5's reference linear attention)
def test_check_holds_on_the_checkpoint(checkpoint):
    """Every check holds; on a hybrid model the probe sits at its default layer and recurrent layers keep no keys."""
    _, folder = checkpoint
    torch.manual_seed(0)
    result = runner.invoke(app, ["check", "--model", str(folder)])
    assert result.exit_code == 0, result.output
    assert "│ fails" not in result.output and "KV cache holds the kept tokens" in result.output, result.output


def test_without_torchvision_images_go_to_the_family_processor_and_videos_with_images_are_refused(
    files, tmp_path_factory
):
    from tokenprune.adapters.loading import image_placeholder, load_processor
    from tokenprune.bench.video_inputs import FramesProcessor
    from tokenprune.errors import TokenpruneError

    processor = load_processor(_saved("qwen3_5", tmp_path_factory))
    assert isinstance(processor, FramesProcessor)  # the full processor builds a video processor: torchvision
    assert type(processor.images).__name__ == "Qwen3VLProcessor"
    assert image_placeholder(processor) == "<|vision_start|><|image_pad|><|vision_end|>"  # as its chat template
    with Image.open(files["image"]) as im, pytest.raises(TokenpruneError, match="video input needs torchvision"):
        processor(text="<|image_pad|> <|video_pad|>", images=im.convert("RGB"), videos=[[im]])


def test_run_with_a_video_but_no_torchvision_says_so_instead_of_dropping_it(files, tmp_path_factory):
    """Video-LLaVA's processor builds a video processor (torchvision): without it the video is refused, exit 2."""
    frames = files["root"] / "frames"
    frames.mkdir(exist_ok=True)
    for i in range(8):
        Image.new("RGB", (64, 64), (30 * i, 0, 0)).save(frames / f"{i:02d}.png")
    folder = _saved("video_llava", tmp_path_factory)
    args = ["run", "--model", str(folder), "--pipeline", str(files["half"]), "--prompt", PROMPT]
    result = runner.invoke(app, [*args, "--video", str(frames), "--max-new-tokens", "2"])
    assert result.exit_code == 2, result.output
    assert "video input needs torchvision" in result.output
    assert "answer:" not in result.output


def test_the_placeholder_is_not_wrapped_where_the_processor_writes_the_markers(tmp_path_factory):
    from tokenprune.adapters.loading import image_placeholder, load_processor

    assert (
        image_placeholder(load_processor(_saved("gemma4", tmp_path_factory))) == "<|image|>"
    )  # Gemma 4 writes <|image> ... <image|>
