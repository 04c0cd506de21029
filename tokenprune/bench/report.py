"""Summaries of a comparison: ``summary.csv``, ``summary.json``, ``report.md`` and ``pareto.png``.

Each is written to a temporary file and moved into place, so a report is never left truncated.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from statistics import fmean
from typing import Any

from tokenprune.bench.config import REFERENCE, CompareConfig, pipeline_key
from tokenprune.bench.pareto import pareto_plot
from tokenprune.bench.records import CostRecord, ResultRecord, Summary, as_costs, as_results
from tokenprune.bench.significance import markdown_sections, significance
from tokenprune.bench.store import ResultsStore
from tokenprune.cost.measure import Timing
from tokenprune.pipeline import Pipeline

COLUMNS = [
    "rank",
    "pipeline",
    "n",
    "accuracy",
    "vqa_score",
    "agreement",
    "kl",
    "gflops",
    "flops_reduction",
    "visual_tokens",
    "prefill_ms",
    "prefill_ms_spread",
    "kv_mib",
    "peak_memory_mib",
]
METRICS = ("accuracy", "vqa_score", "agreement", "kl")
TASK_METRICS = ("accuracy", "agreement")
"""The metrics that get a column per task when a comparison has several tasks."""


def columns(tasks: list[str], metrics: Sequence[str] = METRICS) -> list[str]:
    """The table's columns: :data:`COLUMNS`, then ``accuracy:<task>``, ``agreement:<task>`` per task if several.

    ``metrics``: the metrics reported (``CompareConfig.metrics``); the columns of the others are left out.
    """
    kept = [c for c in COLUMNS if c not in METRICS or c in metrics]
    if len(tasks) < 2:
        return kept
    return kept + [f"{metric}:{task}" for task in tasks for metric in TASK_METRICS if metric in metrics]


def _is_metric(column: str) -> bool:
    return column.split(":")[0] in METRICS


def csv_columns(tasks: list[str], baseline: str | None = None, metrics: Sequence[str] = METRICS) -> list[str]:
    """``summary.csv``'s columns: :func:`columns` with ``<metric>_lo``, ``<metric>_hi`` after every metric column,
    then the rank range, the tier and the paired differences (to the reference ``unpruned``, the baseline, random)."""
    out = []
    for column in columns(tasks, metrics):
        out.append(column)
        if _is_metric(column):
            out += [f"{column}_lo", f"{column}_hi"]
    out += ["rank_range", "tier"]
    for tag in ("reference", "baseline") if baseline else ("reference",):
        out += [f"vs_{tag}", f"vs_{tag}_lo", f"vs_{tag}_hi", f"vs_{tag}_p", f"vs_{tag}_p_holm"]
    return [*out, "vs_random"]


def summarize(
    records: Iterable[ResultRecord | Mapping[str, Any]],
    names: list[str],
    tasks: list[str] | None = None,
    timings: Iterable[CostRecord | Mapping[str, Any]] = (),
    reference: str = REFERENCE,
    metrics: Sequence[str] = METRICS,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, dict[str, float]]]]:
    """Per-pipeline rows (ranked) and per-task, per-group accuracy, from the result records of one run.

    With several tasks, a row's ``accuracy``, ``vqa_score``, ``agreement`` and ``kl`` are the means
    over the tasks (each task counts once, whatever its size), and ``row["tasks"][task]`` holds each
    task's own; the cost columns are means over all examples. Rows are ranked by accuracy (agreement
    where no task has labels), ties by agreement, then KL, then GFLOPs.

    Args:
        records: Results (``task``: the task's label in this report); stored lines (mappings) are read as
            :class:`~tokenprune.bench.records.ResultRecord`.
        names: Pipelines, in config order.
        tasks: Task labels in config order (default: as they first appear in ``records``).
        timings: Cost-pass lines (``pipeline``, ``task``, ``prefill_seconds``, ``examples``,
            ``peak_memory_bytes``); the last one per pipeline and task counts.
        reference: The unpruned pipeline's name.
        metrics: The metrics reported (``CompareConfig.metrics``); the others are ``None`` in every row.
    """
    by_pipe: dict[str, list[ResultRecord]] = defaultdict(list)
    for r in as_results(records):
        by_pipe[r.pipeline].append(r)
    labels = tasks if tasks is not None else list(dict.fromkeys(r.task for rs in by_pipe.values() for r in rs))
    latest = {(t.pipeline, t.task): t for t in as_costs(timings)}
    ref_macs = _mean(by_pipe[reference], "macs") if by_pipe.get(reference) else None
    rows = []
    for name in names:
        rs = by_pipe.get(name, [])
        if rs:
            cost = [latest[(name, t)] for t in labels if (name, t) in latest]
            rows.append(_row(name, rs, labels, cost, ref_macs, name == reference, metrics))
    _rank(rows)
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for task in labels:
        per_pipe: dict[str, dict[str, float]] = {}
        for name in names:
            per: dict[str, list[float]] = defaultdict(list)
            for r in by_pipe.get(name, []):
                if r.task == task and r.accuracy is not None:
                    per[r.group].append(r.accuracy)
            if per:
                per_pipe[name] = {g: fmean(v) for g, v in sorted(per.items())}
        if per_pipe:
            groups[task] = per_pipe
    return rows, groups


def _row(
    name: str,
    rs: list[ResultRecord],
    tasks: list[str],
    cost: list[CostRecord],
    ref_macs: float | None,
    is_reference: bool,
    metrics: Sequence[str],
) -> dict[str, Any]:
    """One pipeline's row: metrics per task and over tasks, analytic costs, the cost pass's columns."""
    per_task: dict[str, dict[str, Any]] = {}
    for task in tasks:
        mine = [r for r in rs if r.task == task]
        if mine:
            per_task[task] = {
                "n": len(mine),
                **{m: _metric(mine, m, is_reference) if m in metrics else None for m in METRICS},
            }
    macs, kv = _mean(rs, "macs"), _mean(rs, "kv_bytes")  # None: costs not recorded (an lmms-eval run without them)
    row: dict[str, Any] = {
        "pipeline": name,
        "n": len(rs),
        **{m: _mean_of([t[m] for t in per_task.values()]) for m in METRICS},
        "gflops": None if macs is None else 2 * macs / 1e9,
        "flops_reduction": None if ref_macs is None or macs is None else 1 - macs / ref_macs,
        "visual_tokens": _mean(rs, "visual_tokens"),
        "kv_mib": None if kv is None else kv / 2**20,
        **_cost_columns(cost),
        "tasks": per_task,
    }
    if len(tasks) > 1:
        for task, values in per_task.items():
            row.update({f"{m}:{task}": values[m] for m in TASK_METRICS})
    return row


def _cost_columns(cost: list[CostRecord]) -> dict[str, Any]:
    """``prefill_ms`` (median over the timed rounds, per example) and its spread; peak memory (MiB).

    With several tasks, a round's sample is the seconds per example over all their timing batches.
    """
    out: dict[str, Any] = {"prefill_ms": None, "prefill_ms_spread": None, "peak_memory_mib": None, "memory": None}
    rounds = min((len(c.prefill_seconds) for c in cost), default=0)
    if rounds:
        examples = sum(c.examples for c in cost)
        samples = [sum(c.prefill_seconds[i] * c.examples for c in cost) / examples for i in range(rounds)]
        timing = Timing(tuple(samples))
        out["prefill_ms"], out["prefill_ms_spread"] = 1000 * timing.median, 1000 * timing.spread
    peaks = [c.peak_memory_bytes for c in cost]
    if peaks and all(p is not None for p in peaks):
        out["peak_memory_mib"] = max(p for p in peaks if p is not None) / 2**20
        out["memory"] = cost[0].memory
    return out


def _metric(records: list[ResultRecord], key: str, is_reference: bool) -> float | None:
    if is_reference and key in ("agreement", "kl"):
        return 1.0 if key == "agreement" else 0.0
    return _mean(records, key)


def _rank(rows: list[dict[str, Any]]) -> None:
    """Rank in place: accuracy (or agreement) down, then agreement down, KL up, GFLOPs up."""
    key = "accuracy" if any(row["accuracy"] is not None for row in rows) else "agreement"

    def order(row: dict[str, Any]) -> tuple[float, float, float, float]:
        kl = row["kl"] if row["kl"] is not None else math.inf
        return (-_or(row[key], -1.0), -_or(row["agreement"], -1.0), kl, _or(row["gflops"], math.inf))

    rows.sort(key=order)
    for i, row in enumerate(rows, start=1):
        row["rank"] = i


def write_reports(config: CompareConfig, pipelines: list[tuple[str, Pipeline]], store: ResultsStore) -> Summary:
    """Write the summary files of the current config's results into ``config.output``; return the summary."""
    tasks = task_labels(config.tasks)
    keys = {
        pipeline_key(name, pipe, config, spec): (name, label)
        for spec, label in zip(config.tasks, tasks, strict=True)
        for name, pipe in pipelines
    }
    dropped = {m: None for m in METRICS if m not in config.metrics}  # stored, not reported
    records = [replace(r, task=keys[r.key][1], **dropped) for r in store.results() if r.key in keys]
    timings = [
        replace(t, task=keys[t.key][1]) for t in ResultsStore(store.folder, "timings.jsonl").costs() if t.key in keys
    ]
    rows, groups = summarize(records, [n for n, _ in pipelines], tasks, timings, metrics=config.metrics)
    stats = significance(
        records, rows, tasks, REFERENCE, baseline=config.baseline, seed=config.seed, resamples=config.resamples
    )
    head = {"config": config.model_dump(mode="json"), "config_hash": config.digest()}
    markdown = report_markdown(config, rows, groups, tasks, stats)
    return write_summary(config.output, head, rows, groups, tasks, stats, markdown, config.metrics)


def write_summary(
    out: Path,
    head: dict[str, Any],
    rows: list[dict[str, Any]],
    groups: dict[str, dict[str, dict[str, float]]],
    tasks: list[str],
    stats: dict[str, Any],
    markdown: str,
    metrics: Sequence[str] = METRICS,
) -> Summary:
    """Write ``summary.csv``, ``summary.json`` (``head`` first), ``report.md`` and ``pareto.png``.

    ``metrics``: the metrics reported; ``summary.csv`` leaves out the others' columns.

    Returns:
        The summary written to ``summary.json``.
    """
    out.mkdir(parents=True, exist_ok=True)
    fields = csv_columns(tasks, stats.get("baseline"), metrics)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows({k: row.get(k) for k in fields} for row in rows)
    _atomic_write(out / "summary.csv", buffer.getvalue())
    summary = Summary(head, tasks, rows, groups, stats)
    _atomic_write(out / "summary.json", json.dumps(summary.to_json(), indent=2, default=str) + "\n")
    _atomic_write(out / "report.md", markdown)
    if any(r["gflops"] is not None for r in rows):
        pareto_plot(rows, out / "pareto.png", stats)
    return summary


def task_labels(specs: list[dict[str, Any]]) -> list[str]:
    """A label per task entry: its name, ``name#2``, ``name#3`` ... for a name that comes again."""
    seen: dict[str, int] = defaultdict(int)
    labels = []
    for spec in specs:
        name = str(spec.get("name"))
        seen[name] += 1
        labels.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return labels


def report_markdown(
    config: CompareConfig,
    rows: list[dict[str, Any]],
    groups: dict[str, dict[str, dict[str, float]]],
    tasks: list[str] | None = None,
    stats: dict[str, Any] | None = None,
    header: list[str] | None = None,
) -> str:
    """The comparison as markdown: the generated findings, the ranked table, per-group tables, seeds, matched budgets.

    ``stats``: :func:`~tokenprune.bench.significance.significance`'s output (intervals in every cell);
    ``header``: lines that replace the config's description and cost-pass legend (``tokenprune report``).
    """
    tasks = tasks if tasks is not None else task_labels(config.tasks)
    fields = columns(tasks, config.metrics)
    extra = _stat_columns(stats)
    intro = (
        header
        if header is not None
        else [
            f"Model `{config.model}` ({config.dtype}, {config.device}), tasks: {', '.join(tasks)}, seed {config.seed}, "
            f"config hash `{config.digest()}`.",
            "",
            *_legend(config, rows, tasks),
        ]
    )
    lines = ["# tokenprune comparison", ""]
    if stats is not None:
        lines += [" ".join(stats["findings"]), ""]
    lines += [*intro, *(_stats_legend(stats) if stats else []), ""]
    head = fields[:2] + extra[:2] + fields[2:] + extra[2:]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(row, c) for c in head) + " |" for row in rows]
    intervals = (stats or {}).get("group_intervals", {})
    for task, per_pipe in groups.items():
        names = sorted({g for per in per_pipe.values() for g in per})
        title = "## Accuracy per group" + (f": {task}" if len(tasks) > 1 else "")
        lines += ["", title, "", "| pipeline | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for row in rows:
            per = per_pipe.get(row["pipeline"], {})
            ci = intervals.get(task, {}).get(row["pipeline"], {})
            lines.append(f"| {row['pipeline']} | " + " | ".join(_with_ci(per.get(g), ci.get(g)) for g in names) + " |")
    if stats is not None:
        lines += markdown_sections(stats)
    if any(r["gflops"] is not None for r in rows):
        lines += ["", "![accuracy against FLOPs](pareto.png)"]
    return "\n".join([*lines, ""])


def _stat_columns(stats: dict[str, Any] | None) -> list[str]:
    """``rank range`` and ``tier`` (after the pipeline), then the paired differences (after every other column)."""
    if stats is None:
        return []
    out = ["rank_range", "tier", "vs_reference"]
    if stats.get("baseline"):
        out.append("vs_baseline")
    return [*out, "vs_random"]


def _stats_legend(stats: dict[str, Any]) -> list[str]:
    baseline = f" and `vs_baseline` (to `{stats['baseline']}`)" if stats.get("baseline") else ""
    return [
        "",
        "Intervals: 95%, over the examples: Wilson for a 0/1 rate on one task, else a percentile bootstrap "
        f"({stats['resamples']} resamples, seed {stats['seed']}, stratified by task). "
        f"`vs_reference` (to `{stats['reference']}`){baseline}: the paired difference in {stats['metric']} "
        "(points), its 95% paired-bootstrap interval and p-value (exact McNemar for 0/1 on one task, else the "
        "paired bootstrap's). `rank_range`: the ranks a pipeline takes in 95% of the resamples; `tier`: pipelines "
        "the paired test cannot separate from their tier's leader (the best left). `vs_random`: against every seed "
        "of `random` at the same keep (beats / worse / indistinguishable). docs/compare.md explains each statistic.",
    ]


def _cell(row: dict[str, Any], column: str) -> str:
    """A table cell: a metric with its interval, a paired difference with interval and p-value, else the value."""
    if _is_metric(column):
        lo, hi = row.get(f"{column}_lo"), row.get(f"{column}_hi")
        return _with_ci(row.get(column), None if lo is None or hi is None else [lo, hi], column)
    if column in ("vs_reference", "vs_baseline"):
        diff, lo, hi, p = (row.get(f"{column}{s}") for s in ("", "_lo", "_hi", "_p"))
        if diff is None or lo is None or hi is None or p is None:
            return "-"
        return f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] p={p:.2g}"
    return _fmt(row.get(column), column)


