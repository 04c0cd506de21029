"""``tokenprune check`` through the CLI on tiny checkpoints saved locally: one served generically, one refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tokenprune.cli import app
from tokenprune.engine import compat
from tokenprune.synth.tokenizer import IMAGE_TOKEN_ID, build_tokenizer, vocabulary

CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14
)
TEXT = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
)


@pytest.fixture(scope="module")
def vipllava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VipLLaVA (no registered adapter: the generic one serves it) with an offline LlavaProcessor."""
    from transformers import LlavaProcessor, VipLlavaConfig, VipLlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = VipLlavaConfig(
        text_config=dict(TEXT, vocab_size=len(vocabulary())),
        vision_config=dict(CLIP, model_type="clip_vision_model", projection_dim=32),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layers=[-2, -1],
    )
    folder = tmp_path_factory.mktemp("tiny-vipllava")
    VipLlavaForConditionalGeneration(cfg).save_pretrained(folder)
    ip = compat.image_processor_class("CLIP")(
        size={"height": 56, "width": 56}, crop_size={"height": 56, "width": 56}, do_center_crop=False
    )
    LlavaProcessor(
        image_processor=ip,
        tokenizer=build_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BLIP-2 (no `.model`: the generic adapter refuses it), saved without a processor."""
    from tokenprune.testing.census import build_tiny

    folder = tmp_path_factory.mktemp("tiny-blip2")
    build_tiny("blip-2").save_pretrained(folder)
    return folder


def test_check_on_a_generically_served_checkpoint_prints_the_table_and_exits_0(vipllava):
    result = CliRunner().invoke(app, ["check", "--model", str(vipllava)])
    assert result.exit_code == 0, result.output
    assert "generic (vipllava)" in result.output
    assert "keep-all is identity" in result.output and "fails" not in result.output
    assert result.output.count("holds") >= 9
    assert "vision attention" in result.output and "refused" in result.output  # no tower described


def test_check_on_a_refused_checkpoint_names_the_type_and_reason_and_exits_1(blip2):
    result = CliRunner().invoke(app, ["check", "--model", str(blip2)])
    assert result.exit_code == 1, result.output
    assert "refused" in result.output and "'blip-2'" in result.output
    flat = "".join(ch for ch in result.output if not ch.isspace() and ch != "│")  # the table folds long cells
    assert "holdsnomultimodalbasemodelas`.model`" in flat
