"""The ``tokenprune run`` function (mounted by ``tokenprune.cli``) on a saved tiny LLaVA-NeXT."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_models as tm
import typer
from PIL import Image
from typer.testing import CliRunner

from tokenprune.cli.run import run


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny = tm.llava_next()
    folder = tmp_path_factory.mktemp("tiny-llava-next")
    tiny.model.save_pretrained(folder)
    tiny.processor.save_pretrained(folder)
    tm.image(56, 112).save(folder / "image.png")
    (folder / "pipe.yaml").write_text(
        "stages:\n  - {at: post_projector, reducer: random, keep: 0.5}\n  - {at: {layer: 2}, reducer: random, keep: 0.5}\n"
    )
    return folder


def invoke(*args: str):
    app = typer.Typer()
    app.command("run")(run)
    app.command("other")(lambda: None)  # keep `run` a subcommand, as in tokenprune.cli
    return CliRunner().invoke(app, ["run", *args])


def test_run_prints_answer_counts_and_heatmap(saved, tmp_path):
    out = tmp_path / "kept.png"
    result = invoke(
        "--model",
        str(saved),
        "--pipeline",
        str(saved / "pipe.yaml"),
        "--image",
        str(saved / "image.png"),
        "--prompt",
        "w10 w11 w12",
        "--max-new-tokens",
        "3",
        "--heatmap",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert "answer:" in result.output
    assert "stage 0 random at post_projector: visual tokens 52 -> 26" in result.output
    assert "stage 1 random at layer 2: visual tokens 26 -> 13" in result.output
    assert "tokens per decoder layer:" in result.output
    assert out.is_file() and out.stat().st_size > 1000


def test_run_reports_missing_files(saved):
    result = invoke(
        "--model",
        str(saved),
        "--pipeline",
        str(saved / "nope.yaml"),
        "--image",
        str(saved / "image.png"),
        "--prompt",
        "hi",
    )
    assert result.exit_code == 2
    assert "nope.yaml" in result.output and "does not exist" in result.output


def test_a_missing_local_model_folder_says_so(tmp_path):
    from typer.testing import CliRunner

    from tokenprune.cli import app

    missing = tmp_path / "no-such-model"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("stages: []\n")
    image = tmp_path / "i.png"
    Image.new("RGB", (32, 32)).save(image)
    args = ["run", "--model", str(missing), "--pipeline", str(pipeline), "--image", str(image), "--prompt", "hi"]
    result = CliRunner().invoke(app, args)
    output = result.stdout + (result.stderr or "")
    assert result.exit_code == 2
    assert "no such folder" in output and str(missing) in output.replace("\n", "")
    assert "Repo id" not in output


def test_run_prints_a_decode_stage_per_step(saved, tmp_path):
    pipe = tmp_path / "decode.yaml"
    pipe.write_text("stages:\n  - {at: {decode: 2}, reducer: dycoke_dp, keep: 0.25}\n")
    common = ["--model", str(saved), "--pipeline", str(pipe), "--image", str(saved / "image.png"), "--prompt", "w10"]
    result = invoke(*common, "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "attended per step" in x)
    # the first step prunes: int(48 * 0.25) of the 48 non-newline tokens, plus the 4 protected row newlines
    assert line.startswith("stage 0 dycoke_dp at decode layer 2: of 52 visual tokens, attended per step: [16, ")
    steps = line.split("attended per step: [")[1].rstrip("]").split(", ")
    assert len(steps) == 3  # 4 new tokens: the prefill's, then 3 decoding steps


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give --image, --video or both"),
        (("--video", "no-such-folder"), "video 'no-such-folder' does not exist"),
    ],
)
def test_run_needs_an_image_or_a_video_that_exists(saved, args, message):
    result = invoke("--model", str(saved), "--pipeline", str(saved / "pipe.yaml"), "--prompt", "hi", *args)
    assert result.exit_code == 2 and message in result.output
