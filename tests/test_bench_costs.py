"""The cost pass of `tokenprune compare`: round-robin timing, median and spread, memory that means something."""

from contextlib import contextmanager

import pytest
import torch

import tokenprune
import tokenprune.bench.timing as timing
from tokenprune.bench.config import CompareConfig, resolve_pipelines
from tokenprune.bench.records import CostRecord
from tokenprune.bench.report import _cost_columns as _typed_cost_columns
from tokenprune.bench.timing import allocated_peak_bytes, measure_costs, running_peak, schedule, timing_batch_indices
from tokenprune.cost.measure import Timing
from tokenprune.pipeline import Pipeline


def test_schedule_runs_every_pipeline_once_per_round_in_turn():
    assert schedule(["a", "b", "c"], warmup=1, repeats=2) == [
        (0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"), (1, "c"), (2, "a"), (2, "b"), (2, "c"),
    ]  # fmt: skip


def test_timing_batches_are_spread_over_the_task():
    assert timing_batch_indices(19, 1) == [9]
    assert timing_batch_indices(8, 2) == [2, 6]
    assert timing_batch_indices(2, 5) == [0, 1]
    assert timing_batch_indices(0, 1) == []


def test_measure_costs_interleaves_pipelines_and_drops_the_warm_up(monkeypatch):
    """Each pipeline: warmup + repeats rounds in turn; the warm-up's time is not a sample; seconds per example."""
    applied = []

    @contextmanager
    def fake_apply(model, pipe, plugins=None):
        applied.append(pipe.name)
        yield None

    clock = iter(range(1, 100))

    def fake_time_call(fn, warmup, repeats, device):
        fn()
        return Timing((1000.0 if len(applied) <= 2 else float(next(clock)),))  # the warm-up round is slow

    monkeypatch.setattr(timing, "apply", fake_apply)
    monkeypatch.setattr(timing, "time_call", fake_time_call)
    monkeypatch.setattr(timing, "prefill_call", lambda model: lambda batch: None)
    pipes = [(n, Pipeline(name=n)) for n in ("a", "b")]
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long)}
    ticks = []
    costs = measure_costs(
        torch.nn.Linear(1, 1),
        pipes,
        [batch],
        warmup=1,
        repeats=3,
        memory=False,
        device="cpu",
        plugins=None,
        progress=lambda d, t: ticks.append((d, t)),
    )
    assert applied == ["a", "b"] * 4
    assert costs["a"].samples == (1 / 4, 3 / 4, 5 / 4) and costs["b"].samples == (2 / 4, 4 / 4, 6 / 4)
    assert costs["a"].peak_memory_bytes is None and costs["a"].examples == 4
    assert ticks[-1] == (8, 8)


def _cost_columns(lines):
    return _typed_cost_columns([CostRecord(key="k", pipeline="p", task="t", timing="d", **c) for c in lines])


def test_cost_columns_report_the_median_and_spread_of_the_rounds():
    one = {"prefill_seconds": [0.010, 0.030, 0.020, 0.012, 0.50], "examples": 4, "peak_memory_bytes": 2**21}
    out = _cost_columns([one])
    assert out["prefill_ms"] == pytest.approx(20.0)  # the median: one slow round does not move it
    q = Timing((0.010, 0.030, 0.020, 0.012, 0.50)).spread
    assert out["prefill_ms_spread"] == pytest.approx(1000 * q) and out["peak_memory_mib"] == 2.0
    two = {"prefill_seconds": [0.040] * 5, "examples": 12, "peak_memory_bytes": 2**20}
    both = _cost_columns([one, two])  # a round's sample: seconds per example over both tasks' batches
    assert both["prefill_ms"] == pytest.approx(1000 * (0.020 * 4 + 0.040 * 12) / 16)
    assert both["peak_memory_mib"] == 2.0
    assert _cost_columns([{**one, "peak_memory_bytes": None}])["peak_memory_mib"] is None


def test_running_peak():
    assert running_peak([4, 4, -4, 8, -12, 1]) == 12
    assert running_peak([-5, 3]) == 0
    assert running_peak([]) == 0


def test_cpu_peak_is_the_allocators_accounting_not_the_process_size():
    def work():
        a = torch.empty(2 * 2**20, dtype=torch.uint8)
        del a
        return torch.empty(2**20, dtype=torch.uint8)

    first, second = allocated_peak_bytes(work, "cpu"), allocated_peak_bytes(work, "cpu")
    assert first == second  # no first-call effect: the same work, the same peak
    assert 2 * 2**20 <= first < 2 * 2**20 + 2**16
    assert allocated_peak_bytes(lambda: None, "cpu") == 0
    assert allocated_peak_bytes(lambda: None, "meta") is None


@pytest.fixture(scope="module")
def bundled():
    from tokenprune.adapters.loading import load_model
    from tokenprune.bench.runner import _inputs
    from tokenprune.plugins import get_plugin_manager

    manager = get_plugin_manager()
    model, processor = load_model("bundled", "float32", "cpu")
    task = manager.tasks.get("synthvqa")({"per_type": 1})
    batch = _inputs(processor, task, task.examples()[:4], CompareConfig(), model)
    wanted = {
        "unpruned",
        "random-50%",
        "random-10%",
        "downsample-25%",
        "gprune-10%",
        "tome-25%",
        "fastv-50%",
        "fastv-10%",
    }
    pipelines = [(n, p) for n, p in resolve_pipelines(CompareConfig(), manager.reducers) if n in wanted]
    assert len(pipelines) == len(wanted)
    return model, manager, batch, pipelines


def test_on_the_bundled_model_fewer_kept_tokens_never_show_more_memory(bundled):
    """The first-pipeline effect (the first pays for the allocator's growth, the rest show ~0) must not come back."""
    model, manager, batch, pipelines = bundled
    tokens, kv = {}, {}
    for name, pipe in pipelines:
        with tokenprune.apply(model, pipe, plugins=manager) as run, torch.inference_mode():
            out = model(**batch, use_cache=True)
            tokens[name] = [sum(layer) for layer in run.stats.last_prefill.layer_tokens]
            kv[name] = sum(k.numel() * k.element_size() * 2 for k, _ in _cache_layers(out.past_key_values))
    forward = dict(warmup=0, repeats=1, memory=True, device="cpu", plugins=manager)
    ahead = measure_costs(model, pipelines, [batch], **forward)
    behind = measure_costs(model, pipelines[::-1], [batch], **forward)
    peaks = {name: ahead[name].peak_memory_bytes for name, _ in pipelines}
    assert peaks == {name: behind[name].peak_memory_bytes for name, _ in pipelines}  # the order changes nothing
    for name in peaks:
        assert peaks[name] >= kv[name] > 0, name  # at least the KV cache the prefill built
    for a in peaks:
        for b in peaks:
            if sum(tokens[a]) < sum(tokens[b]):
                assert peaks[a] <= peaks[b], (a, tokens[a], peaks[a], b, tokens[b], peaks[b])
    assert peaks["random-10%"] < peaks["unpruned"] and peaks["fastv-50%"] < peaks["unpruned"]


def _cache_layers(cache):
    from tokenprune.engine import compat

    return compat.cache_layers(cache)
