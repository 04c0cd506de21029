"""The built-in reducers end to end through ``tp.apply`` on tiny LLaVA-NeXT and Qwen2-VL models (batch 3).

Each pipeline must keep exactly its budget per sample (newline tokens protected on LLaVA-NeXT), give
finite logits, and give every sample the same kept tokens and logits as when it runs alone.
"""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
from engine_fixtures import BATCH_SPECS, forward, pipe

import tokenprune as tp
from tokenprune.budget import tokens_to_keep

pytestmark = pytest.mark.slow

PIPELINES = {
    "gprune": pipe(("post_projector", "gprune", 0.5)),
    "gprune_layer": pipe(({"layer": 2}, "gprune", 0.4, {"threshold": 0.7})),
    "fastv": pipe(({"layer": 2}, "fastv", 0.5)),
    "fastv_paper": pipe(({"layer": 2}, "fastv", 0.3, {"source": "all"})),
    "tome": pipe(("post_projector", "tome", 0.4)),
    "tome_twice": pipe(("post_projector", "tome", 0.6), ({"layer": 2}, "tome", 0.5)),
    "l2norm": pipe(("post_projector", "l2norm", 0.5), ({"layer": 1}, "l2norm", 0.5, {"largest": False})),
    "random": pipe(("post_projector", "random", 0.5, {"seed": 3})),
    "downsample": pipe(("post_projector", "downsample", 0.25)),
    "downsample_then_fastv": pipe(("post_projector", "downsample", 0.5), ({"layer": 2}, "fastv", 0.5)),
    "divprune": pipe(("post_projector", "divprune", 0.5), ({"layer": 2}, "divprune", 0.5)),
    "cdpruner": pipe(("post_projector", "cdpruner", 0.4), ({"layer": 2}, "cdpruner", 0.5, {"split": "sample"})),
}


@pytest.fixture(scope="module", params=["llava_next", "qwen2_vl"])
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


def expected_leaving(stage: tp.stats.StageStats, keep: float | int) -> list[int]:
    out = []
    for b, entering in enumerate(stage.entering):
        newlines = int(stage.layout.newline[b, :entering].sum()) if stage.layout is not None else 0
        out.append(max(tokens_to_keep(keep, entering), newlines))
    return out


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_reducer_end_to_end(tiny, name):
    pipeline = PIPELINES[name]
    specs = BATCH_SPECS[tiny.name]
    batch = tiny.make_inputs(specs)
    with tp.apply(tiny.model, pipeline) as run:
        logits = forward(tiny.model, batch, tiny.name).logits
        stages = run.stats.last_prefill.stages
        assert [s.reducer for s in stages] == [s["reducer"] for s in pipeline["stages"]]
        for stage, spec in zip(stages, pipeline["stages"], strict=True):
            assert stage.leaving == expected_leaving(stage, spec["keep"])
            assert len(set(stage.entering)) > 1  # a ragged batch
            if tiny.name == "llava_next" and stage.at == "post_projector":
                assert stage.layout is not None
                for b, kept in enumerate(stage.kept):  # every protected newline survives
                    newlines = stage.layout.newline[b, : stage.entering[b]].nonzero().squeeze(1).tolist()
                    assert set(newlines) <= set(kept)
        assert bool(torch.isfinite(logits).all())
        for i, spec in enumerate(specs):
            alone_logits = forward(tiny.model, tiny.make_inputs([spec], start=i), tiny.name).logits
            alone = run.stats.last_prefill.stages
            for s_batch, s_alone in zip(stages, alone, strict=True):
                assert s_alone.kept[0] == s_batch.kept[i], f"stage {s_batch.stage} of sample {i}"
            torch.testing.assert_close(alone_logits[0, -1], logits[i, -1], atol=1e-4, rtol=0)


