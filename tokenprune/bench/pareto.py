"""The Pareto plot of a comparison: accuracy (or agreement) against GFLOPs, with 95% error bars."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from statistics import fmean
from typing import Any

from tokenprune.bench.budgets import FLOPS_TARGETS, parse_name
from tokenprune.bench.config import REFERENCE

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
"""Okabe and Ito's colour-blind safe palette (Color Universal Design, 2002)."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def style(index: int) -> tuple[str, str]:
    """``(colour, marker)`` of the ``index``-th method: no two of the first 80 share both."""
    return OKABE_ITO[index % len(OKABE_ITO)], MARKERS[(index + index // len(OKABE_ITO)) % len(MARKERS)]


def pareto_plot(rows: list[dict[str, Any]], path: Path, stats: dict[str, Any] | None = None) -> None:
    """Accuracy (or agreement) against GFLOPs, one line per reducer with 95% error bars, the unpruned model as a star.

    Each reducer has its own colour (Okabe-Ito) and marker, so methods stay apart in grey print and for
    colour-blind readers; seeds of a stochastic reducer are averaged into one point. Hollow markers on
    dotted verticals: the matched-budget points (the metric interpolated at 50, 75, 90% FLOPs cut).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "accuracy" if any(r["accuracy"] is not None for r in rows) else "agreement"
    reference = (stats or {}).get("reference", REFERENCE)
    seeds = {g["group"]: g for g in (stats or {}).get("seeds", [])}
    families = _plot_families(rows, metric, seeds, reference)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ref = next((r for r in rows if r["pipeline"] == reference), None)
    matched = ((stats or {}).get("matched_budgets") or {}).get("flops", {})
    for index, (family, points) in enumerate(sorted(families.items())):
        colour, marker = style(index)
        points.sort(key=lambda p: p[0])
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        err = [[max(0.0, p[1] - p[2]) for p in points], [max(0.0, p[3] - p[1]) for p in points]]
        ax.errorbar(xs, ys, yerr=err, color=colour, marker=marker, capsize=2, lw=1.2, ms=5, label=family)
        for target, cell in (matched.get(family) or {}).items():
            if cell is not None and ref is not None:
                x = ref["gflops"] * (1 - float(target.rstrip("%")) / 100)
                ax.scatter([x], [cell["value"]], marker=marker, s=50, facecolors="none", edgecolors=colour, zorder=4)
    if ref is not None and ref[metric] is not None and ref["gflops"] is not None:
        lo, hi = ref.get(f"{metric}_lo"), ref.get(f"{metric}_hi")
        if lo is not None and hi is not None:
            ax.errorbar(
                [ref["gflops"]],
                [ref[metric]],
                yerr=[[ref[metric] - lo], [hi - ref[metric]]],
                color="black",
                capsize=3,
                lw=1,
            )
        ax.scatter([ref["gflops"]], [ref[metric]], marker="*", s=200, color="black", label=reference, zorder=5)
        for target in FLOPS_TARGETS if matched else ():
            ax.axvline(ref["gflops"] * (1 - target), color="grey", ls=":", lw=0.8)
    ax.set_xlabel("language-model prefill GFLOPs per example")
    ax.set_ylabel(f"{metric} (95% interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_families(
    rows: list[dict[str, Any]], metric: str, seeds: dict[str, dict[str, Any]], reference: str
) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per reducer: ``(gflops, value, lo, hi)`` per budget; a seed group's point is its seed average and interval."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["pipeline"] == reference or r[metric] is None or r["gflops"] is None:
            continue
        parsed = parse_name(r["pipeline"])
        family, budget = (parsed.family, parsed.budget) if parsed else (r["pipeline"].rsplit("-", 1)[0], r["pipeline"])
        grouped[family][budget].append(r)
    out: dict[str, list[tuple[float, float, float, float]]] = {}
    for family, budgets in grouped.items():
        out[family] = []
        for budget, members in budgets.items():
            value = fmean(m[metric] for m in members)
            group = seeds.get(f"{family}-{budget}") if len(members) > 1 else None
            if group is not None:
                lo, hi = group["lo"], group["hi"]
            else:
                lo, hi = _or(members[0].get(f"{metric}_lo"), value), _or(members[0].get(f"{metric}_hi"), value)
            out[family].append((fmean(m["gflops"] for m in members), value, lo, hi))
    return out


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


__all__ = ["MARKERS", "OKABE_ITO", "pareto_plot", "style"]
