"""Intervals, paired differences, rank ranges and tiers for the rows of a comparison.

:func:`analyze` takes the per-example result records of a run (the same records
:func:`tokenprune.bench.report.summarize` ranks) and adds to each row, for every metric column, a
95% interval (``<column>_lo`` / ``<column>_hi``), and for the ranking metric the paired difference to
the reference (and to a ``baseline:`` pipeline) with its interval and p-value, a rank range and a
tier. The statistics themselves are in :mod:`tokenprune.bench.stats`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenprune.bench.records import ResultRecord, as_results
from tokenprune.bench.stats import (
    LEVEL,
    RESAMPLES,
    Bootstrap,
    bootstrap_p_value,
    holm,
    is_binary,
    mcnemar_exact,
    percentile_interval,
    rank_ranges,
    tiers,
    wilson_interval,
)

METRICS = ("accuracy", "vqa_score", "agreement", "kl")
RATES = ("accuracy", "vqa_score", "agreement")
"""Metrics that are a rate when every value is 0 or 1 (Wilson, McNemar); KL is never one."""
ALPHA = 1 - LEVEL


@dataclass
class TaskData:
    """One task's per-example values: ``values[metric]`` ``(P, n)`` (NaN: missing), aligned on ``ids``."""

    label: str
    ids: list[str]
    groups: list[str]
    values: dict[str, np.ndarray]
    boot: Bootstrap


@dataclass
class Analysis:
    """Every pipeline's resampled metrics, and how to test two of them against each other.

    Attributes:
        names: Pipelines, in the order of the rows of every array.
        tasks: Per task, its aligned values and resampling weights.
        samples: Metric to ``(P, B)`` resampled values of the row's metric (the mean over tasks).
        points: Metric to ``(P,)`` point estimates (the same mean over tasks).
        resamples: ``B``.
        seed: The seed of the resampling.
    """

    names: list[str]
    tasks: list[TaskData]
    samples: dict[str, np.ndarray]
    points: dict[str, np.ndarray]
    resamples: int
    seed: int
    _p_cache: dict[tuple[str, int, int], float] = field(default_factory=dict)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def interval(self, metric: str, i: int) -> tuple[float, float]:
        """95% interval of pipeline ``i``'s ``metric``: Wilson for a 0/1 metric of one task, else the bootstrap's."""
        single = self._single_binary(metric, i)
        if single is not None:
            return wilson_interval(*single)
        return percentile_interval(self.samples[metric][i])

    def task_interval(self, metric: str, i: int, t: int) -> tuple[float, float]:
        """95% interval of pipeline ``i``'s ``metric`` on task ``t`` alone."""
        row = self.tasks[t].values[metric][i]
        if np.isnan(row).all():
            return (math.nan, math.nan)
        if metric in RATES and is_binary(row):
            present = row[~np.isnan(row)]
            return wilson_interval(int(present.sum()), int(present.size))
        return percentile_interval(self.tasks[t].boot.means(row)[0])

    def difference(self, metric: str, i: int, j: int) -> dict[str, float]:
        """``i`` minus ``j`` on ``metric``: the difference, its 95% paired-bootstrap interval, the p-value."""
        diff = self.samples[metric][i] - self.samples[metric][j]
        lo, hi = percentile_interval(diff)
        return {
            "diff": float(self.points[metric][i] - self.points[metric][j]),
            "lo": lo,
            "hi": hi,
            "p": self.p_value(metric, i, j),
        }

    def p_value(self, metric: str, i: int, j: int) -> float:
        """Exact McNemar for a 0/1 metric on one task; else the paired bootstrap's p-value."""
        key = (metric, min(i, j), max(i, j))
        if key not in self._p_cache:
            self._p_cache[key] = self._p_value(metric, i, j)
        return self._p_cache[key]

    def _p_value(self, metric: str, i: int, j: int) -> float:
        if len(self.tasks) == 1:
            values = self.tasks[0].values[metric]
            both = ~np.isnan(values[i]) & ~np.isnan(values[j])
            if metric in RATES and both.any() and is_binary(values[i]) and is_binary(values[j]):
                return mcnemar_exact(values[i][both], values[j][both])
        return bootstrap_p_value(self.samples[metric][i] - self.samples[metric][j])

    def distinct(self, metric: str, i: int, j: int) -> bool:
        """Whether the paired test separates ``i`` and ``j`` at the 5% level."""
        p = self.p_value(metric, i, j)
        return not math.isnan(p) and p < ALPHA

    def _single_binary(self, metric: str, i: int) -> tuple[int, int] | None:
        if len(self.tasks) != 1 or metric not in RATES:
            return None
        row = self.tasks[0].values[metric][i]
        present = row[~np.isnan(row)]
        if present.size == 0 or not is_binary(row):
            return None
        return int(present.sum()), int(present.size)


