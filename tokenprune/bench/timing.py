"""The cost pass of a comparison: prefill latency and peak memory, measured apart from the accuracy pass.

The accuracy pass runs ``generate`` batch after batch, pipeline after pipeline; a timing taken there
is one sample per batch, and whichever pipeline runs first pays for the warm-up and for the
allocator's growth. The cost pass measures instead, on a few fixed batches of each task:

* **Latency.** ``warmup`` untimed rounds, then ``repeats`` timed ones. In every round each pipeline
  in turn (round-robin) runs the prefill forward of the same batches (``model(**inputs,
  use_cache=True)``, the logits of the last position only, as ``generate`` asks for them), so a
  drift of the machine's speed (another process, a cache, the clock) hits every pipeline alike. A
  sample is the round's seconds per example; the report gives the median over the repeats and the
  spread (interquartile range; max - min below four repeats). On a GPU the time comes from CUDA
  events, on the CPU from ``time.perf_counter``.
* **Peak memory.** The peak of tensor memory allocated during the prefill forward of a timing batch,
  above what was allocated before it (the weights and the inputs are not counted), the largest over
  the batches. On CUDA: the caching allocator's statistics (``max_memory_allocated``, reset before
  each measurement). On the CPU: torch's CPU allocator's own accounting, every allocation and free
  in order, read from the profiler's memory events (``KINETO_LOG_LEVEL`` is set to 6, unless already
  set, so that the profiler prints nothing). Both count what tensors hold, not what the process
  holds, so a value does not depend on which pipeline ran before. Other devices: not measured.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenprune.cost.measure import Timing, peak_memory_bytes, time_call
from tokenprune.engine import PreparedPipeline, apply, prepare
from tokenprune.pipeline import Pipeline
from tokenprune.plugins import PluginManager

Batch = Mapping[str, Any]
"""Processor output for one batch, already on the model's device."""


@dataclass(frozen=True)
class CostResult:
    """One pipeline's cost on a task's timing batches.

    Attributes:
        samples: Prefill seconds per example, one per timed round.
        peak_memory_bytes: Peak tensor memory of one batch's prefill (the largest batch), or None
            where not measured.
        examples: Examples in the timing batches.
    """

    samples: tuple[float, ...]
    peak_memory_bytes: int | None
    examples: int

    @property
    def timing(self) -> Timing:
        return Timing(self.samples)


def schedule(names: Sequence[str], warmup: int, repeats: int) -> list[tuple[int, str]]:
    """``(round, pipeline)`` in run order: every pipeline once per round, rounds ``< warmup`` untimed."""
    return [(r, name) for r in range(warmup + repeats) for name in names]


def timing_batch_indices(batches: int, wanted: int) -> list[int]:
    """``wanted`` batch indices spread evenly over ``batches`` (the middle one for one), without repeats."""
    if batches <= 0:
        return []
    return sorted({min(batches - 1, int((i + 0.5) * batches / wanted)) for i in range(wanted)})


def memory_method(device: str) -> str | None:
    """What the peak memory column reads on ``device``; None where it is not measured."""
    kind = torch.device(device).type
    return {"cuda": "CUDA allocator", "cpu": "CPU allocator (profiler memory events)"}.get(kind)


def measure_costs(
    model: nn.Module,
    pipelines: Sequence[tuple[str, Pipeline | PreparedPipeline]],
    batches: Sequence[Batch],
    *,
    warmup: int,
    repeats: int,
    memory: bool,
    device: str,
    plugins: PluginManager,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, CostResult]:
    """Latency (round-robin over ``pipelines``) and peak memory of each pipeline on ``batches``.

    Args:
        model: The model (no pipeline applied).
        pipelines: ``(name, pipeline)`` pairs.
        batches: The timing batches, the same for every pipeline.
        warmup: Untimed rounds first.
        repeats: Timed rounds.
        memory: Measure peak memory too (one more forward per pipeline and batch).
        device: The model's device.
        plugins: The plugin manager.
        progress: ``progress(done, total)`` after every forward round of a pipeline.
    """
    by_name = {name: prepare(pipe, plugins=plugins) for name, pipe in pipelines}  # once, not per round
    plan = schedule(list(by_name), warmup, repeats)
    total = len(plan) + (len(by_name) if memory else 0)
    examples = sum(int(b["input_ids"].shape[0]) for b in batches)
    forward = prefill_call(model)
    samples: dict[str, list[float]] = {name: [] for name in by_name}
    for step, (rnd, name) in enumerate(plan, start=1):
        with apply(model, by_name[name], plugins=plugins):
            seconds = sum(time_call(lambda b=b: forward(b), warmup=0, repeats=1, device=device).median for b in batches)
        if rnd >= warmup:
            samples[name].append(seconds / max(1, examples))
        if progress is not None:
            progress(step, total)
    peaks: dict[str, int | None] = dict.fromkeys(by_name)
    if memory:
        for step, name in enumerate(by_name, start=len(plan) + 1):
            with apply(model, by_name[name], plugins=plugins):
                values = [allocated_peak_bytes(lambda b=b: forward(b), device) for b in batches]
            peaks[name] = None if any(v is None for v in values) else max(v for v in values if v is not None)
            if progress is not None:
                progress(step, total)
    return {name: CostResult(tuple(samples[name]), peaks[name], examples) for name in by_name}


def prefill_call(model: nn.Module) -> Callable[[Batch], Any]:
    """One prefill forward, as ``generate`` makes it: a fresh cache, the last position's logits only."""
    extra: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1

    def call(batch: Batch) -> None:
        with torch.inference_mode():
            model(**batch, **extra)

    return call


def allocated_peak_bytes(fn: Callable[[], Any], device: str) -> int | None:
    """Peak tensor memory that ``fn()`` allocated above what was allocated before; None if not measurable."""
    kind = torch.device(device).type
    if kind == "cuda":
        return peak_memory_bytes(fn, device=device)[0]
    if kind != "cpu":
        return None
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler otherwise prints a line per start and stop
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    except AttributeError:  # a torch without the kineto results: not measured
        return None
    changes = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"), key=lambda c: c[0])
    return running_peak(n for _, n in changes)


def running_peak(changes: Iterable[int]) -> int:
    """The highest running total of allocation (+) and free (-) sizes, starting from zero."""
    level = peak = 0
    for n in changes:
        level += n
        peak = max(peak, level)
    return peak


__all__ = [
    "CostResult",
    "allocated_peak_bytes",
    "measure_costs",
    "memory_method",
    "prefill_call",
    "running_peak",
    "schedule",
    "timing_batch_indices",
]