def _with_ci(value: float | None, interval: list[float] | None, column: str = "accuracy") -> str:
    if value is None or interval is None:
        return _fmt(value, column)
    if column.split(":")[0] == "kl":
        return f"{value:.4g} [{interval[0]:.3g}, {interval[1]:.3g}]"
    return f"{_fmt(value, column)} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _legend(config: CompareConfig, rows: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    timing = config.timing
    method = next((r["memory"] for r in rows if r.get("memory")), None)
    memory = (
        f"peak tensor memory of one timing batch's prefill above what was held before it ({method})"
        if method
        else "not measured on this device"
    )
    lines = [
        "GFLOPs: the language model's prefill per example (2 x MACs, analytic, the vision tower excluded since "
        "no pipeline changes it); reduction relative to `unpruned`. Agreement and KL compare with `unpruned`'s "
        "answer and first-token distribution. Ranked by accuracy, ties by agreement, then KL.",
        "",
        f"Cost pass, apart from the accuracy pass: {_count(timing.batches, 'batch', 'batches')} of up to "
        f"{config.batch_size} examples per task, {_count(timing.warmup, 'warm-up round', 'warm-up rounds')}, then "
        f"{_count(timing.repeats, 'timed round', 'timed rounds')}, each running every pipeline in turn. "
        "`prefill_ms`: the prefill forward (vision tower included) per example, median over the rounds; "
        "`prefill_ms_spread`: its interquartile range (max - min below four rounds). "
        f"`peak_memory_mib`: {memory}.",
    ]
    if len(tasks) > 1:
        lines += [
            "",
            f"Tasks: {', '.join(tasks)}. `accuracy`, `vqa_score`, `agreement` and `kl` are means over the tasks "
            "(each counts once); `accuracy:<task>` and `agreement:<task>` are each task's own.",
        ]
    return lines


def _mean(records: list[ResultRecord], key: str) -> float | None:
    values = [v for r in records if (v := getattr(r, key)) is not None]
    return fmean(values) if values else None


def _mean_of(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return fmean(present) if present else None


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _fmt(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column.split(":")[0] in ("accuracy", "vqa_score", "agreement", "flops_reduction"):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
