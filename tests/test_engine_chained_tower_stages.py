"""Stages before the language model one after the other (two ``pre_projector`` stages, ``vision_layer`` then
``pre_projector``, two ``vision_layer`` stages on a packed tower).

The rows a later stage reduces keep the earlier stage's removed tokens in place (the projector or the merger needs
every row whole); the engine reorders them so that the reducer sees each row's valid tokens first, as
``ReduceContext.valid`` promises (:mod:`tokenprune.engine.valid_first`), and maps its selection back. Before that, a
reducer that ranks every position (padding masked by the budget's top-k) returned indices past the valid count.
"""

from __future__ import annotations

from typing import Any

import pytest
import tiny_models as tm
import torch
from engine_fixtures import BATCH_SPECS, forward, generate, pipe
from torch import Tensor

import tokenprune as tp
from tokenprune import Capabilities, ReduceContext, ScoringReducer

POINTS = frozenset({"vision_layer", "pre_projector"})
CHAINS = [
    ("pre_projector", "pre_projector"),
    ({"vision_layer": 1}, "pre_projector"),
    ({"vision_layer": 1}, {"vision_layer": 1}),
]
SEEN: list[Tensor] = []


class RandomRows(ScoringReducer):
    """A random score for every position of the row (the top-k masks what is not valid); records ``ctx.valid``."""

    name = "random_rows"
    capabilities = Capabilities(insertion_points=POINTS)

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        SEEN.append(ctx.valid.clone())
        gen = torch.Generator().manual_seed(5 + ctx.stage_index)
        return torch.rand(tokens.shape[1], generator=gen).expand(ctx.valid.shape).clone()


class _Plugin:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        registry.add(RandomRows)


@pytest.fixture(scope="module")
def manager() -> tp.plugins.PluginManager:
    return tp.get_plugin_manager(plugins=[_Plugin()])


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "qwen2_5_vl"])
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


@pytest.mark.parametrize("chain", CHAINS, ids=str)
def test_the_later_stage_sees_its_valid_tokens_first_and_reduces_what_the_first_kept(tiny, manager, chain):
    SEEN.clear()
    with tp.apply(tiny.model, pipe(*[(at, "random_rows", 0.5) for at in chain]), plugins=manager) as run:
        forward(tiny.model, tiny.make_inputs(BATCH_SPECS[tiny.name]), tiny.name)
    assert len(SEEN) == 2
    for valid in SEEN:
        count = valid.sum(1, keepdim=True)
        assert torch.equal(valid, torch.arange(valid.shape[1]).expand_as(valid) < count)
    first, second = run.stats.last_prefill.stages
    assert second.entering == first.leaving and sum(second.leaving) < sum(first.leaving)


@pytest.mark.parametrize("chain", CHAINS, ids=str)
def test_two_stages_keep_batch_equal_to_one_by_one(tiny, manager, chain):
    specs = BATCH_SPECS[tiny.name]
    with tp.apply(tiny.model, pipe(*[(at, "random_rows", 0.5) for at in chain]), plugins=manager) as run:
        batch = tiny.make_inputs(specs)
        out, gen = forward(tiny.model, batch, tiny.name).logits, generate(tiny.model, batch, 3)
        kept = run.stats.last_prefill.stages[-1].kept
        for i, spec in enumerate(specs):
            alone = tiny.make_inputs([spec], start=i)
            o1, g1 = forward(tiny.model, alone, tiny.name).logits, generate(tiny.model, alone, 3)
            torch.testing.assert_close(o1[0, -1], out[i, -1], atol=1e-5, rtol=0)
            assert torch.equal(g1.sequences[0, -3:], gen.sequences[i, -3:])
            assert run.stats.last_prefill.stages[-1].kept[0] == kept[i]


def test_two_visionzip_merges_before_the_projector_keep_batch_equal_to_one_by_one():
    """VisionZip merges at ``pre_projector`` twice on LLaVA: the second stage's merge roots are written at the rows'
    own columns."""
    t = tm.BUILDERS["llava"]()
    specs = BATCH_SPECS["llava"]
    params = {"attention": "mean"}
    pipeline = pipe(("pre_projector", "visionzip", 0.5, params), ("pre_projector", "visionzip", 0.5, params))
    with tp.apply(t.model, pipeline) as run:
        out = forward(t.model, t.make_inputs(specs), "llava").logits
        first, second = run.stats.last_prefill.stages
        assert second.entering == first.leaving and sum(second.leaving) < sum(first.leaving)
        for i, spec in enumerate(specs):
            alone = forward(t.model, t.make_inputs([spec], start=i), "llava").logits
            torch.testing.assert_close(alone[0, -1], out[i, -1], atol=1e-5, rtol=0)
