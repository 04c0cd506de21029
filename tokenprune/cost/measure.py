"""Latency, peak memory and KV-cache size of a model call.

Latency: warm-up calls, then repeats; median and spread. :func:`interleaved` times several
configurations round-robin (one call of each per round), so that a change in the machine's load
hits every configuration alike, and :func:`paired_ratio` compares two of them round by round.
On a GPU the time comes from CUDA events around each call (synchronised), on the CPU from
``time.perf_counter``. Peak memory: on a GPU,
``torch.cuda.max_memory_allocated`` above the memory held before the call; on Linux CPUs, the peak
resident set size above the size before the call, with the peak counter reset first through
``/proc/self/clear_refs`` (elsewhere: not measured, ``None``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenprune.engine import compat

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the measured repeats."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range (max - min below four samples)."""
        if len(self.samples) < 4:
            return max(self.samples) - min(self.samples)
        q = statistics.quantiles(self.samples, n=4)
        return q[2] - q[0]

    @property
    def relative_spread(self) -> float:
        """``(max - min) / median``: the whole range of the repeats, relative to their median."""
        return (max(self.samples) - min(self.samples)) / self.median

    @property
    def relative_iqr(self) -> float:
        """:attr:`spread` over the median: the interquartile range from four samples on, else the range."""
        return self.spread / self.median


@dataclass(frozen=True)
class Case:
    """One configuration for :func:`interleaved`.

    Attributes:
        name: Key of its :class:`Timing` in the result.
        call: The timed call.
        context: Entered around each timed call, outside the timing (e.g. installing a pipeline).
        self_timed: ``call`` returns its own measurement in seconds (e.g. per decoded token), which
            is used instead of the call's wall time.
    """

    name: str
    call: Callable[[], Any]
    context: Callable[[], AbstractContextManager[Any]] = field(default=contextlib.nullcontext)
    self_timed: bool = False


def interleaved(
    cases: Sequence[Case], *, rounds: int, warmup_rounds: int = 1, device: torch.device | str | None = None
) -> dict[str, Timing]:
    """Time every case once per round, round-robin, after ``warmup_rounds`` untimed rounds.

    Sample ``r`` of every case comes from round ``r``, so :func:`paired_ratio` can compare cases
    measured next to each other in time.

    Raises:
        ValueError: ``rounds < 1`` or two cases share a name.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be unique, got {names}")
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup_rounds + rounds):
        for case in cases:
            with case.context():
                if case.self_timed:
                    seconds = float(case.call())
                else:
                    seconds = time_call(case.call, warmup=0, repeats=1, device=device).samples[0]
            if r >= warmup_rounds:
                samples[case.name].append(seconds)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def paired_ratio(numerator: Timing, denominator: Timing) -> Timing:
    """Per-round ratios of two interleaved timings (median and spread of ``numerator[r] / denominator[r]``).

    Raises:
        ValueError: the timings have different numbers of samples.
    """
    if len(numerator.samples) != len(denominator.samples):
        raise ValueError(
            f"paired timings need as many samples each, got {len(numerator.samples)} and {len(denominator.samples)}"
        )
    return Timing(tuple(a / b for a, b in zip(numerator.samples, denominator.samples, strict=True)))


def time_call(
    fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, device: torch.device | str | None = None
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return Timing(tuple(samples))


def peak_memory_bytes(fn: Callable[[], Any], *, device: torch.device | str | None = None) -> tuple[int | None, Any]:
    """Peak memory that ``fn()`` added above what was held before it; returns ``(bytes or None, output)``."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, out
    if not (_STATUS.exists() and _CLEAR_REFS.exists()):
        return None, fn()
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
    except OSError:
        return None, fn()
    before = _status_kib("VmRSS")
    out = fn()
    return max(0, _status_kib("VmHWM") - before) * 1024, out


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in {_STATUS}")


def kv_cache_bytes(cache: Any) -> list[int]:
    """Bytes held by each layer's keys and values in a transformers cache (``DynamicCache`` and kin)."""
    return [sum(t.numel() * t.element_size() for t in layer if t is not None) for layer in compat.cache_layers(cache)]


def kv_cache_tokens(cache: Any) -> list[int]:
    """Sequence length held by each layer's keys (the tokens that layer cached)."""
    return [int(keys.shape[-2]) if keys is not None else 0 for keys, _ in compat.cache_layers(cache)]
