"""Summaries of a comparison: ``summary.csv``, ``summary.json``, ``report.md`` and ``pareto.png``.

Each is written to a temporary file and moved into place, so a report is never left truncated.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from statistics import fmean
from typing import Any

from tokenprune.bench.config import REFERENCE, CompareConfig, pipeline_key
from tokenprune.bench.store import ResultsStore
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
    "kv_mib",
    "peak_memory_mib",
]


def summarize(
    records: Iterable[dict[str, Any]], names: list[str], reference: str = REFERENCE
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Per-pipeline rows (ranked) and per-group accuracy, from result records of one run."""
    by_pipe: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_pipe[r["pipeline"]].append(r)
    ref_macs = fmean(r["macs"] for r in by_pipe[reference]) if by_pipe.get(reference) else None
    rows = []
    for name in names:
        rs = by_pipe.get(name, [])
        if not rs:
            continue
        macs = fmean(r["macs"] for r in rs)
        peaks = [r["peak_memory_bytes"] for r in rs if r.get("peak_memory_bytes") is not None]
        rows.append(
            {
                "pipeline": name,
                "n": len(rs),
                "accuracy": _mean(rs, "accuracy"),
                "vqa_score": _mean(rs, "vqa_score"),
                "agreement": 1.0 if name == reference else _mean(rs, "agreement"),
                "kl": 0.0 if name == reference else _mean(rs, "kl"),
                "gflops": 2 * macs / 1e9,
                "flops_reduction": None if ref_macs is None else 1 - macs / ref_macs,
                "visual_tokens": fmean(r["visual_tokens"] for r in rs),
                "prefill_ms": 1000 * fmean(r["prefill_seconds"] for r in rs),
                "kv_mib": fmean(r["kv_bytes"] for r in rs) / 2**20,
                "peak_memory_mib": max(peaks) / 2**20 if peaks else None,
            }
        )
    key = "accuracy" if any(row["accuracy"] is not None for row in rows) else "agreement"
    rows.sort(key=lambda row: (-(row[key] if row[key] is not None else -1.0), row["gflops"]))
    for i, row in enumerate(rows, start=1):
        row["rank"] = i
    groups: dict[str, dict[str, float]] = {}
    for name in names:
        per: dict[str, list[float]] = defaultdict(list)
        for r in by_pipe.get(name, []):
            if "accuracy" in r:
                per[r["group"]].append(r["accuracy"])
        if per:
            groups[name] = {g: fmean(v) for g, v in sorted(per.items())}
    return rows, groups


def write_reports(config: CompareConfig, pipelines: list[tuple[str, Pipeline]], store: ResultsStore) -> None:
    """Write the summary files of the current config's results into ``config.output``."""
    keys = {pipeline_key(name, pipe, config, task): name for task in config.tasks for name, pipe in pipelines}
    records = [r for r in store.records() if r["key"] in keys]
    names = [n for n, _ in pipelines]
    rows, groups = summarize(records, names)
    out = config.output
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({k: row.get(k) for k in COLUMNS} for row in rows)
    _atomic_write(out / "summary.csv", buffer.getvalue())
    summary = {
        "config": config.model_dump(mode="json"),
        "config_hash": config.digest(),
        "pipelines": rows,
        "groups": groups,
    }
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    _atomic_write(out / "report.md", report_markdown(config, rows, groups))
    if rows:
        pareto_plot(rows, out / "pareto.png")


def report_markdown(config: CompareConfig, rows: list[dict[str, Any]], groups: dict[str, dict[str, float]]) -> str:
    """The comparison as markdown tables: overall (ranked) and per group."""
    tasks = ", ".join(t["name"] for t in config.tasks)
    lines = [
        "# tokenprune comparison",
        "",
        f"Model `{config.model}` ({config.dtype}, {config.device}), tasks: {tasks}, seed {config.seed}, "
        f"config hash `{config.digest()}`.",
        "",
        "GFLOPs: the language model's prefill per example (2 x MACs, analytic, the vision tower excluded since "
        "no pipeline changes it); reduction relative to `unpruned`. Agreement and KL compare with `unpruned`'s "
        "answer and first-token distribution.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_fmt(row.get(c), c) for c in COLUMNS) + " |" for row in rows]
    if groups:
        names = sorted({g for per in groups.values() for g in per})
        lines += [
            "",
            "## Accuracy per group",
            "",
            "| pipeline | " + " | ".join(names) + " |",
            "|" + "---|" * (len(names) + 1),
        ]
        for row in rows:
            per = groups.get(row["pipeline"], {})
            lines.append(f"| {row['pipeline']} | " + " | ".join(_fmt(per.get(g), "accuracy") for g in names) + " |")
    lines += ["", "![accuracy against FLOPs](pareto.png)", ""]
    return "\n".join(lines)


def pareto_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (or agreement) against GFLOPs, one line per reducer, the unpruned model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "accuracy" if any(r["accuracy"] is not None for r in rows) else "agreement"
    families: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["pipeline"] != REFERENCE and r[metric] is not None:
            families[r["pipeline"].rsplit("-", 1)[0]].append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for family, points in sorted(families.items()):
        points.sort(key=lambda r: r["gflops"])
        ax.plot([p["gflops"] for p in points], [p[metric] for p in points], marker="o", label=family)
    ref = next((r for r in rows if r["pipeline"] == REFERENCE), None)
    if ref is not None and ref[metric] is not None:
        ax.scatter([ref["gflops"]], [ref[metric]], marker="*", s=200, color="black", label=REFERENCE, zorder=5)
    ax.set_xlabel("language-model prefill GFLOPs per example")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return fmean(values) if values else None


def _fmt(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column in ("accuracy", "vqa_score", "agreement", "flops_reduction"):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
