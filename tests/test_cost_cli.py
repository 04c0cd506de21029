"""`tokenprune flops` on a tiny mini VLM saved to disk (loaded with from_pretrained, like a hub model)."""

import json

from PIL import Image
from typer.testing import CliRunner

from tokenprune.cli import app


def test_flops_json_agrees_across_counters_and_reports_the_reduction(tiny_model_dir, tmp_path):
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(
        "stages:\n  - {at: post_projector, reducer: random, keep: 0.25}\n  - {at: {layer: 1}, reducer: random, keep: 4}\n"
    )
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 32), "red").save(image)
    result = CliRunner().invoke(
        app, ["flops", "--model", str(tiny_model_dir), "--pipeline", str(pipe), "--image", str(image), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for label in ("unpruned", "pipeline"):
        lm = data[label]["language_model"]
        assert lm["analytic"] == lm["torch"] == lm["fvcore"] > 0
        assert data[label]["unit"].startswith("MACs")
    layers = data["pipeline"]["layers"]
    assert layers[1]["tokens"][0] < layers[0]["tokens"][0] < data["unpruned"]["layers"][0]["tokens"][0]
    assert data["pipeline"]["vision"] == data["unpruned"]["vision"] > 0
    assert 0.5 < data["reduction"] < 1


def test_flops_table_names_every_part(tiny_model_dir):
    result = CliRunner().invoke(app, ["flops", "--model", str(tiny_model_dir), "--no-fvcore"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for part in ("vision tower + projector", "layer 0", "layer 1", "lm_head", "language model", "total"):
        assert part in result.stdout


def test_flops_on_a_missing_model_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(app, ["flops", "--model", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "could not load model" in result.stderr
