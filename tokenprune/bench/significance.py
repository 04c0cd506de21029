"""What a comparison's numbers can and cannot say: the statistics of a report, and their prose.

:func:`significance` runs every statistic of :mod:`tokenprune.bench.uncertainty` and
:mod:`tokenprune.bench.budgets` over a run's records, annotates the summary rows in place, and
returns the rest (group intervals, seed groups, matched budgets, the generated paragraph) for
``summary.json`` and ``report.md``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from tokenprune.bench.budgets import (
    FLOPS_TARGETS,
    TOKEN_TARGETS,
    label,
    matched_budgets,
    parse_name,
    seed_summary,
    significant,
    versus_random,
)
from tokenprune.bench.records import ResultRecord
from tokenprune.bench.stats import LEVEL
from tokenprune.bench.uncertainty import annotate, collect, group_intervals

SMALL = 100
"""Below this many examples per task, the report warns that small differences cannot be separated."""


def ranking_metric(rows: list[dict[str, Any]]) -> str:
    """``accuracy`` when any row has it, else ``agreement`` (a task without labels)."""
    return "accuracy" if any(r.get("accuracy") is not None for r in rows) else "agreement"


def significance(
    records: Iterable[ResultRecord | Mapping[str, Any]],
    rows: list[dict[str, Any]],
    tasks: list[str],
    reference: str,
    *,
    baseline: str | None = None,
    seed: int = 0,
    resamples: int = 2000,
) -> dict[str, Any]:
    """Annotate ``rows`` (ranked, from :func:`~tokenprune.bench.report.summarize`); return the report's statistics."""
    names = [r["pipeline"] for r in rows]
    key = ranking_metric(rows)
    analysis = collect(records, names, tasks, reference, seed=seed, resamples=resamples)
    annotate(rows, analysis, key, tasks, reference, baseline)
    verdicts = versus_random(analysis, key, names)
    for row in rows:
        row["vs_random"] = verdicts.get(row["pipeline"])
    smallest = min((len(t.ids) for t in analysis.tasks), default=0)
    out: dict[str, Any] = {
        "level": LEVEL,
        "resamples": resamples,
        "seed": seed,
        "metric": key,
        "reference": reference,
        "baseline": baseline,
        "examples_per_task": {t.label: len(t.ids) for t in analysis.tasks},
        "group_intervals": group_intervals(analysis),
        "seeds": seed_summary(analysis, key, names),
        "matched_budgets": matched_budgets(analysis, key, rows, reference),
    }
    out["findings"] = findings(rows, out, key, reference, baseline, smallest)
    return out


def findings(
    rows: list[dict[str, Any]],
    stats: dict[str, Any],
    key: str,
    reference: str,
    baseline: str | None,
    smallest: int,
) -> list[str]:
    """The generated paragraph: which differences are significant, per budget, and a warning for small samples."""
    lines = []
    tested = [r for r in rows if r["pipeline"] != reference and r.get("vs_reference_p") is not None]
    worse = [r["pipeline"] for r in tested if significant(r["vs_reference_p"]) and r["vs_reference"] < 0]
    better = [r["pipeline"] for r in tested if significant(r["vs_reference_p"]) and r["vs_reference"] > 0]
    same = [r["pipeline"] for r in tested if not significant(r["vs_reference_p"])]
    plural = "" if len(tested) == 1 else "s"
    lines.append(
        f"Of {len(tested)} pipeline{plural} compared with `{reference}` on {key} (paired test, 5% level, not "
        f"adjusted for multiple comparisons), {len(worse)} are significantly worse, {len(better)} significantly "
        f"better and {len(same)} indistinguishable from it."
    )
    for budget, members in _by_budget(rows, reference).items():
        names = {r["pipeline"]: r for r in members}
        tie = [
            n for n, r in names.items() if r.get("vs_reference_p") is not None and not significant(r["vs_reference_p"])
        ]
        rand = [n for n, r in names.items() if r.get("vs_random") == "indistinguishable"]
        beats = [n for n, r in names.items() if r.get("vs_random") == "beats"]
        text = f"At keep {budget}: indistinguishable from `{reference}`: {_list(tie)}"
        if any(r.get("vs_random") is not None for r in members):
            text += f"; indistinguishable from random: {_list(rand)}; beat every random seed: {_list(beats)}"
        lines.append(text + ".")
    top = [r["pipeline"] for r in rows if r.get("tier") == 1]
    lines.append(
        f"Tier 1 (not separable from the best, `{rows[0]['pipeline']}`): {_list(top)}." if rows else "No pipelines."
    )
    if baseline is not None:
        above = [r["pipeline"] for r in rows if significant(r.get("vs_baseline_p")) and (r.get("vs_baseline") or 0) > 0]
        lines.append(f"Significantly better than the baseline `{baseline}`: {_list(above)}.")
    for group in stats["seeds"]:
        lines.append(
            f"`{group['group']}` over {group['seeds']} seeds: mean {100 * group['mean']:.1f}%, "
            f"seeds from {100 * group['min']:.1f}% to {100 * group['max']:.1f}%."
        )
    if smallest < SMALL:
        lines.append(
            f"Warning: a task has only {smallest} examples; intervals are wide and differences of a few points "
            "cannot be separated. Use more examples before ranking close pipelines."
        )
    return lines


