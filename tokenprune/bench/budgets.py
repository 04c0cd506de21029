"""Seeds and budgets: stochastic reducers over several seeds, and methods compared at the same cost.

Pipelines are recognised by the names a sweep gives them: ``<reducer>-<keep>%`` (or ``-<n>tok``),
and ``<reducer>-<keep>%@seed<k>`` for a stochastic reducer's further seeds (the first seed keeps the
plain name). A *family* is every budget of one reducer; a *seed group* every seed of one budget.

* :func:`seed_groups` / :func:`seed_summary`: a seed group's mean, the spread over its seeds, and the
  interval of its seed-averaged per-example score.
* :func:`versus_random`: whether a pipeline beats ``random`` at its budget: only when its paired
  difference to *every* seed's run is positive and significant.
* :func:`matched_budgets`: per family, the ranking metric interpolated (linearly, between the family's
  neighbouring budgets; the unpruned model anchors 0% cut / 100% kept) at equal FLOPs reduction and
  at equal visual tokens kept, each with its interval, and the normalised area under the metric-FLOPs
  curve over a range every family reaches.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenprune.bench.stats import bootstrap_p_value, percentile_interval
from tokenprune.bench.uncertainty import ALPHA, Analysis

_NAME = re.compile(r"^(?P<family>.+)-(?P<budget>\d+%|\d+tok)(?:@seed(?P<seed>\d+))?$")
FLOPS_TARGETS = (0.5, 0.75, 0.9)
TOKEN_TARGETS = (0.5, 0.25, 0.1)
RANDOM = "random"


def label(target: float) -> str:
    """A target's key in the matched-budget tables (``0.75`` -> ``"75%"``), the same in memory and in JSON."""
    return f"{round(100 * target)}%"


@dataclass(frozen=True)
class Parsed:
    """A sweep pipeline's name, read back: ``family`` (the reducer), ``budget`` (``"50%"``), ``seed``."""

    family: str
    budget: str
    seed: int | None

    @property
    def group(self) -> str:
        """The name without its seed suffix."""
        return f"{self.family}-{self.budget}"


def parse_name(name: str) -> Parsed | None:
    """``"random-50%@seed2"`` -> ``Parsed("random", "50%", 2)``; ``None`` for a name a sweep does not give."""
    m = _NAME.match(name)
    if m is None:
        return None
    return Parsed(m["family"], m["budget"], int(m["seed"]) if m["seed"] is not None else None)


def seed_groups(names: list[str]) -> dict[str, list[str]]:
    """Seed groups with more than one seed: group name (the first seed's) -> its pipelines, in seed order."""
    groups: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name in names:
        parsed = parse_name(name)
        if parsed is not None:
            groups[parsed.group].append((parsed.seed or 0, name))
    return {g: [n for _, n in sorted(m)] for g, m in groups.items() if len(m) > 1 and any(n == g for _, n in m)}


def seed_summary(analysis: Analysis, key: str, names: list[str]) -> list[dict[str, Any]]:
    """Per seed group: the seeds' values of ``key``, their mean and spread, and the seed-average's interval."""
    out = []
    for group, members in seed_groups(names).items():
        idx = [analysis.index(m) for m in members if m in analysis.names]
        values = analysis.points[key][idx]
        lo, hi = percentile_interval(analysis.samples[key][idx].mean(axis=0))
        out.append(
            {
                "group": group,
                "pipelines": members,
                "seeds": len(idx),
                "values": [float(v) for v in values],
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)) if len(idx) > 1 else 0.0,
                "min": float(values.min()),
                "max": float(values.max()),
                "lo": lo,
                "hi": hi,
            }
        )
    return out


def versus_random(analysis: Analysis, key: str, names: list[str]) -> dict[str, str]:
    """Per pipeline at a budget where ``random`` ran: ``"beats"``, ``"worse"`` or ``"indistinguishable"``.

    ``beats``: the paired difference to every one of random's seeds at that budget is positive and
    significant; ``worse``: negative and significant against every seed; otherwise indistinguishable.
    """
    randoms: dict[str, list[int]] = defaultdict(list)
    for name in names:
        parsed = parse_name(name)
        if parsed is not None and parsed.family == RANDOM and name in analysis.names:
            randoms[parsed.budget].append(analysis.index(name))
    out = {}
    for name in names:
        parsed = parse_name(name)
        if parsed is None or parsed.family == RANDOM or parsed.budget not in randoms or name not in analysis.names:
            continue
        i = analysis.index(name)
        signs = []
        for j in randoms[parsed.budget]:
            diff = analysis.points[key][i] - analysis.points[key][j]
            signs.append(0 if not analysis.distinct(key, i, j) else (1 if diff > 0 else -1))
        out[name] = (
            "beats" if all(s == 1 for s in signs) else "worse" if all(s == -1 for s in signs) else ("indistinguishable")
        )
    return out


