"""tokenprune's own time inside a forward (``ForwardStats.engine_seconds``): what it counts and what it does not.

The invariants are orderings of disjoint parts of one call, so they hold on any machine: the reducers'
time is inside the engine's, the engine's is inside the call's, and the stock layers' time is outside
the engine's.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import tiny_models as tm
import torch
from engine_fixtures import pipe

import tokenprune as tp
from tokenprune import Capabilities, ReduceContext, Selection, TokenReducer
from tokenprune.engine import compat, stopwatch
from tokenprune.engine.hooks import HookSet
from tokenprune.reducer import top_k_selection

PAUSE = 0.05


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_nested_blocks_count_once_and_timed_counts_each_call(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(stopwatch.time, "perf_counter", clock)
    watch = stopwatch.Stopwatch()
    with watch.running():
        clock.now += 1.0
        with watch.running():
            clock.now += 2.0
        clock.now += 4.0
    assert watch.seconds == 7.0
    clock.now += 100.0  # outside any block: not counted

    def step(by: float) -> float:
        clock.now += by
        return by

    timed = watch.timed(step)
    assert timed(0.5) == 0.5 and timed(0.25) == 0.25
    assert watch.seconds == 7.75


def test_a_block_that_raises_is_counted_and_leaves_the_watch_usable(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(stopwatch.time, "perf_counter", clock)
    watch = stopwatch.Stopwatch()
    with pytest.raises(RuntimeError), watch.running():
        clock.now += 3.0
        raise RuntimeError("boom")
    with watch.running():
        clock.now += 1.0
    assert watch.seconds == 4.0


def test_a_wrapped_method_counts_its_before_and_after_not_its_body(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(stopwatch.time, "perf_counter", clock)
    module = torch.nn.Linear(2, 2)

    def body(*args: Any, **kwargs: Any) -> int:
        clock.now += 10.0
        return 1

    module.__dict__["work"] = body
    hooks = HookSet()
    hooks.wrap_method(
        module,
        "work",
        after=lambda a, k, o: setattr(clock, "now", clock.now + 2.0),
        before=lambda: setattr(clock, "now", clock.now + 1.0),
    )
    assert module.work() == 1
    assert hooks.stopwatch.seconds == 3.0
    hooks.remove()


class Sleepy(TokenReducer):
    """Keeps the first half of the visual tokens after sleeping ``PAUSE`` seconds."""

    name = "test_sleepy"
    capabilities = Capabilities(insertion_points=frozenset({"post_projector", "layer"}))

    def reduce(self, tokens: torch.Tensor, ctx: ReduceContext) -> Selection:
        time.sleep(PAUSE)
        n = tokens.shape[1]
        return top_k_selection(-torch.arange(n, dtype=torch.float32).expand(ctx.batch_size, n), ctx)


class _Plugin:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        registry.add(Sleepy)


def timed_forward(model: torch.nn.Module, inputs: dict[str, Any]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    return time.perf_counter() - start


@pytest.mark.parametrize("at", ["post_projector", {"layer": 2}])
def test_the_reducers_time_is_inside_the_engines_and_the_engines_inside_the_call(at):
    tiny = tm.BUILDERS["llava_next"]()
    inputs = tiny.make_inputs([(56, 56), (56, 112)])
    manager = tp.get_plugin_manager(plugins=[_Plugin()])
    with tp.apply(tiny.model, pipe((at, "test_sleepy", 0.5)), plugins=manager) as run:
        wall = timed_forward(tiny.model, inputs)
    forward = run.stats.last_prefill
    assert forward.reducer_seconds >= PAUSE
    assert forward.reducer_seconds <= forward.engine_seconds < wall
    assert forward.as_dict()["engine_seconds"] == forward.engine_seconds


def test_the_stock_attention_behind_the_probe_is_not_counted(monkeypatch):
    tiny = tm.BUILDERS["llava_next"]()
    inputs = tiny.make_inputs([(56, 56)])
    calls = []
    stock = compat.stock_attention

    def slow_stock(impl: str, module: torch.nn.Module) -> Any:
        inner = stock(impl, module)

        def attention(*args: Any, **kwargs: Any) -> Any:
            calls.append(module)
            time.sleep(PAUSE)
            return inner(*args, **kwargs)

        return attention

    monkeypatch.setattr(compat, "stock_attention", slow_stock)
    with tp.apply(tiny.model, pipe(({"layer": 2}, "fastv", 0.5))) as run:  # the probe wraps every layer's attention
        wall = timed_forward(tiny.model, inputs)
    layers = tiny.model.config.text_config.num_hidden_layers
    assert len(calls) >= layers
    assert run.stats.last_prefill.engine_seconds <= wall - len(calls) * PAUSE


def test_decoding_steps_record_their_own_time():
    tiny = tm.BUILDERS["llava_next"]()
    inputs = tiny.make_inputs([(56, 56)])
    with tp.apply(tiny.model, pipe(({"decode": 2}, "dycoke_dp", 0.5))) as run, torch.no_grad():
        tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    steps = [f for f in run.stats.forwards if f.phase == "decode"]
    assert len(steps) == 2
    assert all(f.engine_seconds > 0 for f in steps)  # the decode stage's reducer and key subsets ran


def test_a_model_without_a_pipeline_records_nothing_of_its_own_beyond_the_hooks():
    tiny = tm.BUILDERS["llava_next"]()
    inputs = tiny.make_inputs([(56, 56)])
    with tp.apply(tiny.model, {"stages": []}) as run:
        wall = timed_forward(tiny.model, inputs)
    forward = run.stats.last_prefill
    assert forward.reducer_seconds == 0.0
    assert 0.0 < forward.engine_seconds < wall


class _Layer(torch.nn.Module):
    def forward(self, hidden: Any, mask: Any = None, *, scale: float = 1.0, **kwargs: Any) -> Any:
        return hidden


def test_bind_arguments_names_positional_arguments_of_methods_and_functions():
    from tokenprune.engine.hooks import bind_arguments

    layer = _Layer()
    got = bind_arguments(layer.forward, ("h", "m"), {"scale": 2.0, "extra": 3})
    assert got == {"hidden": "h", "mask": "m", "scale": 2.0, "extra": 3}
    assert bind_arguments(layer.forward, ("h",), {}) == {"hidden": "h"}
    assert bind_arguments(_Layer().forward, ("x",), {"mask": 1}) == {"hidden": "x", "mask": 1}  # another instance

    def plain(a: Any, b: Any = 0, **rest: Any) -> None: ...

    assert bind_arguments(plain, (1, 2), {"c": 3}) == {"a": 1, "b": 2, "c": 3}

    def star(*args: Any) -> None: ...

    with pytest.raises(TypeError, match="positional catch-all"):
        bind_arguments(star, (1,), {})