def collect(
    records: Iterable[ResultRecord | Mapping[str, Any]],
    names: list[str],
    tasks: list[str],
    reference: str,
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> Analysis:
    """Align the records per task on example ids and draw each task's resampling weights.

    The reference's ``agreement`` and ``kl`` are 1 and 0 by definition (it is what they compare with).
    """
    by_task: dict[str, dict[str, dict[str, ResultRecord]]] = defaultdict(lambda: defaultdict(dict))
    for r in as_results(records):
        by_task[r.task][r.pipeline][str(r.id)] = r
    data = []
    for position, label in enumerate(tasks):
        per_pipe = by_task.get(label, {})
        ids = sorted({i for name in names for i in per_pipe.get(name, {})}, key=_natural)
        if not ids:
            continue
        groups = [_group(per_pipe, names, i) for i in ids]
        values = {m: _matrix(per_pipe, names, ids, m, reference) for m in METRICS}
        # seeded by the task's position, not its label: the same examples resample the same under another name
        boot = Bootstrap.draw(len(ids), resamples, seed, str(position))
        data.append(TaskData(label, ids, groups, values, boot))
    samples, points = {}, {}
    for m in METRICS:
        samples[m], points[m] = _over_tasks(data, m, len(names), resamples)
    return Analysis(names, data, samples, points, resamples, seed)


def _natural(example: str) -> tuple[int, int, str]:
    """Sort key of an example id: numbers by value (lmms-eval's ``doc_id`` 2 before 10), then other ids as text.

    The resampling weights follow this order, so two runs over the same examples (a comparison and
    the lmms-eval runs of the same documents, in the same order) resample the same examples.
    """
    return (0, int(example), "") if example.isdigit() else (1, 0, example)


def _group(per_pipe: dict[str, dict[str, ResultRecord]], names: list[str], example: str) -> str:
    for name in names:
        record = per_pipe.get(name, {}).get(example)
        if record is not None:
            return str(record.group)
    return "all"


def _matrix(
    per_pipe: dict[str, dict[str, ResultRecord]], names: list[str], ids: list[str], metric: str, reference: str
) -> np.ndarray:
    out = np.full((len(names), len(ids)), np.nan)
    for p, name in enumerate(names):
        mine = per_pipe.get(name, {})
        for k, example in enumerate(ids):
            record = mine.get(example)
            if record is None:
                continue
            if name == reference and metric in ("agreement", "kl"):
                out[p, k] = 1.0 if metric == "agreement" else 0.0
            elif (value := record.metric(metric)) is not None:
                out[p, k] = float(value)
    return out


def _over_tasks(data: list[TaskData], metric: str, count: int, resamples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(P, B)`` resampled and ``(P,)`` point means over the tasks a pipeline has values on (each task counts once)."""
    total_s, total_p = np.zeros((count, resamples)), np.zeros(count)
    tasks_with = np.zeros(count)
    for task in data:
        values = task.values[metric]
        has = ~np.isnan(values).all(axis=1)
        with np.errstate(invalid="ignore"):
            point = np.nanmean(np.where(has[:, None], values, 0.0), axis=1)
        total_s += np.where(has[:, None], np.nan_to_num(task.boot.means(values)), 0.0)
        total_p += np.where(has, point, 0.0)
        tasks_with += has
    with np.errstate(invalid="ignore", divide="ignore"):
        return total_s / tasks_with[:, None], total_p / tasks_with


def annotate(
    rows: list[dict[str, Any]],
    analysis: Analysis,
    key: str,
    tasks: list[str],
    reference: str,
    baseline: str | None = None,
) -> None:
    """Add intervals, paired differences (``vs_<other>_*``), ``rank_range`` and ``tier`` to ``rows`` in place.

    ``key``: the ranking metric (accuracy, or agreement without labels); rows are in rank order.
    """
    order = [analysis.index(r["pipeline"]) for r in rows]
    _intervals(rows, analysis, order, several_tasks=len(tasks) > 1)
    for other, tag in [(reference, "reference")] + ([(baseline, "baseline")] if baseline else []):
        if other in analysis.names:
            _paired(rows, analysis, order, key, analysis.index(other), tag)
    ranges = rank_ranges(analysis.samples[key][order], higher_is_better=True)
    distinct = np.array([[analysis.distinct(key, a, b) if a != b else False for b in order] for a in order])
    tier = tiers(list(range(len(order))), distinct)
    for row, (lo, hi), t in zip(rows, ranges, tier, strict=True):
        row["rank_range"] = f"{lo}-{hi}" if lo != hi else str(lo)
        row["tier"] = t


def _intervals(rows: list[dict[str, Any]], analysis: Analysis, order: list[int], several_tasks: bool) -> None:
    """``<metric>_lo`` / ``_hi`` for every metric, and per task (``accuracy:<task>_lo``) when there are several."""
    for row, i in zip(rows, order, strict=True):
        for m in METRICS:
            lo, hi = analysis.interval(m, i) if row.get(m) is not None else (None, None)
            row[f"{m}_lo"], row[f"{m}_hi"] = _clean(lo), _clean(hi)
        if several_tasks:
            for t, task in enumerate(analysis.tasks):
                for m in ("accuracy", "agreement"):
                    lo, hi = analysis.task_interval(m, i, t)
                    row[f"{m}:{task.label}_lo"], row[f"{m}:{task.label}_hi"] = _clean(lo), _clean(hi)


def _paired(rows: list[dict[str, Any]], analysis: Analysis, order: list[int], key: str, j: int, tag: str) -> None:
    """``vs_<tag>``, its interval, p-value and Holm-adjusted p-value against pipeline ``j`` (``None`` for ``j``)."""
    diffs = [analysis.difference(key, i, j) if i != j else None for i in order]
    adjusted = holm([d["p"] if d else math.nan for d in diffs])
    for row, d, p_adj in zip(rows, diffs, adjusted, strict=True):
        row.update({f"vs_{tag}{s}": None for s in ("", "_lo", "_hi", "_p", "_p_holm")})
        if d is not None:
            values = (d["diff"], _clean(d["lo"]), _clean(d["hi"]), _clean(d["p"]), _clean(p_adj))
            row.update(dict(zip((f"vs_{tag}{s}" for s in ("", "_lo", "_hi", "_p", "_p_holm")), values, strict=True)))


def group_intervals(analysis: Analysis, metric: str = "accuracy") -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per task, pipeline and group: the 95% interval of ``metric`` (Wilson for 0/1, else the bootstrap's)."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for t, task in enumerate(analysis.tasks):
        labels = np.array(task.groups)
        per_pipe: dict[str, dict[str, list[float]]] = {}
        for i, name in enumerate(analysis.names):
            row = task.values[metric][i]
            per = {}
            for g in sorted(set(task.groups)):
                values = row[(labels == g) & ~np.isnan(row)]
                if values.size:
                    per[g] = _group_interval(values, analysis, f"{t}/{g}")
            if per:
                per_pipe[name] = per
        if per_pipe:
            out[task.label] = per_pipe
    return out


def _group_interval(values: np.ndarray, analysis: Analysis, stream: str) -> list[float]:
    if is_binary(values):
        return list(wilson_interval(int(values.sum()), int(values.size)))
    boot = Bootstrap.draw(values.size, analysis.resamples, analysis.seed, stream)
    return list(percentile_interval(boot.means(values)[0]))


def _clean(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


__all__ = ["Analysis", "TaskData", "annotate", "collect", "group_intervals"]