def matched_budgets(analysis: Analysis, key: str, rows: list[dict[str, Any]], reference: str) -> dict[str, Any]:
    """Per family (seed groups averaged): ``key`` at equal FLOPs cut and equal visual tokens kept, and the AUC.

    Returns ``{"flops": {family: {"75%": cell, ...}}, "tokens": {...}, "auc": {family: cell}, "auc_range": R}``,
    a cell: ``{"value", "lo", "hi", "p"}`` (``p``: the paired test against unpruned; ``None`` where the
    family's budgets do not reach the target: no extrapolation).
    """
    by_name = {r["pipeline"]: r for r in rows}
    if reference not in by_name or reference not in analysis.names:
        return {}
    ref = by_name[reference]
    ref_i = analysis.index(reference)
    families = _families(analysis, key, rows, ref)
    out: dict[str, Any] = {"flops": {}, "tokens": {}, "auc": {}}
    ref_samples = analysis.samples[key][ref_i]
    anchor = (analysis.points[key][ref_i], ref_samples)
    for family, points in families.items():
        cut = [(0.0, *anchor)] + [(p["cut"], p["point"], p["samples"]) for p in points]
        kept = [(1.0, *anchor)] + [(p["kept"], p["point"], p["samples"]) for p in points]
        out["flops"][family] = {label(t): _cell(_interpolate(cut, t), ref_samples) for t in FLOPS_TARGETS}
        out["tokens"][family] = {label(t): _cell(_interpolate(kept, t), ref_samples) for t in TOKEN_TARGETS}
    reach = [max(p["cut"] for p in points) for points in families.values()]
    if reach:
        limit = min(reach)
        out["auc_range"] = limit
        for family, points in families.items():
            cut = [(0.0, *anchor)] + [(p["cut"], p["point"], p["samples"]) for p in points]
            out["auc"][family] = _cell(_area(cut, limit), ref_samples)
    return out


def _families(
    analysis: Analysis, key: str, rows: list[dict[str, Any]], ref: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Per family with at least two budgets: its budgets' FLOPs cut, tokens kept, point and samples (seeds averaged)."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        parsed = parse_name(row["pipeline"])
        if parsed is not None and row.get(key) is not None and row.get("flops_reduction") is not None:
            grouped[parsed.family][parsed.budget].append(row)
    out: dict[str, list[dict[str, Any]]] = {}
    for family, budgets in grouped.items():
        if len(budgets) < 2:
            continue
        points = []
        for members in budgets.values():
            idx = [analysis.index(r["pipeline"]) for r in members]
            points.append(
                {
                    "cut": float(np.mean([r["flops_reduction"] for r in members])),
                    "kept": float(np.mean([r["visual_tokens"] for r in members])) / max(ref["visual_tokens"], 1e-9),
                    "point": float(analysis.points[key][idx].mean()),
                    "samples": analysis.samples[key][idx].mean(axis=0),
                }
            )
        out[family] = points
    return out


Point = tuple[float, float, np.ndarray]


def _interpolate(points: list[Point], target: float) -> tuple[float, np.ndarray] | None:
    """Linear interpolation of ``(x, value, samples)`` points at ``x = target``; ``None`` outside their range."""
    points = sorted(points, key=lambda p: p[0])
    for (x0, v0, s0), (x1, v1, s1) in itertools.pairwise(points):
        if x0 <= target <= x1:
            w = 0.0 if x1 == x0 else (target - x0) / (x1 - x0)
            return (1 - w) * v0 + w * v1, (1 - w) * s0 + w * s1
    return None


def _area(points: list[Point], limit: float) -> tuple[float, np.ndarray] | None:
    """The mean of the piecewise-linear curve over ``x`` in ``[0, limit]`` (trapezoids), and its samples."""
    if limit <= 0:
        return None
    xs = sorted({p[0] for p in points if p[0] <= limit} | {limit})
    values = [v for x in xs if (v := _interpolate(points, x)) is not None]
    if len(values) != len(xs):
        return None
    total_v, total_s = 0.0, np.zeros_like(points[0][2])
    for a in range(len(xs) - 1):
        width = xs[a + 1] - xs[a]
        total_v += width * (values[a][0] + values[a + 1][0]) / 2
        total_s = total_s + width * (values[a][1] + values[a + 1][1]) / 2
    return total_v / limit, total_s / limit


def _cell(value: tuple[float, np.ndarray] | None, ref_samples: np.ndarray) -> dict[str, float] | None:
    if value is None:
        return None
    point, samples = value
    lo, hi = percentile_interval(samples)
    return {"value": float(point), "lo": lo, "hi": hi, "p": bootstrap_p_value(samples - ref_samples)}


def significant(p: float | None) -> bool:
    """``p`` below the 5% level (``None`` / NaN: not significant)."""
    return p is not None and not math.isnan(p) and p < ALPHA


__all__ = [
    "FLOPS_TARGETS",
    "TOKEN_TARGETS",
    "Parsed",
    "label",
    "matched_budgets",
    "parse_name",
    "seed_groups",
    "seed_summary",
    "significant",
    "versus_random",
]
