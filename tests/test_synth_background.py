"""What a pipeline keeps of the background (`tokenprune.synth.background`), on the bundled mini VLM."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tokenprune.synth import load_bundled
from tokenprune.synth.background import by_layout, coverage, measure, token_labels
from tokenprune.synth.cli import app
from tokenprune.synth.patch_labels import COLOUR_CLASSES
from tokenprune.synth.questions import heldout_split


@pytest.fixture(scope="module")
def bundled():
    return load_bundled()


def _regions_sample():
    return next(s for s in heldout_split(30, ("background",)) if s.scene.layout == "regions")


def test_measure_counts_the_kept_tokens_of_each_background_colour():
    sample = _regions_sample()
    owners, colours = token_labels(sample)
    second = (owners == 0) & (colours == COLOUR_CLASSES.index(sample.scene.second))
    assert second.any() and (owners == -1).any()
    only_second = measure(sample, correct=False, kept=torch.from_numpy(second))
    assert (only_second.kept_main, only_second.kept_second) == (0, int(second.sum()))
    assert only_second.kept_background == only_second.kept_tokens == int(second.sum())
    row = by_layout([only_second])[0]
    assert row.layout == "regions" and row.main_majority == 0.0 and row.kept_share == 1.0
    everything = measure(sample, correct=True, kept=torch.ones(len(owners), dtype=torch.bool))
    assert everything.kept_main > everything.kept_second  # the answer's colour dominates the image
    assert everything.kept_tokens == int((owners >= 0).sum())  # newline tokens are not counted


def test_measure_refuses_a_mask_of_another_length():
    sample = _regions_sample()
    with pytest.raises(RuntimeError, match="visual tokens recorded"):
        measure(sample, correct=True, kept=torch.ones(3, dtype=torch.bool))


def test_kept_tokens_follow_the_run_statistics(bundled):
    model, processor = bundled
    samples = heldout_split(4, ("background",))
    full = coverage(model, processor, samples, None)
    assert all(s.kept_tokens == s.image_tokens and s.kept_background == s.image_background for s in full)
    pipeline = {"stages": [{"at": "post_projector", "reducer": "random", "keep": 0.25}], "protect_newlines": False}
    pruned = coverage(model, processor, samples, pipeline)
    for s, f in zip(pruned, full, strict=True):
        assert 0 < s.kept_tokens < f.kept_tokens * 0.3
        assert s.kept_main + s.kept_second == s.kept_background <= s.kept_tokens
    shares = [s.kept_background / s.kept_tokens for s in pruned]
    assert np.mean(shares) == pytest.approx(np.mean([f.image_background / f.image_tokens for f in full]), abs=0.15)


def test_cli_prints_a_row_per_pipeline_and_layout():
    result = CliRunner().invoke(app, ["background", "--reducers", "random", "--keep", "0.5", "--per-type", "9"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| unpruned") or line.startswith("| random")]
    assert {r.split("|")[1].strip() for r in rows} == {"unpruned", "random-50%"}
    assert {r.split("|")[2].strip() for r in rows} <= {"uniform", "gradient", "regions"}


def test_graph_degrees_summarise_both_graphs_of_every_scene(bundled):
    from tokenprune_gprune import GPrune

    from tokenprune.synth.background import graph_degrees

    model, processor = bundled
    samples = heldout_split(6, ("background",))
    rows = graph_degrees(model, processor, samples, GPrune().token_graph)
    assert sum(r.graphs for r in rows) <= 2 * len(samples) and {r.layout for r in rows} <= {
        "uniform",
        "gradient",
        "regions",
    }
    for r in rows:
        assert 0 < r.object_degree <= 1 and 0 < r.background_degree <= 1 and r.background_score > 0
    # an edge threshold above every cosine leaves each token linked to itself only
    alone = graph_degrees(model, processor, samples[:2], GPrune().token_graph, threshold=1.5)
    for r in alone:
        assert r.background_degree == pytest.approx(r.object_degree, rel=0.5)
        assert r.background_degree < 0.05
