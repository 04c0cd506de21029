"""A reducer's own stage budget (TokenReducer.stage_budget): the engine uses it, checks it, and passes keep."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from engine_fixtures import forward, pipe
from tokenprune_fastv import nearest_count

import tokenprune as tp
from tokenprune.budget import budget_per_sample
from tokenprune.errors import ReducerOutputError
from tokenprune.reducer import top_k_selection
from tokenprune.validation import check_stage_budget


class AllButOne(tp.TokenReducer):
    """Keeps every token but the last, whatever keep says; records the contexts it saw."""

    name = "all_but_one"
    capabilities = tp.Capabilities(insertion_points=frozenset({"post_projector", "layer"}))
    seen: ClassVar[list[tp.ReduceContext]] = []

    def stage_budget(self, keep, valid, protected, layout):
        return torch.maximum(valid.sum(1) - 1, (protected & valid).sum(1))

    def reduce(self, tokens: torch.Tensor, ctx: tp.ReduceContext) -> tp.Selection:
        type(self).seen.append(ctx)
        first = -torch.arange(tokens.shape[1], dtype=torch.float32).expand_as(ctx.valid)  # earlier tokens first
        return top_k_selection(first, ctx, reducer_name=self.name)


class TooMany(AllButOne):
    name = "too_many"

    def stage_budget(self, keep, valid, protected, layout):
        return valid.sum(1) + 1


class Floats(AllButOne):
    name = "floats"

    def stage_budget(self, keep, valid, protected, layout):
        return valid.sum(1).float()


class Plugin:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: object) -> None:
        for cls in (AllButOne, TooMany, Floats):
            registry.add(cls)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def plugins():
    return tp.get_plugin_manager(plugins=[Plugin()])


def test_the_engine_uses_the_reducers_budget_and_passes_keep(nxt, plugins):
    AllButOne.seen.clear()
    inputs = nxt.make_inputs([(56, 112)])
    with tp.apply(nxt.model, pipe(("post_projector", "all_but_one", 0.1)), plugins=plugins) as run:
        forward(nxt.model, inputs, "llava_next")
    stage = run.stats.last_prefill.stages[0]
    assert stage.leaving == [stage.entering[0] - 1]  # far above keep 0.1
    assert AllButOne.seen[-1].keep == 0.1


@pytest.mark.parametrize(("name", "defect"), [("too_many", r"over its \d+ valid tokens"), ("floats", r"dtype")])
def test_a_bad_budget_names_the_reducer(nxt, plugins, name, defect):
    inputs = nxt.make_inputs([(56, 56)])
    with tp.apply(nxt.model, pipe(("post_projector", name, 0.5)), plugins=plugins):
        with pytest.raises(ReducerOutputError, match=rf"'{name}'.*stage_budget\(\).*{defect}"):
            forward(nxt.model, inputs, "llava_next")


def test_check_stage_budget():
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    protected = torch.tensor([[True, True, False, False], [False] * 4])
    assert check_stage_budget(torch.tensor([2, 0]), valid, protected, who="x").tolist() == [2, 0]
    with pytest.raises(ReducerOutputError, match=r"sample 0 gets 1 tokens, under its 2 protected tokens"):
        check_stage_budget(torch.tensor([1, 3]), valid, protected, who="x")
    with pytest.raises(ReducerOutputError, match=r"shape"):
        check_stage_budget(torch.tensor([1]), valid, protected, who="x")
    assert torch.equal(
        tp.TokenReducer.stage_budget(AllButOne(), 0.5, valid, protected, None), budget_per_sample(0.5, valid, protected)
    )


def test_gprune_official_budget_in_the_engine(nxt, plugins):
    inputs = nxt.make_inputs([(56, 112)])
    stages = pipe(("post_projector", "gprune", 0.3, {"budget": "official"}))
    with tp.apply(nxt.model, stages, plugins=plugins) as run:
        forward(nxt.model, inputs, "llava_next")
    stage = run.stats.last_prefill.stages[0]
    n = stage.entering[0]
    view, newline = stage.layout.view[0, :n], stage.layout.newline[0, :n]
    base, grid = int((view == 0).sum()), int(((view == 1) & ~newline).sum())
    assert stage.leaving == [int(0.3 * base) + int(0.3 * grid) + int(newline.sum())]
    assert set(newline.nonzero().squeeze(1).tolist()) <= set(stage.kept[0])


def test_fastv_nearest_in_the_engine(nxt, plugins):
    inputs = nxt.make_inputs([(56, 56), (56, 112)])
    counts = {}
    for rounding in ("floor", "nearest"):
        stages = pipe(({"layer": 2}, "fastv", 0.3, {"rounding": rounding}))
        with tp.apply(nxt.model, stages, plugins=plugins) as run:
            forward(nxt.model, inputs, "llava_next")
        counts[rounding] = (run.stats.last_prefill.stages[0].entering, run.stats.last_prefill.stages[0].leaving)
    entering = counts["nearest"][0]
    assert counts["nearest"][1] == [nearest_count(0.3, n) for n in entering]
    assert counts["floor"][1] == [int(0.3 * n + 1e-9) for n in entering]
    assert counts["nearest"][1] != counts["floor"][1]  # 36 and 52 tokens: 10.8 -> 11 and 15.6 -> 16