def _by_budget(rows: list[dict[str, Any]], reference: str) -> dict[str, list[dict[str, Any]]]:
    """Rows of sweep pipelines by their nominal budget (``"50%"``), in first-seen order."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        parsed = parse_name(row["pipeline"])
        if parsed is not None and row["pipeline"] != reference and parsed.seed is None:
            out[parsed.budget].append(row)
    return dict(out)


def _list(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names) if names else "none"


def markdown_sections(stats: dict[str, Any], pct: bool = True) -> list[str]:
    """The report's seed and matched-budget tables."""
    lines: list[str] = []
    if stats["seeds"]:
        lines += [
            "",
            "## Stochastic reducers over seeds",
            "",
            "| pipeline | seeds | per seed | mean | spread (sd) | 95% interval |",
            "|---|---|---|---|---|---|",
        ]
        for g in stats["seeds"]:
            per = ", ".join(_pct(v) for v in g["values"])
            lines.append(
                f"| {g['group']} | {g['seeds']} | {per} | {_pct(g['mean'])} | {_pct(g['min'])} - {_pct(g['max'])} "
                f"({_pct(g['sd'])}) | [{_pct(g['lo'])}, {_pct(g['hi'])}] |"
            )
    budgets = stats.get("matched_budgets") or {}
    if budgets.get("flops"):
        lines += _budget_table(budgets, stats["metric"])
    return lines


def _budget_table(budgets: dict[str, Any], metric: str) -> list[str]:
    heads = [f"{round(100 * t)}% FLOPs cut" for t in FLOPS_TARGETS] + [
        f"{round(100 * t)}% tokens kept" for t in TOKEN_TARGETS
    ]
    auc = budgets.get("auc_range")
    lines = [
        "",
        "## Matched budgets",
        "",
        f"{metric} interpolated linearly between each reducer's budgets (the unpruned model anchors 0% cut), "
        "with the 95% interval; `*`: differs from unpruned (paired bootstrap, 5%); `-`: outside the reducer's "
        f"budgets. AUC: mean {metric} over FLOPs cuts from 0 to {_pct(auc)} (a range every reducer reaches).",
        "",
        "| reducer | " + " | ".join(heads) + " | AUC |",
        "|" + "---|" * (len(heads) + 2),
    ]
    for family in budgets["flops"]:
        cells = [budgets["flops"][family][label(t)] for t in FLOPS_TARGETS] + [
            budgets["tokens"][family][label(t)] for t in TOKEN_TARGETS
        ]
        cells.append(budgets["auc"].get(family))
        lines.append(f"| {family} | " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _cell(cell: dict[str, float] | None) -> str:
    if cell is None:
        return "-"
    star = "*" if significant(cell.get("p")) else ""
    return f"{_pct(cell['value'])}{star} [{_pct(cell['lo'])}, {_pct(cell['hi'])}]"


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


__all__ = ["findings", "markdown_sections", "ranking_metric", "significance"]