def test_tome_carries_sizes_to_the_next_stage(tiny):
    """A second ToMe stage starts from the sizes of the first (total size = visual tokens entering)."""
    seen = []

    class Spy(tp.TokenReducer):
        name = "size_spy"
        capabilities = tp.Capabilities()

        def reduce(self, tokens, ctx):
            seen.append(ctx.sizes.masked_fill(~ctx.valid, 0.0))
            return tp.Selection.all(ctx.valid)

    class SpyPlugin:
        @tp.hookimpl
        def tokenprune_register_reducers(self, registry):
            registry.add(Spy)

    manager = tp.get_plugin_manager(plugins=[SpyPlugin()])
    batch = tiny.make_inputs(BATCH_SPECS[tiny.name])
    with tp.apply(
        tiny.model, pipe(("post_projector", "tome", 0.3), ({"layer": 1}, "size_spy", 1.0)), plugins=manager
    ) as run:
        forward(tiny.model, batch, tiny.name)
        first = run.stats.last_prefill.stages[0]
    sizes = seen[-1]
    assert sizes.sum(1).tolist() == [float(n) for n in first.entering]
    assert (sizes > 1).sum(1).min() > 0


@pytest.mark.parametrize("source", ["last", "all"])
def test_fastv_keeps_the_top_eager_attention(tiny, source):
    """FastV under sdpa keeps exactly the top tokens of layer 1's eager attention (heads averaged)."""
    batch = tiny.make_inputs(BATCH_SPECS[tiny.name])
    keep = 0.4
    with tp.apply(tiny.model, pipe(({"layer": 2}, "fastv", keep, {"source": source}))) as run:
        forward(tiny.model, batch, tiny.name)
        stage = run.stats.last_prefill.stages[0]
        kept = stage.kept
    eager = copy.deepcopy(tiny.model)
    eager.set_attn_implementation("eager")
    att = forward(eager, batch, tiny.name, output_attentions=True).attentions[1].float().mean(1)  # (B, L, L)
    visual = batch["input_ids"] == tiny.model.config.image_token_id
    valid = batch["attention_mask"].bool()
    for b in range(visual.shape[0]):
        cols = visual[b].nonzero().squeeze(1)
        rows = [att.shape[1] - 1] if source == "last" else valid[b].nonzero().squeeze(1).tolist()
        received = att[b][rows][:, cols].mean(0).tolist()
        n = len(cols)
        newline = stage.layout.newline[b, :n].tolist() if stage.layout is not None else [False] * n
        protected = [i for i in range(n) if newline[i]]  # LLaVA-NeXT's newlines are kept first
        k = max(tokens_to_keep(keep, n), len(protected))
        top = sorted((i for i in range(n) if not newline[i]), key=lambda i: -received[i])[: k - len(protected)]
        assert kept[b] == sorted(top + protected)


def test_cli_lists_every_builtin_reducer_with_capabilities():
    """`tokenprune plugins --json` shows each built-in as its own plugin of the tokenprune distribution."""
    import json

    from typer.testing import CliRunner

    from tokenprune.cli import app

    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    expected = {
        "gprune": (["layer", "post_projector"], [], False),
        "fastv": (["layer"], ["last"], False),
        "tome": (["layer", "post_projector", "vision_layer"], [], True),
        "l2norm": (["layer", "post_projector"], [], False),
        "random": (["layer", "post_projector"], [], False),
        "downsample": (["layer", "post_projector"], [], False),
    }
    for name, (points, attention, merges) in expected.items():
        assert plugins[name]["distribution"] == "tokenprune"
        (reducer,) = plugins[name]["reducers"]
        caps = reducer["capabilities"]
        assert reducer["name"] == name
        assert (caps["insertion_points"], caps["attention"], caps["merges"]) == (points, attention, merges)
        assert caps["deterministic_count"] is True
    gprune_params = plugins["gprune"]["reducers"][0]["params"]["properties"]
    assert {k: v["default"] for k, v in gprune_params.items()} == {
        "threshold": 0.5,
        "temperature": 0.03,
        "iterations": 5,
        "budget": "stage",
        "precision": "float32",
    }
